//! Runs the replication benchmark:
//! `cargo run --release -p hitless-sync --example bench_sync [-- --json] [--quick]`.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut cfg = hitless_sync::bench::BenchConfig::default();
    if args.iter().any(|a| a == "--quick") {
        cfg.mutations = 500_000;
        cfg.ack_samples = 2_000;
        cfg.rtt_samples = 2_000;
        cfg.bulk_bytes = 64 << 20;
    }
    match hitless_sync::bench::run(&cfg) {
        Ok(r) if args.iter().any(|a| a == "--json") => println!(
            "{}",
            serde_json::to_string_pretty(&r).expect("report serializes")
        ),
        Ok(r) => print!("{}", r.human()),
        Err(e) => {
            eprintln!("bench failed: {e}");
            std::process::exit(1);
        }
    }
}
