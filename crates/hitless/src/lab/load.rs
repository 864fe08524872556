//! The state an operator's device holds: loaded through the service address before the ISSU
//! (exactly `keys` distinct keys `key:<n>` of `value_size` bytes, pipelined on several
//! connections) and sample-checked, values included, after it.

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::checker::{connect, read_line, resp_command};

/// Connections the loader writes on at once.
const STREAMS: u64 = 4;
/// Most requests one connection sends before it reads their replies (two such batches are in
/// flight per connection).
const BATCH_REQUESTS: usize = 512;
/// Most request bytes in one batch.
const BATCH_BYTES: usize = 512 * 1024;
/// Most loaded keys read back after the ISSU.
pub(super) const SAMPLE_KEYS: usize = 10_000;

/// What the load did.
#[derive(Debug, Clone)]
pub(super) struct Loaded {
    /// Keys written and acknowledged.
    pub keys: u64,
    /// Bytes of those keys and values.
    pub bytes: u64,
    pub seconds: f64,
}

/// The loaded key `n`.
pub(super) fn key(n: u64) -> String {
    format!("key:{n}")
}

/// The value of the loaded key `n`: `size` bytes that differ from key to key.
pub(super) fn value(n: u64, size: usize) -> Vec<u8> {
    let tag = format!("{:016x}", splitmix64(n));
    tag.as_bytes().iter().copied().cycle().take(size).collect()
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Writes keys `0..keys` through `addr`, every one acknowledged (`+OK`) or the load fails.
/// Progress (keys/s) goes to stderr every second while it runs.
pub(super) fn load(addr: SocketAddr, keys: u64, value_size: usize) -> anyhow::Result<Loaded> {
    let started = Instant::now();
    // A bound for a stuck service, not an expectation: 2 minutes plus 1 ms per key.
    let bound = Duration::from_secs(120) + Duration::from_millis(keys);
    let acked = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let streams = STREAMS.min(keys.max(1));
    let threads: Vec<_> = (0..streams)
        .map(|s| {
            let (from, to) = (keys * s / streams, keys * (s + 1) / streams);
            let (acked, failed) = (acked.clone(), failed.clone());
            std::thread::spawn(move || {
                let r = load_range(addr, from..to, value_size, started + bound, &acked, &failed);
                if r.is_err() {
                    failed.store(true, Ordering::Release);
                }
                r
            })
        })
        .collect();
    let mut last = (Instant::now(), 0u64);
    while !threads.iter().all(|t| t.is_finished()) {
        std::thread::sleep(Duration::from_millis(50));
        if last.0.elapsed() >= Duration::from_secs(1) {
            let now = acked.load(Ordering::Relaxed);
            let rate = (now - last.1) as f64 / last.0.elapsed().as_secs_f64();
            eprintln!(
                "loading state: {now}/{keys} keys ({:.0}%), {rate:.0} keys/s",
                100.0 * now as f64 / keys.max(1) as f64
            );
            last = (Instant::now(), now);
        }
    }
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("a loader thread panicked"))??;
    }
    let done = acked.load(Ordering::Acquire);
    if done != keys {
        bail!("the load acknowledged {done} of {keys} keys");
    }
    let key_bytes: u64 = (0..keys).map(|n| key(n).len() as u64).sum();
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "loaded {keys} keys of {value_size} bytes in {seconds:.1} s ({:.0} keys/s)",
        keys as f64 / seconds.max(1e-9)
    );
    Ok(Loaded {
        keys,
        bytes: key_bytes + keys * value_size as u64,
        seconds,
    })
}

/// One connection's share: batches of SETs, the next batch sent before the replies of the
/// previous one are read, so that two batches are in flight.
fn load_range(
    addr: SocketAddr,
    range: std::ops::Range<u64>,
    value_size: usize,
    deadline: Instant,
    acked: &AtomicU64,
    failed: &AtomicBool,
) -> anyhow::Result<()> {
    let (mut s, mut r) = connect(addr).context("connecting the loader")?;
    let per_request = 40 + value_size;
    let batch = BATCH_REQUESTS.min((BATCH_BYTES / per_request).max(1)) as u64;
    let mut next = range.start;
    let mut waiting: Option<std::ops::Range<u64>> = None;
    while next < range.end || waiting.is_some() {
        if failed.load(Ordering::Acquire) {
            bail!("another loader connection failed");
        }
        if Instant::now() > deadline {
            bail!("the load did not finish within its bound ({next} of {range:?} sent)");
        }
        let sent = if next < range.end {
            let end = (next + batch).min(range.end);
            let mut buf = Vec::with_capacity((end - next) as usize * per_request);
            for n in next..end {
                buf.extend_from_slice(&resp_command(&[
                    b"SET",
                    key(n).as_bytes(),
                    &value(n, value_size),
                ]));
            }
            s.write_all(&buf).context("sending SETs")?;
            let sent = next..end;
            next = end;
            Some(sent)
        } else {
            None
        };
        if let Some(prev) = waiting.take() {
            read_oks(&mut r, &prev)?;
            acked.fetch_add(prev.end - prev.start, Ordering::AcqRel);
        }
        waiting = sent;
    }
    Ok(())
}

fn read_oks(r: &mut BufReader<TcpStream>, keys: &std::ops::Range<u64>) -> anyhow::Result<()> {
    for n in keys.clone() {
        let line = read_line(r).with_context(|| format!("reading the reply to SET {}", key(n)))?;
        if line != "+OK" {
            bail!("SET {} was answered {line:?}", key(n));
        }
    }
    Ok(())
}

/// The number of keys the service reports (DBSIZE).
pub(super) fn dbsize(addr: SocketAddr) -> anyhow::Result<u64> {
    let (mut s, mut r) = connect(addr).context("connecting for DBSIZE")?;
    s.write_all(&resp_command(&[b"DBSIZE"]))?;
    let line = read_line(&mut r)?;
    line.strip_prefix(':')
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("unexpected DBSIZE reply {line:?}"))
}

/// What the check of the loaded state found.
#[derive(Debug, Clone, Default)]
pub(super) struct StateCheck {
    /// Loaded keys read back.
    pub checked: u64,
    /// Of those, missing or holding another value.
    pub missing: u64,
    pub samples: Vec<String>,
}

/// Reads back every loaded key when there are at most [`SAMPLE_KEYS`], else that many chosen
/// at random, and compares the values.
pub(super) fn check(addr: SocketAddr, keys: u64, value_size: usize) -> anyhow::Result<StateCheck> {
    let picked: Vec<u64> = if keys <= SAMPLE_KEYS as u64 {
        (0..keys).collect()
    } else {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        let mut set = std::collections::BTreeSet::new();
        // Bounded: distinct draws from a range at least SAMPLE_KEYS wide.
        let mut i = 0u64;
        while set.len() < SAMPLE_KEYS && i < 100 * SAMPLE_KEYS as u64 {
            set.insert(splitmix64(seed ^ i) % keys);
            i += 1;
        }
        set.into_iter().collect()
    };
    let (mut s, mut r) = connect(addr).context("connecting to check the loaded state")?;
    let mut out = StateCheck::default();
    for chunk in picked.chunks(500) {
        let names: Vec<String> = chunk.iter().map(|&n| key(n)).collect();
        let mut parts: Vec<&[u8]> = vec![b"MGET"];
        parts.extend(names.iter().map(|k| k.as_bytes()));
        s.write_all(&resp_command(&parts))?;
        let header = read_line(&mut r)?;
        let count: usize = header
            .strip_prefix('*')
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("unexpected MGET reply {header:?}"))?;
        if count != chunk.len() {
            bail!("MGET answered {count} values for {} keys", chunk.len());
        }
        for &n in chunk {
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
                Some(buf)
            };
            out.checked += 1;
            if got.as_deref() != Some(value(n, value_size).as_slice()) {
                out.missing += 1;
                if out.samples.len() < 10 {
                    out.samples.push(format!(
                        "{}: {}",
                        key(n),
                        match got {
                            None => "missing".to_owned(),
                            Some(v) => format!("holds another value ({} bytes)", v.len()),
                        }
                    ));
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_have_the_size_asked_and_differ_between_keys() {
        assert_eq!(value(7, 100).len(), 100);
        assert_eq!(value(7, 1).len(), 1);
        assert_eq!(value(7, 100), value(7, 100));
        assert_ne!(value(7, 100), value(8, 100));
    }
}
