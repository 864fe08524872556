//! The sans-IO ISSU engine and steady-state HA policy.
//!
//! The engine is a pure state machine: [`Engine::handle`] takes one [`Event`] and returns the
//! [`Command`]s to execute. Time is logical ([`Event::Tick`]); there is no I/O, no wall clock
//! and no randomness, so a run is reproducible from its event sequence, and the whole state
//! ([`EngineState`]) can be journalled and restored with [`Engine::restore`].
//!
//! # Engine steps and the procedure
//!
//! "A" is the appliance in control when the ISSU starts (normally the primary appliance) and is
//! what the `primary-*` step names refer to; "B" is its peer. N is the running version, N+1
//! the target.
//!
//! | Procedure step | Engine step(s) | What happens |
//! |---|---|---|
//! | 1. Pre-checks | `precheck` (plus the checks done when [`Event::Start`] arrives) | both appliances up, instance in control on A, `Ready` HA standby on B, compatibility verdict for N→N+1 and N+1→N present and positive; the HA standby's digest is re-verified ([`Command::VerifyStandby`]) |
//! | 2. Extra N instances | `start-extras`, `sync-extras` | an extra N instance on A and on B, attached as local standbys |
//! | 3. Upgrade A | `primary-start-new`, `primary-sync-new`, `primary-switch`, `primary-mixed`, `primary-upgrade-old`, `primary-sync-old` | A's extra N is replaced by N+1, synced to sufficient state, control switches to it (new epoch), soak with the old N as fallback, then the old N is replaced by N+1 and synced as local standby. B's N instance stays the in-sync HA standby throughout |
//! | 4. Failure in A's mixed window | HA policy + `rollback` | the instance in control fails → [`Command::Failover`] to B's N HA standby, B's second instance is attached as its standby, and the ISSU rolls back |
//! | 5. Upgrade B | `secondary-start-new`, `secondary-sync-new`, `secondary-switch`, `secondary-mixed`, `secondary-upgrade-old`, `secondary-sync-old` | same on B: N+1 replaces B's extra, syncs, becomes the synchronous HA standby, soak, old N replaced by N+1 |
//! | 6. Retire and commit | `retire`, `await-commit` | the two extra instances are stopped; the operator commits (or the rollback timer reverts) |
//!
//! `rollback` is a convergent reconciler: from any state it brings the pair back to an
//! instance of N in control with an in-sync N HA standby on the other appliance and nothing
//! else running. With no ISSU running the same reconciler (for the version in control) is the
//! steady-state HA repair policy.
//!
//! # Failure policy
//!
//! * Before commit, any instance failure, appliance loss, step timeout (after one idempotent
//!   retry), operator `abort` (allowed until the primary switch is issued), operator
//!   `rollback`, or the rollback timer expiring moves the ISSU to `rollback`.
//! * The instance in control failing (crash, heartbeat lost, appliance lost) is always handled
//!   first by failover to a `Ready` synchronous ([`Role::HaStandby`]) standby, preferring the
//!   other appliance; the failed instance is fenced with the new epoch.
//! * A standby falling out of sync is re-attached (bounded by `max_resyncs`); forward progress
//!   waits while the HA standby is not in sync, bounded by the step timer.
//! * When the engine cannot continue alone it reports [`Report::Stuck`] with the exact state
//!   and the operator command that resumes.
//!
//! The point of no return is `commit`: until then `rollback` reverts to N; afterwards going back
//! is a new ISSU.

use serde::{Deserialize, Serialize};

use crate::domain::{
    ApplianceId, ControlEpoch, ImageRef, Instance, InstanceId, InstanceState, Pair, Role, Version,
};

/// Per-step bounds (in ticks) and policy knobs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineConfig {
    /// Bound for `StartInstance` to be confirmed.
    pub start_timeout: u64,
    /// Bound for an attached standby to reach sufficient state.
    pub sync_timeout: u64,
    /// Bound for a `SwitchControl` / `Failover` to be confirmed.
    pub switch_timeout: u64,
    /// Bound for `StopInstance` to be confirmed.
    pub stop_timeout: u64,
    /// Bound for `VerifyStandby` to be answered.
    pub verify_timeout: u64,
    /// Soak time with the new version in control and the old one still available.
    pub soak_ticks: u64,
    /// Reverts unless committed this many ticks after control first moves to N+1.
    pub rollback_timer: Option<u64>,
    /// Largest replication lag (mutations) accepted as sufficient state.
    pub max_lag: u64,
    /// Largest number of live instances on one appliance.
    pub max_instances_per_appliance: usize,
    /// How many times a standby may be re-attached after falling out of sync.
    pub max_resyncs: u32,
    /// How many instances the rollback/repair reconciler may start before asking the operator.
    pub max_repair_starts: u32,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            start_timeout: 20,
            sync_timeout: 30,
            switch_timeout: 10,
            stop_timeout: 10,
            verify_timeout: 10,
            soak_ticks: 5,
            rollback_timer: Some(600),
            max_lag: 16,
            max_instances_per_appliance: 2,
            max_resyncs: 3,
            max_repair_starts: 4,
        }
    }
}

/// Steps of the ISSU. See the module documentation for how they map to the procedure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// Procedure step 1.
    Precheck,
    /// Procedure step 2: start extra N instances.
    StartExtras,
    /// Procedure step 2: sync them.
    SyncExtras,
    /// Procedure step 3: replace A's extra with N+1.
    PrimaryStartNew,
    /// Procedure step 3: sync N+1 to sufficient state.
    PrimarySyncNew,
    /// Procedure step 3: planned switch of control to N+1.
    PrimarySwitch,
    /// Procedure step 3/4: soak, N+1 in control, old N still running on A.
    PrimaryMixed,
    /// Procedure step 3: replace the old N on A with N+1.
    PrimaryUpgradeOld,
    /// Procedure step 3: sync it as A's local standby.
    PrimarySyncOld,
    /// Procedure step 5: replace B's extra with N+1.
    SecondaryStartNew,
    /// Procedure step 5: sync it.
    SecondarySyncNew,
    /// Procedure step 5: make it the synchronous HA standby, demote B's old N.
    SecondarySwitch,
    /// Procedure step 5: soak with mixed versions on B.
    SecondaryMixed,
    /// Procedure step 5: replace B's old N with N+1.
    SecondaryUpgradeOld,
    /// Procedure step 5: sync it.
    SecondarySyncOld,
    /// Procedure step 6: stop the extra instances.
    Retire,
    /// Procedure step 6: wait for the operator's commit (or the rollback timer).
    AwaitCommit,
    /// Converging back to N with an HA standby.
    Rollback,
}

impl Step {
    /// The forward steps in order.
    pub const FORWARD: [Step; 17] = [
        Step::Precheck,
        Step::StartExtras,
        Step::SyncExtras,
        Step::PrimaryStartNew,
        Step::PrimarySyncNew,
        Step::PrimarySwitch,
        Step::PrimaryMixed,
        Step::PrimaryUpgradeOld,
        Step::PrimarySyncOld,
        Step::SecondaryStartNew,
        Step::SecondarySyncNew,
        Step::SecondarySwitch,
        Step::SecondaryMixed,
        Step::SecondaryUpgradeOld,
        Step::SecondarySyncOld,
        Step::Retire,
        Step::AwaitCommit,
    ];

    /// Kebab-case name used in reports, status and fault specifications.
    pub fn name(self) -> &'static str {
        match self {
            Step::Precheck => "precheck",
            Step::StartExtras => "start-extras",
            Step::SyncExtras => "sync-extras",
            Step::PrimaryStartNew => "primary-start-new",
            Step::PrimarySyncNew => "primary-sync-new",
            Step::PrimarySwitch => "primary-switch",
            Step::PrimaryMixed => "primary-mixed",
            Step::PrimaryUpgradeOld => "primary-upgrade-old",
            Step::PrimarySyncOld => "primary-sync-old",
            Step::SecondaryStartNew => "secondary-start-new",
            Step::SecondarySyncNew => "secondary-sync-new",
            Step::SecondarySwitch => "secondary-switch",
            Step::SecondaryMixed => "secondary-mixed",
            Step::SecondaryUpgradeOld => "secondary-upgrade-old",
            Step::SecondarySyncOld => "secondary-sync-old",
            Step::Retire => "retire",
            Step::AwaitCommit => "await-commit",
            Step::Rollback => "rollback",
        }
    }

    /// Parses a step name.
    pub fn from_name(s: &str) -> Option<Step> {
        Step::FORWARD
            .iter()
            .copied()
            .chain([Step::Rollback])
            .find(|st| st.name() == s)
    }

    /// Procedure step (1-6) this engine step belongs to; `None` for `rollback`.
    pub fn procedure_step(self) -> Option<u8> {
        Some(match self {
            Step::Precheck => 1,
            Step::StartExtras | Step::SyncExtras => 2,
            Step::PrimaryStartNew
            | Step::PrimarySyncNew
            | Step::PrimarySwitch
            | Step::PrimaryMixed
            | Step::PrimaryUpgradeOld
            | Step::PrimarySyncOld => 3,
            Step::SecondaryStartNew
            | Step::SecondarySyncNew
            | Step::SecondarySwitch
            | Step::SecondaryMixed
            | Step::SecondaryUpgradeOld
            | Step::SecondarySyncOld => 5,
            Step::Retire | Step::AwaitCommit => 6,
            Step::Rollback => return None,
        })
    }

    /// Whether the operator may still `abort` (cheap undo, control never left N).
    pub fn abortable(self) -> bool {
        self <= Step::PrimarySyncNew
    }

    fn next(self) -> Option<Step> {
        let i = Step::FORWARD.iter().position(|s| *s == self)?;
        Step::FORWARD.get(i + 1).copied()
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Verdict of the image compatibility check, an input to the engine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompatVerdict {
    /// Running version.
    pub from: Version,
    /// Target version.
    pub to: Version,
    /// State converts from `from` to `to`.
    pub upgrade_ok: bool,
    /// State converts from `to` back to `from`.
    pub downgrade_ok: bool,
    /// Human-readable detail.
    pub detail: String,
}

/// Inputs to the engine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// One unit of logical time passed.
    Tick,
    /// Operator: compatibility verdict for a target (required before `Start`).
    Compatibility {
        /// The verdict.
        verdict: CompatVerdict,
    },
    /// Operator: start an ISSU to `target`.
    Start {
        /// Target image.
        target: ImageRef,
    },
    /// Operator: abort (only before the primary switch).
    Abort,
    /// Operator: roll back to the running version (any time before commit).
    Rollback,
    /// Operator: commit (accept) the new version.
    Commit,
    /// Operator: retry after the engine reported itself stuck.
    Resume,
    /// An instance started (completion of `StartInstance`).
    InstanceStarted {
        /// The instance.
        instance: InstanceId,
    },
    /// An instance failed to start, crashed or exited.
    InstanceFailed {
        /// The instance.
        instance: InstanceId,
        /// Why.
        reason: String,
    },
    /// An instance stopped (completion of `StopInstance`).
    InstanceStopped {
        /// The instance.
        instance: InstanceId,
    },
    /// Replication progress of a standby.
    SyncProgress {
        /// The standby.
        instance: InstanceId,
        /// Last applied sequence number.
        applied_seq: u64,
        /// Mutations behind the instance in control.
        lag: u64,
    },
    /// A standby holds sufficient state (completion of `AttachStandby` / `VerifyStandby`).
    SyncReady {
        /// The standby.
        instance: InstanceId,
        /// Sequence number at which the digest was compared.
        seq: u64,
        /// Whether the digest matched the instance in control at `seq`.
        digest_ok: bool,
    },
    /// A standby fell out of sync.
    StandbyOutOfSync {
        /// The standby.
        instance: InstanceId,
    },
    /// Heartbeats from an instance stopped; it is treated as failed and fenced.
    HeartbeatLost {
        /// The instance.
        instance: InstanceId,
    },
    /// An appliance (and every instance on it) is lost.
    ApplianceLost {
        /// The appliance.
        appliance: ApplianceId,
    },
    /// An appliance is back (empty: its instances are gone).
    ApplianceRecovered {
        /// The appliance.
        appliance: ApplianceId,
    },
    /// Control moved (completion of `SwitchControl` / `Failover`).
    ControlSwitched {
        /// New instance in control.
        to: InstanceId,
        /// Its epoch.
        epoch: ControlEpoch,
    },
    /// A `SwitchControl` / `Failover` was refused; control did not move.
    SwitchFailed {
        /// Intended target.
        to: InstanceId,
        /// Epoch of the attempt.
        epoch: ControlEpoch,
        /// Why.
        reason: String,
    },
    /// A step exceeded its bound. The engine generates this itself from `Tick`; a driver may
    /// also inject it.
    StepTimeout {
        /// The step.
        step: Step,
    },
}

/// Progress and operator-facing reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "report", rename_all = "kebab-case")]
pub enum Report {
    /// An operator request was accepted.
    Accepted {
        /// The request.
        request: String,
    },
    /// An operator request was refused; nothing changed.
    Rejected {
        /// The request.
        request: String,
        /// Why, and what is possible instead.
        reason: String,
    },
    /// The ISSU entered a step.
    Step {
        /// The step.
        step: Step,
        /// What it does, or why (for `rollback`).
        detail: String,
    },
    /// The engine cannot continue alone.
    Stuck(Stuck),
    /// The ISSU ended.
    Finished(Outcome),
    /// Control moved (planned or failover).
    ControlMoved {
        /// New instance in control.
        to: InstanceId,
        /// Its epoch.
        epoch: ControlEpoch,
        /// Its version.
        version: Version,
    },
}

/// Why the engine cannot continue alone, the exact state of the pair, and what resumes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stuck {
    /// Exact situation.
    pub reason: String,
    /// Operator command that resumes (`resume`, `rollback`, ...).
    pub resume_with: String,
}

/// How an ISSU ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Outcome {
    /// Every instance runs the target; committed.
    Committed {
        /// The version now running.
        version: Version,
    },
    /// Back on the source version with an HA standby.
    RolledBack {
        /// The version now running.
        version: Version,
        /// Why the rollback started.
        reason: String,
    },
}

/// Outputs of the engine. Every command is idempotent: re-executing it (for example after a
/// restart, see [`Engine::in_flight_commands`]) has the same effect as executing it once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Command {
    /// Start `instance` on `appliance` with `image`. Completes with `InstanceStarted` or
    /// `InstanceFailed`.
    StartInstance {
        /// Instance id (never reused).
        instance: InstanceId,
        /// Where.
        appliance: ApplianceId,
        /// What.
        image: ImageRef,
    },
    /// Stop (and clean up) an instance. Completes with `InstanceStopped`; an unknown or
    /// already stopped instance also answers `InstanceStopped`.
    StopInstance {
        /// The instance.
        instance: InstanceId,
    },
    /// Feed `standby` from `active`. With `designated_ha` the standby is synchronous (writes
    /// are acknowledged only once it applied them) once in sync. Completes with `SyncReady`
    /// (or `StandbyOutOfSync` / `InstanceFailed`).
    AttachStandby {
        /// The standby.
        standby: InstanceId,
        /// The instance in control.
        active: InstanceId,
        /// Synchronous HA standby.
        designated_ha: bool,
    },
    /// Re-verify an attached standby's digest against the active. Completes with `SyncReady`.
    VerifyStandby {
        /// The standby.
        standby: InstanceId,
        /// The instance in control.
        active: InstanceId,
    },
    /// Planned switchover: quiesce `from`, drain until `to` holds every mutation, promote `to`
    /// at `epoch`, move every standby's feed to `to` and attach `from` as its standby.
    /// Completes with `ControlSwitched` or `SwitchFailed`. Must not take effect if `epoch` is
    /// not above the current one.
    SwitchControl {
        /// Current instance in control.
        from: InstanceId,
        /// New instance in control.
        to: InstanceId,
        /// New epoch.
        epoch: ControlEpoch,
    },
    /// Unplanned failover: promote `to` at `epoch`. Completes with `ControlSwitched` or
    /// `SwitchFailed`.
    Failover {
        /// New instance in control.
        to: InstanceId,
        /// New epoch.
        epoch: ControlEpoch,
    },
    /// Reject anything `instance` does under an epoch below `epoch` (and stop it if possible).
    Fence {
        /// The instance.
        instance: InstanceId,
        /// Epoch from which it is fenced.
        epoch: ControlEpoch,
    },
    /// Progress report for the operator and the journal.
    Report {
        /// What happened.
        progress: Report,
    },
}

/// A control change in flight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingSwitch {
    /// Previous instance in control.
    pub from: Option<InstanceId>,
    /// Target.
    pub to: InstanceId,
    /// Epoch allocated to it.
    pub epoch: ControlEpoch,
    /// Planned switchover (true) or failover (false).
    pub planned: bool,
}

/// Instances the ISSU plays with, by procedure role.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slots {
    /// N in control on A when the ISSU started.
    pub a_orig: Option<InstanceId>,
    /// N HA standby on B when the ISSU started.
    pub b_orig: Option<InstanceId>,
    /// Extra N on A.
    pub a_extra: Option<InstanceId>,
    /// Extra N on B.
    pub b_extra: Option<InstanceId>,
    /// First N+1 on A (takes control).
    pub a_new: Option<InstanceId>,
    /// N+1 replacing A's old N.
    pub a_upgraded: Option<InstanceId>,
    /// First N+1 on B (becomes the HA standby).
    pub b_new: Option<InstanceId>,
    /// N+1 replacing B's old N.
    pub b_upgraded: Option<InstanceId>,
}

/// State of a running ISSU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuState {
    /// Running image (N).
    pub source: ImageRef,
    /// Target image (N+1).
    pub target: ImageRef,
    /// Appliance upgraded first (in control at start).
    pub first: ApplianceId,
    /// Current step.
    pub step: Step,
    /// Tick the step was entered.
    pub step_entered: u64,
    /// Instances by procedure role.
    pub slots: Slots,
    /// `VerifyStandby` issued in `precheck`.
    pub verify_sent: bool,
    /// The HA standby's digest was verified in `precheck`.
    pub verified: bool,
    /// Reverts at this tick unless committed.
    pub rollback_deadline: Option<u64>,
    /// Why the rollback started.
    pub rollback_reason: Option<String>,
    /// Instances the rollback reconciler started.
    pub repair_starts: u32,
}

/// Serializable snapshot of the whole engine (for the journal).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineState {
    /// Configuration.
    pub config: EngineConfig,
    /// Instance table, epoch, control.
    pub pair: Pair,
    /// Logical time.
    pub now: u64,
    /// Next instance id.
    pub next_id: u64,
    /// Highest epoch ever allocated (burned epochs are never reused).
    pub max_epoch: ControlEpoch,
    /// Latest compatibility verdict.
    pub compat: Option<CompatVerdict>,
    /// ISSU in progress.
    pub issu: Option<IssuState>,
    /// Control change in flight.
    pub pending: Option<PendingSwitch>,
    /// Set when the engine waits for the operator.
    pub stuck: Option<Stuck>,
    /// How the last ISSU ended.
    pub last_outcome: Option<Outcome>,
    /// Step timer: fires at this tick unless progress is made.
    pub deadline: Option<u64>,
    /// The in-flight commands were already re-issued once for the current deadline.
    pub retried: bool,
    /// Fingerprint of the observable progress, to reset the step timer.
    pub progress_mark: u64,
    /// Repair starts in steady state (bounded).
    pub repair_starts: u32,
}

/// Errors from [`Engine::restore`] and [`Engine::new`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The snapshot is internally inconsistent.
    #[error("engine state is inconsistent: {0}")]
    Inconsistent(String),
}

/// Row of the instance table in [`Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRow {
    /// Id.
    pub id: InstanceId,
    /// Appliance.
    pub appliance: ApplianceId,
    /// Version.
    pub version: Version,
    /// State.
    pub state: InstanceState,
    /// Role.
    pub role: Role,
}

/// What the engine is doing, for `hitless status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// `idle`, `issu`, `rolling-back` or `stuck`.
    pub phase: String,
    /// Current ISSU step name.
    pub step: Option<String>,
    /// Procedure step 1-6.
    pub procedure_step: Option<u8>,
    /// Instance table (live and failed instances).
    pub instances: Vec<InstanceRow>,
    /// Control epoch.
    pub epoch: ControlEpoch,
    /// Instance in control.
    pub in_control: Option<InstanceId>,
    /// Version in control.
    pub control_version: Option<Version>,
    /// Stuck reason and resume command.
    pub stuck: Option<Stuck>,
    /// Where the point of no return is relative to now.
    pub point_of_no_return: String,
    /// `abort` would be accepted.
    pub can_abort: bool,
    /// `rollback` would be accepted.
    pub can_rollback: bool,
    /// `commit` would be accepted.
    pub can_commit: bool,
    /// How the last ISSU ended.
    pub last_outcome: Option<Outcome>,
}

/// The ISSU engine and HA policy.
#[derive(Debug, Clone)]
pub struct Engine {
    st: EngineState,
}

enum Prog {
    Wait,
    Done,
    Fail(String),
}

const DRIVE_BOUND: usize = 64;

impl Engine {
    /// An engine managing `pair` (normally [`Pair::steady`]).
    pub fn new(config: EngineConfig, pair: Pair) -> Result<Self, EngineError> {
        let next_id = pair.instances.iter().map(|i| i.id.0).max().unwrap_or(0) + 1;
        let st = EngineState {
            config,
            max_epoch: pair.epoch,
            pair,
            now: 0,
            next_id,
            compat: None,
            issu: None,
            pending: None,
            stuck: None,
            last_outcome: None,
            deadline: None,
            retried: false,
            progress_mark: 0,
            repair_starts: 0,
        };
        validate(&st)?;
        Ok(Self { st })
    }

    /// Rebuilds an engine from a journalled snapshot. The driver should then execute
    /// [`Engine::in_flight_commands`] (idempotent) to resume.
    pub fn restore(state: EngineState) -> Result<Self, EngineError> {
        validate(&state)?;
        Ok(Self { st: state })
    }

    /// The full state (serialize it to journal).
    pub fn state(&self) -> &EngineState {
        &self.st
    }

    /// A copy of the full state.
    pub fn snapshot(&self) -> EngineState {
        self.st.clone()
    }

    /// Current step, if an ISSU runs.
    pub fn step(&self) -> Option<Step> {
        self.st.issu.as_ref().map(|i| i.step)
    }

    /// The commands whose completion the engine is waiting for, to re-execute after a restart.
    pub fn in_flight_commands(&self) -> Vec<Command> {
        let mut out = Vec::new();
        let control = self.st.pair.in_control;
        for i in &self.st.pair.instances {
            if !self.st.pair.is_up(i.appliance) {
                continue;
            }
            match i.state {
                InstanceState::Starting => out.push(Command::StartInstance {
                    instance: i.id,
                    appliance: i.appliance,
                    image: i.image.clone(),
                }),
                InstanceState::Syncing => {
                    if let Some(active) = control.filter(|c| *c != i.id) {
                        out.push(Command::AttachStandby {
                            standby: i.id,
                            active,
                            designated_ha: i.role == Role::HaStandby,
                        })
                    }
                }
                InstanceState::Stopping => out.push(Command::StopInstance { instance: i.id }),
                _ => {}
            }
        }
        // A planned switch is retried only while its target is still a ready standby (one
        // that fell out of sync meanwhile would lack acknowledged writes); a failover only
        // while its target is up.
        let pending = self.st.pending.as_ref().filter(|p| {
            self.inst(p.to).is_some_and(|t| {
                if p.planned {
                    t.is_ready_standby()
                } else {
                    t.state.is_up()
                }
            })
        });
        if let Some(p) = pending {
            match (p.planned, p.from) {
                (true, Some(from)) => out.push(Command::SwitchControl {
                    from,
                    to: p.to,
                    epoch: p.epoch,
                }),
                _ => {
                    if let Some(from) = p.from {
                        out.push(Command::Fence {
                            instance: from,
                            epoch: p.epoch,
                        });
                    }
                    out.push(Command::Failover {
                        to: p.to,
                        epoch: p.epoch,
                    })
                }
            }
        }
        if let Some(issu) = &self.st.issu {
            if issu.step == Step::Precheck && issu.verify_sent && !issu.verified {
                if let (Some(standby), Some(active)) = (issu.slots.b_orig, control) {
                    out.push(Command::VerifyStandby { standby, active });
                }
            }
        }
        out
    }

    /// Operator-facing status.
    pub fn status(&self) -> Status {
        let st = &self.st;
        let step = st.issu.as_ref().map(|i| i.step);
        let phase = if st.stuck.is_some() {
            "stuck"
        } else {
            match step {
                None => "idle",
                Some(Step::Rollback) => "rolling-back",
                Some(_) => "issu",
            }
        };
        let pnr = match step {
            None => match &st.last_outcome {
                Some(Outcome::Committed { version }) => format!(
                    "passed: {version} is committed; going back needs a new ISSU"
                ),
                _ => "no ISSU running".to_string(),
            },
            Some(Step::Rollback) => {
                "rolling back; commit is no longer possible for this ISSU".to_string()
            }
            Some(s) if s.abortable() => {
                "not reached: control is still on the running version; abort or rollback revert cheaply".to_string()
            }
            Some(_) => "not reached: control is (or is moving) on the target version; rollback reverts by reverse switchover until commit, the point of no return".to_string(),
        };
        let instances = st
            .pair
            .instances
            .iter()
            .filter(|i| i.state != InstanceState::Stopped)
            .map(|i| InstanceRow {
                id: i.id,
                appliance: i.appliance,
                version: i.version(),
                state: i.state,
                role: i.role,
            })
            .collect();
        Status {
            phase: phase.to_string(),
            step: step.map(|s| s.name().to_string()),
            procedure_step: step.and_then(|s| s.procedure_step()),
            instances,
            epoch: st.pair.epoch,
            in_control: st.pair.in_control,
            control_version: st.pair.control().map(|c| c.version()),
            stuck: st.stuck.clone(),
            point_of_no_return: pnr,
            can_abort: step.is_some_and(|s| s.abortable()),
            can_rollback: step.is_some_and(|s| s != Step::Rollback) || st.stuck.is_some(),
            can_commit: step == Some(Step::AwaitCommit) && self.ha_protected(),
            last_outcome: st.last_outcome.clone(),
        }
    }

    /// Feeds one event; returns the commands to execute, in order.
    pub fn handle(&mut self, event: Event) -> Vec<Command> {
        let mut out = Vec::new();
        self.apply(event, &mut out);
        self.drive(&mut out);
        self.update_timer();
        out
    }

    // ----------------------------------------------------------------- events

    fn apply(&mut self, event: Event, out: &mut Vec<Command>) {
        match event {
            Event::Tick => {
                self.st.now += 1;
                self.on_tick(out);
            }
            Event::Compatibility { verdict } => {
                out.push(report(Report::Accepted {
                    request: format!("compatibility verdict {} -> {}", verdict.from, verdict.to),
                }));
                self.st.compat = Some(verdict);
            }
            Event::Start { target } => self.on_start(target, out),
            Event::Abort => self.on_abort(out),
            Event::Rollback => self.on_rollback(out),
            Event::Commit => self.on_commit(out),
            Event::Resume => {
                if self.st.stuck.take().is_some() {
                    self.st.retried = false;
                    self.st.repair_starts = 0;
                    if let Some(i) = self.st.issu.as_mut() {
                        i.repair_starts = 0;
                    }
                    for inst in &mut self.st.pair.instances {
                        inst.resyncs = 0;
                    }
                    out.push(report(Report::Accepted {
                        request: "resume".into(),
                    }));
                    out.extend(self.in_flight_commands());
                } else {
                    out.push(report(Report::Rejected {
                        request: "resume".into(),
                        reason: "the engine is not stuck".into(),
                    }));
                }
            }
            Event::InstanceStarted { instance } => match self.inst(instance).map(|i| i.state) {
                Some(InstanceState::Starting) => self.set_state(instance, InstanceState::Running),
                Some(InstanceState::Stopping | InstanceState::Stopped | InstanceState::Failed) => {
                    // A late start of an instance we gave up on: stop it again.
                    self.set_state(instance, InstanceState::Stopping);
                    out.push(Command::StopInstance { instance });
                }
                _ => {}
            },
            Event::InstanceFailed { instance, reason } => {
                self.on_failed(instance, &reason, out);
            }
            Event::HeartbeatLost { instance } => {
                self.on_failed(instance, "heartbeat lost", out);
            }
            Event::InstanceStopped { instance } => {
                if let Some(i) = self.inst_mut(instance) {
                    let was_live = i.state.is_up() || i.state == InstanceState::Starting;
                    i.state = InstanceState::Stopped;
                    i.role = Role::Spare;
                    if was_live {
                        // An unexpected stop is a failure of that instance.
                        self.on_failed(instance, "exited", out);
                        if let Some(i) = self.inst_mut(instance) {
                            i.state = InstanceState::Stopped;
                        }
                    }
                }
            }
            Event::SyncProgress {
                instance,
                applied_seq,
                lag,
            } => {
                if let Some(i) = self.inst_mut(instance) {
                    i.applied_seq = i.applied_seq.max(applied_seq);
                    i.lag = lag;
                }
            }
            Event::SyncReady {
                instance,
                seq,
                digest_ok,
            } => self.on_sync_ready(instance, seq, digest_ok, out),
            Event::StandbyOutOfSync { instance } => self.on_out_of_sync(instance, out),
            Event::ApplianceLost { appliance } => {
                self.st.pair.set_up(appliance, false);
                let ids: Vec<_> = self
                    .st
                    .pair
                    .instances
                    .iter()
                    .filter(|i| i.appliance == appliance && i.state != InstanceState::Stopped)
                    .map(|i| i.id)
                    .collect();
                for id in ids {
                    self.on_failed(id, &format!("{appliance} appliance lost"), out);
                }
                self.begin_rollback_if_forward(format!("{appliance} appliance lost"), out);
            }
            Event::ApplianceRecovered { appliance } => {
                self.st.pair.set_up(appliance, true);
                for i in &mut self.st.pair.instances {
                    if i.appliance == appliance && i.state != InstanceState::Stopped {
                        i.state = InstanceState::Stopped;
                        i.role = Role::Spare;
                    }
                }
            }
            Event::ControlSwitched { to, epoch } => self.on_switched(to, epoch, out),
            Event::SwitchFailed { to, epoch, reason } => {
                let matches = self
                    .st
                    .pending
                    .as_ref()
                    .is_some_and(|p| p.to == to && p.epoch == epoch);
                if matches {
                    self.st.pending = None;
                    self.st.repair_starts += 1;
                    if let Some(i) = self.st.issu.as_mut() {
                        i.repair_starts += 1;
                    }
                    self.begin_rollback_if_forward(
                        format!("switch of control to {to} at {epoch} failed: {reason}"),
                        out,
                    );
                }
            }
            Event::StepTimeout { step } => {
                if self.step() == Some(step) || (self.st.issu.is_none() && step == Step::Rollback) {
                    self.on_timeout(out);
                }
            }
        }
    }

    fn on_tick(&mut self, out: &mut Vec<Command>) {
        let now = self.st.now;
        if let Some(issu) = &self.st.issu {
            if issu.step != Step::Rollback && issu.rollback_deadline.is_some_and(|d| now >= d) {
                self.begin_rollback("rollback timer expired before commit".into(), out);
                return;
            }
        }
        if self.st.stuck.is_none() && self.st.deadline.is_some_and(|d| now >= d) {
            self.on_timeout(out);
        }
    }

    fn on_timeout(&mut self, out: &mut Vec<Command>) {
        let what = self.waiting_on();
        if !self.st.retried {
            // Commands are idempotent: re-issue once before giving up on the step.
            self.st.retried = true;
            out.extend(self.in_flight_commands());
            self.st.deadline = Some(self.st.now + self.bound());
            return;
        }
        let step = self.step();
        if let Some(p) = self.st.pending.clone() {
            // Outcome of the control change is unknown: move control, with a fresh epoch, to a
            // synchronous standby, which holds every acknowledged write whichever side won.
            self.st.pending = None;
            // Without one, a planned switch whose target is gone is resolved by re-asserting
            // the source at a higher epoch: the target cannot serve, and whatever only it held
            // has no other copy.
            let candidate = self.failover_candidate(&[Some(p.to), p.from]).or_else(|| {
                p.from.filter(|f| {
                    p.planned
                        && self.st.pair.in_control == Some(*f)
                        && self.inst(*f).is_some_and(|i| i.state.is_up())
                        && self.inst(p.to).is_none_or(|t| !t.state.is_up())
                })
            });
            match candidate {
                Some(to) => {
                    let epoch = self.alloc_epoch();
                    for f in [Some(p.to), p.from].into_iter().flatten() {
                        if f != to {
                            out.push(Command::Fence { instance: f, epoch });
                            self.set_state(f, InstanceState::Failed);
                        }
                    }
                    out.push(Command::Failover { to, epoch });
                    self.st.pending = Some(PendingSwitch {
                        from: self.st.pair.in_control,
                        to,
                        epoch,
                        planned: false,
                    });
                    self.begin_rollback_if_forward(
                        format!(
                            "control change to {} at {} was not confirmed",
                            p.to, p.epoch
                        ),
                        out,
                    );
                    return;
                }
                None => {
                    self.set_stuck(
                        format!(
                            "control change to {} at {} was not confirmed and no synchronous standby can take over; control is on {} or {}",
                            p.to,
                            p.epoch,
                            p.to,
                            p.from.map(|f| f.to_string()).unwrap_or_else(|| "nobody".into())
                        ),
                        "resume (after confirming which instance serves clients)",
                        out,
                    );
                    return;
                }
            }
        }
        match step {
            Some(s) if s != Step::Rollback => {
                self.begin_rollback(format!("step {s} timed out waiting for {what}"), out);
            }
            _ => {
                self.set_stuck(
                    format!("timed out twice waiting for {what}; {}", self.describe()),
                    if step == Some(Step::Rollback) {
                        "rollback (re-issues the outstanding commands)"
                    } else {
                        "resume"
                    },
                    out,
                );
            }
        }
    }

    fn on_start(&mut self, target: ImageRef, out: &mut Vec<Command>) {
        let reject = |out: &mut Vec<Command>, reason: String| {
            out.push(report(Report::Rejected {
                request: format!("start {target}"),
                reason,
            }))
        };
        if let Some(i) = &self.st.issu {
            return reject(out, format!("an ISSU is already running (step {})", i.step));
        }
        if let Some(s) = &self.st.stuck {
            return reject(out, format!("the engine is stuck: {}", s.reason));
        }
        if self.st.pending.is_some() {
            return reject(out, "a control change is in flight".into());
        }
        let Some(c) = self.st.pair.control().cloned() else {
            return reject(out, "no instance is in control".into());
        };
        let source = c.image.clone();
        if target.version == source.version {
            return reject(out, format!("{} already runs {}", c.id, source.version));
        }
        match &self.st.compat {
            None => {
                return reject(
                    out,
                    "no compatibility verdict; run the image compatibility check first".into(),
                )
            }
            Some(v) if v.from != source.version || v.to != target.version => {
                return reject(
                    out,
                    format!(
                        "the compatibility verdict is for {} -> {}, not {} -> {}",
                        v.from, v.to, source.version, target.version
                    ),
                )
            }
            Some(v) if !(v.upgrade_ok && v.downgrade_ok) => {
                return reject(
                    out,
                    format!(
                        "image not compatible both ways (upgrade {}, downgrade {}): {}",
                        v.upgrade_ok, v.downgrade_ok, v.detail
                    ),
                )
            }
            Some(_) => {}
        }
        for a in ApplianceId::ALL {
            if !self.st.pair.is_up(a) {
                return reject(out, format!("the {a} appliance is not healthy"));
            }
        }
        let b = c.appliance.other();
        let ha = self.st.pair.live_on(b).find(|i| {
            i.role == Role::HaStandby && i.state == InstanceState::Ready && i.image == source
        });
        let Some(ha) = ha.map(|i| i.id) else {
            return reject(
                out,
                format!(
                    "no in-sync HA standby of {} on the {b} appliance",
                    source.version
                ),
            );
        };
        let live = self
            .st
            .pair
            .instances
            .iter()
            .filter(|i| i.state.is_live())
            .count();
        if live != 2 {
            return reject(
                out,
                format!("expected one instance per appliance, found {live} live instances"),
            );
        }
        out.push(report(Report::Accepted {
            request: format!("start {target}"),
        }));
        self.st.repair_starts = 0;
        self.st.issu = Some(IssuState {
            source,
            target,
            first: c.appliance,
            step: Step::Precheck,
            step_entered: self.st.now,
            slots: Slots {
                a_orig: Some(c.id),
                b_orig: Some(ha),
                ..Slots::default()
            },
            verify_sent: false,
            verified: false,
            rollback_deadline: None,
            rollback_reason: None,
            repair_starts: 0,
        });
        out.push(report(Report::Step {
            step: Step::Precheck,
            detail: step_detail(Step::Precheck).into(),
        }));
    }

    fn on_abort(&mut self, out: &mut Vec<Command>) {
        match self.step() {
            None => out.push(report(Report::Rejected {
                request: "abort".into(),
                reason: "no ISSU is running".into(),
            })),
            Some(Step::Rollback) => out.push(report(Report::Rejected {
                request: "abort".into(),
                reason: "the ISSU is already rolling back".into(),
            })),
            Some(s) if s.abortable() => {
                out.push(report(Report::Accepted {
                    request: "abort".into(),
                }));
                self.begin_rollback("operator abort".into(), out);
            }
            Some(s) => out.push(report(Report::Rejected {
                request: "abort".into(),
                reason: format!(
                    "control has moved (or is moving) to the target version at step {s}; use rollback to revert by reverse switchover, or commit"
                ),
            })),
        }
    }

    fn on_rollback(&mut self, out: &mut Vec<Command>) {
        match self.step() {
            None => out.push(report(Report::Rejected {
                request: "rollback".into(),
                reason: match &self.st.last_outcome {
                    Some(Outcome::Committed { version }) => format!(
                        "{version} is committed (point of no return passed); going back needs a new ISSU"
                    ),
                    _ => "no ISSU is running".into(),
                },
            })),
            Some(Step::Rollback) => {
                if self.st.stuck.take().is_some() {
                    self.st.retried = false;
                    if let Some(i) = self.st.issu.as_mut() {
                        i.repair_starts = 0;
                    }
                    out.push(report(Report::Accepted {
                        request: "rollback (resume)".into(),
                    }));
                    out.extend(self.in_flight_commands());
                } else {
                    out.push(report(Report::Rejected {
                        request: "rollback".into(),
                        reason: "the ISSU is already rolling back".into(),
                    }))
                }
            }
            Some(_) => {
                out.push(report(Report::Accepted {
                    request: "rollback".into(),
                }));
                self.begin_rollback("operator rollback".into(), out);
            }
        }
    }

    fn on_commit(&mut self, out: &mut Vec<Command>) {
        match self.step() {
            Some(Step::AwaitCommit) if self.ha_protected() && self.st.pending.is_none() => {
                let issu = self.st.issu.take().expect("step implies issu");
                out.push(report(Report::Accepted {
                    request: "commit".into(),
                }));
                let outcome = Outcome::Committed {
                    version: issu.target.version,
                };
                out.push(report(Report::Finished(outcome.clone())));
                self.st.last_outcome = Some(outcome);
            }
            Some(Step::AwaitCommit) => out.push(report(Report::Rejected {
                request: "commit".into(),
                reason: "the HA standby is not in sync yet; commit once it is".into(),
            })),
            Some(s) => out.push(report(Report::Rejected {
                request: "commit".into(),
                reason: format!(
                    "commit is accepted at step await-commit, once every instance runs the target; the ISSU is at step {s}"
                ),
            })),
            None => out.push(report(Report::Rejected {
                request: "commit".into(),
                reason: "no ISSU is running".into(),
            })),
        }
    }

    fn on_failed(&mut self, id: InstanceId, reason: &str, out: &mut Vec<Command>) {
        let Some(inst) = self.inst(id) else { return };
        if matches!(inst.state, InstanceState::Stopped | InstanceState::Failed) {
            return;
        }
        let stopping = inst.state == InstanceState::Stopping;
        self.set_state(id, InstanceState::Failed);
        if stopping {
            // It was being stopped anyway.
            return;
        }
        if let Some(i) = self.inst_mut(id) {
            if i.role != Role::InControl {
                i.role = Role::Spare;
            }
        }
        self.begin_rollback_if_forward(format!("instance {id} failed: {reason}"), out);
    }

    fn on_sync_ready(&mut self, id: InstanceId, seq: u64, digest_ok: bool, out: &mut Vec<Command>) {
        let max_lag = self.st.config.max_lag;
        let max_resyncs = self.st.config.max_resyncs;
        let control = self.st.pair.in_control;
        let Some(inst) = self.inst(id).cloned() else {
            return;
        };
        let ok = digest_ok && inst.lag <= max_lag;
        match inst.state {
            InstanceState::Syncing | InstanceState::Ready if ok => {
                let i = self.inst_mut(id).expect("exists");
                i.state = InstanceState::Ready;
                i.verified_seq = Some(seq);
                i.applied_seq = i.applied_seq.max(seq);
            }
            InstanceState::Syncing | InstanceState::Ready => {
                let resyncs = inst.resyncs + 1;
                let i = self.inst_mut(id).expect("exists");
                i.resyncs = resyncs;
                i.state = InstanceState::Syncing;
                if resyncs > max_resyncs {
                    self.on_failed(id, "digest mismatch after repeated resyncs", out);
                } else if let Some(active) = control {
                    out.push(Command::AttachStandby {
                        standby: id,
                        active,
                        designated_ha: inst.role == Role::HaStandby,
                    });
                }
            }
            _ => {}
        }
        let now_ready = self
            .inst(id)
            .is_some_and(|i| i.state == InstanceState::Ready);
        if let Some(issu) = self.st.issu.as_mut() {
            if issu.step == Step::Precheck
                && issu.slots.b_orig == Some(id)
                && issu.verify_sent
                && digest_ok
                && now_ready
            {
                issu.verified = true;
            }
        }
    }

    fn on_out_of_sync(&mut self, id: InstanceId, out: &mut Vec<Command>) {
        let Some(inst) = self.inst(id).cloned() else {
            return;
        };
        if !matches!(inst.state, InstanceState::Ready | InstanceState::Syncing) {
            return;
        }
        let resyncs = inst.resyncs + 1;
        if let Some(i) = self.inst_mut(id) {
            i.state = InstanceState::Syncing;
            i.resyncs = resyncs;
        }
        if resyncs > self.st.config.max_resyncs {
            self.on_failed(id, "fell out of sync repeatedly", out);
            return;
        }
        if let Some(active) = self.st.pair.in_control {
            out.push(Command::AttachStandby {
                standby: id,
                active,
                designated_ha: inst.role == Role::HaStandby,
            });
        }
    }

    fn on_switched(&mut self, to: InstanceId, epoch: ControlEpoch, out: &mut Vec<Command>) {
        let Some(p) = self.st.pending.clone() else {
            return;
        };
        if p.to != to || p.epoch != epoch {
            if epoch > self.st.pair.epoch && epoch < p.epoch && self.inst(to).is_some() {
                // A superseded control change that completed anyway (its cancellation could
                // not reach the appliance): control did move. Record the fact; the pending
                // change at the higher epoch fences it when it completes.
                let old = self.st.pair.in_control;
                self.st.pair.epoch = epoch;
                self.st.pair.in_control = Some(to);
                if let Some(i) = self.inst_mut(to) {
                    i.role = Role::InControl;
                    if i.state.is_up() {
                        i.state = InstanceState::Running;
                    }
                }
                if let Some(i) = old.filter(|o| *o != to).and_then(|o| self.inst_mut(o)) {
                    if i.role == Role::InControl {
                        i.role = Role::Spare;
                    }
                }
                let version = self.inst(to).map(|i| i.version()).expect("exists");
                out.push(report(Report::ControlMoved { to, epoch, version }));
            }
            return;
        }
        self.st.pending = None;
        let old = self.st.pair.in_control;
        self.st.pair.epoch = epoch;
        self.st.pair.in_control = Some(to);
        {
            let i = self.inst_mut(to).expect("switch target exists");
            i.role = Role::InControl;
            if i.state.is_up() {
                i.state = InstanceState::Running;
            }
            // Otherwise it failed meanwhile: the HA policy fails over at the next drive.
        }
        let version = self.inst(to).map(|i| i.version()).expect("exists");
        out.push(report(Report::ControlMoved { to, epoch, version }));
        if self.st.pair.control().is_some() && self.st.stuck.take().is_some() {
            // A late confirmation restored control: the engine can go on by itself.
            self.st.retried = false;
        }
        if let Some(old) = old.filter(|o| *o != to) {
            if let Some(i) = self.inst_mut(old) {
                if p.planned && i.state.is_up() {
                    // Drained by the switchover: holds everything, now a local standby.
                    i.role = Role::LocalStandby;
                    i.state = InstanceState::Ready;
                } else if i.role == Role::InControl {
                    i.role = Role::Spare;
                }
            }
        }
        let standbys: Vec<Instance> = self
            .st
            .pair
            .instances
            .iter()
            .filter(|i| i.id != to && i.state.is_up())
            .cloned()
            .collect();
        for s in standbys {
            if p.planned {
                let designated = s.role == Role::HaStandby;
                if s.role == Role::Spare {
                    continue;
                }
                out.push(Command::AttachStandby {
                    standby: s.id,
                    active: to,
                    designated_ha: designated,
                });
            } else {
                // After a failover every survivor resyncs from the new active, synchronously:
                // the reconciler trims the set afterwards.
                let i = self.inst_mut(s.id).expect("exists");
                i.role = Role::HaStandby;
                i.state = InstanceState::Syncing;
                out.push(Command::AttachStandby {
                    standby: s.id,
                    active: to,
                    designated_ha: true,
                });
            }
        }
        if let Some(issu) = self.st.issu.as_mut() {
            if issu.step != Step::Rollback
                && issu.rollback_deadline.is_none()
                && version == issu.target.version
            {
                issu.rollback_deadline = self.st.config.rollback_timer.map(|t| self.st.now + t);
            }
        }
    }

    // ------------------------------------------------------------------ drive

    fn drive(&mut self, out: &mut Vec<Command>) {
        for _ in 0..DRIVE_BOUND {
            self.ha_policy(out);
            if self.st.stuck.is_some() {
                return;
            }
            let before = (self.step(), out.len());
            match self.step() {
                None => self.steady_repair(out),
                Some(Step::Rollback) => self.drive_rollback(out),
                Some(step) => self.drive_forward(step, out),
            }
            if (self.step(), out.len()) == before {
                return;
            }
        }
    }

    /// Failover when the instance in control is gone.
    fn ha_policy(&mut self, out: &mut Vec<Command>) {
        if let Some(p) = &self.st.pending {
            let up = |id: InstanceId| self.inst(id).is_some_and(|i| i.state.is_up());
            // A planned switch whose target died is refused by the agent (`SwitchFailed`) or
            // times out; one whose source died, or a failover whose target died, can never
            // complete: supersede it with a failover at a higher epoch.
            let supersede = if p.planned {
                !p.from.is_some_and(up)
            } else {
                !up(p.to)
            };
            if !supersede {
                return;
            }
        } else if self.st.pair.control().is_some() {
            return;
        }
        // Keep a superseded control change recorded until a failover replaces it: if no
        // standby can take over, a late confirmation of it must still be applied.
        let pending = self.st.pending.clone();
        let failed = self.st.pair.in_control;
        let exclude = [failed, pending.as_ref().map(|p| p.to)];
        match self.failover_candidate(&exclude) {
            Some(to) => {
                self.st.pending = None;
                let epoch = self.alloc_epoch();
                for f in exclude.into_iter().flatten() {
                    if f != to {
                        out.push(Command::Fence { instance: f, epoch });
                        if let Some(i) = self.inst_mut(f) {
                            if i.state.is_up() {
                                i.state = InstanceState::Failed;
                            }
                        }
                    }
                }
                out.push(Command::Failover { to, epoch });
                self.st.pending = Some(PendingSwitch {
                    from: failed,
                    to,
                    epoch,
                    planned: false,
                });
                self.begin_rollback_if_forward(
                    format!(
                        "instance in control {} failed; failing over to {to}",
                        failed.map(|f| f.to_string()).unwrap_or_default()
                    ),
                    out,
                );
            }
            None => {
                if self.st.stuck.is_none() {
                    self.begin_rollback_if_forward("instance in control failed".into(), out);
                    self.set_stuck(
                        format!(
                            "the instance in control {} failed and no in-sync synchronous standby holds every acknowledged write; {}",
                            failed.map(|f| f.to_string()).unwrap_or_default(),
                            self.describe()
                        ),
                        "resume (after restoring an instance holding every acknowledged write)",
                        out,
                    );
                }
            }
        }
    }

    /// A `Ready` synchronous standby, preferring the other appliance.
    fn failover_candidate(&self, exclude: &[Option<InstanceId>]) -> Option<InstanceId> {
        let failed_app = self
            .st
            .pair
            .in_control
            .and_then(|c| self.inst(c))
            .map(|i| i.appliance);
        let mut cands: Vec<&Instance> = self
            .st
            .pair
            .instances
            .iter()
            .filter(|i| {
                i.role == Role::HaStandby
                    && i.state == InstanceState::Ready
                    && self.st.pair.is_up(i.appliance)
                    && !exclude.contains(&Some(i.id))
            })
            .collect();
        cands.sort_by_key(|i| (Some(i.appliance) == failed_app, i.id));
        cands.first().map(|i| i.id)
    }

    fn drive_forward(&mut self, step: Step, out: &mut Vec<Command>) {
        let Some(issu) = self.st.issu.clone() else {
            return;
        };
        let a = issu.first;
        let b = a.other();
        let src = issu.source.clone();
        let tgt = issu.target.clone();
        let s = issu.slots.clone();
        let prog = match step {
            Step::Precheck => {
                if issu.verified {
                    Prog::Done
                } else if !issu.verify_sent {
                    match (s.b_orig, self.st.pair.in_control) {
                        (Some(standby), Some(active)) => {
                            out.push(Command::VerifyStandby { standby, active });
                            self.issu_mut().verify_sent = true;
                            Prog::Wait
                        }
                        _ => Prog::Fail("pre-check lost the HA standby".into()),
                    }
                } else {
                    Prog::Wait
                }
            }
            Step::StartExtras => both(
                self.ensure_started(|s| &mut s.a_extra, a, &src, out),
                self.ensure_started(|s| &mut s.b_extra, b, &src, out),
            ),
            Step::SyncExtras => both(
                self.ensure_synced(s.a_extra, false, out),
                self.ensure_synced(s.b_extra, false, out),
            ),
            Step::PrimaryStartNew => then(self.ensure_stopped(s.a_extra, out), || {
                self.ensure_started(|s| &mut s.a_new, a, &tgt, out)
            }),
            Step::PrimarySyncNew => self.ensure_synced(s.a_new, false, out),
            Step::PrimarySwitch => self.ensure_switched(s.a_new, out),
            Step::PrimaryMixed | Step::SecondaryMixed => {
                if self.st.now >= issu.step_entered + self.st.config.soak_ticks {
                    Prog::Done
                } else {
                    Prog::Wait
                }
            }
            Step::PrimaryUpgradeOld => then(self.ensure_stopped(s.a_orig, out), || {
                self.ensure_started(|s| &mut s.a_upgraded, a, &tgt, out)
            }),
            Step::PrimarySyncOld => self.ensure_synced(s.a_upgraded, false, out),
            Step::SecondaryStartNew => then(self.ensure_stopped(s.b_extra, out), || {
                self.ensure_started(|s| &mut s.b_new, b, &tgt, out)
            }),
            Step::SecondarySyncNew => self.ensure_synced(s.b_new, false, out),
            Step::SecondarySwitch => then(self.ensure_synced(s.b_new, true, out), || {
                self.ensure_synced(s.b_orig, false, out)
            }),
            Step::SecondaryUpgradeOld => then(self.ensure_stopped(s.b_orig, out), || {
                self.ensure_started(|s| &mut s.b_upgraded, b, &tgt, out)
            }),
            Step::SecondarySyncOld => self.ensure_synced(s.b_upgraded, false, out),
            Step::Retire => both(
                self.ensure_stopped(s.a_upgraded, out),
                self.ensure_stopped(s.b_upgraded, out),
            ),
            Step::AwaitCommit => Prog::Wait,
            Step::Rollback => return,
        };
        match prog {
            Prog::Wait => {}
            Prog::Fail(reason) => self.begin_rollback(reason, out),
            Prog::Done => {
                // Forward progress only while an in-sync HA standby protects the pair.
                if !self.ha_protected() || self.st.pending.is_some() {
                    return;
                }
                if let Some(next) = step.next() {
                    let now = self.st.now;
                    let issu = self.issu_mut();
                    issu.step = next;
                    issu.step_entered = now;
                    out.push(report(Report::Step {
                        step: next,
                        detail: step_detail(next).into(),
                    }));
                }
            }
        }
    }

    /// Rollback reconciler to the source version.
    fn drive_rollback(&mut self, out: &mut Vec<Command>) {
        let Some(issu) = self.st.issu.clone() else {
            return;
        };
        match self.reconcile(&issu.source, true, out) {
            Prog::Done => {
                self.st.issu = None;
                let outcome = Outcome::RolledBack {
                    version: issu.source.version,
                    reason: issu.rollback_reason.unwrap_or_default(),
                };
                out.push(report(Report::Finished(outcome.clone())));
                self.st.last_outcome = Some(outcome);
            }
            Prog::Wait => {}
            Prog::Fail(reason) => {
                let resume = "rollback (resumes the reconciler)";
                self.set_stuck(reason, resume, out);
            }
        }
    }

    /// Steady-state HA repair: keep an in-sync HA standby of the version in control.
    fn steady_repair(&mut self, out: &mut Vec<Command>) {
        let Some(image) = self.st.pair.control().map(|c| c.image.clone()) else {
            return;
        };
        match self.reconcile(&image, false, out) {
            Prog::Fail(reason) => self.set_stuck(reason, "resume", out),
            Prog::Done => self.st.repair_starts = 0,
            Prog::Wait => {}
        }
    }

    /// Converges to: `image` in control, a `Ready` synchronous standby of `image` on the other
    /// appliance, every other instance stopped.
    fn reconcile(&mut self, image: &ImageRef, in_issu: bool, out: &mut Vec<Command>) -> Prog {
        if self.st.pending.is_some() {
            return Prog::Wait;
        }
        let Some(c) = self.st.pair.control().cloned() else {
            return Prog::Wait;
        };
        let cap = self.st.config.max_instances_per_appliance;
        if c.image != *image {
            // Move control back to `image` by a planned (draining) switchover.
            let mut ready: Vec<&Instance> = self
                .st
                .pair
                .instances
                .iter()
                .filter(|i| i.image == *image && i.is_ready_standby())
                .collect();
            ready.sort_by_key(|i| (i.appliance != c.appliance, i.id));
            if let Some(to) = ready.first().map(|i| i.id) {
                let attempts = if in_issu {
                    self.st.issu.as_ref().map_or(0, |i| i.repair_starts)
                } else {
                    self.st.repair_starts
                };
                if attempts > self.st.config.max_repair_starts {
                    return Prog::Fail(format!(
                        "control could not be moved back to {} after {attempts} attempts; {}",
                        image.version,
                        self.describe()
                    ));
                }
                let epoch = self.alloc_epoch();
                out.push(Command::SwitchControl {
                    from: c.id,
                    to,
                    epoch,
                });
                self.st.pending = Some(PendingSwitch {
                    from: Some(c.id),
                    to,
                    epoch,
                    planned: true,
                });
                return Prog::Wait;
            }
            let in_progress = self
                .st
                .pair
                .instances
                .iter()
                .filter(|i| {
                    i.image == *image
                        && i.id != c.id
                        && matches!(
                            i.state,
                            InstanceState::Starting
                                | InstanceState::Running
                                | InstanceState::Syncing
                        )
                })
                .map(|i| i.id)
                .min();
            if let Some(id) = in_progress {
                return match self.ensure_synced(Some(id), false, out) {
                    Prog::Fail(_) => Prog::Wait,
                    p => p_wait(p),
                };
            }
            let target_app = [c.appliance.other(), c.appliance]
                .into_iter()
                .find(|a| self.st.pair.is_up(*a));
            let Some(app) = target_app else {
                return Prog::Wait;
            };
            return self.start_repair_instance(app, image, false, cap, in_issu, out);
        }
        let b = c.appliance.other();
        let ha = self
            .st
            .pair
            .live_on(b)
            .filter(|i| i.image == *image && i.state.is_up())
            .min_by_key(|i| {
                (
                    i.state != InstanceState::Ready,
                    i.role != Role::HaStandby,
                    i.id,
                )
            })
            .cloned();
        let ha_id = match ha {
            Some(h) if h.state == InstanceState::Ready && h.role == Role::HaStandby => h.id,
            Some(h) => {
                return p_wait(self.ensure_synced(Some(h.id), true, out));
            }
            None => {
                if let Some(starting) = self
                    .st
                    .pair
                    .live_on(b)
                    .find(|i| i.image == *image && i.state == InstanceState::Starting)
                {
                    let _ = starting;
                    return Prog::Wait;
                }
                if !self.st.pair.is_up(b) {
                    return Prog::Wait;
                }
                return self.start_repair_instance(b, image, true, cap, in_issu, out);
            }
        };
        // Retire everything else.
        let others: Vec<Instance> = self
            .st
            .pair
            .instances
            .iter()
            .filter(|i| {
                i.id != c.id
                    && i.id != ha_id
                    && i.state != InstanceState::Stopped
                    && self.st.pair.is_up(i.appliance)
            })
            .cloned()
            .collect();
        let mut all_done = true;
        for o in others {
            all_done = false;
            if o.state != InstanceState::Stopping {
                self.stop(o.id, out);
            }
        }
        let down_leftovers = self
            .st
            .pair
            .instances
            .iter()
            .any(|i| i.state != InstanceState::Stopped && !self.st.pair.is_up(i.appliance));
        if all_done && !down_leftovers {
            Prog::Done
        } else {
            Prog::Wait
        }
    }

    fn start_repair_instance(
        &mut self,
        app: ApplianceId,
        image: &ImageRef,
        designated: bool,
        cap: usize,
        in_issu: bool,
        out: &mut Vec<Command>,
    ) -> Prog {
        let live: Vec<Instance> = self.st.pair.live_on(app).cloned().collect();
        if live.len() >= cap {
            if live.iter().any(|i| i.state == InstanceState::Stopping) {
                return Prog::Wait;
            }
            // Free a slot without touching control or the last in-sync synchronous copy.
            let ready_ha = self
                .st
                .pair
                .instances
                .iter()
                .filter(|i| i.role == Role::HaStandby && i.state == InstanceState::Ready)
                .count();
            let control = self.st.pair.in_control;
            let victim = live
                .iter()
                .filter(|i| Some(i.id) != control)
                .filter(|i| {
                    !(i.role == Role::HaStandby && i.state == InstanceState::Ready && ready_ha <= 1)
                })
                .min_by_key(|i| {
                    (
                        i.image == *image,
                        i.state == InstanceState::Ready,
                        i.role == Role::HaStandby,
                        std::cmp::Reverse(i.id),
                    )
                })
                .map(|i| i.id);
            return match victim {
                Some(v) => {
                    self.stop(v, out);
                    Prog::Wait
                }
                None => Prog::Fail(format!(
                    "no free instance slot on the {app} appliance without stopping the instance in control or the last in-sync copy; {}",
                    self.describe()
                )),
            };
        }
        let starts = if in_issu {
            &mut self.issu_mut().repair_starts
        } else {
            &mut self.st.repair_starts
        };
        *starts += 1;
        if *starts > self.st.config.max_repair_starts {
            return Prog::Fail(format!(
                "started {} instances of {} without getting one in sync; {}",
                self.st.config.max_repair_starts,
                image.version,
                self.describe()
            ));
        }
        let id = self.new_instance(app, image.clone(), out);
        if designated {
            if let Some(i) = self.inst_mut(id) {
                i.role = Role::HaStandby;
            }
        }
        Prog::Wait
    }

    // ---------------------------------------------------------------- helpers

    fn ensure_started(
        &mut self,
        slot: fn(&mut Slots) -> &mut Option<InstanceId>,
        app: ApplianceId,
        image: &ImageRef,
        out: &mut Vec<Command>,
    ) -> Prog {
        let existing = *slot(&mut self.issu_mut().slots);
        match existing {
            None => {
                if !self.st.pair.is_up(app) {
                    return Prog::Fail(format!("the {app} appliance is down"));
                }
                let id = self.new_instance(app, image.clone(), out);
                *slot(&mut self.issu_mut().slots) = Some(id);
                Prog::Wait
            }
            Some(id) => match self.inst(id).map(|i| i.state) {
                Some(InstanceState::Starting) => Prog::Wait,
                Some(s) if s.is_up() => Prog::Done,
                _ => Prog::Fail(format!("new instance {id} did not start")),
            },
        }
    }

    fn ensure_synced(
        &mut self,
        id: Option<InstanceId>,
        designated: bool,
        out: &mut Vec<Command>,
    ) -> Prog {
        let Some(id) = id else {
            return Prog::Fail("missing instance".into());
        };
        let Some(active) = self.st.pair.control().map(|c| c.id) else {
            return Prog::Wait;
        };
        let Some(inst) = self.inst(id).cloned() else {
            return Prog::Fail(format!("unknown instance {id}"));
        };
        let want_role = if designated {
            Role::HaStandby
        } else {
            Role::LocalStandby
        };
        match inst.state {
            InstanceState::Starting => Prog::Wait,
            InstanceState::Running => {
                self.attach(id, active, designated, out);
                Prog::Wait
            }
            InstanceState::Syncing => Prog::Wait,
            InstanceState::Ready if inst.role == want_role => Prog::Done,
            InstanceState::Ready => {
                self.attach(id, active, designated, out);
                Prog::Wait
            }
            _ => Prog::Fail(format!("instance {id} is {:?}", inst.state)),
        }
    }

    fn ensure_stopped(&mut self, id: Option<InstanceId>, out: &mut Vec<Command>) -> Prog {
        let Some(id) = id else {
            return Prog::Fail("missing instance".into());
        };
        match self.inst(id).map(|i| i.state) {
            Some(InstanceState::Stopped) | None => Prog::Done,
            Some(InstanceState::Stopping) => Prog::Wait,
            Some(InstanceState::Failed) => Prog::Fail(format!("instance {id} failed")),
            Some(_) => {
                if Some(id) == self.st.pair.in_control {
                    return Prog::Fail(format!("refusing to stop {id}: it is in control"));
                }
                self.stop(id, out);
                Prog::Wait
            }
        }
    }

    fn ensure_switched(&mut self, to: Option<InstanceId>, out: &mut Vec<Command>) -> Prog {
        let Some(to) = to else {
            return Prog::Fail("missing instance".into());
        };
        if self.st.pair.in_control == Some(to) {
            return Prog::Done;
        }
        if self.st.pending.is_some() {
            return Prog::Wait;
        }
        let Some(from) = self.st.pair.control().map(|c| c.id) else {
            return Prog::Wait;
        };
        match self.inst(to).map(|i| i.state) {
            Some(InstanceState::Ready) => {}
            Some(InstanceState::Syncing) => return Prog::Wait,
            _ => return Prog::Fail(format!("switch target {to} is not in sync")),
        }
        if !self.ha_protected() {
            return Prog::Wait;
        }
        let epoch = self.alloc_epoch();
        out.push(Command::SwitchControl { from, to, epoch });
        self.st.pending = Some(PendingSwitch {
            from: Some(from),
            to,
            epoch,
            planned: true,
        });
        Prog::Wait
    }

    /// A `Ready` synchronous standby exists on the appliance not holding control.
    fn ha_protected(&self) -> bool {
        let Some(c) = self.st.pair.control() else {
            return false;
        };
        self.st
            .pair
            .live_on(c.appliance.other())
            .any(|i| i.role == Role::HaStandby && i.state == InstanceState::Ready)
    }

    fn new_instance(
        &mut self,
        app: ApplianceId,
        image: ImageRef,
        out: &mut Vec<Command>,
    ) -> InstanceId {
        let id = InstanceId(self.st.next_id);
        self.st.next_id += 1;
        self.st.pair.instances.push(Instance::new(
            id,
            app,
            image.clone(),
            InstanceState::Starting,
            Role::Spare,
        ));
        out.push(Command::StartInstance {
            instance: id,
            appliance: app,
            image,
        });
        id
    }

    fn attach(
        &mut self,
        id: InstanceId,
        active: InstanceId,
        designated: bool,
        out: &mut Vec<Command>,
    ) {
        if let Some(i) = self.inst_mut(id) {
            i.state = InstanceState::Syncing;
            i.role = if designated {
                Role::HaStandby
            } else {
                Role::LocalStandby
            };
        }
        out.push(Command::AttachStandby {
            standby: id,
            active,
            designated_ha: designated,
        });
    }

    fn stop(&mut self, id: InstanceId, out: &mut Vec<Command>) {
        if let Some(i) = self.inst_mut(id) {
            i.state = InstanceState::Stopping;
            i.role = Role::Spare;
        }
        out.push(Command::StopInstance { instance: id });
    }

    fn alloc_epoch(&mut self) -> ControlEpoch {
        self.st.max_epoch = self.st.max_epoch.max(self.st.pair.epoch).next();
        self.st.max_epoch
    }

    fn begin_rollback_if_forward(&mut self, reason: String, out: &mut Vec<Command>) {
        if matches!(self.step(), Some(s) if s != Step::Rollback) {
            self.begin_rollback(reason, out);
        }
    }

    fn begin_rollback(&mut self, reason: String, out: &mut Vec<Command>) {
        let now = self.st.now;
        let Some(issu) = self.st.issu.as_mut() else {
            return;
        };
        if issu.step == Step::Rollback {
            return;
        }
        issu.step = Step::Rollback;
        issu.step_entered = now;
        issu.rollback_deadline = None;
        issu.rollback_reason = Some(reason.clone());
        issu.verify_sent = false;
        out.push(report(Report::Step {
            step: Step::Rollback,
            detail: reason,
        }));
        self.st.retried = false;
    }

    fn set_stuck(&mut self, reason: String, resume_with: &str, out: &mut Vec<Command>) {
        let stuck = Stuck {
            reason,
            resume_with: resume_with.to_string(),
        };
        out.push(report(Report::Stuck(stuck.clone())));
        self.st.stuck = Some(stuck);
        self.st.deadline = None;
    }

    /// One-line description of the pair for stuck reports.
    fn describe(&self) -> String {
        let p = &self.st.pair;
        let ctl = match p.control() {
            Some(c) => format!(
                "{} ({} on {}) is in control at {}",
                c.id,
                c.version(),
                c.appliance,
                p.epoch
            ),
            None => "no instance is in control".to_string(),
        };
        let others: Vec<String> = p
            .instances
            .iter()
            .filter(|i| Some(i.id) != p.in_control && i.state != InstanceState::Stopped)
            .map(|i| {
                format!(
                    "{} {} {} {:?}/{:?}",
                    i.id,
                    i.appliance,
                    i.version(),
                    i.state,
                    i.role
                )
            })
            .collect();
        let down: Vec<&str> = ApplianceId::ALL
            .iter()
            .filter(|a| !p.is_up(**a))
            .map(|a| a.name())
            .collect();
        format!(
            "{ctl}; others: [{}]; appliances down: [{}]",
            others.join(", "),
            down.join(", ")
        )
    }

    fn waiting_on(&self) -> String {
        let mut w: Vec<String> = Vec::new();
        if let Some(p) = &self.st.pending {
            w.push(format!("control change to {} at {}", p.to, p.epoch));
        }
        for i in &self.st.pair.instances {
            let what = match i.state {
                InstanceState::Starting => "start",
                InstanceState::Syncing => "sync",
                InstanceState::Stopping => "stop",
                _ => continue,
            };
            w.push(format!("{what} of {}", i.id));
        }
        if self.step() == Some(Step::Precheck) {
            w.push("HA standby verification".into());
        }
        if w.is_empty() {
            "nothing".into()
        } else {
            w.join(", ")
        }
    }

    /// Timer bound for what is in flight; `None` when nothing is awaited.
    fn bound_opt(&self) -> Option<u64> {
        let c = &self.st.config;
        let mut b: Option<u64> = None;
        let mut add = |x: u64| b = Some(b.map_or(x, |y: u64| y.max(x)));
        if self.st.pending.is_some() {
            add(c.switch_timeout);
        }
        for i in &self.st.pair.instances {
            if !self.st.pair.is_up(i.appliance) {
                continue;
            }
            match i.state {
                InstanceState::Starting => add(c.start_timeout),
                InstanceState::Syncing => add(c.sync_timeout),
                InstanceState::Stopping => add(c.stop_timeout),
                _ => {}
            }
        }
        if let Some(issu) = &self.st.issu {
            if issu.step == Step::Precheck && !issu.verified {
                add(c.verify_timeout);
            }
        }
        b
    }

    fn bound(&self) -> u64 {
        self.bound_opt().unwrap_or(self.st.config.switch_timeout)
    }

    /// Resets the step timer when progress was made; clears it when nothing is awaited.
    fn update_timer(&mut self) {
        let mark = self.progress_fingerprint();
        let bound = self.bound_opt();
        if self.st.stuck.is_some() {
            self.st.deadline = None;
        } else if mark != self.st.progress_mark || self.st.deadline.is_none() {
            self.st.progress_mark = mark;
            self.st.retried = false;
            self.st.deadline = bound.map(|b| self.st.now + b);
        }
        if bound.is_none() {
            self.st.deadline = None;
        }
    }

    fn progress_fingerprint(&self) -> u64 {
        // FNV-1a over the observable progress.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut mix = |x: u64| {
            for b in x.to_le_bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        };
        mix(self.step().map_or(99, |s| s as u64));
        mix(self.st.pair.in_control.map_or(0, |i| i.0));
        mix(self.st.pending.as_ref().map_or(0, |p| p.epoch.0));
        for i in &self.st.pair.instances {
            mix(i.id.0);
            mix(i.state as u64);
            mix(i.role as u64);
        }
        h
    }

    fn issu_mut(&mut self) -> &mut IssuState {
        self.st.issu.as_mut().expect("an ISSU is running")
    }

    fn inst(&self, id: InstanceId) -> Option<&Instance> {
        self.st.pair.get(id)
    }

    fn inst_mut(&mut self, id: InstanceId) -> Option<&mut Instance> {
        self.st.pair.get_mut(id)
    }

    fn set_state(&mut self, id: InstanceId, s: InstanceState) {
        if let Some(i) = self.inst_mut(id) {
            i.state = s;
        }
    }
}

fn report(progress: Report) -> Command {
    Command::Report { progress }
}

fn both(x: Prog, y: Prog) -> Prog {
    match (x, y) {
        (Prog::Fail(r), _) | (_, Prog::Fail(r)) => Prog::Fail(r),
        (Prog::Done, Prog::Done) => Prog::Done,
        _ => Prog::Wait,
    }
}

fn then(x: Prog, f: impl FnOnce() -> Prog) -> Prog {
    match x {
        Prog::Done => f(),
        other => other,
    }
}

fn p_wait(p: Prog) -> Prog {
    match p {
        Prog::Done => Prog::Wait,
        other => other,
    }
}

fn step_detail(step: Step) -> &'static str {
    match step {
        Step::Precheck => "verifying the HA standby's digest against the instance in control",
        Step::StartExtras => "starting a second instance of the running version on each appliance",
        Step::SyncExtras => "syncing the second instances",
        Step::PrimaryStartNew => {
            "replacing the first appliance's second instance with the target version"
        }
        Step::PrimarySyncNew => "waiting for the target instance to hold sufficient state",
        Step::PrimarySwitch => "switching control to the target version (new epoch)",
        Step::PrimaryMixed => {
            "soaking: target in control, the peer's running-version standby in sync"
        }
        Step::PrimaryUpgradeOld => "replacing the old instance with the target version",
        Step::PrimarySyncOld => "syncing it as local standby",
        Step::SecondaryStartNew => "replacing the peer's second instance with the target version",
        Step::SecondarySyncNew => "syncing it",
        Step::SecondarySwitch => "making it the synchronous HA standby",
        Step::SecondaryMixed => "soaking with mixed versions on the peer appliance",
        Step::SecondaryUpgradeOld => "replacing the peer's old instance with the target version",
        Step::SecondarySyncOld => "syncing it",
        Step::Retire => "stopping the extra instances",
        Step::AwaitCommit => {
            "every instance runs the target; waiting for commit (rollback still possible)"
        }
        Step::Rollback => "rolling back",
    }
}

fn validate(st: &EngineState) -> Result<(), EngineError> {
    let mut ids: Vec<u64> = st.pair.instances.iter().map(|i| i.id.0).collect();
    ids.sort_unstable();
    if ids.windows(2).any(|w| w[0] == w[1]) {
        return Err(EngineError::Inconsistent("duplicate instance ids".into()));
    }
    if ids.last().is_some_and(|m| *m >= st.next_id) {
        return Err(EngineError::Inconsistent(
            "next instance id is not above every existing id".into(),
        ));
    }
    let in_control = st
        .pair
        .instances
        .iter()
        .filter(|i| i.role == Role::InControl && i.state.is_up())
        .count();
    if in_control > 1 {
        return Err(EngineError::Inconsistent(
            "more than one instance is in control".into(),
        ));
    }
    if let Some(c) = st.pair.in_control {
        if st.pair.get(c).is_none() {
            return Err(EngineError::Inconsistent(format!(
                "instance in control {c} is not in the table"
            )));
        }
    }
    if st.max_epoch < st.pair.epoch {
        return Err(EngineError::Inconsistent(
            "highest allocated epoch is below the current epoch".into(),
        ));
    }
    Ok(())
}
