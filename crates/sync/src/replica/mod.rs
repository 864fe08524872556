//! The replica handle: roles, apply, standby attach, follow, fencing, switchover.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;
use tracing::{debug, info, warn};

mod bulk;

use crate::log::{LogEntry, ResumeLog};
use crate::schema::negotiate;
use crate::store::Store;
use crate::wire::{self, BatchRef, Control, FrameType, FrameWriter, MutationRef, ResumePoint};
use crate::{
    Conn, Digest, Epoch, Mutation, PreflightFailure, PreflightReport, Record, Schema,
    SchemaVersion, Seq, SyncError, Table, VersionSet,
};

/// When [`Replica::apply`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Durability {
    /// Acknowledge only after every in-sync designated HA standby applied the
    /// mutations (the default).
    Sync,
    /// Acknowledge once applied locally and queued; `apply` waits (up to the
    /// ack timeout, then fails with [`SyncError::LagExceeded`]) while any
    /// in-sync HA standby lags more than `max_lag` sequence numbers.
    Async {
        /// Lag bound in sequence numbers.
        max_lag: u64,
    },
}

/// Configuration of a [`Replica`].
#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    /// This instance's node identifier (announced to peers, used by switchover).
    pub node: String,
    /// Durability mode of `apply`.
    pub durability: Durability,
    /// Bound on every wait of `apply` (acks, lag, quiesce) and of handshakes.
    pub ack_timeout: Duration,
    /// A standby is ready only while its lag is at most this many sequence numbers.
    pub ready_lag: u64,
    /// `apply` fails with [`SyncError::NotEnoughStandbys`] if fewer in-sync HA
    /// standbys are attached (0: an active alone still acknowledges).
    pub min_sync_standbys: usize,
    /// Most standbys an active serves (at most 3 by design).
    pub max_standbys: usize,
    /// Bytes queued to one standby before it is disconnected as too slow.
    pub max_queue_bytes: usize,
    /// Interval of keepalive frames on an idle link.
    pub heartbeat: Duration,
    /// A link with no frame for this long is considered dead.
    pub link_timeout: Duration,
    /// Synchronous mode: how long `apply` keeps checking for standby acks,
    /// yielding the CPU between checks, before it sleeps on a condition
    /// variable (saves a thread wake-up on the ack path; zero sleeps at once).
    pub ack_spin: Duration,
    /// Bytes of recent batches kept to resume re-attaching standbys without
    /// a snapshot (0 disables resuming).
    pub resume_log_bytes: usize,
    /// Most batches kept in the resume log (0 disables resuming).
    pub resume_log_batches: usize,
    /// Synchronous mode: after a designated HA standby that was in sync drops out, the
    /// acknowledgements of the batches it lacks are held this long (unless it comes back in
    /// sync first), and only then given without it (degraded). The control plane may be
    /// promoting that very standby after losing this instance (a failover decided before it
    /// learned the standby dropped); make this longer than it takes to detect a lost instance
    /// and fail over. Zero acknowledges without it at once. Adjustable at run time with
    /// [`Replica::set_ha_grace`].
    pub ha_grace: Duration,
    /// Called first on each thread whose work no client waits for: a bulk transfer (either
    /// end) and the stream of a standby that is not the HA standby. A service lowers the
    /// thread's scheduling priority there: on a machine whose CPUs are saturated, a client's
    /// write crosses several threads (the active's, its HA standby's, the acknowledgement's),
    /// each of which would otherwise queue behind the bulk work. `None`: nothing is done.
    pub background_thread: Option<fn()>,
    /// Frame formats this end reads and writes, announced at connect; a link
    /// uses the highest format both ends have (default
    /// [`wire::FormatRange::BUILD`]).
    pub formats: wire::FormatRange,
}

impl ReplicaConfig {
    /// Defaults for node `node`: synchronous, 5 s ack timeout, ready lag
    /// 1000, 3 standbys, 256 MiB queue, 200 ms heartbeat, 3 s link timeout,
    /// 50 µs ack spin, resume log of 64 MiB / 65,536 batches.
    pub fn new(node: impl Into<String>) -> Self {
        ReplicaConfig {
            node: node.into(),
            durability: Durability::Sync,
            ack_timeout: Duration::from_secs(5),
            ready_lag: 1000,
            min_sync_standbys: 0,
            max_standbys: 3,
            max_queue_bytes: 256 << 20,
            heartbeat: Duration::from_millis(200),
            link_timeout: Duration::from_secs(3),
            ack_spin: Duration::from_micros(50),
            resume_log_bytes: 64 << 20,
            resume_log_batches: 1 << 16,
            ha_grace: Duration::ZERO,
            background_thread: None,
            formats: wire::FormatRange::BUILD,
        }
    }
}

/// Role of a replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Role {
    /// Accepts mutations and streams them to standbys.
    Active,
    /// Applies the stream of an active (or waits to be attached).
    Standby,
    /// Was active, learned of a newer epoch: acknowledges nothing.
    Fenced,
    /// Shut down.
    Stopped,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Active => "active",
            Role::Standby => "standby",
            Role::Fenced => "fenced",
            Role::Stopped => "stopped",
        })
    }
}

/// Proof that mutations were applied (and, in synchronous mode, replicated):
/// the last sequence number of the batch and the epoch it was applied in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct AckToken {
    /// Last sequence number of the batch.
    pub seq: Seq,
    /// Epoch of the active that applied it.
    pub epoch: Epoch,
}

/// What an active knows about one attached standby.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StandbyStatus {
    /// Standby node identifier.
    pub node: String,
    /// Transport peer description.
    pub peer: String,
    /// Designated HA standby (counts for synchronous acks once in sync).
    pub ha: bool,
    /// Negotiated stream version.
    pub stream_version: SchemaVersion,
    /// Standby's native version.
    pub native_version: SchemaVersion,
    /// Last sequence the standby acknowledged.
    pub acked_seq: Seq,
    /// Active's applied seq minus the standby's acked seq.
    pub lag: u64,
    /// Bulk snapshot fully applied.
    pub bulk_done: bool,
    /// Caught up past the snapshot: counts for synchronous acks if HA.
    pub in_sync: bool,
    /// The last digest comparison matched.
    pub digest_matched: bool,
    /// bulk_done, in_sync, digest matched and lag within the bound.
    pub ready: bool,
    /// The standby was resumed from the log instead of sent a snapshot.
    pub resumed: bool,
    /// Records sent so far by the bulk transfer (progress; a record changed
    /// during the transfer may be sent twice).
    pub bulk_sent: u64,
}

/// State of one replicated service on this instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Status {
    /// Service name.
    pub service: String,
    /// This node.
    pub node: String,
    /// Role.
    pub role: Role,
    /// Highest epoch known.
    pub epoch: Epoch,
    /// Native schema version.
    pub native_version: SchemaVersion,
    /// Stream version negotiated with the active (standby only).
    pub stream_version: Option<SchemaVersion>,
    /// Last sequence applied locally.
    pub applied_seq: Seq,
    /// Standby: highest sequence the active is known to have; active: applied_seq.
    pub active_seq: Seq,
    /// Standby: active_seq - applied_seq; active: the largest lag of its standbys.
    pub lag: u64,
    /// Standby: bulk snapshot fully applied.
    pub bulk_done: bool,
    /// Standby: the last digest comparison matched.
    pub digest_matched: bool,
    /// Sequence of the last digest comparison.
    pub digest_seq: Seq,
    /// Standby: attached, bulk done, digest matched, lag within the bound and
    /// the active counts it as in sync (for synchronous acknowledgements).
    /// Active: true (an active is in control of its state).
    pub ready: bool,
    /// Active: new mutations are held by a quiesce.
    pub quiesced: bool,
    /// Active: attached standbys.
    pub standbys: Vec<StandbyStatus>,
    /// The error that ended the last link, if any.
    pub last_error: Option<String>,
    /// Full snapshots this instance sent to attaching standbys.
    pub snapshots_sent: u64,
    /// Attaching standbys this instance resumed from its log instead.
    pub resumes_sent: u64,
    /// Full snapshots this instance received as a standby.
    pub snapshots_received: u64,
    /// Resumes from an active's log this instance completed as a standby.
    pub resumes_received: u64,
    /// Records read (and converted, for another version) by full-state
    /// digest scans. The digest in the native version and in one stream
    /// version is kept per mutation instead, so a resume or a digest check
    /// in those versions reads no record.
    pub digest_scan_records: u64,
}

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
    /// The highest batch (epoch, sequence) found durable: it stays durable when this replica
    /// learns of a newer epoch afterwards, and its waiters are answered so.
    durable: (Epoch, Seq),
}

/// Records one step of building a digest in a foreign version converts.
const DIGEST_STEP: usize = 4096;

/// The longest a leaving standby waits for the active to close the link after its Leave.
const LEAVE_WAIT: Duration = Duration::from_millis(500);

/// The longest a background step waits for threads on a client's path to take the state lock
/// first.
const YIELD_TO_CLIENTS: Duration = Duration::from_millis(2);

/// Liveness shared by both ends of a link.
struct LinkCore {
    closed: AtomicBool,
    closer: Option<Arc<dyn Fn() + Send + Sync>>,
    last_rx: Mutex<Instant>,
    tick: Mutex<()>,
    tick_cond: Condvar,
}

impl LinkCore {
    fn new(closer: Option<Arc<dyn Fn() + Send + Sync>>) -> Self {
        LinkCore {
            closed: AtomicBool::new(false),
            closer,
            last_rx: Mutex::new(Instant::now()),
            tick: Mutex::new(()),
            tick_cond: Condvar::new(),
        }
    }

    fn close(&self) {
        if !self.closed.swap(true, Ordering::SeqCst) {
            if let Some(c) = &self.closer {
                c();
            }
            let _g = lock(&self.tick);
            self.tick_cond.notify_all();
        }
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    fn touch(&self) {
        *lock(&self.last_rx) = Instant::now();
    }

    fn idle_for(&self) -> Duration {
        lock(&self.last_rx).elapsed()
    }

    /// Sleeps up to `d` unless the link closes; returns false once closed.
    fn sleep(&self, d: Duration) -> bool {
        let g = lock(&self.tick);
        if self.is_closed() {
            return false;
        }
        let _ = self.tick_cond.wait_timeout(g, d);
        !self.is_closed()
    }
}

struct Outbox {
    buf: Vec<u8>,
    spare: Vec<u8>,
    writing: bool,
    writer: Option<Box<dyn Write + Send>>,
}

/// Active side of a link to one standby.
struct Link {
    id: u64,
    node: String,
    peer: String,
    ha: bool,
    stream_version: SchemaVersion,
    native_version: SchemaVersion,
    core: LinkCore,
    out: Mutex<Outbox>,
    /// Signalled whenever queued frames were written (see `bulk`).
    drained: Condvar,
    /// A bulk transfer writes this link's queue (changed under the state
    /// lock, so a mutation queued after it turns false is flushed by its
    /// submitter and one queued before by the transfer).
    bulk: AtomicBool,
    /// Epoch the standby confirmed its promotion at (0: none).
    promoted: AtomicU64,
}

impl Link {
    /// Appends encoded frames; returns false if the queue bound is exceeded.
    fn push(&self, bytes: &[u8], max: usize) -> bool {
        let mut ob = lock(&self.out);
        ob.buf.extend_from_slice(bytes);
        ob.buf.len() <= max
    }

    /// Writes queued frames unless another thread is writing (it will pick
    /// them up). The caller writes: no thread hop on the ack path.
    fn flush(&self) {
        let mut ob = lock(&self.out);
        while !ob.writing && !ob.buf.is_empty() && !self.core.is_closed() {
            let Some(mut w) = ob.writer.take() else {
                return;
            };
            let spare = std::mem::take(&mut ob.spare);
            let mut data = std::mem::replace(&mut ob.buf, spare);
            ob.writing = true;
            drop(ob);
            let r = w.write_all(&data).and_then(|_| w.flush());
            data.clear();
            ob = lock(&self.out);
            ob.writer = Some(w);
            ob.writing = false;
            if data.capacity() <= 4 << 20 {
                ob.spare = data;
            }
            self.drained.notify_all();
            if let Err(e) = r {
                debug!(node = %self.node, error = %e, "write to standby failed");
                drop(ob);
                self.core.close();
                return;
            }
        }
    }
}

struct LinkState {
    link: Arc<Link>,
    resumed: bool,
    snap_seq: Seq,
    acked: Seq,
    bulk_done: bool,
    in_sync: bool,
    digest_matched: bool,
    digest_seq: Seq,
    /// Records sent so far by the bulk transfer.
    bulk_sent: u64,
}

/// Standby side of a link to an active.
struct FLink {
    id: u64,
    core: LinkCore,
    /// This standby detaches on purpose ([`FollowHandle::leave`]): the active closing the
    /// link is the expected end.
    leaving: AtomicBool,
    writer: Mutex<Box<dyn Write + Send>>,
    result: Mutex<Option<Result<(), String>>>,
}

impl FLink {
    fn send(&self, bytes: &[u8]) -> io::Result<()> {
        let mut w = lock(&self.writer);
        w.write_all(bytes)?;
        w.flush()
    }
}

struct FollowState {
    link: Arc<FLink>,
    stream_version: SchemaVersion,
    active_seq: Seq,
    reported_lag: u64,
    bulk_done: bool,
    digest_matched: bool,
    digest_seq: Seq,
    /// The active reported this standby in sync (counting for sync acks).
    in_sync: bool,
}

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

/// Accept loop serving standbys on a listener; stops when dropped.
#[derive(Debug)]
pub struct ServeHandle {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl ServeHandle {
    /// Address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting (attached standbys stay attached).
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let Some(t) = self.thread.take() else {
            return;
        };
        // Wake the blocking accept with a connection of our own.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        if TcpStream::connect_timeout(&wake, Duration::from_secs(1)).is_ok() || t.is_finished() {
            let _ = t.join();
        } else {
            // Unreachable listener: the thread ends at its next accept.
            warn!(addr = %self.addr, "could not wake the accept loop; leaving it to end on its own");
        }
    }
}

impl Drop for ServeHandle {
    fn drop(&mut self) {
        self.halt();
    }
}

/// A running standby link. Dropping the handle leaves the link running;
/// [`FollowHandle::stop`] ends it.
#[derive(Debug)]
pub struct FollowHandle {
    link: Arc<FLink>,
    thread: Option<thread::JoinHandle<()>>,
}

impl fmt::Debug for FLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FLink").field("id", &self.id).finish()
    }
}

impl FollowHandle {
    /// True once the link ended (error, stop, promotion or fencing).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Tells the active this standby detaches on purpose ([`FrameType::Leave`]: it is not
    /// a lost HA standby, see [`ReplicaConfig::ha_grace`]), then closes the link and waits
    /// for it to end. Use it when the control plane stops or re-points the standby.
    pub fn leave(self) {
        self.link.leaving.store(true, Ordering::Release);
        let sent = self
            .link
            .send(&wire::encode_frame(FrameType::Leave, 0, 0, &[]));
        // Let the active read the Leave and close the link itself (bounded): closing first
        // could make the active see a dropped HA standby (a failed write) before it reads
        // the Leave, and hold acknowledgements for the HA grace. Only an active heard from
        // lately is waited for: a hung or cut-off one (a failover promoting this standby) is
        // not.
        let heard_lately = self.link.core.idle_for() < LEAVE_WAIT;
        if sent.is_ok() && heard_lately {
            let deadline = Instant::now() + LEAVE_WAIT;
            while self.thread.as_ref().is_some_and(|t| !t.is_finished())
                && Instant::now() < deadline
            {
                thread::sleep(Duration::from_millis(1));
            }
        }
        self.stop();
    }

    /// Closes the link and waits for it to end.
    pub fn stop(mut self) {
        self.link.core.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Waits for the link to end; returns the error that ended it, if any
    /// (as [`SyncError::Protocol`] carrying the original message).
    pub fn join(mut self) -> Result<(), SyncError> {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        match lock(&self.link.result).take() {
            Some(Err(e)) => Err(SyncError::Protocol(e)),
            _ => Ok(()),
        }
    }
}

/// Serves standbys of several replicated services on one listener: each
/// connection is routed to the replica whose service its hello names.
pub fn serve(listener: TcpListener, replicas: Vec<Replica>) -> io::Result<ServeHandle> {
    let addr = listener.local_addr()?;
    // Blocking accept: a standby's connection is taken the moment it
    // arrives (no polling delay on a re-attach); `ServeHandle::stop` wakes
    // the loop by connecting to it.
    listener.set_nonblocking(false)?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let thread = thread::Builder::new()
        .name("sync-accept".into())
        .spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok(_) if stop2.load(Ordering::SeqCst) => break,
                    Ok((stream, peer)) => {
                        let replicas = replicas.clone();
                        let _ =
                            thread::Builder::new()
                                .name("sync-handshake".into())
                                .spawn(move || {
                                    if let Err(e) = accept_one(stream, &replicas) {
                                        debug!(%peer, error = %e, "standby connection refused");
                                    }
                                });
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })?;
    Ok(ServeHandle {
        addr,
        stop,
        thread: Some(thread),
    })
}

fn accept_one(stream: TcpStream, replicas: &[Replica]) -> Result<(), SyncError> {
    stream.set_nonblocking(false)?;
    let timeout = replicas
        .first()
        .map_or(Duration::from_secs(5), |r| r.inner.config.ack_timeout);
    stream.set_read_timeout(Some(timeout))?;
    let mut conn = Conn::tcp(stream.try_clone()?)?;
    let hello = read_hello(&mut conn)?;
    let Control::Hello { service, .. } = &hello else {
        unreachable!()
    };
    let Some(r) = replicas
        .iter()
        .find(|r| r.inner.schema.service() == service)
    else {
        let reason = format!("service {service} is not served here");
        let _ = conn.writer.write_all(
            &Control::Refuse {
                reason: reason.clone(),
            }
            .encode(0, 0),
        );
        return Err(SyncError::Refused(reason));
    };
    stream.set_read_timeout(None)?;
    r.attach_hello(conn, hello)
}

fn read_hello(conn: &mut Conn) -> Result<Control, SyncError> {
    let f = wire::read_frame(&mut conn.reader)?.ok_or_else(|| {
        SyncError::Protocol("the standby closed the connection before its hello".into())
    })?;
    if f.kind != FrameType::Hello {
        return Err(SyncError::Protocol(format!(
            "expected a hello, got {:?}",
            f.kind
        )));
    }
    Ok(Control::decode(&f)?)
}

/// Calls `closer` unless disarmed within `timeout`: bounds handshakes on
/// streams without read timeouts.
struct Watchdog {
    tx: Option<mpsc::Sender<()>>,
}

impl Watchdog {
    fn arm(closer: Option<Arc<dyn Fn() + Send + Sync>>, timeout: Duration) -> Watchdog {
        let (tx, rx) = mpsc::channel::<()>();
        if let Some(c) = closer {
            let _ = thread::Builder::new()
                .name("sync-watchdog".into())
                .spawn(move || {
                    if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(timeout) {
                        c();
                    }
                });
        }
        Watchdog { tx: Some(tx) }
    }

    fn disarm(mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(());
        }
    }
}

/// What `submit_inner` replicates.
enum Input<'a> {
    /// Owned mutations and the index of each one's table.
    Owned(Vec<Mutation>, Vec<usize>),
    /// A batch already in the wire format.
    Encoded(&'a Batch),
}

/// A batch of mutations encoded in the wire format as it is built, for
/// [`Replica::apply_batch`] / [`Replica::submit_batch`]: building it copies
/// each key and value once into one buffer, which can be reused after
/// [`Batch::clear`].
#[derive(Clone, Debug)]
pub struct Batch {
    /// Mutation count (u32 LE), then the mutations.
    buf: Vec<u8>,
    count: u32,
    /// Distinct table names, in first-use order.
    tables: Vec<String>,
}

impl Default for Batch {
    fn default() -> Self {
        Batch::with_capacity(0)
    }
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty batch with room for `bytes` of encoded mutations.
    pub fn with_capacity(bytes: usize) -> Self {
        let mut buf = Vec::with_capacity(4 + bytes);
        buf.extend_from_slice(&0u32.to_le_bytes());
        Batch {
            buf,
            count: 0,
            tables: Vec::new(),
        }
    }

    /// Adds a put of `value` at `key` in `table`; fails, adding nothing, if
    /// a size exceeds the wire limits.
    pub fn put(&mut self, table: &str, key: &[u8], value: &[u8]) -> Result<(), SyncError> {
        self.push(table, key, Some(value))
    }

    /// Adds a delete of `key` in `table`; fails, adding nothing, if a size
    /// exceeds the wire limits.
    pub fn delete(&mut self, table: &str, key: &[u8]) -> Result<(), SyncError> {
        self.push(table, key, None)
    }

    fn push(&mut self, table: &str, key: &[u8], value: Option<&[u8]>) -> Result<(), SyncError> {
        let too = |what, len, limit| SyncError::TooLarge { what, len, limit };
        if table.len() > wire::MAX_TABLE_NAME {
            return Err(too("table name", table.len(), wire::MAX_TABLE_NAME));
        }
        if key.len() > wire::MAX_KEY {
            return Err(too("key", key.len(), wire::MAX_KEY));
        }
        if let Some(v) = value {
            if v.len() > wire::MAX_VALUE {
                return Err(too("value", v.len(), wire::MAX_VALUE));
            }
        }
        if self.count == u32::MAX {
            return Err(too("batch", self.count as usize, u32::MAX as usize - 1));
        }
        let known = match self.tables.last() {
            Some(t) if t.len() == table.len() && t == table => true,
            _ => self.tables.iter().any(|t| t == table),
        };
        if !known {
            self.tables.push(table.to_string());
        }
        wire::encode_mutation(&mut self.buf, table, key, value);
        self.count += 1;
        self.buf[..4].copy_from_slice(&self.count.to_le_bytes());
        Ok(())
    }

    /// Number of mutations.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// True if the batch holds no mutation.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Encoded size in bytes.
    pub fn encoded_len(&self) -> usize {
        self.buf.len()
    }

    /// Empties the batch, keeping its buffer.
    pub fn clear(&mut self) {
        self.buf.truncate(4);
        self.buf[..4].copy_from_slice(&0u32.to_le_bytes());
        self.count = 0;
        self.tables.clear();
    }

    fn iter(&self) -> impl Iterator<Item = MutationRef<'_>> {
        // Built by `push` only: well-formed by construction.
        BatchRef::trusted(&self.buf).iter()
    }

    /// The mutations as owned [`Mutation`]s.
    pub fn to_mutations(&self) -> Vec<Mutation> {
        self.iter()
            .map(|m| match m.value {
                Some(v) => Mutation::put(m.table, m.key, v),
                None => Mutation::delete(m.table, m.key),
            })
            .collect()
    }
}

enum Converted {
    Put(String, Vec<u8>, Vec<u8>),
    Delete(String, Vec<u8>),
    Dropped,
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
                    epoch: 0,
                    store,
                    seq: 0,
                    quiesced: false,
                    links: Vec::new(),
                    follow: None,
                    last_error: None,
                    scratch: FrameWriter::new(),
                    last_epoch: 0,
                    history_ok: true,
                    log,
                    snapshots_sent: 0,
                    resumes_sent: 0,
                    snapshots_received: 0,
                    resumes_received: 0,
                    ha_dropped: Vec::new(),
                    gone: Vec::new(),
                    durable: (0, 0),
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

    /// Takes control at `epoch` (which must be at least the highest epoch
    /// known), keeping the current state: first start, or failover of a
    /// standby whose active died. Stops following, if following.
    pub fn activate(&self, epoch: Epoch) -> Result<(), SyncError> {
        let mut st = self.state();
        match st.role {
            Role::Stopped => return Err(SyncError::Shutdown),
            Role::Active if st.epoch == epoch => return Ok(()),
            _ => {}
        }
        if epoch < st.epoch {
            return Err(SyncError::StaleEpoch {
                frame: epoch,
                current: st.epoch,
            });
        }
        if let Some(f) = st.follow.take() {
            f.link.core.close();
        }
        for l in st.links.drain(..) {
            l.link.core.close();
        }
        st.ha_dropped.clear();
        st.gone.clear();
        st.role = Role::Active;
        st.epoch = epoch;
        st.quiesced = false;
        drop(st);
        self.inner.cond.notify_all();
        info!(service = self.inner.schema.service(), epoch, "active");
        self.notify_role(Role::Active, epoch);
        Ok(())
    }

    /// Applies `mutations` atomically as one batch, gives them consecutive
    /// sequence numbers, streams them to every standby and returns once they
    /// are durable per the durability mode. Fails, applying nothing, if this
    /// instance is not active, is fenced, a table is unknown, a mutation is
    /// too large or a transform to a standby's stream version fails. A batch
    /// must fit one frame ([`wire::MAX_PAYLOAD`]). In synchronous mode an
    /// error after the local apply (ack timeout, fencing) means "not
    /// acknowledged": the batch may or may not survive a failover.
    pub fn apply(&self, mutations: Vec<Mutation>) -> Result<AckToken, SyncError> {
        let t = self.submit(mutations)?;
        self.wait_durable(t)?;
        Ok(t)
    }

    /// Like [`Replica::apply`] but returns as soon as the batch is applied
    /// locally and queued to standbys, without waiting for acknowledgements
    /// (pipelining: pass the token to [`Replica::wait_durable`] later).
    pub fn submit(&self, mutations: Vec<Mutation>) -> Result<AckToken, SyncError> {
        let schema = &self.inner.schema;
        // Table index of each mutation (runs of one table resolved once).
        let native_tables = schema.tables();
        let mut table_of: Vec<usize> = Vec::with_capacity(mutations.len());
        let mut last: Option<(&str, usize)> = None;
        for m in &mutations {
            wire::check_mutation(m)?;
            let name = m.table();
            let idx = match last {
                Some((n, i)) if n == name => i,
                _ => {
                    let Some(i) = native_tables.iter().position(|t| t == name) else {
                        return Err(SyncError::UnknownTable {
                            service: schema.service().into(),
                            version: schema.version(),
                            table: name.into(),
                        });
                    };
                    last = Some((name, i));
                    i
                }
            };
            table_of.push(idx);
        }
        self.submit_inner(Input::Owned(mutations, table_of))
    }

    /// Like [`Replica::apply`] for a [`Batch`] built in the wire format: no
    /// per-mutation allocation on the way, a key is copied only when it is
    /// new to its table.
    pub fn apply_batch(&self, batch: &Batch) -> Result<AckToken, SyncError> {
        let t = self.submit_batch(batch)?;
        self.wait_durable(t)?;
        Ok(t)
    }

    /// Like [`Replica::submit`] for a [`Batch`] (see [`Replica::apply_batch`]).
    pub fn submit_batch(&self, batch: &Batch) -> Result<AckToken, SyncError> {
        let schema = &self.inner.schema;
        for t in &batch.tables {
            if !schema.has_table(schema.version(), t) {
                return Err(SyncError::UnknownTable {
                    service: schema.service().into(),
                    version: schema.version(),
                    table: t.clone(),
                });
            }
        }
        if wire::HEADER_LEN + 8 + batch.buf.len() > wire::MAX_PAYLOAD {
            return Err(SyncError::TooLarge {
                what: "batch",
                len: 8 + batch.buf.len(),
                limit: wire::MAX_PAYLOAD,
            });
        }
        self.submit_inner(Input::Encoded(batch))
    }

    fn submit_inner(&self, input: Input<'_>) -> Result<AckToken, SyncError> {
        let schema = &self.inner.schema;
        let cfg = &self.inner.config;
        let count = match &input {
            Input::Owned(m, _) => m.len(),
            Input::Encoded(b) => b.len(),
        };
        let deadline = Instant::now() + cfg.ack_timeout;
        let mut st = self.state_urgent();
        // Quiesce and asynchronous lag bound: wait, bounded.
        loop {
            if st.role != Role::Active {
                return Err(not_active(&st));
            }
            if st.quiesced {
                st = self.wait_until(st, deadline, "the quiesce to end")?;
                continue;
            }
            if let Durability::Async { max_lag } = cfg.durability {
                let lag = st
                    .links
                    .iter()
                    .filter(|l| l.link.ha && l.in_sync && !l.link.core.is_closed())
                    .map(|l| st.seq.saturating_sub(l.acked))
                    .max()
                    .unwrap_or(0);
                if lag > max_lag {
                    if Instant::now() >= deadline {
                        return Err(SyncError::LagExceeded {
                            lag,
                            bound: max_lag,
                        });
                    }
                    st = self
                        .wait_until(st, deadline, "the standby lag to shrink")
                        .map_err(|_| SyncError::LagExceeded {
                            lag,
                            bound: max_lag,
                        })?;
                    continue;
                }
            }
            break;
        }
        if cfg.min_sync_standbys > 0 {
            let have = st
                .links
                .iter()
                .filter(|l| l.link.ha && l.in_sync && !l.link.core.is_closed())
                .count();
            if have < cfg.min_sync_standbys {
                return Err(SyncError::NotEnoughStandbys {
                    have,
                    need: cfg.min_sync_standbys,
                });
            }
        }
        if count == 0 {
            return Ok(AckToken {
                seq: st.seq,
                epoch: st.epoch,
            });
        }
        let first = st.seq + 1;
        let last = st.seq + count as u64;
        let epoch = st.epoch;
        // Encode one frame per distinct stream version before touching state,
        // so a transform failure or an oversized batch applies nothing. The
        // native one comes first: it is also what the resume log keeps.
        let mut versions: Vec<SchemaVersion> = Vec::with_capacity(2);
        versions.push(schema.version());
        for l in &st.links {
            if !versions.contains(&l.link.stream_version) {
                versions.push(l.link.stream_version);
            }
        }
        let mut frames: Vec<(SchemaVersion, std::ops::Range<usize>)> =
            Vec::with_capacity(versions.len());
        let mut scratch = std::mem::take(&mut st.scratch);
        scratch.take();
        let native_version = schema.version();
        let mut decoded: Option<Vec<Mutation>> = None;
        let enc = (|| -> Result<(), SyncError> {
            for &v in &versions {
                let start = scratch.len();
                match &input {
                    Input::Encoded(b) if v == native_version => {
                        // Already in the wire format: one copy into the frame.
                        scratch.begin(FrameType::Batch, epoch, last);
                        let p = scratch.payload();
                        p.extend_from_slice(&first.to_le_bytes());
                        p.extend_from_slice(&b.buf);
                        scratch.finish();
                    }
                    Input::Encoded(b) => {
                        let muts = decoded.get_or_insert_with(|| b.to_mutations());
                        encode_batch(schema, &mut scratch, epoch, first, last, muts, v)?;
                    }
                    Input::Owned(muts, _) => {
                        encode_batch(schema, &mut scratch, epoch, first, last, muts, v)?;
                    }
                }
                frames.push((v, start..scratch.len()));
            }
            Ok(())
        })();
        if let Err(e) = enc {
            scratch.abort();
            scratch.take();
            st.scratch = scratch;
            return Err(e);
        }
        // Apply locally (the store's tables are the native ones, in order).
        match input {
            Input::Owned(mutations, table_of) => {
                for (m, idx) in mutations.into_iter().zip(table_of) {
                    match m {
                        Mutation::Put { key, value, .. } => st.store.put(schema, idx, &key, &value),
                        Mutation::Delete { key, .. } => st.store.delete(idx, &key),
                    }
                }
            }
            Input::Encoded(b) => {
                let mut cache: Option<(&str, usize)> = None;
                for m in b.iter() {
                    let idx = match cache {
                        Some((n, i)) if n == m.table => i,
                        _ => {
                            let i = st.store.index_of(m.table).expect("tables checked");
                            cache = Some((m.table, i));
                            i
                        }
                    };
                    match m.value {
                        Some(v) => st.store.put(schema, idx, m.key, v),
                        None => st.store.delete(idx, m.key),
                    }
                }
            }
        }
        st.seq = last;
        st.last_epoch = epoch;
        let bytes = scratch.as_bytes();
        let native = &bytes[frames[0].1.clone()];
        let body = if st.log.disabled() {
            Bytes::new()
        } else {
            st.log.copy_body(&native[wire::HEADER_LEN + 8..])
        };
        st.log.push(LogEntry {
            first,
            last,
            epoch,
            body,
        });
        let mut targets: Vec<Arc<Link>> = Vec::with_capacity(st.links.len());
        for l in &st.links {
            let (_, range) = frames
                .iter()
                .find(|(v, _)| *v == l.link.stream_version)
                .expect("encoded for every link version");
            if !l.link.push(&bytes[range.clone()], cfg.max_queue_bytes) {
                warn!(node = %l.link.node, "standby queue over its bound: disconnecting it");
                l.link.core.close();
            } else if !l.link.bulk.load(Ordering::Relaxed) {
                // A link in a bulk transfer is written by its transfer: a
                // writer here would wait for a standby busy with the bulk.
                targets.push(l.link.clone());
            }
        }
        scratch.take();
        st.scratch = scratch;
        drop(st);
        for l in targets {
            l.flush();
        }
        Ok(AckToken { seq: last, epoch })
    }

    fn wait_until<'a>(
        &'a self,
        st: MutexGuard<'a, State>,
        deadline: Instant,
        what: &'static str,
    ) -> Result<MutexGuard<'a, State>, SyncError> {
        let now = Instant::now();
        if now >= deadline {
            return Err(SyncError::Timeout(self.inner.config.ack_timeout, what));
        }
        let (g, _) = self
            .inner
            .cond
            .wait_timeout(st, deadline - now)
            .unwrap_or_else(|p| p.into_inner());
        Ok(g)
    }

    /// Waits until the batch of `token` is durable per the durability mode.
    pub fn wait_durable(&self, token: AckToken) -> Result<(), SyncError> {
        let start = Instant::now();
        let deadline = start + self.inner.config.ack_timeout;
        let spin_until = start + self.inner.config.ack_spin;
        let mut st = self.state();
        loop {
            // Found durable already (by another waiter, e.g. a quiesce, perhaps just before
            // this replica learned of a newer epoch): the promise was kept.
            if token.epoch == st.durable.0 && token.seq <= st.durable.1 {
                return Ok(());
            }
            if st.epoch != token.epoch {
                return Err(SyncError::Fenced {
                    current: token.epoch,
                    newer: st.epoch,
                });
            }
            if st.role != Role::Active {
                return Err(not_active(&st));
            }
            if self.inner.config.durability != Durability::Sync {
                return Ok(());
            }
            let done = st
                .links
                .iter()
                .filter(|l| l.link.ha && l.in_sync && !l.link.core.is_closed())
                .all(|l| l.acked >= token.seq);
            let held_until = self.ha_hold(&mut st);
            if done && held_until.is_none() {
                st.durable = st.durable.max((token.epoch, token.seq));
                return Ok(());
            }
            if let (true, Some(until)) = (done, held_until) {
                // Only the grace of a dropped HA standby holds this acknowledgement.
                let now = Instant::now();
                let wake = until.min(deadline);
                if now >= deadline {
                    return Err(SyncError::Timeout(
                        self.inner.config.ack_timeout,
                        "a dropped HA standby's grace",
                    ));
                }
                st = self
                    .inner
                    .cond
                    .wait_timeout(st, wake.saturating_duration_since(now))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                continue;
            }
            // Spin (bounded) while acknowledgements may be a few microseconds
            // away; every decision is still taken under the lock above.
            if Instant::now() < spin_until {
                let seen = self.inner.acks.load(Ordering::Acquire);
                drop(st);
                // Yielding rather than burning the core: on a busy machine
                // the threads producing the acknowledgement need it.
                while self.inner.acks.load(Ordering::Acquire) == seen && Instant::now() < spin_until
                {
                    thread::yield_now();
                }
                st = self.state();
                continue;
            }
            st = self.wait_until(st, deadline, "standby acknowledgements")?;
        }
    }

    /// The current [`ReplicaConfig::ha_grace`].
    pub fn ha_grace(&self) -> Duration {
        Duration::from_micros(self.inner.ha_grace_us.load(Ordering::Acquire))
    }

    /// Changes [`ReplicaConfig::ha_grace`] (waiting acknowledgements see it at once).
    pub fn set_ha_grace(&self, grace: Duration) {
        self.inner.ha_grace_us.store(
            grace.as_micros().min(u64::MAX as u128) as u64,
            Ordering::Release,
        );
        self.inner.cond.notify_all();
    }

    /// The standby `node` is gone for good and its control plane wrote it off (it will never
    /// be promoted): acknowledgements stop waiting for its grace.
    /// Its link, if the active has not noticed yet that it is dead, is closed.
    pub fn standby_gone(&self, node: &str) {
        let mut st = self.state();
        if !st.gone.iter().any(|n| n == node) {
            if st.gone.len() >= 16 {
                st.gone.remove(0);
            }
            st.gone.push(node.to_string());
        }
        st.ha_dropped.retain(|(n, _)| n != node);
        for l in st.links.iter_mut().filter(|l| l.link.node == node) {
            l.in_sync = false;
            l.link.core.close();
        }
        drop(st);
        info!(standby = %node, "standby written off by the control plane: acknowledgements no longer wait for it");
        self.inner.cond.notify_all();
    }

    /// Notes designated HA standbys that dropped out (closed links not yet removed
    /// included), forgets those past the grace, and returns until when acknowledgements are
    /// held for the others (`None`: not held).
    fn ha_hold(&self, st: &mut State) -> Option<Instant> {
        let grace = self.ha_grace();
        if grace.is_zero() {
            st.ha_dropped.clear();
            return None;
        }
        let closed: Vec<String> = st
            .links
            .iter()
            .filter(|l| l.link.ha && l.in_sync && l.link.core.is_closed())
            .map(|l| l.link.node.clone())
            .collect();
        for node in closed {
            note_ha_dropped(st, &node);
        }
        let now = Instant::now();
        st.ha_dropped.retain(|(node, at)| {
            let keep = now < *at + grace;
            if !keep {
                warn!(standby = %node, ?grace, "HA standby still out after the grace: acknowledging without it (degraded)");
            }
            keep
        });
        st.ha_dropped.iter().map(|(_, at)| *at + grace).max()
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

    /// Serves standbys of this service on `listener` (accept loop thread).
    pub fn serve(&self, listener: TcpListener) -> io::Result<ServeHandle> {
        serve(listener, vec![self.clone()])
    }

    /// Active side: runs the handshake on an accepted connection and attaches
    /// the standby (bulk snapshot, then live stream) without stopping writes.
    /// Returns once the handshake is done; the transfer runs on threads.
    pub fn attach(&self, mut conn: Conn) -> Result<(), SyncError> {
        let dog = Watchdog::arm(conn.closer.clone(), self.inner.config.ack_timeout);
        let hello = read_hello(&mut conn);
        dog.disarm();
        self.attach_hello(conn, hello?)
    }

    fn attach_hello(&self, mut conn: Conn, hello: Control) -> Result<(), SyncError> {
        let Control::Hello {
            service,
            node,
            native,
            reads,
            writes,
            ha,
            epoch: peer_epoch,
            resume,
            formats: peer_formats,
        } = hello
        else {
            return Err(SyncError::Protocol("expected a hello".into()));
        };
        let schema = &self.inner.schema;
        let cfg = &self.inner.config;
        let refuse = |conn: &mut Conn, epoch: Epoch, err: SyncError| -> Result<(), SyncError> {
            let _ = conn.writer.write_all(
                &Control::Refuse {
                    reason: err.to_string(),
                }
                .encode(epoch, 0),
            );
            let _ = conn.writer.flush();
            if let Some(c) = &conn.closer {
                c();
            }
            Err(err)
        };
        if service != schema.service() {
            let e = SyncError::ServiceMismatch {
                local: schema.service().into(),
                peer: service,
            };
            return refuse(&mut conn, 0, e);
        }
        let my_epoch = self.epoch();
        if peer_epoch > my_epoch {
            self.fence(peer_epoch);
            let e = SyncError::Fenced {
                current: my_epoch,
                newer: peer_epoch,
            };
            return refuse(&mut conn, peer_epoch, e);
        }
        let stream_version = match negotiate(
            schema.service(),
            schema.version(),
            &schema.writes(),
            native,
            &VersionSet(reads),
            &VersionSet(writes),
        ) {
            Ok(v) => v,
            Err(e) => {
                let epoch = self.epoch();
                return refuse(&mut conn, epoch, e);
            }
        };
        let format = match wire::negotiate_format(
            cfg.formats,
            peer_formats.unwrap_or(wire::FormatRange::LEGACY),
        ) {
            Ok(f) => f,
            Err(e) => {
                let epoch = self.epoch();
                return refuse(&mut conn, epoch, e.into());
            }
        };
        let mut st = self.state();
        if st.role != Role::Active {
            let (e, epoch) = (not_active(&st), st.epoch);
            drop(st);
            return refuse(&mut conn, epoch, e);
        }
        st.links.retain(|l| !l.link.core.is_closed());
        if st.links.len() >= cfg.max_standbys.min(3) {
            let (n, epoch) = (st.links.len(), st.epoch);
            drop(st);
            return refuse(&mut conn, epoch, SyncError::TooManyStandbys(n));
        }
        if stream_version != schema.version() {
            // The digest is kept in one foreign version at a time.
            if let Some(other) = st
                .links
                .iter()
                .filter(|l| l.link.node != node)
                .map(|l| l.link.stream_version)
                .find(|v| *v != schema.version() && *v != stream_version)
            {
                let epoch = st.epoch;
                drop(st);
                let e = SyncError::Protocol(format!(
                    "this active already streams version {other} to another standby and keeps \
                     the digest of one foreign version at a time; version {stream_version} \
                     must wait until that standby detaches"
                ));
                return refuse(&mut conn, epoch, e);
            }
        }
        if let Some(old) = st.links.iter().find(|l| l.link.node == node) {
            // A re-attaching standby replaces its previous link.
            old.link.core.close();
        }
        st.links.retain(|l| l.link.node != node);
        let epoch = st.epoch;
        // Frames after the welcome (itself in the frozen handshake format) are
        // written in the negotiated format.
        let mut w = wire::format_writer(conn.writer, format).expect("negotiated a known format");
        let welcome = Control::Welcome {
            node: cfg.node.clone(),
            native: schema.version(),
            stream_version,
            tables: schema.tables_of(stream_version).to_vec(),
            format: Some(format),
        }
        .encode(epoch, st.seq);
        let link = Arc::new(Link {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            node: node.clone(),
            peer: conn.peer.clone(),
            ha,
            stream_version,
            native_version: native,
            core: LinkCore::new(conn.closer.clone()),
            out: Mutex::new(Outbox {
                buf: Vec::new(),
                spare: Vec::new(),
                writing: true,
                writer: None,
            }),
            drained: Condvar::new(),
            bulk: AtomicBool::new(false),
            promoted: AtomicU64::new(0),
        });
        // Free if the state is empty; otherwise built in steps by the bulk
        // transfer or by digest checks.
        st.store.track(schema, stream_version);
        let snap_seq = st.seq;
        let snap_epoch = st.last_epoch;
        // Resume instead of a snapshot if the standby's position is on this
        // instance's history and the log still holds every batch after it.
        // Resume instead of a bulk transfer if the standby's position is on
        // this instance's history, the log still holds every batch after it,
        // and the digest at snap_seq in the stream version is kept (no scan).
        let kept = st.store.digest_kept(schema, stream_version);
        let replay = resume
            .filter(|p| p.seq > 0 && p.seq <= snap_seq && kept.is_some())
            .and_then(|p| Some((p.seq, st.log.after(p.seq, p.epoch)?)));
        if replay.is_none() {
            // The bulk transfer goes through the link's queue, in order with
            // the live stream (see `bulk`): its first frame goes first.
            let begin = Control::BulkBegin {
                seq: snap_seq,
                records: st.store.len() as u64,
            };
            link.push(&begin.encode(epoch, snap_seq), usize::MAX);
            link.bulk.store(true, Ordering::Relaxed);
        }
        if replay.is_some() {
            st.resumes_sent += 1;
        } else {
            st.snapshots_sent += 1;
        }
        st.links.push(LinkState {
            link: link.clone(),
            resumed: replay.is_some(),
            snap_seq,
            acked: 0,
            bulk_done: false,
            in_sync: false,
            digest_matched: false,
            digest_seq: 0,
            bulk_sent: 0,
        });
        drop(st);
        info!(
            service = schema.service(),
            standby = %node,
            stream_version,
            snap_seq,
            resume_from = ?replay.as_ref().map(|r| r.0),
            "standby attached"
        );
        if let Err(e) = w.write_all(&welcome).and_then(|_| w.flush()) {
            link.core.close();
            self.drop_link(link.id, Some(e.to_string()));
            return Err(e.into());
        }
        let me = self.clone();
        let l2 = link.clone();
        thread::Builder::new()
            .name("sync-bulk".into())
            .spawn(move || {
                // No client waits for it (the thread ends with the transfer).
                if let Some(f) = me.inner.config.background_thread {
                    f();
                }
                let r = match (replay, kept) {
                    (Some((from, entries)), Some(digest)) => {
                        me.send_resume(&l2, w, digest, from, entries, snap_seq, snap_epoch, epoch)
                    }
                    _ => {
                        me.hand_over(&l2, w);
                        me.send_bulk(&l2, epoch)
                    }
                };
                if let Err(e) = r {
                    warn!(standby = %l2.node, error = %e, "bulk transfer failed");
                    l2.core.close();
                }
            })?;
        let me = self.clone();
        let l2 = link.clone();
        let mut reader = conn.reader;
        thread::Builder::new()
            .name("sync-acks".into())
            .spawn(move || {
                let r = me.read_acks(&l2, &mut reader);
                l2.core.close();
                me.drop_link(l2.id, r.err().map(|e| e.to_string()));
            })?;
        let me = self.clone();
        thread::Builder::new()
            .name("sync-tick".into())
            .spawn(move || me.tick_active(&link))?;
        Ok(())
    }

    fn drop_link(&self, id: u64, err: Option<String>) {
        let mut st = self.state();
        if let Some(pos) = st.links.iter().position(|l| l.link.id == id) {
            let l = st.links.remove(pos);
            if l.link.ha && l.in_sync {
                note_ha_dropped(&mut st, &l.link.node);
            }
            // Ends the connection now (a standby that left waits for this).
            l.link.core.close();
            info!(standby = %l.link.node, error = ?err, "standby detached");
            if err.is_some() {
                st.last_error = err;
            }
        }
        drop(st);
        self.inner.cond.notify_all();
    }

    /// Hands the writer to the live stream and sends what queued meanwhile.
    fn hand_over(&self, link: &Link, w: Box<dyn Write + Send>) {
        {
            let mut ob = lock(&link.out);
            ob.writer = Some(w);
            ob.writing = false;
        }
        link.flush();
    }

    /// Resumes a standby at `from`: replays the logged batches up to
    /// `snap_seq`, then the digest of the state at `snap_seq` (`snapshot`).
    #[allow(clippy::too_many_arguments)]
    fn send_resume(
        &self,
        link: &Link,
        mut w: Box<dyn Write + Send>,
        digest: Digest,
        from: Seq,
        entries: Vec<LogEntry>,
        snap_seq: Seq,
        snap_epoch: Epoch,
        epoch: Epoch,
    ) -> Result<(), SyncError> {
        let schema = &self.inner.schema;
        let native = schema.version();
        let sv = link.stream_version;
        let mut fw = FrameWriter::new();
        fw.frame(
            FrameType::ResumeBegin,
            epoch,
            snap_seq,
            &serde_json::to_vec(&Control::ResumeBegin {
                from,
                seq: snap_seq,
                batches: entries.len() as u64,
            })
            .expect("control messages serialize"),
        );
        let mut muts = Vec::new();
        for e in &entries {
            if link.core.is_closed() {
                return Err(SyncError::Shutdown);
            }
            if sv == native {
                fw.begin(FrameType::ReplayBatch, epoch, e.last);
                let p = fw.payload();
                p.extend_from_slice(&e.epoch.to_le_bytes());
                p.extend_from_slice(&e.first.to_le_bytes());
                p.extend_from_slice(&e.body);
                fw.finish();
            } else {
                muts.clear();
                let body = BatchRef::parse(FrameType::Batch, &e.body)?;
                muts.extend(body.iter().map(|m| match m.value {
                    Some(v) => Mutation::put(m.table, m.key, v),
                    None => Mutation::delete(m.table, m.key),
                }));
                encode_frame_body(
                    schema,
                    &mut fw,
                    FrameType::ReplayBatch,
                    epoch,
                    Some(e.epoch),
                    e.first,
                    e.last,
                    &muts,
                    sv,
                )?;
            }
            if fw.len() >= wire::BULK_PAYLOAD {
                w.write_all(fw.as_bytes())?;
                fw.clear();
            }
        }
        let end = Control::ResumeEnd {
            seq: snap_seq,
            last_epoch: snap_epoch,
            digest,
        };
        fw.frame(
            FrameType::ResumeEnd,
            epoch,
            snap_seq,
            &serde_json::to_vec(&end).expect("control messages serialize"),
        );
        w.write_all(fw.as_bytes())?;
        w.flush()?;
        debug!(standby = %link.node, from, to = snap_seq, batches = entries.len(), "resume sent");
        self.hand_over(link, w);
        Ok(())
    }

    fn read_acks(&self, link: &Link, reader: &mut Box<dyn Read + Send>) -> Result<(), SyncError> {
        let mut r = io::BufReader::with_capacity(64 << 10, reader);
        let mut payload = Vec::new();
        loop {
            let Some(h) =
                wire::read_frame_into_in(&mut r, &mut payload, self.inner.config.formats)?
            else {
                return Err(SyncError::Protocol("the standby closed the link".into()));
            };
            let f = Incoming {
                kind: h.kind,
                epoch: h.epoch,
                seq: h.seq,
                payload: &payload,
            };
            link.core.touch();
            let my_epoch = self.epoch();
            if f.epoch > my_epoch && f.kind != FrameType::PromoteAck {
                self.fence(f.epoch);
                return Err(SyncError::Fenced {
                    current: my_epoch,
                    newer: f.epoch,
                });
            }
            match f.kind {
                FrameType::Ack | FrameType::Heartbeat => {
                    let mut st = self.state_urgent();
                    let seq_now = st.seq;
                    let mut back_in_sync = None;
                    if let Some(l) = st.links.iter_mut().find(|l| l.link.id == link.id) {
                        if f.seq > seq_now {
                            return Err(SyncError::Protocol(format!(
                                "standby acknowledged {} beyond the last sequence {seq_now}",
                                f.seq
                            )));
                        }
                        if f.seq > l.acked {
                            l.acked = f.seq;
                        }
                        if l.bulk_done && !l.in_sync && l.acked >= l.snap_seq {
                            l.in_sync = true;
                            if l.link.ha {
                                back_in_sync = Some(l.link.node.clone());
                            }
                        }
                    }
                    if let Some(node) = back_in_sync {
                        st.ha_dropped.retain(|(n, _)| *n != node);
                    }
                    self.inner.acks.fetch_add(1, Ordering::Release);
                    drop(st);
                    self.inner.cond.notify_all();
                }
                FrameType::DigestResult => {
                    let Control::DigestResult { seq, matched } = f.control()? else {
                        unreachable!()
                    };
                    let mut st = self.state();
                    let mut back_in_sync = None;
                    if let Some(l) = st.links.iter_mut().find(|l| l.link.id == link.id) {
                        if seq == l.snap_seq && !l.bulk_done {
                            l.bulk_done = true;
                            l.acked = l.acked.max(seq);
                            l.in_sync = true;
                            if l.link.ha {
                                back_in_sync = Some(l.link.node.clone());
                            }
                        }
                        l.digest_matched = matched;
                        l.digest_seq = seq;
                    }
                    if let Some(node) = back_in_sync {
                        st.ha_dropped.retain(|(n, _)| *n != node);
                    }
                    self.inner.acks.fetch_add(1, Ordering::Release);
                    drop(st);
                    if !matched {
                        warn!(standby = %link.node, seq, "standby digest mismatch");
                    }
                    self.inner.cond.notify_all();
                    // Tell the standby at once that it now counts as in sync.
                    self.heartbeat_to(link);
                }
                FrameType::PromoteAck => {
                    link.promoted.store(f.epoch, Ordering::SeqCst);
                    let st = self.state();
                    drop(st);
                    self.inner.cond.notify_all();
                    return Ok(());
                }
                FrameType::Refuse => {
                    let reason = match f.control()? {
                        Control::Refuse { reason } => reason,
                        _ => unreachable!(),
                    };
                    return Err(SyncError::Refused(reason));
                }
                FrameType::Leave => {
                    // Detached on purpose: it stops counting at once, without a grace.
                    let mut st = self.state();
                    if let Some(l) = st.links.iter_mut().find(|l| l.link.id == link.id) {
                        l.in_sync = false;
                    }
                    drop(st);
                    self.inner.cond.notify_all();
                    info!(standby = %link.node, "standby left");
                    return Ok(());
                }
                k => {
                    return Err(SyncError::Protocol(format!(
                        "unexpected {k:?} frame from a standby"
                    )))
                }
            }
        }
    }

    /// Queues a heartbeat to a standby: the active's seq, the standby's lag
    /// as seen here, and whether the standby counts as in sync.
    fn heartbeat_to(&self, link: &Link) {
        let (epoch, seq, lag, in_sync) = {
            let st = self.state();
            let l = st.links.iter().find(|l| l.link.id == link.id);
            let lag = l.map_or(0, |l| st.seq.saturating_sub(l.acked));
            (st.epoch, st.seq, lag, l.is_some_and(|l| l.in_sync))
        };
        let mut payload = lag.to_le_bytes().to_vec();
        payload.push(in_sync as u8);
        let hb = wire::encode_frame(FrameType::Heartbeat, epoch, seq, &payload);
        if link.push(&hb, self.inner.config.max_queue_bytes) {
            link.flush();
        }
    }

    fn tick_active(&self, link: &Link) {
        let cfg = &self.inner.config;
        while link.core.sleep(cfg.heartbeat) {
            if link.core.idle_for() > cfg.link_timeout {
                warn!(standby = %link.node, "standby silent for too long: detaching it");
                link.core.close();
                break;
            }
            self.heartbeat_to(link);
        }
    }

    /// Standby side: connects to an active over `conn`, announces this
    /// instance's versions (`ha`: designated HA standby), receives the bulk
    /// snapshot and then the live stream. The local state is replaced by the
    /// snapshot. Returns once the handshake is done.
    pub fn follow(&self, mut conn: Conn, ha: bool) -> Result<FollowHandle, SyncError> {
        let schema = &self.inner.schema;
        let cfg = &self.inner.config;
        let (my_epoch, resume) = {
            let st = self.state();
            if st.role != Role::Standby {
                return Err(SyncError::NotStandby { role: st.role });
            }
            if st.follow.as_ref().is_some_and(|f| !f.link.core.is_closed()) {
                return Err(SyncError::Protocol(
                    "this standby already follows an active".into(),
                ));
            }
            let resume =
                (st.history_ok && st.seq > 0 && st.last_epoch > 0).then_some(ResumePoint {
                    seq: st.seq,
                    epoch: st.last_epoch,
                });
            (st.epoch, resume)
        };
        let hello = Control::Hello {
            service: schema.service().into(),
            node: cfg.node.clone(),
            native: schema.version(),
            reads: schema.reads().0,
            writes: schema.writes().0,
            ha,
            epoch: my_epoch,
            resume,
            formats: Some(cfg.formats),
        };
        let dog = Watchdog::arm(conn.closer.clone(), cfg.ack_timeout);
        let welcome = (|| -> Result<(wire::Frame, Control), SyncError> {
            conn.writer.write_all(&hello.encode(my_epoch, 0))?;
            conn.writer.flush()?;
            let f = wire::read_frame(&mut conn.reader)?.ok_or_else(|| {
                SyncError::Protocol("the active closed the connection during the handshake".into())
            })?;
            let c = match f.kind {
                FrameType::Welcome | FrameType::Refuse => Control::decode(&f)?,
                k => {
                    return Err(SyncError::Protocol(format!(
                        "expected a welcome, got {k:?}"
                    )))
                }
            };
            Ok((f, c))
        })();
        dog.disarm();
        let (frame, welcome) = welcome.inspect_err(|_| {
            if let Some(c) = &conn.closer {
                c();
            }
        })?;
        let (stream_version, format) = match welcome {
            Control::Refuse { reason } => return Err(SyncError::Refused(reason)),
            Control::Welcome {
                stream_version,
                format,
                ..
            } => (stream_version, format.unwrap_or(wire::HANDSHAKE_VERSION)),
            _ => unreachable!(),
        };
        if !cfg.formats.contains(format) {
            if let Some(c) = &conn.closer {
                c();
            }
            return Err(SyncError::Protocol(format!(
                "the active chose sync frame format {format}, outside this end's formats {}",
                cfg.formats
            )));
        }
        let writer = wire::format_writer(conn.writer, format)?;
        if !schema.reads().contains(stream_version) {
            return Err(SyncError::Protocol(format!(
                "the active chose stream version {stream_version}, which this build cannot read"
            )));
        }
        let link = Arc::new(FLink {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            core: LinkCore::new(conn.closer.clone()),
            leaving: AtomicBool::new(false),
            writer: Mutex::new(writer),
            result: Mutex::new(None),
        });
        {
            let mut st = self.state();
            if frame.epoch < st.epoch {
                let e = SyncError::StaleEpoch {
                    frame: frame.epoch,
                    current: st.epoch,
                };
                drop(st);
                link.core.close();
                return Err(e);
            }
            if st.role != Role::Standby {
                link.core.close();
                return Err(SyncError::NotStandby { role: st.role });
            }
            st.epoch = frame.epoch;
            st.follow = Some(FollowState {
                link: link.clone(),
                stream_version,
                active_seq: frame.seq,
                reported_lag: 0,
                bulk_done: false,
                digest_matched: false,
                digest_seq: 0,
                in_sync: false,
            });
        }
        let me = self.clone();
        let l2 = link.clone();
        let reader = conn.reader;
        let thread = thread::Builder::new()
            .name("sync-follow".into())
            .spawn(move || {
                if !ha {
                    // Not the HA standby: no client's acknowledgement waits for this stream.
                    if let Some(f) = me.inner.config.background_thread {
                        f();
                    }
                }
                let r = me.receive(&l2, reader, stream_version);
                let err = r.as_ref().err().map(|e| e.to_string());
                if let Some(e) = &err {
                    warn!(error = %e, "standby link ended");
                }
                l2.core.close();
                *lock(&l2.result) = Some(r.map(|_| ()).map_err(|e| e.to_string()));
                let mut st = me.state();
                if st.follow.as_ref().is_some_and(|f| f.link.id == l2.id) {
                    st.follow = None;
                }
                if err.is_some() {
                    st.last_error = err;
                }
                drop(st);
                me.inner.cond.notify_all();
            })?;
        let me = self.clone();
        let l3 = link.clone();
        thread::Builder::new()
            .name("sync-follow-tick".into())
            .spawn(move || me.tick_standby(&l3))?;
        Ok(FollowHandle {
            link,
            thread: Some(thread),
        })
    }

    fn tick_standby(&self, link: &FLink) {
        let cfg = &self.inner.config;
        while link.core.sleep(cfg.heartbeat) {
            if link.core.idle_for() > cfg.link_timeout {
                warn!("active silent for too long: closing the link");
                link.core.close();
                break;
            }
            let (epoch, seq) = {
                let st = self.state();
                (st.epoch, st.seq)
            };
            if link
                .send(&wire::encode_frame(FrameType::Heartbeat, epoch, seq, &[]))
                .is_err()
            {
                link.core.close();
            }
        }
    }

    /// Converts borrowed stream-version mutations to native ones.
    fn to_native<'a>(
        &self,
        muts: impl Iterator<Item = MutationRef<'a>>,
        sv: SchemaVersion,
    ) -> Result<Vec<Converted>, SyncError> {
        let schema = &self.inner.schema;
        let native = schema.version();
        let mut out = Vec::new();
        for m in muts {
            let table = m.table;
            if !schema.has_table(sv, table) {
                return Err(SyncError::UnknownTable {
                    service: schema.service().into(),
                    version: sv,
                    table: table.into(),
                });
            }
            let c = match m.value {
                None => {
                    if schema.has_table(native, table) {
                        Converted::Delete(table.into(), m.key.to_vec())
                    } else {
                        Converted::Dropped
                    }
                }
                Some(v) => {
                    let rec = Record::new(table, m.key, v);
                    match schema.convert(&rec, sv, native)? {
                        Some(r) if schema.has_table(native, &r.table) => {
                            Converted::Put(r.table, r.key, r.value)
                        }
                        Some(_) => Converted::Dropped,
                        None if schema.has_table(native, table) => {
                            Converted::Delete(rec.table, rec.key)
                        }
                        None => Converted::Dropped,
                    }
                }
            };
            out.push(c);
        }
        Ok(out)
    }

    /// Checks that every table a native-version body names is declared.
    fn check_native_tables(&self, body: &BatchRef<'_>) -> Result<(), SyncError> {
        let schema = &self.inner.schema;
        if let Some(t) = body.single_table() {
            if !schema.has_table(schema.version(), t) {
                return Err(SyncError::UnknownTable {
                    service: schema.service().into(),
                    version: schema.version(),
                    table: t.into(),
                });
            }
            return Ok(());
        }
        let mut last: Option<&str> = None;
        for m in body.iter() {
            if last == Some(m.table) {
                continue;
            }
            if !schema.has_table(schema.version(), m.table) {
                return Err(SyncError::UnknownTable {
                    service: schema.service().into(),
                    version: schema.version(),
                    table: m.table.into(),
                });
            }
            last = Some(m.table);
        }
        Ok(())
    }

    /// Applies one streamed batch (live or replayed) as a whole: everything
    /// is checked and converted first, then applied and logged under the
    /// lock. `raw` is the body as received (count, then mutations).
    #[allow(clippy::too_many_arguments)]
    fn apply_stream_batch(
        &self,
        sv: SchemaVersion,
        first: Seq,
        last: Seq,
        origin: Epoch,
        body: BatchRef<'_>,
        raw: &[u8],
    ) -> Result<(), SyncError> {
        let schema = &self.inner.schema;
        let native = schema.version();
        let (conv, log_body) = if sv == native {
            self.check_native_tables(&body)?;
            (None, None)
        } else {
            let conv = self.to_native(body.iter(), sv)?;
            let mut nb = Vec::with_capacity(raw.len() + 16);
            let mut count = 0u32;
            nb.extend_from_slice(&0u32.to_le_bytes());
            for c in &conv {
                match c {
                    Converted::Put(t, k, v) => wire::encode_mutation(&mut nb, t, k, Some(v)),
                    Converted::Delete(t, k) => wire::encode_mutation(&mut nb, t, k, None),
                    Converted::Dropped => continue,
                }
                count += 1;
            }
            nb[..4].copy_from_slice(&count.to_le_bytes());
            (Some(conv), Some(Bytes::from(nb)))
        };
        let mut st = self.state();
        if first != st.seq + 1 {
            return Err(SyncError::Sequence {
                expected: st.seq + 1,
                got: first,
            });
        }
        match conv {
            None => {
                let mut cache: Option<(&str, usize)> = None;
                for m in body.iter() {
                    let idx = match cache {
                        Some((n, i)) if n == m.table => i,
                        _ => {
                            let Some(i) = st.store.index_of(m.table) else {
                                continue;
                            };
                            cache = Some((m.table, i));
                            i
                        }
                    };
                    match m.value {
                        Some(v) => st.store.put(schema, idx, m.key, v),
                        None => st.store.delete(idx, m.key),
                    }
                }
            }
            Some(conv) => apply_converted(&mut st.store, schema, conv),
        }
        st.seq = last;
        st.last_epoch = origin;
        let body = match log_body {
            _ if st.log.disabled() => Bytes::new(),
            Some(b) => b,
            None => st.log.copy_body(raw),
        };
        st.log.push(LogEntry {
            first,
            last,
            epoch: origin,
            body,
        });
        if let Some(fs) = st.follow.as_mut() {
            fs.active_seq = fs.active_seq.max(last);
        }
        Ok(())
    }

    fn receive(
        &self,
        link: &FLink,
        reader: Box<dyn Read + Send>,
        sv: SchemaVersion,
    ) -> Result<(), SyncError> {
        let schema = &self.inner.schema;
        let native = schema.version();
        let mut r = io::BufReader::with_capacity(1 << 20, reader);
        let mut payload = Vec::new();
        let mut bulk: Option<(Seq, u64, u64)> = None; // (begin seq, announced, received)
        let mut resume: Option<(Seq, Seq)> = None; // (from, to)
        let mut bulk_done = false;
        let mut acked: Seq = 0;
        loop {
            if link.core.is_closed() {
                return Ok(());
            }
            let read = wire::read_frame_into_in(&mut r, &mut payload, self.inner.config.formats);
            if read.is_err() && link.leaving.load(Ordering::Acquire) {
                return Ok(());
            }
            let Some(h) = read? else {
                if link.core.is_closed() || link.leaving.load(Ordering::Acquire) {
                    return Ok(());
                }
                return Err(SyncError::Protocol("the active closed the link".into()));
            };
            let f = Incoming {
                kind: h.kind,
                epoch: h.epoch,
                seq: h.seq,
                payload: &payload,
            };
            link.core.touch();
            let cur = self.epoch();
            if f.epoch < cur {
                return Err(SyncError::StaleEpoch {
                    frame: f.epoch,
                    current: cur,
                });
            }
            match f.kind {
                FrameType::BulkBegin => {
                    let Control::BulkBegin { seq, records } = f.control()? else {
                        unreachable!()
                    };
                    if bulk.is_some() || bulk_done || resume.is_some() {
                        return Err(SyncError::Protocol("a second bulk snapshot began".into()));
                    }
                    let mut st = self.state();
                    st.store.clear();
                    // Empty now: keeping the digest in the stream version
                    // from here on costs no scan.
                    st.store.track(schema, sv);
                    // Live batches after `seq` arrive between the chunks
                    // (see `bulk`); the state is a whole history only once
                    // the transfer ends.
                    st.seq = seq;
                    st.last_epoch = 0;
                    st.history_ok = false;
                    st.log.reset(seq, 0);
                    bulk = Some((seq, records, 0));
                }
                FrameType::BulkChunk => {
                    let Some((_, _, received)) = bulk.as_mut() else {
                        return Err(SyncError::Protocol(
                            "bulk chunk outside a bulk snapshot".into(),
                        ));
                    };
                    if bulk_done {
                        return Err(SyncError::Protocol("bulk chunk out of place".into()));
                    }
                    let body = BatchRef::parse(FrameType::BulkChunk, f.payload)?;
                    if body.deletes() > 0 {
                        return Err(SyncError::Protocol("a bulk chunk holds a delete".into()));
                    }
                    *received += body.len() as u64;
                    let conv = if sv == native {
                        self.check_native_tables(&body)?;
                        None
                    } else {
                        Some(self.to_native(body.iter(), sv)?)
                    };
                    let mut st = self.state();
                    // A chunk is read at the sequence it carries: every batch
                    // up to it is applied here, none after it.
                    if f.seq != st.seq {
                        return Err(SyncError::Protocol(format!(
                            "bulk chunk read at sequence {} arrived at applied sequence {}",
                            f.seq, st.seq
                        )));
                    }
                    match conv {
                        None => {
                            for m in body.iter() {
                                let v = m.value.expect("checked");
                                if let Some(i) = st.store.index_of(m.table) {
                                    st.store.put(schema, i, m.key, v);
                                }
                            }
                        }
                        Some(conv) => apply_converted(&mut st.store, schema, conv),
                    }
                }
                FrameType::BulkEnd => {
                    let Control::BulkEnd {
                        seq,
                        digest,
                        last_epoch,
                    } = f.control()?
                    else {
                        unreachable!()
                    };
                    let Some((begin, announced, received)) = bulk.take() else {
                        return Err(SyncError::Protocol(
                            "bulk end without a bulk snapshot".into(),
                        ));
                    };
                    let local = {
                        let st = self.state();
                        if seq != st.seq {
                            return Err(SyncError::Protocol(format!(
                                "bulk transfer begun at {begin} ended at {seq} with {} applied",
                                st.seq
                            )));
                        }
                        self.digest_held(st, sv)?
                    };
                    debug!(begin, end = seq, announced, received, "bulk received");
                    let matched = local == digest;
                    {
                        let mut st = self.state();
                        st.last_epoch = last_epoch;
                        st.history_ok = matched;
                        st.log.reset(seq, last_epoch);
                        st.snapshots_received += 1;
                        if let Some(fs) = st.follow.as_mut() {
                            fs.bulk_done = true;
                            fs.digest_matched = matched;
                            fs.digest_seq = seq;
                            fs.active_seq = fs.active_seq.max(seq);
                        }
                    }
                    self.inner.cond.notify_all();
                    bulk_done = true;
                    if !matched {
                        warn!(
                            seq,
                            "digest after bulk snapshot does not match the active's"
                        );
                    }
                    let mut out = Control::DigestResult { seq, matched }.encode(f.epoch, seq);
                    out.extend_from_slice(&wire::encode_frame(FrameType::Ack, f.epoch, seq, &[]));
                    link.send(&out)?;
                    acked = seq;
                }
                FrameType::ResumeBegin => {
                    let Control::ResumeBegin { from, seq, .. } = f.control()? else {
                        unreachable!()
                    };
                    if bulk.is_some() || bulk_done || resume.is_some() || seq < from {
                        return Err(SyncError::Protocol("resume out of place".into()));
                    }
                    let mut st = self.state();
                    if st.seq != from || !st.history_ok {
                        return Err(SyncError::Protocol(format!(
                            "the active offered a resume from sequence {from}, but this standby is at {}",
                            st.seq
                        )));
                    }
                    // Usually tracked since the bulk transfer or the start;
                    // otherwise built in steps at the resume's end.
                    st.store.track(schema, sv);
                    resume = Some((from, seq));
                }
                FrameType::ReplayBatch => {
                    let Some((_, to)) = resume else {
                        return Err(SyncError::Protocol(
                            "replayed batch outside a resume".into(),
                        ));
                    };
                    if f.payload.len() < 8 {
                        return Err(wire::FrameError::BadPayload {
                            kind: FrameType::ReplayBatch,
                            reason: "missing origin epoch".into(),
                        }
                        .into());
                    }
                    let origin = u64::from_le_bytes(f.payload[..8].try_into().expect("8 bytes"));
                    if origin == 0 || origin > f.epoch || f.seq > to {
                        return Err(SyncError::Protocol(format!(
                            "replayed batch ending at {} of epoch {origin} does not fit a resume to {to} at epoch {}",
                            f.seq, f.epoch
                        )));
                    }
                    let (first, body) =
                        wire::parse_batch_payload(f.seq, &f.payload[8..]).map_err(|e| match e {
                            wire::FrameError::BadPayload { reason, .. } => {
                                wire::FrameError::BadPayload {
                                    kind: FrameType::ReplayBatch,
                                    reason,
                                }
                            }
                            e => e,
                        })?;
                    self.apply_stream_batch(sv, first, f.seq, origin, body, &f.payload[16..])?;
                }
                FrameType::ResumeEnd => {
                    let Control::ResumeEnd {
                        seq,
                        last_epoch,
                        digest,
                    } = f.control()?
                    else {
                        unreachable!()
                    };
                    let Some((from, to)) = resume.take() else {
                        return Err(SyncError::Protocol("resume end without a resume".into()));
                    };
                    let (applied, mine) = {
                        let st = self.state();
                        (st.seq, st.last_epoch)
                    };
                    if seq != to || applied != to {
                        return Err(SyncError::Protocol(format!(
                            "resume to {to} ended at {seq} with {applied} applied"
                        )));
                    }
                    // Only this thread changes a standby's state: the
                    // digest built in steps is the one at `seq`.
                    let local = self.digest_held(self.state(), sv)?;
                    let matched = local == digest && mine == last_epoch;
                    {
                        let mut st = self.state();
                        st.history_ok = matched;
                        if matched {
                            st.resumes_received += 1;
                        }
                        if let Some(fs) = st.follow.as_mut() {
                            fs.bulk_done = matched;
                            fs.digest_matched = matched;
                            fs.digest_seq = seq;
                            fs.active_seq = fs.active_seq.max(seq);
                        }
                    }
                    self.inner.cond.notify_all();
                    let mut out = Control::DigestResult { seq, matched }.encode(f.epoch, seq);
                    if !matched {
                        let _ = link.send(&out);
                        return Err(SyncError::Protocol(format!(
                            "after resuming from {from} to {seq} the state differs from the active's; \
                             the next attach transfers a full snapshot"
                        )));
                    }
                    info!(from, to = seq, "resumed from the active's log");
                    out.extend_from_slice(&wire::encode_frame(FrameType::Ack, f.epoch, seq, &[]));
                    link.send(&out)?;
                    bulk_done = true;
                    acked = seq;
                }
                FrameType::Batch => {
                    if !bulk_done && bulk.is_none() {
                        return Err(SyncError::Protocol(
                            "live mutations before the bulk snapshot ended".into(),
                        ));
                    }
                    let (first, body) = wire::parse_batch_payload(f.seq, f.payload)?;
                    self.apply_stream_batch(sv, first, f.seq, f.epoch, body, &f.payload[8..])?;
                }
                FrameType::DigestCheck => {
                    let Control::DigestCheck { digest } = f.control()? else {
                        unreachable!()
                    };
                    let st = self.state();
                    let seq = st.seq;
                    let local = self.digest_held(st, sv)?;
                    if !bulk_done || seq != f.seq {
                        return Err(SyncError::Protocol(format!(
                            "digest check at {} arrived at applied sequence {seq}",
                            f.seq
                        )));
                    }
                    let matched = local == digest;
                    {
                        let mut st = self.state();
                        if let Some(fs) = st.follow.as_mut() {
                            fs.digest_matched = matched;
                            fs.digest_seq = seq;
                        }
                    }
                    self.inner.cond.notify_all();
                    link.send(&Control::DigestResult { seq, matched }.encode(f.epoch, seq))?;
                }
                FrameType::Heartbeat => {
                    if f.payload.len() != 9 {
                        return Err(SyncError::Protocol(
                            "heartbeat payload is not 9 bytes".into(),
                        ));
                    }
                    let lag = u64::from_le_bytes(f.payload[..8].try_into().expect("8 bytes"));
                    let mut st = self.state();
                    if let Some(fs) = st.follow.as_mut() {
                        fs.active_seq = fs.active_seq.max(f.seq);
                        fs.reported_lag = lag;
                        fs.in_sync = f.payload[8] == 1;
                    }
                    drop(st);
                    self.inner.cond.notify_all();
                }
                FrameType::Promote => {
                    let Control::Promote { last_seq } = f.control()? else {
                        unreachable!()
                    };
                    let mut st = self.state();
                    if f.epoch <= st.epoch || st.seq != last_seq || !bulk_done {
                        let e = format!(
                            "promotion to epoch {} at sequence {last_seq} refused: at epoch {}, applied {}",
                            f.epoch, st.epoch, st.seq
                        );
                        drop(st);
                        let _ =
                            link.send(&Control::Refuse { reason: e.clone() }.encode(f.epoch, 0));
                        return Err(SyncError::Protocol(e));
                    }
                    st.role = Role::Active;
                    st.epoch = f.epoch;
                    st.follow = None;
                    st.quiesced = false;
                    let epoch = st.epoch;
                    drop(st);
                    info!(epoch, seq = last_seq, "promoted by switchover");
                    let _ = link.send(&wire::encode_frame(
                        FrameType::PromoteAck,
                        epoch,
                        last_seq,
                        &[],
                    ));
                    link.core.close();
                    self.inner.cond.notify_all();
                    self.notify_role(Role::Active, epoch);
                    return Ok(());
                }
                FrameType::Fence => {
                    self.fence(f.epoch);
                }
                FrameType::Refuse => {
                    let Control::Refuse { reason } = f.control()? else {
                        unreachable!()
                    };
                    return Err(SyncError::Refused(reason));
                }
                k => {
                    return Err(SyncError::Protocol(format!(
                        "unexpected {k:?} frame from the active"
                    )))
                }
            }
            if bulk_done && r.buffer().is_empty() {
                let (seq, epoch) = {
                    let st = self.state();
                    (st.seq, st.epoch)
                };
                if seq > acked {
                    link.send(&wire::encode_frame(FrameType::Ack, epoch, seq, &[]))?;
                    acked = seq;
                }
            }
        }
    }

    /// [`Replica::follow`] over a new TCP connection to `addr`.
    pub fn follow_tcp(
        &self,
        addr: impl ToSocketAddrs,
        ha: bool,
    ) -> Result<FollowHandle, SyncError> {
        let stream = TcpStream::connect(addr)?;
        self.follow(Conn::tcp(stream)?, ha)
    }

    /// Active: sends every standby the digest of the current state (in its
    /// stream version) inline in the stream; each standby compares when it
    /// reaches that sequence. Returns the sequence checked.
    pub fn verify_standbys(&self) -> Result<Seq, SyncError> {
        let schema = &self.inner.schema;
        let mut st = self.state();
        if st.role != Role::Active {
            return Err(not_active(&st));
        }
        let mut targets = Vec::new();
        let mut cache: Vec<(SchemaVersion, Vec<u8>)> = Vec::new();
        let mut building = false;
        for i in 0..st.links.len() {
            let l = &st.links[i];
            if !l.bulk_done {
                continue;
            }
            let v = l.link.stream_version;
            if !cache.iter().any(|(cv, _)| *cv == v) {
                let Some(d) = st.store.digest_kept(schema, v) else {
                    // Not kept yet (a foreign version tracked since a resume
                    // or a switchover): one bounded build step per call,
                    // this standby is checked once the digest is complete.
                    building = true;
                    continue;
                };
                cache.push((
                    v,
                    Control::DigestCheck { digest: d }.encode(st.epoch, st.seq),
                ));
            }
            let bytes = &cache.iter().find(|(cv, _)| *cv == v).expect("cached").1;
            if l.link.push(bytes, self.inner.config.max_queue_bytes) {
                targets.push(l.link.clone());
            }
        }
        if building {
            st.store.track_step(schema, DIGEST_STEP);
        }
        let seq = st.seq;
        drop(st);
        for l in targets {
            l.flush();
        }
        Ok(seq)
    }

    /// Standby: waits until [`Status::ready`].
    pub fn wait_ready(&self, timeout: Duration) -> Result<(), SyncError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.status().ready {
                return Ok(());
            }
            let st = self.state();
            if Instant::now() >= deadline {
                return Err(SyncError::Timeout(timeout, "the standby to become ready"));
            }
            let _ = self
                .inner
                .cond
                .wait_timeout(st, Duration::from_millis(20).min(deadline - Instant::now()));
        }
    }

    /// Active: waits until at least `n` standbys are ready.
    pub fn wait_standbys_ready(&self, n: usize, timeout: Duration) -> Result<(), SyncError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.status().standbys.iter().filter(|s| s.ready).count() >= n {
                return Ok(());
            }
            let st = self.state();
            if Instant::now() >= deadline {
                return Err(SyncError::Timeout(timeout, "standbys to become ready"));
            }
            let _ = self
                .inner
                .cond
                .wait_timeout(st, Duration::from_millis(20).min(deadline - Instant::now()));
        }
    }

    /// Active: holds new mutations (they wait, bounded by the ack timeout).
    pub fn quiesce(&self) {
        self.state().quiesced = true;
    }

    /// Active: releases a quiesce.
    pub fn resume(&self) {
        self.state().quiesced = false;
        self.inner.cond.notify_all();
    }

    /// Planned switchover to the attached standby `target`: quiesce, drain
    /// until it applied the last sequence, promote it at epoch + 1 and demote
    /// this instance to a detached standby at the new epoch (it then
    /// acknowledges nothing; mutations held by the quiesce fail with
    /// [`SyncError::NotActive`] and were never applied). Returns the new
    /// epoch. If draining fails, the quiesce is released and this instance
    /// stays active. To keep the old instance as a warm fallback, make it
    /// [`Replica::follow`] the new active afterwards.
    pub fn switchover(&self, target: &str, timeout: Duration) -> Result<Epoch, SyncError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.state();
        if st.role != Role::Active {
            return Err(not_active(&st));
        }
        if !st
            .links
            .iter()
            .any(|l| l.link.node == target && l.bulk_done)
        {
            return Err(SyncError::NoSuchStandby(target.into()));
        }
        st.quiesced = true;
        let last = st.seq;
        // Drain.
        loop {
            let l = st
                .links
                .iter()
                .find(|l| l.link.node == target && !l.link.core.is_closed());
            match l {
                None => {
                    st.quiesced = false;
                    drop(st);
                    self.inner.cond.notify_all();
                    return Err(SyncError::NoSuchStandby(target.into()));
                }
                Some(l) if l.acked >= last => break,
                Some(_) => {}
            }
            let now = Instant::now();
            if now >= deadline {
                st.quiesced = false;
                drop(st);
                self.inner.cond.notify_all();
                return Err(SyncError::Timeout(
                    timeout,
                    "the switchover target to drain",
                ));
            }
            st = self
                .inner
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        // Point of no return: demote first, so nothing more is acknowledged here.
        let new_epoch = st.epoch + 1;
        st.role = Role::Standby;
        st.epoch = new_epoch;
        st.quiesced = false;
        let link = st
            .links
            .iter()
            .find(|l| l.link.node == target)
            .map(|l| l.link.clone())
            .expect("checked above");
        let others: Vec<Arc<Link>> = st
            .links
            .iter()
            .filter(|l| l.link.id != link.id)
            .map(|l| l.link.clone())
            .collect();
        drop(st);
        self.inner.cond.notify_all();
        for o in others {
            o.core.close();
        }
        let promote = Control::Promote { last_seq: last }.encode(new_epoch, last);
        link.push(&promote, usize::MAX);
        link.flush();
        let mut st = self.state();
        let result = loop {
            if link.promoted.load(Ordering::SeqCst) == new_epoch {
                break Ok(new_epoch);
            }
            if !st.links.iter().any(|l| l.link.id == link.id) {
                break Err(SyncError::Protocol(
                    "the switchover target closed the link before confirming its promotion".into(),
                ));
            }
            let now = Instant::now();
            if now >= deadline {
                break Err(SyncError::Timeout(
                    timeout,
                    "the switchover target to confirm its promotion",
                ));
            }
            st = self
                .inner
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        };
        let all: Vec<LinkState> = st.links.drain(..).collect();
        drop(st);
        for l in all {
            l.link.core.close();
        }
        info!(
            service = self.inner.schema.service(),
            target,
            epoch = new_epoch,
            ok = result.is_ok(),
            "switchover"
        );
        self.notify_role(Role::Standby, new_epoch);
        result
    }

    /// Active: steps down to a detached standby (links closed, nothing more
    /// acknowledged), e.g. when the control plane moves control elsewhere.
    pub fn demote(&self) -> Result<(), SyncError> {
        let mut st = self.state();
        if st.role != Role::Active && st.role != Role::Fenced {
            return Err(not_active(&st));
        }
        st.role = Role::Standby;
        st.quiesced = false;
        let links: Vec<LinkState> = st.links.drain(..).collect();
        let epoch = st.epoch;
        drop(st);
        for l in links {
            l.link.core.close();
        }
        self.inner.cond.notify_all();
        self.notify_role(Role::Standby, epoch);
        Ok(())
    }

    /// Tells this instance that `epoch` exists. If it is newer than the
    /// instance's own epoch, an active becomes fenced and a standby records it
    /// (frames of older epochs are then rejected).
    pub fn fence(&self, epoch: Epoch) {
        let mut st = self.state();
        if epoch <= st.epoch {
            return;
        }
        st.epoch = epoch;
        let was_active = st.role == Role::Active;
        if was_active {
            st.role = Role::Fenced;
            st.quiesced = false;
        }
        let links: Vec<LinkState> = st.links.drain(..).collect();
        drop(st);
        for l in links {
            l.link.core.close();
        }
        self.inner.cond.notify_all();
        if was_active {
            warn!(
                service = self.inner.schema.service(),
                epoch, "fenced by a newer epoch"
            );
            self.notify_role(Role::Fenced, epoch);
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

    /// Status of this service's replication.
    pub fn status(&self) -> Status {
        let cfg = &self.inner.config;
        let st = self.state();
        let standbys: Vec<StandbyStatus> = st
            .links
            .iter()
            .filter(|l| !l.link.core.is_closed())
            .map(|l| {
                let lag = st.seq.saturating_sub(l.acked);
                StandbyStatus {
                    node: l.link.node.clone(),
                    peer: l.link.peer.clone(),
                    ha: l.link.ha,
                    stream_version: l.link.stream_version,
                    native_version: l.link.native_version,
                    acked_seq: l.acked,
                    lag,
                    bulk_done: l.bulk_done,
                    in_sync: l.in_sync,
                    digest_matched: l.digest_matched,
                    ready: l.bulk_done && l.in_sync && l.digest_matched && lag <= cfg.ready_lag,
                    resumed: l.resumed,
                    bulk_sent: l.bulk_sent,
                }
            })
            .collect();
        let (stream_version, active_seq, lag, bulk_done, digest_matched, digest_seq, ready) =
            match (&st.follow, st.role) {
                (Some(f), Role::Standby) if !f.link.core.is_closed() => {
                    let lag = f.active_seq.saturating_sub(st.seq).max(f.reported_lag);
                    (
                        Some(f.stream_version),
                        f.active_seq.max(st.seq),
                        lag,
                        f.bulk_done,
                        f.digest_matched,
                        f.digest_seq,
                        f.bulk_done && f.in_sync && f.digest_matched && lag <= cfg.ready_lag,
                    )
                }
                (_, Role::Active) => (
                    None,
                    st.seq,
                    standbys.iter().map(|s| s.lag).max().unwrap_or(0),
                    true,
                    true,
                    0,
                    true,
                ),
                _ => (None, st.seq, 0, false, false, 0, false),
            };
        Status {
            service: self.inner.schema.service().into(),
            node: cfg.node.clone(),
            role: st.role,
            epoch: st.epoch,
            native_version: self.inner.schema.version(),
            stream_version,
            applied_seq: st.seq,
            active_seq,
            lag,
            bulk_done,
            digest_matched,
            digest_seq,
            ready,
            quiesced: st.quiesced,
            standbys,
            last_error: st.last_error.clone(),
            snapshots_sent: st.snapshots_sent,
            resumes_sent: st.resumes_sent,
            snapshots_received: st.snapshots_received,
            resumes_received: st.resumes_received,
            digest_scan_records: st.store.scanned(),
        }
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

/// A received frame whose payload borrows the reader's reusable buffer.
struct Incoming<'a> {
    kind: FrameType,
    epoch: Epoch,
    seq: Seq,
    payload: &'a [u8],
}

impl Incoming<'_> {
    fn control(&self) -> Result<Control, SyncError> {
        Ok(Control::decode_payload(self.kind, self.payload)?)
    }
}

/// Records that the in-sync designated HA standby `node` dropped out now (once), unless its
/// control plane wrote it off.
fn note_ha_dropped(st: &mut State, node: &str) {
    if st.gone.iter().any(|n| n == node) {
        return;
    }
    if !st.ha_dropped.iter().any(|(n, _)| n == node) {
        warn!(standby = %node, "designated HA standby dropped out: acknowledgements wait for its grace");
        st.ha_dropped.push((node.to_string(), Instant::now()));
    }
}

fn not_active(st: &State) -> SyncError {
    match st.role {
        Role::Stopped => SyncError::Shutdown,
        role => SyncError::NotActive { role },
    }
}

fn close_chunk(fw: &mut FrameWriter, count: u32) {
    let len = fw.open_payload_len();
    let buf = fw.payload();
    let at = buf.len() - len;
    buf[at..at + 4].copy_from_slice(&count.to_le_bytes());
    fw.finish();
}

fn apply_converted(store: &mut Store, schema: &Schema, conv: Vec<Converted>) {
    for c in conv {
        match c {
            Converted::Put(t, k, v) => {
                if let Some(i) = store.index_of(&t) {
                    store.put(schema, i, &k, &v);
                }
            }
            Converted::Delete(t, k) => {
                if let Some(i) = store.index_of(&t) {
                    store.delete(i, &k);
                }
            }
            Converted::Dropped => {}
        }
    }
}

/// Encodes one batch frame of `muts` (sequences `first..=last`) in stream
/// version `sv`, converting from the native version when they differ.
fn encode_batch(
    schema: &Schema,
    fw: &mut FrameWriter,
    epoch: Epoch,
    first: Seq,
    last: Seq,
    muts: &[Mutation],
    sv: SchemaVersion,
) -> Result<(), SyncError> {
    encode_frame_body(
        schema,
        fw,
        FrameType::Batch,
        epoch,
        None,
        first,
        last,
        muts,
        sv,
    )
}

/// Encodes a batch-shaped frame of type `kind`: the origin epoch if given
/// (replayed batches), the first sequence, then the mutations in `sv`.
#[allow(clippy::too_many_arguments)]
fn encode_frame_body(
    schema: &Schema,
    fw: &mut FrameWriter,
    kind: FrameType,
    epoch: Epoch,
    origin: Option<Epoch>,
    first: Seq,
    last: Seq,
    muts: &[Mutation],
    sv: SchemaVersion,
) -> Result<(), SyncError> {
    let native = schema.version();
    fw.begin(kind, epoch, last);
    let p = fw.payload();
    if let Some(o) = origin {
        p.extend_from_slice(&o.to_le_bytes());
    }
    p.extend_from_slice(&first.to_le_bytes());
    let count_at = p.len();
    p.extend_from_slice(&0u32.to_le_bytes());
    let mut count = 0u32;
    for m in muts {
        if sv == native {
            match m {
                Mutation::Put { table, key, value } => {
                    wire::encode_mutation(fw.payload(), table, key, Some(value))
                }
                Mutation::Delete { table, key } => {
                    wire::encode_mutation(fw.payload(), table, key, None)
                }
            }
            count += 1;
        } else {
            let table = m.table();
            if !schema.has_table(sv, table) {
                continue;
            }
            match m {
                Mutation::Delete { key, .. } => {
                    wire::encode_mutation(fw.payload(), table, key, None)
                }
                Mutation::Put { key, value, .. } => {
                    let rec = Record::new(table, key.clone(), value.clone());
                    match schema.convert(&rec, native, sv)? {
                        Some(r) => {
                            wire::encode_mutation(fw.payload(), &r.table, &r.key, Some(&r.value))
                        }
                        None => wire::encode_mutation(fw.payload(), table, key, None),
                    }
                }
            }
            count += 1;
        }
        if fw.open_payload_len() > wire::MAX_PAYLOAD {
            let len = fw.open_payload_len();
            fw.abort();
            return Err(SyncError::TooLarge {
                what: "batch",
                len,
                limit: wire::MAX_PAYLOAD,
            });
        }
    }
    let p = fw.payload();
    p[count_at..count_at + 4].copy_from_slice(&count.to_le_bytes());
    fw.finish();
    Ok(())
}
