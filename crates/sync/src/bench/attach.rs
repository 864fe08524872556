//! `hitless bench attach`: what attaching a standby costs the writers of an
//! active holding a large state.
//!
//! For each state size: an active with a synchronous HA standby is loaded
//! with `keys` records, then one writer applies single-record writes (each
//! acknowledged by the HA standby) for a while in steady state, and again
//! while a new standby attaches and receives the whole state. The figures
//! side by side: write latency p99 and max in steady state and during the
//! attach, the bulk time and rate, and the process's resident memory (the
//! process holds the active, the HA standby and the attaching standby).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{config, key, load_avg, pair, percentile, schema};
use crate::{Batch, Durability, Mutation, Replica, SyncError};

/// Figures of one state size.
#[derive(Clone, Debug, Serialize)]
pub struct AttachRow {
    /// Records in the state.
    pub keys: u64,
    /// Value bytes per record.
    pub value_len: usize,
    /// Keys and values, MiB.
    pub state_mib: f64,
    /// Seconds from the attach to the new standby being ready.
    pub bulk_s: f64,
    /// Records per second of the bulk transfer.
    pub bulk_records_per_s: f64,
    /// Write latency p99 in steady state (µs).
    pub steady_p99_us: f64,
    /// Longest write in steady state (µs).
    pub steady_max_us: f64,
    /// Write latency p99 while the standby attached (µs).
    pub attach_p99_us: f64,
    /// Longest write while the standby attached (µs).
    pub attach_max_us: f64,
    /// Writes acknowledged during the attach.
    pub attach_writes: u64,
    /// Resident memory before the attach (MiB).
    pub rss_before_mib: f64,
    /// Peak resident memory during the attach (MiB); the attaching
    /// standby's own copy of the state is in this process.
    pub rss_peak_mib: f64,
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct AttachReport {
    /// One row per state size.
    pub rows: Vec<AttachRow>,
    /// Online CPUs.
    pub cpus: usize,
    /// One-minute load average when the run started.
    pub load_avg_start: f64,
    /// One-minute load average when the run ended.
    pub load_avg_end: f64,
}

impl AttachReport {
    /// A table of the rows.
    pub fn human(&self) -> String {
        use std::fmt::Write as _;
        let mut o = String::new();
        let _ = writeln!(
            o,
            "hitless bench attach (loopback TCP, one writer of single-record synchronous writes; \
             {} CPUs, load average {:.1} -> {:.1})",
            self.cpus, self.load_avg_start, self.load_avg_end
        );
        let _ = writeln!(
            o,
            "{:>10} {:>9} {:>8} {:>12} {:>22} {:>22} {:>18}",
            "keys",
            "state MiB",
            "bulk s",
            "bulk rec/s",
            "steady p99/max us",
            "attach p99/max us",
            "RSS before/peak MiB"
        );
        for r in &self.rows {
            let _ = writeln!(
                o,
                "{:>10} {:>9.0} {:>8.2} {:>12.0} {:>22} {:>22} {:>18}",
                r.keys,
                r.state_mib,
                r.bulk_s,
                r.bulk_records_per_s,
                format!("{:.0} / {:.0}", r.steady_p99_us, r.steady_max_us),
                format!("{:.0} / {:.0}", r.attach_p99_us, r.attach_max_us),
                format!("{:.0} / {:.0}", r.rss_before_mib, r.rss_peak_mib),
            );
        }
        o
    }
}

/// Resident and peak resident memory of this process, MiB.
fn rss_mib() -> (f64, f64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Applies single-record writes until `stop`, returning their latencies (µs).
fn writer(
    a: Replica,
    keys: u64,
    value_len: usize,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<Vec<f64>> {
    thread::spawn(move || {
        let mut lat = Vec::with_capacity(1 << 16);
        let value = vec![b'w'; value_len];
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) && lat.len() < 10_000_000 {
            let k = (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 16) % keys.max(1);
            let t = Instant::now();
            if a.apply(vec![Mutation::put("kv", key(k, 16), value.clone())])
                .is_err()
            {
                break;
            }
            lat.push(t.elapsed().as_secs_f64() * 1e6);
            i += 1;
        }
        lat.sort_by(f64::total_cmp);
        lat
    })
}

/// Measures one state size.
pub fn attach(keys: u64, value_len: usize, steady: Duration) -> Result<AttachRow, SyncError> {
    let (a, h, ha) = pair(1, Durability::Sync)?;
    let value = vec![b'v'; value_len];
    let mut batch = Batch::with_capacity(1000 * (value_len + 32));
    let mut i = 0;
    while i < keys {
        batch.clear();
        for j in i..(i + 1000).min(keys) {
            batch.put("kv", &key(j, 16), &value)?;
        }
        let t = a.submit_batch(&batch)?;
        i += 1000;
        if i >= keys {
            a.wait_durable(t)?;
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(a.clone(), keys, value_len, stop.clone());
    thread::sleep(steady);
    stop.store(true, Ordering::Relaxed);
    let steady_lat = w.join().expect("the writer does not panic");
    let (rss_before, _) = rss_mib();
    // Reset the peak so that it measures the attach alone.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(a.clone(), keys, value_len, stop.clone());
    thread::sleep(Duration::from_millis(200));
    let s = Replica::new(schema(), config("bench-attach", Durability::Sync));
    let start = Instant::now();
    let f = s.follow_tcp(h.local_addr(), false)?;
    let ready = s.wait_ready(Duration::from_secs(600));
    let bulk_s = start.elapsed().as_secs_f64();
    thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let attach_lat = w.join().expect("the writer does not panic");
    let (_, rss_peak) = rss_mib();
    ready?;
    f.stop();
    a.shutdown();
    s.shutdown();
    for x in ha {
        x.shutdown();
    }
    let pct = |v: &[f64], p: f64| if v.is_empty() { 0.0 } else { percentile(v, p) };
    Ok(AttachRow {
        keys,
        value_len,
        state_mib: (keys as f64 * (value_len + 16) as f64) / (1u64 << 20) as f64,
        bulk_s,
        bulk_records_per_s: keys as f64 / bulk_s,
        steady_p99_us: pct(&steady_lat, 0.99),
        steady_max_us: steady_lat.last().copied().unwrap_or(0.0),
        attach_p99_us: pct(&attach_lat, 0.99),
        attach_max_us: attach_lat.last().copied().unwrap_or(0.0),
        attach_writes: attach_lat.len() as u64,
        rss_before_mib: rss_before,
        rss_peak_mib: rss_peak,
    })
}

/// Runs [`attach`] for each size, smallest first.
pub fn run(sizes: &[u64], value_len: usize) -> Result<AttachReport, SyncError> {
    let load_avg_start = load_avg();
    let mut rows = Vec::new();
    for &k in sizes {
        rows.push(attach(k, value_len, Duration::from_secs(2))?);
    }
    Ok(AttachReport {
        rows,
        cpus: thread::available_parallelism().map_or(1, |n| n.get()),
        load_avg_start,
        load_avg_end: load_avg(),
    })
}
