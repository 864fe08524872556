//! Cross-version replication: transforms both ways across a live stream,
//! refusal of incompatible versions, pre-flight and round-trip helpers.
mod common;

use std::time::Duration;

use common::*;
use hitless_sync::{Mutation, Record, Replica, Schema, SyncError};
use proptest::prelude::*;

#[test]
fn v2_active_streams_to_v1_standby_with_downgrade() {
    let (a, h) = active(2, "new");
    for i in 0..200 {
        a.apply(vec![put_v2(i, &format!("x{i}"))]).unwrap();
    }
    a.apply(vec![Mutation::put(
        "meta",
        b"schema".to_vec(),
        b"2".to_vec(),
    )])
    .unwrap();
    let s = standby(1, "old");
    let _f = s.follow_tcp(h.local_addr(), true).unwrap();
    s.wait_ready(Duration::from_secs(5)).unwrap();
    assert_eq!(s.status().stream_version, Some(1));
    // Live stream after the bulk: puts, overwrites, deletes, and a v2-only table.
    for i in 100..300 {
        a.apply(vec![put_v2(i, &format!("y{i}"))]).unwrap();
    }
    a.apply(vec![Mutation::delete("kv", b"k5".to_vec())])
        .unwrap();
    a.apply(vec![Mutation::put(
        "meta",
        b"other".to_vec(),
        b"z".to_vec(),
    )])
    .unwrap();
    let (aseq, arecs) = a.records();
    let expected: Vec<Record> = arecs
        .iter()
        .filter_map(|r| a.schema().convert(r, 2, 1).unwrap())
        .collect();
    assert_eq!(s.status().applied_seq, aseq);
    let (_, srecs) = s.records();
    assert_eq!(srecs, expected);
    assert_eq!(
        s.get("kv", b"k150").unwrap().as_deref(),
        Some(b"y150".as_slice())
    );
    assert_eq!(s.get("kv", b"k5").unwrap(), None);
    // Digests agree in the stream version, computed on both sides.
    assert_eq!(a.digest_in(1).unwrap().1, s.digest().1);
    a.verify_standbys().unwrap();
    a.wait_standbys_ready(1, Duration::from_secs(5)).unwrap();
    assert!(a.status().standbys[0].digest_matched);
    a.shutdown();
    s.shutdown();
}

#[test]
fn v1_active_streams_to_v2_standby_with_upgrade() {
    let (a, h) = active(1, "old");
    for i in 0..200 {
        a.apply(vec![put(i, &format!("x{i}"))]).unwrap();
    }
    let s = standby(2, "new");
    let _f = s.follow_tcp(h.local_addr(), true).unwrap();
    s.wait_ready(Duration::from_secs(5)).unwrap();
    assert_eq!(s.status().stream_version, Some(1));
    for i in 150..400 {
        a.apply(vec![put(i, &format!("y{i}"))]).unwrap();
    }
    a.apply(vec![Mutation::delete("kv", b"k7".to_vec())])
        .unwrap();
    let (aseq, arecs) = a.records();
    let expected: Vec<Record> = arecs
        .iter()
        .filter_map(|r| s.schema().convert(r, 1, 2).unwrap())
        .collect();
    assert_eq!(s.status().applied_seq, aseq);
    assert_eq!(s.records().1, expected);
    assert_eq!(
        s.get("kv", b"k300").unwrap().as_deref(),
        Some(b"v2|y300".as_slice())
    );
    assert_eq!(s.digest_in(1).unwrap().1, a.digest().1);
    a.shutdown();
    s.shutdown();
}

#[test]
fn incompatible_versions_refused_naming_both() {
    // Version 3 knows only 2 <-> 3: it can neither read nor write version 1.
    let v3 = Schema::new("kv", 3)
        .table("kv")
        .upgrade(2, |r: &Record| Ok(Some(r.clone())))
        .downgrade(3, |r: &Record| Ok(Some(r.clone())));
    let (a, h) = active(1, "old");
    let s = Replica::new(v3, config("v3"));
    let err = s.follow_tcp(h.local_addr(), true).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, SyncError::Refused(_)), "{err}");
    assert!(
        msg.contains("version 1") && msg.contains("version 3"),
        "{msg}"
    );
    assert!(a.status().standbys.is_empty());
    a.shutdown();
}

#[test]
fn preflight_reports_first_failing_record() {
    let (a, _h) = active(2, "new");
    a.apply(vec![put_v2(1, "fine"), put_v2(2, "fine")]).unwrap();
    let ok = a.preflight(1).unwrap();
    assert_eq!((ok.records, ok.converted, ok.dropped), (2, 2, 0));
    // A value the downgrade cannot handle.
    a.apply(vec![put(3, "no-prefix")]).unwrap();
    let fail = a.preflight(1).unwrap_err();
    assert_eq!(fail.record.key, b"k3".to_vec());
    assert_eq!((fail.from, fail.to), (2, 1));
    // Live state untouched.
    assert_eq!(
        a.get("kv", b"k3").unwrap().as_deref(),
        Some(b"no-prefix".as_slice())
    );
    a.shutdown();
}

fn v1_records(v: u32) -> BoxedStrategy<Record> {
    assert_eq!(v, 1);
    ("[a-z]{1,8}", proptest::collection::vec(any::<u8>(), 0..64))
        .prop_map(|(k, v)| Record::new("kv", k.into_bytes(), v))
        .boxed()
}

#[test]
fn round_trip_helper_checks_every_registered_pair() {
    let pairs = hitless_sync::testing::check_round_trips(&schema(2), v1_records, 64).unwrap();
    assert_eq!(pairs, vec![(1, 2)]);
    // A lossy downgrade is caught.
    let lossy = schema(2).downgrade(2, |r: &Record| {
        Ok(Some(Record {
            value: r.value.iter().skip(4).copied().collect(),
            ..r.clone()
        }))
    });
    let err = hitless_sync::testing::check_round_trips(&lossy, v1_records, 64).unwrap_err();
    assert!(err.contains("1 <-> 2"), "{err}");
}
