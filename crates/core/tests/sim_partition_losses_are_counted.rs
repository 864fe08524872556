//! Invariant: a split never hides a lost acknowledged write. Every write the side discarded at
//! the heal acknowledged is counted as lost, and each loss is one the fault's prediction covers
//! (acknowledged alone by the discarded side: by the instance in control at the cut only after
//! the HA grace, or by one promoted during the split); anything else is a violation.

use hitless_core::engine::Step;
use hitless_core::sim::{
    self, fault_catalog, FaultKind, FaultSpec, SimViolation, WitnessLoss, HA_GRACE_TICKS,
};

mod common;

use common::run_with_detector;

#[test]
fn every_loss_of_a_split_is_counted_and_predicted() {
    let mut failures = Vec::new();
    for f in fault_catalog().into_iter().filter(|f| f.kind.is_split()) {
        let r = sim::run(Some(&f));
        let s = r.split.clone().expect("a split report");
        let unpredicted = r
            .violations
            .iter()
            .any(|v| matches!(v, SimViolation::UnpredictedLoss { .. }));
        if unpredicted
            || r.acked_lost != s.discarded_acks
            || r.lost_without_witness != r.acked_lost
            || r.acked < r.acked_lost
            || (f.kind.loss_without_witness() == WitnessLoss::Nothing && r.acked_lost != 0)
        {
            failures.push(format!(
                "{f}: lost {} (predicted {}), discarded side acknowledged {}, violations {:?}",
                r.acked_lost, r.lost_without_witness, s.discarded_acks, r.violations
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_partition_after_the_ha_grace_loses_exactly_what_the_old_side_acknowledged() {
    // With the default detector the other side announces before the HA grace runs out: the old
    // side held every write it took, acknowledged none of them, and nothing is lost.
    let quick = sim::run(Some(&FaultSpec::parse("partition-peers@precheck").unwrap()));
    let s = quick.split.clone().unwrap();
    let moved = s
        .clients_moved_tick
        .expect("the clients followed the new side");
    assert!(moved < s.cut_tick + HA_GRACE_TICKS, "{s:?}");
    assert_eq!(quick.acked_lost, 0, "{s:?}");

    // A detector slower than the HA grace: the old side (the primary, which loses the epoch
    // comparison at the heal) takes one client write per tick from the cut's tick through the
    // tick the clients follow the secondary, and acknowledges them alone once the grace ran
    // out. Every one of them is lost, and only those.
    let slow = run_with_detector(
        FaultKind::PartitionPeers,
        Step::Precheck,
        HA_GRACE_TICKS + 4,
    );
    let s = slow.split.clone().unwrap();
    assert_eq!(s.survivor, "secondary", "{s:?}");
    let moved = s
        .clients_moved_tick
        .expect("the clients followed the new side");
    assert!(moved >= s.cut_tick + HA_GRACE_TICKS, "{s:?}");
    let old_side_writes = moved - s.cut_tick + 1;
    assert_eq!(slow.acked_lost, old_side_writes, "{s:?}\n{:#?}", slow.steps);
    assert_eq!(slow.lost_without_witness, old_side_writes);
    assert!(slow.violations.is_empty(), "{:?}", slow.violations);
}

#[test]
fn an_epoch_tie_discards_the_side_the_clients_followed() {
    // In primary-mixed both drivers move control when they lose each other (the driver rolls
    // back to its own running-version instance, the other promotes its HA standby), both at
    // the next epoch of the same journal: a tie, which the primary wins. The clients followed
    // the secondary (it announced last) and wrote to it, one write per tick, from the tick after
    // they moved until the heal; its promoted instance had no standby to wait for and
    // acknowledged each at once. All of them are lost.
    let r = sim::run(Some(
        &FaultSpec::parse("partition-peers@primary-mixed").unwrap(),
    ));
    let s = r.split.clone().unwrap();
    assert_eq!(s.survivor, "primary", "{s:?}");
    let moved = s
        .clients_moved_tick
        .expect("the clients followed the secondary");
    let secondary_writes = s.heal_tick - moved - 1;
    assert!(secondary_writes > 0);
    assert_eq!(r.acked_lost, secondary_writes, "{s:?}\n{:#?}", r.steps);
    assert_eq!(r.lost_without_witness, secondary_writes);
    assert!(r.violations.is_empty(), "{:?}", r.violations);
}
