//! The replica handle: roles, apply, standby attach, follow, fencing, switchover.
//!
//! The handle and the state it guards live here; the rest is split by role:
//!
//! * [`config`]: [`ReplicaConfig`] and [`Durability`];
//! * [`status`]: [`Role`], [`AckToken`], [`Status`], [`StandbyStatus`] and the waits on them;
//! * [`link`]: both ends of a link (liveness, the active's outbox, the standby's writer), the
//!   handshake watchdog and the frame reader both ends share;
//! * [`batch`]: [`Batch`] and the encoding of batch frames in a stream version;
//! * [`active`]: activation, apply / submit and their durability waits, digest checks;
//! * [`attach`]: the active's side of a link (accept, handshake, resume, acknowledgements);
//! * [`bulk`]: the active's side of a bulk transfer;
//! * [`follow`]: the standby's side (handshake, then one handler per frame type);
//! * [`switchover`]: planned switchover, demotion and fencing.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

mod active;
mod attach;
mod batch;
mod bulk;
mod config;
mod follow;
mod link;
mod status;
mod switchover;

pub use attach::{
    serve, serve_with, ExpectedStandby, ServeHandle, ServeLimits, HANDSHAKE_DEADLINE, MAX_EXPECTED,
    MAX_HELLO, MAX_SYNC_CONNECTIONS,
};
pub use batch::Batch;
pub use config::{Durability, ReplicaConfig};
pub use follow::FollowHandle;
pub use status::{AckToken, Role, StandbyStatus, Status};

use batch::close_chunk;
use follow::FollowState;
use link::{Link, LinkState};

use crate::log::ResumeLog;
use crate::store::Store;
use crate::wire::FrameWriter;
use crate::{
    Digest, Epoch, PreflightFailure, PreflightReport, Record, Schema, SchemaVersion, Seq,
    SyncError, Table,
};

/// A replicated service's state and its replication machinery. Cheap to
/// clone; all clones share the same state.
#[derive(Clone)]
pub struct Replica {
    inner: Arc<Inner>,
}

type RoleCallback = Arc<dyn Fn(Role, Epoch) + Send + Sync>;

struct Inner {
    schema: Schema,
    config: ReplicaConfig,
    state: Mutex<State>,
    cond: Condvar,
    next_id: AtomicU64,
    /// Bumped (under the state lock) whenever a standby acknowledgement is
    /// recorded: what a spinning `apply` watches.
    acks: AtomicU64,
    /// [`ReplicaConfig::ha_grace`] in microseconds, adjustable at run time.
    ha_grace_us: AtomicU64,
    callbacks: Mutex<Vec<RoleCallback>>,
    /// Threads on a client's path (a write, a standby's acknowledgement) waiting for the
    /// state lock: background steps (bulk transfers) let them go first, since the lock does
    /// not hand itself over to a waiter and a step taken again at once would starve them.
    urgent: AtomicUsize,
}

struct State {
    role: Role,
    epoch: Epoch,
    store: Store,
    seq: Seq,
    quiesced: bool,
    links: Vec<LinkState>,
    follow: Option<FollowState>,
    last_error: Option<String>,
    scratch: FrameWriter,
    /// Epoch the batch at `seq` was applied in (0: unknown).
    last_epoch: Epoch,
    /// The state is a whole prefix of a history (not a partial snapshot).
    history_ok: bool,
    /// Recent batches, for resuming standbys.
    log: ResumeLog,
    snapshots_sent: u64,
    resumes_sent: u64,
    snapshots_received: u64,
    resumes_received: u64,
    /// Designated HA standbys (by node) that dropped out while in sync, and when: see
    /// [`ReplicaConfig::ha_grace`].
    ha_dropped: Vec<(String, Instant)>,
    /// Standbys the control plane wrote off ([`Replica::standby_gone`]); at most 16.
    gone: Vec<String>,
    /// The standbys the control plane told this instance to serve
    /// ([`Replica::expect_standbys`]); `None`: any. At most [`MAX_EXPECTED`].
    expected: Option<Vec<ExpectedStandby>>,
    /// The highest batch (epoch, sequence) found durable: it stays durable when this replica
    /// learns of a newer epoch afterwards, and its waiters are answered so.
    durable: (Epoch, Seq),
}

impl State {
    /// Moves to `epoch`, which the caller checked is not older: epochs never go back.
    fn set_epoch(&mut self, epoch: Epoch) {
        assert!(
            epoch >= self.epoch,
            "epoch going back from {} to {}",
            self.epoch.0,
            epoch.0
        );
        self.epoch = epoch;
    }

    /// Records the batch `first..=last`, applied in epoch `origin`, as the last one applied:
    /// it continues the applied sequence (the caller checked), so sequence numbers never go
    /// back.
    fn applied(&mut self, first: Seq, last: Seq, origin: Epoch) {
        debug_assert!(
            first == self.seq + 1 && last >= first,
            "batch {first}..={last} does not continue the applied sequence {}",
            self.seq
        );
        self.seq = last;
        self.last_epoch = origin;
    }
}

/// Records one step of building a digest in a foreign version converts.
const DIGEST_STEP: usize = 4096;

/// The longest a background step waits for threads on a client's path to take the state lock
/// first.
const YIELD_TO_CLIENTS: Duration = Duration::from_millis(2);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl fmt::Debug for Replica {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replica")
            .field("service", &self.inner.schema.service())
            .field("node", &self.inner.config.node)
            .finish()
    }
}

impl Replica {
    /// A replica of `schema`'s state, starting as a detached standby at epoch
    /// 0 with empty tables. Make it active with [`Replica::activate`] or
    /// attach it to an active with [`Replica::follow`].
    pub fn new(schema: Schema, config: ReplicaConfig) -> Replica {
        let mut store = Store::new(schema.tables());
        // Keep the digest in the nearest version this build also writes (a
        // mixed-version pair streams in it) from the start, while the state
        // is empty: a resume then compares digests without a scan.
        let native = schema.version();
        let writes = schema.writes().0;
        if let Some(&v) = writes
            .iter()
            .filter(|&&v| v < native)
            .max()
            .or_else(|| writes.iter().filter(|&&v| v > native).min())
        {
            store.track(&schema, v);
        }
        let log = ResumeLog::new(config.resume_log_bytes, config.resume_log_batches);
        let ha_grace_us = config.ha_grace.as_micros().min(u64::MAX as u128) as u64;
        Replica {
            inner: Arc::new(Inner {
                schema,
                config,
                state: Mutex::new(State {
                    role: Role::Standby,
                    epoch: crate::ControlEpoch(0),
                    store,
                    seq: 0,
                    quiesced: false,
                    links: Vec::new(),
                    follow: None,
                    last_error: None,
                    scratch: FrameWriter::new(),
                    last_epoch: crate::ControlEpoch(0),
                    history_ok: true,
                    log,
                    snapshots_sent: 0,
                    resumes_sent: 0,
                    snapshots_received: 0,
                    resumes_received: 0,
                    ha_dropped: Vec::new(),
                    gone: Vec::new(),
                    expected: None,
                    durable: (crate::ControlEpoch(0), 0),
                }),
                cond: Condvar::new(),
                next_id: AtomicU64::new(1),
                acks: AtomicU64::new(0),
                ha_grace_us: AtomicU64::new(ha_grace_us),
                callbacks: Mutex::new(Vec::new()),
                urgent: AtomicUsize::new(0),
            }),
        }
    }

    /// The schema.
    pub fn schema(&self) -> &Schema {
        &self.inner.schema
    }

    /// The configuration.
    pub fn config(&self) -> &ReplicaConfig {
        &self.inner.config
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.inner.state)
    }

    /// The state lock for a client's path: background steps wait for it (bounded).
    fn state_urgent(&self) -> MutexGuard<'_, State> {
        self.inner.urgent.fetch_add(1, Ordering::AcqRel);
        let g = self.state();
        self.inner.urgent.fetch_sub(1, Ordering::AcqRel);
        g
    }

    /// The state lock for a background step: first lets threads on a client's path that
    /// wait for it go, for at most [`YIELD_TO_CLIENTS`].
    fn state_background(&self) -> MutexGuard<'_, State> {
        let until = Instant::now() + YIELD_TO_CLIENTS;
        // Sleeping, not spinning: on saturated CPUs a spinning step would take the very time
        // the waiting threads need.
        while self.inner.urgent.load(Ordering::Acquire) > 0 && Instant::now() < until {
            thread::sleep(Duration::from_micros(50));
        }
        self.state()
    }

    fn notify_role(&self, role: Role, epoch: Epoch) {
        let cbs: Vec<RoleCallback> = lock(&self.inner.callbacks).clone();
        for cb in cbs {
            cb(role, epoch);
        }
    }

    /// A copy of the value at `key` in `table` (any role). To read it
    /// without a copy, see [`Replica::with_table`].
    pub fn get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>, SyncError> {
        self.with_table(table, |t| t.get(key).map(<[u8]>::to_vec))
    }

    /// Runs `f` over `table` under the state lock (keep it short).
    pub fn with_table<R>(&self, table: &str, f: impl FnOnce(&Table) -> R) -> Result<R, SyncError> {
        let st = self.state();
        match st.store.table(table) {
            Some(t) => Ok(f(t)),
            None => Err(SyncError::UnknownTable {
                service: self.inner.schema.service().into(),
                version: self.inner.schema.version(),
                table: table.into(),
            }),
        }
    }

    /// A copy of every record, sorted, and the sequence it is consistent at.
    /// Copies the whole state under the state lock: for tests and
    /// inspection of small states, never on a service's path.
    pub fn records(&self) -> (Seq, Vec<Record>) {
        let (seq, mut r) = {
            let st = self.state();
            (st.seq, st.store.records())
        };
        r.sort();
        (seq, r)
    }

    /// Digest of the state in the native version and its sequence.
    pub fn digest(&self) -> (Seq, Digest) {
        let v = self.inner.schema.version();
        self.digest_in(v)
            .expect("no transform runs for the native version")
    }

    /// Digest of the state converted to `version`, and its sequence. Kept
    /// per mutation in the native version and in the tracked one; another
    /// version becomes the tracked one, its digest built in bounded steps
    /// while writes go on.
    pub fn digest_in(&self, version: SchemaVersion) -> Result<(Seq, Digest), SyncError> {
        let mut seq = 0;
        let d = self.digest_held_with(self.state(), version, |st| seq = st.seq)?;
        Ok((seq, d))
    }

    /// The digest in `version` of the state as it stands when this returns:
    /// kept per mutation, or tracked from now on and built in bounded steps,
    /// letting go of the lock between them. Mutations keep a tracked digest
    /// exact, so the result is that of the state under the last lock.
    fn digest_held<'a>(
        &'a self,
        st: MutexGuard<'a, State>,
        version: SchemaVersion,
    ) -> Result<Digest, SyncError> {
        self.digest_held_with(st, version, |_| {})
    }

    fn digest_held_with<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        version: SchemaVersion,
        mut at: impl FnMut(&State),
    ) -> Result<Digest, SyncError> {
        let schema = &self.inner.schema;
        let mut started = false;
        loop {
            if let Some(d) = st.store.digest_kept(schema, version) {
                at(&st);
                return Ok(d);
            }
            if st.store.tracked() != Some(version) {
                if started {
                    // The build stopped at a record that does not convert:
                    // name it.
                    let native = schema.version();
                    return Err(match st.store.digest_scan(schema, native, version) {
                        Err(e) => e.into(),
                        Ok(_) => SyncError::Protocol(format!(
                            "the digest in version {version} could not be kept"
                        )),
                    });
                }
                st.store.track(schema, version);
                started = true;
            }
            st.store.track_step(schema, DIGEST_STEP);
            drop(st);
            st = self.state_background();
        }
    }

    /// Pre-flight: converts the live state to `target` (and back), reporting
    /// success or the first failing record. Reads the state in bounded
    /// chunks, copying one chunk at a time under the lock and converting it
    /// outside; a record written during the walk is checked in the version
    /// it had when its chunk was read. Live state is untouched.
    pub fn preflight(&self, target: SchemaVersion) -> Result<PreflightReport, PreflightFailure> {
        let schema = &self.inner.schema;
        let mut report = PreflightReport {
            from: schema.version(),
            to: target,
            records: 0,
            converted: 0,
            dropped: 0,
        };
        let mut cur = crate::store::Cursor::default();
        let mut chunk: Vec<Record> = Vec::new();
        loop {
            chunk.clear();
            let done = {
                let mut st = self.state_background();
                let mut bytes = 0usize;
                st.store.scan(&mut cur, 16 << 10, |t, k, v| {
                    bytes += t.len() + k.len() + v.len();
                    chunk.push(Record::new(t, k.to_vec(), v.to_vec()));
                    bytes < 1 << 20
                })
            };
            let r = schema.preflight(target, chunk.iter())?;
            report.records += r.records;
            report.converted += r.converted;
            report.dropped += r.dropped;
            if done {
                return Ok(report);
            }
        }
    }

    /// Registers a callback run (on a library thread) after every role
    /// change, e.g. a standby promoted by a switchover.
    pub fn on_role_change(&self, f: impl Fn(Role, Epoch) + Send + Sync + 'static) {
        lock(&self.inner.callbacks).push(Arc::new(f));
    }

    /// Current role.
    pub fn role(&self) -> Role {
        self.state().role
    }

    /// Highest epoch known.
    pub fn epoch(&self) -> Epoch {
        self.state().epoch
    }

    /// Stops every link and thread of this replica; further calls fail with
    /// [`SyncError::Shutdown`] or [`SyncError::NotActive`].
    pub fn shutdown(&self) {
        let mut st = self.state();
        st.role = Role::Stopped;
        let links: Vec<LinkState> = st.links.drain(..).collect();
        let follow = st.follow.take();
        drop(st);
        for l in links {
            l.link.core.close();
        }
        if let Some(f) = follow {
            f.link.core.close();
        }
        self.inner.cond.notify_all();
    }
}

fn not_active(st: &State) -> SyncError {
    match st.role {
        Role::Stopped => SyncError::Shutdown,
        role => SyncError::NotActive { role },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica() -> Replica {
        Replica::new(Schema::new("kv", 1).table("kv"), ReplicaConfig::new("a"))
    }

    #[test]
    fn set_epoch_moves_forward_and_stays() {
        let r = replica();
        let mut st = r.state();
        st.set_epoch(crate::ControlEpoch(3));
        st.set_epoch(crate::ControlEpoch(3));
        st.set_epoch(crate::ControlEpoch(7));
        assert_eq!(st.epoch, crate::ControlEpoch(7));
    }

    #[test]
    #[should_panic(expected = "epoch going back from 7 to 6")]
    fn set_epoch_refuses_to_go_back() {
        let r = replica();
        let mut st = r.state();
        st.set_epoch(crate::ControlEpoch(7));
        st.set_epoch(crate::ControlEpoch(6));
    }

    #[test]
    fn applied_batches_continue_the_sequence() {
        let r = replica();
        let mut st = r.state();
        st.applied(1, 1, crate::ControlEpoch(2));
        st.applied(2, 5, crate::ControlEpoch(3));
        assert_eq!((st.seq, st.last_epoch.0), (5, 3));
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "does not continue the applied sequence 5")]
    fn an_applied_batch_that_goes_back_is_caught() {
        let r = replica();
        let mut st = r.state();
        st.applied(1, 5, crate::ControlEpoch(1));
        st.applied(3, 6, crate::ControlEpoch(1));
    }
}
