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

use bytes::Bytes;
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

#[derive(Clone, Debug)]
pub(crate) struct Entry {
    hash: u64,
    pub(crate) key: Bytes,
    pub(crate) value: Bytes,
    /// Hash of the record in the native version (see [`record_hash`]).
    rh: u64,
    pub(crate) conv: Conv,
}

#[derive(Debug, Default)]
struct Shard {
    map: HashTable<Entry>,
    /// Bumped whenever entries may have moved (growth, rehash, clear).
    gen: u32,
}

impl Shard {
    /// Runs an insert into a vacant slot, bumping the generation if the
    /// insert grew or rehashed the shard (entries moved).
    fn insert(&mut self, e: Entry) {
        let buckets = self.map.num_buckets();
        let room = self.map.capacity() - self.map.len();
        self.map.insert_unique(e.hash, e, |e| e.hash);
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

/// One table of replicated state. Keys and values are reference-counted
/// [`Bytes`]. Each entry keeps its key's hash (keyed per table, see the
/// `hash` module), so growing a shard never reads the keys again, and its
/// record hash, so the table's digest is kept up to date on every mutation.
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
    pub fn get(&self, key: &[u8]) -> Option<&Bytes> {
        let h = self.state.hash_bytes(key);
        self.shards[shard_of(h)]
            .map
            .find(h, |e| e.hash == h && e.key == key)
            .map(|e| &e.value)
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// All records, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&Bytes, &Bytes)> {
        self.shards
            .iter()
            .flat_map(|s| s.map.iter())
            .map(|e| (&e.key, &e.value))
    }

    /// Count and wrapping sum of the record hashes.
    pub(crate) fn sums(&self) -> (u64, u64) {
        (self.len as u64, self.sum)
    }

    /// Puts `key` = `value`; returns the replaced entry's [`Conv`].
    pub(crate) fn put(&mut self, key: Bytes, value: Bytes, conv: Conv) -> Option<Conv> {
        let h = self.state.hash_bytes(&key);
        let rh = record_hash(&key, &value);
        let shard = &mut self.shards[shard_of(h)];
        if let Some(e) = shard.map.find_mut(h, |e| e.hash == h && e.key == key) {
            self.sum = self.sum.wrapping_sub(e.rh).wrapping_add(rh);
            e.value = value;
            e.rh = rh;
            return Some(std::mem::replace(&mut e.conv, conv));
        }
        self.sum = self.sum.wrapping_add(rh);
        self.len += 1;
        shard.insert(Entry {
            hash: h,
            key,
            value,
            rh,
            conv,
        });
        None
    }

    /// Puts copies of `key` and `value`: the key is copied only if it is
    /// new, and an overwritten value of the same length that nothing else
    /// references is overwritten in place (no allocation either way).
    /// Returns the replaced entry's [`Conv`].
    pub(crate) fn put_slice(&mut self, key: &[u8], value: &[u8], conv: Conv) -> Option<Conv> {
        let h = self.state.hash_bytes(key);
        let rh = record_hash(key, value);
        let shard = &mut self.shards[shard_of(h)];
        if let Some(e) = shard.map.find_mut(h, |e| e.hash == h && e.key == key) {
            self.sum = self.sum.wrapping_sub(e.rh).wrapping_add(rh);
            let old = std::mem::take(&mut e.value);
            e.value = reuse_or_copy(old, value);
            e.rh = rh;
            return Some(std::mem::replace(&mut e.conv, conv));
        }
        self.sum = self.sum.wrapping_add(rh);
        self.len += 1;
        shard.insert(Entry {
            hash: h,
            key: Bytes::copy_from_slice(key),
            value: Bytes::copy_from_slice(value),
            rh,
            conv,
        });
        None
    }

    /// Deletes `key`; returns the removed entry's [`Conv`].
    pub(crate) fn delete(&mut self, key: &[u8]) -> Option<Conv> {
        let h = self.state.hash_bytes(key);
        let shard = &mut self.shards[shard_of(h)];
        match shard
            .map
            .entry(h, |e| e.hash == h && e.key == key, |e| e.hash)
        {
            Slot::Occupied(o) => {
                // Removing never moves other entries: the generation stays.
                let (e, _) = o.remove();
                self.sum = self.sum.wrapping_sub(e.rh);
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
    fn put_slice_overwrites_in_place_only_when_nothing_else_holds_the_value() {
        let mut t = Table::default();
        t.put_slice(b"k", b"aaaa", Conv::UNTRACKED);
        let p1 = t.get(b"k").unwrap().as_ptr();
        t.put_slice(b"k", b"bbbb", Conv::UNTRACKED);
        assert_eq!(t.get(b"k").unwrap().as_ref(), b"bbbb");
        assert_eq!(t.get(b"k").unwrap().as_ptr(), p1, "reused in place");
        // A reader holds the value: it must keep seeing the old bytes.
        let held = t.get(b"k").unwrap().clone();
        t.put_slice(b"k", b"cccc", Conv::UNTRACKED);
        assert_eq!(held.as_ref(), b"bbbb");
        assert_eq!(t.get(b"k").unwrap().as_ref(), b"cccc");
        // Another length: a fresh allocation.
        t.put_slice(b"k", b"dd", Conv::UNTRACKED);
        assert_eq!(t.get(b"k").unwrap().as_ref(), b"dd");
        assert_eq!(t.len(), 1);
        t.put(
            Bytes::from_static(b"s"),
            Bytes::from_static(b"static"),
            Conv::UNTRACKED,
        );
        t.put_slice(b"s", b"STATIC", Conv::UNTRACKED);
        assert_eq!(t.get(b"s").unwrap().as_ref(), b"STATIC");
        t.delete(b"k");
        assert!(t.get(b"k").is_none());
        assert_eq!(t.len(), 1);
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
                seen.insert(e.key.to_vec());
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
            t.put_slice(&i.to_le_bytes(), b"v", Conv::UNTRACKED);
        }
        // Between steps: grow the table a lot (every shard is relaid several
        // times) and delete keys of the upper range.
        let seen = walk_all(&mut t, 97, |t, i| {
            for j in 0..8u32 {
                let k = 100_000 + (i as u32) * 8 + j;
                t.put_slice(&k.to_le_bytes(), b"new", Conv::UNTRACKED);
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
            t.put_slice(&i.to_le_bytes(), b"v", Conv::UNTRACKED);
        }
        let mut cur = Cursor::default();
        let mut seen = Vec::new();
        loop {
            let mut n = 0;
            let done = t.walk(&mut cur, &mut { usize::MAX }, &mut |e| {
                seen.push(e.key.to_vec());
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
            t.put_slice(&i.to_le_bytes(), b"", Conv::UNTRACKED);
        }
        let max = t.shards.iter().map(|s| s.map.len()).max().unwrap();
        let min = t.shards.iter().map(|s| s.map.len()).min().unwrap();
        assert!(
            min > 16 && max < 160,
            "shards of 64 on average: {min}..{max}"
        );
    }
}
