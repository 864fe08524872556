//! What a replica reports: its role, acknowledgement tokens, its status and that of its
//! standbys, and the waits on them.

use std::fmt;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::Replica;
use crate::{Epoch, SchemaVersion, Seq, SyncError};

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

impl Replica {
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
}
