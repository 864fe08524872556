//! `hitless lab`: a local pair of appliance agents on this machine, and the main job
//! (`hitless lab issu`): the pair upgraded v1 -> v2 under real client load, every
//! acknowledged write verified afterwards.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hitless_agent::api::StatusAnswer;
use hitless_core::{Outcome, Report, Role};
use hitless_image::manifest::SchemaDecl;
use serde::Serialize;

use crate::ops::{self, LAB_APIS};
use crate::{ApiArgs, Backend, LabIssuArgs, LabUpArgs};

/// The lab's default run directory.
pub const DEFAULT_DIR: &str = "/tmp/hitless-lab";
// Every lab port is below Linux's ephemeral range (32768-60999), so that no outgoing
// connection can hold one when an instance or agent needs to bind it.

/// The device's service address in the lab.
pub const SERVICE_ADDR: &str = "127.0.0.1:26380";
const PEER_ADDRS: [&str; 2] = ["127.0.0.1:27711", "127.0.0.1:27712"];
const PORT_BASES: [u16; 2] = [27800, 27900];
const NAMES: [&str; 2] = ["primary", "secondary"];

fn backend_name(b: Backend) -> &'static str {
    match b {
        Backend::Process => "process",
        Backend::Qemu => "qemu",
    }
}

fn exe_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate the hitless executable")?;
    Ok(exe
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".")))
}

/// Finds the kvd binaries built beside this executable.
fn kvd_binary(version: u32) -> anyhow::Result<PathBuf> {
    let name = format!("kvd-v{version}");
    let dir = exe_dir()?;
    for cand in [dir.join(&name), dir.join("..").join(&name)] {
        if cand.is_file() {
            return Ok(cand);
        }
    }
    bail!(
        "the reference service binary {name} is not beside {} (build it with `cargo build --release --workspace --bins`)",
        dir.display()
    )
}

/// What each kvd build understands: v1 reads and writes schema 1; v2 stores schema 2 and,
/// through its registered transforms, reads and writes schema 1 too.
fn schemas(native: u32) -> anyhow::Result<BTreeMap<String, SchemaDecl>> {
    let versions: std::collections::BTreeSet<u32> = (1..=native).collect();
    let decl = SchemaDecl {
        reads: versions.clone(),
        writes: versions,
        native,
    };
    decl.validate("kvd")?;
    Ok(BTreeMap::from([("kvd".to_owned(), decl)]))
}

/// Builds the lab's two images (kvd v1 and v2) in `dir/images`.
fn build_images(dir: &Path, backend: Backend) -> anyhow::Result<[PathBuf; 2]> {
    let mut out = Vec::new();
    for v in [1u32, 2] {
        let bin = kvd_binary(v)?;
        let version = format!("{v}.0.0");
        let img_dir = dir.join("images").join(format!("kvd-{version}"));
        let _ = std::fs::remove_dir_all(&img_dir);
        let image = match backend {
            Backend::Process => hitless_image::build::process_image(
                &img_dir,
                "kvd",
                &version,
                &bin,
                &[],
                &schemas(v)?,
            ),
            Backend::Qemu => hitless_image::build::vm_image(
                &img_dir,
                "kvd",
                &version,
                &bin,
                &vm_args(),
                &schemas(v)?,
                None,
            ),
        }
        .with_context(|| format!("building the kvd {version} image"))?;
        out.push(image.dir);
    }
    Ok([out[0].clone(), out[1].clone()])
}

/// Arguments of kvd inside a VM guest: none; what differs per instance comes from the
/// `hitless.*` kernel parameters the agent sets.
fn vm_args() -> Vec<String> {
    Vec::new()
}

fn write_config(dir: &Path, i: usize, backend: Backend, image: &Path) -> anyhow::Result<PathBuf> {
    let text = format!(
        r#"# hitless lab: the {name} appliance
appliance = "{name}"
api_listen = "{api}"
peer_listen = "{listen}"
peer_addr = "{peer}"
service_addr = "{service}"
data_dir = "{data}"
image = "{image}"
backend = "{backend}"

[heartbeat]
interval_ms = {hb_interval}
misses = {hb_misses}

[instances]
port_base = {port_base}
memory_mib = {mem}
cpu_percent = 200
vcpus = 1
stop_grace_ms = 3000
"#,
        name = NAMES[i],
        api = LAB_APIS[i],
        listen = PEER_ADDRS[i],
        peer = PEER_ADDRS[1 - i],
        service = SERVICE_ADDR,
        data = dir.join(NAMES[i]).display(),
        image = image.display(),
        backend = backend_name(backend),
        port_base = PORT_BASES[i],
        mem = if backend == Backend::Qemu { 256 } else { 512 },
        // Software-emulated guests saturate the CPUs; the peer's failure detection allows
        // for it (processes use the defaults: 50 ms x 3).
        hb_interval = if backend == Backend::Qemu { 100 } else { 50 },
        hb_misses = if backend == Backend::Qemu { 20 } else { 3 },
    );
    let path = dir.join(format!("{}.toml", NAMES[i]));
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Starts the agent of appliance `i` in the background; returns its pid.
fn spawn_agent(dir: &Path, i: usize) -> anyhow::Result<u32> {
    let exe = std::env::current_exe()?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{}.log", NAMES[i])))?;
    let child = Command::new(exe)
        .args(["agent", "--config"])
        .arg(dir.join(format!("{}.toml", NAMES[i])))
        .env(
            "HITLESS_LOG",
            std::env::var("HITLESS_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting an agent")?;
    let pid = child.id();
    std::fs::write(dir.join(format!("{}.pid", NAMES[i])), pid.to_string())?;
    Ok(pid)
}

use std::os::unix::process::CommandExt;

fn pid_of(dir: &Path, i: usize) -> Option<i32> {
    std::fs::read_to_string(dir.join(format!("{}.pid", NAMES[i])))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether `pid` runs (a zombie, ended but not yet reaped, does not).
fn alive(pid: i32) -> bool {
    // SAFETY: kill(2) with signal 0 only checks that the process exists; no memory is shared.
    let exists = unsafe { libc::kill(pid, 0) == 0 };
    if !exists {
        return false;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state follows the parenthesised command name.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z') | Some('X'))
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) takes plain integers; a stale pid is at worst an ESRCH error.
    unsafe {
        libc::kill(pid, sig);
    }
}

const SIGKILL: i32 = libc::SIGKILL;
const SIGTERM: i32 = libc::SIGTERM;

/// Waits until the pair is up: an instance in control and a ready HA standby.
fn wait_pair(bound: Duration) -> anyhow::Result<StatusAnswer> {
    let start = Instant::now();
    let mut last = String::from("no answer yet");
    while start.elapsed() < bound {
        match ops::driving_status(&ApiArgs { api: None }) {
            Ok((_, s)) => {
                if let Some(e) = &s.engine {
                    let ha_ready = e
                        .instances
                        .iter()
                        .any(|r| r.role == Role::HaStandby && format!("{:?}", r.state) == "Ready");
                    if e.in_control.is_some() && ha_ready {
                        return Ok(s);
                    }
                    last = format!("phase {}", e.phase);
                } else {
                    last = "no agent drives yet".into();
                }
            }
            Err(e) => last = format!("{e:#}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("the lab pair was not up within {bound:?} ({last}); see the agents' logs")
}

/// `hitless lab up`.
pub fn up(args: &LabUpArgs) -> anyhow::Result<()> {
    let s = up_inner(args)?;
    println!(
        "lab up in {}: service address {SERVICE_ADDR}, agents' API {} and {}",
        args.dir.display(),
        LAB_APIS[0],
        LAB_APIS[1]
    );
    ops::print_status(&s);
    Ok(())
}

fn up_inner(args: &LabUpArgs) -> anyhow::Result<StatusAnswer> {
    let dir = &args.dir;
    for i in 0..2 {
        if let Some(pid) = pid_of(dir, i) {
            if alive(pid) {
                bail!(
                    "a lab is already running in {} (agent pid {pid}); run `hitless lab down` first",
                    dir.display()
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let images = build_images(dir, args.backend)?;
    for i in 0..2 {
        write_config(dir, i, args.backend, &images[0])?;
    }
    std::fs::write(dir.join("backend"), backend_name(args.backend))?;
    for i in [1, 0] {
        spawn_agent(dir, i)?;
    }
    let bound = match args.backend {
        Backend::Process => Duration::from_secs(60),
        Backend::Qemu => Duration::from_secs(600),
    };
    wait_pair(bound)
}

/// `hitless lab down`.
pub fn down(dir: &Path) -> anyhow::Result<()> {
    let stopped = stop_agents(dir);
    println!(
        "lab down: {stopped} agent(s) stopped; logs kept in {}",
        dir.display()
    );
    Ok(())
}

/// Stops the lab's agents (gracefully, then by force); returns how many were running.
fn stop_agents(dir: &Path) -> usize {
    // Both at once: stopping one first would look like an appliance loss to the other.
    let pids: Vec<i32> = (0..2)
        .filter_map(|i| pid_of(dir, i))
        .filter(|p| alive(*p))
        .collect();
    for p in &pids {
        signal(*p, SIGTERM);
    }
    let start = Instant::now();
    while pids.iter().any(|p| alive(*p)) && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    for p in &pids {
        if alive(*p) {
            signal(*p, SIGKILL);
        }
    }
    pids.len()
}

/// `hitless lab status`.
pub fn status(dir: &Path, json: bool) -> anyhow::Result<()> {
    if !dir.exists() {
        bail!(
            "no lab in {} (start one with `hitless lab up`)",
            dir.display()
        );
    }
    ops::status(&ApiArgs { api: None }, json)
}

/// The report of `hitless lab issu`.
#[derive(Debug, Clone, Serialize)]
pub struct IssuReport {
    pub result: String,
    pub from_version: String,
    pub to_version: String,
    pub backend: String,
    pub fault: Option<String>,
    pub fault_injected: bool,
    pub final_control: FinalControl,
    pub acked_writes: u64,
    pub acked_lost: u64,
    pub client_errors: u64,
    pub max_gap_ms: f64,
    /// When the longest gap ended, in seconds since the ISSU started.
    pub max_gap_at_s: f64,
    pub failover_ms: Option<f64>,
    pub switchovers: u64,
    pub issu_seconds: f64,
    /// Most instances running at once during the ISSU (both appliances).
    pub peak_instances: u64,
    /// Kernel releases reported by VM guests.
    pub guest_kernels: Vec<String>,
    pub benchmark: BenchSummary,
    pub outcome_detail: String,
    pub timeline: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FinalControl {
    pub appliance: String,
    pub version: String,
    pub epoch: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct BenchSummary {
    pub tool: String,
    pub tests: BTreeMap<String, f64>,
    pub errors: u64,
}

// ---------------------------------------------------------------------------------------------
// The checking client: writes continuously, records every acknowledged write.

struct Checker {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Vec<(String, String)>>>,
    stats: Arc<CheckerStats>,
}

struct CheckerStats {
    acked: AtomicU64,
    errors: AtomicU64,
    origin: Instant,
    /// Nanoseconds since `origin` of the last acknowledged write.
    last_ack_ns: AtomicU64,
    /// Longest interval without an acknowledged write while gaps are measured.
    max_gap_ns: AtomicU64,
    /// When that interval ended (ns since origin).
    max_gap_end_ns: AtomicU64,
    measuring: AtomicBool,
    /// When a fault was injected (ns since origin).
    mark_ns: AtomicU64,
    /// Longest interval without an acknowledged write that ended within 5 s after the mark:
    /// the outage the fault caused.
    max_gap_after_mark_ns: AtomicU64,
    error_samples: Mutex<Vec<String>>,
}

fn resp_command(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", parts.len()).into_bytes();
    for p in parts {
        out.extend_from_slice(format!("${}\r\n", p.len()).as_bytes());
        out.extend_from_slice(p);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn read_line(r: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    let mut line = String::new();
    let n = r.read_line(&mut line)?;
    if n == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    Ok(line.trim_end().to_owned())
}

fn connect(addr: SocketAddr) -> std::io::Result<(TcpStream, BufReader<TcpStream>)> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(15)))?;
    let r = BufReader::new(s.try_clone()?);
    Ok((s, r))
}

impl Checker {
    fn start(addr: SocketAddr, writers: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(CheckerStats {
            acked: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            origin: Instant::now(),
            last_ack_ns: AtomicU64::new(0),
            max_gap_ns: AtomicU64::new(0),
            max_gap_end_ns: AtomicU64::new(0),
            measuring: AtomicBool::new(false),
            mark_ns: AtomicU64::new(u64::MAX),
            max_gap_after_mark_ns: AtomicU64::new(0),
            error_samples: Mutex::new(Vec::new()),
        });
        let threads = (0..writers)
            .map(|w| {
                let stop = stop.clone();
                let stats = stats.clone();
                std::thread::spawn(move || writer(addr, w, &stop, &stats))
            })
            .collect();
        Checker {
            stop,
            threads,
            stats,
        }
    }

    fn finish(self) -> Vec<(String, String)> {
        self.stop.store(true, Ordering::Release);
        self.threads
            .into_iter()
            .flat_map(|t| t.join().unwrap_or_default())
            .collect()
    }
}

fn writer(
    addr: SocketAddr,
    w: usize,
    stop: &AtomicBool,
    stats: &CheckerStats,
) -> Vec<(String, String)> {
    let mut acked = Vec::new();
    let mut conn: Option<(TcpStream, BufReader<TcpStream>)> = None;
    let mut i: u64 = 0;
    let mut reconnects = 0u32;
    while !stop.load(Ordering::Acquire) {
        if conn.is_none() {
            match connect(addr) {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    reconnects += 1;
                    if reconnects > 600 {
                        break; // bounded: a minute of failed reconnects
                    }
                    note_error(stats, format!("connect: {e}"));
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            }
        }
        let key = format!("check:{w}:{i}");
        let val = format!("v{i}-{}", i.wrapping_mul(2654435761) % 1_000_003);
        let (s, r) = conn.as_mut().expect("connected");
        let cmd = resp_command(&[b"SET", key.as_bytes(), val.as_bytes()]);
        let res = s.write_all(&cmd).and_then(|_| read_line(r));
        match res {
            Ok(line) if line == "+OK" => {
                let now = stats.origin.elapsed().as_nanos() as u64;
                let prev = stats.last_ack_ns.swap(now, Ordering::AcqRel);
                if stats.measuring.load(Ordering::Acquire) && prev > 0 && now > prev {
                    let gap = now - prev;
                    if stats.max_gap_ns.fetch_max(gap, Ordering::AcqRel) < gap {
                        stats.max_gap_end_ns.store(now, Ordering::Release);
                    }
                }
                let mark = stats.mark_ns.load(Ordering::Acquire);
                if now >= mark && now - mark < 5_000_000_000 && prev > 0 {
                    stats
                        .max_gap_after_mark_ns
                        .fetch_max(now.saturating_sub(prev), Ordering::AcqRel);
                }
                stats.acked.fetch_add(1, Ordering::Relaxed);
                acked.push((key, val));
                i += 1;
            }
            Ok(other) => {
                note_error(stats, format!("SET {key}: {other}"));
                i += 1;
            }
            Err(e) => {
                note_error(stats, format!("SET {key}: {e}"));
                conn = None;
                i += 1;
            }
        }
    }
    acked
}

fn note_error(stats: &CheckerStats, msg: String) {
    stats.errors.fetch_add(1, Ordering::Relaxed);
    let mut s = stats.error_samples.lock().expect("samples lock");
    if s.len() < 10 {
        s.push(msg);
    }
}

/// Reads every acknowledged key back through the service address; returns how many are
/// missing or hold another value.
fn verify(addr: SocketAddr, acked: &[(String, String)]) -> anyhow::Result<(u64, Vec<String>)> {
    let (mut s, mut r) = connect(addr).context("connecting to verify")?;
    let mut lost = 0;
    let mut samples = Vec::new();
    for chunk in acked.chunks(500) {
        let mut parts: Vec<&[u8]> = vec![b"MGET"];
        parts.extend(chunk.iter().map(|(k, _)| k.as_bytes()));
        s.write_all(&resp_command(&parts))?;
        let header = read_line(&mut r)?;
        let n: usize = header
            .strip_prefix('*')
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("unexpected MGET reply {header:?}"))?;
        if n != chunk.len() {
            bail!("MGET answered {n} values for {} keys", chunk.len());
        }
        for (k, v) in chunk {
            let h = read_line(&mut r)?;
            let got = if h == "$-1" {
                None
            } else {
                let len: usize = h
                    .strip_prefix('$')
                    .and_then(|n| n.parse().ok())
                    .with_context(|| format!("unexpected bulk header {h:?}"))?;
                let mut buf = vec![0u8; len + 2];
                r.read_exact(&mut buf)?;
                buf.truncate(len);
                Some(String::from_utf8_lossy(&buf).into_owned())
            };
            if got.as_deref() != Some(v.as_str()) {
                lost += 1;
                if samples.len() < 10 {
                    samples.push(format!("{k}: expected {v:?}, found {got:?}"));
                }
            }
        }
    }
    Ok((lost, samples))
}

// ---------------------------------------------------------------------------------------------
// What runs during the ISSU, sampled from the agents' status.

struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(u64, Vec<String>)>,
}

impl Sampler {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0u64;
            let mut kernels = std::collections::BTreeSet::new();
            // Bounded by the ISSU's own bound; stops when told.
            while !s.load(Ordering::Acquire) {
                if let Ok((_, st)) = ops::driving_status(&ApiArgs { api: None }) {
                    let all: Vec<_> = st
                        .local
                        .instances
                        .iter()
                        .chain(st.peer.iter().flat_map(|p| p.instances.iter()))
                        .collect();
                    peak = peak.max(all.len() as u64);
                    kernels.extend(all.iter().filter_map(|i| i.kernel_release.clone()));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            (peak, kernels.into_iter().collect())
        });
        Self { stop, thread }
    }

    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Release);
        self.thread.join().unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------------------------
// redis-benchmark as a second, independent client.

fn require_redis_tools() -> anyhow::Result<()> {
    for tool in ["redis-benchmark", "redis-cli"] {
        let ok = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            bail!(
                "{tool} is not installed; the lab uses Redis's own clients to judge the upgrade. Install them with `apt-get install redis-tools` (or run scripts/setup)"
            );
        }
    }
    Ok(())
}

/// redis-benchmark run again and again (each pass completes and prints its figures) until
/// told to stop; the pass under way then finishes (bounded) so its figures count too.
struct Benchmark {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<String>,
}

impl Benchmark {
    fn start(dir: &Path, addr: SocketAddr, requests: u32) -> anyhow::Result<Self> {
        require_redis_tools()?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let out_path = dir.join("redis-benchmark.out");
        let thread = std::thread::spawn(move || {
            let mut all = String::new();
            // Bounded: one pass takes about a second; the lab stops it within its own bound.
            for _ in 0..10_000 {
                if s.load(Ordering::Acquire) {
                    break;
                }
                let child = Command::new("redis-benchmark")
                    .args([
                        "-h",
                        &addr.ip().to_string(),
                        "-p",
                        &addr.port().to_string(),
                        "-c",
                        "4",
                        "-n",
                        &requests.to_string(),
                        "-r",
                        "10000",
                        "-t",
                        "set,get,incr,lpush,rpush,lpop,rpop,sadd,hset,spop,zadd,zpopmin,lrange_100,mset",
                        "--csv",
                    ])
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn();
                let Ok(mut child) = child else {
                    all.push_str("error: cannot start redis-benchmark\n");
                    break;
                };
                // Bound one pass: at most 10 s once the lab asked to stop, 120 s in all. A
                // pass cut short loses its unprinted figures, not its errors.
                let started = Instant::now();
                let mut stop_seen: Option<Instant> = None;
                loop {
                    match child.try_wait() {
                        Ok(Some(_)) | Err(_) => break,
                        Ok(None) => {
                            if s.load(Ordering::Acquire) {
                                stop_seen.get_or_insert_with(Instant::now);
                            }
                            let late =
                                stop_seen.is_some_and(|t| t.elapsed() > Duration::from_secs(10));
                            if late || started.elapsed() > Duration::from_secs(120) {
                                let _ = child.kill();
                                break;
                            }
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                }
                if let Ok(out) = child.wait_with_output() {
                    all.push_str(&String::from_utf8_lossy(&out.stdout));
                    all.push_str(&String::from_utf8_lossy(&out.stderr));
                }
            }
            let _ = std::fs::write(&out_path, &all);
            all
        });
        Ok(Self { stop, thread })
    }

    fn finish(self) -> BenchSummary {
        self.stop.store(true, Ordering::Release);
        let text = self.thread.join().unwrap_or_default();
        parse_benchmark(&text)
    }
}

/// Parses redis-benchmark's CSV output (`"TEST","rps",...`); any line mentioning an error
/// counts as a client error.
fn parse_benchmark(text: &str) -> BenchSummary {
    let mut s = BenchSummary {
        tool: "redis-benchmark".into(),
        ..Default::default()
    };
    let mut sums: BTreeMap<String, (f64, u32)> = BTreeMap::new();
    for raw in text.split(['\n', '\r']) {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        let lower = line.to_ascii_lowercase();
        if lower.contains("error") {
            s.errors += 1;
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(|f| f.trim_matches('"')).collect();
        if fields.len() >= 2 && fields[0] != "test" {
            if let Ok(rps) = fields[1].parse::<f64>() {
                let e = sums.entry(fields[0].to_owned()).or_default();
                e.0 += rps;
                e.1 += 1;
            }
        }
    }
    s.tests = sums
        .into_iter()
        .map(|(k, (sum, n))| (k, (sum / f64::from(n)).round()))
        .collect();
    s
}

// ---------------------------------------------------------------------------------------------
// Faults done for real.

fn find_pid(s: &StatusAnswer, id: hitless_core::InstanceId) -> Option<u32> {
    s.local
        .instances
        .iter()
        .chain(s.peer.iter().flat_map(|p| p.instances.iter()))
        .find(|x| x.instance == id)
        .and_then(|x| x.pid)
}

/// Injects `kind`; returns a description of what was done.
fn inject(dir: &Path, kind: &str) -> anyhow::Result<String> {
    let (api, s) = ops::driving_status(&ApiArgs { api: None })?;
    let engine = s.engine.clone().context("no engine status")?;
    let newest = engine
        .instances
        .iter()
        .filter(|r| r.state.is_live())
        .map(|r| r.id)
        .max();
    let ha = engine
        .instances
        .iter()
        .find(|r| r.role == Role::HaStandby && r.state.is_live())
        .map(|r| r.id);
    let kill_instance = |id: Option<hitless_core::InstanceId>, sig: i32, what: &str| {
        let id = id.with_context(|| format!("no {what} instance to fault"))?;
        let pid = find_pid(&s, id).with_context(|| format!("no pid known for {id}"))?;
        signal(pid as i32, sig);
        Ok::<_, anyhow::Error>(format!("signal {sig} to {what} instance {id} (pid {pid})"))
    };
    match kind {
        "crash-active" => kill_instance(engine.in_control, SIGKILL, "in-control"),
        "crash-new" | "start-fail" => kill_instance(newest, SIGKILL, "newest"),
        "crash-standby" => kill_instance(ha, SIGKILL, "HA standby"),
        "heartbeat-lost" => kill_instance(engine.in_control, libc::SIGSTOP, "in-control (stopped)"),
        "standby-out-of-sync" => kill_instance(ha, libc::SIGSTOP, "HA standby (stopped)"),
        "timeout" => kill_instance(newest, libc::SIGSTOP, "newest (stopped)"),
        "appliance-lost-primary" | "appliance-lost-secondary" => {
            let i = usize::from(kind.ends_with("secondary"));
            let pid = pid_of(dir, i).context("no agent pid")?;
            signal(pid, SIGKILL);
            Ok(format!("kill -9 of the {} agent (pid {pid})", NAMES[i]))
        }
        "abort" | "rollback" => {
            let msg = ops::post(&api, &format!("/v1/{kind}"), serde_json::json!({}))?;
            Ok(format!("operator {kind}: {msg}"))
        }
        other => bail!("the lab cannot inject fault kind {other:?}"),
    }
}

fn parse_fault(f: &str) -> anyhow::Result<(String, String)> {
    let catalog = hitless_core::sim::fault_catalog();
    let (kind, step) = f.split_once('@').with_context(|| {
        format!("fault {f:?} is not KIND@STEP (see `hitless sim issu --list-faults`)")
    })?;
    if !catalog.iter().any(|c| c.to_string() == f) {
        bail!("unknown fault {f:?}; `hitless sim issu --list-faults` lists the accepted ones");
    }
    Ok((kind.to_owned(), step.to_owned()))
}

// ---------------------------------------------------------------------------------------------

/// `hitless lab issu`.
pub fn issu(args: &LabIssuArgs) -> anyhow::Result<()> {
    require_redis_tools()?;
    let fault = args.fault.as_deref().map(parse_fault).transpose()?;
    let dir = args.up.dir.clone();
    if !args.json {
        eprintln!(
            "bringing the lab up ({} backend)...",
            backend_name(args.up.backend)
        );
    }
    let result = run_issu(args, fault.as_ref());
    if !args.keep {
        stop_agents(&dir);
    }
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    if report.acked_lost > 0 {
        bail!("{} acknowledged writes were lost", report.acked_lost);
    }
    Ok(())
}

fn run_issu(args: &LabIssuArgs, fault: Option<&(String, String)>) -> anyhow::Result<IssuReport> {
    let dir = &args.up.dir;
    let up_started = Instant::now();
    let before = up_inner(&args.up)?;
    if !args.json {
        eprintln!("lab up in {:.1} s", up_started.elapsed().as_secs_f64());
    }
    let service: SocketAddr = SERVICE_ADDR.parse()?;
    let checker = Checker::start(service, 2);
    let requests = match args.up.backend {
        Backend::Process => 1000,
        Backend::Qemu => 100,
    };
    let bench = Benchmark::start(dir, service, requests)?;
    std::thread::sleep(Duration::from_millis(500));
    let from_version = before
        .engine
        .as_ref()
        .and_then(|e| e.control_version)
        .map(|v| v.to_string())
        .unwrap_or_default();
    let target = dir.join("images").join("kvd-2.0.0");
    let (api, _) = ops::driving_status(&ApiArgs { api: None })?;
    let since = ops::get::<Vec<hitless_agent::driver::ProgressLine>>(&api, "/v1/progress")?
        .last()
        .map(|l| l.seq + 1)
        .unwrap_or(0);
    checker.stats.measuring.store(true, Ordering::Release);
    let sampler = Sampler::start();
    let issu_start = Instant::now();
    let issu_offset_s = checker.stats.origin.elapsed().as_secs_f64();
    ops::post(&api, "/v1/upgrade", serde_json::json!({ "image": target }))?;
    let mut injected = false;
    let mut timeline = Vec::new();
    let mut fault_error = None;
    let mut restart: Option<std::thread::JoinHandle<String>> = None;
    let bound = match args.up.backend {
        Backend::Process => Duration::from_secs(300),
        Backend::Qemu => Duration::from_secs(1800),
    };
    let end = ops::follow(&api, since, bound, true, |l| {
        let line = format!(
            "{:>7.3} s  {}",
            issu_start.elapsed().as_secs_f64(),
            ops::describe(l)
        );
        if !args.json {
            eprintln!("{line}");
        }
        timeline.push(line);
        if let (Some((kind, step)), false) = (fault, injected) {
            if let Report::Step { step: s, .. } = &l.report {
                if s.name() == step {
                    injected = true;
                    // Let the step get under way before a failure; an operator command goes in
                    // at once (the step may be over in less than that on processes).
                    if kind != "abort" && kind != "rollback" {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    checker.stats.mark_ns.store(
                        checker.stats.origin.elapsed().as_nanos() as u64,
                        Ordering::Release,
                    );
                    match inject(dir, kind) {
                        Ok(what) => {
                            let line = format!(
                                "{:>7.3} s  fault: {what}",
                                issu_start.elapsed().as_secs_f64()
                            );
                            if !args.json {
                                eprintln!("{line}");
                            }
                            timeline.push(line);
                            if kind.starts_with("appliance-lost") {
                                // The agent is restarted a moment later, on the same
                                // configuration and journal; it rejoins the pair.
                                let i = usize::from(kind.ends_with("secondary"));
                                let d = dir.clone();
                                restart = Some(std::thread::spawn(move || {
                                    std::thread::sleep(Duration::from_millis(1500));
                                    let at = issu_start.elapsed().as_secs_f64();
                                    match spawn_agent(&d, i) {
                                        Ok(pid) => format!(
                                            "{at:>7.3} s  the {} agent restarted (pid {pid}) on its configuration and journal",
                                            NAMES[i]
                                        ),
                                        Err(e) => format!(
                                            "{at:>7.3} s  the {} agent could not be restarted: {e:#}",
                                            NAMES[i]
                                        ),
                                    }
                                }));
                            }
                        }
                        Err(e) => fault_error = Some(format!("{e:#}")),
                    }
                }
            }
        }
    });
    let issu_seconds = issu_start.elapsed().as_secs_f64();
    if let Some(line) = restart.take().and_then(|t| t.join().ok()) {
        if !args.json {
            eprintln!("{line}");
        }
        timeline.push(line);
    }
    checker.stats.measuring.store(false, Ordering::Release);
    let (peak_instances, guest_kernels) = sampler.finish();
    // Let the load run a moment on the final instance in control.
    std::thread::sleep(Duration::from_millis(300));
    let errors_during = checker.stats.errors.load(Ordering::Relaxed);
    let bench_summary = bench.finish();
    let acked = {
        let stats = checker.stats.clone();
        let acked = checker.finish();
        (acked, stats)
    };
    let (acked, stats) = acked;
    let end = end?;
    if let Some(e) = fault_error {
        bail!("the fault could not be injected: {e}");
    }
    let (lost, samples) = verify(service, &acked)?;
    for s in &samples {
        eprintln!("LOST: {s}");
    }
    for s in stats.error_samples.lock().expect("samples").iter() {
        eprintln!("client error: {s}");
    }
    let (_, after) = ops::driving_status(&ApiArgs { api: None })?;
    let engine = after.engine.clone().unwrap_or_else(|| {
        before
            .engine
            .clone()
            .expect("engine status before the ISSU")
    });
    let control = engine
        .in_control
        .and_then(|id| engine.instances.iter().find(|r| r.id == id));
    let (result, detail, to_version) = match &end.outcome {
        Outcome::Committed { version } => (
            "committed",
            format!("all instances on {version}"),
            version.to_string(),
        ),
        Outcome::RolledBack { version, reason } => ("rolled_back", reason.clone(), {
            let _ = version;
            "2.0.0".to_owned()
        }),
    };
    let outage = stats.max_gap_after_mark_ns.load(Ordering::Acquire);
    let failover_ms = (injected && outage > 0).then(|| outage as f64 / 1e6);
    Ok(IssuReport {
        result: result.into(),
        from_version,
        to_version,
        backend: backend_name(args.up.backend).into(),
        fault: args.fault.clone(),
        fault_injected: injected,
        final_control: FinalControl {
            appliance: control.map(|c| c.appliance.to_string()).unwrap_or_default(),
            version: control.map(|c| c.version.to_string()).unwrap_or_default(),
            epoch: engine.epoch.0,
        },
        acked_writes: acked.len() as u64,
        acked_lost: lost,
        client_errors: errors_during + bench_summary.errors,
        max_gap_ms: stats.max_gap_ns.load(Ordering::Acquire) as f64 / 1e6,
        max_gap_at_s: (stats.max_gap_end_ns.load(Ordering::Acquire) as f64 / 1e9 - issu_offset_s)
            .max(0.0),
        failover_ms,
        switchovers: end.switchovers,
        issu_seconds,
        peak_instances,
        guest_kernels,
        benchmark: bench_summary,
        outcome_detail: detail,
        timeline,
    })
}

fn print_report(r: &IssuReport) {
    println!();
    println!(
        "hitless lab issu: {} ({} backend)",
        r.result.replace('_', " "),
        r.backend
    );
    println!(
        "  upgrade            {} -> {}",
        r.from_version, r.to_version
    );
    if let Some(f) = &r.fault {
        println!("  fault              {f} (injected: {})", r.fault_injected);
    }
    println!("  outcome            {}", r.outcome_detail);
    println!(
        "  in control now     {} appliance, version {}, epoch {}",
        r.final_control.appliance, r.final_control.version, r.final_control.epoch
    );
    println!(
        "  acknowledged writes {} verified, {} lost",
        r.acked_writes, r.acked_lost
    );
    println!("  client errors      {}", r.client_errors);
    println!(
        "  longest ack gap    {:.1} ms (ending {:.3} s into the ISSU)",
        r.max_gap_ms, r.max_gap_at_s
    );
    if let Some(f) = r.failover_ms {
        println!(
            "  outage at fault    {f:.1} ms (longest gap between acknowledged writes around it)"
        );
    }
    println!("  control moves      {}", r.switchovers);
    println!("  ISSU duration      {:.2} s", r.issu_seconds);
    println!("  peak instances     {}", r.peak_instances);
    if !r.guest_kernels.is_empty() {
        println!("  guest kernels      {}", r.guest_kernels.join(", "));
    }
    if !r.benchmark.tests.is_empty() {
        let tests: Vec<String> = r
            .benchmark
            .tests
            .iter()
            .map(|(k, v)| format!("{k} {v:.0}/s"))
            .collect();
        println!("  redis-benchmark    {}", tests.join(", "));
    }
}
