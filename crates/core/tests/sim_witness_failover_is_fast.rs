//! Invariant: with a reachable witness, losing the appliance of the instance in control fails
//! over within the failure detection plus a few ticks (the witness's answer), about as fast as
//! without a witness.

use hitless_core::engine::{EngineConfig, Step};
use hitless_core::sim::{
    self, FaultKind, ScheduledFault, SimOptions, SimReport, Trigger, WITNESS_ANSWER_TICKS,
};

/// Detection of a lost appliance by the simulated agent (its `ApplianceLost` arrives a tick
/// after the loss, plus jitter) and the failover's own delay.
const DETECT_AND_FAILOVER_TICKS: u64 = 1 + 2 + 1 + 2;
/// The witness's answer: its delay plus at most 2 ticks of jitter.
const WITNESS_TICKS: u64 = WITNESS_ANSWER_TICKS + 2;

fn run(step: Step, seed: u64, witness: bool) -> SimReport {
    let base = SimOptions::default();
    sim::run_with(&SimOptions {
        faults: vec![ScheduledFault {
            kind: FaultKind::ApplianceLostPrimary,
            trigger: Trigger::AtStep(step),
        }],
        seed,
        config: EngineConfig {
            witness,
            ..base.config.clone()
        },
        ..base
    })
}

/// Ticks from the fault to the first control change after it.
fn failover_ticks(r: &SimReport) -> Option<u64> {
    let fault = r
        .steps
        .iter()
        .find(|s| s.note.starts_with("fault appliance-lost-primary"))?;
    let at = fault.tick;
    let c = r.control_changes.iter().find(|c| c.tick >= at)?;
    Some(c.tick - at)
}

#[test]
fn losing_the_primary_fails_over_within_the_detector_and_a_witness_answer() {
    let mut compared = 0;
    for step in [Step::Precheck, Step::StartExtras, Step::PrimaryStartNew] {
        for seed in [0, 3, 11] {
            let without = run(step, seed, false);
            let with = run(step, seed, true);
            let (Some(a), Some(b)) = (failover_ticks(&without), failover_ticks(&with)) else {
                panic!(
                    "{step:?} seed {seed}: no failover (without {:?}, with {:?})",
                    without.control_changes, with.control_changes
                );
            };
            println!(
                "{step:?} seed {seed}: failover after {a} tick(s) without a witness, {b} with"
            );
            assert!(
                b <= DETECT_AND_FAILOVER_TICKS + WITNESS_TICKS,
                "{step:?} seed {seed}: {b} ticks with the witness"
            );
            assert!(
                b <= a + WITNESS_TICKS + 2,
                "{step:?} seed {seed}: {b} ticks with the witness against {a} without"
            );
            assert_eq!(with.acked_lost, 0, "{step:?} seed {seed}");
            assert!(with.violations.is_empty(), "{:?}", with.violations);
            compared += 1;
        }
    }
    assert_eq!(compared, 9);
}
