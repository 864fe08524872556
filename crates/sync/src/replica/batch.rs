//! Batches in the wire format and the encoding of batch frames in a stream version.

use crate::store::Store;
use crate::wire::{self, BatchRef, FrameType, FrameWriter, MutationRef};
use crate::{Epoch, Mutation, Record, Schema, SchemaVersion, Seq, SyncError};

/// What `submit_inner` replicates.
pub(super) enum Input<'a> {
    /// Owned mutations and the index of each one's table.
    Owned(Vec<Mutation>, Vec<usize>),
    /// A batch already in the wire format.
    Encoded(&'a Batch),
}

/// A batch of mutations encoded in the wire format as it is built, for
/// [`Replica::apply_batch`] / [`Replica::submit_batch`]: building it copies
/// each key and value once into one buffer, which can be reused after
/// [`Batch::clear`].
///
/// [`Replica::apply_batch`]: crate::Replica::apply_batch
/// [`Replica::submit_batch`]: crate::Replica::submit_batch
#[derive(Clone, Debug)]
pub struct Batch {
    /// Mutation count (u32 LE), then the mutations.
    pub(super) buf: Vec<u8>,
    count: u32,
    /// Distinct table names, in first-use order.
    pub(super) tables: Vec<String>,
}

impl Default for Batch {
    fn default() -> Self {
        Batch::with_capacity(0)
    }
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty batch with room for `bytes` of encoded mutations.
    pub fn with_capacity(bytes: usize) -> Self {
        let mut buf = Vec::with_capacity(4 + bytes);
        buf.extend_from_slice(&0u32.to_le_bytes());
        Batch {
            buf,
            count: 0,
            tables: Vec::new(),
        }
    }

    /// Adds a put of `value` at `key` in `table`; fails, adding nothing, if
    /// a size exceeds the wire limits.
    pub fn put(&mut self, table: &str, key: &[u8], value: &[u8]) -> Result<(), SyncError> {
        self.push(table, key, Some(value))
    }

    /// Adds a delete of `key` in `table`; fails, adding nothing, if a size
    /// exceeds the wire limits.
    pub fn delete(&mut self, table: &str, key: &[u8]) -> Result<(), SyncError> {
        self.push(table, key, None)
    }

    fn push(&mut self, table: &str, key: &[u8], value: Option<&[u8]>) -> Result<(), SyncError> {
        let too = |what, len, limit| SyncError::TooLarge { what, len, limit };
        if table.len() > wire::MAX_TABLE_NAME {
            return Err(too("table name", table.len(), wire::MAX_TABLE_NAME));
        }
        if key.len() > wire::MAX_KEY {
            return Err(too("key", key.len(), wire::MAX_KEY));
        }
        if let Some(v) = value {
            if v.len() > wire::MAX_VALUE {
                return Err(too("value", v.len(), wire::MAX_VALUE));
            }
        }
        if self.count == u32::MAX {
            return Err(too("batch", self.count as usize, u32::MAX as usize - 1));
        }
        let known = match self.tables.last() {
            Some(t) if t.len() == table.len() && t == table => true,
            _ => self.tables.iter().any(|t| t == table),
        };
        if !known {
            self.tables.push(table.to_string());
        }
        wire::encode_mutation(&mut self.buf, table, key, value);
        self.count += 1;
        self.buf[..4].copy_from_slice(&self.count.to_le_bytes());
        Ok(())
    }

    /// Number of mutations.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// True if the batch holds no mutation.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Encoded size in bytes.
    pub fn encoded_len(&self) -> usize {
        self.buf.len()
    }

    /// Empties the batch, keeping its buffer.
    pub fn clear(&mut self) {
        self.buf.truncate(4);
        self.buf[..4].copy_from_slice(&0u32.to_le_bytes());
        self.count = 0;
        self.tables.clear();
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = MutationRef<'_>> {
        // Built by `push` only: well-formed by construction.
        BatchRef::trusted(&self.buf).iter()
    }

    /// The mutations as owned [`Mutation`]s.
    pub fn to_mutations(&self) -> Vec<Mutation> {
        self.iter()
            .map(|m| match m.value {
                Some(v) => Mutation::put(m.table, m.key, v),
                None => Mutation::delete(m.table, m.key),
            })
            .collect()
    }
}

pub(super) enum Converted {
    Put(String, Vec<u8>, Vec<u8>),
    Delete(String, Vec<u8>),
    Dropped,
}

pub(super) fn close_chunk(fw: &mut FrameWriter, count: u32) {
    let len = fw.open_payload_len();
    let buf = fw.payload();
    let at = buf.len() - len;
    buf[at..at + 4].copy_from_slice(&count.to_le_bytes());
    fw.finish();
}

pub(super) fn apply_converted(store: &mut Store, schema: &Schema, conv: Vec<Converted>) {
    for c in conv {
        match c {
            Converted::Put(t, k, v) => {
                if let Some(i) = store.index_of(&t) {
                    store.put(schema, i, &k, &v);
                }
            }
            Converted::Delete(t, k) => {
                if let Some(i) = store.index_of(&t) {
                    store.delete(i, &k);
                }
            }
            Converted::Dropped => {}
        }
    }
}

/// Encodes one batch frame of `muts` (sequences `first..=last`) in stream
/// version `sv`, converting from the native version when they differ.
pub(super) fn encode_batch(
    schema: &Schema,
    fw: &mut FrameWriter,
    epoch: Epoch,
    first: Seq,
    last: Seq,
    muts: &[Mutation],
    sv: SchemaVersion,
) -> Result<(), SyncError> {
    encode_frame_body(
        schema,
        fw,
        FrameType::Batch,
        epoch,
        None,
        first,
        last,
        muts,
        sv,
    )
}

/// Encodes a batch-shaped frame of type `kind`: the origin epoch if given
/// (replayed batches), the first sequence, then the mutations in `sv`.
#[allow(clippy::too_many_arguments)]
pub(super) fn encode_frame_body(
    schema: &Schema,
    fw: &mut FrameWriter,
    kind: FrameType,
    epoch: Epoch,
    origin: Option<Epoch>,
    first: Seq,
    last: Seq,
    muts: &[Mutation],
    sv: SchemaVersion,
) -> Result<(), SyncError> {
    let native = schema.version();
    fw.begin(kind, epoch, last);
    let p = fw.payload();
    if let Some(o) = origin {
        p.extend_from_slice(&o.0.to_le_bytes());
    }
    p.extend_from_slice(&first.to_le_bytes());
    let count_at = p.len();
    p.extend_from_slice(&0u32.to_le_bytes());
    let mut count = 0u32;
    for m in muts {
        if sv == native {
            match m {
                Mutation::Put { table, key, value } => {
                    wire::encode_mutation(fw.payload(), table, key, Some(value))
                }
                Mutation::Delete { table, key } => {
                    wire::encode_mutation(fw.payload(), table, key, None)
                }
            }
            count += 1;
        } else {
            let table = m.table();
            if !schema.has_table(sv, table) {
                continue;
            }
            match m {
                Mutation::Delete { key, .. } => {
                    wire::encode_mutation(fw.payload(), table, key, None)
                }
                Mutation::Put { key, value, .. } => {
                    let rec = Record::new(table, key.clone(), value.clone());
                    match schema.convert(&rec, native, sv)? {
                        Some(r) => {
                            wire::encode_mutation(fw.payload(), &r.table, &r.key, Some(&r.value))
                        }
                        None => wire::encode_mutation(fw.payload(), table, key, None),
                    }
                }
            }
            count += 1;
        }
        if fw.open_payload_len() > wire::MAX_PAYLOAD {
            let len = fw.open_payload_len();
            fw.abort();
            return Err(SyncError::TooLarge {
                what: "batch",
                len,
                limit: wire::MAX_PAYLOAD,
            });
        }
    }
    let p = fw.payload();
    p[count_at..count_at + 4].copy_from_slice(&count.to_le_bytes());
    fw.finish();
    Ok(())
}
