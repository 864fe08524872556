//! Invariant: after a split fault (a cut between the appliances, a lost witness, a paused
//! driving agent) heals, the pair converges within the bound: one instance in control, the
//! service address on its appliance only, an in-sync HA standby on the other appliance, and
//! the ISSU ends (committed or rolled back), never stuck.

use hitless_core::engine::Step;
use hitless_core::sim::{
    self, fault_catalog, FaultKind, ScheduledFault, SimOptions, SimResult, SimViolation, Trigger,
    CONVERGE_TICKS, CUT_TICKS,
};

#[test]
fn every_split_fault_converges_after_the_heal() {
    let mut failures = Vec::new();
    let mut ran = 0;
    for f in fault_catalog().into_iter().filter(|f| f.kind.is_split()) {
        ran += 1;
        let r = sim::run(Some(&f));
        let mut p = Vec::new();
        if !r.fault_fired {
            p.push("the fault never fired".to_string());
        }
        if !r.violations.is_empty() {
            p.push(format!("violations: {:?}", r.violations));
        }
        if r.result == SimResult::Incomplete {
            p.push(format!("incomplete: {:?}", r.reason));
        }
        if !r.final_layout_ok {
            p.push(
                "final layout is not control + in-sync HA standby on the other appliance".into(),
            );
        }
        match &r.split {
            None => p.push("no split report".into()),
            Some(s) => {
                if s.heal_tick != s.cut_tick + CUT_TICKS {
                    p.push(format!(
                        "healed at {} after a cut at {}",
                        s.heal_tick, s.cut_tick
                    ));
                }
                match s.converged_after_ticks {
                    Some(t) if t <= CONVERGE_TICKS => {}
                    other => p.push(format!("converged after {other:?} ticks")),
                }
            }
        }
        if !p.is_empty() {
            failures.push(format!("{f}: {}", p.join("; ")));
        }
    }
    assert_eq!(ran, FaultKind::SPLIT.len() * (Step::FORWARD.len()));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_cut_runs_two_drivers_and_two_address_holders_until_the_heal() {
    let f = sim::FaultSpec::parse("partition-peers@primary-sync-new").unwrap();
    let r = sim::run(Some(&f));
    let s = r.split.expect("a split report");
    assert!(s.split_ticks > 0, "{s:?}");
    assert!(s.split_ticks < CUT_TICKS, "{s:?}");
    assert_eq!(s.address_holders_max, 2, "{s:?}");
    assert!(s.converged_after_ticks.is_some(), "{s:?}");
}

#[test]
fn a_split_still_open_when_the_run_ends_is_a_violation() {
    // The run stops before the heal: the pair cannot have converged, and the report says so.
    let opts = SimOptions {
        faults: vec![ScheduledFault {
            kind: FaultKind::PartitionPeers,
            trigger: Trigger::AtStep(Step::PrimaryMixed),
        }],
        max_ticks: 30,
        ..SimOptions::default()
    };
    let r = sim::run_with(&opts);
    assert!(r.fault_fired);
    assert!(
        r.violations
            .iter()
            .any(|v| matches!(v, SimViolation::NotConverged { .. })),
        "{:?}",
        r.violations
    );
}
