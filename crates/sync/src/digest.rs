//! Order-independent state digests.
//!
//! Each record hashes to 64 bits (two CRC32C lanes over the length-prefixed
//! key and value, mixed); a table's digest is the record count and the
//! wrapping sum of its record hashes, so it does not depend on iteration
//! order and can be maintained or merged incrementally.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Digest of one table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableDigest {
    /// Number of records.
    pub count: u64,
    /// Wrapping sum of record hashes.
    pub sum: u64,
}

/// Digest of a whole state: per table, in table-name order. Empty tables
/// are omitted so that declared-but-empty and undeclared compare equal.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest {
    /// Per-table digests.
    pub tables: BTreeMap<String, TableDigest>,
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Values at least this long are CRC'd once and the result spliced into
/// both lanes instead of being read twice.
const COMBINE_AT: usize = 1024;

/// The CRC32C polynomial, bit-reflected.
const POLY: u32 = 0x82f6_3b78;

/// Product of two polynomials modulo the CRC32C polynomial, in the
/// bit-reflected representation (bit 31 is x^0).
fn mul_mod(a: u32, mut b: u32) -> u32 {
    let mut p = 0u32;
    let mut m = 1u32 << 31;
    while m != 0 {
        if a & m != 0 {
            p ^= b;
        }
        m >>= 1;
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
    }
    p
}

/// x^(8 n) modulo the CRC32C polynomial: the operator that appends `n` zero
/// bytes to a CRC register.
fn zeros_op(n: usize) -> u32 {
    let mut op = 1u32 << 31; // x^0
    let mut sq = 1u32 << 23; // x^8
    let mut n = n;
    while n != 0 {
        if n & 1 != 0 {
            op = mul_mod(op, sq);
        }
        sq = mul_mod(sq, sq);
        n >>= 1;
    }
    op
}

thread_local! {
    /// Last value length and its operator: bulk values tend to share a length.
    static ZEROS: std::cell::Cell<(usize, u32)> = const { std::cell::Cell::new((0, 1 << 31)) };
}

/// `crc32c_append(c1, data)` from `c2 = crc32c(data)` and `data.len()`:
/// CRC32C is linear, so appending is shifting `c1` over `len` bytes then
/// adding `c2`.
fn combine(c1: u32, c2: u32, len: usize) -> u32 {
    let op = ZEROS.with(|z| {
        let (l, op) = z.get();
        if l == len {
            op
        } else {
            let op = zeros_op(len);
            z.set((len, op));
            op
        }
    });
    mul_mod(c1, op) ^ c2
}

/// Hash of one record's key and value.
pub fn record_hash(key: &[u8], value: &[u8]) -> u64 {
    let kl = (key.len() as u32).to_le_bytes();
    let (a, b) = if value.len() >= COMBINE_AT {
        let cv = crc32c::crc32c(value);
        let a = combine(
            crc32c::crc32c_append(crc32c::crc32c(&kl), key),
            cv,
            value.len(),
        );
        let b = crc32c::crc32c_append(
            combine(crc32c::crc32c_append(0x5bd1_e995, &kl), cv, value.len()),
            key,
        );
        (a, b)
    } else {
        lanes(&kl, key, value)
    };
    mix(((a as u64) << 32 | b as u64) ^ (value.len() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// The two CRC lanes, each reading the key and the value.
fn lanes(kl: &[u8], key: &[u8], value: &[u8]) -> (u32, u32) {
    let a = crc32c::crc32c_append(crc32c::crc32c_append(crc32c::crc32c(kl), key), value);
    let b = crc32c::crc32c_append(
        crc32c::crc32c_append(crc32c::crc32c_append(0x5bd1_e995, kl), value),
        key,
    );
    (a, b)
}

impl Digest {
    /// Adds one record.
    pub fn add(&mut self, table: &str, key: &[u8], value: &[u8]) {
        let h = record_hash(key, value);
        match self.tables.get_mut(table) {
            Some(t) => {
                t.count += 1;
                t.sum = t.sum.wrapping_add(h);
            }
            None => {
                self.tables
                    .insert(table.to_string(), TableDigest { count: 1, sum: h });
            }
        }
    }

    /// Merges another digest into this one (disjoint record sets).
    pub fn merge(&mut self, other: &Digest) {
        for (name, d) in &other.tables {
            let t = self.tables.entry(name.clone()).or_default();
            t.count += d.count;
            t.sum = t.sum.wrapping_add(d.sum);
        }
    }

    /// Total number of records.
    pub fn records(&self) -> u64 {
        self.tables.values().map(|t| t.count).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_order_independent_and_sensitive_to_content() {
        let mut a = Digest::default();
        a.add("t", b"k1", b"v1");
        a.add("t", b"k2", b"v2");
        let mut b = Digest::default();
        b.add("t", b"k2", b"v2");
        b.add("t", b"k1", b"v1");
        assert_eq!(a, b);
        let mut c = Digest::default();
        c.add("t", b"k1", b"v2");
        c.add("t", b"k2", b"v1");
        assert_ne!(a, c);
        let mut d = Digest::default();
        d.add("t", b"k1v", b"1");
        d.add("t", b"k2", b"v2");
        assert_ne!(a, d);
    }

    #[test]
    fn combine_matches_appending() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 7 + 3) as u8).collect();
        for n in [0usize, 1, 7, 8, 100, 4096, 5000] {
            for c1 in [0u32, 1, 0xdead_beef, u32::MAX] {
                let d = &data[..n];
                assert_eq!(
                    combine(c1, crc32c::crc32c(d), n),
                    crc32c::crc32c_append(c1, d),
                    "n {n} c1 {c1:#x}"
                );
            }
        }
    }

    #[test]
    fn large_values_hash_as_if_read_twice() {
        for len in [
            COMBINE_AT - 1,
            COMBINE_AT,
            COMBINE_AT + 1,
            65_536,
            65_536,
            100_003,
            1,
        ] {
            let value: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            for key in [&b""[..], b"k", b"a longer key of some bytes"] {
                let kl = (key.len() as u32).to_le_bytes();
                let (a, b) = lanes(&kl, key, &value);
                let expect = mix(((a as u64) << 32 | b as u64)
                    ^ (value.len() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                assert_eq!(record_hash(key, &value), expect, "len {len}");
            }
        }
    }
}
