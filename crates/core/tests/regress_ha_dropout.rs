//! Fault sequences found by the random-fault property test (with random seeds), kept as named
//! regressions. Each must keep every invariant, lose no acknowledged write, and end committed,
//! rolled back, or stuck with the command that resumes.

use hitless_core::sim::{self, FaultKind, ScheduledFault, SimOptions, SimResult, Trigger};

fn run(seed: u64, faults: &[(FaultKind, u64)]) -> sim::SimReport {
    let opts = SimOptions {
        seed,
        faults: faults
            .iter()
            .map(|(kind, t)| ScheduledFault {
                kind: *kind,
                trigger: Trigger::AtTick(*t),
            })
            .collect(),
        ..SimOptions::default()
    };
    let r = sim::run_with(&opts);
    assert_eq!(r.invariant_violations, 0, "{:?}", r.violations);
    assert_eq!(r.acked_lost, 0);
    match r.result {
        SimResult::Committed | SimResult::RolledBack => {
            assert!(r.final_layout_ok, "{:#?}", r.steps)
        }
        SimResult::Incomplete => assert!(
            r.reason
                .as_deref()
                .unwrap_or_default()
                .contains("resume with"),
            "{:?}",
            r.reason
        ),
    }
    r
}

/// A new HA standby is designated while the old one has just dropped out, and the instance in
/// control then loses its heartbeat: the failover goes to the old HA standby. Writes
/// acknowledged with only the new one in sync would be missing there, so acknowledgements wait
/// for the grace after any HA standby drops out, even while another is in sync.
#[test]
fn a_second_ha_standby_does_not_shorten_the_grace_of_one_that_dropped_out() {
    run(
        6618353051599798697,
        &[
            (FaultKind::HeartbeatLost, 50),
            (FaultKind::StandbyOutOfSync, 50),
        ],
    );
}

/// An HA standby that becomes ready and falls out of sync within one tick still counts as
/// one that dropped out.
#[test]
fn an_ha_standby_in_sync_for_an_instant_still_gets_its_grace() {
    run(
        970777725801741635,
        &[
            (FaultKind::StandbyOutOfSync, 52),
            (FaultKind::HeartbeatLost, 78),
            (FaultKind::ApplianceLostSecondary, 50),
        ],
    );
}

/// Commands hang and the target of a planned switch falls out of sync: the switch is not
/// retried to a target that lacks acknowledged writes.
#[test]
fn a_planned_switch_is_not_retried_to_a_target_that_fell_out_of_sync() {
    run(
        17411071679583269739,
        &[
            (FaultKind::CrashNew, 47),
            (FaultKind::Timeout, 51),
            (FaultKind::StandbyOutOfSync, 51),
        ],
    );
}

/// A planned switch, superseded by a failover whose commands then hang, completes anyway: the
/// engine records where control went instead of believing it stayed put.
#[test]
fn a_superseded_switch_that_completes_anyway_is_recorded() {
    run(
        11165127295557782644,
        &[
            (FaultKind::HeartbeatLost, 56),
            (FaultKind::HeartbeatLost, 61),
            (FaultKind::Timeout, 65),
        ],
    );
}
