//! `hitless bench sync`: replication figures on loopback.

use hitless_sync::bench::{run, BenchConfig};

/// Runs the state-sync benchmark and prints the figures, with each target
/// and whether it is met (a table, or JSON with `json`).
pub fn run_sync(json: bool) -> anyhow::Result<()> {
    let report = run(&BenchConfig::default())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.human());
    }
    Ok(())
}
