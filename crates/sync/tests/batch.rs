//! Batches built in the wire format (`Replica::apply_batch`).
mod common;

use std::time::Duration;

use common::*;
use hitless_sync::{Batch, SyncError};

#[test]
fn encoded_batches_replicate_like_owned_mutations_across_versions() {
    let (a, h) = active(2, "a");
    let same = standby(2, "same");
    let old = standby(1, "old");
    let _f1 = same.follow_tcp(h.local_addr(), true).unwrap();
    let _f2 = old.follow_tcp(h.local_addr(), true).unwrap();
    same.wait_ready(Duration::from_secs(5)).unwrap();
    old.wait_ready(Duration::from_secs(5)).unwrap();
    let mut b = Batch::new();
    for round in 0..20u64 {
        b.clear();
        for i in 0..50u64 {
            let k = format!("k{}", (round * 50 + i) % 300);
            b.put("kv", k.as_bytes(), format!("v2|r{round}").as_bytes())
                .unwrap();
        }
        b.put("meta", b"round", format!("{round}").as_bytes())
            .unwrap();
        b.delete("kv", format!("k{}", round * 7).as_bytes())
            .unwrap();
        assert_eq!(b.len(), 52);
        let t = a.apply_batch(&b).unwrap();
        assert_eq!(t.seq, (round + 1) * 52);
    }
    // Synchronous mode: both standbys applied every batch already.
    assert_eq!(same.records(), a.records());
    assert_eq!(same.digest(), a.digest());
    assert_eq!(old.digest(), a.digest_in(1).unwrap());
    // k299 was last written in round 17 ((17 * 50 + 49) % 300 == 299).
    assert_eq!(
        old.get("kv", b"k299").unwrap().as_deref(),
        Some(b"r17".as_slice())
    );
    assert_eq!(
        same.get("kv", b"k299").unwrap().as_deref(),
        Some(b"v2|r17".as_slice())
    );
    assert!(old.get("meta", b"round").is_err(), "v1 has no meta table");
    // The same batch as owned mutations gives the same state.
    let (b2, _) = active(2, "b");
    b2.apply(b.to_mutations()).unwrap();
    let a2 = active(2, "a2").0;
    a2.apply_batch(&b).unwrap();
    assert_eq!(a2.records(), b2.records());
    a2.shutdown();
    a.shutdown();
    same.shutdown();
    old.shutdown();
    b2.shutdown();
}

#[test]
fn bad_batches_are_refused_applying_nothing() {
    let (a, _h) = active(1, "a");
    a.apply(vec![put(1, "one")]).unwrap();
    let mut b = Batch::new();
    b.put("kv", b"k2", b"two").unwrap();
    b.put("nope", b"k3", b"three").unwrap();
    assert!(matches!(
        a.apply_batch(&b),
        Err(SyncError::UnknownTable { table, .. }) if table == "nope"
    ));
    assert_eq!(a.status().applied_seq, 1);
    assert!(a.get("kv", b"k2").unwrap().is_none());
    // Size limits are checked as the batch is built.
    let mut b = Batch::new();
    let big_key = vec![0u8; hitless_sync::wire::MAX_KEY + 1];
    assert!(matches!(
        b.put("kv", &big_key, b"v"),
        Err(SyncError::TooLarge { what: "key", .. })
    ));
    assert!(b.is_empty());
    // A batch over one frame is refused whole.
    let value = vec![7u8; 1 << 20];
    for i in 0..17u32 {
        b.put("kv", &i.to_le_bytes(), &value).unwrap();
    }
    assert!(matches!(
        a.apply_batch(&b),
        Err(SyncError::TooLarge { what: "batch", .. })
    ));
    assert_eq!(a.status().applied_seq, 1);
    // An empty batch applies nothing and returns the current position.
    assert_eq!(a.apply_batch(&Batch::new()).unwrap().seq, 1);
    a.shutdown();
}
