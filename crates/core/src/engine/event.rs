//! Inputs to the engine.

use serde::{Deserialize, Serialize};

use crate::domain::{ApplianceId, ControlEpoch, ImageRef, InstanceId, Version};
use crate::witness::{WitnessChange, WitnessRecord, WitnessRefusal};

use super::Step;

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
    /// The witness granted a change (completion of `Witness`): the record now.
    WitnessGranted {
        /// The change.
        change: WitnessChange,
        /// The record after it.
        record: WitnessRecord,
    },
    /// The witness refused a change (completion of `Witness`): someone else decided first.
    WitnessRefused {
        /// The change.
        change: WitnessChange,
        /// Why.
        refusal: WitnessRefusal,
    },
    /// The witness did not answer a change within the driver's bound; the engine asks again.
    WitnessUnreachable {
        /// The change.
        change: WitnessChange,
        /// What failed.
        detail: String,
    },
    /// A step exceeded its bound. The engine generates this itself from `Tick`; a driver may
    /// also inject it.
    StepTimeout {
        /// The step.
        step: Step,
    },
}
