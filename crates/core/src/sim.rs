//! Deterministic simulator of an appliance pair driven by the engine.
//!
//! The simulated world holds instances with an applied sequence number, a client writing one
//! mutation per tick to the instance in control, synchronous replication to `designated_ha`
//! standbys (a write is acknowledged once they applied it), asynchronous replication to the
//! others, bulk-sync delays, start/stop/switch delays, and appliance loss with recovery. The
//! engine's commands are executed against it and its observations are fed back as events.
//!
//! Faults are injected as `KIND@STEP` ([`FaultSpec`]): the fault fires on the first tick at
//! which the engine is at `STEP` and the fault's target exists. [`fault_catalog`] lists every
//! accepted combination.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::domain::{ApplianceId, ControlEpoch, ImageRef, InstanceId, Pair, Version};
use crate::engine::{
    Command, CompatVerdict, Engine, EngineConfig, EngineState, Event, Outcome, Step,
};
use crate::invariants::{check_promotion, Checker};

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
}

impl FaultKind {
    /// Every kind.
    pub const ALL: [FaultKind; 11] = [
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

/// Simulation options (for tests and property checks).
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Faults to inject.
    pub faults: Vec<ScheduledFault>,
    /// Seed of the delay jitter; 0 means no jitter.
    pub seed: u64,
    /// At this tick, snapshot the engine, pass it through `restore_via` and continue with
    /// the restored engine (re-executing its in-flight commands).
    pub restore_at: Option<u64>,
    /// Transformation of the snapshot (for example a serialization round trip).
    pub restore_via: Option<fn(&EngineState) -> EngineState>,
    /// Upper bound on simulated ticks.
    pub max_ticks: u64,
    /// Engine configuration.
    pub config: EngineConfig,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            faults: Vec::new(),
            seed: 0,
            restore_at: None,
            restore_via: None,
            max_ticks: 3000,
            config: EngineConfig {
                rollback_timer: Some(150),
                ..EngineConfig::default()
            },
        }
    }
}

/// Where control ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalControl {
    /// `primary` / `secondary` (empty if nobody is in control).
    pub appliance: String,
    /// Version in control.
    pub version: String,
}

/// One row of the timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineEntry {
    /// Logical tick.
    pub tick: u64,
    /// Engine step (or `idle`).
    pub step: String,
    /// Instance in control, `i3@primary`.
    pub in_control: String,
    /// Version in control.
    pub control_version: String,
    /// Control epoch.
    pub epoch: u64,
    /// Live instances on the primary appliance, `id:version:role`.
    pub primary: Vec<String>,
    /// Live instances on the secondary appliance.
    pub secondary: Vec<String>,
    /// What happened.
    pub note: String,
}

/// Result of a simulated ISSU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimReport {
    /// The injected fault, `KIND@STEP`.
    pub fault: Option<String>,
    /// Whether the fault actually fired.
    pub fault_fired: bool,
    /// `committed`, `rolled_back` or `incomplete`.
    pub result: String,
    /// Why it rolled back, or why it is incomplete.
    pub reason: Option<String>,
    /// Where control ended.
    pub final_control: FinalControl,
    /// Final epoch.
    pub epoch: u64,
    /// Number of invariant violations.
    pub invariant_violations: usize,
    /// The violations.
    pub violations: Vec<String>,
    /// Timeline.
    pub steps: Vec<TimelineEntry>,
    /// Acknowledged writes lost.
    pub acked_lost: u64,
    /// Acknowledged writes in total.
    pub acked: u64,
    /// Final layout is one instance per appliance: control plus an in-sync HA standby on the
    /// other appliance, same version.
    pub final_layout_ok: bool,
    /// Ticks simulated.
    pub ticks: u64,
}

/// Runs one ISSU from N (1.0.0) to N+1 (1.1.0) with an optional fault.
pub fn run(fault: Option<&FaultSpec>) -> SimReport {
    let opts = SimOptions {
        faults: fault
            .map(|f| ScheduledFault {
                kind: f.kind,
                trigger: Trigger::AtStep(f.step),
            })
            .into_iter()
            .collect(),
        ..SimOptions::default()
    };
    let mut r = run_with(&opts);
    r.fault = fault.map(|f| f.to_string());
    r
}

/// Source version of the simulated ISSU.
pub const SOURCE: Version = Version::new(1, 0, 0);
/// Target version of the simulated ISSU.
pub const TARGET: Version = Version::new(1, 1, 0);

const START_DELAY: u64 = 3;
const STOP_DELAY: u64 = 1;
const BULK_DELAY: u64 = 4;
const SWITCH_DELAY: u64 = 2;
const DOWN_TICKS: u64 = 15;
const ASYNC_RATE: u64 = 2;
/// Ticks an instance in control keeps acknowledgements back after its synchronous HA standby
/// drops out, before it acknowledges alone (degraded): longer than the control plane takes to
/// detect a lost instance and fail over, so a failover decided in that window (possibly
/// before the engine learned the standby dropped) never promotes a standby that misses an
/// acknowledged write. The replication library's `ha_grace` is the real counterpart.
pub const HA_GRACE: u64 = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WStatus {
    Starting,
    Up,
    Dead,
    Stopped,
}

#[derive(Debug, Clone)]
struct Feed {
    active: InstanceId,
    designated: bool,
    synced: bool,
}

#[derive(Debug, Clone)]
struct WInst {
    appliance: ApplianceId,
    status: WStatus,
    applied: u64,
    feed: Option<Feed>,
    fenced_below: u64,
    created_step: Option<Step>,
}

#[derive(Debug, Clone)]
enum Action {
    Deliver(Event),
    Up(InstanceId),
    BulkDone(InstanceId),
    Switch {
        from: InstanceId,
        to: InstanceId,
        epoch: ControlEpoch,
    },
    Failover {
        to: InstanceId,
        epoch: ControlEpoch,
    },
    Stop(InstanceId),
    Recover(ApplianceId),
}

struct World {
    now: u64,
    insts: BTreeMap<InstanceId, WInst>,
    up: [bool; 2],
    control: Option<InstanceId>,
    epoch: u64,
    acked: u64,
    acked_lost: u64,
    /// The in-sync HA standbys of the instance in control at the last look.
    ha_set: Vec<InstanceId>,
    /// HA standbys that dropped out, and when: acknowledgements wait for them for
    /// [`HA_GRACE`] (they might be promoted by a failover decided meanwhile).
    ha_dropped: BTreeMap<InstanceId, u64>,
    queue: Vec<(u64, u64, Action)>,
    seq: u64,
    rng: u64,
    hang_step: Option<Step>,
    start_fail_step: Option<Step>,
    start_failed: bool,
    violations: Vec<String>,
    initial_max_id: InstanceId,
}

fn ai(a: ApplianceId) -> usize {
    match a {
        ApplianceId::Primary => 0,
        ApplianceId::Secondary => 1,
    }
}

impl World {
    fn jitter(&mut self) -> u64 {
        if self.rng == 0 {
            return 0;
        }
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) % 3
    }

    fn schedule(&mut self, delay: u64, a: Action) {
        let j = if delay > 0 { self.jitter() } else { 0 };
        self.seq += 1;
        self.queue.push((self.now + delay + j, self.seq, a));
    }

    fn deliver(&mut self, delay: u64, e: Event) {
        self.schedule(delay, Action::Deliver(e));
    }

    fn is_up(&self, a: ApplianceId) -> bool {
        self.up[ai(a)]
    }

    fn inst_up(&self, id: InstanceId) -> bool {
        self.insts
            .get(&id)
            .is_some_and(|i| i.status == WStatus::Up && self.is_up(i.appliance))
    }

    /// The synchronous standby currently fed by the instance in control.
    fn ha_standby(&self) -> Option<InstanceId> {
        self.ha_standbys().first().copied()
    }

    /// Every synchronous standby currently fed by the instance in control.
    fn ha_standbys(&self) -> Vec<InstanceId> {
        let Some(c) = self.control else {
            return Vec::new();
        };
        self.insts
            .iter()
            .filter(|(_, i)| {
                i.status == WStatus::Up
                    && i.feed
                        .as_ref()
                        .is_some_and(|f| f.active == c && f.designated && f.synced)
            })
            .map(|(id, _)| *id)
            .collect()
    }

    /// Notes that the instance in control has an in-sync HA standby (from then on, it
    /// acknowledges alone only after [`HA_GRACE`]).
    fn note_ha(&mut self) {
        let now_set = self.ha_standbys();
        for id in &self.ha_set {
            if !now_set.contains(id) {
                self.ha_dropped.insert(*id, self.now);
            }
        }
        for id in &now_set {
            // Back in sync: it holds every write again.
            self.ha_dropped.remove(id);
        }
        let now = self.now;
        self.ha_dropped.retain(|_, t| now < *t + HA_GRACE);
        self.ha_set = now_set;
    }

    /// One client write per tick; replication.
    fn advance(&mut self) {
        let Some(c) = self.control else { return };
        let writable = self.inst_up(c) && self.insts[&c].fenced_below <= self.epoch;
        let head = self.insts[&c].applied + u64::from(writable);
        if writable {
            self.insts.get_mut(&c).expect("control exists").applied = head;
        }
        let up = self.up;
        for (id, i) in self.insts.iter_mut() {
            if *id == c || i.status != WStatus::Up || !up[ai(i.appliance)] {
                continue;
            }
            if let Some(f) = &i.feed {
                if f.active == c && f.synced {
                    i.applied = if f.designated {
                        head
                    } else {
                        (i.applied + ASYNC_RATE).min(head)
                    };
                }
            }
        }
        if !writable {
            return;
        }
        // Synchronous standbys applied it: acknowledged. Without one, the write is held for
        // the grace (it stays applied locally, and is acknowledged when the grace ends),
        // unless this instance never had an HA standby in control (after a failover).
        self.note_ha();
        if !self.ha_dropped.is_empty() {
            return;
        }
        self.acked = self.acked.max(head);
    }

    fn execute(&mut self, cmd: &Command, step: Option<Step>) {
        self.execute_inner(cmd, step);
        self.note_ha();
    }

    fn execute_inner(&mut self, cmd: &Command, step: Option<Step>) {
        if matches!(cmd, Command::Report { .. }) {
            return;
        }
        if step.is_some() && step == self.hang_step {
            return; // The agent hangs on everything issued during this step.
        }
        match cmd {
            Command::StartInstance {
                instance,
                appliance,
                ..
            } => {
                if let Some(i) = self.insts.get(instance) {
                    match i.status {
                        WStatus::Up => self.deliver(
                            1,
                            Event::InstanceStarted {
                                instance: *instance,
                            },
                        ),
                        WStatus::Starting => {}
                        WStatus::Dead | WStatus::Stopped => self.deliver(
                            1,
                            Event::InstanceFailed {
                                instance: *instance,
                                reason: "instance is gone".into(),
                            },
                        ),
                    }
                    return;
                }
                let fail = !self.is_up(*appliance)
                    || (step.is_some() && step == self.start_fail_step && !self.start_failed);
                if fail && self.is_up(*appliance) {
                    self.start_failed = true;
                }
                self.insts.insert(
                    *instance,
                    WInst {
                        appliance: *appliance,
                        status: if fail {
                            WStatus::Dead
                        } else {
                            WStatus::Starting
                        },
                        applied: 0,
                        feed: None,
                        fenced_below: 0,
                        created_step: step,
                    },
                );
                if fail {
                    self.deliver(
                        START_DELAY,
                        Event::InstanceFailed {
                            instance: *instance,
                            reason: "failed to boot".into(),
                        },
                    );
                } else {
                    self.schedule(START_DELAY, Action::Up(*instance));
                }
            }
            Command::StopInstance { instance } => {
                self.schedule(STOP_DELAY, Action::Stop(*instance))
            }
            Command::AttachStandby {
                standby,
                active,
                designated_ha,
            } => {
                let Some(i) = self.insts.get(standby) else {
                    return;
                };
                if i.status == WStatus::Dead {
                    self.deliver(
                        1,
                        Event::InstanceFailed {
                            instance: *standby,
                            reason: "dead".into(),
                        },
                    );
                    return;
                }
                if i.status != WStatus::Up {
                    return;
                }
                if self.control != Some(*active) || !self.inst_up(*active) {
                    self.deliver(1, Event::StandbyOutOfSync { instance: *standby });
                    return;
                }
                let already = i
                    .feed
                    .as_ref()
                    .is_some_and(|f| f.active == *active && f.synced);
                let head = self.insts[active].applied;
                let i = self.insts.get_mut(standby).expect("exists");
                if already {
                    let f = i.feed.as_mut().expect("fed");
                    if *designated_ha && !f.designated {
                        // Becoming synchronous: catch up first.
                        i.applied = head;
                    }
                    let i = self.insts.get_mut(standby).expect("exists");
                    let f = i.feed.as_mut().expect("fed");
                    f.designated = *designated_ha;
                    let seq = i.applied;
                    self.deliver(
                        1,
                        Event::SyncReady {
                            instance: *standby,
                            seq,
                            digest_ok: true,
                        },
                    );
                } else {
                    i.feed = Some(Feed {
                        active: *active,
                        designated: *designated_ha,
                        synced: false,
                    });
                    self.schedule(BULK_DELAY, Action::BulkDone(*standby));
                }
            }
            Command::VerifyStandby { standby, active } => {
                let ok = self.insts.get(standby).is_some_and(|i| {
                    i.status == WStatus::Up
                        && i.feed
                            .as_ref()
                            .is_some_and(|f| f.active == *active && f.synced)
                });
                if ok {
                    let seq = self.insts[standby].applied;
                    self.deliver(
                        1,
                        Event::SyncReady {
                            instance: *standby,
                            seq,
                            digest_ok: true,
                        },
                    );
                } else {
                    self.deliver(1, Event::StandbyOutOfSync { instance: *standby });
                }
            }
            Command::SwitchControl { from, to, epoch } => self.schedule(
                SWITCH_DELAY,
                Action::Switch {
                    from: *from,
                    to: *to,
                    epoch: *epoch,
                },
            ),
            Command::Failover { to, epoch } => self.schedule(
                1,
                Action::Failover {
                    to: *to,
                    epoch: *epoch,
                },
            ),
            Command::Fence { instance, epoch } => {
                if let Some(i) = self.insts.get_mut(instance) {
                    i.fenced_below = i.fenced_below.max(epoch.0);
                }
            }
            Command::Report { .. } => {}
        }
    }

    /// Runs one due action; returns events to deliver now.
    fn run_action(&mut self, a: Action, out: &mut Vec<Event>) {
        match a {
            Action::Deliver(e) => out.push(e),
            Action::Up(id) => {
                let app_up = self.insts.get(&id).is_some_and(|i| self.is_up(i.appliance));
                if let Some(i) = self.insts.get_mut(&id) {
                    if i.status == WStatus::Starting && app_up {
                        i.status = WStatus::Up;
                        out.push(Event::InstanceStarted { instance: id });
                    }
                }
            }
            Action::BulkDone(id) => {
                let Some(c) = self.control.filter(|c| self.inst_up(*c)) else {
                    if self.inst_up(id) {
                        out.push(Event::StandbyOutOfSync { instance: id });
                    }
                    return;
                };
                let head = self.insts[&c].applied;
                if !self.inst_up(id) {
                    return;
                }
                let i = self.insts.get_mut(&id).expect("exists");
                let Some(f) = i.feed.as_mut() else { return };
                if f.active != c {
                    out.push(Event::StandbyOutOfSync { instance: id });
                    return;
                }
                if f.synced {
                    return;
                }
                f.synced = true;
                i.applied = if f.designated {
                    head
                } else {
                    head.saturating_sub(1)
                };
                let seq = i.applied;
                out.push(Event::SyncProgress {
                    instance: id,
                    applied_seq: seq,
                    lag: head - seq,
                });
                out.push(Event::SyncReady {
                    instance: id,
                    seq,
                    digest_ok: true,
                });
            }
            Action::Switch { from, to, epoch } => {
                let ok = self.control == Some(from)
                    && self.inst_up(from)
                    && self.inst_up(to)
                    && self.insts[&from].fenced_below <= self.epoch
                    && epoch.0 > self.epoch
                    && self.insts[&to]
                        .feed
                        .as_ref()
                        .is_some_and(|f| f.active == from && f.synced);
                if !ok {
                    out.push(Event::SwitchFailed {
                        to,
                        epoch,
                        reason: "preconditions of the switchover do not hold".into(),
                    });
                    return;
                }
                // Quiesce + drain + promote.
                let head = self.insts[&from].applied;
                self.insts.get_mut(&to).expect("exists").applied = head;
                if let Some(v) = check_promotion(to, head, self.acked) {
                    self.violations.push(v.to_string());
                    self.acked_lost += self.acked - head;
                }
                for i in self.insts.values_mut() {
                    if let Some(f) = i.feed.as_mut() {
                        if f.active == from {
                            f.active = to;
                        }
                    }
                }
                let to_designated = self.insts[&to].feed.as_ref().is_some_and(|f| f.designated);
                let _ = to_designated;
                self.insts.get_mut(&to).expect("exists").feed = None;
                self.insts.get_mut(&from).expect("exists").feed = Some(Feed {
                    active: to,
                    designated: false,
                    synced: true,
                });
                self.control = Some(to);
                self.epoch = epoch.0;
                self.ha_set.clear();
                self.ha_dropped.clear();
                out.push(Event::ControlSwitched { to, epoch });
            }
            Action::Failover { to, epoch } => {
                let ok = self.inst_up(to)
                    && epoch.0 > self.epoch
                    && self.insts[&to].fenced_below <= epoch.0;
                if !ok {
                    out.push(Event::SwitchFailed {
                        to,
                        epoch,
                        reason: "failover target unavailable or epoch stale".into(),
                    });
                    return;
                }
                let applied = self.insts[&to].applied;
                if let Some(v) = check_promotion(to, applied, self.acked) {
                    self.violations.push(v.to_string());
                    self.acked_lost += self.acked - applied;
                    self.acked = applied;
                }
                for i in self.insts.values_mut() {
                    if let Some(f) = i.feed.as_mut() {
                        f.synced = false;
                    }
                }
                self.insts.get_mut(&to).expect("exists").feed = None;
                self.control = Some(to);
                self.epoch = epoch.0;
                self.ha_set.clear();
                self.ha_dropped.clear();
                out.push(Event::ControlSwitched { to, epoch });
            }
            Action::Stop(id) => {
                let Some(i) = self.insts.get(&id) else {
                    out.push(Event::InstanceStopped { instance: id });
                    return;
                };
                if !self.is_up(i.appliance) {
                    return;
                }
                if self.control == Some(id) && i.status == WStatus::Up {
                    self.violations.push(format!(
                        "LastCopyPreserved: stopped {id} while it served clients"
                    ));
                }
                self.insts.get_mut(&id).expect("exists").status = WStatus::Stopped;
                out.push(Event::InstanceStopped { instance: id });
            }
            Action::Recover(a) => {
                self.up[ai(a)] = true;
                out.push(Event::ApplianceRecovered { appliance: a });
            }
        }
    }

    fn crash(&mut self, id: InstanceId) {
        if let Some(i) = self.insts.get_mut(&id) {
            i.status = WStatus::Dead;
        }
        self.deliver(
            1,
            Event::InstanceFailed {
                instance: id,
                reason: "crashed".into(),
            },
        );
    }

    fn newest_issu_instance(&self, created_in: Option<Step>) -> Option<InstanceId> {
        self.insts
            .iter()
            .rev()
            .find(|(id, i)| {
                **id > self.initial_max_id
                    && matches!(i.status, WStatus::Starting | WStatus::Up)
                    && self.is_up(i.appliance)
                    && (created_in.is_none() || i.created_step == created_in)
            })
            .map(|(id, _)| *id)
    }
}

fn starts_instance(step: Step) -> bool {
    FaultKind::StartFail.applies_to(step)
}

struct Sim {
    engine: Engine,
    world: World,
    checker: Checker,
    violations: Vec<String>,
    timeline: Vec<TimelineEntry>,
    last_mark: (String, Option<InstanceId>, u64),
}

impl Sim {
    fn feed(&mut self, e: Event) {
        let cmds = self.engine.handle(e);
        self.after(&cmds);
    }

    fn after(&mut self, cmds: &[Command]) {
        for v in self.checker.observe(self.engine.state(), cmds) {
            self.violations.push(v.to_string());
        }
        let step = self.engine.step();
        for c in cmds {
            self.world.execute(c, step);
        }
        for c in cmds {
            if let Command::Report { progress } = c {
                let note = match progress {
                    crate::engine::Report::Step { step, detail } => format!("{step}: {detail}"),
                    crate::engine::Report::Stuck(s) => {
                        format!("stuck: {} (resume with {})", s.reason, s.resume_with)
                    }
                    crate::engine::Report::Finished(Outcome::Committed { version }) => {
                        format!("finished: committed {version}")
                    }
                    crate::engine::Report::Finished(Outcome::RolledBack { version, reason }) => {
                        format!("finished: rolled back to {version} ({reason})")
                    }
                    crate::engine::Report::ControlMoved { to, epoch, version } => {
                        format!("control -> {to} ({version}) at {epoch}")
                    }
                    crate::engine::Report::Rejected { request, reason } => {
                        format!("rejected {request}: {reason}")
                    }
                    crate::engine::Report::Accepted { .. } => continue,
                };
                self.record(note);
            }
        }
    }

    fn record(&mut self, note: String) {
        let st = self.engine.state();
        let step = self
            .engine
            .step()
            .map(|s| s.name().to_string())
            .unwrap_or_else(|| "idle".into());
        let mark = (step.clone(), st.pair.in_control, st.pair.epoch.0);
        let _ = &self.last_mark;
        self.last_mark = mark;
        let (in_control, control_version) = match st.pair.control() {
            Some(c) => (format!("{}@{}", c.id, c.appliance), c.version().to_string()),
            None => ("-".into(), "-".into()),
        };
        let list = |a: ApplianceId| -> Vec<String> {
            st.pair
                .live_on(a)
                .map(|i| format!("{}:{}:{}", i.id, i.version(), role_name(i)))
                .collect()
        };
        self.timeline.push(TimelineEntry {
            tick: st.now,
            step,
            in_control,
            control_version,
            epoch: st.pair.epoch.0,
            primary: list(ApplianceId::Primary),
            secondary: list(ApplianceId::Secondary),
            note,
        });
    }
}

fn role_name(i: &crate::domain::Instance) -> &'static str {
    use crate::domain::{InstanceState as S, Role as R};
    match (i.state, i.role) {
        (S::Starting, _) => "starting",
        (S::Stopping, _) => "stopping",
        (_, R::InControl) => "control",
        (S::Syncing, _) => "syncing",
        (_, R::HaStandby) => "ha",
        (_, R::LocalStandby) => "local",
        (_, R::Spare) => "spare",
    }
}

/// Runs one simulated ISSU with the given options.
pub fn run_with(opts: &SimOptions) -> SimReport {
    let source = ImageRef::new("appliance-os", SOURCE);
    let target = ImageRef::new("appliance-os", TARGET);
    let pair = Pair::steady(
        source.clone(),
        InstanceId(1),
        InstanceId(2),
        ControlEpoch(1),
    );
    let engine = Engine::new(opts.config.clone(), pair).expect("the steady pair is consistent");
    let mut insts = BTreeMap::new();
    insts.insert(
        InstanceId(1),
        WInst {
            appliance: ApplianceId::Primary,
            status: WStatus::Up,
            applied: 0,
            feed: None,
            fenced_below: 0,
            created_step: None,
        },
    );
    insts.insert(
        InstanceId(2),
        WInst {
            appliance: ApplianceId::Secondary,
            status: WStatus::Up,
            applied: 0,
            feed: Some(Feed {
                active: InstanceId(1),
                designated: true,
                synced: true,
            }),
            fenced_below: 0,
            created_step: None,
        },
    );
    let world = World {
        now: 0,
        insts,
        up: [true, true],
        control: Some(InstanceId(1)),
        epoch: 1,
        acked: 0,
        acked_lost: 0,
        ha_set: Vec::new(),
        ha_dropped: BTreeMap::new(),
        queue: Vec::new(),
        seq: 0,
        rng: opts.seed,
        hang_step: None,
        start_fail_step: None,
        start_failed: false,
        violations: Vec::new(),
        initial_max_id: InstanceId(2),
    };
    let checker = Checker::new(engine.state());
    let mut sim = Sim {
        engine,
        world,
        checker,
        violations: Vec::new(),
        timeline: Vec::new(),
        last_mark: (String::new(), None, 0),
    };
    sim.record("steady: N in control on the primary, HA standby on the secondary".into());

    let mut pending: Vec<(ScheduledFault, bool)> =
        opts.faults.iter().map(|f| (*f, false)).collect();
    // Step-bound hangs and start failures apply to every command issued during the step,
    // including those issued on entering it: arm them before the run.
    for f in &opts.faults {
        if let Trigger::AtStep(s) = f.trigger {
            match f.kind {
                FaultKind::Timeout if s != Step::AwaitCommit => sim.world.hang_step = Some(s),
                FaultKind::StartFail => sim.world.start_fail_step = Some(s),
                _ => {}
            }
        }
    }
    let mut started = false;
    let mut await_commit_since: Option<u64> = None;
    let mut fired_any = false;
    let mut restored = false;

    for tick in 1..=opts.max_ticks {
        sim.world.now = tick;
        // Operator.
        if tick == 2 {
            sim.feed(Event::Compatibility {
                verdict: CompatVerdict {
                    from: SOURCE,
                    to: TARGET,
                    upgrade_ok: true,
                    downgrade_ok: true,
                    detail: "schemas convert both ways".into(),
                },
            });
            sim.feed(Event::Start {
                target: target.clone(),
            });
            started = true;
        }
        if let Some(at) = opts.restore_at.filter(|t| *t == tick && !restored) {
            let _ = at;
            restored = true;
            let snap = sim.engine.snapshot();
            let snap = match opts.restore_via {
                Some(f) => f(&snap),
                None => snap,
            };
            match Engine::restore(snap) {
                Ok(e) => {
                    sim.engine = e;
                    let cmds = sim.engine.in_flight_commands();
                    sim.after(&cmds);
                    sim.record("engine restored from its snapshot".into());
                }
                Err(e) => sim.violations.push(format!("restore failed: {e}")),
            }
        }
        // Faults.
        let step = sim.engine.step();
        for (f, fired) in pending.iter_mut() {
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
            let hit = fire(&mut sim, f.kind, f.trigger, step);
            if let Some(note) = hit {
                *fired = true;
                fired_any = true;
                sim.record(format!("fault {}: {note}", f.kind.name()));
            }
        }
        // World and events.
        sim.world.advance();
        let mut guard = 0;
        loop {
            guard += 1;
            if guard > 10_000 {
                sim.violations.push("event loop did not settle".into());
                break;
            }
            let now = sim.world.now;
            let Some(idx) = sim
                .world
                .queue
                .iter()
                .enumerate()
                .filter(|(_, (due, _, _))| *due <= now)
                .min_by_key(|(_, (due, seq, _))| (*due, *seq))
                .map(|(i, _)| i)
            else {
                break;
            };
            let (_, _, action) = sim.world.queue.swap_remove(idx);
            let mut events = Vec::new();
            sim.world.run_action(action, &mut events);
            sim.world.note_ha();
            for e in events {
                sim.feed(e);
            }
        }
        sim.feed(Event::Tick);

        // Operator commits at await-commit unless the fault is the operator never committing.
        let no_commit = pending.iter().any(|(f, _)| {
            f.kind == FaultKind::Timeout && f.trigger == Trigger::AtStep(Step::AwaitCommit)
        });
        if sim.engine.step() == Some(Step::AwaitCommit) {
            let since = *await_commit_since.get_or_insert(tick);
            if !no_commit && tick >= since + 2 {
                sim.feed(Event::Commit);
            }
        } else {
            await_commit_since = None;
        }
        if started && sim.engine.step().is_none() && sim.world.queue.is_empty() {
            break;
        }
        if sim.engine.state().stuck.is_some() && sim.world.queue.is_empty() {
            break;
        }
    }
    let _ = fired_any;

    // Report.
    let st = sim.engine.state().clone();
    let (result, reason) = match (&st.issu, &st.last_outcome, &st.stuck) {
        (_, _, Some(s)) => (
            "incomplete",
            Some(format!("{} (resume with {})", s.reason, s.resume_with)),
        ),
        (None, Some(Outcome::Committed { .. }), _) if started => ("committed", None),
        (None, Some(Outcome::RolledBack { reason, .. }), _) if started => {
            ("rolled_back", Some(reason.clone()))
        }
        _ => (
            "incomplete",
            Some("did not finish within the tick bound".to_string()),
        ),
    };
    let control = st.pair.control().cloned();
    if st.pair.in_control != sim.world.control {
        sim.violations.push(format!(
            "engine believes {:?} is in control, the world says {:?}",
            st.pair.in_control, sim.world.control
        ));
    }
    let mut acked_lost = sim.world.acked_lost;
    if let Some(c) = sim.world.control {
        let applied = sim.world.insts[&c].applied;
        if applied < sim.world.acked {
            acked_lost += sim.world.acked - applied;
        }
    }
    let final_layout_ok = match &control {
        Some(c) => {
            let world_live: Vec<(&InstanceId, &WInst)> = sim
                .world
                .insts
                .iter()
                .filter(|(_, i)| i.status == WStatus::Up && sim.world.up[ai(i.appliance)])
                .collect();
            let ha = sim.world.ha_standby();
            let engine_live: Vec<_> = st
                .pair
                .instances
                .iter()
                .filter(|i| i.state.is_live())
                .collect();
            world_live.len() == 2
                && engine_live.len() == 2
                && engine_live.iter().all(|i| i.version() == c.version())
                && ha.is_some_and(|h| sim.world.insts[&h].appliance != c.appliance)
        }
        None => false,
    };
    let mut violations = sim.violations;
    violations.extend(sim.world.violations);
    SimReport {
        fault: None,
        fault_fired: pending.iter().all(|(_, f)| *f),
        result: result.to_string(),
        reason,
        final_control: FinalControl {
            appliance: control
                .as_ref()
                .map(|c| c.appliance.name().to_string())
                .unwrap_or_default(),
            version: control
                .as_ref()
                .map(|c| c.version().to_string())
                .unwrap_or_default(),
        },
        epoch: st.pair.epoch.0,
        invariant_violations: violations.len(),
        violations,
        steps: sim.timeline,
        acked_lost,
        acked: sim.world.acked,
        final_layout_ok,
        ticks: st.now,
    }
}

/// Fires a fault if its target exists; returns a note when it fired.
fn fire(sim: &mut Sim, kind: FaultKind, trigger: Trigger, step: Option<Step>) -> Option<String> {
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
    }
}
