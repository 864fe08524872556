//! The checking client: writes continuously through the service address and records every
//! acknowledged write, so that none can be lost unnoticed.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

pub(super) struct Checker {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Vec<(String, String)>>>,
    pub(super) stats: Arc<CheckerStats>,
}

pub(super) struct CheckerStats {
    pub(super) acked: AtomicU64,
    pub(super) errors: AtomicU64,
    pub(super) origin: Instant,
    /// Nanoseconds since `origin` of the last acknowledged write.
    pub(super) last_ack_ns: AtomicU64,
    /// Longest interval without an acknowledged write while gaps are measured.
    pub(super) max_gap_ns: AtomicU64,
    /// When that interval ended (ns since origin).
    pub(super) max_gap_end_ns: AtomicU64,
    pub(super) measuring: AtomicBool,
    /// Longest interval without an acknowledged write while `steady` (under the same client
    /// load, before the ISSU): what the ISSU's gap is compared with.
    pub(super) steady_max_gap_ns: AtomicU64,
    pub(super) steady: AtomicBool,
    /// When a fault was injected (ns since origin).
    pub(super) mark_ns: AtomicU64,
    /// Longest interval without an acknowledged write that ended within 5 s after the mark:
    /// the outage the fault caused.
    pub(super) max_gap_after_mark_ns: AtomicU64,
    pub(super) error_samples: Mutex<Vec<String>>,
}

pub(super) fn resp_command(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", parts.len()).into_bytes();
    for p in parts {
        out.extend_from_slice(format!("${}\r\n", p.len()).as_bytes());
        out.extend_from_slice(p);
        out.extend_from_slice(b"\r\n");
    }
    out
}

pub(super) fn read_line(r: &mut BufReader<TcpStream>) -> std::io::Result<String> {
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

pub(super) fn connect(addr: SocketAddr) -> std::io::Result<(TcpStream, BufReader<TcpStream>)> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(15)))?;
    let r = BufReader::new(s.try_clone()?);
    Ok((s, r))
}

impl CheckerStats {
    /// Ends the measurement: a gap still open (no acknowledgement since the last one, or
    /// since the fault) counts up to now, so that a client left waiting until the end is not
    /// taken for one that was never interrupted.
    pub(super) fn close(&self) {
        let now = self.origin.elapsed().as_nanos() as u64;
        let last = self.last_ack_ns.load(Ordering::Acquire);
        if last > 0 && now > last {
            let gap = now - last;
            if self.max_gap_ns.fetch_max(gap, Ordering::AcqRel) < gap {
                self.max_gap_end_ns.store(now, Ordering::Release);
            }
            let mark = self.mark_ns.load(Ordering::Acquire);
            if mark != u64::MAX && now >= mark {
                self.max_gap_after_mark_ns.fetch_max(gap, Ordering::AcqRel);
            }
        }
        self.measuring.store(false, Ordering::Release);
    }
}

impl Checker {
    /// Starts `writers` writing clients; a write unanswered for `reply_timeout` counts as an
    /// error and the client reconnects (a client whose server moved to another host waits
    /// for a reply that never comes: only its timeout ends the wait).
    pub(super) fn start(addr: SocketAddr, writers: usize, reply_timeout: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(CheckerStats {
            acked: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            origin: Instant::now(),
            last_ack_ns: AtomicU64::new(0),
            max_gap_ns: AtomicU64::new(0),
            max_gap_end_ns: AtomicU64::new(0),
            measuring: AtomicBool::new(false),
            steady_max_gap_ns: AtomicU64::new(0),
            steady: AtomicBool::new(false),
            mark_ns: AtomicU64::new(u64::MAX),
            max_gap_after_mark_ns: AtomicU64::new(0),
            error_samples: Mutex::new(Vec::new()),
        });
        let threads = (0..writers)
            .map(|w| {
                let stop = stop.clone();
                let stats = stats.clone();
                std::thread::spawn(move || writer(addr, w, reply_timeout, &stop, &stats))
            })
            .collect();
        Checker {
            stop,
            threads,
            stats,
        }
    }

    pub(super) fn finish(self) -> Vec<(String, String)> {
        self.stop.store(true, Ordering::Release);
        self.threads
            .into_iter()
            .flat_map(|t| t.join().unwrap_or_default())
            .collect()
    }
}

/// How long a writer waits after a failed connect before the next. Short, so that the outage
/// it measures is the service's and not its own: a pause of 100 ms added up to 100 ms to
/// every failover it timed (the attempts of all writers fail together, at the same instant).
const RECONNECT_PAUSE: Duration = Duration::from_millis(10);

/// Failed connects are counted as client errors at most this often per writer.
const COUNTED_EVERY: Duration = Duration::from_millis(100);

/// Failed connects after which a writer gives up: about a minute of them.
const MAX_RECONNECTS: u32 = 6_000;

fn writer(
    addr: SocketAddr,
    w: usize,
    reply_timeout: Duration,
    stop: &AtomicBool,
    stats: &CheckerStats,
) -> Vec<(String, String)> {
    let mut acked = Vec::new();
    let mut conn: Option<(TcpStream, BufReader<TcpStream>)> = None;
    let mut i: u64 = 0;
    let mut reconnects = 0u32;
    let mut last_counted: Option<Instant> = None;
    while !stop.load(Ordering::Acquire) {
        if conn.is_none() {
            match connect(addr).and_then(|(s, r)| {
                s.set_read_timeout(Some(reply_timeout))?;
                Ok((s, r))
            }) {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    reconnects += 1;
                    if reconnects > MAX_RECONNECTS {
                        break; // bounded: a minute of failed reconnects
                    }
                    // Counted as before the pause was shortened: one error per 100 ms of
                    // failed connects, so that error counts stay comparable.
                    if last_counted.is_none_or(|t: Instant| t.elapsed() >= COUNTED_EVERY) {
                        last_counted = Some(Instant::now());
                        note_error(stats, format!("connect: {e}"));
                    }
                    std::thread::sleep(RECONNECT_PAUSE);
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
                if stats.steady.load(Ordering::Acquire) && prev > 0 && now > prev {
                    stats
                        .steady_max_gap_ns
                        .fetch_max(now - prev, Ordering::AcqRel);
                }
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
pub(super) fn verify(
    addr: SocketAddr,
    acked: &[(String, String)],
) -> anyhow::Result<(u64, Vec<String>)> {
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
