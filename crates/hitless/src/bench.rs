//! `hitless bench sync`: replication figures on loopback.

use hitless_sync::bench::{run, BenchConfig, BenchReport};

/// Runs the state-sync benchmark and prints the figures (a table, or JSON with `json`).
pub fn run_sync(json: bool) -> anyhow::Result<()> {
    let report = run(&BenchConfig::default())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn print_table(r: &BenchReport) {
    println!(
        "hitless bench sync (loopback TCP, {} mutations of {}+{} bytes, batches of {})",
        r.mutations, r.key_len, r.value_len, r.batch
    );
    println!(
        "  mutations/s, 1 standby   {:>14.0}",
        r.mutations_per_s_1_standby
    );
    println!(
        "  mutations/s, 3 standbys  {:>14.0}",
        r.mutations_per_s_3_standbys
    );
    println!(
        "  sync ack p50 / p99       {:>8.1} / {:.1} us",
        r.ack_p50_us, r.ack_p99_us
    );
    println!(
        "  loopback RTT p50 / p99   {:>8.1} / {:.1} us",
        r.loopback_rtt_p50_us, r.loopback_rtt_p99_us
    );
    println!(
        "  bulk transfer            {:>14.0} MiB/s ({:.0} MiB state)",
        r.bulk_mib_per_s, r.bulk_mib
    );
}
