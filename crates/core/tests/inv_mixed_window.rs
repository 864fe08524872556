//! Invariant: every mixed-version window has an in-sync standby on the other appliance.
mod common;

use hitless_core::engine::{Event, Step};
use hitless_core::invariants::{check_state, Invariant};
use hitless_core::sim;
use hitless_core::{ImageRef, InstanceState, Version};

#[test]
fn holds_across_the_fault_matrix() {
    let bad = common::matrix_violations(Invariant::MixedWindowProtected);
    assert!(bad.is_empty(), "{bad:#?}");
}

#[test]
fn the_no_fault_run_does_have_mixed_windows() {
    // Otherwise the invariant would hold vacuously.
    let r = sim::run(None);
    let mixed = |v: &Vec<String>| {
        let mut vs: Vec<&str> = v.iter().map(|s| s.split(':').nth(1).unwrap()).collect();
        vs.dedup();
        vs.len() > 1
    };
    assert!(
        r.steps.iter().any(|s| mixed(&s.primary)),
        "primary never mixed"
    );
    assert!(
        r.steps.iter().any(|s| mixed(&s.secondary)),
        "secondary never mixed"
    );
}

#[test]
fn detects_an_unprotected_mixed_window() {
    let mut e = common::engine();
    e.handle(Event::Compatibility {
        verdict: hitless_core::CompatVerdict {
            from: Version::new(1, 0, 0),
            to: Version::new(1, 1, 0),
            upgrade_ok: true,
            downgrade_ok: true,
            detail: String::new(),
        },
    });
    e.handle(Event::Start {
        target: ImageRef::new("appliance-os", Version::new(1, 1, 0)),
    });
    assert_eq!(e.step(), Some(Step::Precheck));
    let mut st = e.snapshot();
    // A target-version instance on the primary and the secondary's standby out of sync.
    let mut extra = st.pair.instances[0].clone();
    extra.id = hitless_core::InstanceId(9);
    extra.image.version = Version::new(1, 1, 0);
    extra.role = hitless_core::Role::Spare;
    st.pair.instances.push(extra);
    assert!(check_state(&st).is_empty());
    st.pair.instances[1].state = InstanceState::Syncing;
    assert!(check_state(&st)
        .iter()
        .any(|v| v.invariant == Invariant::MixedWindowProtected));
}
