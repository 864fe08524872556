//! Invariant: at most one instance in control per epoch.
mod common;

use hitless_core::engine::Command;
use hitless_core::invariants::{check_state, Invariant};
use hitless_core::{ControlEpoch, InstanceId, Role};

#[test]
fn holds_across_the_fault_matrix() {
    let bad = common::matrix_violations(Invariant::SingleControlPerEpoch);
    assert!(bad.is_empty(), "{bad:#?}");
}

#[test]
fn detects_two_instances_in_control() {
    let e = common::engine();
    let mut st = common::state(&e);
    st.pair.instances[1].role = Role::InControl;
    st.pair.instances[1].state = hitless_core::InstanceState::Running;
    assert!(check_state(&st)
        .iter()
        .any(|v| v.invariant == Invariant::SingleControlPerEpoch));
}

#[test]
fn detects_an_epoch_given_to_two_instances() {
    let e = common::engine();
    let mut c = common::checker_for(&e);
    let st = common::state(&e);
    // Epoch 1 belongs to i1; handing it to i2 is a violation.
    let v = c.observe(
        &st,
        &[Command::Failover {
            to: InstanceId(2),
            epoch: ControlEpoch(1),
        }],
    );
    assert!(
        v.iter()
            .any(|v| v.invariant == Invariant::SingleControlPerEpoch),
        "{v:?}"
    );
}
