//! Invariant: with the witness cut off, nothing changes control: not the ISSU's planned
//! switches while the appliances still see each other, nor a failover when the instance in
//! control is lost; once the witness returns, exactly one standby is promoted.

use hitless_core::engine::EngineConfig;
use hitless_core::sim::{
    self, fault_catalog, FaultKind, ScheduledFault, SimOptions, SimReport, Trigger,
};

fn witnessed(faults: Vec<ScheduledFault>) -> SimReport {
    let base = SimOptions::default();
    sim::run_with(&SimOptions {
        faults,
        config: EngineConfig {
            witness: true,
            ..base.config.clone()
        },
        ..base
    })
}

#[test]
fn a_cut_witness_with_connected_peers_changes_no_control() {
    for f in fault_catalog()
        .into_iter()
        .filter(|f| f.kind == FaultKind::IsolateWitness)
    {
        let r = witnessed(vec![ScheduledFault {
            kind: f.kind,
            trigger: Trigger::AtStep(f.step),
        }]);
        let s = r.split.clone().expect("a split report");
        let during: Vec<_> = r
            .control_changes
            .iter()
            .filter(|c| c.tick >= s.cut_tick && c.tick < s.heal_tick)
            .collect();
        assert!(
            during.is_empty(),
            "{f}: control changed without the witness: {during:?}"
        );
        assert_eq!(r.acked_lost, 0, "{f}");
        assert!(s.converged_after_ticks.is_some(), "{f}");
        assert!(r.violations.is_empty(), "{f}: {:?}", r.violations);
    }
}

#[test]
fn a_lost_instance_in_control_is_replaced_only_once_the_witness_returns() {
    let r = witnessed(vec![
        ScheduledFault {
            kind: FaultKind::IsolateWitness,
            trigger: Trigger::AtTick(5),
        },
        ScheduledFault {
            kind: FaultKind::CrashActive,
            trigger: Trigger::AtTick(8),
        },
    ]);
    assert!(r.fault_fired);
    let s = r.split.clone().expect("a split report");
    assert!(
        r.control_changes.iter().all(|c| c.tick >= s.heal_tick),
        "promoted while the witness was cut off (healed at {}): {:?}",
        s.heal_tick,
        r.control_changes
    );
    let first = r
        .control_changes
        .first()
        .expect("nobody promoted after the heal");
    // The first change is the failover: to the standby, at a new epoch, and the only one.
    let promoted: Vec<_> = r
        .control_changes
        .iter()
        .filter(|c| c.epoch == first.epoch)
        .collect();
    assert_eq!(promoted.len(), 1, "{:?}", r.control_changes);
    assert!(
        first.tick <= s.heal_tick + 10,
        "the promotion came {} ticks after the witness returned",
        first.tick - s.heal_tick
    );
    assert_eq!(r.acked_lost, 0);
    assert!(r.violations.is_empty(), "{:?}", r.violations);
    // Without the witness the same crash fails over at once, during the cut.
    let base = SimOptions::default();
    let without = sim::run_with(&SimOptions {
        faults: vec![
            ScheduledFault {
                kind: FaultKind::IsolateWitness,
                trigger: Trigger::AtTick(5),
            },
            ScheduledFault {
                kind: FaultKind::CrashActive,
                trigger: Trigger::AtTick(8),
            },
        ],
        ..base
    });
    assert!(without
        .control_changes
        .first()
        .is_some_and(|c| c.tick < s.heal_tick));
}
