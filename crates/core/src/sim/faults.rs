//! Faults: the kinds, their `KIND@STEP` specification and catalog, and how the simulator
//! injects them into the world or the engine.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::domain::ApplianceId;
use crate::engine::{Event, Step};

use super::world::{ai, Action, WStatus, World, DOWN_TICKS};
use super::Sim;

/// Fault kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// The newest instance started by the ISSU crashes (in a step that starts one: that one).
    CrashNew,
    /// The step's `StartInstance` fails.
    StartFail,
    /// The instance in control crashes.
    CrashActive,
    /// The synchronous HA standby crashes.
    CrashStandby,
    /// The synchronous HA standby falls out of sync.
    StandbyOutOfSync,
    /// Heartbeats from the instance in control are lost while it keeps running (zombie).
    HeartbeatLost,
    /// The primary appliance is lost (recovers empty later).
    ApplianceLostPrimary,
    /// The secondary appliance is lost (recovers empty later).
    ApplianceLostSecondary,
    /// Every command issued during the step hangs (the step times out); at `await-commit`
    /// the operator never commits and the rollback timer fires.
    Timeout,
    /// The operator aborts.
    Abort,
    /// The operator rolls back.
    Rollback,
    /// The appliances cannot reach each other (peer link and replication, both ways); both
    /// still reach the clients and the witness. Healed after [`crate::sim::CUT_TICKS`].
    PartitionPeers,
    /// The primary appliance is cut from its peer and the witness, still reachable by clients.
    IsolatePrimary,
    /// The secondary appliance is cut from its peer and the witness, still reachable by
    /// clients.
    IsolateSecondary,
    /// Only the traffic from the primary appliance to the secondary is dropped.
    OneWayPrimary,
    /// Both appliances lose the witness (without one nothing changes; with one, no control
    /// change and no standby given up until it returns).
    IsolateWitness,
    /// The driving agent is paused (`SIGSTOP`) for longer than the failure detector, then
    /// resumed (`SIGCONT`); its front is paused with it, its instances keep running.
    PauseAgent,
}

/// What a fault may cost, by the simulator's model, without a witness (with one: nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WitnessLoss {
    /// No acknowledged write is lost.
    Nothing,
    /// The side that steps down at the heal loses the writes it acknowledged alone (its HA
    /// standby unreachable, after the HA grace) before the clients followed the other side.
    AckedAloneByDiscardedSide,
}

/// `a` then `b`: [`FaultKind::ALL`] made of the two lists, so that a kind is listed once.
const fn concat_kinds(a: [FaultKind; 11], b: [FaultKind; 6]) -> [FaultKind; 17] {
    let mut out = [FaultKind::CrashNew; 17];
    let mut i = 0;
    while i < a.len() {
        out[i] = a[i];
        i += 1;
    }
    while i < out.len() {
        out[i] = b[i - a.len()];
        i += 1;
    }
    out
}

impl FaultKind {
    /// Every kind: [`FaultKind::SINGLE_DRIVER`], then [`FaultKind::SPLIT`].
    pub const ALL: [FaultKind; 17] = concat_kinds(FaultKind::SINGLE_DRIVER, FaultKind::SPLIT);

    /// The faults of links and agents: both agents may drive for a while.
    pub const SPLIT: [FaultKind; 6] = [
        FaultKind::PartitionPeers,
        FaultKind::IsolatePrimary,
        FaultKind::IsolateSecondary,
        FaultKind::OneWayPrimary,
        FaultKind::IsolateWitness,
        FaultKind::PauseAgent,
    ];

    /// The faults of instances, appliances and the operator: one agent drives throughout.
    pub const SINGLE_DRIVER: [FaultKind; 11] = [
        FaultKind::CrashNew,
        FaultKind::StartFail,
        FaultKind::CrashActive,
        FaultKind::CrashStandby,
        FaultKind::StandbyOutOfSync,
        FaultKind::HeartbeatLost,
        FaultKind::ApplianceLostPrimary,
        FaultKind::ApplianceLostSecondary,
        FaultKind::Timeout,
        FaultKind::Abort,
        FaultKind::Rollback,
    ];

    /// Kebab-case name.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::CrashNew => "crash-new",
            FaultKind::StartFail => "start-fail",
            FaultKind::CrashActive => "crash-active",
            FaultKind::CrashStandby => "crash-standby",
            FaultKind::StandbyOutOfSync => "standby-out-of-sync",
            FaultKind::HeartbeatLost => "heartbeat-lost",
            FaultKind::ApplianceLostPrimary => "appliance-lost-primary",
            FaultKind::ApplianceLostSecondary => "appliance-lost-secondary",
            FaultKind::Timeout => "timeout",
            FaultKind::Abort => "abort",
            FaultKind::Rollback => "rollback",
            FaultKind::PartitionPeers => "partition-peers",
            FaultKind::IsolatePrimary => "isolate-primary",
            FaultKind::IsolateSecondary => "isolate-secondary",
            FaultKind::OneWayPrimary => "one-way-primary",
            FaultKind::IsolateWitness => "isolate-witness",
            FaultKind::PauseAgent => "pause-agent",
        }
    }

    /// Whether this is a fault of the links or of an agent (in [`FaultKind::SPLIT`]).
    pub fn is_split(self) -> bool {
        FaultKind::SPLIT.contains(&self)
    }

    /// What this fault may cost without a witness, by the model (the simulator checks every
    /// loss it sees against this): a pause loses nothing (the paused agent's front is paused
    /// too, so no client reaches the old side), a cut witness changes nothing, and a cut
    /// between the appliances may lose what the discarded side acknowledged alone.
    pub fn loss_without_witness(self) -> WitnessLoss {
        match self {
            FaultKind::PartitionPeers
            | FaultKind::IsolatePrimary
            | FaultKind::IsolateSecondary
            | FaultKind::OneWayPrimary => WitnessLoss::AckedAloneByDiscardedSide,
            _ => WitnessLoss::Nothing,
        }
    }

    /// Parses a kind name.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }

    /// Whether `KIND@step` can happen: `start-fail` needs a step that starts an instance,
    /// `crash-new` one after the ISSU started an instance, `timeout` a step that waits on a
    /// command or the operator (not the soak steps).
    pub fn applies_to(self, step: Step) -> bool {
        match self {
            FaultKind::StartFail => matches!(
                step,
                Step::StartExtras
                    | Step::PrimaryStartNew
                    | Step::PrimaryUpgradeOld
                    | Step::SecondaryStartNew
                    | Step::SecondaryUpgradeOld
            ),
            FaultKind::CrashNew => step != Step::Precheck && step != Step::Rollback,
            FaultKind::Timeout => !matches!(
                step,
                Step::PrimaryMixed | Step::SecondaryMixed | Step::Rollback
            ),
            _ => step != Step::Rollback,
        }
    }
}

/// A fault `KIND@STEP`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FaultSpec {
    /// What.
    pub kind: FaultKind,
    /// When: the engine step.
    pub step: Step,
}

impl fmt::Display for FaultSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.kind.name(), self.step.name())
    }
}

/// Errors of the simulator's inputs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    /// The fault text is not `KIND@STEP`.
    #[error("fault {0:?} is not of the form KIND@STEP; list valid faults with `hitless sim issu --list-faults`")]
    Malformed(String),
    /// Unknown kind.
    #[error("unknown fault kind {kind:?} in {spec:?}; known kinds: {known}; list valid faults with `hitless sim issu --list-faults`")]
    UnknownKind {
        /// The text.
        spec: String,
        /// The kind part.
        kind: String,
        /// Known kinds.
        known: String,
    },
    /// Unknown step.
    #[error("unknown step {step:?} in {spec:?}; known steps: {known}; list valid faults with `hitless sim issu --list-faults`")]
    UnknownStep {
        /// The text.
        spec: String,
        /// The step part.
        step: String,
        /// Known steps.
        known: String,
    },
    /// Known kind and step that cannot go together.
    #[error("fault {0:?} cannot happen at that step; list valid faults with `hitless sim issu --list-faults`")]
    NotApplicable(String),
}

impl FaultSpec {
    /// Parses and validates `KIND@STEP`.
    pub fn parse(s: &str) -> Result<Self, SimError> {
        let s = s.trim();
        let (k, st) = s
            .split_once('@')
            .ok_or_else(|| SimError::Malformed(s.to_string()))?;
        let kind = FaultKind::from_name(k).ok_or_else(|| SimError::UnknownKind {
            spec: s.into(),
            kind: k.into(),
            known: FaultKind::ALL.map(|k| k.name()).join(", "),
        })?;
        let step = Step::from_name(st)
            .filter(|s| *s != Step::Rollback)
            .ok_or_else(|| SimError::UnknownStep {
                spec: s.into(),
                step: st.into(),
                known: Step::FORWARD.map(|s| s.name()).join(", "),
            })?;
        if !kind.applies_to(step) {
            return Err(SimError::NotApplicable(s.to_string()));
        }
        Ok(Self { kind, step })
    }
}

/// Every accepted `KIND@STEP`, kinds in [`FaultKind::ALL`] order, steps in procedure order.
pub fn fault_catalog() -> Vec<FaultSpec> {
    FaultKind::ALL
        .into_iter()
        .flat_map(|kind| {
            Step::FORWARD
                .into_iter()
                .filter(move |s| kind.applies_to(*s))
                .map(move |step| FaultSpec { kind, step })
        })
        .collect()
}

/// When a scheduled fault fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// First tick at this step with the target present.
    AtStep(Step),
    /// At this tick (or the first later tick with the target present).
    AtTick(u64),
}

/// A fault and its trigger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduledFault {
    /// What.
    pub kind: FaultKind,
    /// When.
    pub trigger: Trigger,
}

/// The faults of a run and whether each fired yet.
pub(super) struct Faults {
    scheduled: Vec<(ScheduledFault, bool)>,
}

impl Faults {
    pub(super) fn new(faults: &[ScheduledFault]) -> Self {
        Self {
            scheduled: faults.iter().map(|f| (*f, false)).collect(),
        }
    }

    /// Step-bound hangs and start failures apply to every command issued during the step,
    /// including those issued on entering it: arms them in the world before the run.
    pub(super) fn arm(&self, world: &mut World) {
        for (f, _) in &self.scheduled {
            if let Trigger::AtStep(s) = f.trigger {
                match f.kind {
                    FaultKind::Timeout if s != Step::AwaitCommit => world.hang_step = Some(s),
                    FaultKind::StartFail => world.start_fail_step = Some(s),
                    _ => {}
                }
            }
        }
    }

    /// Fires every fault due at `tick` whose target exists, and records it in the timeline.
    pub(super) fn fire_due(&mut self, sim: &mut Sim, tick: u64) {
        let step = sim.engine.step();
        for (f, fired) in self.scheduled.iter_mut() {
            if *fired {
                continue;
            }
            let armed = match f.trigger {
                Trigger::AtStep(s) => step == Some(s),
                Trigger::AtTick(t) => tick >= t,
            };
            if !armed {
                continue;
            }
            if let Some(note) = fire(sim, f.kind, f.trigger, step) {
                *fired = true;
                sim.record(format!("fault {}: {note}", f.kind.name()));
            }
        }
    }

    /// The operator never commits (`timeout@await-commit`).
    pub(super) fn operator_never_commits(&self) -> bool {
        self.scheduled.iter().any(|(f, _)| {
            f.kind == FaultKind::Timeout && f.trigger == Trigger::AtStep(Step::AwaitCommit)
        })
    }

    /// Every fault fired.
    pub(super) fn all_fired(&self) -> bool {
        self.scheduled.iter().all(|(_, fired)| *fired)
    }
}

pub(super) fn starts_instance(step: Step) -> bool {
    FaultKind::StartFail.applies_to(step)
}

/// Fires a fault if its target exists; returns a note when it fired.
pub(super) fn fire(
    sim: &mut Sim,
    kind: FaultKind,
    trigger: Trigger,
    step: Option<Step>,
) -> Option<String> {
    let w = &mut sim.world;
    match kind {
        FaultKind::CrashNew => {
            let created_in = match (trigger, step) {
                (Trigger::AtStep(s), Some(cur)) if s == cur && starts_instance(s) => Some(s),
                _ => None,
            };
            let id = w.newest_issu_instance(created_in)?;
            w.crash(id);
            Some(format!("{id} crashed"))
        }
        FaultKind::StartFail => {
            if matches!(trigger, Trigger::AtTick(_)) && w.start_fail_step != step {
                w.start_fail_step = step;
                w.start_failed = false;
            }
            w.start_failed
                .then(|| "a start in this step failed".to_string())
        }
        FaultKind::CrashActive => {
            let c = w.control.filter(|c| w.inst_up(*c))?;
            w.crash(c);
            Some(format!("{c} (in control) crashed"))
        }
        FaultKind::CrashStandby => {
            let h = w.ha_standby()?;
            w.crash(h);
            Some(format!("HA standby {h} crashed"))
        }
        FaultKind::StandbyOutOfSync => {
            let h = w.ha_standby()?;
            if let Some(f) = w.insts.get_mut(&h).and_then(|i| i.feed.as_mut()) {
                f.synced = false;
            }
            w.deliver(1, Event::StandbyOutOfSync { instance: h });
            Some(format!("HA standby {h} fell out of sync"))
        }
        FaultKind::HeartbeatLost => {
            let c = w.control.filter(|c| w.inst_up(*c))?;
            w.deliver(1, Event::HeartbeatLost { instance: c });
            Some(format!("heartbeats from {c} lost (it keeps running)"))
        }
        FaultKind::ApplianceLostPrimary | FaultKind::ApplianceLostSecondary => {
            let a = if kind == FaultKind::ApplianceLostPrimary {
                ApplianceId::Primary
            } else {
                ApplianceId::Secondary
            };
            if !w.is_up(a) {
                return None;
            }
            w.up[ai(a)] = false;
            for i in w.insts.values_mut() {
                if i.appliance == a && i.status != WStatus::Stopped {
                    i.status = WStatus::Dead;
                }
            }
            w.deliver(1, Event::ApplianceLost { appliance: a });
            w.schedule(DOWN_TICKS, Action::Recover(a));
            Some(format!("{a} appliance lost"))
        }
        FaultKind::Timeout => {
            if step == Some(Step::AwaitCommit) {
                return Some("the operator does not commit".into());
            }
            if matches!(trigger, Trigger::AtTick(_)) {
                w.hang_step = step;
            }
            Some("commands issued in this step hang".into())
        }
        FaultKind::Abort => {
            sim.feed(Event::Abort);
            Some("operator abort".into())
        }
        FaultKind::Rollback => {
            sim.feed(Event::Rollback);
            Some("operator rollback".into())
        }
        FaultKind::PartitionPeers
        | FaultKind::IsolatePrimary
        | FaultKind::IsolateSecondary
        | FaultKind::OneWayPrimary
        | FaultKind::IsolateWitness
        | FaultKind::PauseAgent => super::split::begin(sim, kind),
    }
}
