//! In-memory replicated state: named tables of byte keys to byte values.

use bytes::Bytes;
use hashbrown::hash_table::{Entry as Slot, HashTable};

use crate::hash::FastState;
use crate::{Digest, Record, Schema, SchemaVersion, TransformError};

#[derive(Clone, Debug)]
struct Entry {
    hash: u64,
    key: Bytes,
    value: Bytes,
}

/// One table of replicated state. Keys and values are reference-counted
/// [`Bytes`], so a consistent snapshot for a bulk transfer is a cheap clone.
/// Each entry keeps its key's hash (keyed per table, see the `hash` module),
/// so growing the table never reads the keys again.
#[derive(Clone, Debug, Default)]
pub struct Table {
    map: HashTable<Entry>,
    state: FastState,
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

    pub(crate) fn put(&mut self, key: Bytes, value: Bytes) {
        let h = self.state.hash_bytes(&key);
        match self
            .map
            .entry(h, |e| e.hash == h && e.key == key, |e| e.hash)
        {
            Slot::Occupied(mut o) => o.get_mut().value = value,
            Slot::Vacant(v) => {
                v.insert(Entry {
                    hash: h,
                    key,
                    value,
                });
            }
        }
    }

    /// Puts copies of `key` and `value`: the key is copied only if it is
    /// new, and an overwritten value of the same length that nothing else
    /// references is overwritten in place (no allocation either way).
    pub(crate) fn put_slice(&mut self, key: &[u8], value: &[u8]) {
        let h = self.state.hash_bytes(key);
        match self
            .map
            .entry(h, |e| e.hash == h && e.key == key, |e| e.hash)
        {
            Slot::Occupied(mut o) => {
                let e = o.get_mut();
                let old = std::mem::take(&mut e.value);
                e.value = reuse_or_copy(old, value);
            }
            Slot::Vacant(v) => {
                v.insert(Entry {
                    hash: h,
                    key: Bytes::copy_from_slice(key),
                    value: Bytes::copy_from_slice(value),
                });
            }
        }
    }

    pub(crate) fn delete(&mut self, key: &[u8]) {
        let h = self.state.hash_bytes(key);
        if let Ok(o) = self.map.find_entry(h, |e| e.hash == h && e.key == key) {
            o.remove();
        }
    }

    fn clear(&mut self) {
        self.map.clear();
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

/// All tables of one service's state, in its native schema version.
#[derive(Clone, Debug, Default)]
pub(crate) struct Store {
    /// Tables in declaration order (few: a linear search beats hashing).
    pub tables: Vec<(String, Table)>,
}

impl Store {
    pub fn new(tables: &[String]) -> Self {
        Store {
            tables: tables
                .iter()
                .map(|t| (t.clone(), Table::default()))
                .collect(),
        }
    }

    pub fn table_mut(&mut self, name: &str) -> Option<&mut Table> {
        self.tables
            .iter_mut()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
    }

    /// Index of table `name` in declaration order.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.tables.iter().position(|(n, _)| n == name)
    }

    pub fn table(&self, name: &str) -> Option<&Table> {
        self.tables.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    pub fn clear(&mut self) {
        for (_, t) in &mut self.tables {
            t.clear();
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

    /// Digest of the state as converted from `native` to `version`.
    pub fn digest_in(
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
        t.put_slice(b"k", b"aaaa");
        let p1 = t.get(b"k").unwrap().as_ptr();
        t.put_slice(b"k", b"bbbb");
        assert_eq!(t.get(b"k").unwrap().as_ref(), b"bbbb");
        assert_eq!(t.get(b"k").unwrap().as_ptr(), p1, "reused in place");
        // A reader holds the value: it must keep seeing the old bytes.
        let held = t.get(b"k").unwrap().clone();
        t.put_slice(b"k", b"cccc");
        assert_eq!(held.as_ref(), b"bbbb");
        assert_eq!(t.get(b"k").unwrap().as_ref(), b"cccc");
        // Another length: a fresh allocation.
        t.put_slice(b"k", b"dd");
        assert_eq!(t.get(b"k").unwrap().as_ref(), b"dd");
        assert_eq!(t.len(), 1);
        t.put(Bytes::from_static(b"s"), Bytes::from_static(b"static"));
        t.put_slice(b"s", b"STATIC");
        assert_eq!(t.get(b"s").unwrap().as_ref(), b"STATIC");
        t.delete(b"k");
        assert!(t.get(b"k").is_none());
    }
}
