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
