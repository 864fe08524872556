//! The engine's serializable state (journalled) and its configuration.
//!
//! Fields whose Rust name carries a unit (`*_tick`, `*_ticks`) keep their serialized name of
//! the previous release (`#[serde(rename)]`): both releases of a mixed agent pair read each
//! other's journal records.

use serde::{Deserialize, Serialize};

use crate::domain::{ApplianceId, ControlEpoch, ImageRef, InstanceId, Pair, Role};
use crate::witness::{WitnessChange, WitnessRecord};

use super::{CompatVerdict, Outcome, Step, Stuck};

/// Per-step bounds (in ticks) and policy knobs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineConfig {
    /// Bound for `StartInstance` to be confirmed.
    #[serde(rename = "start_timeout")]
    pub start_timeout_ticks: u64,
    /// Bound for an attached standby to reach sufficient state.
    #[serde(rename = "sync_timeout")]
    pub sync_timeout_ticks: u64,
    /// Bound for a `SwitchControl` / `Failover` to be confirmed.
    #[serde(rename = "switch_timeout")]
    pub switch_timeout_ticks: u64,
    /// Bound for `StopInstance` to be confirmed.
    #[serde(rename = "stop_timeout")]
    pub stop_timeout_ticks: u64,
    /// Bound for `VerifyStandby` to be answered.
    #[serde(rename = "verify_timeout")]
    pub verify_timeout_ticks: u64,
    /// Soak time with the new version in control and the old one still available.
    pub soak_ticks: u64,
    /// Reverts unless committed this many ticks after control first moves to N+1.
    #[serde(rename = "rollback_timer")]
    pub rollback_timer_ticks: Option<u64>,
    /// Largest replication lag (mutations) accepted as sufficient state.
    pub max_lag: u64,
    /// Largest number of live instances on one appliance.
    pub max_instances_per_appliance: usize,
    /// How many times a standby may be re-attached after falling out of sync.
    pub max_resyncs: u32,
    /// How many instances the rollback/repair reconciler may start before asking the operator.
    pub max_repair_starts: u32,
    /// A witness decides every control change and every standby given up (see
    /// [`crate::witness`]); without one a partition can lose acknowledged writes.
    /// (Not written when off: a journal record reads the same in the previous release.)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub witness: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            start_timeout_ticks: 20,
            sync_timeout_ticks: 30,
            switch_timeout_ticks: 10,
            stop_timeout_ticks: 10,
            verify_timeout_ticks: 10,
            soak_ticks: 5,
            rollback_timer_ticks: Some(600),
            max_lag: 16,
            max_instances_per_appliance: 2,
            max_resyncs: 3,
            max_repair_starts: 4,
            witness: false,
        }
    }
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
    #[serde(rename = "step_entered")]
    pub step_entered_tick: u64,
    /// Instances by procedure role.
    pub slots: Slots,
    /// `VerifyStandby` issued in `precheck`.
    pub verify_sent: bool,
    /// The HA standby's digest was verified in `precheck`.
    pub verified: bool,
    /// Reverts at this tick unless committed.
    #[serde(rename = "rollback_deadline")]
    pub rollback_deadline_tick: Option<u64>,
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
    #[serde(rename = "now")]
    pub now_tick: u64,
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
    #[serde(rename = "deadline")]
    pub deadline_tick: Option<u64>,
    /// The in-flight commands were already re-issued once for the current deadline.
    pub retried: bool,
    /// Fingerprint of the observable progress, to reset the step timer.
    pub progress_mark: u64,
    /// Repair starts in steady state (bounded).
    pub repair_starts: u32,
    /// What the engine knows of the witness (with [`EngineConfig::witness`]; not written
    /// while empty).
    #[serde(default, skip_serializing_if = "WitnessState::is_empty")]
    pub witness: WitnessState,
    /// A failover to this instance failed (its appliance unreachable, say) or the witness
    /// refused it: no failover to it starts again before this tick (another candidate may).
    /// One that fails at once is retried every
    /// [`FAILOVER_RETRY_TICKS`](super::FAILOVER_RETRY_TICKS), not in a loop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover_hold: Option<(InstanceId, u64)>,
}

/// The engine's view of the witness.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WitnessState {
    /// The record as of the last answer.
    pub known: Option<WitnessRecord>,
    /// The change asked and not yet answered (one at a time; re-sent as it is until answered).
    pub inflight: Option<WitnessChange>,
    /// The inflight change was not answered: re-send it at the next tick.
    pub resend: bool,
    /// The pending control change was granted by the witness (its command was issued).
    pub granted: bool,
    /// The witness names another instance in control at a later epoch: this engine no longer
    /// drives.
    pub deposed: Option<WitnessRecord>,
}

impl WitnessState {
    /// Nothing known, nothing asked.
    pub fn is_empty(&self) -> bool {
        *self == WitnessState::default()
    }
}

/// Errors from [`Engine::restore`](super::Engine::restore) and [`Engine::new`](super::Engine::new).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The snapshot is internally inconsistent.
    #[error("engine state is inconsistent: {0}")]
    Inconsistent(String),
}

pub(super) fn validate(st: &EngineState) -> Result<(), EngineError> {
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
