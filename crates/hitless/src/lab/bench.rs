//! redis-benchmark as a second, independent client.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;

use super::report::BenchSummary;

pub(super) fn require_redis_tools() -> anyhow::Result<()> {
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
pub(super) struct Benchmark {
    stop: Arc<AtomicBool>,
    clients: u32,
    thread: std::thread::JoinHandle<String>,
}

impl Benchmark {
    /// Starts the passes: `clients` connections (`-c`), `requests` requests per test, at
    /// least two per connection.
    pub(super) fn start(
        dir: &Path,
        addr: SocketAddr,
        clients: u32,
        requests: u32,
    ) -> anyhow::Result<Self> {
        let requests = requests.max(clients.saturating_mul(2));
        require_redis_tools()?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let out_path = dir.join("redis-benchmark.out");
        let line_buffering = Command::new("stdbuf")
            .args(["-oL", "true"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let thread = std::thread::spawn(move || {
            let mut all = String::new();
            // Bounded: one pass takes about a second; the lab stops it within its own bound.
            for _ in 0..10_000 {
                if s.load(Ordering::Acquire) {
                    break;
                }
                // Line-buffered: a pass cut short at the end keeps the figures of the tests
                // it completed (redis-benchmark's stdout is a pipe here).
                let mut cmd = if line_buffering {
                    let mut c = Command::new("stdbuf");
                    c.args(["-oL", "redis-benchmark"]);
                    c
                } else {
                    Command::new("redis-benchmark")
                };
                let child = cmd
                    .args([
                        "-h",
                        &addr.ip().to_string(),
                        "-p",
                        &addr.port().to_string(),
                        "-c",
                        &clients.to_string(),
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
        Ok(Self {
            stop,
            clients,
            thread,
        })
    }

    pub(super) fn finish(self) -> BenchSummary {
        self.stop.store(true, Ordering::Release);
        let text = self.thread.join().unwrap_or_default();
        BenchSummary {
            clients: u64::from(self.clients),
            ..parse_benchmark(&text)
        }
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
