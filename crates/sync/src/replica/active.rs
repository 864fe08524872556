//! The active's side of the state: activation, apply / submit and their durability waits,
//! the HA grace, quiesce and digest checks of the standbys.

use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::{info, warn};

use super::batch::{encode_batch, Input};
use super::{not_active, AckToken, Batch, Durability, Link, Replica, Role, State, DIGEST_STEP};
use crate::log::LogEntry;
use crate::wire::{self, Control, FrameType};
use crate::{Epoch, Mutation, SchemaVersion, Seq, SyncError};

impl Replica {
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
        st.set_epoch(epoch);
        st.quiesced = false;
        drop(st);
        self.inner.cond.notify_all();
        info!(
            service = self.inner.schema.service(),
            epoch = epoch.0,
            "active"
        );
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
        st.applied(first, last, epoch);
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
    ///
    /// [`ReplicaConfig::ha_grace`]: crate::ReplicaConfig::ha_grace
    pub fn ha_grace(&self) -> Duration {
        Duration::from_micros(self.inner.ha_grace_us.load(Ordering::Acquire))
    }

    /// Changes [`ReplicaConfig::ha_grace`] (waiting acknowledgements see it at once).
    ///
    /// [`ReplicaConfig::ha_grace`]: crate::ReplicaConfig::ha_grace
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

    /// Active: holds new mutations (they wait, bounded by the ack timeout).
    pub fn quiesce(&self) {
        self.state().quiesced = true;
    }

    /// Active: releases a quiesce.
    pub fn resume(&self) {
        self.state().quiesced = false;
        self.inner.cond.notify_all();
    }
}

/// Records that the in-sync designated HA standby `node` dropped out now (once), unless its
/// control plane wrote it off.
pub(super) fn note_ha_dropped(st: &mut State, node: &str) {
    if st.gone.iter().any(|n| n == node) {
        return;
    }
    if !st.ha_dropped.iter().any(|(n, _)| n == node) {
        warn!(standby = %node, "designated HA standby dropped out: acknowledgements wait for its grace");
        st.ha_dropped.push((node.to_string(), Instant::now()));
    }
}
