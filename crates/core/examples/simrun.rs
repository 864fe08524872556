//! Prints the simulated timeline for one fault: `cargo run --example simrun -- KIND@STEP`.
fn main() {
    let arg = std::env::args().nth(1);
    let f = arg.map(|a| hitless_core::sim::FaultSpec::parse(&a).expect("valid fault"));
    let r = hitless_core::sim::run(f.as_ref());
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
