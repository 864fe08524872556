//! Outputs of the engine: commands to execute and reports for the operator.

use serde::{Deserialize, Serialize};

use crate::domain::{ApplianceId, ControlEpoch, ImageRef, InstanceId, Version};
use crate::witness::WitnessChange;

use super::Step;

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
    /// The operator command that resumes, one of [`RESUME_COMMANDS`]: `hitless <resume_with>`
    /// runs as written.
    pub resume_with: String,
    /// What the operator does before running it, if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first: Option<String>,
}

/// Every operator command a [`Stuck`] report may name (each a `hitless` subcommand and a
/// `POST /v1/<command>` of the agent's API).
pub const RESUME_COMMANDS: [&str; 2] = ["resume", "rollback"];

impl Stuck {
    /// The hint as the CLI prints it: the command, then what to do first.
    pub fn hint(&self) -> String {
        match &self.first {
            Some(first) => format!("`hitless {}` after {first}", self.resume_with),
            None => format!("`hitless {}`", self.resume_with),
        }
    }
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
/// restart, see [`Engine::in_flight_commands`](super::Engine::in_flight_commands)) has the same effect as executing it once.
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
    /// Ask the witness for `change` (read, decide, compare-and-swap). Completes with
    /// `WitnessGranted`, `WitnessRefused` or `WitnessUnreachable`. Idempotent: a change that
    /// already landed is granted again.
    Witness {
        /// The change.
        change: WitnessChange,
    },
    /// The witness no longer counts `standby` as synchronous: tell `active` to stop waiting
    /// for its acknowledgements.
    StandbyGone {
        /// The instance in control.
        active: InstanceId,
        /// The standby given up.
        standby: InstanceId,
    },
    /// The witness names `in_control` at `epoch`, decided by the other appliance's agent:
    /// this engine's view is stale. The driver stops driving, gives up the service address
    /// and waits for the peer (which drives). The engine fenced its own instance in control
    /// first.
    StandDown {
        /// The epoch the witness records.
        epoch: ControlEpoch,
        /// The instance it records in control.
        in_control: Option<InstanceId>,
    },
    /// Progress report for the operator and the journal.
    Report {
        /// What happened.
        progress: Report,
    },
}

impl Command {
    /// Whether the command must run in order with the other such commands of a transition,
    /// one after the other: the commands that move control or take an instance away
    /// (`SwitchControl`, `Failover`, `Fence`, `StopInstance`). The others (`StartInstance`,
    /// `AttachStandby`, `VerifyStandby`, which wait for boots and syncs, and `Report`) may
    /// run beside them.
    pub fn must_run_in_order(&self) -> bool {
        match self {
            Command::SwitchControl { .. }
            | Command::Failover { .. }
            | Command::Fence { .. }
            | Command::StopInstance { .. }
            | Command::Witness { .. }
            | Command::StandDown { .. } => true,
            Command::StartInstance { .. }
            | Command::AttachStandby { .. }
            | Command::VerifyStandby { .. }
            | Command::StandbyGone { .. }
            | Command::Report { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Command;
    use crate::domain::{ApplianceId, ControlEpoch, ImageRef, InstanceId, Version};

    #[test]
    fn only_commands_that_move_control_or_remove_an_instance_run_in_order() {
        let i = InstanceId(1);
        let e = ControlEpoch(2);
        let in_order = [
            Command::SwitchControl {
                from: i,
                to: InstanceId(2),
                epoch: e,
            },
            Command::Failover { to: i, epoch: e },
            Command::Fence {
                instance: i,
                epoch: e,
            },
            Command::StopInstance { instance: i },
        ];
        let beside = [
            Command::StartInstance {
                instance: i,
                appliance: ApplianceId::Primary,
                image: ImageRef::new("appliance-os", Version::new(1, 0, 0)),
            },
            Command::AttachStandby {
                standby: i,
                active: InstanceId(2),
                designated_ha: true,
            },
            Command::VerifyStandby {
                standby: i,
                active: InstanceId(2),
            },
            Command::Report {
                progress: super::Report::Accepted {
                    request: "x".into(),
                },
            },
        ];
        assert!(in_order.iter().all(Command::must_run_in_order));
        assert!(!beside.iter().any(Command::must_run_in_order));
    }
}
