//! Helpers shared by the integration tests.
#![allow(dead_code)]

use hitless_core::engine::{EngineConfig, EngineState, Step};
use hitless_core::invariants::{Checker, Invariant};
use hitless_core::sim::{
    self, fault_catalog, FaultKind, ScheduledFault, SimOptions, SimReport, Trigger,
};
use hitless_core::{ControlEpoch, Engine, ImageRef, InstanceId, Pair, Version};

/// Runs every catalog fault (and no fault) and returns the violations of `inv` by case.
pub fn matrix_violations(inv: Invariant) -> Vec<String> {
    let mut bad = Vec::new();
    let mut cases: Vec<(String, SimReport)> = vec![("none".into(), sim::run(None))];
    for f in fault_catalog() {
        cases.push((f.to_string(), sim::run(Some(&f))));
    }
    for (case, r) in cases {
        for v in r.violations.iter().filter(|v| v.invariant() == Some(inv)) {
            bad.push(format!("{case}: {v}"));
        }
    }
    bad
}

pub fn n() -> ImageRef {
    ImageRef::new("appliance-os", Version::new(1, 0, 0))
}

pub fn engine() -> Engine {
    Engine::new(
        EngineConfig::default(),
        Pair::steady(n(), InstanceId(1), InstanceId(2), ControlEpoch(1)),
    )
    .unwrap()
}

pub fn checker_for(e: &Engine) -> Checker {
    Checker::new(e.state())
}

pub fn state(e: &Engine) -> EngineState {
    e.snapshot()
}

/// Simulates the ISSU with `kind` at `step` and a peer failure detector of `detect` ticks.
pub fn run_with_detector(kind: FaultKind, step: Step, detect: u64) -> SimReport {
    sim::run_with(&SimOptions {
        faults: vec![ScheduledFault {
            kind,
            trigger: Trigger::AtStep(step),
        }],
        peer_detect_ticks: detect,
        ..SimOptions::default()
    })
}
