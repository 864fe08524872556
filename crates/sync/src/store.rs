//! In-memory replicated state: named tables of byte keys to byte values.

use std::collections::HashMap;

use bytes::Bytes;

use crate::{Digest, Record, Schema, SchemaVersion, TransformError};

/// One table of replicated state. Keys and values are reference-counted
/// [`Bytes`], so a consistent snapshot for a bulk transfer is a cheap clone.
#[derive(Clone, Debug, Default)]
pub struct Table {
    map: HashMap<Bytes, Bytes>,
}

impl Table {
    /// The value at `key`.
    pub fn get(&self, key: &[u8]) -> Option<&Bytes> {
        self.map.get(key)
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
        self.map.iter()
    }

    pub(crate) fn put(&mut self, key: Bytes, value: Bytes) {
        self.map.insert(key, value);
    }

    pub(crate) fn delete(&mut self, key: &[u8]) {
        self.map.remove(key);
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

    pub fn table(&self, name: &str) -> Option<&Table> {
        self.tables.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    pub fn clear(&mut self) {
        for (_, t) in &mut self.tables {
            t.map.clear();
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
