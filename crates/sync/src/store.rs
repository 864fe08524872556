//! In-memory replicated state: named tables of byte keys to byte values.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use hashbrown::hash_table::{Entry as Slot, HashTable};

use crate::digest::record_hash;
use crate::hash::FastState;
use crate::{Digest, Record, Schema, SchemaVersion, TableDigest, TransformError};

/// An entry's share of the digest in the tracked foreign version: the index
/// of the table its converted record lands in (`NONE`: dropped by the
/// conversion, or nothing tracked) and the converted record's hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Conv {
    table: u32,
    hash: u64,
}

impl Conv {
    pub(crate) const NONE: Conv = Conv {
        table: u32::MAX,
        hash: 0,
    };
}

#[derive(Clone, Debug)]
struct Entry {
    hash: u64,
    key: Bytes,
    value: Bytes,
    /// Hash of the record in the native version (see [`record_hash`]).
    rh: u64,
    conv: Conv,
}

/// One table of replicated state. Keys and values are reference-counted
/// [`Bytes`], so a consistent snapshot for a bulk transfer is a cheap clone.
/// Each entry keeps its key's hash (keyed per table, see the `hash` module),
/// so growing the table never reads the keys again, and its record hash, so
/// the table's digest is kept up to date on every mutation.
#[derive(Clone, Debug, Default)]
pub struct Table {
    map: HashTable<Entry>,
    state: FastState,
    /// Wrapping sum of the entries' record hashes.
    sum: u64,
}

impl Table {
    /// The value at `key`.
    pub fn get(&self, key: &[u8]) -> Option<&Bytes> {
        let h = self.state.hash_bytes(key);
        self.map
            .find(h, |e| e.hash == h && e.key == key)
            .map(|e| &e.value)
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True if the table is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// All records, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&Bytes, &Bytes)> {
        self.map.iter().map(|e| (&e.key, &e.value))
    }

    /// Digest of this table in the native version, kept per mutation.
    fn digest(&self) -> TableDigest {
        TableDigest {
            count: self.map.len() as u64,
            sum: self.sum,
        }
    }

    /// Puts `key` = `value`; returns the replaced entry's [`Conv`].
    pub(crate) fn put(&mut self, key: Bytes, value: Bytes, conv: Conv) -> Option<Conv> {
        let h = self.state.hash_bytes(&key);
        let rh = record_hash(&key, &value);
        match self
            .map
            .entry(h, |e| e.hash == h && e.key == key, |e| e.hash)
        {
            Slot::Occupied(mut o) => {
                let e = o.get_mut();
                self.sum = self.sum.wrapping_sub(e.rh).wrapping_add(rh);
                e.value = value;
                e.rh = rh;
                Some(std::mem::replace(&mut e.conv, conv))
            }
            Slot::Vacant(v) => {
                self.sum = self.sum.wrapping_add(rh);
                v.insert(Entry {
                    hash: h,
                    key,
                    value,
                    rh,
                    conv,
                });
                None
            }
        }
    }

    /// Puts copies of `key` and `value`: the key is copied only if it is
    /// new, and an overwritten value of the same length that nothing else
    /// references is overwritten in place (no allocation either way).
    /// Returns the replaced entry's [`Conv`].
    pub(crate) fn put_slice(&mut self, key: &[u8], value: &[u8], conv: Conv) -> Option<Conv> {
        let h = self.state.hash_bytes(key);
        let rh = record_hash(key, value);
        match self
            .map
            .entry(h, |e| e.hash == h && e.key == key, |e| e.hash)
        {
            Slot::Occupied(mut o) => {
                let e = o.get_mut();
                self.sum = self.sum.wrapping_sub(e.rh).wrapping_add(rh);
                let old = std::mem::take(&mut e.value);
                e.value = reuse_or_copy(old, value);
                e.rh = rh;
                Some(std::mem::replace(&mut e.conv, conv))
            }
            Slot::Vacant(v) => {
                self.sum = self.sum.wrapping_add(rh);
                v.insert(Entry {
                    hash: h,
                    key: Bytes::copy_from_slice(key),
                    value: Bytes::copy_from_slice(value),
                    rh,
                    conv,
                });
                None
            }
        }
    }

    /// Deletes `key`; returns the removed entry's [`Conv`].
    pub(crate) fn delete(&mut self, key: &[u8]) -> Option<Conv> {
        let h = self.state.hash_bytes(key);
        let o = self
            .map
            .find_entry(h, |e| e.hash == h && e.key == key)
            .ok()?;
        let (e, _) = o.remove();
        self.sum = self.sum.wrapping_sub(e.rh);
        Some(e.conv)
    }

    fn clear(&mut self) {
        self.map.clear();
        self.sum = 0;
    }
}

/// `v` as [`Bytes`], in `old`'s allocation when that is possible.
fn reuse_or_copy(old: Bytes, v: &[u8]) -> Bytes {
    if old.len() == v.len() && !v.is_empty() {
        if let Ok(mut m) = old.try_into_mut() {
            m.copy_from_slice(v);
            return m.freeze();
        }
    }
    Bytes::copy_from_slice(v)
}

/// The digest of the state as converted to one foreign version, kept per
/// mutation: each entry remembers where its converted record went and that
/// record's hash, so an overwrite or delete subtracts it without converting
/// the old record again.
#[derive(Clone, Debug)]
struct Track {
    version: SchemaVersion,
    /// Tables of the converted records, by first appearance.
    names: Vec<String>,
    /// Digest of each table in `names`.
    sums: Vec<TableDigest>,
}

impl Track {
    fn add(&mut self, c: Conv) {
        if let Some(d) = self.sums.get_mut(c.table as usize) {
            d.count += 1;
            d.sum = d.sum.wrapping_add(c.hash);
        }
    }

    fn remove(&mut self, c: Conv) {
        if let Some(d) = self.sums.get_mut(c.table as usize) {
            d.count -= 1;
            d.sum = d.sum.wrapping_sub(c.hash);
        }
    }

    fn intern(&mut self, table: &str) -> u32 {
        match self.names.iter().position(|n| n == table) {
            Some(i) => i as u32,
            None => {
                self.names.push(table.to_string());
                self.sums.push(TableDigest::default());
                (self.names.len() - 1) as u32
            }
        }
    }

    fn digest(&self) -> Digest {
        let mut d = Digest::default();
        for (n, s) in self.names.iter().zip(&self.sums) {
            if s.count > 0 {
                d.tables.insert(n.clone(), *s);
            }
        }
        d
    }
}

/// All tables of one service's state, in its native schema version, with
/// its digest kept per mutation in the native version and in at most one
/// foreign (stream) version.
#[derive(Clone, Debug, Default)]
pub(crate) struct Store {
    /// Tables in declaration order (few: a linear search beats hashing).
    tables: Vec<(String, Table)>,
    track: Option<Track>,
    /// Records read by full-state digest scans, shared by every clone.
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
            scanned: Arc::default(),
        }
    }

    /// Tables in declaration order.
    pub fn tables(&self) -> &[(String, Table)] {
        &self.tables
    }

    /// Index of table `name` in declaration order.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.tables.iter().position(|(n, _)| n == name)
    }

    pub fn table(&self, name: &str) -> Option<&Table> {
        self.tables.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// The foreign version whose digest is kept per mutation, if any.
    pub fn tracked(&self) -> Option<SchemaVersion> {
        self.track.as_ref().map(|t| t.version)
    }

    /// Records read by full-state digest scans so far (by this store and
    /// every clone of it).
    pub fn scanned(&self) -> u64 {
        self.scanned.load(Ordering::Relaxed)
    }

    /// Starts keeping the digest in `version` per mutation (replacing any
    /// other tracked version). Converts every record once: call it while the
    /// state is empty or small. A transform failure leaves nothing tracked
    /// (digests in `version` are then computed by a scan, which reports it).
    pub fn track(&mut self, schema: &Schema, version: SchemaVersion) {
        let native = schema.version();
        if version == native || self.tracked() == Some(version) {
            return;
        }
        let mut t = Track {
            version,
            names: Vec::new(),
            sums: Vec::new(),
        };
        self.track = None;
        let n = self.len() as u64;
        for (name, table) in &mut self.tables {
            for e in table.map.iter_mut() {
                let rec = Record::new(name.clone(), e.key.to_vec(), e.value.to_vec());
                match schema.convert(&rec, native, version) {
                    Ok(Some(out)) => {
                        let c = Conv {
                            table: t.intern(&out.table),
                            hash: record_hash(&out.key, &out.value),
                        };
                        t.add(c);
                        e.conv = c;
                    }
                    Ok(None) => e.conv = Conv::NONE,
                    Err(_) => {
                        self.scanned.fetch_add(n, Ordering::Relaxed);
                        return;
                    }
                }
            }
        }
        self.scanned.fetch_add(n, Ordering::Relaxed);
        self.track = Some(t);
    }

    /// The [`Conv`] of a record about to be put into table `idx`.
    fn conv_of(&mut self, schema: &Schema, idx: usize, key: &[u8], value: &[u8]) -> Conv {
        let Some(t) = self.track.as_mut() else {
            return Conv::NONE;
        };
        let rec = Record::new(self.tables[idx].0.clone(), key.to_vec(), value.to_vec());
        match schema.convert(&rec, schema.version(), t.version) {
            Ok(Some(out)) => Conv {
                table: t.intern(&out.table),
                hash: record_hash(&out.key, &out.value),
            },
            Ok(None) => Conv::NONE,
            Err(_) => {
                // The tracked digest can no longer be kept: a scan computes
                // (and reports the failure of) the next digest in it.
                self.track = None;
                Conv::NONE
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

    /// Puts `key` = `value` into table `idx`.
    pub fn put(&mut self, schema: &Schema, idx: usize, key: Bytes, value: Bytes) {
        let c = self.conv_of(schema, idx, &key, &value);
        let old = self.tables[idx].1.put(key, value, c);
        self.settle(old, c);
    }

    /// Puts copies of `key` and `value` into table `idx`.
    pub fn put_slice(&mut self, schema: &Schema, idx: usize, key: &[u8], value: &[u8]) {
        let c = self.conv_of(schema, idx, key, value);
        let old = self.tables[idx].1.put_slice(key, value, c);
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
            t.names.clear();
            t.sums.clear();
        }
    }

    pub fn len(&self) -> usize {
        self.tables.iter().map(|(_, t)| t.len()).sum()
    }

    /// Every record as an owned [`Record`].
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
    /// without reading any record: `None` unless `version` is the native or
    /// the tracked one.
    pub fn digest_kept(&self, schema: &Schema, version: SchemaVersion) -> Option<Digest> {
        if version == schema.version() {
            let mut d = Digest::default();
            for (name, t) in &self.tables {
                if !t.is_empty() {
                    d.tables.insert(name.clone(), t.digest());
                }
            }
            return Some(d);
        }
        self.track
            .as_ref()
            .filter(|t| t.version == version)
            .map(Track::digest)
    }

    /// Digest of the state as converted from `native` to `version`: the kept
    /// one when there is one, else by converting and hashing every record.
    pub fn digest_in(
        &self,
        schema: &Schema,
        native: SchemaVersion,
        version: SchemaVersion,
    ) -> Result<Digest, TransformError> {
        if native == schema.version() {
            if let Some(d) = self.digest_kept(schema, version) {
                return Ok(d);
            }
        }
        self.scanned.fetch_add(self.len() as u64, Ordering::Relaxed);
        self.digest_scan(schema, native, version)
    }

    /// Digest of the state in `version` by converting and hashing every record.
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
mod tests {
    use super::*;

    #[test]
    fn put_slice_overwrites_in_place_only_when_nothing_else_holds_the_value() {
        let mut t = Table::default();
        t.put_slice(b"k", b"aaaa", Conv::NONE);
        let p1 = t.get(b"k").unwrap().as_ptr();
        t.put_slice(b"k", b"bbbb", Conv::NONE);
        assert_eq!(t.get(b"k").unwrap().as_ref(), b"bbbb");
        assert_eq!(t.get(b"k").unwrap().as_ptr(), p1, "reused in place");
        // A reader holds the value: it must keep seeing the old bytes.
        let held = t.get(b"k").unwrap().clone();
        t.put_slice(b"k", b"cccc", Conv::NONE);
        assert_eq!(held.as_ref(), b"bbbb");
        assert_eq!(t.get(b"k").unwrap().as_ref(), b"cccc");
        // Another length: a fresh allocation.
        t.put_slice(b"k", b"dd", Conv::NONE);
        assert_eq!(t.get(b"k").unwrap().as_ref(), b"dd");
        assert_eq!(t.len(), 1);
        t.put(
            Bytes::from_static(b"s"),
            Bytes::from_static(b"static"),
            Conv::NONE,
        );
        t.put_slice(b"s", b"STATIC", Conv::NONE);
        assert_eq!(t.get(b"s").unwrap().as_ref(), b"STATIC");
        t.delete(b"k");
        assert!(t.get(b"k").is_none());
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
        PutSlice(usize, u8, Vec<u8>),
        Delete(usize, u8),
        Clear,
    }

    fn op() -> impl Strategy<Value = Op> {
        let val = proptest::collection::vec(any::<u8>(), 0..6);
        prop_oneof![
            6 => (0..2usize, 0..16u8, val.clone()).prop_map(|(t, k, v)| Op::Put(t, k, v)),
            6 => (0..2usize, 0..16u8, val).prop_map(|(t, k, v)| Op::PutSlice(t, k, v)),
            4 => (0..2usize, 0..16u8).prop_map(|(t, k)| Op::Delete(t, k)),
            1 => Just(Op::Clear),
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
            ops in proptest::collection::vec(op(), 0..80),
            track_at in 0..80usize,
        ) {
            let schema = schema();
            let mut s = Store::new(schema.tables());
            for (i, o) in ops.into_iter().enumerate() {
                if i == track_at {
                    s.track(&schema, 1);
                }
                match o {
                    Op::Put(t, k, v) => s.put(
                        &schema,
                        t,
                        Bytes::from(vec![k]),
                        Bytes::from(kv_value(t, v)),
                    ),
                    Op::PutSlice(t, k, v) => s.put_slice(&schema, t, &[k], &kv_value(t, v)),
                    Op::Delete(t, k) => s.delete(t, &[k]),
                    Op::Clear => s.clear(),
                }
                for v in [2, 1] {
                    if let Some(kept) = s.digest_kept(&schema, v) {
                        prop_assert_eq!(kept, s.digest_scan(&schema, 2, v).unwrap(), "version {}", v);
                    }
                }
            }
            s.track(&schema, 1);
            prop_assert_eq!(s.tracked(), Some(1));
            let base = s.scanned();
            prop_assert_eq!(s.digest_in(&schema, 2, 1).unwrap(), s.digest_scan(&schema, 2, 1).unwrap());
            prop_assert_eq!(s.digest_in(&schema, 2, 2).unwrap(), s.digest_scan(&schema, 2, 2).unwrap());
            // Kept digests read no record.
            prop_assert_eq!(s.scanned(), base);
        }
    }

    #[test]
    fn a_failing_transform_stops_tracking_and_the_scan_reports_it() {
        let schema = schema();
        let mut s = Store::new(schema.tables());
        s.track(&schema, 1);
        s.put_slice(&schema, 0, b"k", b"2:ok");
        assert_eq!(s.tracked(), Some(1));
        s.put_slice(&schema, 0, b"bad", b"no prefix");
        assert_eq!(s.tracked(), None, "an unconvertible record ends tracking");
        assert!(s.digest_kept(&schema, 1).is_none());
        assert!(s.digest_in(&schema, 2, 1).is_err());
        assert_eq!(s.scanned(), 2);
        // The native digest is unaffected.
        assert_eq!(
            s.digest_kept(&schema, 2).unwrap(),
            s.digest_scan(&schema, 2, 2).unwrap()
        );
    }
}
