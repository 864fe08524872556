//! The replicated schema of kvd: value encodings of schema versions 1 and 2 and the
//! transforms between them.
//!
//! State lives in five tables, one per Redis type: `strings`, `lists`, `sets`, `hashes`,
//! `zsets`, each keyed by the Redis key. Both versions have the same tables; the value
//! encoding differs.
//!
//! Version 1 (all integers big-endian):
//! * strings: the raw value bytes;
//! * lists: each element as `u32 length` + bytes, head first;
//! * sets: each member as `u32 length` + bytes, in ascending byte order;
//! * hashes: each field then its value, both length-prefixed, fields ascending;
//! * zsets: each entry as `f64 score` (IEEE bits) + length-prefixed member, ordered by
//!   (score, member).
//!
//! Version 2 frames every value with per-key metadata:
//! `"K2"`, `u8 type tag`, `u64 created_seq`, `u64 updated_seq`, `u64 version`, then the
//! payload: raw bytes for strings, else `u32 count` followed by the version-1 item encoding.
//! Upgrading a version-1 record yields metadata 0/0/0 ("unknown, predates version 2");
//! downgrading drops the metadata, so version 1 -> 2 -> 1 is the identity.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use hitless_sync::{Record, Schema};

/// Service name of kvd's replicated state.
pub const SERVICE: &str = "kv";

/// Table of string values.
pub const STRINGS: &str = "strings";
/// Table of lists.
pub const LISTS: &str = "lists";
/// Table of sets.
pub const SETS: &str = "sets";
/// Table of hashes.
pub const HASHES: &str = "hashes";
/// Table of sorted sets.
pub const ZSETS: &str = "zsets";
/// All tables, in declaration order.
pub const TABLES: [&str; 5] = [STRINGS, LISTS, SETS, HASHES, ZSETS];

const V2_MAGIC: &[u8; 2] = b"K2";
const V2_HEADER: usize = 2 + 1 + 8 * 3;

/// The schema version a kvd binary stores natively.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemaVersion {
    /// Raw strings, unframed collections.
    V1,
    /// Framed values with per-key metadata.
    V2,
}

impl SchemaVersion {
    /// The numeric version used on the replication wire.
    pub fn number(self) -> u32 {
        match self {
            SchemaVersion::V1 => 1,
            SchemaVersion::V2 => 2,
        }
    }

    /// The replication schema this build declares. Version 1 knows only itself; version 2
    /// registers the upgrade from 1 and the downgrade to 1, so a version-2 instance can feed
    /// and follow a version-1 one in both directions.
    pub fn schema(self) -> Schema {
        let mut s = Schema::new(SERVICE, self.number());
        for t in TABLES {
            s = s.table(t);
        }
        if self == SchemaVersion::V2 {
            for t in TABLES {
                s = s.table_in(1, t);
            }
            s = s.upgrade(1, upgrade_record).downgrade(2, downgrade_record);
        }
        s
    }
}

/// The type of a stored value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A string.
    String,
    /// A list.
    List,
    /// A set.
    Set,
    /// A hash.
    Hash,
    /// A sorted set.
    ZSet,
}

impl Kind {
    /// The table holding values of this kind.
    pub fn table(self) -> &'static str {
        match self {
            Kind::String => STRINGS,
            Kind::List => LISTS,
            Kind::Set => SETS,
            Kind::Hash => HASHES,
            Kind::ZSet => ZSETS,
        }
    }

    /// The kind stored in `table`.
    pub fn of_table(table: &str) -> Option<Kind> {
        Some(match table {
            STRINGS => Kind::String,
            LISTS => Kind::List,
            SETS => Kind::Set,
            HASHES => Kind::Hash,
            ZSETS => Kind::ZSet,
            _ => return None,
        })
    }

    fn tag(self) -> u8 {
        match self {
            Kind::String => 1,
            Kind::List => 2,
            Kind::Set => 3,
            Kind::Hash => 4,
            Kind::ZSet => 5,
        }
    }

    fn from_tag(t: u8) -> Option<Kind> {
        Some(match t {
            1 => Kind::String,
            2 => Kind::List,
            3 => Kind::Set,
            4 => Kind::Hash,
            5 => Kind::ZSet,
            _ => return None,
        })
    }
}

/// A decoded value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// String bytes.
    Str(Vec<u8>),
    /// List elements, head first.
    List(VecDeque<Vec<u8>>),
    /// Set members.
    Set(BTreeSet<Vec<u8>>),
    /// Hash fields and values.
    Hash(BTreeMap<Vec<u8>, Vec<u8>>),
    /// Sorted-set members and their scores (never NaN).
    ZSet(BTreeMap<Vec<u8>, f64>),
}

impl Value {
    /// The kind of this value.
    pub fn kind(&self) -> Kind {
        match self {
            Value::Str(_) => Kind::String,
            Value::List(_) => Kind::List,
            Value::Set(_) => Kind::Set,
            Value::Hash(_) => Kind::Hash,
            Value::ZSet(_) => Kind::ZSet,
        }
    }

    /// True for an empty collection (which Redis semantics delete).
    pub fn is_empty_collection(&self) -> bool {
        match self {
            Value::Str(_) => false,
            Value::List(l) => l.is_empty(),
            Value::Set(s) => s.is_empty(),
            Value::Hash(h) => h.is_empty(),
            Value::ZSet(z) => z.is_empty(),
        }
    }
}

/// Per-key metadata kept by version 2.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Meta {
    /// Sequence of the write that created the key (0: unknown).
    pub created_seq: u64,
    /// Sequence of the last write to the key (0: unknown).
    pub updated_seq: u64,
    /// Number of writes to the key since creation (0: unknown).
    pub version: u64,
}

/// A stored value failed to decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stored value in table {table} is malformed: {reason}")]
pub struct DecodeError {
    /// The table.
    pub table: String,
    /// What is wrong.
    pub reason: String,
}

fn derr(table: &str, reason: impl Into<String>) -> DecodeError {
    DecodeError {
        table: table.to_string(),
        reason: reason.into(),
    }
}

fn put_item(out: &mut Vec<u8>, item: &[u8]) {
    out.extend_from_slice(&(item.len() as u32).to_be_bytes());
    out.extend_from_slice(item);
}

struct Cursor<'a> {
    buf: &'a [u8],
    table: &'a str,
}

impl<'a> Cursor<'a> {
    fn done(&self) -> bool {
        self.buf.is_empty()
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(derr(
                self.table,
                format!("needs {n} more bytes, {} left", self.buf.len()),
            ));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        Ok(u64::from_be_bytes(b.try_into().expect("8 bytes")))
    }
    fn item(&mut self) -> Result<Vec<u8>, DecodeError> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn score(&mut self) -> Result<f64, DecodeError> {
        let s = f64::from_bits(self.u64()?);
        if s.is_nan() {
            return Err(derr(self.table, "sorted-set score is NaN"));
        }
        Ok(s)
    }
}

/// Encodes the items of a collection (no count); strings are raw.
fn encode_items(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Str(s) => out.extend_from_slice(s),
        Value::List(l) => l.iter().for_each(|i| put_item(out, i)),
        Value::Set(s) => s.iter().for_each(|i| put_item(out, i)),
        Value::Hash(h) => h.iter().for_each(|(f, v)| {
            put_item(out, f);
            put_item(out, v);
        }),
        Value::ZSet(z) => {
            for (m, s) in zset_sorted(z) {
                out.extend_from_slice(&s.to_bits().to_be_bytes());
                put_item(out, m);
            }
        }
    }
}

/// Sorted-set entries ordered by (score, member).
pub fn zset_sorted(z: &BTreeMap<Vec<u8>, f64>) -> Vec<(&Vec<u8>, f64)> {
    let mut v: Vec<(&Vec<u8>, f64)> = z.iter().map(|(m, s)| (m, *s)).collect();
    v.sort_by(|a, b| a.1.total_cmp(&b.1).then_with(|| a.0.cmp(b.0)));
    v
}

fn item_count(v: &Value) -> usize {
    match v {
        Value::Str(_) => 0,
        Value::List(l) => l.len(),
        Value::Set(s) => s.len(),
        Value::Hash(h) => h.len(),
        Value::ZSet(z) => z.len(),
    }
}

/// Decodes items of `kind` until the cursor is empty (`count: None`) or `count` items.
fn decode_items(kind: Kind, c: &mut Cursor<'_>, count: Option<u32>) -> Result<Value, DecodeError> {
    let table = c.table;
    let more = |c: &Cursor<'_>, n: u32| match count {
        Some(total) => n < total,
        None => !c.done(),
    };
    let mut n = 0u32;
    let v = match kind {
        Kind::String => Value::Str(c.take(c.buf.len())?.to_vec()),
        Kind::List => {
            let mut l = VecDeque::new();
            while more(c, n) {
                l.push_back(c.item()?);
                n += 1;
            }
            Value::List(l)
        }
        Kind::Set => {
            let mut s = BTreeSet::new();
            while more(c, n) {
                let m = c.item()?;
                if s.last().is_some_and(|last| *last >= m) {
                    return Err(derr(table, "set members are not strictly ascending"));
                }
                s.insert(m);
                n += 1;
            }
            Value::Set(s)
        }
        Kind::Hash => {
            let mut h = BTreeMap::new();
            while more(c, n) {
                let f = c.item()?;
                let v = c.item()?;
                if h.last_key_value().is_some_and(|(last, _)| *last >= f) {
                    return Err(derr(table, "hash fields are not strictly ascending"));
                }
                h.insert(f, v);
                n += 1;
            }
            Value::Hash(h)
        }
        Kind::ZSet => {
            let mut z = BTreeMap::new();
            let mut prev: Option<(f64, Vec<u8>)> = None;
            while more(c, n) {
                let s = c.score()?;
                let m = c.item()?;
                if let Some((ps, pm)) = &prev {
                    if ps.total_cmp(&s).then_with(|| pm.cmp(&m)) != std::cmp::Ordering::Less {
                        return Err(derr(table, "sorted-set entries are not strictly ordered"));
                    }
                }
                prev = Some((s, m.clone()));
                if z.insert(m, s).is_some() {
                    return Err(derr(table, "sorted-set member appears twice"));
                }
                n += 1;
            }
            Value::ZSet(z)
        }
    };
    if !c.done() {
        return Err(derr(table, format!("{} trailing bytes", c.buf.len())));
    }
    Ok(v)
}

/// Encodes `value` in schema `version` (metadata is dropped by version 1).
pub fn encode(version: SchemaVersion, value: &Value, meta: Meta) -> Vec<u8> {
    let mut out = Vec::new();
    match version {
        SchemaVersion::V1 => encode_items(value, &mut out),
        SchemaVersion::V2 => {
            out.extend_from_slice(V2_MAGIC);
            out.push(value.kind().tag());
            out.extend_from_slice(&meta.created_seq.to_be_bytes());
            out.extend_from_slice(&meta.updated_seq.to_be_bytes());
            out.extend_from_slice(&meta.version.to_be_bytes());
            if value.kind() != Kind::String {
                out.extend_from_slice(&(item_count(value) as u32).to_be_bytes());
            }
            encode_items(value, &mut out);
        }
    }
    out
}

/// Decodes a value stored in `table` under schema `version`.
pub fn decode(
    version: SchemaVersion,
    table: &str,
    bytes: &[u8],
) -> Result<(Value, Meta), DecodeError> {
    let kind = Kind::of_table(table).ok_or_else(|| derr(table, "unknown table"))?;
    let mut c = Cursor { buf: bytes, table };
    match version {
        SchemaVersion::V1 => Ok((decode_items(kind, &mut c, None)?, Meta::default())),
        SchemaVersion::V2 => {
            if bytes.len() < V2_HEADER || &bytes[..2] != V2_MAGIC {
                return Err(derr(table, "missing the version-2 value header"));
            }
            c.take(2)?;
            let tag = c.take(1)?[0];
            match Kind::from_tag(tag) {
                Some(k) if k == kind => {}
                Some(k) => {
                    return Err(derr(
                        table,
                        format!("type tag says {k:?} but the table holds {kind:?}"),
                    ))
                }
                None => return Err(derr(table, format!("unknown type tag {tag}"))),
            }
            let meta = Meta {
                created_seq: c.u64()?,
                updated_seq: c.u64()?,
                version: c.u64()?,
            };
            let count = if kind == Kind::String {
                None
            } else {
                Some(c.u32()?)
            };
            Ok((decode_items(kind, &mut c, count)?, meta))
        }
    }
}

/// Checks the items of `kind` until the cursor is empty (`count: None`) or `count` items,
/// with exactly the rules of [`decode`], without building the value; returns the count.
///
/// The transforms run on every replicated mutation, and a collection is stored whole, so
/// they only walk the items (no copy, no allocation except a member index for sorted sets)
/// and move the encoded items over verbatim: both versions encode items the same way.
fn check_items(kind: Kind, c: &mut Cursor<'_>, count: Option<u32>) -> Result<u32, DecodeError> {
    let table = c.table;
    let more = |c: &Cursor<'_>, n: u32| match count {
        Some(total) => n < total,
        None => !c.done(),
    };
    let mut n = 0u32;
    match kind {
        Kind::String => {
            c.take(c.buf.len())?;
        }
        Kind::List => {
            while more(c, n) {
                let len = c.u32()? as usize;
                c.take(len)?;
                n += 1;
            }
        }
        Kind::Set => {
            let mut last: Option<&[u8]> = None;
            while more(c, n) {
                let len = c.u32()? as usize;
                let m = c.take(len)?;
                if last.is_some_and(|l| l >= m) {
                    return Err(derr(table, "set members are not strictly ascending"));
                }
                last = Some(m);
                n += 1;
            }
        }
        Kind::Hash => {
            let mut last: Option<&[u8]> = None;
            while more(c, n) {
                let len = c.u32()? as usize;
                let f = c.take(len)?;
                let len = c.u32()? as usize;
                c.take(len)?;
                if last.is_some_and(|l| l >= f) {
                    return Err(derr(table, "hash fields are not strictly ascending"));
                }
                last = Some(f);
                n += 1;
            }
        }
        Kind::ZSet => {
            let mut seen: std::collections::HashSet<&[u8]> = std::collections::HashSet::new();
            let mut prev: Option<(f64, &[u8])> = None;
            while more(c, n) {
                let s = c.score()?;
                let len = c.u32()? as usize;
                let m = c.take(len)?;
                if let Some((ps, pm)) = prev {
                    if ps.total_cmp(&s).then_with(|| pm.cmp(m)) != std::cmp::Ordering::Less {
                        return Err(derr(table, "sorted-set entries are not strictly ordered"));
                    }
                }
                prev = Some((s, m));
                if !seen.insert(m) {
                    return Err(derr(table, "sorted-set member appears twice"));
                }
                n += 1;
            }
        }
    }
    if !c.done() {
        return Err(derr(table, format!("{} trailing bytes", c.buf.len())));
    }
    Ok(n)
}

/// Upgrade transform, version 1 -> 2: the version-2 header (metadata unknown, 0) in front
/// of the checked version-1 items.
pub fn upgrade_record(r: &Record) -> Result<Option<Record>, String> {
    let kind =
        Kind::of_table(&r.table).ok_or_else(|| derr(&r.table, "unknown table").to_string())?;
    let mut c = Cursor {
        buf: &r.value,
        table: &r.table,
    };
    let count = check_items(kind, &mut c, None).map_err(|e| e.to_string())?;
    let mut value = Vec::with_capacity(V2_HEADER + 4 + r.value.len());
    value.extend_from_slice(V2_MAGIC);
    value.push(kind.tag());
    value.extend_from_slice(&[0u8; 24]);
    if kind != Kind::String {
        value.extend_from_slice(&count.to_be_bytes());
    }
    value.extend_from_slice(&r.value);
    Ok(Some(Record {
        table: r.table.clone(),
        key: r.key.clone(),
        value,
    }))
}

/// Downgrade transform, version 2 -> 1: the checked items without the header.
pub fn downgrade_record(r: &Record) -> Result<Option<Record>, String> {
    let table = r.table.as_str();
    let kind = Kind::of_table(table).ok_or_else(|| derr(table, "unknown table").to_string())?;
    let bytes = &r.value[..];
    if bytes.len() < V2_HEADER || &bytes[..2] != V2_MAGIC {
        return Err(derr(table, "missing the version-2 value header").to_string());
    }
    match Kind::from_tag(bytes[2]) {
        Some(k) if k == kind => {}
        Some(k) => {
            return Err(derr(
                table,
                format!("type tag says {k:?} but the table holds {kind:?}"),
            )
            .to_string())
        }
        None => return Err(derr(table, format!("unknown type tag {}", bytes[2])).to_string()),
    }
    let mut c = Cursor {
        buf: &bytes[V2_HEADER..],
        table,
    };
    let count = if kind == Kind::String {
        None
    } else {
        Some(c.u32().map_err(|e| e.to_string())?)
    };
    let items = c.buf;
    check_items(kind, &mut c, count).map_err(|e| e.to_string())?;
    Ok(Some(Record {
        table: r.table.clone(),
        key: r.key.clone(),
        value: items.to_vec(),
    }))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bytes() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..12)
    }

    pub(crate) fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            bytes().prop_map(Value::Str),
            proptest::collection::vec_deque(bytes(), 0..6).prop_map(Value::List),
            proptest::collection::btree_set(bytes(), 0..6).prop_map(Value::Set),
            proptest::collection::btree_map(bytes(), bytes(), 0..6).prop_map(Value::Hash),
            proptest::collection::btree_map(
                bytes(),
                any::<f64>().prop_filter("not NaN", |f| !f.is_nan()),
                0..6
            )
            .prop_map(Value::ZSet),
        ]
    }

    fn meta() -> impl Strategy<Value = Meta> {
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
            |(created_seq, updated_seq, version)| Meta {
                created_seq,
                updated_seq,
                version,
            },
        )
    }

    /// Valid records of schema version `v`.
    pub(crate) fn records(v: u32) -> proptest::strategy::BoxedStrategy<Record> {
        (bytes(), value(), meta())
            .prop_map(move |(key, value, meta)| {
                let version = if v == 1 {
                    SchemaVersion::V1
                } else {
                    SchemaVersion::V2
                };
                Record::new(value.kind().table(), key, encode(version, &value, meta))
            })
            .boxed()
    }

    proptest! {
        #[test]
        fn values_round_trip_in_both_versions(v in value(), m in meta()) {
            let t = v.kind().table();
            let (back1, m1) = decode(SchemaVersion::V1, t, &encode(SchemaVersion::V1, &v, m)).unwrap();
            prop_assert_eq!(&back1, &v);
            prop_assert_eq!(m1, Meta::default());
            let (back2, m2) = decode(SchemaVersion::V2, t, &encode(SchemaVersion::V2, &v, m)).unwrap();
            prop_assert_eq!(back2, v);
            prop_assert_eq!(m2, m);
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_decoders(b in proptest::collection::vec(any::<u8>(), 0..64), t in 0usize..5) {
            let _ = decode(SchemaVersion::V1, TABLES[t], &b);
            let _ = decode(SchemaVersion::V2, TABLES[t], &b);
        }

        #[test]
        fn the_transforms_accept_and_refuse_exactly_what_the_decoders_do(
            b in proptest::collection::vec(any::<u8>(), 0..64),
            t in 0usize..5,
            v in value(),
            m in meta(),
        ) {
            let table = TABLES[t];
            let r = Record::new(table, b"k".to_vec(), b.clone());
            prop_assert_eq!(upgrade_record(&r).is_ok(), decode(SchemaVersion::V1, table, &b).is_ok());
            prop_assert_eq!(downgrade_record(&r).is_ok(), decode(SchemaVersion::V2, table, &b).is_ok());
            // A valid header in front of arbitrary items.
            let mut framed = encode(SchemaVersion::V2, &v, m);
            let header = if v.kind() == Kind::String { V2_HEADER } else { V2_HEADER + 4 };
            framed.truncate(header);
            framed.extend_from_slice(&b);
            let r = Record::new(v.kind().table(), b"k".to_vec(), framed.clone());
            prop_assert_eq!(
                downgrade_record(&r).is_ok(),
                decode(SchemaVersion::V2, v.kind().table(), &framed).is_ok()
            );
        }

        #[test]
        fn upgrade_equals_decoding_then_encoding_with_unknown_metadata(v in value()) {
            let r = Record::new(v.kind().table(), b"k".to_vec(), encode(SchemaVersion::V1, &v, Meta::default()));
            let up = upgrade_record(&r).unwrap().unwrap();
            prop_assert_eq!(up.value, encode(SchemaVersion::V2, &v, Meta::default()));
        }

        #[test]
        fn downgrade_keeps_the_value_and_drops_metadata(v in value(), m in meta()) {
            let r = Record::new(v.kind().table(), b"k".to_vec(), encode(SchemaVersion::V2, &v, m));
            let down = downgrade_record(&r).unwrap().unwrap();
            prop_assert_eq!(down.value, encode(SchemaVersion::V1, &v, Meta::default()));
        }
    }

    #[test]
    fn v1_to_v2_to_v1_round_trips_via_the_sync_checker() {
        hitless_sync::testing::assert_round_trips(&SchemaVersion::V2.schema(), records, 256);
    }

    #[test]
    fn versions_read_and_written_by_each_build() {
        let v1 = SchemaVersion::V1.schema();
        assert_eq!((v1.reads().0, v1.writes().0), (vec![1], vec![1]));
        let v2 = SchemaVersion::V2.schema();
        assert_eq!((v2.reads().0, v2.writes().0), (vec![1, 2], vec![1, 2]));
    }

    #[test]
    fn v1_strings_are_raw_and_v2_strings_are_framed() {
        let v = Value::Str(b"hello".to_vec());
        assert_eq!(encode(SchemaVersion::V1, &v, Meta::default()), b"hello");
        let m = Meta {
            created_seq: 3,
            updated_seq: 9,
            version: 4,
        };
        let e = encode(SchemaVersion::V2, &v, m);
        assert_eq!(&e[..3], b"K2\x01");
        assert_eq!(&e[e.len() - 5..], b"hello");
    }

    #[test]
    fn malformed_values_are_rejected_with_reasons() {
        // A v2 string value stored in the lists table: tag mismatch.
        let s = encode(
            SchemaVersion::V2,
            &Value::Str(b"x".to_vec()),
            Meta::default(),
        );
        let e = decode(SchemaVersion::V2, LISTS, &s).unwrap_err();
        assert!(e.reason.contains("type tag"), "{e}");
        // A v1 list with a truncated element.
        let e = decode(SchemaVersion::V1, LISTS, &[0, 0, 0, 5, b'a']).unwrap_err();
        assert!(e.reason.contains("more bytes"), "{e}");
        // Unsorted set members.
        let mut b = Vec::new();
        put_item(&mut b, b"b");
        put_item(&mut b, b"a");
        assert!(decode(SchemaVersion::V1, SETS, &b).is_err());
        // The upgrade transform reports the failure instead of inventing data.
        let bad = Record::new(LISTS, b"k".to_vec(), vec![0, 0, 0, 9]);
        assert!(upgrade_record(&bad).is_err());
        assert!(downgrade_record(&Record::new(STRINGS, b"k".to_vec(), b"raw".to_vec())).is_err());
    }
}
