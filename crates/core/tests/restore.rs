//! Serialize -> restore of the engine state mid-ISSU resumes to the same end.

use hitless_core::engine::EngineState;
use hitless_core::sim::{self, FaultSpec, ScheduledFault, SimOptions, SimResult, Trigger};

fn roundtrip(st: &EngineState) -> EngineState {
    let json = serde_json::to_string(st).expect("serializes");
    serde_json::from_str(&json).expect("deserializes")
}

fn opts(fault: Option<&str>) -> SimOptions {
    SimOptions {
        faults: fault
            .map(|f| {
                let f = FaultSpec::parse(f).unwrap();
                ScheduledFault {
                    kind: f.kind,
                    trigger: Trigger::AtStep(f.step),
                }
            })
            .into_iter()
            .collect(),
        ..SimOptions::default()
    }
}

#[test]
fn restoring_at_any_tick_reaches_the_same_end() {
    for fault in [
        None,
        Some("crash-active@primary-mixed"),
        Some("rollback@secondary-mixed"),
    ] {
        let base = sim::run_with(&opts(fault));
        assert_ne!(base.result, SimResult::Incomplete);
        for at in (3..base.ticks).step_by(2) {
            let mut o = opts(fault);
            o.restore_at_tick = Some(at);
            o.restore_via = Some(roundtrip);
            let r = sim::run_with(&o);
            let case = format!("{fault:?} restored at tick {at}");
            assert!(
                r.steps.iter().any(|s| s.note.contains("restored")),
                "{case}: no restore happened"
            );
            assert_eq!(r.result, base.result, "{case}: {:?}", r.reason);
            assert_eq!(r.final_control, base.final_control, "{case}");
            assert_eq!(r.invariant_violations, 0, "{case}: {:?}", r.violations);
            assert_eq!(r.acked_lost, 0, "{case}");
            assert!(r.final_layout_ok, "{case}");
        }
    }
}

#[test]
fn engine_state_json_round_trips_exactly() {
    let mut o = opts(None);
    o.max_ticks = 25; // stop mid-ISSU
    let _ = sim::run_with(&o);
    // Build a mid-ISSU engine directly and round-trip its state.
    let mut e = hitless_core::Engine::new(
        Default::default(),
        hitless_core::Pair::steady(
            hitless_core::ImageRef::new("os", hitless_core::Version::new(1, 0, 0)),
            hitless_core::InstanceId(1),
            hitless_core::InstanceId(2),
            hitless_core::ControlEpoch(1),
        ),
    )
    .unwrap();
    e.handle(hitless_core::Event::Compatibility {
        verdict: hitless_core::CompatVerdict {
            from: hitless_core::Version::new(1, 0, 0),
            to: hitless_core::Version::new(2, 0, 0),
            upgrade_ok: true,
            downgrade_ok: true,
            detail: "ok".into(),
        },
    });
    e.handle(hitless_core::Event::Start {
        target: hitless_core::ImageRef::new("os", hitless_core::Version::new(2, 0, 0)),
    });
    let st = e.snapshot();
    assert_eq!(roundtrip(&st), st);
    let restored = hitless_core::Engine::restore(roundtrip(&st)).unwrap();
    assert_eq!(restored.status(), e.status());
    assert_eq!(restored.in_flight_commands(), e.in_flight_commands());
}

#[test]
fn restore_rejects_an_inconsistent_snapshot() {
    let e = hitless_core::Engine::new(
        Default::default(),
        hitless_core::Pair::steady(
            hitless_core::ImageRef::new("os", hitless_core::Version::new(1, 0, 0)),
            hitless_core::InstanceId(1),
            hitless_core::InstanceId(2),
            hitless_core::ControlEpoch(1),
        ),
    )
    .unwrap();
    let mut st = e.snapshot();
    st.pair.instances[1].id = hitless_core::InstanceId(1);
    assert!(hitless_core::Engine::restore(st).is_err());
    let mut st = e.snapshot();
    st.next_id = 1;
    assert!(hitless_core::Engine::restore(st).is_err());
}

/// A snapshot journalled by the release before the tick fields carried their unit in their
/// names (`now`, `deadline`, `start_timeout`, `step_entered`, ...): taken at tick 24 of the
/// simulated ISSU, in `primary-upgrade-old`.
const PREVIOUS_RELEASE_SNAPSHOT: &str = include_str!("fixtures/engine_state_untyped_ticks.json");

#[test]
fn a_snapshot_journalled_by_the_previous_release_restores() {
    let st: hitless_core::EngineState =
        serde_json::from_str(PREVIOUS_RELEASE_SNAPSHOT).expect("the old field names load");
    assert_eq!(st.now_tick, 24);
    assert_eq!(st.deadline_tick, Some(34));
    assert_eq!(st.config.start_timeout_ticks, 20);
    assert_eq!(st.config.sync_timeout_ticks, 30);
    assert_eq!(st.config.switch_timeout_ticks, 10);
    assert_eq!(st.config.stop_timeout_ticks, 10);
    assert_eq!(st.config.verify_timeout_ticks, 10);
    assert_eq!(st.config.rollback_timer_ticks, Some(150));
    let issu = st.issu.as_ref().expect("an ISSU runs");
    assert_eq!(issu.step, hitless_core::Step::PrimaryUpgradeOld);
    assert_eq!(issu.step_entered_tick, 24);
    assert_eq!(issu.rollback_deadline_tick, Some(169));
    // It restores, and what it writes now loads back unchanged.
    let e = hitless_core::Engine::restore(st.clone()).expect("consistent");
    let written = serde_json::to_string(e.state()).unwrap();
    let again: hitless_core::EngineState = serde_json::from_str(&written).unwrap();
    assert_eq!(again, st);
    // What it writes keeps the previous release's field names, so an agent of the previous
    // release reads this release's journal records (the peer mirror of a mixed agent pair).
    let old: serde_json::Value = serde_json::from_str(PREVIOUS_RELEASE_SNAPSHOT).unwrap();
    let new: serde_json::Value = serde_json::from_str(&written).unwrap();
    assert_eq!(new, old, "the serialized field names changed");
}
