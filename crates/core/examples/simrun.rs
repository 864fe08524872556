//! Prints the simulated timeline.
//!
//! `cargo run --example simrun -- KIND@STEP` or
//! `cargo run --example simrun -- --seed S KIND:TICK [KIND:TICK...]`.
use hitless_core::sim::{self, FaultKind, FaultSpec, ScheduledFault, SimOptions, Trigger};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = if args.first().map(String::as_str) == Some("--seed") {
        let seed = args[1].parse().expect("seed");
        let faults = args[2..]
            .iter()
            .map(|a| {
                let (k, t) = a.split_once(':').expect("KIND:TICK");
                ScheduledFault {
                    kind: FaultKind::from_name(k).expect("kind"),
                    trigger: Trigger::AtTick(t.parse().expect("tick")),
                }
            })
            .collect();
        sim::run_with(&SimOptions {
            seed,
            faults,
            ..SimOptions::default()
        })
    } else {
        let f = args
            .first()
            .map(|a| FaultSpec::parse(a).expect("valid fault"));
        sim::run(f.as_ref())
    };
    for s in &r.steps {
        println!(
            "{:>4} {:<22} {:<14} {:<6} e{:<3} P{:?} S{:?} {}",
            s.tick,
            s.step,
            s.in_control,
            s.control_version,
            s.epoch,
            s.primary,
            s.secondary,
            s.note
        );
    }
    println!(
        "{} {:?} {:?} lost={} acked={} layout={} viol={:?}",
        r.result, r.reason, r.final_control, r.acked_lost, r.acked, r.final_layout_ok, r.violations
    );
}
