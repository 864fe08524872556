//! Resident memory per key of an active `Replica` holding N keys
//! `key:<n>` with values of a fixed size, loaded one put per batch (as a
//! RESP server submits a SET):
//! `cargo run --release -p hitless-sync --example mem_per_key [-- KEYS VALUE_BYTES LOG_MB]`.
//!
//! `LOG_MB` bounds the resume log (default: the library's default); 0
//! disables it, which shows the state's own share. Prints figures only.

use hitless_sync::{Mutation, Replica, ReplicaConfig, Schema};

/// `VmRSS` of this process, in bytes.
fn rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS in /proc/self/status")
        * 1024
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let keys: u64 = args
        .get(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let value_bytes: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(100);
    let mut cfg = ReplicaConfig::new("a");
    if let Some(mb) = args.get(3).and_then(|a| a.parse::<usize>().ok()) {
        cfg.resume_log_bytes = mb << 20;
    }
    let log_mb = cfg.resume_log_bytes >> 20;
    let before = rss();
    let a = Replica::new(Schema::new("kv", 1).table("kv"), cfg);
    a.activate(hitless_sync::ControlEpoch(1)).expect("activate");
    let value = vec![b'x'; value_bytes];
    for n in 0..keys {
        a.apply(vec![Mutation::put(
            "kv",
            format!("key:{n}").into_bytes(),
            value.clone(),
        )])
        .expect("apply");
    }
    let after = rss();
    let len = a.with_table("kv", |t| t.len()).expect("table kv");
    assert_eq!(len as u64, keys, "every key loaded");
    let per_key = (after - before) as f64 / keys as f64;
    println!(
        "keys {keys}  value {value_bytes} B  resume log bound {log_mb} MiB  \
         RSS {:.1} MiB (base {:.1} MiB)  {per_key:.0} B/key",
        after as f64 / (1 << 20) as f64,
        before as f64 / (1 << 20) as f64,
    );
}
