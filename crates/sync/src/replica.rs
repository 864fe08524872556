//! The replica handle: roles, apply, standby attach, follow, fencing, switchover.

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;

use crate::{
    Conn, Digest, Epoch, Mutation, PreflightFailure, PreflightReport, Record, Schema,
    SchemaVersion, Seq, SyncError, Table,
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
}

impl ReplicaConfig {
    /// Defaults for node `node`: synchronous, 5 s ack timeout, ready lag
    /// 1000, 3 standbys, 256 MiB queue, 200 ms heartbeat, 3 s link timeout.
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
    /// Standby: attached, bulk done, digest matched, lag within the bound.
    /// Active: true (an active is in control of its state).
    pub ready: bool,
    /// Active: new mutations are held by a quiesce.
    pub quiesced: bool,
    /// Active: attached standbys.
    pub standbys: Vec<StandbyStatus>,
    /// The error that ended the last link, if any.
    pub last_error: Option<String>,
}

/// A replicated service's state and its replication machinery. Cheap to
/// clone; all clones share the same state.
#[derive(Clone)]
pub struct Replica {
    inner: Arc<Inner>,
}

struct Inner {
    schema: Schema,
    config: ReplicaConfig,
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
}

impl ServeHandle {
    /// Address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting (attached standbys stay attached).
    pub fn stop(self) {
        todo!()
    }
}

/// A running standby link; stops when [`FollowHandle::stop`] is called.
#[derive(Debug)]
pub struct FollowHandle {}

impl FollowHandle {
    /// True once the link ended (error, stop, promotion or fencing).
    pub fn is_finished(&self) -> bool {
        todo!()
    }

    /// Closes the link and waits for it to end.
    pub fn stop(self) {
        todo!()
    }

    /// Waits for the link to end; returns the error that ended it, if any.
    pub fn join(self) -> Result<(), SyncError> {
        todo!()
    }
}

/// Serves standbys of several replicated services on one listener: each
/// connection is routed to the replica whose service its hello names.
pub fn serve(listener: TcpListener, replicas: Vec<Replica>) -> io::Result<ServeHandle> {
    let _ = (listener, replicas);
    todo!()
}

impl Replica {
    /// A replica of `schema`'s state, starting as a detached standby at epoch
    /// 0 with empty tables. Make it active with [`Replica::activate`] or
    /// attach it to an active with [`Replica::follow`].
    pub fn new(schema: Schema, config: ReplicaConfig) -> Replica {
        Replica {
            inner: Arc::new(Inner { schema, config }),
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

    /// Takes control at `epoch` (which must be at least the highest epoch
    /// known), keeping the current state: first start, or failover of a
    /// standby whose active died. Stops following, if following.
    pub fn activate(&self, epoch: Epoch) -> Result<(), SyncError> {
        let _ = epoch;
        todo!()
    }

    /// Applies `mutations` atomically as one batch, gives them consecutive
    /// sequence numbers, streams them to every standby and returns once they
    /// are durable per the durability mode. Fails, applying nothing, if this
    /// instance is not active, is fenced, a table is unknown or a mutation is
    /// too large. In synchronous mode an error after the local apply (ack
    /// timeout, fencing) means "not acknowledged": the batch may or may not
    /// survive a failover.
    pub fn apply(&self, mutations: Vec<Mutation>) -> Result<AckToken, SyncError> {
        let t = self.submit(mutations)?;
        self.wait_durable(t)?;
        Ok(t)
    }

    /// Like [`Replica::apply`] but returns as soon as the batch is applied
    /// locally and queued to standbys, without waiting for acknowledgements
    /// (pipelining: pass the token to [`Replica::wait_durable`] later).
    pub fn submit(&self, mutations: Vec<Mutation>) -> Result<AckToken, SyncError> {
        let _ = mutations;
        todo!()
    }

    /// Waits until the batch of `token` is durable per the durability mode.
    pub fn wait_durable(&self, token: AckToken) -> Result<(), SyncError> {
        let _ = token;
        todo!()
    }

    /// The value at `key` in `table` (any role).
    pub fn get(&self, table: &str, key: &[u8]) -> Result<Option<Bytes>, SyncError> {
        let _ = (table, key);
        todo!()
    }

    /// Runs `f` over `table` under the state lock (keep it short).
    pub fn with_table<R>(&self, table: &str, f: impl FnOnce(&Table) -> R) -> Result<R, SyncError> {
        let _ = (table, f);
        todo!()
    }

    /// A copy of every record, sorted, and the sequence it is consistent at.
    pub fn records(&self) -> (Seq, Vec<Record>) {
        todo!()
    }

    /// Digest of the state in the native version and its sequence.
    pub fn digest(&self) -> (Seq, Digest) {
        todo!()
    }

    /// Digest of the state converted to `version`, and its sequence.
    pub fn digest_in(&self, version: SchemaVersion) -> Result<(Seq, Digest), SyncError> {
        let _ = version;
        todo!()
    }

    /// Pre-flight: converts a copy of the live state to `target` (and back),
    /// reporting success or the first failing record. Live state is untouched.
    pub fn preflight(&self, target: SchemaVersion) -> Result<PreflightReport, PreflightFailure> {
        let _ = target;
        todo!()
    }

    /// Serves standbys of this service on `listener` (accept loop thread).
    pub fn serve(&self, listener: TcpListener) -> io::Result<ServeHandle> {
        serve(listener, vec![self.clone()])
    }

    /// Active side: runs the handshake on an accepted connection and attaches
    /// the standby (bulk snapshot, then live stream) without stopping writes.
    /// Returns once the handshake is done; the transfer runs on threads.
    pub fn attach(&self, conn: Conn) -> Result<(), SyncError> {
        let _ = conn;
        todo!()
    }

    /// Standby side: connects to an active over `conn`, announces this
    /// instance's versions (`ha`: designated HA standby), receives the bulk
    /// snapshot and then the live stream. The local state is replaced by the
    /// snapshot. Returns once the handshake is done.
    pub fn follow(&self, conn: Conn, ha: bool) -> Result<FollowHandle, SyncError> {
        let _ = (conn, ha);
        todo!()
    }

    /// [`Replica::follow`] over a new TCP connection to `addr`.
    pub fn follow_tcp(
        &self,
        addr: impl ToSocketAddrs,
        ha: bool,
    ) -> Result<FollowHandle, SyncError> {
        let _ = (addr, ha);
        todo!()
    }

    /// Active: sends every standby the digest of the current state (in its
    /// stream version) inline in the stream; each standby compares when it
    /// reaches that sequence. Returns the sequence checked.
    pub fn verify_standbys(&self) -> Result<Seq, SyncError> {
        todo!()
    }

    /// Standby: waits until [`Status::ready`].
    pub fn wait_ready(&self, timeout: Duration) -> Result<(), SyncError> {
        let _ = timeout;
        todo!()
    }

    /// Active: waits until at least `n` standbys are ready.
    pub fn wait_standbys_ready(&self, n: usize, timeout: Duration) -> Result<(), SyncError> {
        let _ = (n, timeout);
        todo!()
    }

    /// Active: holds new mutations (they wait, bounded by the ack timeout).
    pub fn quiesce(&self) {
        todo!()
    }

    /// Active: releases a quiesce.
    pub fn resume(&self) {
        todo!()
    }

    /// Planned switchover to the attached standby `target`: quiesce, drain
    /// until it applied the last sequence, promote it at epoch + 1 and fence
    /// this instance (which then acknowledges nothing; waiting mutations fail
    /// with [`SyncError::Fenced`] and were never applied). Returns the new
    /// epoch. On failure before the promotion, the quiesce is released and
    /// this instance stays active. To keep the old instance as a warm
    /// fallback, make it [`Replica::follow`] the new active afterwards.
    pub fn switchover(&self, target: &str, timeout: Duration) -> Result<Epoch, SyncError> {
        let _ = (target, timeout);
        todo!()
    }

    /// Active: steps down to a detached standby (links closed, nothing more
    /// acknowledged), e.g. when the control plane moves control elsewhere.
    pub fn demote(&self) -> Result<(), SyncError> {
        todo!()
    }

    /// Tells this instance that `epoch` exists. If it is newer than the
    /// instance's own epoch, an active becomes fenced and a standby records it
    /// (frames of older epochs are then rejected).
    pub fn fence(&self, epoch: Epoch) {
        let _ = epoch;
        todo!()
    }

    /// Registers a callback run (on a library thread) after every role
    /// change, e.g. a standby promoted by a switchover.
    pub fn on_role_change(&self, f: impl Fn(Role, Epoch) + Send + Sync + 'static) {
        let _ = f;
        todo!()
    }

    /// Current role.
    pub fn role(&self) -> Role {
        todo!()
    }

    /// Highest epoch known.
    pub fn epoch(&self) -> Epoch {
        todo!()
    }

    /// Status of this service's replication.
    pub fn status(&self) -> Status {
        todo!()
    }

    /// Stops every link and thread of this replica; further calls fail with
    /// [`SyncError::Shutdown`].
    pub fn shutdown(&self) {
        todo!()
    }
}
