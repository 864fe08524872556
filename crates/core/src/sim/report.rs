//! What a simulated ISSU reports: its result, where control ended, the timeline, and every
//! invariant violation seen.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::domain::{ControlEpoch, Instance, InstanceId};
use crate::engine::{EngineState, Outcome, Report};
use crate::invariants::Violation;

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
    /// Final layout is one instance per appliance: control plus an in-sync HA standby on the
    /// other appliance, same version.
    pub final_layout_ok: bool,
    /// Ticks simulated.
    pub ticks: u64,
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
    use super::{SimResult, SimViolation};
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
}
