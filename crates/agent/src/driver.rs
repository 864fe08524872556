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

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hitless_control::AgentCommand;
use hitless_core::{
    ApplianceId, Command, ControlEpoch, Engine, EngineConfig, EngineState, Event, ImageRef,
    InstanceId, Pair, Report, Role,
};
use hitless_journal::Journal;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

use crate::appliance::{
    active_config, as_status, standby_config, Appliance, Observation, Op, OpOk, Started,
};
use crate::front::Route;
use crate::remote::Remote;

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
        reply: oneshot::Sender<Result<String, String>>,
    },
    Event(Event),
    Observation(ApplianceId, Observation),
    PeerLost,
    PeerUp,
    Tick,
    Started(Box<Started>),
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
    pub async fn exec(&self, appliance: ApplianceId, op: Op) -> Result<OpOk, String> {
        if appliance == self.local.id() {
            self.local.exec(op).await
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
        }
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
    pub fn epoch(&self) -> u64 {
        self.engine
            .as_ref()
            .map(|e| e.state().pair.epoch.0)
            .or_else(|| {
                self.journal
                    .last()
                    .ok()
                    .flatten()
                    .map(|(_, t)| t.state.pair.epoch.0)
            })
            .unwrap_or(0)
    }

    /// Starts driving from scratch: brings up the first pair (active on the primary, HA
    /// standby on the secondary) on `image`.
    pub async fn bootstrap(&mut self, image: ImageRef) -> Result<(), String> {
        let active = InstanceId(1);
        let standby = InstanceId(2);
        let epoch = ControlEpoch(1);
        info!(%image.name, version = %image.version, "bootstrapping the pair");
        let a = started(
            self.apps
                .exec(
                    ApplianceId::Primary,
                    Op::Start {
                        instance: active,
                        image: image.clone(),
                    },
                )
                .await?,
        )?;
        self.apps
            .exec(
                ApplianceId::Primary,
                Op::Control {
                    instance: active,
                    command: active_config(active, epoch.0),
                },
            )
            .await?;
        let b = started(
            self.apps
                .exec(
                    ApplianceId::Secondary,
                    Op::Start {
                        instance: standby,
                        image: image.clone(),
                    },
                )
                .await?,
        )?;
        self.apps
            .exec(
                ApplianceId::Secondary,
                Op::Control {
                    instance: standby,
                    command: standby_config(standby, epoch.0, &a.sync_addr, true),
                },
            )
            .await?;
        wait_ready(
            &self.apps,
            ApplianceId::Secondary,
            standby,
            Duration::from_secs(60),
            self.timing.poll,
        )
        .await?;
        route_to(&self.apps, epoch.0, &a).await?;
        self.instances.insert(active, a);
        self.instances.insert(standby, b);
        let engine = Engine::new(
            self.engine_config.clone(),
            Pair::steady(image, active, standby, epoch),
        )
        .map_err(|e| e.to_string())?;
        self.engine = Some(engine);
        self.record(None, vec![])?;
        self.publish();
        Ok(())
    }

    /// Takes over driving from the journal (the previous driver's appliance was lost, or this
    /// agent restarted). Returns false if the journal holds no state.
    pub fn restore(&mut self) -> Result<bool, String> {
        let last = self.journal.last().map_err(|e| e.to_string())?;
        let Some((index, t)) = last else {
            return Ok(false);
        };
        let engine = Engine::restore(t.state).map_err(|e| e.to_string())?;
        info!(index, "engine restored from the journal");
        self.instances = t.instances;
        self.engine = Some(engine);
        self.publish();
        Ok(true)
    }

    /// After this agent restarted while driving: its own instances died with it (instances
    /// share their agent's fate), so report them failed, then re-execute the commands the
    /// engine was waiting for (they are idempotent).
    pub fn resume_after_restart(&mut self) -> Result<(), String> {
        let Some(engine) = self.engine.as_ref() else {
            return Ok(());
        };
        let mine: Vec<InstanceId> = engine
            .state()
            .pair
            .instances
            .iter()
            .filter(|i| i.appliance == self.me && i.state.is_live())
            .map(|i| i.id)
            .collect();
        let again = engine.in_flight_commands();
        self.execute(again);
        for instance in mine {
            self.feed(Event::InstanceFailed {
                instance,
                reason: "its agent restarted".into(),
            })?;
        }
        Ok(())
    }

    /// Stops driving (another agent drives at a higher epoch).
    pub fn step_down(&mut self) {
        if self.engine.take().is_some() {
            warn!("stepping down: the peer agent drives at a higher epoch");
        }
        self.publish();
    }

    /// Feeds one event to the engine, journals the transition and executes the commands.
    pub fn feed(&mut self, event: Event) -> Result<(), String> {
        let Some(engine) = self.engine.as_mut() else {
            debug!(?event, "not driving; event ignored");
            return Ok(());
        };
        let commands = engine.handle(event.clone());
        let quiet_tick = matches!(event, Event::Tick) && commands.is_empty();
        if !quiet_tick {
            self.record(Some(event), commands.clone())?;
        }
        self.execute(commands);
        self.publish();
        Ok(())
    }

    fn record(&mut self, event: Option<Event>, commands: Vec<Command>) -> Result<(), String> {
        let state = self
            .engine
            .as_ref()
            .expect("recording while driving")
            .snapshot();
        let t = Transition {
            at_unix_ms: now_ms(),
            event,
            state,
            commands,
            instances: self.instances.clone(),
        };
        let index = self
            .journal
            .append(&t)
            .map_err(|e| format!("the journal refused a write; not executing: {e}"))?;
        // Mirror to the peer (its agent imports it into its own journal).
        if let Ok(batch) = self.journal.export_batch(index, 1) {
            for (i, env) in batch {
                self.apps.remote.mirror(i, env);
            }
        }
        if index % 512 == 0 && index > 1024 {
            let _ = self.journal.compact(index - 1024);
        }
        Ok(())
    }

    /// Kills `instance` in the background if the engine no longer counts on it.
    fn kill_written_off(&self, instance: InstanceId) {
        let Some(st) = self.engine.as_ref().map(|e| e.state()) else {
            return;
        };
        let Some(i) = st.pair.get(instance) else {
            return;
        };
        if i.state.is_live() && i.role != Role::Spare {
            return;
        }
        let (apps, app) = (self.apps.clone(), i.appliance);
        tokio::spawn(async move {
            if let Err(e) = apps.exec(app, Op::Kill { instance }).await {
                warn!(%instance, "cannot kill the unresponsive instance: {e}");
            }
        });
    }

    /// Tells the instance in control that the standby `gone` exited (best effort, in the
    /// background).
    fn tell_control_standby_gone(&self, gone: InstanceId) {
        let Some(st) = self.engine.as_ref().map(|e| e.state()) else {
            return;
        };
        let Some(active) = st.pair.in_control.filter(|a| *a != gone) else {
            return;
        };
        let Some(app) = st.pair.get(active).map(|i| i.appliance) else {
            return;
        };
        let apps = self.apps.clone();
        tokio::spawn(async move {
            let r = apps
                .exec(
                    app,
                    Op::Control {
                        instance: active,
                        command: AgentCommand::StandbyGone {
                            instance_id: gone.to_string(),
                        },
                    },
                )
                .await;
            if let Err(e) = r {
                debug!(%active, %gone, "could not tell the instance in control a standby is gone: {e}");
            }
        });
    }

    /// Points both fronts at the instance in control again, as this driver's state has it,
    /// when nothing is in flight (best effort, in the background). Used after another agent
    /// drove for a while and yielded to this one: it may have moved the service address.
    pub fn reassert_routes(&self) {
        let Some(engine) = self.engine.as_ref() else {
            return;
        };
        if !engine.in_flight_commands().is_empty() {
            return;
        }
        let pair = &engine.state().pair;
        let Some(to) = pair
            .in_control
            .and_then(|id| self.instances.get(&id))
            .cloned()
        else {
            return;
        };
        let (apps, epoch) = (self.apps.clone(), pair.epoch.0);
        tokio::spawn(async move {
            if let Err(e) = route_to(&apps, epoch, &to).await {
                warn!("re-asserting the service routes failed: {e}");
            }
        });
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
    pub async fn input(&mut self, input: Input) -> Result<(), String> {
        match input {
            Input::Tick => self.feed(Event::Tick),
            Input::Event(e) => self.feed(e),
            Input::Started(s) => {
                let id = s.instance;
                self.instances.insert(id, *s);
                self.publish();
                self.feed(Event::InstanceStarted { instance: id })
            }
            Input::Observation(
                _,
                Observation::Exited {
                    instance,
                    reason,
                    expected,
                },
            ) => {
                if expected || self.stopping.remove(&instance).is_some() {
                    self.feed(Event::InstanceStopped { instance })
                } else {
                    // Its process is gone: it can never be promoted, so the instance in
                    // control need not hold acknowledgements for it (the HA grace).
                    self.tell_control_standby_gone(instance);
                    self.feed(Event::InstanceFailed { instance, reason })
                }
            }
            Input::Observation(_, Observation::Unresponsive { instance, detail }) => {
                warn!(%instance, %detail, "instance unresponsive: its heartbeat is lost");
                self.feed(Event::HeartbeatLost { instance })?;
                // Written off (and fenced) by the engine: a hung process must not linger, holding
                // its clients' connections and its resources. Killing it closes them; the front
                // replays what it never answered.
                self.kill_written_off(instance);
                Ok(())
            }
            Input::PeerLost => {
                self.peer_up = false;
                let peer = self.me.other();
                if self.engine.is_none() {
                    // The driver's appliance is gone: take over from the mirrored journal.
                    if self.restore()? {
                        warn!(%peer, "driving appliance lost; this agent drives now");
                    } else {
                        return Ok(());
                    }
                }
                self.feed(Event::ApplianceLost { appliance: peer })
            }
            Input::PeerUp => {
                let was_down = !self.peer_up;
                self.peer_up = true;
                if self.engine.is_some() {
                    // A returning agent may hold an older history (it was restarted, or cut
                    // off): the latest record, which holds the whole engine state, brings its
                    // journal up to date even if nothing else happens.
                    let last = self.journal.next_index().saturating_sub(1);
                    if let Ok(batch) = self.journal.export_batch(last, 1) {
                        for (i, env) in batch {
                            self.apps.remote.mirror(i, env);
                        }
                    }
                }
                if self.engine.is_some() && was_down {
                    let peer = self.me.other();
                    let lost = !self
                        .engine
                        .as_ref()
                        .map(|e| e.state().pair.is_up(peer))
                        .unwrap_or(true);
                    if lost {
                        // Its instances were written off: make sure none is left running.
                        let _ = self.apps.remote.exec(Op::Describe).await.map(|d| {
                            if let OpOk::Described(d) = d {
                                for s in d.instances {
                                    let r = self.apps.remote.clone();
                                    tokio::spawn(async move {
                                        let _ = r
                                            .exec(Op::Kill {
                                                instance: s.instance,
                                            })
                                            .await;
                                    });
                                }
                            }
                        });
                        return self.feed(Event::ApplianceRecovered { appliance: peer });
                    }
                }
                Ok(())
            }
            Input::Operator { request, reply } => {
                let r = self.operator(request).await;
                let _ = reply.send(r);
                Ok(())
            }
        }
    }

    async fn operator(&mut self, request: OperatorRequest) -> Result<String, String> {
        if self.engine.is_none() {
            return Err(format!(
                "the {} agent does not drive the pair now; send the request to the peer agent",
                self.me
            ));
        }
        match request {
            OperatorRequest::Upgrade { image_dir } => {
                // Both appliances verify the image and add it to their catalogs.
                let (p, s) = tokio::join!(
                    self.apps.exec(
                        ApplianceId::Primary,
                        Op::AddImage {
                            dir: image_dir.clone()
                        }
                    ),
                    self.apps.exec(
                        ApplianceId::Secondary,
                        Op::AddImage {
                            dir: image_dir.clone()
                        }
                    )
                );
                let mut catalog_ref = None;
                for (app, r) in [(ApplianceId::Primary, p), (ApplianceId::Secondary, s)] {
                    match r {
                        Ok(OpOk::Added { image }) => catalog_ref = Some(image),
                        Ok(other) => return Err(format!("unexpected answer {other:?}")),
                        Err(e) => {
                            return Err(format!("the {app} appliance cannot use the image: {e}"))
                        }
                    }
                }
                let catalog_ref = catalog_ref.expect("both appliances answered");
                let engine = self.engine.as_ref().expect("driving");
                let running = engine
                    .state()
                    .pair
                    .control()
                    .map(|i| i.image.clone())
                    .ok_or("no instance is in control; nothing to upgrade")?;
                let verdict = self
                    .apps
                    .local
                    .catalog()
                    .compat(&running, &catalog_ref)
                    .map_err(|e| e.to_string())?;
                if !(verdict.upgrade_ok && verdict.downgrade_ok) {
                    return Err(format!(
                        "image {} {} is not compatible with the running {} {} in both directions: {}",
                        catalog_ref.name, catalog_ref.version, running.name, running.version, verdict.detail
                    ));
                }
                let pair = self.engine.as_ref().expect("driving").state().pair.clone();
                crate::plan::check_pair(&self.apps, &pair).await?;
                self.feed(Event::Compatibility { verdict })?;
                self.feed(Event::Start {
                    target: catalog_ref.clone(),
                })?;
                self.check_rejected("start").map(|_| {
                    format!(
                        "upgrade to {} {} started",
                        catalog_ref.name, catalog_ref.version
                    )
                })
            }
            OperatorRequest::Abort => self.simple(Event::Abort, "abort"),
            OperatorRequest::Rollback => self.simple(Event::Rollback, "rollback"),
            OperatorRequest::Commit => self.simple(Event::Commit, "commit"),
            OperatorRequest::Resume => self.simple(Event::Resume, "resume"),
        }
    }

    fn simple(&mut self, e: Event, name: &str) -> Result<String, String> {
        self.feed(e)?;
        self.check_rejected(name)
            .map(|_| format!("{name} accepted"))
    }

    /// Whether the last progress line is a rejection of `request`.
    fn check_rejected(&self, request: &str) -> Result<(), String> {
        let v = self.view.lock().expect("view lock");
        for line in v.progress.iter().rev().take(4) {
            if let Report::Rejected { request: r, reason } = &line.report {
                if r.contains(request) {
                    return Err(reason.clone());
                }
            }
        }
        Ok(())
    }

    fn instance_appliance(&self, id: InstanceId) -> Option<ApplianceId> {
        self.engine
            .as_ref()?
            .state()
            .pair
            .get(id)
            .map(|i| i.appliance)
    }

    /// Executes a batch of commands. Commands that must run in order
    /// ([`Command::must_run_in_order`]: those that change control or stop instances) run one
    /// after the other, in one task; starts and attaches (which wait for boots and syncs) run
    /// beside it.
    fn execute(&mut self, commands: Vec<Command>) {
        let mut ordered = Vec::new();
        for c in commands {
            if c.must_run_in_order() {
                ordered.push(c);
                continue;
            }
            match c {
                Command::Report { progress } => {
                    match &progress {
                        Report::Stuck(s) => {
                            warn!(reason = %s.reason, resume = %s.resume_with, "ISSU needs the operator")
                        }
                        Report::Finished(o) => info!(?o, "ISSU finished"),
                        Report::Rejected { request, reason } => {
                            warn!(%request, %reason, "request rejected")
                        }
                        other => info!(report = ?other, "progress"),
                    }
                    self.progress(progress);
                }
                Command::StartInstance {
                    instance,
                    appliance,
                    image,
                } => {
                    let apps = self.apps.clone();
                    let tx = self.inputs.clone();
                    tokio::spawn(async move {
                        let r = apps.exec(appliance, Op::Start { instance, image }).await;
                        let input = match r.and_then(started) {
                            Ok(s) => Input::Started(Box::new(s)),
                            Err(reason) => Input::Event(Event::InstanceFailed { instance, reason }),
                        };
                        let _ = tx.send(input).await;
                    });
                }
                Command::AttachStandby {
                    standby,
                    active,
                    designated_ha,
                } => {
                    let (Some(s_app), Some(a)) = (
                        self.instance_appliance(standby),
                        self.instances.get(&active).cloned(),
                    ) else {
                        self.fail_async(
                            standby,
                            format!("cannot attach {standby} to {active}: unknown instance"),
                        );
                        continue;
                    };
                    let epoch = self.epoch();
                    let apps = self.apps.clone();
                    let tx = self.inputs.clone();
                    let poll = self.timing.poll;
                    tokio::spawn(async move {
                        let r = apps
                            .exec(
                                s_app,
                                Op::Control {
                                    instance: standby,
                                    command: standby_config(
                                        standby,
                                        epoch,
                                        &a.sync_addr,
                                        designated_ha,
                                    ),
                                },
                            )
                            .await;
                        let ev = match r {
                            Err(reason) => {
                                warn!(%standby, %reason, "standby attach failed");
                                Event::StandbyOutOfSync { instance: standby }
                            }
                            Ok(_) => ready_event(&apps, s_app, standby, poll, &tx).await,
                        };
                        let _ = tx.send(Input::Event(ev)).await;
                    });
                }
                Command::VerifyStandby { standby, .. } => {
                    let Some(s_app) = self.instance_appliance(standby) else {
                        continue;
                    };
                    let apps = self.apps.clone();
                    let tx = self.inputs.clone();
                    let poll = self.timing.poll;
                    tokio::spawn(async move {
                        let ev = ready_event(&apps, s_app, standby, poll, &tx).await;
                        let _ = tx.send(Input::Event(ev)).await;
                    });
                }
                // Taken above; anything else runs in order too, the safe default.
                other => ordered.push(other),
            }
        }
        if ordered.is_empty() {
            return;
        }
        // Context the ordered commands need, captured now.
        let ctx = self.switch_context();
        for c in &ordered {
            if let Command::StopInstance { instance } = c {
                self.stopping.insert(*instance, ());
            }
        }
        let apps = self.apps.clone();
        let tx = self.inputs.clone();
        let timing = self.timing.clone();
        tokio::spawn(async move {
            for c in ordered {
                let inputs = run_ordered(&apps, &ctx, &timing, c).await;
                for i in inputs {
                    let _ = tx.send(i).await;
                }
            }
        });
    }

    fn fail_async(&self, instance: InstanceId, reason: String) {
        let tx = self.inputs.clone();
        tokio::spawn(async move {
            let _ = tx
                .send(Input::Event(Event::InstanceFailed { instance, reason }))
                .await;
        });
    }

    fn switch_context(&self) -> SwitchContext {
        let mut ctx = SwitchContext {
            instances: self.instances.clone(),
            standbys: Vec::new(),
            appliance_of: BTreeMap::new(),
        };
        if let Some(e) = &self.engine {
            for i in &e.state().pair.instances {
                ctx.appliance_of.insert(i.id, i.appliance);
                if i.state.is_live() && matches!(i.role, Role::HaStandby | Role::LocalStandby) {
                    ctx.standbys.push((i.id, i.role == Role::HaStandby));
                }
            }
        }
        ctx
    }
}

/// What ordered commands need to know about the pair.
#[derive(Clone, Debug)]
struct SwitchContext {
    instances: BTreeMap<InstanceId, Started>,
    /// Live standbys and whether each is the designated HA standby.
    standbys: Vec<(InstanceId, bool)>,
    appliance_of: BTreeMap<InstanceId, ApplianceId>,
}

impl SwitchContext {
    fn app(&self, id: InstanceId) -> Result<ApplianceId, String> {
        self.appliance_of
            .get(&id)
            .copied()
            .ok_or_else(|| format!("instance {id} is unknown"))
    }
    fn started(&self, id: InstanceId) -> Result<&Started, String> {
        self.instances
            .get(&id)
            .ok_or_else(|| format!("instance {id} has no known endpoints"))
    }
}

fn started(r: OpOk) -> Result<Started, String> {
    match r {
        OpOk::Started(s) => Ok(*s),
        other => Err(format!("expected a started instance, got {other:?}")),
    }
}

/// Points both fronts at `to`; the appliance of `to` owns the service address.
async fn route_to(apps: &Appliances, epoch: u64, to: &Started) -> Result<(), String> {
    let route = Route {
        epoch,
        backend: Some(to.service_addr),
        hold: false,
    };
    // Bind on the new owner first, then release on the other: no window without a listener.
    apps.exec(
        to.appliance,
        Op::FrontRoute {
            route: route.clone(),
            listen: true,
        },
    )
    .await?;
    let other = to.appliance.other();
    if let Err(e) = apps
        .exec(
            other,
            Op::FrontRoute {
                route,
                listen: false,
            },
        )
        .await
    {
        warn!(appliance = %other, "front route update failed: {e}");
    }
    Ok(())
}

/// Polls a standby until it reports sufficient state; reports progress on the way.
async fn ready_event(
    apps: &Appliances,
    app: ApplianceId,
    standby: InstanceId,
    poll: Duration,
    tx: &mpsc::Sender<Input>,
) -> Event {
    // Bounded: the engine's own step timer also bounds the wait; this loop gives up after
    // ten minutes regardless.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    let mut last_report = tokio::time::Instant::now();
    while tokio::time::Instant::now() < deadline {
        match as_status(apps.exec(app, Op::Status { instance: standby }).await) {
            Ok(s) => {
                let applied = s
                    .services
                    .values()
                    .map(|x| x.applied_seq)
                    .min()
                    .unwrap_or(0);
                let lag = s.services.values().map(|x| x.lag).max().unwrap_or(0);
                if s.ready {
                    // The engine judges sufficient state on the latest lag it was told:
                    // report the lag at the moment of readiness first.
                    let _ = tx
                        .send(Input::Event(Event::SyncProgress {
                            instance: standby,
                            applied_seq: applied,
                            lag,
                        }))
                        .await;
                    let seq = s
                        .services
                        .values()
                        .filter_map(|x| x.digest_verified_at)
                        .min()
                        .unwrap_or(s.acked_seq);
                    return Event::SyncReady {
                        instance: standby,
                        seq,
                        digest_ok: true,
                    };
                }
                if last_report.elapsed() >= Duration::from_millis(250) {
                    last_report = tokio::time::Instant::now();
                    let _ = tx
                        .send(Input::Event(Event::SyncProgress {
                            instance: standby,
                            applied_seq: applied,
                            lag,
                        }))
                        .await;
                }
            }
            Err(e) => {
                return Event::InstanceFailed {
                    instance: standby,
                    reason: e,
                }
            }
        }
        tokio::time::sleep(poll).await;
    }
    Event::StandbyOutOfSync { instance: standby }
}

async fn wait_ready(
    apps: &Appliances,
    app: ApplianceId,
    id: InstanceId,
    bound: Duration,
    poll: Duration,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let s = as_status(apps.exec(app, Op::Status { instance: id }).await)?;
        if s.ready {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("instance {id} was not ready within {bound:?}"));
        }
        tokio::time::sleep(poll).await;
    }
}

/// Runs one ordered command; returns the inputs it produces.
async fn run_ordered(
    apps: &Appliances,
    ctx: &SwitchContext,
    timing: &DriverTiming,
    c: Command,
) -> Vec<Input> {
    match c {
        Command::StopInstance { instance } => {
            let app = match ctx.app(instance) {
                Ok(a) => a,
                Err(_) => return vec![Input::Event(Event::InstanceStopped { instance })],
            };
            match apps.exec(app, Op::Stop { instance }).await {
                Ok(_) => vec![Input::Event(Event::InstanceStopped { instance })],
                Err(e) => {
                    error!(%instance, "stop failed: {e}");
                    // The exit watcher still reports the end; a failed stop is reported as
                    // stopped only once the instance is really gone.
                    vec![]
                }
            }
        }
        Command::Fence { instance, epoch } => {
            if let Ok(app) = ctx.app(instance) {
                let r = apps
                    .exec(
                        app,
                        Op::Control {
                            instance,
                            command: AgentCommand::Fence { epoch: epoch.0 },
                        },
                    )
                    .await;
                if let Err(e) = r {
                    debug!(%instance, "fence not delivered (instance unreachable): {e}");
                }
            }
            vec![]
        }
        Command::Failover { to, epoch } => match failover(apps, ctx, to, epoch.0).await {
            Ok(()) => vec![Input::Event(Event::ControlSwitched { to, epoch })],
            Err(reason) => vec![Input::Event(Event::SwitchFailed { to, epoch, reason })],
        },
        Command::SwitchControl { from, to, epoch } => {
            match switchover(apps, ctx, timing, from, to, epoch.0).await {
                Ok(()) => vec![Input::Event(Event::ControlSwitched { to, epoch })],
                Err(reason) => {
                    warn!(%from, %to, epoch = epoch.0, %reason, "planned switchover failed");
                    // Release the hold on both fronts: control stays where it was.
                    for app in ApplianceId::ALL {
                        if let Ok(s) = ctx.started(from) {
                            let _ = apps
                                .exec(
                                    app,
                                    Op::FrontRoute {
                                        route: Route {
                                            epoch: epoch.0 - 1,
                                            backend: Some(s.service_addr),
                                            hold: false,
                                        },
                                        listen: app == s.appliance,
                                    },
                                )
                                .await;
                        }
                    }
                    vec![Input::Event(Event::SwitchFailed { to, epoch, reason })]
                }
            }
        }
        other => {
            warn!(?other, "command not executable in order");
            vec![]
        }
    }
}

/// Makes `to` the instance in control at `epoch`.
async fn promote(
    apps: &Appliances,
    app: ApplianceId,
    to: InstanceId,
    epoch: u64,
) -> Result<OpOk, String> {
    apps.exec(
        app,
        Op::Control {
            instance: to,
            command: AgentCommand::Promote { epoch },
        },
    )
    .await
}

/// Unplanned: promote `to` at `epoch`, re-point the other standbys, move the front.
async fn failover(
    apps: &Appliances,
    ctx: &SwitchContext,
    to: InstanceId,
    epoch: u64,
) -> Result<(), String> {
    let to_app = ctx.app(to)?;
    let target = ctx.started(to)?.clone();
    promote(apps, to_app, to, epoch).await?;
    repoint_standbys(apps, ctx, to, &target, epoch, None).await;
    route_to(apps, epoch, &target).await
}

async fn repoint_standbys(
    apps: &Appliances,
    ctx: &SwitchContext,
    to: InstanceId,
    target: &Started,
    epoch: u64,
    skip: Option<InstanceId>,
) {
    let mut set = tokio::task::JoinSet::new();
    for (s, ha) in &ctx.standbys {
        if *s == to || Some(*s) == skip {
            continue;
        }
        let Ok(app) = ctx.app(*s) else { continue };
        let (apps, s, ha, addr) = (apps.clone(), *s, *ha, target.sync_addr.clone());
        set.spawn(async move {
            let r = apps
                .exec(
                    app,
                    Op::Control {
                        instance: s,
                        command: standby_config(s, epoch, &addr, ha),
                    },
                )
                .await;
            if let Err(e) = r {
                warn!(standby = %s, "cannot re-point the standby at the new instance in control: {e}");
            }
        });
    }
    while set.join_next().await.is_some() {}
}

/// What the convergence before a planned switchover achieved.
struct Converged {
    /// Sequence numbers the target lacked when the hold began (`u64::MAX`: unknown).
    lag: u64,
    /// Time spent converging.
    waited: Duration,
}

/// How many sequence numbers `target` lacks of `want` (per service, the largest; a service it
/// does not report counts as applied up to 0).
fn lag_behind<'a>(
    want: impl Iterator<Item = (&'a String, u64)>,
    target: &hitless_control::InstanceStatus,
) -> u64 {
    want.map(|(svc, seq)| {
        let have = target.services.get(svc).map(|x| x.applied_seq).unwrap_or(0);
        seq.saturating_sub(have)
    })
    .max()
    .unwrap_or(0)
}

/// Polls the old active and the target until the target lags at most
/// [`DriverTiming::converged_lag`] sequence numbers behind it, at most
/// [`DriverTiming::converge_bound`]. Never fails: past the bound the switchover goes on
/// (its catch-up is bounded on its own).
async fn converge(
    apps: &Appliances,
    from_app: ApplianceId,
    from: InstanceId,
    to_app: ApplianceId,
    to: InstanceId,
    timing: &DriverTiming,
) -> Converged {
    let t0 = tokio::time::Instant::now();
    let mut lag = u64::MAX;
    loop {
        let (a, t) = tokio::join!(
            apps.exec(from_app, Op::Status { instance: from }),
            apps.exec(to_app, Op::Status { instance: to })
        );
        if let (Ok(a), Ok(t)) = (as_status(a), as_status(t)) {
            lag = lag_behind(a.services.iter().map(|(k, v)| (k, v.applied_seq)), &t);
        }
        if lag <= timing.converged_lag || t0.elapsed() >= timing.converge_bound {
            return Converged {
                lag,
                waited: t0.elapsed(),
            };
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

/// Planned: hold the fronts, quiesce the old active, wait until the target has
/// every mutation, promote it, demote the old one to its standby, re-point the others, route.
async fn switchover(
    apps: &Appliances,
    ctx: &SwitchContext,
    timing: &DriverTiming,
    from: InstanceId,
    to: InstanceId,
    epoch: u64,
) -> Result<(), String> {
    let from_app = ctx.app(from)?;
    let to_app = ctx.app(to)?;
    let target = ctx.started(to)?.clone();
    let bound_ms = timing.drain_bound.as_millis() as u64;
    // 0. Converge first, with clients still served: the hold below lasts as long as the
    //    target takes to apply what it still lacks, so wait (bounded) for a moment when it
    //    lacks little, as live migration pre-copies before it stops the guest.
    let converged = converge(apps, from_app, from, to_app, to, timing).await;
    let t0 = tokio::time::Instant::now();
    // 1. Hold both fronts: new requests wait there. Requests in flight are not waited for (a
    //    long pipeline or a client that never reads must not decide whether the pair can
    //    switch): the quiesce below lets those the old active executed become durable, and
    //    the old active hands back, by closing their connections once control moved, those it
    //    did not execute; the fronts send them on to the new instance in control. A front must
    //    be held if its appliance is reachable; the front of a lost appliance serves nobody.
    let (a, b) = tokio::join!(
        apps.exec(ApplianceId::Primary, Op::FrontHold { bound_ms }),
        apps.exec(ApplianceId::Secondary, Op::FrontHold { bound_ms })
    );
    for (app, r) in [(ApplianceId::Primary, a), (ApplianceId::Secondary, b)] {
        if let Err(e) = r {
            let lost = app != apps.local.id() && !apps.remote.link().is_up();
            if !lost {
                return Err(format!("the {app} front was not held: {e}"));
            }
            warn!("the {app} front was not held: its appliance is unreachable ({e})");
        }
    }
    let t_held = t0.elapsed();
    // 2. Quiesce the old active: nothing new is applied, and what it applied is durable.
    apps.exec(
        from_app,
        Op::Control {
            instance: from,
            command: AgentCommand::Quiesce { epoch: epoch - 1 },
        },
    )
    .await?;
    // 3. Wait until the target applied the old active's last sequence.
    let last = as_status(apps.exec(from_app, Op::Status { instance: from }).await)?;
    let want: BTreeMap<String, u64> = last
        .services
        .iter()
        .map(|(k, v)| (k.clone(), v.applied_seq))
        .collect();
    let deadline = tokio::time::Instant::now() + timing.drain_bound;
    let t_quiesced = t0.elapsed();
    let mut polls = 0u32;
    let mut first_lag = None;
    loop {
        let s = as_status(apps.exec(to_app, Op::Status { instance: to }).await)?;
        polls += 1;
        if first_lag.is_none() {
            first_lag = Some(lag_behind(want.iter().map(|(k, v)| (k, *v)), &s));
        }
        let caught_up = want.iter().all(|(svc, seq)| {
            s.services
                .get(svc)
                .map(|x| x.applied_seq >= *seq)
                .unwrap_or(false)
        });
        if caught_up {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            // Undo the quiesce: the old active keeps control.
            let _ = apps
                .exec(
                    from_app,
                    Op::Control {
                        instance: from,
                        command: active_config(from, epoch - 1),
                    },
                )
                .await;
            return Err(format!(
                "instance {to} did not catch up with {from} within {:?}",
                timing.drain_bound
            ));
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    let t_caught_up = t0.elapsed();
    // 4. Promote the target at the new epoch.
    promote(apps, to_app, to, epoch).await?;
    // 5. The old active becomes the target's standby and 6. every other standby follows the
    //    target, all at once (the HA standby's re-attach gates the clients).
    let demote = async {
        if let Err(e) = apps
            .exec(
                from_app,
                Op::Control {
                    instance: from,
                    command: AgentCommand::Demote {
                        epoch,
                        new_active_sync_addr: Some(target.sync_addr.clone()),
                    },
                },
            )
            .await
        {
            warn!(%from, "demotion failed (it is fenced by the new epoch regardless): {e}");
        }
    };
    tokio::join!(
        demote,
        repoint_standbys(apps, ctx, to, &target, epoch, Some(from))
    );
    let t_promoted = t0.elapsed();
    // 7. The target acknowledges nothing a failover could lose: clients wait until the
    //    designated HA standby is attached to it and in sync (bounded; past the bound the
    //    pair runs degraded and says so).
    for (s, ha) in &ctx.standbys {
        if !*ha || *s == to || *s == from {
            continue;
        }
        let Ok(app) = ctx.app(*s) else { continue };
        let deadline = tokio::time::Instant::now() + timing.drain_bound;
        loop {
            match as_status(apps.exec(app, Op::Status { instance: *s }).await) {
                Ok(st) if st.ready && st.epoch >= epoch => break,
                Ok(_) => {}
                Err(e) => {
                    warn!(standby = %s, "HA standby unreachable after the switchover: {e}");
                    break;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                warn!(standby = %s, "HA standby not in sync with {to} within {:?}; continuing degraded", timing.drain_bound);
                break;
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }
    let t_ha = t0.elapsed();
    // 8. Clients go to the target.
    route_to(apps, epoch, &target).await?;
    info!(
        %from, %to, epoch,
        converge_ms = converged.waited.as_secs_f64() * 1e3,
        converge_lag = converged.lag,
        held_ms = t_held.as_secs_f64() * 1e3,
        quiesced_ms = t_quiesced.as_secs_f64() * 1e3,
        catch_up_polls = polls,
        catch_up_first_lag = first_lag.unwrap_or(0),
        caught_up_ms = t_caught_up.as_secs_f64() * 1e3,
        promoted_ms = t_promoted.as_secs_f64() * 1e3,
        ha_in_sync_ms = t_ha.as_secs_f64() * 1e3,
        released_ms = t0.elapsed().as_secs_f64() * 1e3,
        "planned switchover done"
    );
    Ok(())
}
