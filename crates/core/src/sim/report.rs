//! What a simulated ISSU reports: its result, where control ended, the timeline, and every
//! invariant violation seen.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::domain::{ControlEpoch, Instance, InstanceId};
use crate::engine::{EngineState, Outcome, Report};
use crate::invariants::Violation;

use super::faults::FaultKind;

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
    pub epoch: ControlEpoch,
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
    pub result: SimResult,
    /// Why it rolled back, or why it is incomplete.
    pub reason: Option<String>,
    /// Where control ended.
    pub final_control: FinalControl,
    /// Final epoch.
    pub epoch: ControlEpoch,
    /// Number of invariant violations.
    pub invariant_violations: usize,
    /// The violations.
    pub violations: Vec<SimViolation>,
    /// Timeline.
    pub steps: Vec<TimelineEntry>,
    /// Acknowledged writes lost.
    pub acked_lost: u64,
    /// Acknowledged writes in total.
    pub acked: u64,
    /// Acknowledged writes lost because no witness exists, as the fault's prediction says
    /// ([`FaultKind::loss_without_witness`]); included in `acked_lost`.
    pub lost_without_witness: u64,
    /// What a split fault (a cut between the appliances, a paused agent) did.
    pub split: Option<SplitReport>,
    /// Final layout is one instance per appliance: control plus an in-sync HA standby on the
    /// other appliance, same version.
    pub final_layout_ok: bool,
    /// Ticks simulated.
    pub ticks: u64,
    /// Every change of the instance in control the simulated appliances carried out, in order.
    #[serde(default)]
    pub control_changes: Vec<ControlChange>,
    /// The witness's final record, with the witness (`None` without).
    #[serde(default)]
    pub witness: Option<String>,
}

/// A change of the instance in control, as an appliance carried it out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlChange {
    /// When.
    pub tick: u64,
    /// The new instance in control.
    pub to: InstanceId,
    /// Its epoch.
    pub epoch: ControlEpoch,
}

/// What a split fault did: how long two agents drove, who held the service address, what the
/// discarded side had acknowledged, and when the pair converged after the heal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitReport {
    /// Tick of the cut (or pause).
    pub cut_tick: u64,
    /// Tick of the heal.
    pub heal_tick: u64,
    /// Ticks during which both agents drove.
    pub split_ticks: u64,
    /// Most appliances holding the service address at once.
    pub address_holders_max: usize,
    /// When the clients first followed the other side's announcement, if they did.
    pub clients_moved_tick: Option<u64>,
    /// The appliance whose agent drives on after the heal.
    pub survivor: String,
    /// Writes the side discarded at the heal acknowledged after the cut (all lost).
    pub discarded_acks: u64,
    /// Ticks from the heal until one instance was in control, the address on its appliance
    /// only and an in-sync HA standby on the other appliance; `None`: never.
    pub converged_after_ticks: Option<u64>,
}

/// How a simulated ISSU ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SimResult {
    /// Every instance runs the target; committed.
    Committed,
    /// Back on the source version with an HA standby.
    RolledBack,
    /// Stuck, or not finished within the tick bound.
    Incomplete,
}

impl SimResult {
    /// The name in reports: `committed`, `rolled_back` or `incomplete`.
    pub fn name(self) -> &'static str {
        match self {
            SimResult::Committed => "committed",
            SimResult::RolledBack => "rolled_back",
            SimResult::Incomplete => "incomplete",
        }
    }
}

impl fmt::Display for SimResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Something that went wrong in a simulated run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum SimViolation {
    /// An invariant broken by an engine transition, or in the simulated world (a promotion
    /// that misses acknowledged writes, a stop of the instance serving clients).
    Invariant(Violation),
    /// At the end the engine and the world disagree on the instance in control.
    ControlMismatch {
        /// The engine's belief.
        engine: Option<InstanceId>,
        /// The world's.
        world: Option<InstanceId>,
    },
    /// The engine could not be restored from its snapshot.
    RestoreFailed {
        /// Why.
        error: String,
    },
    /// The events of one tick kept producing events beyond the loop's bound.
    EventLoopUnsettled,
    /// Acknowledged writes were lost that the fault's prediction does not cover (acknowledged
    /// with a standby, before the HA grace ended, or by a fault predicted to lose nothing).
    UnpredictedLoss {
        /// The fault.
        fault: FaultKind,
        /// How many writes.
        lost: u64,
    },
    /// With the witness, the side discarded at the heal acknowledged writes after the
    /// surviving side began to acknowledge: two instances acknowledged in the same window.
    Overlap {
        /// The fault.
        fault: FaultKind,
        /// The survivor's first acknowledgement after the cut.
        from_tick: u64,
        /// The discarded side's acknowledgements from then on.
        acks: u64,
    },
    /// After the heal the pair did not converge within the bound.
    NotConverged {
        /// Ticks waited since the heal.
        after_ticks: u64,
        /// One instance in control, serving, as the engine believes.
        control: bool,
        /// The service address on its appliance only.
        address: bool,
        /// An in-sync HA standby on the other appliance.
        ha_standby: bool,
    },
}

impl SimViolation {
    /// The invariant broken, if this is an invariant violation.
    pub fn invariant(&self) -> Option<crate::invariants::Invariant> {
        match self {
            SimViolation::Invariant(v) => Some(v.invariant),
            _ => None,
        }
    }
}

impl fmt::Display for SimViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SimViolation::Invariant(v) => v.fmt(f),
            SimViolation::ControlMismatch { engine, world } => write!(
                f,
                "engine believes {engine:?} is in control, the world says {world:?}"
            ),
            SimViolation::RestoreFailed { error } => write!(f, "restore failed: {error}"),
            SimViolation::EventLoopUnsettled => f.write_str("event loop did not settle"),
            SimViolation::Overlap {
                fault,
                from_tick,
                acks,
            } => write!(
                f,
                "{}: the discarded side acknowledged {acks} time(s) after the survivor began to acknowledge at tick {from_tick}",
                fault.name()
            ),
            SimViolation::UnpredictedLoss { fault, lost } => write!(
                f,
                "{lost} acknowledged write(s) lost that {} is not predicted to lose",
                fault.name()
            ),
            SimViolation::NotConverged {
                after_ticks,
                control,
                address,
                ha_standby,
            } => write!(
                f,
                "the pair did not converge {after_ticks} ticks after the heal \
                 (control: {control}, address: {address}, HA standby: {ha_standby})"
            ),
        }
    }
}

impl From<Violation> for SimViolation {
    fn from(v: Violation) -> Self {
        SimViolation::Invariant(v)
    }
}

/// The timeline note for an engine report; `None` for the ones the timeline leaves out.
pub(super) fn note(progress: &Report) -> Option<String> {
    Some(match progress {
        Report::Step { step, detail } => format!("{step}: {detail}"),
        Report::Stuck(s) => format!("stuck: {} (resume with {})", s.reason, s.hint()),
        Report::Finished(Outcome::Committed { version }) => {
            format!("finished: committed {version}")
        }
        Report::Finished(Outcome::RolledBack { version, reason }) => {
            format!("finished: rolled back to {version} ({reason})")
        }
        Report::ControlMoved { to, epoch, version } => {
            format!("control -> {to} ({version}) at {epoch}")
        }
        Report::Rejected { request, reason } => format!("rejected {request}: {reason}"),
        Report::Accepted { .. } => return None,
    })
}

/// The result of the run from the engine's final state, and why (for a rollback or an
/// incomplete run). `started`: the operator's `start` was fed.
pub(super) fn result_of(st: &EngineState, started: bool) -> (SimResult, Option<String>) {
    match (&st.issu, &st.last_outcome, &st.stuck) {
        (_, _, Some(s)) => (
            SimResult::Incomplete,
            Some(format!("{} (resume with {})", s.reason, s.hint())),
        ),
        (None, Some(Outcome::Committed { .. }), _) if started => (SimResult::Committed, None),
        (None, Some(Outcome::RolledBack { reason, .. }), _) if started => {
            (SimResult::RolledBack, Some(reason.clone()))
        }
        _ => (
            SimResult::Incomplete,
            Some("did not finish within the tick bound".to_string()),
        ),
    }
}

/// The final control recorded in the report.
pub(super) fn final_control(control: Option<&Instance>) -> FinalControl {
    FinalControl {
        appliance: control
            .map(|c| c.appliance.name().to_string())
            .unwrap_or_default(),
        version: control.map(|c| c.version().to_string()).unwrap_or_default(),
    }
}

/// Role column of the timeline.
pub(super) fn role_name(i: &Instance) -> &'static str {
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

#[cfg(test)]
mod tests {
    use super::{FaultKind, SimResult, SimViolation};
    use crate::domain::InstanceId;
    use crate::invariants::{Invariant, Violation};

    #[test]
    fn results_print_and_serialize_under_their_report_names() {
        for (r, name) in [
            (SimResult::Committed, "committed"),
            (SimResult::RolledBack, "rolled_back"),
            (SimResult::Incomplete, "incomplete"),
        ] {
            assert_eq!(r.to_string(), name);
            assert_eq!(serde_json::to_value(r).unwrap(), name);
        }
    }

    #[test]
    fn violations_print_as_the_report_lines() {
        let v = SimViolation::from(Violation {
            invariant: Invariant::LastCopyPreserved,
            detail: "stopped i3 while it served clients".into(),
        });
        assert_eq!(
            v.to_string(),
            "LastCopyPreserved: stopped i3 while it served clients"
        );
        assert_eq!(v.invariant(), Some(Invariant::LastCopyPreserved));
        let m = SimViolation::ControlMismatch {
            engine: Some(InstanceId(3)),
            world: None,
        };
        assert_eq!(
            m.to_string(),
            "engine believes Some(InstanceId(3)) is in control, the world says None"
        );
        assert_eq!(m.invariant(), None);
        assert_eq!(
            SimViolation::EventLoopUnsettled.to_string(),
            "event loop did not settle"
        );
    }

    #[test]
    fn split_violations_print_and_serialize_with_their_fields() {
        let u = SimViolation::UnpredictedLoss {
            fault: FaultKind::PauseAgent,
            lost: 2,
        };
        assert_eq!(
            u.to_string(),
            "2 acknowledged write(s) lost that pause-agent is not predicted to lose"
        );
        assert_eq!(u.invariant(), None);
        assert_eq!(
            serde_json::to_value(&u).unwrap(),
            serde_json::json!({"kind": "unpredicted-loss", "fault": "pause-agent", "lost": 2})
        );
        let n = SimViolation::NotConverged {
            after_ticks: 300,
            control: true,
            address: true,
            ha_standby: false,
        };
        assert_eq!(
            n.to_string(),
            "the pair did not converge 300 ticks after the heal \
             (control: true, address: true, HA standby: false)"
        );
        assert_eq!(serde_json::to_value(&n).unwrap()["kind"], "not-converged");
    }
}
