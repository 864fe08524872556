//! `front-probe`: one client writing one key at a time (SET, wait for the reply, next), as a
//! new client of a loaded service would. It reports what that client saw as one JSON line:
//! acknowledgements, throughput, the longest time without an acknowledgement (`max_gap_ms`,
//! counted from the start, so a client that is never served shows the whole run), reply
//! latency percentiles, errors and timeouts. With `--verify` it reads back every
//! acknowledged key at the end and counts those that are missing or wrong (`acked_lost`).
//!
//! ```text
//! front-probe --addr 127.0.0.1:26380 --secs 4 --prefix probe:a [--verify] [--timeout-ms 2000]
//! front-probe --addr 127.0.0.1:26380 --until-file /tmp/stop --prefix probe:b --verify
//! ```
//!
//! Every wait is bounded: a reply that does not come within `--timeout-ms` counts as a
//! timeout and the client reconnects; `--until-file` runs stop at `--max-secs` regardless.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

struct Args {
    addr: SocketAddr,
    secs: f64,
    until_file: Option<PathBuf>,
    max_secs: f64,
    prefix: String,
    verify: bool,
    timeout: Duration,
}

fn usage(msg: &str) -> ! {
    eprintln!("front-probe: {msg}");
    eprintln!(
        "usage: front-probe --addr HOST:PORT [--secs S | --until-file PATH [--max-secs S]] \
         [--prefix P] [--verify] [--timeout-ms MS]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut args = Args {
        addr: "127.0.0.1:26380".parse().expect("a valid default"),
        secs: 4.0,
        until_file: None,
        max_secs: 120.0,
        prefix: "probe".into(),
        verify: false,
        timeout: Duration::from_secs(2),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--addr" => args.addr = val().parse().unwrap_or_else(|_| usage("bad --addr")),
            "--secs" => args.secs = val().parse().unwrap_or_else(|_| usage("bad --secs")),
            "--until-file" => args.until_file = Some(PathBuf::from(val())),
            "--max-secs" => {
                args.max_secs = val().parse().unwrap_or_else(|_| usage("bad --max-secs"))
            }
            "--prefix" => args.prefix = val(),
            "--verify" => args.verify = true,
            "--timeout-ms" => {
                let ms: u64 = val().parse().unwrap_or_else(|_| usage("bad --timeout-ms"));
                args.timeout = Duration::from_millis(ms);
            }
            other => usage(&format!("unknown argument {other}")),
        }
    }
    args
}

fn command(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", parts.len()).into_bytes();
    for p in parts {
        out.extend_from_slice(format!("${}\r\n", p.len()).as_bytes());
        out.extend_from_slice(p);
        out.extend_from_slice(b"\r\n");
    }
    out
}

struct Conn {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

fn connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<Conn> {
    let s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(Conn {
        r: BufReader::new(s.try_clone()?),
        w: s,
    })
}

fn line(r: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    let mut l = String::new();
    if r.read_line(&mut l)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(l.trim_end().to_string())
}

/// A bulk reply's value (`None` for a nil reply).
fn bulk(r: &mut BufReader<TcpStream>) -> std::io::Result<Option<String>> {
    let head = line(r)?;
    let Some(n) = head.strip_prefix('$') else {
        return Err(std::io::Error::other(format!("unexpected reply {head:?}")));
    };
    let n: i64 = n
        .parse()
        .map_err(|_| std::io::Error::other(format!("bad bulk header {head:?}")))?;
    if n < 0 {
        return Ok(None);
    }
    Ok(Some(line(r)?))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    let args = parse_args();
    let start = Instant::now();
    let done = |i: u64| -> bool {
        let t = start.elapsed().as_secs_f64();
        match &args.until_file {
            Some(f) => t >= args.max_secs || (i.is_multiple_of(16) && f.exists()),
            None => t >= args.secs,
        }
    };
    let mut conn: Option<Conn> = None;
    let mut acked: Vec<(String, String)> = Vec::new();
    let mut latencies_ms: Vec<f64> = Vec::new();
    let (mut errors, mut timeouts, mut connects) = (0u64, 0u64, 0u64);
    let mut samples: Vec<String> = Vec::new();
    let mut last_ack = start;
    let mut max_gap = Duration::ZERO;
    let mut max_gap_at = 0.0;
    let mut i = 0u64;
    while !done(i) {
        if conn.is_none() {
            connects += 1;
            match connect(args.addr, args.timeout) {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    errors += 1;
                    if samples.len() < 5 {
                        samples.push(format!("connect: {e}"));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            }
        }
        let c = conn.as_mut().expect("connected above");
        let key = format!("{}:{i}", args.prefix);
        let val = format!("v{i}");
        let t = Instant::now();
        let r =
            c.w.write_all(&command(&[b"SET", key.as_bytes(), val.as_bytes()]))
                .and_then(|_| line(&mut c.r));
        i += 1;
        match r {
            Ok(l) if l == "+OK" => {
                let now = Instant::now();
                latencies_ms.push((now - t).as_secs_f64() * 1e3);
                let gap = now - last_ack;
                if gap > max_gap {
                    max_gap = gap;
                    max_gap_at = (now - start).as_secs_f64();
                }
                last_ack = now;
                acked.push((key, val));
            }
            Ok(other) => {
                errors += 1;
                if samples.len() < 5 {
                    samples.push(format!("SET {key}: {other}"));
                }
            }
            Err(e) => {
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) {
                    timeouts += 1;
                } else {
                    errors += 1;
                }
                if samples.len() < 5 {
                    samples.push(format!("SET {key}: {e}"));
                }
                conn = None;
            }
        }
    }
    let elapsed = start.elapsed();
    let tail_gap = Instant::now() - last_ack;
    if tail_gap > max_gap {
        max_gap = tail_gap;
        max_gap_at = elapsed.as_secs_f64();
    }
    let mut lost: Option<u64> = None;
    if args.verify {
        lost = Some(verify(&args, &acked, &mut samples));
    }
    latencies_ms.sort_by(f64::total_cmp);
    let out = serde_json::json!({
        "addr": args.addr.to_string(),
        "secs": elapsed.as_secs_f64(),
        "acks": acked.len(),
        "acks_per_s": acked.len() as f64 / elapsed.as_secs_f64().max(1e-9),
        "max_gap_ms": max_gap.as_secs_f64() * 1e3,
        "max_gap_at_s": max_gap_at,
        "p50_ms": percentile(&latencies_ms, 0.50),
        "p99_ms": percentile(&latencies_ms, 0.99),
        "max_latency_ms": latencies_ms.last().copied().unwrap_or(0.0),
        "errors": errors,
        "timeouts": timeouts,
        "connects": connects,
        "acked_lost": lost,
        "samples": samples,
    });
    println!("{out}");
}

/// Reads back every acknowledged key (pipelined, in batches); returns how many are missing
/// or hold another value. An unreachable service counts every unread key as lost.
fn verify(args: &Args, acked: &[(String, String)], samples: &mut Vec<String>) -> u64 {
    let mut lost = 0u64;
    let timeout = args.timeout.max(Duration::from_secs(5));
    let mut conn = match connect(args.addr, timeout) {
        Ok(c) => c,
        Err(e) => {
            samples.push(format!("verify connect: {e}"));
            return acked.len() as u64;
        }
    };
    for (b, batch) in acked.chunks(256).enumerate() {
        let unread = (acked.len() - b * 256) as u64;
        let mut out = Vec::new();
        for (k, _) in batch {
            out.extend(command(&[b"GET", k.as_bytes()]));
        }
        if let Err(e) = conn.w.write_all(&out) {
            samples.push(format!("verify write: {e}"));
            return lost + unread;
        }
        for (j, (k, v)) in batch.iter().enumerate() {
            match bulk(&mut conn.r) {
                Ok(Some(got)) if &got == v => {}
                Ok(got) => {
                    lost += 1;
                    if samples.len() < 10 {
                        samples.push(format!("acked {k}={v} reads back as {got:?}"));
                    }
                }
                Err(e) => {
                    samples.push(format!("verify read: {e}"));
                    return lost + unread - j as u64;
                }
            }
        }
    }
    lost
}
