//! The active's side of a bulk transfer: the whole state to an attaching
//! standby, without a copy of it and without a pause that grows with it.
//!
//! The transfer walks the store with a cursor in bounded steps. Each step
//! takes the state lock, reads at most [`CHUNK_BYTES`] of records (converted
//! to the link's stream version) at the current sequence `s`, queues them as
//! one `BulkChunk` frame stamped with `s` on the link, and lets go. Live
//! batches are queued on the same link under the same lock, so the standby
//! receives chunks and batches in the order the active applied them, and
//! applies them in that order: a record read at `s` is overwritten or
//! deleted by the batches after `s` that change it. A record inserted behind
//! the cursor is carried by the live stream alone. Once the walk is done,
//! the last step queues `BulkEnd` with the sequence it stands at and the
//! digest kept at that sequence: the standby's state must then equal the
//! active's at that sequence, which the digest proves.
//!
//! Costs on the active: one chunk of memory per transfer and one short lock
//! hold per step, whatever the size of the state. A step waits until the
//! link's queue holds less than [`QUEUE_LOW`] bytes, so a slow standby slows
//! its own transfer and never fills the active's memory. A transfer in a
//! foreign version also builds the digest in that version in steps (see the
//! store's `track`), so no step converts more than a bounded number of
//! records. While the transfer runs, only its thread (and the link's
//! heartbeats) write the link: a client's write never waits for a standby
//! that is busy applying the bulk.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tracing::debug;

use super::{close_chunk, lock, Link, Replica, Role};
use crate::store::Cursor;
use crate::wire::{self, Control, FrameType, FrameWriter};
use crate::{Epoch, Record, SyncError};

/// Records per chunk, in payload bytes (about 500 records of 100 bytes):
/// small enough that a step holds the lock for well under a millisecond.
const CHUNK_BYTES: usize = 64 << 10;
/// Buckets one step looks at, at most (empty ones included).
const STEP_BUCKETS: usize = 16 << 10;
/// Records one step converts, at most, to build the foreign digest.
const TRACK_STEP: usize = 2048;
/// A step waits until the link's queue is below this many bytes.
const QUEUE_LOW: usize = 1 << 20;
/// How long a step waits for the queue to drain before it checks the link.
const DRAIN_WAIT: Duration = Duration::from_millis(100);

impl Link {
    /// Waits until fewer than `bytes` are queued, the link closes, or
    /// `max` passes. Returns true if the queue is below `bytes`.
    fn wait_queue_below(&self, bytes: usize, max: Duration) -> bool {
        let ob = lock(&self.out);
        if ob.buf.len() < bytes {
            return true;
        }
        let (ob, _) = self
            .drained
            .wait_timeout_while(ob, max, |ob| {
                ob.buf.len() >= bytes && !self.core.is_closed()
            })
            .unwrap_or_else(|p| p.into_inner());
        ob.buf.len() < bytes
    }
}

impl Replica {
    /// Sends the whole state to the standby on `link` (attached at `epoch`)
    /// through its queue; the `BulkBegin` frame is queued already.
    pub(super) fn send_bulk(&self, link: &Link, epoch: Epoch) -> Result<(), SyncError> {
        let schema = &self.inner.schema;
        let native = schema.version();
        let sv = link.stream_version;
        let mut cur = Cursor::default();
        let mut walked = false;
        let mut fw = FrameWriter::new();
        let mut sent = 0u64;
        let mut steps = 0u64;
        let mut longest = Duration::ZERO;
        let mut total = Duration::ZERO;
        let mut slow = 0u64;
        loop {
            if link.core.is_closed() {
                return Err(SyncError::Shutdown);
            }
            // Writes what the live stream queued meanwhile too.
            link.flush();
            if !link.wait_queue_below(QUEUE_LOW, DRAIN_WAIT) {
                continue;
            }
            let mut st = self.state_background();
            let held = Instant::now();
            if st.role != Role::Active || st.epoch != epoch {
                return Err(SyncError::NotActive { role: st.role });
            }
            let Some(pos) = st.links.iter().position(|l| l.link.id == link.id) else {
                return Err(SyncError::Shutdown);
            };
            steps += 1;
            if sv != native && !st.store.track_step(schema, TRACK_STEP) {
                // Building the digest in the stream version: this step is
                // spent on it.
                drop(st);
                continue;
            }
            if sv != native && st.store.tracked() != Some(sv) {
                // The build stopped at a record that does not convert.
                let e = st
                    .store
                    .digest_scan(schema, native, sv)
                    .err()
                    .map(SyncError::from)
                    .unwrap_or_else(|| {
                        SyncError::Protocol(format!("the digest in version {sv} is no longer kept"))
                    });
                return Err(e);
            }
            if !walked {
                let seq = st.seq;
                fw.begin(FrameType::BulkChunk, epoch, seq);
                fw.payload().extend_from_slice(&0u32.to_le_bytes());
                let mut count = 0u32;
                let mut failed = None;
                walked = st.store.scan(&mut cur, STEP_BUCKETS, |name, k, v| {
                    if sv == native {
                        wire::encode_mutation(fw.payload(), name, k, Some(v));
                    } else {
                        let rec = Record::new(name, k.to_vec(), v.to_vec());
                        match schema.convert(&rec, native, sv) {
                            Ok(Some(r)) => wire::encode_mutation(
                                fw.payload(),
                                &r.table,
                                &r.key,
                                Some(&r.value),
                            ),
                            Ok(None) => return true,
                            Err(e) => {
                                failed = Some(e);
                                return false;
                            }
                        }
                    }
                    count += 1;
                    fw.open_payload_len() < CHUNK_BYTES
                });
                if let Some(e) = failed {
                    fw.abort();
                    fw.clear();
                    return Err(e.into());
                }
                if count > 0 {
                    close_chunk(&mut fw, count);
                    // Below the queue bound by the wait above.
                    link.push(fw.as_bytes(), usize::MAX);
                    sent += count as u64;
                    st.links[pos].bulk_sent = sent;
                } else {
                    fw.abort();
                }
                fw.clear();
            }
            if !walked {
                drop(st);
                let h = held.elapsed();
                longest = longest.max(h);
                total += h;
                if h > Duration::from_millis(1) {
                    slow += 1;
                }
                continue;
            }
            let digest = st
                .store
                .digest_kept(schema, sv)
                .expect("the native digest is kept, a foreign one is complete here");
            let end = Control::BulkEnd {
                seq: st.seq,
                digest,
                last_epoch: st.last_epoch,
            };
            link.push(&end.encode(epoch, st.seq), usize::MAX);
            // From here on, submitters write what they queue.
            link.bulk.store(false, Ordering::Relaxed);
            // The standby's digest result and acknowledgements refer to
            // the sequence the transfer ended at.
            st.links[pos].snap_seq = st.seq;
            let end_seq = st.seq;
            drop(st);
            longest = longest.max(held.elapsed());
            link.flush();
            debug!(
                standby = %link.node,
                records = sent,
                steps,
                end_seq,
                longest_step_us = longest.as_micros() as u64,
                mean_step_us = (total.as_micros() as u64) / steps.max(1),
                steps_over_1ms = slow,
                "bulk sent"
            );
            return Ok(());
        }
    }
}
