//! Replication benchmark on loopback TCP (`hitless bench sync`).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::{Batch, Durability, Mutation, Replica, ReplicaConfig, Schema, ServeHandle, SyncError};

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
    /// Loopback round-trip samples of [`loopback_rtt`] (the report's RTT
    /// figures come from [`ack_latency`], alternating with the ack samples).
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

/// One target and whether the run met it.
#[derive(Clone, Debug, Serialize)]
pub struct TargetCheck {
    /// What is measured.
    pub figure: String,
    /// Measured value.
    pub value: f64,
    /// Target value.
    pub target: f64,
    /// Unit of both.
    pub unit: String,
    /// `true` if the value must be at least the target, `false` if at most.
    pub at_least: bool,
    /// Whether the target is met.
    pub met: bool,
}

/// Benchmark figures.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// Replicated mutations per second, one standby ([`Batch`] API).
    pub mutations_per_s_1_standby: f64,
    /// Replicated mutations per second, one standby, with the mutations
    /// given as a `Vec<Mutation>` (one allocation per key, value and table
    /// name on the caller's side).
    pub mutations_per_s_1_standby_owned: f64,
    /// Process CPU time per mutation of that run, in microseconds.
    pub cpu_us_per_mutation_1_standby_owned: f64,
    /// Replicated mutations per second, three standbys ([`Batch`] API).
    pub mutations_per_s_3_standbys: f64,
    /// Synchronous-mode ack latency p50 (µs) of a one-mutation apply.
    pub ack_p50_us: f64,
    /// Synchronous-mode ack latency p99 (µs).
    pub ack_p99_us: f64,
    /// Bulk snapshot transfer rate (MiB/s) until the standby is ready.
    pub bulk_mib_per_s: f64,
    /// Bulk state size in MiB.
    pub bulk_mib: f64,
    /// Loopback TCP round trip p50 (µs), measured in the same run, in
    /// blocks alternating with the ack samples.
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
    /// Process CPU time (all threads, both ends, the benchmark's own
    /// building of mutations included) per replicated mutation, one
    /// standby, in microseconds: a figure that load on the machine changes
    /// far less than the rates.
    pub cpu_us_per_mutation_1_standby: f64,
    /// The same with three standbys.
    pub cpu_us_per_mutation_3_standbys: f64,
    /// Process CPU time per bulk MiB, in milliseconds.
    pub cpu_ms_per_bulk_mib: f64,
    /// Online CPUs.
    pub cpus: usize,
    /// One-minute load average when the run started.
    pub load_avg_start: f64,
    /// One-minute load average when the run ended.
    pub load_avg_end: f64,
    /// The targets and whether they are met.
    pub targets: Vec<TargetCheck>,
}

impl BenchReport {
    /// The figures and targets as a human-readable table.
    pub fn human(&self) -> String {
        use std::fmt::Write as _;
        let mut o = String::new();
        let _ = writeln!(
            o,
            "hitless bench sync (loopback TCP, {} mutations of {}+{} bytes in batches of {}; \
             {} CPUs, load average {:.1} -> {:.1})",
            self.mutations,
            self.key_len,
            self.value_len,
            self.batch,
            self.cpus,
            self.load_avg_start,
            self.load_avg_end
        );
        let _ = writeln!(
            o,
            "  loopback RTT p50 / p99        {:>10.1} / {:.1} us",
            self.loopback_rtt_p50_us, self.loopback_rtt_p99_us
        );
        let _ = writeln!(
            o,
            "  sync ack p50 / p99            {:>10.1} / {:.1} us",
            self.ack_p50_us, self.ack_p99_us
        );
        let _ = writeln!(
            o,
            "  mutations/s, 1 standby        {:>10.0}   ({:.2} us CPU per mutation)",
            self.mutations_per_s_1_standby, self.cpu_us_per_mutation_1_standby
        );
        let _ = writeln!(
            o,
            "  mutations/s, 1 standby, Vec   {:>10.0}   ({:.2} us CPU per mutation)",
            self.mutations_per_s_1_standby_owned, self.cpu_us_per_mutation_1_standby_owned
        );
        let _ = writeln!(
            o,
            "  mutations/s, 3 standbys       {:>10.0}   ({:.2} us CPU per mutation)",
            self.mutations_per_s_3_standbys, self.cpu_us_per_mutation_3_standbys
        );
        let _ = writeln!(
            o,
            "  bulk transfer                 {:>10.0} MiB/s ({:.0} MiB state, {:.2} ms CPU per MiB)",
            self.bulk_mib_per_s, self.bulk_mib, self.cpu_ms_per_bulk_mib
        );
        let _ = writeln!(o, "targets:");
        for t in &self.targets {
            let _ = writeln!(
                o,
                "  {:<34} {:>10.1} {} target {:.1} {:<7} {}",
                t.figure,
                t.value,
                if t.at_least { ">=" } else { "<=" },
                t.target,
                t.unit,
                if t.met { "met" } else { "MISSED" }
            );
        }
        o
    }
}

/// Process CPU time (user + system, all threads) in seconds, if known.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    // USER_HZ is 100 on Linux.
    Some((utime + stime) / 100.0)
}

fn load_avg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split(' ').next().and_then(|x| x.parse().ok()))
        .unwrap_or(0.0)
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
    a.activate(crate::ControlEpoch(1))?;
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
///
/// With `owned`, batches are `Vec<Mutation>`s given to [`Replica::submit`];
/// otherwise [`Batch`]es given to [`Replica::submit_batch`]. Returns the
/// rate and the process CPU seconds spent.
pub fn throughput(cfg: &BenchConfig, n: usize, owned: bool) -> Result<(f64, f64), SyncError> {
    let (a, _h, standbys) = pair(n, Durability::Async { max_lag: 1 << 20 })?;
    let value = vec![b'v'; cfg.value_len];
    let keyspace = 1u64 << 20;
    let mut k = vec![b'k'; cfg.key_len.max(8)];
    let kn = k.len();
    let mut batch = Batch::with_capacity(cfg.batch * (cfg.key_len + cfg.value_len + 16));
    let cpu0 = cpu_seconds().unwrap_or(0.0);
    let start = Instant::now();
    let mut done = 0u64;
    let mut last = 0;
    while done < cfg.mutations {
        let b = (cfg.batch as u64).min(cfg.mutations - done);
        if owned {
            let muts: Vec<Mutation> = (done..done + b)
                .map(|i| Mutation::put("kv", key(i % keyspace, cfg.key_len), value.clone()))
                .collect();
            last = a.submit(muts)?.seq;
        } else {
            batch.clear();
            for i in done..done + b {
                k[kn - 8..].copy_from_slice(&(i % keyspace).to_be_bytes());
                batch.put("kv", &k, &value)?;
            }
            last = a.submit_batch(&batch)?.seq;
        }
        done += b;
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
    let cpu = cpu_seconds().unwrap_or(0.0) - cpu0;
    a.shutdown();
    for s in standbys {
        s.shutdown();
    }
    Ok((cfg.mutations as f64 / secs, cpu.max(0.0)))
}

/// Synchronous-mode latency of one-mutation applies, in microseconds,
/// sorted, and loopback round trips of a 32-byte message measured in
/// alternating blocks of 100 with them, so both see the same machine load.
pub fn ack_latency(cfg: &BenchConfig) -> Result<(Vec<f64>, Vec<f64>), SyncError> {
    const BLOCK: usize = 100;
    let (a, _h, standbys) = pair(1, Durability::Sync)?;
    let value = vec![b'v'; cfg.value_len];
    let mut echo = Echo::start()?;
    let mut lat = Vec::with_capacity(cfg.ack_samples);
    let mut rtt = Vec::with_capacity(cfg.ack_samples);
    let mut i = 0u64;
    // Warm-up rounds of both.
    for _ in 0..200 {
        echo.round_trip()?;
        a.apply(vec![Mutation::put(
            "kv",
            key(i, cfg.key_len),
            value.clone(),
        )])?;
        i += 1;
    }
    while lat.len() < cfg.ack_samples {
        for _ in 0..BLOCK {
            rtt.push(echo.round_trip()?);
        }
        for _ in 0..BLOCK {
            let m = vec![Mutation::put("kv", key(i, cfg.key_len), value.clone())];
            i += 1;
            let t = Instant::now();
            a.apply(m)?;
            lat.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    echo.stop();
    a.shutdown();
    for s in standbys {
        s.shutdown();
    }
    lat.sort_by(f64::total_cmp);
    rtt.sort_by(f64::total_cmp);
    Ok((lat, rtt))
}

/// A loopback TCP echo of 32-byte messages (`TCP_NODELAY` on both ends).
struct Echo {
    client: Option<TcpStream>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    buf: [u8; 32],
}

impl Echo {
    fn start() -> Result<Echo, SyncError> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?;
        let thread = std::thread::spawn(move || -> std::io::Result<()> {
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
        let c = TcpStream::connect(addr)?;
        c.set_nodelay(true)?;
        Ok(Echo {
            client: Some(c),
            thread: Some(thread),
            buf: [7u8; 32],
        })
    }

    /// One round trip, in microseconds.
    fn round_trip(&mut self) -> Result<f64, SyncError> {
        let c = self.client.as_mut().expect("running");
        let t = Instant::now();
        c.write_all(&self.buf)?;
        c.read_exact(&mut self.buf)?;
        Ok(t.elapsed().as_secs_f64() * 1e6)
    }

    fn stop(&mut self) {
        self.client.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Loopback TCP round trips of a 32-byte message, microseconds, sorted.
pub fn loopback_rtt(samples: usize) -> Result<Vec<f64>, SyncError> {
    let mut echo = Echo::start()?;
    let mut out = Vec::with_capacity(samples);
    for i in 0..samples + 200 {
        let r = echo.round_trip()?;
        if i >= 200 {
            out.push(r);
        }
    }
    echo.stop();
    out.sort_by(f64::total_cmp);
    Ok(out)
}

/// Time for a new standby to receive `bulk_bytes` of state and become ready.
pub fn bulk(cfg: &BenchConfig) -> Result<(f64, f64, f64), SyncError> {
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
    let cpu0 = cpu_seconds().unwrap_or(0.0);
    let start = Instant::now();
    s.follow_tcp(h.local_addr(), true)?;
    s.wait_ready(Duration::from_secs(120))?;
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds().unwrap_or(0.0) - cpu0;
    a.shutdown();
    s.shutdown();
    let mib = bytes as f64 / (1u64 << 20) as f64;
    Ok((mib / secs, mib, cpu.max(0.0)))
}

/// Runs the benchmark.
pub fn run(cfg: &BenchConfig) -> Result<BenchReport, SyncError> {
    let load_avg_start = load_avg();
    let (ack, rtt) = ack_latency(cfg)?;
    let (m1, cpu1) = throughput(cfg, 1, false)?;
    let (m1o, cpu1o) = throughput(cfg, 1, true)?;
    let (m3, cpu3) = throughput(cfg, 3, false)?;
    let (bulk_rate, bulk_mib, cpub) = bulk(cfg)?;
    let rtt_p99 = percentile(&rtt, 0.99);
    let ack_p99 = percentile(&ack, 0.99);
    let check = |figure: &str, value: f64, target: f64, unit: &str, at_least: bool| TargetCheck {
        figure: figure.into(),
        value,
        target,
        unit: unit.into(),
        at_least,
        met: if at_least {
            value >= target
        } else {
            value <= target
        },
    };
    let targets = vec![
        check("mutations/s to 1 standby", m1, 1_000_000.0, "/s", true),
        check(
            "sync ack p99 (3 x loopback RTT p99)",
            ack_p99,
            3.0 * rtt_p99,
            "us",
            false,
        ),
        check(
            &format!("bulk MiB/s ({bulk_mib:.0} MiB state)"),
            bulk_rate,
            500.0,
            "MiB/s",
            true,
        ),
    ];
    Ok(BenchReport {
        mutations_per_s_1_standby: m1,
        mutations_per_s_1_standby_owned: m1o,
        cpu_us_per_mutation_1_standby_owned: cpu1o * 1e6 / cfg.mutations as f64,
        mutations_per_s_3_standbys: m3,
        ack_p50_us: percentile(&ack, 0.50),
        ack_p99_us: ack_p99,
        bulk_mib_per_s: bulk_rate,
        bulk_mib,
        loopback_rtt_p50_us: percentile(&rtt, 0.50),
        loopback_rtt_p99_us: rtt_p99,
        mutations: cfg.mutations,
        batch: cfg.batch,
        key_len: cfg.key_len,
        value_len: cfg.value_len,
        cpu_us_per_mutation_1_standby: cpu1 * 1e6 / cfg.mutations as f64,
        cpu_us_per_mutation_3_standbys: cpu3 * 1e6 / cfg.mutations as f64,
        cpu_ms_per_bulk_mib: cpub * 1e3 / bulk_mib.max(1e-9),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        load_avg_start,
        load_avg_end: load_avg(),
        targets,
    })
}

pub mod attach;
