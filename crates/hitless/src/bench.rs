//! `hitless bench sync` and `hitless bench attach`: replication figures on loopback.

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

/// Runs the attach benchmark over `keys` state sizes and prints the rows.
pub fn run_attach(keys: &[u64], value_size: usize, json: bool) -> anyhow::Result<()> {
    anyhow::ensure!(!keys.is_empty(), "--keys needs at least one state size");
    anyhow::ensure!(
        (1..=1 << 20).contains(&value_size),
        "--value-size must be from 1 to 1048576 bytes, not {value_size}"
    );
    let report = hitless_sync::bench::attach::run(keys, value_size)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.human());
    }
    Ok(())
}
