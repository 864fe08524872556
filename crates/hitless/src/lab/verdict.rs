//! What a history of writes says about the pair: the longest outage, the epochs seen, and
//! whether two instances acknowledged writes at the same time (a split brain).
//!
//! **In-control overlap.** A *reign* is an instance at an epoch (the pair's control epoch
//! changes whenever control moves, so an instance that regains control starts a new reign).
//! A write is attributed to a reign when the `INFO`s sent just before and just after it on the
//! same connection both name that instance and epoch (a connection only ever moves forward,
//! from an old instance to a new one, so the write was answered there). A reign's interval
//! runs from the *reply* of its first acknowledged write to the *sending* of its last one:
//! the first was certainly processed no later than its reply came, the last no earlier than
//! it was sent, so the interval lies inside the time the reign really acknowledged, whatever
//! the client threads' delays. The overlap is the measure of the time covered by two or more
//! reigns' intervals; any overlap means two instances acknowledged writes interleaved in time.

use std::collections::BTreeSet;

use serde::Serialize;

use super::history::{History, Outcome, Record};

/// One reign's acknowledged writes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReignSpan {
    pub instance: String,
    pub epoch: u64,
    pub acks: u64,
    /// The reply of its first acknowledged write, in ms since the history's origin.
    pub first_ack_ms: f64,
    /// The sending of its last acknowledged write.
    pub last_ack_sent_ms: f64,
}

/// Each reign's interval, `[first reply, last send]` in ns (empty when the last send comes
/// before the first reply), with its acknowledged writes.
pub fn reign_intervals(h: &History) -> Vec<(usize, u64, u64, u64)> {
    let mut iv: Vec<Option<(u64, u64, u64)>> = vec![None; h.reigns.len()];
    for r in h.records.iter().filter(|r| r.outcome == Outcome::Acked) {
        let Some(i) = r.reign else { continue };
        let e = iv[i as usize].get_or_insert((u64::MAX, 0, 0));
        e.0 = e.0.min(r.done_ns);
        e.1 = e.1.max(r.sent_ns);
        e.2 += 1;
    }
    iv.into_iter()
        .enumerate()
        .filter_map(|(i, e)| e.map(|(a, b, n)| (i, a, b, n)))
        .collect()
}

/// The reigns that acknowledged writes, in order of their first acknowledgement.
pub fn reign_spans(h: &History) -> Vec<ReignSpan> {
    let mut spans: Vec<ReignSpan> = reign_intervals(h)
        .into_iter()
        .map(|(i, a, b, n)| ReignSpan {
            instance: h.reigns[i].instance.clone(),
            epoch: h.reigns[i].epoch,
            acks: n,
            first_ack_ms: a as f64 / 1e6,
            last_ack_sent_ms: b as f64 / 1e6,
        })
        .collect();
    spans.sort_by(|x, y| x.first_ack_ms.total_cmp(&y.first_ack_ms));
    spans
}

/// The measure (ns) of the time covered by two or more of `intervals` (`[start, end]`; an
/// interval whose end is not after its start covers nothing).
pub fn covered_twice_ns(intervals: &[(u64, u64)]) -> u64 {
    let mut edges: Vec<(u64, i32)> = intervals
        .iter()
        .filter(|(a, b)| b > a)
        .flat_map(|&(a, b)| [(a, 1), (b, -1)])
        .collect();
    // At one instant, ends before starts: touching intervals do not overlap.
    edges.sort_unstable();
    let mut depth = 0;
    let mut since = 0;
    let mut total = 0;
    for (t, d) in edges {
        if depth >= 2 {
            total += t - since;
        }
        depth += d;
        since = t;
    }
    total
}

/// The in-control overlap of a history, in ns (see the module's documentation).
pub fn in_control_overlap_ns(h: &History) -> u64 {
    let iv: Vec<(u64, u64)> = reign_intervals(h)
        .into_iter()
        .map(|(_, a, b, _)| (a, b))
        .collect();
    covered_twice_ns(&iv)
}

/// The longest time within `[from, to]` during which no write was acknowledged (by the
/// replies' times), as (length, start) in ns; the window's edges count as the ends of a gap;
/// the earliest of equally long ones.
pub fn longest_outage(records: &[Record], from: u64, to: u64) -> (u64, u64) {
    let mut acks: Vec<u64> = records
        .iter()
        .filter(|r| r.outcome == Outcome::Acked && r.done_ns >= from && r.done_ns <= to)
        .map(|r| r.done_ns)
        .collect();
    acks.sort_unstable();
    let mut last = from;
    let mut max = (0, from);
    for t in acks.into_iter().chain([to]) {
        let gap = t.saturating_sub(last);
        if gap > max.0 {
            max = (gap, last);
        }
        last = t;
    }
    max
}

/// The distinct epochs the answering instances named.
pub fn epochs(h: &History) -> Vec<u64> {
    h.reigns
        .iter()
        .map(|r| r.epoch)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Writes by outcome: (acknowledged, error, unknown).
pub fn counts(records: &[Record]) -> (u64, u64, u64) {
    let mut c = (0, 0, 0);
    for r in records {
        match r.outcome {
            Outcome::Acked => c.0 += 1,
            Outcome::Error => c.1 += 1,
            Outcome::Unknown => c.2 += 1,
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::history::{Op, ReignId};

    const MS: u64 = 1_000_000;

    fn w(reign: Option<u32>, sent_ms: u64, done_ms: u64, outcome: Outcome) -> Record {
        Record {
            client: 0,
            op: Op::Set,
            n: sent_ms,
            sent_ns: sent_ms * MS,
            done_ns: done_ms * MS,
            outcome,
            reign,
        }
    }

    fn history(records: Vec<Record>, reigns: usize) -> History {
        History {
            records,
            reigns: (0..reigns)
                .map(|i| ReignId {
                    instance: format!("i-{i}"),
                    epoch: i as u64 + 1,
                })
                .collect(),
            truncated: false,
        }
    }

    #[test]
    fn time_covered_by_two_or_more_intervals_is_counted_once() {
        assert_eq!(covered_twice_ns(&[]), 0);
        assert_eq!(covered_twice_ns(&[(0, 10)]), 0);
        // Touching, not overlapping.
        assert_eq!(covered_twice_ns(&[(0, 10), (10, 20)]), 0);
        assert_eq!(covered_twice_ns(&[(0, 10), (5, 20)]), 5);
        // Three deep over [5, 8]: still counted once; [2, 10] is covered twice or more.
        assert_eq!(covered_twice_ns(&[(0, 10), (5, 8), (2, 12)]), 8);
        // Empty intervals count for nothing.
        assert_eq!(covered_twice_ns(&[(0, 10), (6, 4)]), 0);
    }

    #[test]
    fn a_clean_failover_has_no_overlap_and_a_split_brain_has_one() {
        // Reign 0 acknowledges until 100 ms, reign 1 from 150 ms: no overlap, even when a
        // reply of reign 0 arrives late (sent at 90, answered at 200).
        let clean = history(
            vec![
                w(Some(0), 0, 2, Outcome::Acked),
                w(Some(0), 90, 200, Outcome::Acked),
                w(Some(1), 150, 152, Outcome::Acked),
                w(Some(1), 300, 301, Outcome::Acked),
                // Not acknowledged, or not attributed: ignored.
                w(Some(0), 400, 402, Outcome::Unknown),
                w(None, 250, 251, Outcome::Acked),
            ],
            2,
        );
        assert_eq!(in_control_overlap_ns(&clean), 0);
        let spans = reign_spans(&clean);
        assert_eq!(spans.len(), 2);
        assert_eq!(spans[0].acks, 2);
        assert_eq!(spans[0].last_ack_sent_ms, 90.0);
        // The old primary keeps acknowledging from 100 to 1000 ms while the new one does from
        // 400 ms: 600 ms of overlap.
        let split = history(
            vec![
                w(Some(0), 0, 1, Outcome::Acked),
                w(Some(0), 1000, 1001, Outcome::Acked),
                w(Some(1), 399, 400, Outcome::Acked),
                w(Some(1), 2000, 2001, Outcome::Acked),
            ],
            2,
        );
        assert_eq!(in_control_overlap_ns(&split), 600 * MS);
        assert_eq!(epochs(&split), vec![1, 2]);
    }

    #[test]
    fn the_longest_outage_counts_only_inside_the_window_and_up_to_its_edges() {
        let records = vec![
            w(None, 0, 10, Outcome::Acked),
            w(None, 20, 500, Outcome::Acked),
            w(None, 30, 2600, Outcome::Error),
            w(None, 700, 700, Outcome::Acked),
            w(None, 2000, 3000, Outcome::Acked),
        ];
        // Window [100, 2800]: acks at 500, 700; then nothing until the end at 2800.
        assert_eq!(longest_outage(&records, 100 * MS, 2800 * MS).0, 2100 * MS);
        // Window [0, 800]: the longest is 10 -> 500.
        assert_eq!(longest_outage(&records, 0, 800 * MS).0, 490 * MS);
        assert_eq!(longest_outage(&[], 0, 5 * MS).0, 5 * MS);
        // Where it starts: the last ack before it (or the window's start).
        assert_eq!(longest_outage(&records, 100 * MS, 2800 * MS).1, 700 * MS);
        assert_eq!(longest_outage(&records, 0, 800 * MS).1, 10 * MS);
        assert_eq!(longest_outage(&[], 3 * MS, 5 * MS), (2 * MS, 3 * MS));
        assert_eq!(counts(&records), (4, 1, 0));
    }
}
