//! The driver: runs the sans-IO engine against real appliances.
//!
//! One agent of the pair drives at a time (normally the primary's). The driver:
//! 1. takes an input (operator request, completion of a command, observation, peer loss or
//!    return, logical tick);
//! 2. hands it to the engine as an [`Event`] and gets [`Command`]s back;
//! 3. writes the transition (event, resulting state, commands) to its journal with immediate
//!    durability and mirrors it to the peer agent *before* executing anything;
//! 4. executes the commands by composing appliance [`Op`]s, on this appliance directly and on
//!    the peer through the peer link; completions come back as new inputs.
//!
//! When the driving agent's appliance is lost, the peer restores the engine from its mirror of
//! the journal and drives from there.
//!
//! By role: this module holds the driver and its input loop; `journal` writes, mirrors and
//! restores transitions ([`JournalError`]); `execute` turns commands into ops; `switch` moves
//! control and routes the fronts ([`SwitchError`]); `observe` handles observations and the
//! peer's loss and return; `operator` handles operator requests ([`OperatorError`]);
//! `bootstrap` brings up the first pair ([`BootstrapError`]). Ops on either appliance fail
//! with an [`OpError`], which says whether the peer was unreachable.

mod bootstrap;
mod execute;
mod journal;
mod observe;
mod operator;
mod switch;
mod witness;

pub use bootstrap::BootstrapError;
pub use journal::JournalError;
pub use operator::OperatorError;
pub use switch::SwitchError;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hitless_core::{
    ApplianceId, Command, ControlEpoch, Engine, EngineConfig, EngineState, Event, InstanceId,
    Report,
};
use hitless_journal::Journal;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use crate::appliance::{Appliance, Observation, Op, OpOk, Started};
use crate::remote::{OpError, Remote};

/// One journal record: an engine transition, written before its commands run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Transition {
    /// Wall-clock time of the write (for operators; the engine never sees it).
    pub at_unix_ms: u64,
    /// The input, if any (`None` for the initial state).
    pub event: Option<Event>,
    /// The engine state after the input.
    pub state: EngineState,
    /// The commands the input produced.
    pub commands: Vec<Command>,
    /// Where each instance's service and sync endpoints are.
    pub instances: BTreeMap<InstanceId, Started>,
}

/// An operator request.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "kebab-case")]
pub enum OperatorRequest {
    Upgrade { image_dir: std::path::PathBuf },
    Abort,
    Rollback,
    Commit,
    Resume,
}

/// A line of progress for `hitless upgrade` and the API.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProgressLine {
    pub seq: u64,
    pub at_unix_ms: u64,
    pub report: Report,
}

/// Inputs of the driver loop.
pub enum Input {
    Operator {
        request: OperatorRequest,
        reply: oneshot::Sender<Result<String, OperatorError>>,
    },
    Event(Event),
    Observation(ApplianceId, Observation),
    PeerLost,
    PeerUp,
    Tick,
    Started(Box<Started>),
    /// The witness records the other appliance in control at this epoch.
    StandDown(ControlEpoch),
}

/// Timing of the driver.
#[derive(Clone, Debug)]
pub struct DriverTiming {
    /// One logical tick.
    pub tick: Duration,
    /// How often sync progress is polled.
    pub poll: Duration,
    /// Bound of a planned switchover's waits: the target catching up, the HA standby re-attaching.
    pub drain_bound: Duration,
    /// A planned switchover holds clients once the target lags at most this many sequence
    /// numbers behind the instance in control...
    pub converged_lag: u64,
    /// ... or once it has waited this long for that.
    pub converge_bound: Duration,
}

impl Default for DriverTiming {
    fn default() -> Self {
        Self {
            tick: Duration::from_millis(100),
            poll: Duration::from_millis(20),
            drain_bound: Duration::from_secs(2),
            converged_lag: 8,
            converge_bound: Duration::from_millis(500),
        }
    }
}

/// The most progress lines kept for the API.
pub const PROGRESS_KEPT: usize = 1000;

/// What the API reads from the driver.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DriverView {
    pub driving: bool,
    pub engine: Option<hitless_core::Status>,
    pub instances: BTreeMap<InstanceId, Started>,
    pub progress: VecDeque<ProgressLine>,
    pub next_progress: u64,
    /// The journal's next index.
    pub journal_next_index: u64,
}

/// Shared view for the API.
pub type SharedView = Arc<std::sync::Mutex<DriverView>>;

/// Executes ops on either appliance.
#[derive(Clone)]
pub struct Appliances {
    pub local: Arc<Appliance>,
    pub remote: Remote,
}

impl Appliances {
    /// Runs `op` on `appliance`.
    pub async fn exec(&self, appliance: ApplianceId, op: Op) -> Result<OpOk, OpError> {
        if appliance == self.local.id() {
            self.local
                .exec(op)
                .await
                .map_err(|reason| OpError::Refused { appliance, reason })
        } else {
            self.remote.exec(op).await
        }
    }
}

/// The driver.
pub struct Driver {
    me: ApplianceId,
    engine: Option<Engine>,
    journal: Journal<Transition>,
    apps: Appliances,
    instances: BTreeMap<InstanceId, Started>,
    inputs: mpsc::Sender<Input>,
    view: SharedView,
    timing: DriverTiming,
    engine_config: EngineConfig,
    peer_up: bool,
    /// Instances being stopped or killed on purpose (their exit is not a failure).
    stopping: HashMap<InstanceId, ()>,
    /// The witness, if the pair has one.
    witness: Option<Arc<dyn hitless_witness::Witness>>,
    /// The service address was given up because this side reached neither its peer nor the
    /// witness; taken back when the witness grants the drop.
    released_cut_off: bool,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Driver {
    /// A driver over `journal`. If the journal holds a state, the engine is restored from it.
    pub fn new(
        me: ApplianceId,
        journal: Journal<Transition>,
        apps: Appliances,
        inputs: mpsc::Sender<Input>,
        view: SharedView,
        timing: DriverTiming,
        engine_config: EngineConfig,
    ) -> Self {
        Self {
            me,
            engine: None,
            journal,
            apps,
            instances: BTreeMap::new(),
            inputs,
            view,
            timing,
            engine_config,
            peer_up: false,
            stopping: HashMap::new(),
            witness: None,
            released_cut_off: false,
        }
    }

    /// Decides control changes through `witness` (the engine's config must say so too).
    pub fn with_witness(mut self, witness: Arc<dyn hitless_witness::Witness>) -> Self {
        self.engine_config.witness = true;
        self.witness = Some(witness);
        self
    }

    /// Whether this agent drives the pair now.
    pub fn driving(&self) -> bool {
        self.engine.is_some()
    }

    /// The journal (the agent imports the peer's mirror into it while following).
    pub fn journal_mut(&mut self) -> &mut Journal<Transition> {
        &mut self.journal
    }

    /// The epoch in control, as this driver knows it.
    pub fn epoch(&self) -> ControlEpoch {
        self.engine
            .as_ref()
            .map(|e| e.state().pair.epoch)
            .or_else(|| {
                self.journal
                    .last()
                    .ok()
                    .flatten()
                    .map(|(_, t)| t.state.pair.epoch)
            })
            .unwrap_or_default()
    }

    /// Whether the instance in control, as this driver's engine knows it, runs on this
    /// appliance (`None` when not driving or nobody is in control).
    pub fn hosts_control(&self) -> Option<bool> {
        let st = self.engine.as_ref()?.state();
        let c = st.pair.in_control?;
        st.pair.get(c).map(|i| i.appliance == self.me)
    }

    /// Whether control changes go through a witness.
    pub fn has_witness(&self) -> bool {
        self.witness.is_some()
    }

    /// Stops driving (another agent drives at a higher epoch).
    pub fn step_down(&mut self) {
        if self.engine.take().is_some() {
            warn!("stepping down: the peer agent drives at a higher epoch");
        }
        self.publish();
    }

    /// Publishes what the API shows.
    pub fn publish(&self) {
        let mut v = self.view.lock().expect("view lock");
        v.journal_next_index = self.journal.next_index();
        v.driving = self.engine.is_some();
        v.engine = self.engine.as_ref().map(|e| e.status());
        v.instances = self.instances.clone();
    }

    fn progress(&self, report: Report) {
        let mut v = self.view.lock().expect("view lock");
        let seq = v.next_progress;
        v.next_progress += 1;
        v.progress.push_back(ProgressLine {
            seq,
            at_unix_ms: now_ms(),
            report,
        });
        while v.progress.len() > PROGRESS_KEPT {
            v.progress.pop_front();
        }
    }

    /// Handles one driver input.
    pub async fn input(&mut self, input: Input) -> Result<(), JournalError> {
        match input {
            Input::Tick => self.feed(Event::Tick),
            Input::Event(e) => {
                self.witness_answered(&e);
                self.feed(e)
            }
            Input::Started(s) => self.instance_started(*s),
            Input::Observation(_, observation) => self.observed(observation),
            Input::PeerLost => self.peer_lost(),
            Input::PeerUp => self.peer_returned().await,
            Input::StandDown(epoch) => {
                self.stand_down(epoch);
                Ok(())
            }
            Input::Operator { request, reply } => {
                let r = self.operator(request).await;
                let _ = reply.send(r);
                Ok(())
            }
        }
    }
}
