//! Replication benchmark on loopback TCP (`hitless bench sync`).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::{Durability, Mutation, Replica, ReplicaConfig, Schema, ServeHandle, SyncError};

/// Benchmark parameters.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Mutations replicated per throughput run.
    pub mutations: u64,
    /// Mutations per `submit` batch.
    pub batch: usize,
    /// Key length in bytes.
    pub key_len: usize,
    /// Value length in bytes.
    pub value_len: usize,
    /// Synchronous ack latency samples.
    pub ack_samples: usize,
    /// Bulk state size in bytes.
    pub bulk_bytes: u64,
    /// Value size of the bulk state's records.
    pub bulk_value_len: usize,
    /// Loopback round-trip samples.
    pub rtt_samples: usize,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            mutations: 2_000_000,
            batch: 1024,
            key_len: 16,
            value_len: 16,
            ack_samples: 20_000,
            bulk_bytes: 1 << 30,
            bulk_value_len: 64 << 10,
            rtt_samples: 20_000,
        }
    }
}

/// Benchmark figures.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// Replicated mutations per second, one standby.
    pub mutations_per_s_1_standby: f64,
    /// Replicated mutations per second, three standbys.
    pub mutations_per_s_3_standbys: f64,
    /// Synchronous-mode ack latency p50 (µs) of a one-mutation apply.
    pub ack_p50_us: f64,
    /// Synchronous-mode ack latency p99 (µs).
    pub ack_p99_us: f64,
    /// Bulk snapshot transfer rate (MiB/s) until the standby is ready.
    pub bulk_mib_per_s: f64,
    /// Bulk state size in MiB.
    pub bulk_mib: f64,
    /// Loopback TCP round trip p50 (µs), measured in the same run.
    pub loopback_rtt_p50_us: f64,
    /// Loopback TCP round trip p99 (µs).
    pub loopback_rtt_p99_us: f64,
    /// Mutations per run.
    pub mutations: u64,
    /// Batch size.
    pub batch: usize,
    /// Key and value lengths.
    pub key_len: usize,
    /// Value length.
    pub value_len: usize,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn schema() -> Schema {
    Schema::new("bench", 1).table("kv")
}

fn config(node: &str, durability: Durability) -> ReplicaConfig {
    let mut c = ReplicaConfig::new(node);
    c.durability = durability;
    c.ack_timeout = Duration::from_secs(30);
    c.ready_lag = u64::MAX;
    c.max_queue_bytes = 1 << 30;
    c
}

/// An active serving on loopback with `n` HA standbys attached and ready.
fn pair(
    n: usize,
    durability: Durability,
) -> Result<(Replica, ServeHandle, Vec<Replica>), SyncError> {
    let a = Replica::new(schema(), config("bench-active", durability));
    a.activate(1)?;
    let h = a.serve(TcpListener::bind("127.0.0.1:0")?)?;
    let mut standbys = Vec::new();
    for i in 0..n {
        let s = Replica::new(schema(), config(&format!("bench-standby-{i}"), durability));
        s.follow_tcp(h.local_addr(), true)?;
        standbys.push(s);
    }
    a.wait_standbys_ready(n, Duration::from_secs(30))?;
    Ok((a, h, standbys))
}

fn key(i: u64, len: usize) -> Vec<u8> {
    let mut k = vec![b'k'; len.max(8)];
    let n = k.len();
    k[n - 8..].copy_from_slice(&i.to_be_bytes());
    k
}

/// Replicated mutations per second to `n` standbys: batches submitted
/// back to back (asynchronous mode with a bounded lag for back-pressure),
/// timed until every standby acknowledged the last one.
fn throughput(cfg: &BenchConfig, n: usize) -> Result<f64, SyncError> {
    let (a, _h, standbys) = pair(n, Durability::Async { max_lag: 1 << 20 })?;
    let value = vec![b'v'; cfg.value_len];
    let keyspace = 1u64 << 20;
    let start = Instant::now();
    let mut done = 0u64;
    let mut last = 0;
    while done < cfg.mutations {
        let b = (cfg.batch as u64).min(cfg.mutations - done);
        let batch: Vec<Mutation> = (done..done + b)
            .map(|i| Mutation::put("kv", key(i % keyspace, cfg.key_len), value.clone()))
            .collect();
        last = a.submit(batch)?.seq;
        done += b;
    }
    tracing::debug!(
        submit_s = start.elapsed().as_secs_f64(),
        "all batches submitted"
    );
    if std::env::var_os("HITLESS_BENCH_TRACE").is_some() {
        eprintln!("submitted in {:?}", start.elapsed());
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while a
        .status()
        .standbys
        .iter()
        .filter(|s| s.acked_seq >= last)
        .count()
        < n
    {
        if Instant::now() > deadline {
            return Err(SyncError::Timeout(
                Duration::from_secs(300),
                "standbys to acknowledge",
            ));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let secs = start.elapsed().as_secs_f64();
    a.shutdown();
    for s in standbys {
        s.shutdown();
    }
    Ok(cfg.mutations as f64 / secs)
}

/// Synchronous-mode latency of one-mutation applies, in microseconds, sorted.
fn ack_latency(cfg: &BenchConfig) -> Result<Vec<f64>, SyncError> {
    let (a, _h, standbys) = pair(1, Durability::Sync)?;
    let value = vec![b'v'; cfg.value_len];
    let mut lat = Vec::with_capacity(cfg.ack_samples);
    for i in 0..cfg.ack_samples as u64 + 200 {
        let m = vec![Mutation::put("kv", key(i, cfg.key_len), value.clone())];
        let t = Instant::now();
        a.apply(m)?;
        if i >= 200 {
            lat.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    a.shutdown();
    for s in standbys {
        s.shutdown();
    }
    lat.sort_by(f64::total_cmp);
    Ok(lat)
}

/// Time for a new standby to receive `bulk_bytes` of state and become ready.
fn bulk(cfg: &BenchConfig) -> Result<(f64, f64), SyncError> {
    let (a, h, _) = pair(0, Durability::Async { max_lag: u64::MAX })?;
    let value = vec![b'b'; cfg.bulk_value_len];
    let records = (cfg.bulk_bytes / cfg.bulk_value_len as u64).max(1);
    let per_batch = ((1u64 << 20) / cfg.bulk_value_len as u64).max(1);
    let mut i = 0;
    while i < records {
        let b = per_batch.min(records - i);
        a.submit(
            (i..i + b)
                .map(|j| Mutation::put("kv", key(j, 16), value.clone()))
                .collect(),
        )?;
        i += b;
    }
    let bytes = records * (cfg.bulk_value_len as u64 + 16);
    let s = Replica::new(schema(), config("bench-bulk", Durability::Sync));
    let start = Instant::now();
    s.follow_tcp(h.local_addr(), true)?;
    s.wait_ready(Duration::from_secs(120))?;
    let secs = start.elapsed().as_secs_f64();
    a.shutdown();
    s.shutdown();
    let mib = bytes as f64 / (1u64 << 20) as f64;
    Ok((mib / secs, mib))
}

/// Loopback TCP round trips of a 32-byte message, microseconds, sorted.
fn loopback_rtt(samples: usize) -> Result<Vec<f64>, SyncError> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = l.accept()?;
        s.set_nodelay(true)?;
        let mut buf = [0u8; 32];
        loop {
            if s.read_exact(&mut buf).is_err() {
                return Ok(());
            }
            s.write_all(&buf)?;
        }
    });
    let mut c = TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    let mut buf = [7u8; 32];
    let mut out = Vec::with_capacity(samples);
    for i in 0..samples + 200 {
        let t = Instant::now();
        c.write_all(&buf)?;
        c.read_exact(&mut buf)?;
        if i >= 200 {
            out.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    drop(c);
    let _ = echo.join();
    out.sort_by(f64::total_cmp);
    Ok(out)
}

/// Runs the benchmark.
pub fn run(cfg: &BenchConfig) -> Result<BenchReport, SyncError> {
    let rtt = loopback_rtt(cfg.rtt_samples)?;
    let ack = ack_latency(cfg)?;
    let m1 = throughput(cfg, 1)?;
    let m3 = throughput(cfg, 3)?;
    let (bulk_rate, bulk_mib) = bulk(cfg)?;
    Ok(BenchReport {
        mutations_per_s_1_standby: m1,
        mutations_per_s_3_standbys: m3,
        ack_p50_us: percentile(&ack, 0.50),
        ack_p99_us: percentile(&ack, 0.99),
        bulk_mib_per_s: bulk_rate,
        bulk_mib,
        loopback_rtt_p50_us: percentile(&rtt, 0.50),
        loopback_rtt_p99_us: percentile(&rtt, 0.99),
        mutations: cfg.mutations,
        batch: cfg.batch,
        key_len: cfg.key_len,
        value_len: cfg.value_len,
    })
}
