//! Operator commands: pre-checks, abort, rollback, commit, the rollback timer.
mod common;

use hitless_core::engine::{Command, Event, Report, Step};
use hitless_core::sim::{self, FaultSpec, SimResult};
use hitless_core::{CompatVerdict, ImageRef, Version};

fn target() -> ImageRef {
    ImageRef::new("appliance-os", Version::new(1, 1, 0))
}

fn verdict(up: bool, down: bool) -> Event {
    Event::Compatibility {
        verdict: CompatVerdict {
            from: Version::new(1, 0, 0),
            to: Version::new(1, 1, 0),
            upgrade_ok: up,
            downgrade_ok: down,
            detail: "test".into(),
        },
    }
}

fn rejected(cmds: &[Command]) -> Option<String> {
    cmds.iter().find_map(|c| match c {
        Command::Report {
            progress: Report::Rejected { reason, .. },
        } => Some(reason.clone()),
        _ => None,
    })
}

#[test]
fn start_is_refused_without_a_two_way_compatibility_verdict() {
    let mut e = common::engine();
    let r = rejected(&e.handle(Event::Start { target: target() })).expect("refused");
    assert!(r.contains("compatibility"), "{r}");
    e.handle(verdict(true, false));
    let r = rejected(&e.handle(Event::Start { target: target() })).expect("refused");
    assert!(r.contains("both ways"), "{r}");
    assert_eq!(e.step(), None);
    e.handle(verdict(true, true));
    assert!(rejected(&e.handle(Event::Start { target: target() })).is_none());
    assert_eq!(e.step(), Some(Step::Precheck));
    let r = rejected(&e.handle(Event::Start { target: target() })).expect("refused");
    assert!(r.contains("already running"), "{r}");
}

#[test]
fn start_is_refused_when_the_ha_standby_is_not_in_sync_or_an_appliance_is_down() {
    let mut e = common::engine();
    e.handle(verdict(true, true));
    e.handle(Event::StandbyOutOfSync {
        instance: hitless_core::InstanceId(2),
    });
    let r = rejected(&e.handle(Event::Start { target: target() })).expect("refused");
    assert!(r.contains("HA standby"), "{r}");
}

#[test]
fn commit_and_abort_are_refused_at_the_wrong_steps_and_say_why() {
    let mut e = common::engine();
    let r = rejected(&e.handle(Event::Commit)).expect("refused");
    assert!(r.contains("no ISSU"), "{r}");
    e.handle(verdict(true, true));
    e.handle(Event::Start { target: target() });
    let r = rejected(&e.handle(Event::Commit)).expect("refused");
    assert!(r.contains("await-commit"), "{r}");
    assert!(e.status().can_abort);
}

#[test]
fn abort_after_the_switch_is_refused_and_the_issu_commits() {
    let f = FaultSpec::parse("abort@primary-mixed").unwrap();
    let r = sim::run(Some(&f));
    assert!(r
        .steps
        .iter()
        .any(|s| s.note.starts_with("rejected abort") && s.note.contains("use rollback")));
    assert_eq!(r.result, SimResult::Committed);
}

#[test]
fn rollback_after_the_primary_is_done_reverts_to_n() {
    let f = FaultSpec::parse("rollback@secondary-start-new").unwrap();
    let r = sim::run(Some(&f));
    assert_eq!(r.result, SimResult::RolledBack);
    assert_eq!(r.final_control.version, "1.0.0");
    assert!(r.final_layout_ok);
    assert_eq!(r.reason.as_deref(), Some("operator rollback"));
}

#[test]
fn rollback_timer_reverts_unless_committed() {
    let f = FaultSpec::parse("timeout@await-commit").unwrap();
    let r = sim::run(Some(&f));
    assert_eq!(r.result, SimResult::RolledBack);
    assert_eq!(
        r.reason.as_deref(),
        Some("rollback timer expired before commit")
    );
    assert_eq!(r.final_control.version, "1.0.0");
}

#[test]
fn rollback_after_commit_is_refused_point_of_no_return() {
    let r = sim::run(None);
    assert_eq!(r.result, SimResult::Committed);
    let mut e = common::engine();
    let r = rejected(&e.handle(Event::Rollback)).expect("refused");
    assert!(r.contains("no ISSU"), "{r}");
}

#[test]
fn status_reports_phase_step_and_point_of_no_return() {
    let mut e = common::engine();
    e.handle(verdict(true, true));
    e.handle(Event::Start { target: target() });
    let s = e.status();
    assert_eq!(s.phase, "issu");
    assert_eq!(s.step.as_deref(), Some("precheck"));
    assert_eq!(s.procedure_step, Some(1));
    assert!(s.point_of_no_return.contains("not reached"));
    assert_eq!(s.in_control, Some(hitless_core::InstanceId(1)));
    assert_eq!(s.instances.len(), 2);
    let json = serde_json::to_string(&s).unwrap();
    assert!(json.contains("\"precheck\""));
}
