//! Error types of the replication library.

use crate::{ControlEpoch, SchemaVersion, Seq};

/// A transform between schema versions failed on one record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "transform of table {table} key {key_hex} from schema version {from} to {to} failed: {message}"
)]
pub struct TransformError {
    /// Table of the failing record.
    pub table: String,
    /// Hex rendering of the failing record's key.
    pub key_hex: String,
    /// Source schema version.
    pub from: SchemaVersion,
    /// Target schema version.
    pub to: SchemaVersion,
    /// What the transform reported.
    pub message: String,
}

/// Errors of the replication library.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// An I/O error on a replication stream or listener.
    #[error("replication I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// A frame was malformed, truncated, oversized or failed its CRC.
    #[error("malformed replication frame: {0}")]
    Frame(#[from] crate::wire::FrameError),
    /// A frame carried an epoch older than the one this instance knows.
    #[error(
        "frame of epoch {} rejected: this instance is at epoch {}",
        .frame.0,
        .current.0
    )]
    StaleEpoch {
        /// Epoch in the frame.
        frame: ControlEpoch,
        /// Epoch known locally.
        current: ControlEpoch,
    },
    /// This instance learned of a newer epoch and no longer acknowledges.
    #[error(
        "this instance is fenced: epoch {} was superseded by epoch {}",
        .current.0,
        .newer.0
    )]
    Fenced {
        /// Epoch this instance was active in.
        current: ControlEpoch,
        /// The newer epoch it learned of.
        newer: ControlEpoch,
    },
    /// A sync peer sent an epoch newer than this instance's. Only the control plane raises
    /// the epoch that fences an instance: the peer's frame is refused and its link closed,
    /// and this instance keeps its role and epoch.
    #[error(
        "epoch {} from a sync peer refused: this instance is at epoch {}, and only the control \
         plane raises its epoch",
        .peer.0,
        .current.0
    )]
    NewerEpochFromPeer {
        /// The epoch the peer sent.
        peer: ControlEpoch,
        /// Epoch known locally.
        current: ControlEpoch,
    },
    /// A hello announced a payload larger than any hello needs; nothing of it was read.
    #[error("hello of {len} bytes refused: a hello is at most {limit} bytes")]
    HelloTooLarge {
        /// The announced payload length.
        len: usize,
        /// The bound ([`crate::MAX_HELLO`]).
        limit: usize,
    },
    /// A standby the control plane did not tell this instance to serve: refused before
    /// anything of the state is sent.
    #[error(
        "standby {node} connecting from {peer} refused: the control plane did not tell this \
         instance to serve it"
    )]
    UnexpectedStandby {
        /// The name its hello gave.
        node: String,
        /// The address it connected from.
        peer: String,
    },
    /// More expected standbys were given than an instance keeps.
    #[error("{given} expected standbys refused: an instance keeps at most {limit}")]
    TooManyExpectedStandbys {
        /// How many were given.
        given: usize,
        /// The bound.
        limit: usize,
    },
    /// The operation needs the active role.
    #[error("this instance is not active (role {role})")]
    NotActive {
        /// Current role.
        role: crate::Role,
    },
    /// The operation needs the standby role.
    #[error("this instance is not a standby (role {role})")]
    NotStandby {
        /// Current role.
        role: crate::Role,
    },
    /// The two ends cannot agree on a schema version.
    #[error(
        "schema versions are incompatible: active {service} version {active} (writes {active_writes}) \
         and standby version {standby} (reads {standby_reads}, writes {standby_writes}) share no stream version"
    )]
    IncompatibleVersions {
        /// Service name.
        service: String,
        /// Native schema version of the active.
        active: SchemaVersion,
        /// Native schema version of the standby.
        standby: SchemaVersion,
        /// Versions the active can write.
        active_writes: crate::VersionSet,
        /// Versions the standby can read.
        standby_reads: crate::VersionSet,
        /// Versions the standby can write (needed for digest comparison).
        standby_writes: crate::VersionSet,
    },
    /// The two ends share no frame format, or a configured range is invalid.
    #[error(transparent)]
    Format(#[from] crate::wire::FormatError),
    /// The peer refused the connection.
    #[error("the peer refused the connection: {0}")]
    Refused(String),
    /// The peer serves a different service.
    #[error("service mismatch: this end replicates {local}, the peer {peer}")]
    ServiceMismatch {
        /// Local service name.
        local: String,
        /// Peer service name.
        peer: String,
    },
    /// A schema transform failed.
    #[error(transparent)]
    Transform(#[from] TransformError),
    /// A mutation or record names a table the schema does not declare.
    #[error("table {table} is not declared by schema version {version} of service {service}")]
    UnknownTable {
        /// Service name.
        service: String,
        /// Schema version.
        version: SchemaVersion,
        /// The unknown table.
        table: String,
    },
    /// A mutation exceeds the size limits of the wire format.
    #[error("mutation too large: {what} is {len} bytes, the limit is {limit}")]
    TooLarge {
        /// Which part is too large.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// A sequence number arrived out of order (gap or duplicate).
    #[error("sequence error: expected {expected}, got {got}")]
    Sequence {
        /// The expected next sequence number.
        expected: Seq,
        /// The sequence number received.
        got: Seq,
    },
    /// A protocol rule was broken by the peer.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// Asynchronous mode: the standby lag stayed over its bound.
    #[error("replication lag {lag} exceeds the bound {bound}")]
    LagExceeded {
        /// Current lag in sequence numbers.
        lag: u64,
        /// The configured bound.
        bound: u64,
    },
    /// Fewer in-sync HA standbys are attached than the configuration requires.
    #[error("only {have} in-sync HA standbys are attached, {need} are required")]
    NotEnoughStandbys {
        /// In-sync HA standbys attached.
        have: usize,
        /// Required by the configuration.
        need: usize,
    },
    /// The standby limit is reached.
    #[error("the active already has {0} standbys attached")]
    TooManyStandbys(usize),
    /// A wait ran out of time.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(std::time::Duration, &'static str),
    /// The named standby is not attached.
    #[error("no standby named {0} is attached")]
    NoSuchStandby(String),
    /// The replica was shut down.
    #[error("the replica is shut down")]
    Shutdown,
}
