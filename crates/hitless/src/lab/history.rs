//! The clients of `hitless lab check` and what they saw: each client writes through the
//! service address only, every write a unique key (`SET chk:<client>:<n> <n>`) or an append
//! (`RPUSH chk:list:<client>:<segment> <n>`), pipelined between two `INFO`s on the same
//! connection so that the answering instance and its epoch are known. Every write's outcome
//! is recorded with its times: acknowledged, refused (an error reply, or no connection: nothing
//! was sent), or unknown (sent, and no reply within the bound). Reading the acknowledged
//! writes back at the end is here too.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Appends per list key: a list is rewritten whole by each append, so lists are kept short.
pub const LIST_SEGMENT: u64 = 1024;
/// Longest bulk reply accepted (an INFO, a value, a list element).
const MAX_BULK: usize = 1 << 20;
/// Most elements accepted in an array reply (a list segment read back).
const MAX_ARRAY: usize = 1 << 16;
/// Bound of a connection attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Backoff after a failed write or connection: from the first to the last, doubling.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_millis(200));

/// What a write does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `SET chk:<client>:<n> <n>`.
    Set,
    /// `RPUSH chk:list:<client>:<n / LIST_SEGMENT> <n>`.
    Push,
}

impl Op {
    /// The op of a client's `n`th write: one append in four.
    pub fn of(n: u64) -> Op {
        if n % 4 == 3 {
            Op::Push
        } else {
            Op::Set
        }
    }
}

/// The key a write goes to.
pub fn key(client: u16, op: Op, n: u64) -> String {
    match op {
        Op::Set => format!("chk:{client}:{n}"),
        Op::Push => format!("chk:list:{client}:{}", n / LIST_SEGMENT),
    }
}

/// How a write ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `+OK` to a SET, an integer to an RPUSH.
    Acked,
    /// An error reply, or no connection (nothing was sent).
    Error,
    /// Sent, and no reply within the bound, or the connection dropped: it may or may not
    /// have been applied.
    Unknown,
}

/// One write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub client: u16,
    pub op: Op,
    pub n: u64,
    /// When it was sent (or the connection attempt began), ns since the history's origin.
    pub sent_ns: u64,
    /// When its reply came (or the attempt was given up).
    pub done_ns: u64,
    pub outcome: Outcome,
    /// Index into [`History::reigns`]: the instance and epoch that answered both INFOs around
    /// the write (none when they differ or one is missing: the write is not attributed).
    pub reign: Option<u32>,
}

/// An instance at an epoch, as INFO names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReignId {
    pub instance: String,
    pub epoch: u64,
}

/// Every write of every client.
#[derive(Debug, Default)]
pub struct History {
    pub records: Vec<Record>,
    pub reigns: Vec<ReignId>,
    /// Whether the record cap stopped the clients early.
    pub truncated: bool,
}

/// The reigns seen, shared by the clients.
#[derive(Default)]
struct Reigns {
    index: HashMap<ReignId, u32>,
    list: Vec<ReignId>,
}

impl Reigns {
    fn intern(&mut self, r: ReignId) -> u32 {
        if let Some(i) = self.index.get(&r) {
            return *i;
        }
        let i = self.list.len() as u32;
        self.list.push(r.clone());
        self.index.insert(r, i);
        i
    }
}

struct Shared {
    origin: Instant,
    stop: AtomicBool,
    /// Records taken so far, against the cap.
    taken: AtomicU64,
    cap: u64,
    truncated: AtomicBool,
    reigns: Mutex<Reigns>,
}

/// The running clients.
pub struct Clients {
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<Vec<Record>>>,
}

/// How the clients write.
#[derive(Debug, Clone, Copy)]
pub struct ClientConfig {
    pub clients: u16,
    /// A write without its reply after this long is unknown.
    pub reply_timeout: Duration,
    /// Pause between two writes of a client.
    pub pace: Duration,
    /// Most records kept (all clients); the clients stop when it is reached.
    pub cap: u64,
}

impl Clients {
    /// Starts the clients (in the calling thread's network namespace); times count from
    /// `origin`.
    pub fn start(addr: SocketAddr, cfg: ClientConfig, origin: Instant) -> Clients {
        let shared = Arc::new(Shared {
            origin,
            stop: AtomicBool::new(false),
            taken: AtomicU64::new(0),
            cap: cfg.cap,
            truncated: AtomicBool::new(false),
            reigns: Mutex::new(Reigns::default()),
        });
        let threads = (0..cfg.clients)
            .map(|c| {
                let shared = shared.clone();
                std::thread::spawn(move || client(addr, c, cfg, &shared))
            })
            .collect();
        Clients { shared, threads }
    }

    /// Writes attempted so far (all clients), for progress lines.
    pub fn taken(&self) -> u64 {
        self.shared.taken.load(Ordering::Relaxed)
    }

    /// Stops the clients and returns what they saw.
    pub fn finish(self) -> History {
        self.shared.stop.store(true, Ordering::Release);
        let mut records: Vec<Record> = self
            .threads
            .into_iter()
            .flat_map(|t| t.join().unwrap_or_default())
            .collect();
        records.sort_by_key(|r| (r.sent_ns, r.client, r.n));
        let reigns = std::mem::take(
            &mut self
                .shared
                .reigns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .list,
        );
        History {
            records,
            reigns,
            truncated: self.shared.truncated.load(Ordering::Acquire),
        }
    }
}

fn now_ns(origin: Instant) -> u64 {
    origin.elapsed().as_nanos() as u64
}

fn client(addr: SocketAddr, c: u16, cfg: ClientConfig, shared: &Shared) -> Vec<Record> {
    let mut out = Vec::new();
    let mut conn: Option<(TcpStream, BufReader<TcpStream>)> = None;
    let mut backoff = BACKOFF.0;
    let mut n: u64 = 0;
    while !shared.stop.load(Ordering::Acquire) {
        if shared.taken.fetch_add(1, Ordering::AcqRel) >= shared.cap {
            shared.truncated.store(true, Ordering::Release);
            break;
        }
        let op = Op::of(n);
        let sent_ns = now_ns(shared.origin);
        let mut record = Record {
            client: c,
            op,
            n,
            sent_ns,
            done_ns: sent_ns,
            outcome: Outcome::Error,
            reign: None,
        };
        n += 1;
        if conn.is_none() {
            match connect(addr) {
                Ok(c) => conn = Some(c),
                Err(_) => {
                    // Nothing was sent: the write is refused.
                    record.done_ns = now_ns(shared.origin);
                    out.push(record);
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(BACKOFF.1);
                    continue;
                }
            }
        }
        let (s, r) = conn.as_mut().expect("connected");
        let (outcome, reign, keep) = exchange(s, r, c, op, record.n, cfg.reply_timeout, shared);
        record.done_ns = now_ns(shared.origin);
        record.outcome = outcome;
        record.reign = reign;
        out.push(record);
        if !keep {
            conn = None;
        }
        if outcome == Outcome::Acked {
            backoff = BACKOFF.0;
            std::thread::sleep(cfg.pace);
        } else {
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(BACKOFF.1);
        }
    }
    out
}

fn connect(addr: SocketAddr) -> std::io::Result<(TcpStream, BufReader<TcpStream>)> {
    let s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    let r = BufReader::new(s.try_clone()?);
    Ok((s, r))
}

/// Sends `INFO`, the write and `INFO` at once and reads the three replies within `timeout`;
/// returns the write's outcome, its reign, and whether the connection can be used again.
fn exchange(
    s: &mut TcpStream,
    r: &mut BufReader<TcpStream>,
    c: u16,
    op: Op,
    n: u64,
    timeout: Duration,
    shared: &Shared,
) -> (Outcome, Option<u32>, bool) {
    let deadline = Instant::now() + timeout;
    let k = key(c, op, n);
    let v = n.to_string();
    let verb: &[u8] = match op {
        Op::Set => b"SET",
        Op::Push => b"RPUSH",
    };
    let mut req = command(&[b"INFO"]);
    req.extend(command(&[verb, k.as_bytes(), v.as_bytes()]));
    req.extend(command(&[b"INFO"]));
    if s.write_all(&req).is_err() {
        // Part of it may have gone out.
        return (Outcome::Unknown, None, false);
    }
    let before = match read_reply_by(r, deadline) {
        Ok(reply) => info_reign(&reply),
        Err(_) => return (Outcome::Unknown, None, false),
    };
    let outcome = match read_reply_by(r, deadline) {
        Ok(Reply::Simple(ok)) if op == Op::Set && ok == "OK" => Outcome::Acked,
        Ok(Reply::Int(_)) if op == Op::Push => Outcome::Acked,
        Ok(_) => Outcome::Error,
        Err(_) => return (Outcome::Unknown, None, false),
    };
    let after = match read_reply_by(r, deadline) {
        Ok(reply) => info_reign(&reply),
        Err(_) => return (outcome, None, false),
    };
    let mut reigns = shared.reigns.lock().unwrap_or_else(|e| e.into_inner());
    // Every epoch seen is kept (for the report), attributed or not.
    for id in [&before, &after].into_iter().flatten() {
        reigns.intern(id.clone());
    }
    let reign = match (before, after) {
        (Some(b), Some(a)) if a == b => Some(reigns.intern(a)),
        _ => None,
    };
    (outcome, reign, true)
}

/// A RESP request.
pub fn command(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", parts.len()).into_bytes();
    for p in parts {
        out.extend_from_slice(format!("${}\r\n", p.len()).as_bytes());
        out.extend_from_slice(p);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A RESP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

fn bad(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

fn read_reply_by(r: &mut BufReader<TcpStream>, deadline: Instant) -> std::io::Result<Reply> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(std::io::ErrorKind::TimedOut.into());
    }
    r.get_ref().set_read_timeout(Some(left))?;
    read_reply(r, 0)
}

/// Reads one reply (arrays nested at most once), every length bounded.
pub fn read_reply(r: &mut impl BufRead, depth: u8) -> std::io::Result<Reply> {
    let mut line = Vec::new();
    r.by_ref().take(256).read_until(b'\n', &mut line)?;
    if line.is_empty() {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    if !line.ends_with(b"\r\n") {
        return Err(bad("a reply line is unterminated or too long".into()));
    }
    line.truncate(line.len() - 2);
    let text = String::from_utf8_lossy(&line[1..]).into_owned();
    let len = |max: usize| -> std::io::Result<Option<usize>> {
        let v: i64 = text
            .parse()
            .map_err(|_| bad(format!("bad length {text:?}")))?;
        match v {
            -1 => Ok(None),
            v if v >= 0 && (v as u64) <= max as u64 => Ok(Some(v as usize)),
            _ => Err(bad(format!("length {v} out of bounds"))),
        }
    };
    match line[0] {
        b'+' => Ok(Reply::Simple(text)),
        b'-' => Ok(Reply::Error(text)),
        b':' => text
            .parse()
            .map(Reply::Int)
            .map_err(|_| bad(format!("bad integer {text:?}"))),
        b'$' => match len(MAX_BULK)? {
            None => Ok(Reply::Bulk(None)),
            Some(n) => {
                let mut buf = vec![0u8; n + 2];
                r.read_exact(&mut buf)?;
                if !buf.ends_with(b"\r\n") {
                    return Err(bad("a bulk reply is unterminated".into()));
                }
                buf.truncate(n);
                Ok(Reply::Bulk(Some(buf)))
            }
        },
        b'*' if depth == 0 => match len(MAX_ARRAY)? {
            None => Ok(Reply::Array(None)),
            Some(n) => (0..n)
                .map(|_| read_reply(r, depth + 1))
                .collect::<std::io::Result<Vec<_>>>()
                .map(|v| Reply::Array(Some(v))),
        },
        other => Err(bad(format!("unexpected reply type {:?}", other as char))),
    }
}

/// The instance and epoch an INFO reply names.
pub fn info_reign(reply: &Reply) -> Option<ReignId> {
    let Reply::Bulk(Some(body)) = reply else {
        return None;
    };
    let text = String::from_utf8_lossy(body);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(|v| v.trim().to_owned())
    };
    Some(ReignId {
        instance: field("instance_id")?,
        epoch: field("epoch")?.parse().ok()?,
    })
}

/// What the service holds at the end for the acknowledged writes.
#[derive(Debug, Default)]
pub struct Observed {
    /// The value of each acknowledged SET's key (none: missing).
    pub values: HashMap<(u16, u64), Option<Vec<u8>>>,
    /// Each list segment read back, by (client, segment).
    pub lists: HashMap<(u16, u64), Vec<Vec<u8>>>,
}

/// Reads every acknowledged write's key back through `addr` (pipelined, in bounded batches).
pub fn read_back(addr: SocketAddr, records: &[Record]) -> anyhow::Result<Observed> {
    let (mut s, mut r) = connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(15)))?;
    let mut obs = Observed::default();
    let sets: Vec<(u16, u64)> = records
        .iter()
        .filter(|x| x.outcome == Outcome::Acked && x.op == Op::Set)
        .map(|x| (x.client, x.n))
        .collect();
    for chunk in sets.chunks(256) {
        let mut req = Vec::new();
        for &(c, n) in chunk {
            req.extend(command(&[b"GET", key(c, Op::Set, n).as_bytes()]));
        }
        s.write_all(&req)?;
        for &(c, n) in chunk {
            match read_reply(&mut r, 0)? {
                Reply::Bulk(v) => {
                    obs.values.insert((c, n), v);
                }
                other => bail!("GET {} answered {other:?}", key(c, Op::Set, n)),
            }
        }
    }
    let mut segments: Vec<(u16, u64)> = records
        .iter()
        .filter(|x| x.outcome == Outcome::Acked && x.op == Op::Push)
        .map(|x| (x.client, x.n / LIST_SEGMENT))
        .collect();
    segments.sort_unstable();
    segments.dedup();
    for (c, seg) in segments {
        let k = format!("chk:list:{c}:{seg}");
        s.write_all(&command(&[b"LRANGE", k.as_bytes(), b"0", b"-1"]))?;
        match read_reply(&mut r, 0)? {
            Reply::Array(items) => {
                let items = items
                    .unwrap_or_default()
                    .into_iter()
                    .map(|i| match i {
                        Reply::Bulk(Some(b)) => Ok(b),
                        other => bail!("LRANGE {k} holds {other:?}"),
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                obs.lists.insert((c, seg), items);
            }
            other => bail!("LRANGE {k} answered {other:?}"),
        }
    }
    Ok(obs)
}

/// The acknowledged writes checked against what the service holds.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Classified {
    pub checked: u64,
    /// Acknowledged writes missing (a key absent or holding another value, an append absent).
    pub lost: u64,
    /// Acknowledged appends found more than once (allowed: an append retried by a failover's
    /// replay is applied once per replay).
    pub duplicated: u64,
    /// The first lost writes, described.
    pub samples: Vec<String>,
}

/// Checks every acknowledged write of `records` against `obs`.
pub fn classify(records: &[Record], obs: &Observed) -> Classified {
    let mut out = Classified::default();
    // How often each value occurs in each list segment.
    let mut counts: HashMap<(u16, u64), HashMap<&[u8], u64>> = HashMap::new();
    for (k, items) in &obs.lists {
        let m = counts.entry(*k).or_default();
        for i in items {
            *m.entry(i.as_slice()).or_default() += 1;
        }
    }
    for x in records.iter().filter(|x| x.outcome == Outcome::Acked) {
        out.checked += 1;
        let want = x.n.to_string();
        let missing = match x.op {
            Op::Set => match obs.values.get(&(x.client, x.n)) {
                Some(Some(v)) if v.as_slice() == want.as_bytes() => None,
                Some(Some(v)) => Some(format!("holds {:?}", String::from_utf8_lossy(v))),
                Some(None) => Some("is missing".to_owned()),
                None => Some("was not read back".to_owned()),
            },
            Op::Push => {
                let seen = counts
                    .get(&(x.client, x.n / LIST_SEGMENT))
                    .and_then(|m| m.get(want.as_bytes()))
                    .copied()
                    .unwrap_or(0);
                if seen > 1 {
                    out.duplicated += 1;
                }
                (seen == 0).then(|| "is not in the list".to_owned())
            }
        };
        if let Some(why) = missing {
            out.lost += 1;
            if out.samples.len() < 10 {
                out.samples.push(format!(
                    "{} {} (acknowledged at {:.3} s) {why}",
                    match x.op {
                        Op::Set => "SET",
                        Op::Push => "RPUSH",
                    },
                    key(x.client, x.op, x.n),
                    x.done_ns as f64 / 1e9
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn acked(client: u16, op: Op, n: u64) -> Record {
        Record {
            client,
            op,
            n,
            sent_ns: n * 1000,
            done_ns: n * 1000 + 10,
            outcome: Outcome::Acked,
            reign: None,
        }
    }

    #[test]
    fn the_read_back_counts_missing_and_changed_keys_and_absent_appends_as_lost() {
        let records = vec![
            acked(0, Op::Set, 0),
            acked(0, Op::Set, 1),
            acked(0, Op::Set, 2),
            acked(0, Op::Push, 3),
            acked(0, Op::Push, 7),
            acked(1, Op::Push, 3),
            acked(1, Op::Set, 4),
            // Not acknowledged: never checked, present or not.
            Record {
                outcome: Outcome::Unknown,
                ..acked(1, Op::Set, 5)
            },
            Record {
                outcome: Outcome::Error,
                ..acked(1, Op::Push, 7)
            },
        ];
        let mut obs = Observed::default();
        obs.values.insert((0, 0), Some(b"0".to_vec()));
        obs.values.insert((0, 1), None);
        obs.values.insert((0, 2), Some(b"9".to_vec()));
        obs.values.insert((1, 4), Some(b"4".to_vec()));
        obs.lists
            .insert((0, 0), vec![b"3".to_vec(), b"3".to_vec(), b"5".to_vec()]);
        obs.lists.insert((1, 0), vec![]);
        let c = classify(&records, &obs);
        assert_eq!(c.checked, 7);
        // (0,1) missing, (0,2) changed, (0,7) not in its list, (1,3) not in its list.
        assert_eq!(c.lost, 4, "{:?}", c.samples);
        assert_eq!(c.duplicated, 1);
        assert!(c
            .samples
            .iter()
            .any(|s| s.contains("chk:0:2") && s.contains("\"9\"")));
        assert!(c.samples.iter().any(|s| s.contains("chk:list:1:0")));
        // Everything present: nothing lost.
        obs.values.insert((0, 1), Some(b"1".to_vec()));
        obs.values.insert((0, 2), Some(b"2".to_vec()));
        obs.lists.insert((0, 0), vec![b"3".to_vec(), b"7".to_vec()]);
        obs.lists.insert((1, 0), vec![b"3".to_vec()]);
        assert_eq!(classify(&records, &obs).lost, 0);
    }

    #[test]
    fn appends_go_to_bounded_segments_and_a_client_mixes_both_writes() {
        assert_eq!(key(3, Op::Set, 9), "chk:3:9");
        assert_eq!(key(3, Op::Push, 9), "chk:list:3:0");
        assert_eq!(key(3, Op::Push, LIST_SEGMENT + 1), "chk:list:3:1");
        let ops: Vec<Op> = (0..8).map(Op::of).collect();
        assert_eq!(ops.iter().filter(|o| **o == Op::Push).count(), 2);
    }

    #[test]
    fn replies_parse_within_bounds_and_info_names_the_instance_and_epoch() {
        let mut input: &[u8] = b"+OK\r\n:12\r\n-ERR no\r\n$-1\r\n*2\r\n$1\r\na\r\n$2\r\nbc\r\n";
        assert_eq!(
            read_reply(&mut input, 0).unwrap(),
            Reply::Simple("OK".into())
        );
        assert_eq!(read_reply(&mut input, 0).unwrap(), Reply::Int(12));
        assert_eq!(
            read_reply(&mut input, 0).unwrap(),
            Reply::Error("ERR no".into())
        );
        assert_eq!(read_reply(&mut input, 0).unwrap(), Reply::Bulk(None));
        assert_eq!(
            read_reply(&mut input, 0).unwrap(),
            Reply::Array(Some(vec![
                Reply::Bulk(Some(b"a".to_vec())),
                Reply::Bulk(Some(b"bc".to_vec()))
            ]))
        );
        let mut huge: &[u8] = b"$99999999999\r\n";
        assert!(read_reply(&mut huge, 0).is_err());
        let mut nested: &[u8] = b"*1\r\n*1\r\n:1\r\n";
        assert!(read_reply(&mut nested, 0).is_err());
        let info = Reply::Bulk(Some(
            b"# Server\r\ninstance_id:i-7\r\n# Replication\r\nrole:active\r\nepoch:4\r\n".to_vec(),
        ));
        assert_eq!(
            info_reign(&info),
            Some(ReignId {
                instance: "i-7".into(),
                epoch: 4
            })
        );
        assert_eq!(info_reign(&Reply::Error("LOADING".into())), None);
        assert_eq!(
            info_reign(&Reply::Bulk(Some(b"instance_id:x\r\n".to_vec()))),
            None
        );
    }
}
