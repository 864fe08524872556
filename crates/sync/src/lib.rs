//! hitless-sync: versioned, cross-version, fenced state replication from an
//! active instance to up to three standbys.
//!
//! A service declares its replicated state as named tables of byte keys to
//! byte values under a [`Schema`] (service name, schema version, tables, and
//! the upgrade/downgrade transforms between adjacent versions). It wraps that
//! schema in a [`Replica`], the handle through which everything happens:
//!
//! * on the active, [`Replica::apply`] gives each batch of [`Mutation`]s a
//!   sequence number, applies it locally, streams it to every attached standby
//!   and returns an [`AckToken`] once it is durable per the [`Durability`]
//!   mode (synchronous by default: every in-sync HA standby applied it);
//! * [`Replica::serve`] (or [`serve`] for several services on one listener)
//!   accepts standbys; [`Replica::follow`] / [`Replica::follow_tcp`] attach
//!   this instance as a standby of an active. A new standby receives a
//!   consistent bulk snapshot while mutations go on, then the live stream,
//!   with neither gap nor duplicate;
//! * both ends announce the schema versions they can read and write; each
//!   standby receives the stream in the negotiated version, transformed on the
//!   active side, and an incompatible pair is refused naming both versions;
//! * a standby is *ready* ([`Status::ready`]) once bulk is done, its lag is
//!   under the configured bound and a per-table order-independent
//!   [`Digest`] computed at a sequence number (over the state as converted to
//!   the negotiated version) matches the active's;
//! * a standby that re-attaches (to the same active, or to a new active that
//!   was a standby of the same history, e.g. after a planned switchover;
//!   sequence numbers continue across it) is *resumed*: if its last applied
//!   sequence and the epoch of that batch are on the active's history and the
//!   active's bounded log ([`ReplicaConfig::resume_log_bytes`]) still holds
//!   every batch after it, only those are replayed, then the digests at the
//!   resume point are compared (both ends keep their digest in the native
//!   version, and in the one foreign version they stream in, up to date on
//!   every mutation, so the comparison reads no record and a resume costs
//!   what it replays, not the state's size); otherwise it receives a full snapshot
//!   ([`Status::resumes_sent`], [`Status::snapshots_sent`] count both);
//! * every frame carries the control epoch: stale frames are rejected, an
//!   instance that learns of a newer epoch is fenced and stops acknowledging.
//!   [`Replica::switchover`] performs a planned switchover (quiesce, drain,
//!   promote the target at epoch + 1, demote the old active).
//!
//! The [`wire`] module holds the frame codec: magic, version, type, length,
//! epoch, sequence and CRC32C on every frame, with size limits. Transport is
//! any byte stream ([`Conn`]): TCP (with `TCP_NODELAY`), unix sockets or any
//! `Read` + `Write` pair such as a serial port. The crate uses std threads and
//! blocking I/O only.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod bench;
mod conn;
mod digest;
mod error;
mod hash;
mod log;
mod replica;
mod schema;
mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod wire;

pub use wire::ResumePoint;

pub use conn::Conn;
pub use digest::{Digest, TableDigest};
pub use error::{SyncError, TransformError};
pub use replica::{
    serve, serve_with, AckToken, Batch, Durability, ExpectedStandby, FollowHandle, Replica,
    ReplicaConfig, Role, ServeHandle, ServeLimits, StandbyStatus, Status, HANDSHAKE_DEADLINE,
    MAX_EXPECTED, MAX_HELLO, MAX_SYNC_CONNECTIONS,
};
pub use schema::{negotiate, PreflightFailure, PreflightReport, Schema, TransformFn, VersionSet};
pub use store::Table;

/// Sequence number of a mutation batch; the first batch applied is 1, and 0
/// means "nothing applied yet".
pub type Seq = u64;

pub use hitless_epoch::ControlEpoch;

/// Control epoch. Every frame carries it; a higher epoch fences a lower one.
///
/// An alias of [`ControlEpoch`], the same type the engine, the agent and the control channel
/// use; services may name either. On the wire it is encoded as its plain number.
pub type Epoch = ControlEpoch;

/// Schema version of a service's replicated state.
pub type SchemaVersion = u32;

/// One record of replicated state: a key and value in a named table.
///
/// Transforms between schema versions are functions over records.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Record {
    /// Table name, as declared in the [`Schema`].
    pub table: String,
    /// Key bytes.
    pub key: Vec<u8>,
    /// Value bytes, encoded by the service for the record's schema version.
    pub value: Vec<u8>,
}

impl Record {
    /// Builds a record.
    pub fn new(
        table: impl Into<String>,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) -> Self {
        Record {
            table: table.into(),
            key: key.into(),
            value: value.into(),
        }
    }
}

/// One change to replicated state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mutation {
    /// Insert or replace `key` in `table` with `value`.
    Put {
        /// Table name.
        table: String,
        /// Key bytes.
        key: Vec<u8>,
        /// Value bytes.
        value: Vec<u8>,
    },
    /// Remove `key` from `table` (a no-op if it is absent).
    Delete {
        /// Table name.
        table: String,
        /// Key bytes.
        key: Vec<u8>,
    },
}

impl Mutation {
    /// A put of `value` at `key` in `table`.
    pub fn put(
        table: impl Into<String>,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) -> Self {
        Mutation::Put {
            table: table.into(),
            key: key.into(),
            value: value.into(),
        }
    }

    /// A delete of `key` in `table`.
    pub fn delete(table: impl Into<String>, key: impl Into<Vec<u8>>) -> Self {
        Mutation::Delete {
            table: table.into(),
            key: key.into(),
        }
    }

    /// The table this mutation touches.
    pub fn table(&self) -> &str {
        match self {
            Mutation::Put { table, .. } | Mutation::Delete { table, .. } => table,
        }
    }

    /// The key this mutation touches.
    pub fn key(&self) -> &[u8] {
        match self {
            Mutation::Put { key, .. } | Mutation::Delete { key, .. } => key,
        }
    }
}
