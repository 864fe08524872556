//! Configuration of a replica.

use std::time::Duration;

use serde::Serialize;

/// When [`Replica::apply`] returns.
///
/// [`Replica::apply`]: crate::Replica::apply
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Durability {
    /// Acknowledge only after every in-sync designated HA standby applied the
    /// mutations (the default).
    Sync,
    /// Acknowledge once applied locally and queued; `apply` waits (up to the
    /// ack timeout, then fails with [`SyncError::LagExceeded`]) while any
    /// in-sync HA standby lags more than `max_lag` sequence numbers.
    ///
    /// [`SyncError::LagExceeded`]: crate::SyncError::LagExceeded
    Async {
        /// Lag bound in sequence numbers.
        max_lag: u64,
    },
}

/// Configuration of a [`Replica`].
///
/// [`Replica`]: crate::Replica
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
    ///
    /// [`SyncError::NotEnoughStandbys`]: crate::SyncError::NotEnoughStandbys
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
    ///
    /// [`Replica::set_ha_grace`]: crate::Replica::set_ha_grace
    pub ha_grace: Duration,
    /// Called first on each thread whose work no client waits for: a bulk transfer (either
    /// end) and the stream of a standby that is not the HA standby. A service lowers the
    /// thread's scheduling priority there: on a machine whose CPUs are saturated, a client's
    /// write crosses several threads (the active's, its HA standby's, the acknowledgement's),
    /// each of which would otherwise queue behind the bulk work. `None`: nothing is done.
    pub background_thread: Option<fn()>,
    /// Frame formats this end reads and writes, announced at connect; a link uses the highest
    /// format both ends have (default [`crate::wire::BUILD_FORMATS`]).
    pub formats: crate::wire::FormatRange,
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
            formats: crate::wire::BUILD_FORMATS,
        }
    }
}
