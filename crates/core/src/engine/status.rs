//! What the engine is doing, for the operator (`hitless status`) and for stuck reports.

use serde::{Deserialize, Serialize};

use crate::domain::{ApplianceId, ControlEpoch, InstanceId, InstanceState, Role, Version};

use super::{Engine, Outcome, Step, Stuck};

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
    /// The witness's record as last answered, and what is asked of it (absent without a
    /// witness).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub witness: Option<String>,
}

impl Engine {
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
            witness: st.config.witness.then(|| {
                let known = st
                    .witness
                    .known
                    .as_ref()
                    .map_or("no record yet".to_string(), |r| r.to_string());
                match self.witness_waiting_on() {
                    Some(w) => format!("{known}; waiting for {w}"),
                    None => known,
                }
            }),
        }
    }

    /// One-line description of the pair for stuck reports.
    pub(super) fn describe(&self) -> String {
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

    pub(super) fn waiting_on(&self) -> String {
        let mut w: Vec<String> = Vec::new();
        if let Some(x) = self.witness_waiting_on() {
            w.push(x);
        }
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
}
