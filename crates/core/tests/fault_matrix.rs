//! Exhaustive deterministic simulation: every step x every fault kind.

use hitless_core::engine::Step;
use hitless_core::sim::{self, fault_catalog, FaultKind, FaultSpec, SimReport, SimResult};

/// What the procedure promises for a fault.
struct Expect {
    result: SimResult,
    version: &'static str,
    appliance: Option<&'static str>,
}

fn expected(f: &FaultSpec) -> Expect {
    let source = "1.0.0";
    let before_switch = f.step <= Step::PrimarySyncNew;
    let control_fails = matches!(
        f.kind,
        FaultKind::CrashActive | FaultKind::HeartbeatLost | FaultKind::ApplianceLostPrimary
    ) || (f.kind == FaultKind::CrashNew && f.step == Step::PrimaryMixed);
    // Until the secondary switch, the synchronous standby is the secondary's N instance.
    let fails_over_to_n = control_fails && f.step < Step::SecondarySwitch;
    match f.kind {
        FaultKind::StandbyOutOfSync => Expect {
            result: SimResult::Committed,
            version: "1.1.0",
            appliance: Some("primary"),
        },
        // An instance being retired crashing changes nothing.
        FaultKind::CrashNew if f.step == Step::Retire => Expect {
            result: SimResult::Committed,
            version: "1.1.0",
            appliance: Some("primary"),
        },
        FaultKind::Abort if !f.step.abortable() => Expect {
            result: SimResult::Committed,
            version: "1.1.0",
            appliance: Some("primary"),
        },
        _ => Expect {
            result: SimResult::RolledBack,
            version: source,
            appliance: if fails_over_to_n {
                Some("secondary")
            } else if before_switch {
                Some("primary")
            } else {
                None
            },
        },
    }
}

fn problems(f: Option<&FaultSpec>, r: &SimReport) -> Vec<String> {
    let mut p = Vec::new();
    if r.invariant_violations != 0 {
        p.push(format!("violations: {:?}", r.violations));
    }
    if r.acked_lost != 0 {
        p.push(format!("acked_lost = {}", r.acked_lost));
    }
    if !r.final_layout_ok {
        p.push("final layout is not control + in-sync HA standby on the other appliance".into());
    }
    if !r.fault_fired {
        p.push("fault never fired".into());
    }
    if r.acked == 0 {
        p.push(format!("only {} writes acknowledged", r.acked));
    }
    let e = match f {
        Some(f) => expected(f),
        None => Expect {
            result: SimResult::Committed,
            version: "1.1.0",
            appliance: Some("primary"),
        },
    };
    if r.result != e.result {
        p.push(format!(
            "result {} (expected {}), reason {:?}",
            r.result, e.result, r.reason
        ));
    }
    if r.final_control.version != e.version {
        p.push(format!(
            "control on {} (expected {})",
            r.final_control.version, e.version
        ));
    }
    if let Some(a) = e.appliance {
        if r.final_control.appliance != a {
            p.push(format!(
                "control on the {} appliance (expected {a})",
                r.final_control.appliance
            ));
        }
    }
    p
}

#[test]
fn no_fault_commits_on_the_target() {
    let r = sim::run(None);
    let p = problems(None, &r);
    assert!(p.is_empty(), "{p:?}\n{:#?}", r.steps);
    // The timeline visits every forward step in order.
    let visited: Vec<&str> = r.steps.iter().map(|s| s.step.as_str()).collect();
    let mut pos = 0;
    for s in Step::FORWARD {
        let found = visited[pos..].iter().position(|v| *v == s.name());
        assert!(found.is_some(), "step {s} missing from the timeline");
        pos += found.unwrap();
    }
    assert!(
        r.epoch >= hitless_core::ControlEpoch(2),
        "control moved at least once"
    );
}

#[test]
fn seed_case_fails_over_to_the_secondary_n_standby() {
    let f = FaultSpec::parse("crash-active@primary-mixed").unwrap();
    let r = sim::run(Some(&f));
    let p = problems(Some(&f), &r);
    assert!(p.is_empty(), "{p:?}\n{:#?}", r.steps);
    assert_eq!(r.final_control.appliance, "secondary");
    assert_eq!(r.final_control.version, "1.0.0");
    // Right after the crash, control is on the secondary appliance's N instance.
    let fo = r
        .steps
        .iter()
        .find(|s| s.note.starts_with("control ->") && s.in_control.ends_with("@secondary"))
        .expect("a failover to the secondary appliance");
    assert_eq!(fo.control_version, "1.0.0");
}

#[test]
fn every_step_times_every_fault_kind() {
    let mut failures = Vec::new();
    let mut ran = 0;
    // The split faults (links, a paused agent) have their own tests (sim_partition_*).
    for kind in FaultKind::SINGLE_DRIVER {
        for step in Step::FORWARD {
            let spec = format!("{}@{}", kind.name(), step.name());
            match FaultSpec::parse(&spec) {
                Ok(f) => {
                    ran += 1;
                    let r = sim::run(Some(&f));
                    let p = problems(Some(&f), &r);
                    if !p.is_empty() {
                        failures.push(format!("{spec}: {}", p.join("; ")));
                    }
                }
                Err(e) => {
                    // Only the documented impossible combinations are refused.
                    assert!(!kind.applies_to(step), "{spec} refused: {e}");
                }
            }
        }
    }
    let single = fault_catalog()
        .iter()
        .filter(|f| !f.kind.is_split())
        .count();
    assert_eq!(ran, single);
    assert!(ran >= 170, "only {ran} cases");
    assert!(
        failures.is_empty(),
        "{} of {ran} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
