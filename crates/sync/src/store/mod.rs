//! In-memory replicated state: named tables of byte keys to byte values.
//!
//! Nothing here copies the state or reads all of it at once: tables are
//! sharded ([`table`]), whole-state reads walk them in bounded steps with a
//! cursor, and the digest in a foreign version is kept per mutation and
//! built in steps ([`track`]).

mod table;
mod track;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::digest::record_hash;
use crate::{Digest, Record, Schema, SchemaVersion, TransformError};

pub(crate) use table::Cursor;
pub use table::Table;
use table::{Conv, Entry};
use track::Track;

/// All tables of one service's state, in its native schema version, with
/// its digest kept per mutation in the native version and in at most one
/// foreign (stream) version.
#[derive(Debug, Default)]
pub(crate) struct Store {
    /// Tables in declaration order (few: a linear search beats hashing).
    tables: Vec<(String, Table)>,
    track: Option<Track>,
    /// The tag of the last track started.
    last_tag: u32,
    /// Records converted to build digests in a foreign version, shared by
    /// every clone of the counter.
    scanned: Arc<AtomicU64>,
}

impl Store {
    pub fn new(tables: &[String]) -> Self {
        Store {
            tables: tables
                .iter()
                .map(|t| (t.clone(), Table::default()))
                .collect(),
            track: None,
            last_tag: 0,
            scanned: Arc::default(),
        }
    }

    /// Index of table `name` in declaration order.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.tables.iter().position(|(n, _)| n == name)
    }

    pub fn table(&self, name: &str) -> Option<&Table> {
        self.tables.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// The foreign version whose digest is kept (or being built), if any.
    pub fn tracked(&self) -> Option<SchemaVersion> {
        self.track.as_ref().map(|t| t.version)
    }

    /// Records converted so far to build digests in a foreign version.
    pub fn scanned(&self) -> u64 {
        self.scanned.load(Ordering::Relaxed)
    }

    /// Starts keeping the digest in `version` per mutation, replacing any
    /// other tracked version. Converts nothing here: unless the state is
    /// empty, the digest is complete only once [`Store::track_step`] has
    /// walked every entry. A transform failure ends tracking (the digest in
    /// `version` is then unavailable; [`Store::digest_scan`] reports why).
    pub fn track(&mut self, schema: &Schema, version: SchemaVersion) {
        if version == schema.version() || self.tracked() == Some(version) {
            return;
        }
        self.last_tag = self
            .last_tag
            .checked_add(1)
            .expect("fewer than 2^32 tracks");
        let empty = self.len() == 0;
        self.track = Some(Track::new(version, self.last_tag, empty));
    }

    /// Goes on building the tracked digest: converts at most `budget`
    /// records (and looks at a bounded number of buckets). Returns true once
    /// the digest is complete or nothing is tracked.
    pub fn track_step(&mut self, schema: &Schema, budget: usize) -> bool {
        let Some(mut t) = self.track.take() else {
            return true;
        };
        let Some(mut cur) = t.build else {
            self.track = Some(t);
            return true;
        };
        let native = schema.version();
        let mut converted = 0usize;
        let mut failed = false;
        let mut buckets = budget.saturating_mul(4).max(1024);
        let done = self.walk(&mut cur, &mut buckets, &mut |name, e| {
            if e.conv.tag == t.tag {
                return true;
            }
            converted += 1;
            let (k, v) = e.record();
            let rec = Record::new(name, k.to_vec(), v.to_vec());
            match schema.convert(&rec, native, t.version) {
                Ok(Some(out)) => {
                    let c = Conv {
                        table: t.intern(&out.table),
                        tag: t.tag,
                        hash: record_hash(&out.key, &out.value),
                    };
                    t.add(c);
                    e.conv = c;
                }
                Ok(None) => e.conv = Conv::dropped(t.tag),
                Err(_) => {
                    failed = true;
                    return false;
                }
            }
            converted < budget
        });
        self.scanned.fetch_add(converted as u64, Ordering::Relaxed);
        if failed {
            return true;
        }
        t.build = (!done).then_some(cur);
        self.track = Some(t);
        done
    }

    /// Walks every entry of every table from `cur` on (see [`Table::walk`]),
    /// with the table's name.
    fn walk(
        &mut self,
        cur: &mut Cursor,
        buckets: &mut usize,
        visit: &mut impl FnMut(&str, &mut Entry) -> bool,
    ) -> bool {
        while let Some((name, t)) = self.tables.get_mut(cur.table) {
            if !t.walk(cur, buckets, &mut |e| visit(name, e)) {
                return false;
            }
            cur.next_table();
        }
        true
    }

    /// Reads records from `cur` on for a bulk transfer, until `visit`
    /// returns false or `buckets` buckets were looked at. Returns true once
    /// every table was walked. Entries are visited at least once each if
    /// they stay from the start of the walk to its end (see [`table`]).
    pub fn scan(
        &mut self,
        cur: &mut Cursor,
        mut buckets: usize,
        mut visit: impl FnMut(&str, &[u8], &[u8]) -> bool,
    ) -> bool {
        self.walk(cur, &mut buckets, &mut |name, e| {
            let (k, v) = e.record();
            visit(name, k, v)
        })
    }

    /// The [`Conv`] of a record about to be put into table `idx`.
    fn conv_of(&mut self, schema: &Schema, idx: usize, key: &[u8], value: &[u8]) -> Conv {
        let Some(t) = self.track.as_mut() else {
            return Conv::UNTRACKED;
        };
        let rec = Record::new(self.tables[idx].0.clone(), key.to_vec(), value.to_vec());
        match schema.convert(&rec, schema.version(), t.version) {
            Ok(Some(out)) => Conv {
                table: t.intern(&out.table),
                tag: t.tag,
                hash: record_hash(&out.key, &out.value),
            },
            Ok(None) => Conv::dropped(t.tag),
            Err(_) => {
                // The tracked digest can no longer be kept: a scan reports
                // the failure when a digest in that version is asked for.
                self.track = None;
                Conv::UNTRACKED
            }
        }
    }

    fn settle(&mut self, old: Option<Conv>, new: Conv) {
        if let Some(t) = self.track.as_mut() {
            if let Some(old) = old {
                t.remove(old);
            }
            t.add(new);
        }
    }

    /// Puts copies of `key` and `value` into table `idx`.
    pub fn put(&mut self, schema: &Schema, idx: usize, key: &[u8], value: &[u8]) {
        let c = self.conv_of(schema, idx, key, value);
        let old = self.tables[idx].1.put(key, value, c);
        self.settle(old, c);
    }

    /// Deletes `key` from table `idx`.
    pub fn delete(&mut self, idx: usize, key: &[u8]) {
        let old = self.tables[idx].1.delete(key);
        if let (Some(t), Some(old)) = (self.track.as_mut(), old) {
            t.remove(old);
        }
    }

    pub fn clear(&mut self) {
        for (_, t) in &mut self.tables {
            t.clear();
        }
        if let Some(t) = self.track.as_mut() {
            t.reset();
        }
    }

    pub fn len(&self) -> usize {
        self.tables.iter().map(|(_, t)| t.len()).sum()
    }

    /// Every record as an owned [`Record`]: a copy of the whole state, for
    /// tests and inspection only.
    pub fn records(&self) -> Vec<Record> {
        let mut out = Vec::with_capacity(self.len());
        for (name, t) in &self.tables {
            for (k, v) in t.iter() {
                out.push(Record::new(name.clone(), k.to_vec(), v.to_vec()));
            }
        }
        out
    }

    /// Digest of the state in `version` from the digests kept per mutation,
    /// without reading any record: `None` unless `version` is the native one
    /// or the tracked one with its build complete.
    pub fn digest_kept(&self, schema: &Schema, version: SchemaVersion) -> Option<Digest> {
        if version == schema.version() {
            let mut d = Digest::default();
            for (name, t) in &self.tables {
                if !t.is_empty() {
                    let (count, sum) = t.sums();
                    d.tables
                        .insert(name.clone(), crate::TableDigest { count, sum });
                }
            }
            return Some(d);
        }
        self.track
            .as_ref()
            .filter(|t| t.version == version && t.complete())
            .map(Track::digest)
    }

    /// Digest of the state in `version` by converting and hashing every
    /// record at once (tests, and to name a transform failure).
    pub fn digest_scan(
        &self,
        schema: &Schema,
        native: SchemaVersion,
        version: SchemaVersion,
    ) -> Result<Digest, TransformError> {
        let mut d = Digest::default();
        for (name, t) in &self.tables {
            for (k, v) in t.iter() {
                if version == native {
                    d.add(name, k, v);
                } else {
                    let rec = Record::new(name.clone(), k.to_vec(), v.to_vec());
                    if let Some(out) = schema.convert(&rec, native, version)? {
                        d.add(&out.table, &out.key, &out.value);
                    }
                }
            }
        }
        Ok(d)
    }
}

#[cfg(test)]
mod kept_digest {
    use super::*;
    use proptest::prelude::*;

    /// v1: table "kv". v2: adds "meta" (dropped going down); "kv" values
    /// gain a "2:" prefix going up and lose it going down.
    fn schema() -> Schema {
        Schema::new("kept", 2)
            .table_in(1, "kv")
            .table_in(2, "kv")
            .table_in(2, "meta")
            .upgrade(1, |r: &Record| {
                Ok(Some(Record {
                    value: [b"2:".as_slice(), &r.value].concat(),
                    ..r.clone()
                }))
            })
            .downgrade(2, |r: &Record| {
                if r.table == "meta" {
                    return Ok(None);
                }
                match r.value.strip_prefix(b"2:") {
                    Some(v) => Ok(Some(Record {
                        value: v.to_vec(),
                        ..r.clone()
                    })),
                    None => Err("value lacks the 2: prefix".into()),
                }
            })
    }

    #[derive(Clone, Debug)]
    enum Op {
        Put(usize, u8, Vec<u8>),
        Delete(usize, u8),
        Clear,
        /// One step of building the tracked digest, of this many records.
        Step(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        let val = proptest::collection::vec(any::<u8>(), 0..6);
        prop_oneof![
            12 => (0..2usize, 0..16u8, val).prop_map(|(t, k, v)| Op::Put(t, k, v)),
            4 => (0..2usize, 0..16u8).prop_map(|(t, k)| Op::Delete(t, k)),
            1 => Just(Op::Clear),
            3 => (1..4usize).prop_map(Op::Step),
        ]
    }

    fn kv_value(t: usize, v: Vec<u8>) -> Vec<u8> {
        if t == 0 {
            [b"2:".as_slice(), &v].concat()
        } else {
            v
        }
    }

    proptest! {
        #[test]
        fn kept_digests_equal_full_scans(
            ops in proptest::collection::vec(op(), 0..120),
            track_at in 0..120usize,
        ) {
            let schema = schema();
            let mut s = Store::new(schema.tables());
            for (i, o) in ops.into_iter().enumerate() {
                if i == track_at {
                    s.track(&schema, 1);
                }
                match o {
                    Op::Put(t, k, v) => s.put(&schema, t, &[k], &kv_value(t, v)),
                    Op::Delete(t, k) => s.delete(t, &[k]),
                    Op::Clear => s.clear(),
                    Op::Step(n) => {
                        s.track_step(&schema, n);
                    }
                }
                for v in [2, 1] {
                    if let Some(kept) = s.digest_kept(&schema, v) {
                        prop_assert_eq!(kept, s.digest_scan(&schema, 2, v).unwrap(), "version {}", v);
                    }
                }
            }
            s.track(&schema, 1);
            prop_assert_eq!(s.tracked(), Some(1));
            let mut steps = 0;
            while !s.track_step(&schema, 2) {
                steps += 1;
                prop_assert!(steps <= 64, "a build of at most 32 records ends");
            }
            let base = s.scanned();
            prop_assert_eq!(s.digest_kept(&schema, 1).unwrap(), s.digest_scan(&schema, 2, 1).unwrap());
            prop_assert_eq!(s.digest_kept(&schema, 2).unwrap(), s.digest_scan(&schema, 2, 2).unwrap());
            // Kept digests read no record.
            prop_assert_eq!(s.scanned(), base);
        }
    }

    #[test]
    fn a_digest_tracked_on_a_full_store_is_complete_only_after_its_build() {
        let schema = schema();
        let mut s = Store::new(schema.tables());
        for i in 0..5000u32 {
            s.put(&schema, 0, &i.to_le_bytes(), b"2:v");
        }
        s.track(&schema, 1);
        assert_eq!(s.scanned(), 0, "starting a track converts nothing");
        assert!(s.digest_kept(&schema, 1).is_none(), "incomplete");
        let mut steps = 0;
        while !s.track_step(&schema, 100) {
            steps += 1;
            // Writes between steps, ahead of and behind the cursor.
            let k = (steps * 37 % 5000) as u32;
            s.put(&schema, 0, &k.to_le_bytes(), b"2:changed");
            s.delete(0, &((k + 1) % 5000).to_le_bytes());
            s.put(&schema, 0, &(10_000 + steps as u32).to_le_bytes(), b"2:new");
            assert!(s.digest_kept(&schema, 1).is_none());
        }
        assert!(steps >= 49, "bounded steps: {steps}");
        assert!(s.scanned() <= 5000 + steps as u64 * 3);
        assert_eq!(
            s.digest_kept(&schema, 1).unwrap(),
            s.digest_scan(&schema, 2, 1).unwrap()
        );
    }

    #[test]
    fn a_failing_transform_stops_tracking_and_the_scan_reports_it() {
        let schema = schema();
        let mut s = Store::new(schema.tables());
        s.track(&schema, 1);
        s.put(&schema, 0, b"k", b"2:ok");
        assert_eq!(s.tracked(), Some(1));
        s.put(&schema, 0, b"bad", b"no prefix");
        assert_eq!(s.tracked(), None, "an unconvertible record ends tracking");
        assert!(s.digest_kept(&schema, 1).is_none());
        assert!(s.digest_scan(&schema, 2, 1).is_err());
        // The native digest is unaffected.
        assert_eq!(
            s.digest_kept(&schema, 2).unwrap(),
            s.digest_scan(&schema, 2, 2).unwrap()
        );
    }
}
