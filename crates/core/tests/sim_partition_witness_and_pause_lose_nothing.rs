//! Invariant: a lost witness changes nothing (none exists yet), and a paused driving agent loses
//! no acknowledged write: its front is paused with it, so no client reaches the old side while
//! the other agent takes over, however long the detector takes.

use hitless_core::engine::Step;
use hitless_core::sim::{self, fault_catalog, FaultKind, SimResult, HA_GRACE_TICKS};

mod common;

use common::run_with_detector;

#[test]
fn a_lost_witness_changes_nothing() {
    let none = sim::run(None);
    for f in fault_catalog()
        .into_iter()
        .filter(|f| f.kind == FaultKind::IsolateWitness)
    {
        let r = sim::run(Some(&f));
        let s = r.split.clone().expect("a split report");
        assert!(r.fault_fired, "{f}");
        assert_eq!(r.result, SimResult::Committed, "{f}");
        assert_eq!(r.final_control, none.final_control, "{f}");
        assert_eq!(r.epoch, none.epoch, "{f}: control moved");
        assert_eq!(r.acked_lost, 0, "{f}");
        assert_eq!(s.split_ticks, 0, "{f}: a second driver ran");
        assert_eq!(s.address_holders_max, 1, "{f}");
        assert_eq!(s.clients_moved_tick, None, "{f}");
        assert_eq!(s.survivor, "primary", "{f}");
        assert!(r.violations.is_empty(), "{f}: {:?}", r.violations);
    }
}

#[test]
fn a_paused_agent_loses_nothing_at_every_step() {
    for f in fault_catalog()
        .into_iter()
        .filter(|f| f.kind == FaultKind::PauseAgent)
    {
        let r = sim::run(Some(&f));
        let s = r.split.clone().expect("a split report");
        assert_eq!(r.acked_lost, 0, "{f}");
        assert_eq!(
            s.discarded_acks, 0,
            "{f}: the paused side acknowledged writes"
        );
        assert_eq!(
            s.survivor, "secondary",
            "{f}: the agent that took over drives on"
        );
        assert!(
            s.clients_moved_tick.is_some(),
            "{f}: the clients never moved"
        );
        assert!(r.violations.is_empty(), "{f}: {:?}", r.violations);
    }
}

#[test]
fn a_pause_longer_than_the_ha_grace_still_loses_nothing_where_a_cut_does() {
    // The same detector makes a partition lose what the old side acknowledged after the grace;
    // a pause does not, because the clients that still follow the paused side get no answer.
    let detect = HA_GRACE_TICKS + 4;
    let cut = run_with_detector(FaultKind::PartitionPeers, Step::Precheck, detect);
    assert!(cut.acked_lost > 0, "the contrast case lost nothing");
    let pause = run_with_detector(FaultKind::PauseAgent, Step::Precheck, detect);
    let s = pause.split.clone().unwrap();
    assert!(s.clients_moved_tick.unwrap() >= s.cut_tick + HA_GRACE_TICKS);
    assert_eq!(pause.acked_lost, 0, "{s:?}");
    assert!(pause.violations.is_empty(), "{:?}", pause.violations);
}
