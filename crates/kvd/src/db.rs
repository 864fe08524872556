//! Command execution over the replicated state.
//!
//! Reads go straight to the replica's tables. Writes are serialised by one lock: the command
//! reads what it needs, builds mutations, and submits them to the replica, which applies them
//! locally and streams them to standbys; the client's reply is released only once the
//! replica reports the batch durable ([`Outcome::Durable`]).
//!
//! A planned switchover quiesces the instance ([`Db::quiesce`]): writes not yet admitted wait
//! at the gate, and the quiesce returns once every write already submitted is durable, so
//! that its client's reply no longer depends on this instance staying in control. When
//! control then moves away (a demotion that ends a quiesce), the writes still waiting are not
//! executed: they come back as [`Outcome::NotWritable`] and the connection closes after the replies
//! to its earlier requests, so a front in front of the instance knows exactly which requests
//! never ran and sends them, in order, to the new instance in control.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hitless_sync::{AckToken, ControlEpoch, Mutation, Replica, SyncError};

use crate::resp::Reply;
use crate::schema::{self, decode, encode, zset_sorted, Kind, Meta, SchemaVersion, Value, TABLES};

const WRONGTYPE: &str = "WRONGTYPE Operation against a key holding the wrong kind of value";

/// What executing a command produced.
#[derive(Debug)]
pub enum Outcome {
    /// Send this reply now (reads, errors, writes that changed nothing).
    Now(Reply),
    /// Send this reply once the batch of the token is durable; otherwise an error.
    Durable(AckToken, Reply),
    /// Send this reply and close the connection.
    Quit(Reply),
    /// The instance refused the write because it is not in control (`READONLY` reply). A
    /// connection opened before control moved away in a planned switchover
    /// ([`Gate::moves`]) is closed instead, without a reply to this or any later request:
    /// none of them was executed, and a front resends them to the new instance in control.
    NotWritable(Reply),
}

/// Whether and how this instance accepts writes; set by the control channel.
#[derive(Debug, Clone)]
pub struct GateState {
    /// In control and not fenced.
    pub writable: bool,
    /// A planned switchover holds new writes (they wait instead of failing).
    pub quiesced: bool,
    /// Role name reported by INFO (`unconfigured`, `active`, `standby`, `spare`, `fenced`).
    pub role: &'static str,
    /// Control epoch reported by INFO.
    pub epoch: ControlEpoch,
    /// How many times control moved away from this instance in a planned switchover (a
    /// demotion that ended a quiesce).
    pub moves: u64,
}

/// The write gate: writes pass only on a writable instance and wait while it is quiesced.
#[derive(Debug)]
pub struct Gate {
    state: Mutex<GateState>,
    cv: Condvar,
    hold: Duration,
}

impl Gate {
    /// A closed gate (unconfigured instance). Writes wait at most `hold` for a quiesce to end.
    pub fn new(hold: Duration) -> Self {
        Gate {
            state: Mutex::new(GateState {
                writable: false,
                quiesced: false,
                role: "unconfigured",
                epoch: ControlEpoch(0),
                moves: 0,
            }),
            cv: Condvar::new(),
            hold,
        }
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the state and wakes waiting writers.
    pub fn set(&self, f: impl FnOnce(&mut GateState)) {
        f(&mut self.lock());
        self.cv.notify_all();
    }

    /// A copy of the state.
    pub fn get(&self) -> GateState {
        self.lock().clone()
    }

    /// How many times control moved away from this instance in a planned switchover.
    pub fn moves(&self) -> u64 {
        self.lock().moves
    }

    /// Waits while quiesced (bounded), then admits or refuses the write.
    fn admit(&self) -> Result<(), Outcome> {
        let deadline = Instant::now() + self.hold;
        let mut st = self.lock();
        loop {
            if !st.writable {
                return Err(Outcome::NotWritable(Reply::Error(format!(
                    "READONLY this instance is not in control (role {}, epoch {}); writes go to the active instance",
                    st.role, st.epoch.0
                ))));
            }
            if !st.quiesced {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Outcome::Now(Reply::Error(format!(
                    "TRYAGAIN writes were held {:?} by a switchover that has not finished",
                    self.hold
                ))));
            }
            st = self
                .cv
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Maps a replication error on a write to the client's reply.
pub fn sync_error_reply(e: &SyncError) -> Reply {
    match e {
        SyncError::NotActive { .. } | SyncError::Fenced { .. } | SyncError::StaleEpoch { .. } => {
            Reply::Error(format!("READONLY write refused: {e}"))
        }
        SyncError::TooLarge { .. } | SyncError::UnknownTable { .. } => Reply::err(e),
        _ => Reply::err(format!("write not acknowledged: {e}")),
    }
}

/// kvd's database: the replica plus the write path.
pub struct Db {
    replica: Replica,
    version: SchemaVersion,
    write_lock: Mutex<()>,
    last_seq: AtomicU64,
    /// (epoch, sequence): every write of that epoch up to that sequence is known durable
    /// (set by a quiesce, after which this instance may stop being in control).
    settled: Mutex<(ControlEpoch, u64)>,
    acked_seq: AtomicU64,
    rng: AtomicU64,
    /// The write gate, driven by the control channel.
    pub gate: Gate,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("version", &self.version)
            .finish()
    }
}

impl Db {
    /// A database over `replica`, storing values in schema `version`.
    pub fn new(replica: Replica, version: SchemaVersion, hold: Duration) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15)
            | 1;
        Db {
            replica,
            version,
            write_lock: Mutex::new(()),
            last_seq: AtomicU64::new(0),
            settled: Mutex::new((ControlEpoch(0), 0)),
            acked_seq: AtomicU64::new(0),
            rng: AtomicU64::new(seed),
            gate: Gate::new(hold),
        }
    }

    /// The replica.
    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    /// The native schema version.
    pub fn version(&self) -> SchemaVersion {
        self.version
    }

    /// Highest sequence acknowledged to a client.
    pub fn acked_seq(&self) -> u64 {
        self.acked_seq.load(Ordering::Acquire)
    }

    /// Re-reads the replica's applied sequence (after taking control) so per-key metadata
    /// carries the sequence numbers the replica will assign.
    pub fn resync_seq(&self) {
        let _g = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
        let applied = self.replica.status().applied_seq;
        self.last_seq.store(applied, Ordering::Release);
        self.acked_seq.fetch_max(applied, Ordering::AcqRel);
    }

    /// Waits until `token` is durable and records it as acknowledged.
    pub fn wait_durable(&self, token: AckToken) -> Result<(), SyncError> {
        let settled = *self.settled.lock().unwrap_or_else(|e| e.into_inner());
        if token.epoch != settled.0 || token.seq > settled.1 {
            self.replica.wait_durable(token)?;
        }
        self.acked_seq.fetch_max(token.seq, Ordering::AcqRel);
        Ok(())
    }

    /// Quiesces writes for a planned switchover: writes not yet admitted wait at the gate
    /// (bounded by the hold), and this returns once every write already submitted is durable
    /// (bounded by the replica's acknowledgement timeout), so that its reply no longer needs
    /// this instance in control. On failure the quiesce is released and the instance goes on
    /// as before.
    pub fn quiesce(&self) -> Result<(), SyncError> {
        self.gate.set(|g| g.quiesced = true);
        let last = {
            // A write admitted before the gate closed holds this lock until it has submitted;
            // one admitted after sees the quiesce under the lock and goes back to wait.
            let _g = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
            self.replica.quiesce();
            self.last_seq.load(Ordering::Acquire)
        };
        let token = AckToken {
            seq: last,
            epoch: self.replica.epoch(),
        };
        match self.replica.wait_durable(token) {
            Ok(()) => {
                let mut s = self.settled.lock().unwrap_or_else(|e| e.into_inner());
                *s = (*s).max((token.epoch, token.seq));
                Ok(())
            }
            Err(e) => {
                self.replica.resume();
                self.gate.set(|g| g.quiesced = false);
                Err(e)
            }
        }
    }

    /// Number of keys.
    pub fn dbsize(&self) -> usize {
        TABLES
            .iter()
            .map(|t| self.replica.with_table(t, |t| t.len()).unwrap_or(0))
            .sum()
    }

    fn random(&self) -> u64 {
        // xorshift64*: SPOP's choice need not be cryptographic, only spread.
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.store(x, Ordering::Relaxed);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn read_in(&self, table: &'static str, key: &[u8]) -> Result<Option<(Value, Meta)>, Reply> {
        // Decoded from the stored bytes under the state lock: no copy of them.
        let decoded = self
            .replica
            .with_table(table, |t| {
                t.get(key).map(|b| decode(self.version, table, b))
            })
            .map_err(Reply::err)?;
        decoded
            .transpose()
            .map_err(|e| Reply::err(format!("stored value is corrupt: {e}")))
    }

    /// True if `table` holds `key`.
    fn holds(&self, table: &'static str, key: &[u8]) -> Result<bool, Reply> {
        self.replica
            .with_table(table, |t| t.get(key).is_some())
            .map_err(Reply::err)
    }

    /// The value at `key` in any table.
    fn read_any(&self, key: &[u8]) -> Result<Option<(Value, Meta)>, Reply> {
        for t in TABLES {
            if let Some(v) = self.read_in(t, key)? {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }

    /// The value at `key` if it is of `kind`; WRONGTYPE if it is of another kind.
    fn read_kind(&self, key: &[u8], kind: Kind) -> Result<Option<Value>, Reply> {
        if let Some((v, _)) = self.read_in(kind.table(), key)? {
            return Ok(Some(v));
        }
        for t in TABLES {
            if t != kind.table() && self.holds(t, key)? {
                return Err(Reply::Error(WRONGTYPE.into()));
            }
        }
        Ok(None)
    }

    fn write<F>(&self, f: F) -> Outcome
    where
        F: FnOnce(&mut Tx<'_>) -> Result<Reply, Reply>,
    {
        let _g = loop {
            if let Err(o) = self.gate.admit() {
                return o;
            }
            let g = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
            // A quiesce that began after the gate let this write through waits for this lock:
            // look again under it, so that no write is submitted once a quiesce has begun.
            let st = self.gate.get();
            if st.writable && !st.quiesced {
                break g;
            }
        };
        let mut tx = Tx {
            db: self,
            seq: self.last_seq.load(Ordering::Acquire) + 1,
            muts: Vec::new(),
            overlay: HashMap::new(),
            known: HashMap::new(),
        };
        let reply = match f(&mut tx) {
            Ok(r) => r,
            Err(r) => return Outcome::Now(r),
        };
        if tx.muts.is_empty() {
            return Outcome::Now(reply);
        }
        match self.replica.submit(tx.muts) {
            Ok(tok) => {
                self.last_seq.store(tok.seq, Ordering::Release);
                Outcome::Durable(tok, reply)
            }
            Err(e) => Outcome::Now(sync_error_reply(&e)),
        }
    }

    /// Executes one command. `info` renders the INFO reply's instance section.
    pub fn execute(&self, args: &[Vec<u8>], info: &dyn Fn() -> String) -> Outcome {
        let Some(name) = args.first() else {
            return Outcome::Now(Reply::err("empty command"));
        };
        let name = String::from_utf8_lossy(name).to_ascii_lowercase();
        match self.dispatch(&name, args, info) {
            Ok(o) => o,
            Err(r) => Outcome::Now(r),
        }
    }

    fn dispatch(
        &self,
        name: &str,
        a: &[Vec<u8>],
        info: &dyn Fn() -> String,
    ) -> Result<Outcome, Reply> {
        let now = |r: Reply| Ok(Outcome::Now(r));
        match name {
            "ping" => {
                arity(name, a, 1, Some(2))?;
                now(match a.get(1) {
                    Some(m) => Reply::bulk(m.clone()),
                    None => Reply::Simple("PONG".into()),
                })
            }
            "echo" => {
                arity(name, a, 2, Some(2))?;
                now(Reply::bulk(a[1].clone()))
            }
            "quit" => Ok(Outcome::Quit(Reply::ok())),
            "select" => {
                arity(name, a, 2, Some(2))?;
                match parse_i64(&a[1])? {
                    0 => now(Reply::ok()),
                    _ => now(Reply::err("DB index is out of range")),
                }
            }
            "command" => now(match a.get(1).map(|s| s.to_ascii_lowercase()) {
                Some(s) if s == b"count" => Reply::Integer(COMMANDS.len() as i64),
                _ => Reply::Array(Some(Vec::new())),
            }),
            "config" => {
                arity(name, a, 3, None)?;
                if !a[1].eq_ignore_ascii_case(b"get") {
                    return now(Reply::err("CONFIG supports only GET"));
                }
                let mut out = Vec::new();
                for pat in &a[2..] {
                    for (k, v) in [("save", ""), ("appendonly", "no"), ("databases", "1")] {
                        if pat.as_slice() == b"*" || pat.eq_ignore_ascii_case(k.as_bytes()) {
                            out.push(Reply::bulk(k));
                            out.push(Reply::bulk(v));
                        }
                    }
                }
                now(Reply::Array(Some(out)))
            }
            "dbsize" => {
                arity(name, a, 1, Some(1))?;
                now(Reply::Integer(self.dbsize() as i64))
            }
            "info" => {
                let mut s = info();
                s.push_str(&format!("# Keyspace\r\ndb0:keys={}\r\n", self.dbsize()));
                now(Reply::bulk(s))
            }
            "type" => {
                arity(name, a, 2, Some(2))?;
                let t = match self.read_any(&a[1])? {
                    None => "none",
                    Some((v, _)) => match v.kind() {
                        Kind::String => "string",
                        Kind::List => "list",
                        Kind::Set => "set",
                        Kind::Hash => "hash",
                        Kind::ZSet => "zset",
                    },
                };
                now(Reply::Simple(t.into()))
            }
            "get" => {
                arity(name, a, 2, Some(2))?;
                now(match self.read_kind(&a[1], Kind::String)? {
                    Some(Value::Str(s)) => Reply::bulk(s),
                    _ => Reply::nil(),
                })
            }
            "mget" => {
                arity(name, a, 2, None)?;
                let mut out = Vec::with_capacity(a.len() - 1);
                for k in &a[1..] {
                    out.push(match self.read_in(schema::STRINGS, k)? {
                        Some((Value::Str(s), _)) => Reply::bulk(s),
                        _ => Reply::nil(),
                    });
                }
                now(Reply::Array(Some(out)))
            }
            "exists" => {
                arity(name, a, 2, None)?;
                let mut n = 0;
                for k in &a[1..] {
                    for t in TABLES {
                        if self.holds(t, k)? {
                            n += 1;
                            break;
                        }
                    }
                }
                now(Reply::Integer(n))
            }
            "strlen" => {
                arity(name, a, 2, Some(2))?;
                now(Reply::Integer(
                    match self.read_kind(&a[1], Kind::String)? {
                        Some(Value::Str(s)) => s.len() as i64,
                        _ => 0,
                    },
                ))
            }
            "llen" | "scard" | "hlen" | "zcard" => {
                arity(name, a, 2, Some(2))?;
                let kind = match name {
                    "llen" => Kind::List,
                    "scard" => Kind::Set,
                    "hlen" => Kind::Hash,
                    _ => Kind::ZSet,
                };
                let n = match self.read_kind(&a[1], kind)? {
                    Some(Value::List(l)) => l.len(),
                    Some(Value::Set(s)) => s.len(),
                    Some(Value::Hash(h)) => h.len(),
                    Some(Value::ZSet(z)) => z.len(),
                    _ => 0,
                };
                now(Reply::Integer(n as i64))
            }
            "lrange" => {
                arity(name, a, 4, Some(4))?;
                let (start, stop) = (parse_i64(&a[2])?, parse_i64(&a[3])?);
                let l = match self.read_kind(&a[1], Kind::List)? {
                    Some(Value::List(l)) => l,
                    _ => VecDeque::new(),
                };
                let (s, e) = range(start, stop, l.len());
                now(Reply::bulks(l.into_iter().skip(s).take(e - s)))
            }
            "smembers" => {
                arity(name, a, 2, Some(2))?;
                now(match self.read_kind(&a[1], Kind::Set)? {
                    Some(Value::Set(s)) => Reply::bulks(s),
                    _ => Reply::Array(Some(Vec::new())),
                })
            }
            "sismember" => {
                arity(name, a, 3, Some(3))?;
                now(Reply::Integer(match self.read_kind(&a[1], Kind::Set)? {
                    Some(Value::Set(s)) => s.contains(&a[2]) as i64,
                    _ => 0,
                }))
            }
            "hget" => {
                arity(name, a, 3, Some(3))?;
                now(match self.read_kind(&a[1], Kind::Hash)? {
                    Some(Value::Hash(h)) => Reply::Bulk(h.get(&a[2]).cloned()),
                    _ => Reply::nil(),
                })
            }
            "hgetall" => {
                arity(name, a, 2, Some(2))?;
                now(match self.read_kind(&a[1], Kind::Hash)? {
                    Some(Value::Hash(h)) => Reply::bulks(h.into_iter().flat_map(|(f, v)| [f, v])),
                    _ => Reply::Array(Some(Vec::new())),
                })
            }
            "zscore" => {
                arity(name, a, 3, Some(3))?;
                now(match self.read_kind(&a[1], Kind::ZSet)? {
                    Some(Value::ZSet(z)) => Reply::Bulk(z.get(&a[2]).map(|s| fmt_score(*s))),
                    _ => Reply::nil(),
                })
            }
            "zrange" => {
                arity(name, a, 4, Some(5))?;
                let withscores = match a.get(4) {
                    None => false,
                    Some(o) if o.eq_ignore_ascii_case(b"withscores") => true,
                    Some(_) => return Err(Reply::err("syntax error")),
                };
                let (start, stop) = (parse_i64(&a[2])?, parse_i64(&a[3])?);
                let z = match self.read_kind(&a[1], Kind::ZSet)? {
                    Some(Value::ZSet(z)) => z,
                    _ => BTreeMap::new(),
                };
                let sorted = zset_sorted(&z);
                let (s, e) = range(start, stop, sorted.len());
                let mut out = Vec::new();
                for (m, sc) in &sorted[s..e] {
                    out.push((*m).clone());
                    if withscores {
                        out.push(fmt_score(*sc));
                    }
                }
                now(Reply::bulks(out))
            }
            _ => self.dispatch_write(name, a),
        }
    }

    fn dispatch_write(&self, name: &str, a: &[Vec<u8>]) -> Result<Outcome, Reply> {
        let o = match name {
            "set" => {
                arity(name, a, 3, None)?;
                let (mut nx, mut xx) = (false, false);
                for opt in &a[3..] {
                    match opt.to_ascii_lowercase().as_slice() {
                        b"nx" => nx = true,
                        b"xx" => xx = true,
                        b"ex" | b"px" | b"exat" | b"pxat" | b"keepttl" => {
                            return Err(Reply::err("key expiry is not supported by kvd"))
                        }
                        _ => return Err(Reply::err("syntax error")),
                    }
                }
                if nx && xx {
                    return Err(Reply::err("syntax error"));
                }
                self.write(|tx| {
                    let exists = tx.current(&a[1])?.is_some();
                    if (nx && exists) || (xx && !exists) {
                        return Ok(Reply::nil());
                    }
                    tx.store(&a[1], Value::Str(a[2].clone()))?;
                    Ok(Reply::ok())
                })
            }
            "mset" => {
                if a.len() < 3 || a.len().is_multiple_of(2) {
                    return Err(wrong_args(name));
                }
                self.write(|tx| {
                    for kv in a[1..].chunks(2) {
                        tx.store(&kv[0], Value::Str(kv[1].clone()))?;
                    }
                    Ok(Reply::ok())
                })
            }
            "incr" | "decr" | "incrby" | "decrby" => {
                let by = match name {
                    "incr" => {
                        arity(name, a, 2, Some(2))?;
                        1
                    }
                    "decr" => {
                        arity(name, a, 2, Some(2))?;
                        -1
                    }
                    "incrby" => {
                        arity(name, a, 3, Some(3))?;
                        parse_i64(&a[2])?
                    }
                    _ => {
                        arity(name, a, 3, Some(3))?;
                        parse_i64(&a[2])?
                            .checked_neg()
                            .ok_or_else(|| Reply::err("decrement would overflow"))?
                    }
                };
                self.write(|tx| {
                    let cur = match tx.load_kind(&a[1], Kind::String)? {
                        Some(Value::Str(s)) => parse_i64(&s)?,
                        _ => 0,
                    };
                    let n = cur
                        .checked_add(by)
                        .ok_or_else(|| Reply::err("increment or decrement would overflow"))?;
                    tx.store(&a[1], Value::Str(n.to_string().into_bytes()))?;
                    Ok(Reply::Integer(n))
                })
            }
            "append" => {
                arity(name, a, 3, Some(3))?;
                self.write(|tx| {
                    let mut s = match tx.load_kind(&a[1], Kind::String)? {
                        Some(Value::Str(s)) => s,
                        _ => Vec::new(),
                    };
                    s.extend_from_slice(&a[2]);
                    let n = s.len() as i64;
                    tx.store(&a[1], Value::Str(s))?;
                    Ok(Reply::Integer(n))
                })
            }
            "del" | "unlink" => {
                arity(name, a, 2, None)?;
                self.write(|tx| {
                    let mut n = 0;
                    for k in &a[1..] {
                        n += tx.delete(k)? as i64;
                    }
                    Ok(Reply::Integer(n))
                })
            }
            "lpush" | "rpush" => {
                arity(name, a, 3, None)?;
                let left = name == "lpush";
                self.write(|tx| {
                    let mut l = match tx.load_kind(&a[1], Kind::List)? {
                        Some(Value::List(l)) => l,
                        _ => VecDeque::new(),
                    };
                    for v in &a[2..] {
                        if left {
                            l.push_front(v.clone());
                        } else {
                            l.push_back(v.clone());
                        }
                    }
                    let n = l.len() as i64;
                    tx.store(&a[1], Value::List(l))?;
                    Ok(Reply::Integer(n))
                })
            }
            "lpop" | "rpop" => {
                arity(name, a, 2, Some(3))?;
                let count = a.get(2).map(|c| parse_count(c)).transpose()?;
                let left = name == "lpop";
                self.write(|tx| {
                    let Some(Value::List(mut l)) = tx.load_kind(&a[1], Kind::List)? else {
                        return Ok(if count.is_some() {
                            Reply::Array(None)
                        } else {
                            Reply::nil()
                        });
                    };
                    let mut out = Vec::new();
                    for _ in 0..count.unwrap_or(1) {
                        match if left { l.pop_front() } else { l.pop_back() } {
                            Some(v) => out.push(v),
                            None => break,
                        }
                    }
                    tx.store(&a[1], Value::List(l))?;
                    Ok(match count {
                        Some(_) => Reply::bulks(out),
                        None => Reply::Bulk(out.pop()),
                    })
                })
            }
            "sadd" | "srem" => {
                arity(name, a, 3, None)?;
                let add = name == "sadd";
                self.write(|tx| {
                    let mut s = match tx.load_kind(&a[1], Kind::Set)? {
                        Some(Value::Set(s)) => s,
                        _ => BTreeSet::new(),
                    };
                    let mut n = 0;
                    for m in &a[2..] {
                        n += if add {
                            s.insert(m.clone())
                        } else {
                            s.remove(m)
                        } as i64;
                    }
                    if n > 0 {
                        tx.store(&a[1], Value::Set(s))?;
                    }
                    Ok(Reply::Integer(n))
                })
            }
            "spop" => {
                arity(name, a, 2, Some(3))?;
                let count = a.get(2).map(|c| parse_count(c)).transpose()?;
                self.write(|tx| {
                    let Some(Value::Set(mut s)) = tx.load_kind(&a[1], Kind::Set)? else {
                        return Ok(if count.is_some() {
                            Reply::Array(Some(Vec::new()))
                        } else {
                            Reply::nil()
                        });
                    };
                    let mut out = Vec::new();
                    for _ in 0..count.unwrap_or(1) {
                        if s.is_empty() {
                            break;
                        }
                        let i = (self.random() % s.len() as u64) as usize;
                        let m = s.iter().nth(i).cloned().expect("index below len");
                        s.remove(&m);
                        out.push(m);
                    }
                    tx.store(&a[1], Value::Set(s))?;
                    Ok(match count {
                        Some(_) => Reply::bulks(out),
                        None => Reply::Bulk(out.pop()),
                    })
                })
            }
            "hset" | "hmset" => {
                if a.len() < 4 || a.len() % 2 == 1 {
                    return Err(wrong_args(name));
                }
                self.write(|tx| {
                    let mut h = match tx.load_kind(&a[1], Kind::Hash)? {
                        Some(Value::Hash(h)) => h,
                        _ => BTreeMap::new(),
                    };
                    let mut n = 0;
                    for fv in a[2..].chunks(2) {
                        n += h.insert(fv[0].clone(), fv[1].clone()).is_none() as i64;
                    }
                    tx.store(&a[1], Value::Hash(h))?;
                    Ok(if name == "hmset" {
                        Reply::ok()
                    } else {
                        Reply::Integer(n)
                    })
                })
            }
            "hdel" => {
                arity(name, a, 3, None)?;
                self.write(|tx| {
                    let Some(Value::Hash(mut h)) = tx.load_kind(&a[1], Kind::Hash)? else {
                        return Ok(Reply::Integer(0));
                    };
                    let n = a[2..].iter().filter(|f| h.remove(*f).is_some()).count() as i64;
                    if n > 0 {
                        tx.store(&a[1], Value::Hash(h))?;
                    }
                    Ok(Reply::Integer(n))
                })
            }
            "zadd" => {
                arity(name, a, 4, None)?;
                let (mut nx, mut xx, mut ch) = (false, false, false);
                let mut i = 2;
                while i < a.len() {
                    match a[i].to_ascii_lowercase().as_slice() {
                        b"nx" => nx = true,
                        b"xx" => xx = true,
                        b"ch" => ch = true,
                        b"gt" | b"lt" | b"incr" => {
                            return Err(Reply::err("ZADD GT, LT and INCR are not supported by kvd"))
                        }
                        _ => break,
                    }
                    i += 1;
                }
                let pairs = &a[i..];
                if pairs.is_empty() || pairs.len() % 2 == 1 || (nx && xx) {
                    return Err(Reply::err("syntax error"));
                }
                let mut parsed = Vec::with_capacity(pairs.len() / 2);
                for p in pairs.chunks(2) {
                    parsed.push((parse_score(&p[0])?, p[1].clone()));
                }
                self.write(|tx| {
                    let mut z = match tx.load_kind(&a[1], Kind::ZSet)? {
                        Some(Value::ZSet(z)) => z,
                        _ => BTreeMap::new(),
                    };
                    let (mut added, mut changed) = (0, 0);
                    for (score, m) in parsed {
                        match z.get(&m).copied() {
                            None if !xx => {
                                z.insert(m, score);
                                added += 1;
                            }
                            Some(old) if !nx && old != score => {
                                z.insert(m, score);
                                changed += 1;
                            }
                            _ => {}
                        }
                    }
                    if added + changed > 0 {
                        tx.store(&a[1], Value::ZSet(z))?;
                    }
                    Ok(Reply::Integer(if ch { added + changed } else { added }))
                })
            }
            "zpopmin" => {
                arity(name, a, 2, Some(3))?;
                let count = a.get(2).map(|c| parse_count(c)).transpose()?.unwrap_or(1);
                self.write(|tx| {
                    let Some(Value::ZSet(mut z)) = tx.load_kind(&a[1], Kind::ZSet)? else {
                        return Ok(Reply::Array(Some(Vec::new())));
                    };
                    let popped: Vec<(Vec<u8>, f64)> = zset_sorted(&z)
                        .into_iter()
                        .take(count)
                        .map(|(m, s)| (m.clone(), s))
                        .collect();
                    let mut out = Vec::new();
                    for (m, s) in popped {
                        z.remove(&m);
                        out.push(m);
                        out.push(fmt_score(s));
                    }
                    tx.store(&a[1], Value::ZSet(z))?;
                    Ok(Reply::bulks(out))
                })
            }
            other => {
                let mut msg = format!(
                    "unknown command '{}'",
                    String::from_utf8_lossy(other.as_bytes())
                );
                if a.len() > 1 {
                    let shown: Vec<String> = a[1..]
                        .iter()
                        .take(4)
                        .map(|x| format!("'{}'", String::from_utf8_lossy(&x[..x.len().min(64)])))
                        .collect();
                    msg.push_str(&format!(", with args beginning with: {}", shown.join(" ")));
                }
                Outcome::Now(Reply::err(msg))
            }
        };
        Ok(o)
    }
}

/// Commands kvd implements (COMMAND COUNT).
pub const COMMANDS: &[&str] = &[
    "ping",
    "echo",
    "quit",
    "select",
    "command",
    "config",
    "dbsize",
    "info",
    "type",
    "get",
    "mget",
    "exists",
    "strlen",
    "llen",
    "scard",
    "hlen",
    "zcard",
    "lrange",
    "smembers",
    "sismember",
    "hget",
    "hgetall",
    "zscore",
    "zrange",
    "set",
    "mset",
    "incr",
    "decr",
    "incrby",
    "decrby",
    "append",
    "del",
    "unlink",
    "lpush",
    "rpush",
    "lpop",
    "rpop",
    "sadd",
    "srem",
    "spop",
    "hset",
    "hmset",
    "hdel",
    "zadd",
    "zpopmin",
];

/// One write command's view: reads see its own earlier writes.
struct Tx<'a> {
    db: &'a Db,
    seq: u64,
    muts: Vec<Mutation>,
    /// Values this command wrote (or deleted), for read-your-writes within the command.
    overlay: HashMap<Vec<u8>, Option<(Value, Meta)>>,
    /// Kind and metadata of keys already read, so a store does not decode them again.
    known: HashMap<Vec<u8>, Option<(Kind, Meta)>>,
}

impl Tx<'_> {
    fn load(&mut self, key: &[u8]) -> Result<Option<(Value, Meta)>, Reply> {
        if let Some(v) = self.overlay.get(key) {
            return Ok(v.clone());
        }
        let v = self.db.read_any(key)?;
        self.known
            .insert(key.to_vec(), v.as_ref().map(|(v, m)| (v.kind(), *m)));
        Ok(v)
    }

    fn load_kind(&mut self, key: &[u8], kind: Kind) -> Result<Option<Value>, Reply> {
        match self.load(key)? {
            None => Ok(None),
            Some((v, _)) if v.kind() == kind => Ok(Some(v)),
            Some(_) => Err(Reply::Error(WRONGTYPE.into())),
        }
    }

    /// Kind and metadata of the current value at `key`.
    fn current(&mut self, key: &[u8]) -> Result<Option<(Kind, Meta)>, Reply> {
        if let Some(v) = self.overlay.get(key) {
            return Ok(v.as_ref().map(|(v, m)| (v.kind(), *m)));
        }
        if let Some(k) = self.known.get(key) {
            return Ok(*k);
        }
        Ok(self.load(key)?.map(|(v, m)| (v.kind(), m)))
    }

    /// Writes `value` at `key` (replacing a value of any kind); an empty collection deletes.
    fn store(&mut self, key: &[u8], value: Value) -> Result<(), Reply> {
        if value.is_empty_collection() {
            self.delete(key)?;
            return Ok(());
        }
        let old = self.current(key)?;
        let meta = match old {
            Some((k, m)) if k == value.kind() => Meta {
                created_seq: m.created_seq,
                updated_seq: self.seq,
                version: m.version + 1,
            },
            _ => Meta {
                created_seq: self.seq,
                updated_seq: self.seq,
                version: 1,
            },
        };
        if let Some((k, _)) = old {
            if k != value.kind() {
                self.muts.push(Mutation::delete(k.table(), key.to_vec()));
            }
        }
        let bytes = encode(self.db.version, &value, meta);
        self.muts
            .push(Mutation::put(value.kind().table(), key.to_vec(), bytes));
        self.overlay.insert(key.to_vec(), Some((value, meta)));
        Ok(())
    }

    /// Deletes `key`; true if it existed.
    fn delete(&mut self, key: &[u8]) -> Result<bool, Reply> {
        let Some((k, _)) = self.current(key)? else {
            return Ok(false);
        };
        self.muts.push(Mutation::delete(k.table(), key.to_vec()));
        self.overlay.insert(key.to_vec(), None);
        Ok(true)
    }
}

fn wrong_args(name: &str) -> Reply {
    Reply::err(format!("wrong number of arguments for '{name}' command"))
}

fn arity(name: &str, a: &[Vec<u8>], min: usize, max: Option<usize>) -> Result<(), Reply> {
    if a.len() < min || max.is_some_and(|m| a.len() > m) {
        return Err(wrong_args(name));
    }
    Ok(())
}

fn parse_i64(b: &[u8]) -> Result<i64, Reply> {
    let bad = || Reply::err("value is not an integer or out of range");
    let s = std::str::from_utf8(b).map_err(|_| bad())?;
    if s.is_empty() || s.starts_with('+') || s.len() > 20 {
        return Err(bad());
    }
    s.parse().map_err(|_| bad())
}

fn parse_count(b: &[u8]) -> Result<usize, Reply> {
    let n = parse_i64(b)?;
    if n < 0 {
        return Err(Reply::err("value is out of range, must be positive"));
    }
    Ok(n as usize)
}

fn parse_score(b: &[u8]) -> Result<f64, Reply> {
    let s = std::str::from_utf8(b).map_err(|_| Reply::err("value is not a valid float"))?;
    match s.to_ascii_lowercase().parse::<f64>() {
        Ok(f) if !f.is_nan() => Ok(f),
        _ => Err(Reply::err("value is not a valid float")),
    }
}

fn fmt_score(s: f64) -> Vec<u8> {
    format!("{s}").into_bytes()
}

/// Redis range semantics: negative indices count from the end; returns `[start, end)`.
fn range(start: i64, stop: i64, len: usize) -> (usize, usize) {
    let n = len as i64;
    let s = if start < 0 { (start + n).max(0) } else { start };
    let e = if stop < 0 { stop + n } else { stop.min(n - 1) };
    if s > e || s >= n {
        return (0, 0);
    }
    (s as usize, (e + 1) as usize)
}

#[cfg(test)]
mod tests {
    use super::range;

    #[test]
    fn ranges_follow_redis_rules() {
        assert_eq!(range(0, -1, 5), (0, 5));
        assert_eq!(range(1, 2, 5), (1, 3));
        assert_eq!(range(-2, -1, 5), (3, 5));
        assert_eq!(range(-100, 100, 5), (0, 5));
        assert_eq!(range(3, 1, 5), (0, 0));
        assert_eq!(range(5, 10, 5), (0, 0));
        assert_eq!(range(0, -1, 0), (0, 0));
        assert_eq!(range(0, -6, 5), (0, 0));
    }
}
