//! One table of replicated state, sharded so that no operation grows with it.
//!
//! A table is [`SHARDS`] small hash tables chosen by bits of the key's hash.
//! Sharding bounds two pauses that a single table would make grow with the
//! state: growing a shard rehashes only its own entries (a 1/1024 share), and
//! a whole-state read (a standby's bulk transfer, building a digest in a
//! foreign version) walks the table in bounded steps with a [`Cursor`], taking
//! the state lock once per step instead of once for the whole state, and
//! without copying it.
//!
//! A cursor walks the buckets of each shard in order. Entries never move
//! while a shard keeps its layout; a shard that is grown or rehashed in place
//! bumps its generation, and a cursor that finds the generation changed walks
//! that shard again from its first bucket (entries are then visited twice,
//! never missed). Entries inserted behind the cursor are not visited: a bulk
//! transfer carries them in the live stream, which is ordered with the steps.

use hashbrown::hash_table::{Entry as Slot, HashTable};

use crate::digest::record_hash;
use crate::hash::FastState;

/// Shards per table: growing one rehashes 1/1024 of the table.
pub(crate) const SHARDS: usize = 1024;

/// The shard of a key hash: bits the shard's own hash table does not use for
/// positions (the low bits) nor for its control bytes (the top 7 bits).
#[inline]
fn shard_of(h: u64) -> usize {
    ((h >> 32) as usize) & (SHARDS - 1)
}

/// An entry's share of the digest in the tracked foreign version (see
/// `super::track`): the track it was computed for (`tag`), the index of the
/// table its converted record lands in (`u32::MAX`: dropped by the
/// conversion) and the converted record's hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Conv {
    pub(crate) table: u32,
    pub(crate) tag: u32,
    pub(crate) hash: u64,
}

impl Conv {
    /// Computed for no track (tags start at 1).
    pub(crate) const UNTRACKED: Conv = Conv {
        table: u32::MAX,
        tag: 0,
        hash: 0,
    };

    /// Dropped by the conversion of track `tag`.
    pub(crate) fn dropped(tag: u32) -> Conv {
        Conv {
            table: u32::MAX,
            tag,
            hash: 0,
        }
    }
}

/// One record: its key and value in a single allocation,
/// `[key length, LEB128][key][value]`, and its share of the tracked foreign
/// digest. Nothing that can be recomputed cheaply is stored: the key's hash
/// is recomputed from the key when a shard is relaid, the record's hash
/// (native digest) from the record when it is overwritten or deleted.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    data: Box<[u8]>,
    pub(crate) conv: Conv,
}

impl Entry {
    fn new(key: &[u8], value: &[u8], conv: Conv) -> Entry {
        let mut data = Vec::with_capacity(prefix_len(key.len()) + key.len() + value.len());
        let mut n = key.len();
        while n >= 0x80 {
            data.push((n as u8) | 0x80);
            n >>= 7;
        }
        data.push(n as u8);
        data.extend_from_slice(key);
        data.extend_from_slice(value);
        Entry {
            data: data.into_boxed_slice(),
            conv,
        }
    }

    /// The key and the value.
    #[inline]
    pub(crate) fn record(&self) -> (&[u8], &[u8]) {
        let mut len = 0usize;
        let mut at = 0;
        loop {
            let b = self.data[at];
            len |= ((b & 0x7f) as usize) << (7 * at);
            at += 1;
            if b < 0x80 {
                break;
            }
        }
        self.data[at..].split_at(len)
    }

    #[inline]
    pub(crate) fn key(&self) -> &[u8] {
        self.record().0
    }

    #[inline]
    pub(crate) fn value(&self) -> &[u8] {
        self.record().1
    }

    /// Replaces the value: in place if it has the same length, otherwise in
    /// a new allocation.
    fn set_value(&mut self, value: &[u8]) {
        let (key, old) = self.record();
        if old.len() == value.len() {
            let at = self.data.len() - value.len();
            self.data[at..].copy_from_slice(value);
        } else {
            *self = Entry::new(key, value, self.conv);
        }
    }
}

/// Bytes of the LEB128 encoding of `n`.
fn prefix_len(mut n: usize) -> usize {
    let mut len = 1;
    while n >= 0x80 {
        n >>= 7;
        len += 1;
    }
    len
}

#[derive(Debug, Default)]
struct Shard {
    map: HashTable<Entry>,
    /// Bumped whenever entries may have moved (growth, rehash, clear).
    gen: u32,
}

impl Shard {
    /// Runs an insert of `e` (whose key hashes to `h`) into a vacant slot,
    /// bumping the generation if the insert grew or rehashed the shard
    /// (entries moved).
    fn insert(&mut self, state: &FastState, h: u64, e: Entry) {
        let buckets = self.map.num_buckets();
        let room = self.map.capacity() - self.map.len();
        self.map.insert_unique(h, e, |e| state.hash_bytes(e.key()));
        let room_after = self.map.capacity() - self.map.len();
        // An insert without relayout leaves the room as it was (a reused
        // tombstone) or one less; a relayout happens only with no room left
        // and leaves room after.
        if buckets != self.map.num_buckets() || (room == 0 && room_after > 0) {
            self.gen = self.gen.wrapping_add(1);
        }
    }
}

/// A position in a walk over every entry of a [`super::Store`]: table, shard,
/// bucket, and the shard's generation when the walk entered it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Cursor {
    pub(crate) table: usize,
    shard: usize,
    bucket: usize,
    gen: u32,
    entered: bool,
}

/// One table of replicated state. Each record is one allocation holding its
/// key and value (see `Entry`); the table keeps the wrapping sum of the
/// records' hashes, so its digest is up to date on every mutation. Keys are
/// hashed with a key drawn per table (see the `hash` module).
#[derive(Debug)]
pub struct Table {
    shards: Box<[Shard]>,
    len: usize,
    state: FastState,
    /// Wrapping sum of the entries' record hashes.
    sum: u64,
}

impl Default for Table {
    fn default() -> Self {
        Table {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            len: 0,
            state: FastState::default(),
            sum: 0,
        }
    }
}

impl Table {
    /// The value at `key`.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        let h = self.state.hash_bytes(key);
        self.shards[shard_of(h)]
            .map
            .find(h, |e| e.key() == key)
            .map(Entry::value)
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// All records (key, value), in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.shards
            .iter()
            .flat_map(|s| s.map.iter())
            .map(Entry::record)
    }

    /// Count and wrapping sum of the record hashes.
    pub(crate) fn sums(&self) -> (u64, u64) {
        (self.len as u64, self.sum)
    }

    /// Puts copies of `key` and `value`: a new record is one allocation, and
    /// an overwritten value of the same length is rewritten in place (no
    /// allocation). Returns the replaced entry's [`Conv`].
    pub(crate) fn put(&mut self, key: &[u8], value: &[u8], conv: Conv) -> Option<Conv> {
        let h = self.state.hash_bytes(key);
        let rh = record_hash(key, value);
        let shard = &mut self.shards[shard_of(h)];
        if let Some(e) = shard.map.find_mut(h, |e| e.key() == key) {
            let (k, v) = e.record();
            self.sum = self.sum.wrapping_sub(record_hash(k, v)).wrapping_add(rh);
            e.set_value(value);
            return Some(std::mem::replace(&mut e.conv, conv));
        }
        self.sum = self.sum.wrapping_add(rh);
        self.len += 1;
        shard.insert(&self.state, h, Entry::new(key, value, conv));
        None
    }

    /// Deletes `key`; returns the removed entry's [`Conv`].
    pub(crate) fn delete(&mut self, key: &[u8]) -> Option<Conv> {
        let h = self.state.hash_bytes(key);
        let state = &self.state;
        let shard = &mut self.shards[shard_of(h)];
        match shard
            .map
            .entry(h, |e| e.key() == key, |e| state.hash_bytes(e.key()))
        {
            Slot::Occupied(o) => {
                // Removing never moves other entries: the generation stays.
                let (e, _) = o.remove();
                let (k, v) = e.record();
                self.sum = self.sum.wrapping_sub(record_hash(k, v));
                self.len -= 1;
                Some(e.conv)
            }
            Slot::Vacant(_) => None,
        }
    }

    pub(crate) fn clear(&mut self) {
        for s in self.shards.iter_mut() {
            s.map = HashTable::new();
            s.gen = s.gen.wrapping_add(1);
        }
        self.len = 0;
        self.sum = 0;
    }

    /// Visits the entries from `cur` on, in this table only, until `visit`
    /// returns false (the cursor then stands after the entry it was given)
    /// or `buckets` more buckets were looked at (counted down). Returns true
    /// once the walk is past this table's last shard.
    pub(crate) fn walk(
        &mut self,
        cur: &mut Cursor,
        buckets: &mut usize,
        visit: &mut impl FnMut(&mut Entry) -> bool,
    ) -> bool {
        while cur.shard < SHARDS {
            let shard = &mut self.shards[cur.shard];
            if !cur.entered || cur.gen != shard.gen {
                // Entered now, or the shard was relaid since: from its start.
                cur.entered = true;
                cur.gen = shard.gen;
                cur.bucket = 0;
            }
            let n = shard.map.num_buckets();
            while cur.bucket < n {
                if *buckets == 0 {
                    return false;
                }
                *buckets -= 1;
                let b = cur.bucket;
                cur.bucket += 1;
                if let Some(e) = shard.map.get_bucket_mut(b) {
                    if !visit(e) {
                        return false;
                    }
                }
            }
            cur.shard += 1;
            cur.entered = false;
        }
        true
    }
}

impl Cursor {
    /// Moves the cursor to the start of the next table.
    pub(crate) fn next_table(&mut self) {
        *self = Cursor {
            table: self.table + 1,
            ..Cursor::default()
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn an_entry_is_two_words_and_a_conv_and_holds_any_key_and_value() {
        assert_eq!(std::mem::size_of::<Entry>(), 32);
        for klen in [0usize, 1, 127, 128, 300, 16_383, 16_384, 70_000] {
            let key: Vec<u8> = (0..klen).map(|i| i as u8).collect();
            for value in [&b""[..], b"v", &[7u8; 200][..]] {
                let e = Entry::new(&key, value, Conv::UNTRACKED);
                assert_eq!(e.record(), (key.as_slice(), value), "key of {klen} bytes");
                assert_eq!(e.data.len(), prefix_len(klen) + klen + value.len());
            }
        }
    }

    #[test]
    fn an_overwrite_of_the_same_length_is_in_place() {
        let mut t = Table::default();
        t.put(b"k", b"aaaa", Conv::UNTRACKED);
        let p1 = t.get(b"k").unwrap().as_ptr();
        t.put(b"k", b"bbbb", Conv::UNTRACKED);
        assert_eq!(t.get(b"k").unwrap(), b"bbbb");
        assert_eq!(t.get(b"k").unwrap().as_ptr(), p1, "rewritten in place");
        // Another length: a fresh allocation, the key kept.
        t.put(b"k", b"dd", Conv::UNTRACKED);
        assert_eq!(t.get(b"k").unwrap(), b"dd");
        t.put(b"k", b"", Conv::UNTRACKED);
        assert_eq!(t.get(b"k").unwrap(), b"");
        assert_eq!(t.len(), 1);
        t.put(b"s", b"static", Conv::UNTRACKED);
        assert_eq!(t.iter().count(), 2);
        t.delete(b"k");
        assert!(t.get(b"k").is_none());
        assert_eq!(t.len(), 1);
        assert_eq!(t.iter().collect::<Vec<_>>(), [(&b"s"[..], &b"static"[..])]);
    }

    #[test]
    fn the_kept_sum_follows_puts_overwrites_and_deletes() {
        let mut t = Table::default();
        let sum = |t: &Table| {
            t.iter()
                .fold(0u64, |s, (k, v)| s.wrapping_add(record_hash(k, v)))
        };
        for i in 0..3000u32 {
            t.put(&i.to_le_bytes(), &i.to_be_bytes(), Conv::UNTRACKED);
        }
        for i in (0..3000u32).step_by(3) {
            t.put(&i.to_le_bytes(), b"longer value", Conv::UNTRACKED);
            t.put(&(i + 1).to_le_bytes(), b"same", Conv::UNTRACKED);
            t.delete(&(i + 2).to_le_bytes());
        }
        assert_eq!(t.len(), 2000);
        assert_eq!(t.sums(), (2000, sum(&t)));
    }

    /// Walks `t` in steps of `step` buckets, mutating it between steps with
    /// `between`; returns the keys visited.
    fn walk_all(
        t: &mut Table,
        step: usize,
        mut between: impl FnMut(&mut Table, usize),
    ) -> BTreeSet<Vec<u8>> {
        let mut cur = Cursor::default();
        let mut seen = BTreeSet::new();
        let mut i = 0;
        loop {
            let done = t.walk(&mut cur, &mut { step }, &mut |e| {
                seen.insert(e.key().to_vec());
                true
            });
            if done {
                return seen;
            }
            between(t, i);
            i += 1;
            assert!(i < 10_000_000, "a walk ends");
        }
    }

    #[test]
    fn a_walk_in_steps_visits_every_entry_that_stays_while_the_table_grows_and_shrinks() {
        let mut t = Table::default();
        for i in 0..20_000u32 {
            t.put(&i.to_le_bytes(), b"v", Conv::UNTRACKED);
        }
        // Between steps: grow the table a lot (every shard is relaid several
        // times) and delete keys of the upper range.
        let seen = walk_all(&mut t, 97, |t, i| {
            for j in 0..8u32 {
                let k = 100_000 + (i as u32) * 8 + j;
                t.put(&k.to_le_bytes(), b"new", Conv::UNTRACKED);
            }
            let d = 10_000 + i as u32;
            if d < 20_000 {
                t.delete(&d.to_le_bytes());
            }
        });
        // Every key present from start to end was visited.
        for i in 0..10_000u32 {
            assert!(seen.contains(i.to_le_bytes().as_slice()), "key {i} missed");
        }
        // Nothing was visited that never existed.
        for k in &seen {
            let n = u32::from_le_bytes(k.as_slice().try_into().unwrap());
            assert!(!(20_000..100_000).contains(&n));
        }
    }

    #[test]
    fn a_walk_stops_where_the_visitor_says_and_goes_on_from_there() {
        let mut t = Table::default();
        for i in 0..1000u32 {
            t.put(&i.to_le_bytes(), b"v", Conv::UNTRACKED);
        }
        let mut cur = Cursor::default();
        let mut seen = Vec::new();
        loop {
            let mut n = 0;
            let done = t.walk(&mut cur, &mut { usize::MAX }, &mut |e| {
                seen.push(e.key().to_vec());
                n += 1;
                n < 7
            });
            if done {
                break;
            }
            assert!(n == 7, "stopped by the visitor after 7 entries, not {n}");
        }
        seen.sort();
        seen.dedup();
        assert_eq!(
            seen.len(),
            1000,
            "every entry exactly once when nothing moves"
        );
    }

    #[test]
    fn shards_spread_keys() {
        let mut t = Table::default();
        for i in 0..(SHARDS as u32 * 64) {
            t.put(&i.to_le_bytes(), b"", Conv::UNTRACKED);
        }
        let max = t.shards.iter().map(|s| s.map.len()).max().unwrap();
        let min = t.shards.iter().map(|s| s.map.len()).min().unwrap();
        assert!(
            min > 16 && max < 160,
            "shards of 64 on average: {min}..{max}"
        );
    }
}
