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

mod prop {
    use super::*;
    use hitless_sync::wire::{self, BatchRef, FrameType};
    use hitless_sync::{Mutation, Replica};
    use proptest::prelude::*;

    fn op() -> impl Strategy<Value = (bool, u8, Vec<u8>, Vec<u8>)> {
        (
            any::<bool>(),
            0u8..3,
            proptest::collection::vec(any::<u8>(), 0..12),
            proptest::collection::vec(any::<u8>(), 0..40),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// A Batch encodes exactly what `encode_batch_payload` encodes for the
        /// same mutations, parses back to them, and applies like them.
        #[test]
        fn batch_matches_owned_mutations(ops in proptest::collection::vec(op(), 0..60)) {
            let tables = ["kv", "meta", "kv"];
            let mut b = Batch::new();
            let mut muts = Vec::new();
            for (is_put, t, k, v) in &ops {
                let table = tables[*t as usize];
                if *is_put {
                    b.put(table, k, v).unwrap();
                    muts.push(Mutation::put(table, k.clone(), v.clone()));
                } else {
                    b.delete(table, k).unwrap();
                    muts.push(Mutation::delete(table, k.clone()));
                }
            }
            prop_assert_eq!(b.len(), muts.len());
            prop_assert_eq!(b.to_mutations(), muts.clone());
            let payload = wire::encode_batch_payload(&muts);
            prop_assert_eq!(b.encoded_len(), payload.len());
            let parsed = BatchRef::parse(FrameType::Batch, &payload).unwrap();
            prop_assert_eq!(parsed.len(), muts.len());
            prop_assert_eq!(
                parsed.deletes(),
                muts.iter().filter(|m| matches!(m, Mutation::Delete { .. })).count()
            );
            let x = Replica::new(schema(2), config("x"));
            let y = Replica::new(schema(2), config("y"));
            x.activate(hitless_sync::ControlEpoch(1)).unwrap();
            y.activate(hitless_sync::ControlEpoch(1)).unwrap();
            let tx = x.apply_batch(&b).unwrap();
            let ty = y.apply(muts).unwrap();
            prop_assert_eq!(tx, ty);
            prop_assert_eq!(x.records(), y.records());
        }
    }
}
