//! Fast keyed hashing for the state tables.
//!
//! The tables are hashed on every mutation on both ends of a link, so the
//! hasher matters: SipHash costs more than the rest of a small put together.
//! This is a folded-multiply hasher (the 128-bit product of two 64-bit words,
//! high half xor low half), consuming 16 bytes per multiplication, keyed with
//! two 64-bit secrets drawn per table from the standard library's random
//! source, so keys chosen by clients cannot be aimed at one bucket without
//! knowing the secrets.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

const P0: u64 = 0xa076_1d64_78bd_642f;
const P1: u64 = 0xe703_7ed1_a0b4_28db;
const P2: u64 = 0x8ebc_6af0_9c88_c6e3;

#[inline(always)]
fn fold(a: u64, b: u64) -> u64 {
    let r = (a as u128).wrapping_mul(b as u128);
    (r as u64) ^ ((r >> 64) as u64)
}

#[inline(always)]
fn r64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

#[inline(always)]
fn r32(b: &[u8]) -> u64 {
    u32::from_le_bytes(b[..4].try_into().expect("4 bytes")) as u64
}

/// Builds [`FastHasher`]s with per-instance random keys.
#[derive(Clone, Copy, Debug)]
pub struct FastState {
    k0: u64,
    k1: u64,
}

impl FastState {
    /// A state with fresh random keys.
    pub fn new() -> Self {
        let rs = RandomState::new();
        let mut a = rs.build_hasher();
        a.write_u64(P0);
        let k0 = a.finish();
        let mut b = rs.build_hasher();
        b.write_u64(P1);
        let k1 = b.finish();
        FastState { k0, k1 }
    }

    /// Hash of a byte string (its length is mixed in).
    #[inline]
    pub fn hash_bytes(&self, b: &[u8]) -> u64 {
        let mut h = self.build_hasher();
        h.write(b);
        h.finish()
    }

    /// A state with fixed keys (for tests that need repeatable hashes).
    #[cfg(test)]
    pub fn with_keys(k0: u64, k1: u64) -> Self {
        FastState { k0, k1 }
    }
}

impl Default for FastState {
    fn default() -> Self {
        Self::new()
    }
}

impl BuildHasher for FastState {
    type Hasher = FastHasher;

    #[inline]
    fn build_hasher(&self) -> FastHasher {
        FastHasher {
            h: self.k0,
            k1: self.k1,
        }
    }
}

/// A keyed folded-multiply hasher (see the module documentation).
#[derive(Clone, Debug)]
pub struct FastHasher {
    h: u64,
    k1: u64,
}

impl Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut h = self.h;
        let len = bytes.len();
        let mut s = bytes;
        while s.len() > 16 {
            h = fold(r64(s) ^ self.k1, r64(&s[8..]) ^ h);
            s = &s[16..];
        }
        let (a, b) = match s.len() {
            9..=16 => (r64(s), r64(&s[s.len() - 8..])),
            4..=8 => (r32(s), r32(&s[s.len() - 4..])),
            1..=3 => {
                let n = s.len();
                (
                    (s[0] as u64) << 16 | (s[n / 2] as u64) << 8 | s[n - 1] as u64,
                    0,
                )
            }
            _ => (0, 0),
        };
        self.h = fold(a ^ self.k1 ^ P2, b ^ h ^ (len as u64).wrapping_mul(P1));
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.h = fold(self.h ^ n ^ P0, self.k1 ^ P1);
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    #[inline]
    fn write_u8(&mut self, n: u8) {
        self.write_u64(n as u64);
    }

    #[inline]
    fn write_u32(&mut self, n: u32) {
        self.write_u64(n as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        fold(self.h ^ P2, self.k1 ^ P0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn h(s: &FastState, b: &[u8]) -> u64 {
        s.hash_one(b)
    }

    #[test]
    fn equal_inputs_hash_equal_and_keys_change_hashes() {
        let a = FastState::with_keys(1, 2);
        let b = FastState::with_keys(3, 4);
        for len in 0..100usize {
            let v: Vec<u8> = (0..len as u8).collect();
            assert_eq!(h(&a, &v), h(&a, &v.clone()));
            assert_ne!(h(&a, &v), h(&b, &v), "len {len}");
        }
    }

    #[test]
    fn counter_keys_spread_over_buckets_and_tags() {
        // Keys that differ only in a big-endian counter at the end.
        let s = FastState::new();
        let n = 1usize << 16;
        let mut buckets = vec![0u32; n];
        let mut tags = [0u32; 128];
        for i in 0..n as u64 {
            let mut k = [b'k'; 16];
            k[8..].copy_from_slice(&i.to_be_bytes());
            let x = h(&s, &k);
            buckets[x as usize & (n - 1)] += 1;
            tags[(x >> 57) as usize] += 1;
        }
        // n draws over n buckets leave about 1/e of them empty.
        let empty = buckets.iter().filter(|&&c| c == 0).count() as f64 / n as f64;
        assert!((0.34..0.40).contains(&empty), "{empty}");
        let (lo, hi) = (tags.iter().min().unwrap(), tags.iter().max().unwrap());
        assert!(*lo > 350 && *hi < 680, "{lo}..{hi}");
    }

    #[test]
    fn nearby_keys_do_not_collide_and_spread_over_low_bits() {
        let s = FastState::new();
        let mut all = HashSet::new();
        let mut low = HashSet::new();
        for i in 0u32..200_000 {
            let k = format!("key:{i}");
            let x = h(&s, k.as_bytes());
            all.insert(x);
            low.insert(x & 0xffff);
        }
        assert_eq!(all.len(), 200_000);
        // 200,000 draws over 65,536 buckets leave about 3.0 % empty.
        assert!(low.len() > 62_000, "{}", low.len());
        // Lengths and single-byte differences matter, including zero bytes.
        assert_ne!(h(&s, b""), h(&s, b"\0"));
        assert_ne!(h(&s, b"\0"), h(&s, b"\0\0"));
        assert_ne!(h(&s, &[0u8; 17]), h(&s, &[0u8; 18]));
        let mut x = [7u8; 40];
        let base = h(&s, &x);
        for i in 0..40 {
            x[i] ^= 1;
            assert_ne!(h(&s, &x), base, "bit flip at {i}");
            x[i] ^= 1;
        }
    }
}
