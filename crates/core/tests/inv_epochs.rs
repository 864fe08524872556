//! Invariant: epochs strictly increase.
mod common;

use hitless_core::engine::Command;
use hitless_core::invariants::Invariant;
use hitless_core::{ControlEpoch, InstanceId};

#[test]
fn holds_across_the_fault_matrix() {
    let bad = common::matrix_violations(Invariant::EpochsIncrease);
    assert!(bad.is_empty(), "{bad:#?}");
}

#[test]
fn detects_a_reused_or_lower_epoch() {
    let e = common::engine();
    let mut c = common::checker_for(&e);
    let st = common::state(&e);
    let first = c.observe(
        &st,
        &[Command::Failover {
            to: InstanceId(2),
            epoch: ControlEpoch(3),
        }],
    );
    assert!(first
        .iter()
        .all(|v| v.invariant != Invariant::EpochsIncrease));
    let second = c.observe(
        &st,
        &[Command::SwitchControl {
            from: InstanceId(2),
            to: InstanceId(1),
            epoch: ControlEpoch(2),
        }],
    );
    assert!(
        second
            .iter()
            .any(|v| v.invariant == Invariant::EpochsIncrease),
        "{second:?}"
    );
}

#[test]
fn detects_the_epoch_going_back() {
    let e = common::engine();
    let mut c = common::checker_for(&e);
    let mut st = common::state(&e);
    st.pair.epoch = ControlEpoch(5);
    st.max_epoch = ControlEpoch(5);
    assert!(c.observe(&st, &[]).is_empty());
    st.pair.epoch = ControlEpoch(4);
    let v = c.observe(&st, &[]);
    assert!(
        v.iter().any(|v| v.invariant == Invariant::EpochsIncrease),
        "{v:?}"
    );
}
