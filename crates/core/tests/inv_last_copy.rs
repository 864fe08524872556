//! Invariant: no command destroys the last in-sync copy of state.
mod common;

use hitless_core::engine::Command;
use hitless_core::invariants::Invariant;
use hitless_core::InstanceId;

#[test]
fn holds_across_the_fault_matrix() {
    let bad = common::matrix_violations(Invariant::LastCopyPreserved);
    assert!(bad.is_empty(), "{bad:#?}");
}

#[test]
fn detects_stopping_the_instance_in_control() {
    let e = common::engine();
    let mut c = common::checker_for(&e);
    let v = c.observe(
        &e.snapshot(),
        &[Command::StopInstance {
            instance: InstanceId(1),
        }],
    );
    assert!(
        v.iter()
            .any(|v| v.invariant == Invariant::LastCopyPreserved),
        "{v:?}"
    );
}

#[test]
fn detects_stopping_the_only_synchronous_standby() {
    let e = common::engine();
    let mut c = common::checker_for(&e);
    let mut st = e.snapshot();
    st.pair.instances[1].state = hitless_core::InstanceState::Stopping;
    let v = c.observe(
        &st,
        &[Command::StopInstance {
            instance: InstanceId(2),
        }],
    );
    assert!(
        v.iter()
            .any(|v| v.invariant == Invariant::LastCopyPreserved),
        "{v:?}"
    );
}
