//! Wire format: round trips, and malformed, truncated, oversized or bad-CRC
//! frames rejected without any partial apply.
mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::thread;
use std::time::Duration;

use common::*;
use hitless_sync::wire::{self, Control, FrameError, FrameType};
use hitless_sync::{Digest, Mutation};
use proptest::prelude::*;

fn batch(epoch: u64, first: u64, muts: &[Mutation]) -> Vec<u8> {
    let mut p = first.to_le_bytes().to_vec();
    p.extend_from_slice(&wire::encode_batch_payload(muts));
    wire::encode_frame(
        FrameType::Batch,
        hitless_sync::ControlEpoch(epoch),
        first + muts.len() as u64 - 1,
        &p,
    )
}

/// Feeds a standby a welcome, an empty bulk, one good batch, then `bad`;
/// returns the standby's records and applied seq after the link ended.
fn feed(bad: Vec<u8>, close_after: bool) -> (u64, Vec<hitless_sync::Record>, String) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let _ = wire::read_frame(&mut s).unwrap().unwrap();
        let mut out = Control::Welcome {
            node: "fake".into(),
            native: 1,
            stream_version: 1,
            tables: vec!["kv".into()],
            format: None,
        }
        .encode(hitless_sync::ControlEpoch(1), 0);
        out.extend(
            Control::BulkBegin { seq: 0, records: 0 }.encode(hitless_sync::ControlEpoch(1), 0),
        );
        out.extend(
            Control::BulkEnd {
                seq: 0,
                digest: Digest::default(),
                last_epoch: hitless_sync::ControlEpoch(0),
            }
            .encode(hitless_sync::ControlEpoch(1), 0),
        );
        out.extend(batch(1, 1, &[put(1, "good")]));
        out.extend(bad);
        s.write_all(&out).unwrap();
        if close_after {
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
        let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
        let mut buf = [0u8; 4096];
        while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
    });
    let s = standby(1, "s");
    let f = s.follow_tcp(addr, true).unwrap();
    let err = f.join().unwrap_err().to_string();
    let (seq, recs) = s.records();
    s.shutdown();
    t.join().unwrap();
    (seq, recs, err)
}

fn assert_only_good_applied(seq: u64, recs: &[hitless_sync::Record]) {
    assert_eq!(seq, 1);
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].value, b"good".to_vec());
}

fn three() -> Vec<Mutation> {
    vec![put(2, "bad"), put(3, "bad"), put(4, "bad")]
}

#[test]
fn bad_crc_frame_rejected_without_partial_apply() {
    let mut f = batch(1, 2, &three());
    let n = f.len();
    f[n - 2] ^= 0x40; // flip a bit in the last value
    let (seq, recs, err) = feed(f, false);
    assert!(err.contains("CRC"), "{err}");
    assert_only_good_applied(seq, &recs);
}

#[test]
fn truncated_frame_rejected_without_partial_apply() {
    let f = batch(1, 2, &three());
    let (seq, recs, err) = feed(f[..f.len() - 5].to_vec(), true);
    assert!(err.contains("truncated"), "{err}");
    assert_only_good_applied(seq, &recs);
}

#[test]
fn oversized_frame_rejected_without_partial_apply() {
    let mut f = batch(1, 2, &three());
    f[8..12].copy_from_slice(&((wire::MAX_PAYLOAD + 1) as u32).to_le_bytes());
    let (seq, recs, err) = feed(f, false);
    assert!(err.contains("exceeds the limit"), "{err}");
    assert_only_good_applied(seq, &recs);
}

#[test]
fn malformed_payload_rejected_without_partial_apply() {
    // A well-framed, CRC-correct batch whose last mutation runs past the end.
    let mut p = 2u64.to_le_bytes().to_vec();
    let mut body = wire::encode_batch_payload(&three());
    body.truncate(body.len() - 1);
    p.extend_from_slice(&body);
    let f = wire::encode_frame(FrameType::Batch, hitless_sync::ControlEpoch(1), 4, &p);
    let (seq, recs, err) = feed(f, false);
    assert!(err.contains("malformed"), "{err}");
    assert_only_good_applied(seq, &recs);
}

#[test]
fn sequence_gap_rejected_without_apply() {
    let (seq, recs, err) = feed(batch(1, 5, &three()), false);
    assert!(err.contains("sequence"), "{err}");
    assert_only_good_applied(seq, &recs);
}

#[test]
fn decoder_rejects_bad_magic_version_type_and_flags() {
    let good = wire::encode_frame(FrameType::Ack, hitless_sync::ControlEpoch(1), 2, &[]);
    let mut f = good.clone();
    f[0] = b'X';
    assert!(matches!(
        wire::decode_frame(&f),
        Err(FrameError::BadMagic(_))
    ));
    let mut f = good.clone();
    f[4] = 9;
    assert!(matches!(
        wire::decode_frame(&f),
        Err(FrameError::BadVersion { version: 9, .. })
    ));
    let mut f = good.clone();
    f[5] = 200;
    assert!(matches!(
        wire::decode_frame(&f),
        Err(FrameError::BadType(200))
    ));
    let mut f = good.clone();
    f[6] = 1;
    assert!(matches!(
        wire::decode_frame(&f),
        Err(FrameError::BadFlags(1))
    ));
    assert!(wire::decode_frame(&good).is_ok());
}

fn mutation() -> impl Strategy<Value = Mutation> {
    (
        "[a-z]{1,12}",
        proptest::collection::vec(any::<u8>(), 0..40),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..200)),
    )
        .prop_map(|(t, k, v)| match v {
            Some(v) => Mutation::put(t, k, v),
            None => Mutation::delete(t, k),
        })
}

proptest! {
    #[test]
    fn batch_frames_round_trip(muts in proptest::collection::vec(mutation(), 1..40), epoch in any::<u64>(), first in 1u64..1_000_000) {
        let f = batch(epoch, first, &muts);
        let (frame, used) = wire::decode_frame(&f).unwrap();
        prop_assert_eq!(used, f.len());
        prop_assert_eq!(frame.epoch.0, epoch);
        let (a, b, decoded) = wire::decode_batch_frame(&frame).unwrap();
        prop_assert_eq!((a, b), (first, first + muts.len() as u64 - 1));
        let back: Vec<Mutation> = decoded.iter().map(|m| m.to_mutation()).collect();
        prop_assert_eq!(back, muts);
    }

    #[test]
    fn control_frames_round_trip(seq in any::<u64>(), records in any::<u64>()) {
        let c = Control::BulkBegin { seq, records };
        let (frame, _) = wire::decode_frame(&c.encode(hitless_sync::ControlEpoch(3), seq)).unwrap();
        prop_assert_eq!(Control::decode(&frame).unwrap(), c);
    }

    #[test]
    fn any_single_byte_corruption_is_rejected(muts in proptest::collection::vec(mutation(), 1..8), at in any::<prop::sample::Index>(), bit in 0u8..8) {
        let mut f = batch(1, 1, &muts);
        let i = at.index(f.len());
        f[i] ^= 1 << bit;
        prop_assert!(wire::decode_frame(&f).is_err());
    }

    #[test]
    fn decoder_never_panics_on_arbitrary_input(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok((frame, _)) = wire::decode_frame(&data) {
            let _ = wire::decode_batch_frame(&frame);
            let _ = Control::decode(&frame);
        }
    }
}

#[test]
fn control_messages_round_trip_and_older_ones_still_decode() {
    for c in [
        Control::ResumeBegin {
            from: 7,
            seq: 9,
            batches: 2,
        },
        Control::ResumeEnd {
            seq: 9,
            last_epoch: hitless_sync::ControlEpoch(2),
            digest: Digest::default(),
        },
        Control::Hello {
            service: "kv".into(),
            node: "n".into(),
            native: 1,
            reads: vec![1],
            writes: vec![1],
            ha: true,
            epoch: hitless_sync::ControlEpoch(3),
            resume: Some(hitless_sync::ResumePoint {
                seq: 9,
                epoch: hitless_sync::ControlEpoch(2),
            }),
            formats: Some(wire::BUILD_FORMATS),
        },
    ] {
        let (f, _) = wire::decode_frame(&c.encode(hitless_sync::ControlEpoch(3), 9)).unwrap();
        assert_eq!(Control::decode(&f).unwrap(), c);
    }
    // As a build without resumes writes them: no resume point, no last epoch.
    let hello = br#"{"t":"hello","service":"kv","node":"n","native":1,"reads":[1],"writes":[1],"ha":true,"epoch":3}"#;
    match Control::decode_payload(FrameType::Hello, hello).unwrap() {
        Control::Hello { resume, .. } => assert_eq!(resume, None),
        c => panic!("{c:?}"),
    }
    let end = br#"{"t":"bulk_end","seq":5,"digest":{"tables":{}}}"#;
    match Control::decode_payload(FrameType::BulkEnd, end).unwrap() {
        Control::BulkEnd { last_epoch, .. } => {
            assert_eq!(last_epoch, hitless_sync::ControlEpoch(0))
        }
        c => panic!("{c:?}"),
    }
    // A payload of another message type is refused.
    assert!(Control::decode_payload(FrameType::ResumeEnd, end).is_err());
    for t in [15u8, 16, 17] {
        assert_eq!(FrameType::from_u8(t).map(|k| k as u8), Some(t));
    }
}
