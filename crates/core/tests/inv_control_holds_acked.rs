//! Invariant: control only moves to an instance holding every acknowledged mutation.
mod common;

use hitless_core::engine::Command;
use hitless_core::invariants::{check_promotion, Invariant};
use hitless_core::sim::{self, fault_catalog};
use hitless_core::{ControlEpoch, InstanceId, InstanceState};

#[test]
fn holds_across_the_fault_matrix_and_nothing_acknowledged_is_lost() {
    let bad = common::matrix_violations(Invariant::ControlHoldsAcked);
    assert!(bad.is_empty(), "{bad:#?}");
    for f in fault_catalog() {
        let r = sim::run(Some(&f));
        if f.kind.is_split() {
            // Without a witness a split may lose writes, only the ones its prediction covers
            // (sim_partition_losses_are_counted.rs).
            assert_eq!(r.acked_lost, r.lost_without_witness, "{f}");
        } else {
            assert_eq!(r.acked_lost, 0, "{f}");
        }
        assert!(r.acked > 0, "{f}: no write was acknowledged");
    }
}

#[test]
fn world_check_flags_a_promotion_behind_the_acked_sequence() {
    assert!(check_promotion(InstanceId(3), 10, 10).is_none());
    let v = check_promotion(InstanceId(3), 9, 10).unwrap();
    assert_eq!(v.invariant, Invariant::ControlHoldsAcked);
}

#[test]
fn engine_check_flags_failover_to_a_standby_not_in_sync() {
    let e = common::engine();
    let mut c = common::checker_for(&e);
    let mut st = common::state(&e);
    st.pair.instances[1].state = InstanceState::Syncing;
    let v = c.observe(
        &st,
        &[Command::Failover {
            to: InstanceId(2),
            epoch: ControlEpoch(2),
        }],
    );
    assert!(
        v.iter()
            .any(|v| v.invariant == Invariant::ControlHoldsAcked),
        "{v:?}"
    );
}
