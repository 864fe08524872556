//! Runs one phase of the replication benchmark, for profiling:
//! `bench_phase throughput1|owned1|throughput3|ack|bulk [n]`.

use hitless_sync::bench::{self, BenchConfig};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut cfg = BenchConfig::default();
    if let Some(n) = args.get(2).and_then(|n| n.parse().ok()) {
        cfg.mutations = n;
        cfg.ack_samples = n as usize;
        cfg.bulk_bytes = n << 20;
    }
    let r = match args.get(1).map(String::as_str) {
        Some("throughput1") => {
            bench::throughput(&cfg, 1, false).map(|(r, c)| format!("{r:.0}/s {c:.2}s CPU"))
        }
        Some("owned1") => {
            bench::throughput(&cfg, 1, true).map(|(r, c)| format!("{r:.0}/s {c:.2}s CPU"))
        }
        Some("throughput3") => {
            bench::throughput(&cfg, 3, false).map(|(r, c)| format!("{r:.0}/s {c:.2}s CPU"))
        }
        Some("ack") => bench::ack_latency(&cfg).map(|(l, r)| {
            format!(
                "ack p50 {:.1} p99 {:.1} us, rtt p50 {:.1} p99 {:.1} us",
                l[l.len() / 2],
                l[l.len() * 99 / 100],
                r[r.len() / 2],
                r[r.len() * 99 / 100]
            )
        }),
        Some("bulk") => {
            bench::bulk(&cfg).map(|(r, m, c)| format!("{r:.0} MiB/s of {m:.0} MiB, {c:.2}s CPU"))
        }
        _ => {
            eprintln!("usage: bench_phase throughput1|throughput3|ack|bulk [n]");
            std::process::exit(2);
        }
    };
    match r {
        Ok(s) => println!("{s}"),
        Err(e) => {
            eprintln!("bench failed: {e}");
            std::process::exit(1);
        }
    }
}
