//! Bounded in-memory log of the most recent batches, for resuming a
//! re-attaching standby without a full snapshot.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use crate::{Epoch, Seq};

/// One logged batch, in the native schema version.
#[derive(Clone, Debug)]
pub(crate) struct LogEntry {
    /// First sequence number of the batch.
    pub first: Seq,
    /// Last sequence number of the batch.
    pub last: Seq,
    /// Epoch the batch was first applied in.
    pub epoch: Epoch,
    /// Batch body: mutation count, then mutations (see [`crate::wire`]).
    pub body: Bytes,
}

/// Contiguous batches `base + 1 ..= last`, bounded in bytes and batches;
/// the oldest are dropped first.
#[derive(Debug)]
pub(crate) struct ResumeLog {
    base_seq: Seq,
    base_epoch: Epoch,
    entries: VecDeque<LogEntry>,
    bytes: usize,
    max_bytes: usize,
    max_batches: usize,
    /// Bodies are copied into large shared blocks: one allocation per block
    /// rather than one per batch.
    arena: BytesMut,
}

/// Size of an arena block.
const ARENA_BLOCK: usize = 1 << 20;

/// Bytes a log entry is charged for besides its body.
const ENTRY_OVERHEAD: usize = 64;

impl ResumeLog {
    pub fn new(max_bytes: usize, max_batches: usize) -> Self {
        ResumeLog {
            base_seq: 0,
            base_epoch: crate::ControlEpoch(0),
            entries: VecDeque::new(),
            bytes: 0,
            max_bytes,
            max_batches,
            arena: BytesMut::new(),
        }
    }

    /// True if the log keeps nothing (resuming disabled).
    pub fn disabled(&self) -> bool {
        self.max_batches == 0 || self.max_bytes == 0
    }

    /// Copies `body` into the arena.
    pub fn copy_body(&mut self, body: &[u8]) -> Bytes {
        if body.len() >= ARENA_BLOCK / 4 {
            return Bytes::copy_from_slice(body);
        }
        if self.arena.capacity() - self.arena.len() < body.len() {
            self.arena = BytesMut::with_capacity(ARENA_BLOCK);
        }
        self.arena.extend_from_slice(body);
        self.arena.split().freeze()
    }

    /// Forgets every entry: the log starts after `(seq, epoch)`.
    pub fn reset(&mut self, seq: Seq, epoch: Epoch) {
        self.entries.clear();
        self.bytes = 0;
        self.base_seq = seq;
        self.base_epoch = epoch;
    }

    /// The sequence the log ends at.
    pub fn end(&self) -> Seq {
        self.entries.back().map_or(self.base_seq, |e| e.last)
    }

    /// Appends the next batch; a batch that does not continue the log
    /// restarts it.
    pub fn push(&mut self, e: LogEntry) {
        if e.first != self.end() + 1 {
            self.reset(e.first.saturating_sub(1), crate::ControlEpoch(0));
        }
        let cost = e.body.len() + ENTRY_OVERHEAD;
        if self.max_batches == 0 || cost > self.max_bytes {
            self.reset(e.last, e.epoch);
            return;
        }
        self.bytes += cost;
        self.entries.push_back(e);
        while self.bytes > self.max_bytes || self.entries.len() > self.max_batches {
            let old = self
                .entries
                .pop_front()
                .expect("over a bound, so not empty");
            self.bytes -= old.body.len() + ENTRY_OVERHEAD;
            self.base_seq = old.last;
            self.base_epoch = old.epoch;
        }
    }

    /// If the log shows the history passing through `(seq, epoch)`, the
    /// batches after it (possibly none); otherwise `None`.
    pub fn after(&self, seq: Seq, epoch: Epoch) -> Option<Vec<LogEntry>> {
        if epoch == crate::ControlEpoch(0) {
            return None;
        }
        if seq == self.base_seq {
            return (epoch == self.base_epoch).then(|| self.entries.iter().cloned().collect());
        }
        // Entries are contiguous and ordered: find the one ending at `seq`.
        let i = self.entries.binary_search_by(|e| e.last.cmp(&seq)).ok()?;
        if self.entries[i].epoch != epoch {
            return None;
        }
        Some(self.entries.iter().skip(i + 1).cloned().collect())
    }

    /// Number of logged batches.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(first: Seq, last: Seq, epoch: Epoch, n: usize) -> LogEntry {
        LogEntry {
            first,
            last,
            epoch,
            body: Bytes::from(vec![0u8; n]),
        }
    }

    #[test]
    fn finds_the_batches_after_a_matching_position_only() {
        let mut l = ResumeLog::new(1 << 20, 100);
        l.reset(10, crate::ControlEpoch(1));
        l.push(e(11, 12, crate::ControlEpoch(1), 10));
        l.push(e(13, 13, crate::ControlEpoch(2), 10));
        l.push(e(14, 20, crate::ControlEpoch(2), 10));
        assert_eq!(l.end(), 20);
        assert_eq!(l.after(10, crate::ControlEpoch(1)).unwrap().len(), 3);
        assert_eq!(l.after(12, crate::ControlEpoch(1)).unwrap().len(), 2);
        assert_eq!(l.after(13, crate::ControlEpoch(2)).unwrap()[0].first, 14);
        assert!(l.after(20, crate::ControlEpoch(2)).unwrap().is_empty());
        // Same sequence, other epoch: another history.
        assert!(l.after(13, crate::ControlEpoch(1)).is_none());
        assert!(l.after(10, crate::ControlEpoch(2)).is_none());
        // Inside a batch, before the log, after its end, or unknown epoch.
        assert!(l.after(16, crate::ControlEpoch(2)).is_none());
        assert!(l.after(9, crate::ControlEpoch(1)).is_none());
        assert!(l.after(21, crate::ControlEpoch(2)).is_none());
        assert!(l.after(12, crate::ControlEpoch(0)).is_none());
    }

    #[test]
    fn bounds_drop_the_oldest_batches_and_move_the_base() {
        let mut l = ResumeLog::new(3 * (100 + ENTRY_OVERHEAD), 1000);
        for i in 1..=10 {
            l.push(e(i, i, crate::ControlEpoch(1), 100));
        }
        assert_eq!(l.len(), 3);
        assert!(l.after(6, crate::ControlEpoch(1)).is_none());
        assert_eq!(l.after(7, crate::ControlEpoch(1)).unwrap().len(), 3);
        let mut l = ResumeLog::new(1 << 20, 2);
        for i in 1..=10 {
            l.push(e(i, i, crate::ControlEpoch(1), 1));
        }
        assert_eq!(l.len(), 2);
        assert_eq!(l.after(8, crate::ControlEpoch(1)).unwrap().len(), 2);
        // A disabled log still knows its end position.
        let mut l = ResumeLog::new(1 << 20, 0);
        l.push(e(1, 5, crate::ControlEpoch(3), 1));
        assert_eq!(l.len(), 0);
        assert!(l.after(5, crate::ControlEpoch(3)).unwrap().is_empty());
        // A gap restarts the log.
        let mut l = ResumeLog::new(1 << 20, 10);
        l.push(e(1, 1, crate::ControlEpoch(1), 1));
        l.push(e(5, 6, crate::ControlEpoch(1), 1));
        assert!(l.after(1, crate::ControlEpoch(1)).is_none());
        assert!(l.after(4, crate::ControlEpoch(0)).is_none());
        assert_eq!(l.after(6, crate::ControlEpoch(1)).unwrap().len(), 0);
    }

    use proptest::prelude::*;

    proptest! {
        /// Whatever the bounds and batch shapes, `after` hands back exactly
        /// the contiguous batches from the asked position to the end, and
        /// only for positions the log really passed through.
        #[test]
        fn after_returns_contiguous_tails(
            batches in proptest::collection::vec((1u64..4, 1u64..3, 0usize..300), 1..80),
            max_bytes in 0usize..8_000,
            max_batches in 0usize..40,
        ) {
            let mut l = ResumeLog::new(max_bytes, max_batches);
            let mut seq = 0u64;
            let mut history = Vec::new(); // (last, epoch) of every batch
            let mut epoch = 1u64;
            for (n, bump, size) in batches {
                epoch += bump - 1;
                l.push(e(seq + 1, seq + n, crate::ControlEpoch(epoch), size));
                seq += n;
                history.push((seq, epoch));
            }
            prop_assert_eq!(l.end(), seq);
            for &(last, ep) in &history {
                if let Some(tail) = l.after(last, crate::ControlEpoch(ep)) {
                    let mut next = last + 1;
                    for t in &tail {
                        prop_assert_eq!(t.first, next);
                        next = t.last + 1;
                    }
                    prop_assert_eq!(next, seq + 1);
                }
                // A position with another epoch is never on the history.
                prop_assert!(l.after(last, crate::ControlEpoch(ep + 100)).is_none());
            }
            // The end of the log is always resumable (with nothing to send).
            let (last, ep) = *history.last().unwrap();
            prop_assert!(l.after(last, crate::ControlEpoch(ep)).is_some_and(|t| t.is_empty()));
        }
    }
}
