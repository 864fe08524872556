//! hitless-sync frame payloads, past the CRC: the input is wrapped in a valid frame so the
//! fuzzer works on the batch, bulk-chunk, replay and control payload decoders directly.
//!
//! Input: frame type selector (1 byte), header sequence (8 bytes LE), epoch (1 byte), payload.
//! Checked: decoders agree with each other, accepted payloads re-encode to the same bytes,
//! counts and sequence ranges hold, and control messages round-trip.
#![no_main]

use hitless_fuzz::take_u64;
use hitless_sync::wire::{self, BatchRef, Control, FrameType, WireMutation};
use hitless_sync::Mutation;
use libfuzzer_sys::fuzz_target;

/// Checks a validated body against the allocating decoder and re-encodes it.
fn check_body(kind: FrameType, body: &[u8]) -> Option<Vec<Mutation>> {
    let borrowed = BatchRef::parse(kind, body);
    let owned = wire::decode_batch(kind, &bytes_of(body));
    let (b, muts) = match (borrowed, owned) {
        (Ok(b), Ok(m)) => (b, m),
        (Err(x), Err(y)) => {
            assert_eq!(x, y);
            return None;
        }
        (x, y) => panic!("BatchRef::parse {x:?} but decode_batch {y:?}"),
    };
    assert_eq!(b.len(), muts.len());
    assert_eq!(b.is_empty(), muts.is_empty());
    assert_eq!(b.iter().count(), b.len());
    assert_eq!(
        b.deletes(),
        muts.iter().filter(|m| m.value.is_none()).count()
    );
    for (r, w) in b.iter().zip(&muts) {
        assert_eq!(r.table, w.table_str());
        assert_eq!(r.key, &w.key[..]);
        assert_eq!(r.value, w.value.as_deref());
    }
    let first = muts.first().map(WireMutation::table_str);
    let single = first.filter(|t| muts.iter().all(|m| m.table_str() == *t));
    assert_eq!(b.single_table(), single);
    let muts: Vec<Mutation> = muts.iter().map(WireMutation::to_mutation).collect();
    // The layout has exactly one encoding per mutation list.
    assert_eq!(wire::encode_batch_payload(&muts), body);
    Some(muts)
}

fn bytes_of(b: &[u8]) -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(b)
}

/// A batch payload (first sequence, then a body) under header sequence `last`.
fn check_batch(last: u64, payload: &[u8]) {
    let Ok((first, body)) = wire::parse_batch_payload(last, payload) else {
        // Refused: the range, the body, or the count against the range must be at fault.
        let range = check_range(last, payload);
        let body = payload
            .get(8..)
            .and_then(|b| check_body(FrameType::Batch, b));
        if let (Some(first), Some(muts)) = (range, body) {
            let span = u128::from(last) + 1 - u128::from(first);
            assert!(
                muts.len() as u128 > span,
                "a batch that fits its range was refused"
            );
        }
        return;
    };
    assert!(first >= 1);
    assert!(u128::from(first) <= u128::from(last) + 1);
    assert!(body.len() as u128 <= u128::from(last) + 1 - u128::from(first));
    let muts = check_body(FrameType::Batch, &payload[8..]).expect("the body was accepted");
    let mut again = first.to_le_bytes().to_vec();
    again.extend(wire::encode_batch_payload(&muts));
    assert_eq!(again, payload);
}

/// The first sequence of a batch payload, if the range alone is acceptable.
fn check_range(last: u64, payload: &[u8]) -> Option<u64> {
    let first = u64::from_le_bytes(payload.get(..8)?.try_into().unwrap());
    (first >= 1 && u128::from(first) <= u128::from(last) + 1).then_some(first)
}

fuzz_target!(|data: &[u8]| {
    let mut data = data;
    let kind = FrameType::from_u8(1 + (take_u64(&mut data, 1) % 17) as u8).expect("1..=17");
    let seq = take_u64(&mut data, 8);
    let epoch = take_u64(&mut data, 1);
    let payload = data;

    let bytes = wire::encode_frame(kind, epoch, seq, payload);
    let (frame, used) = wire::decode_frame(&bytes).expect("an encoded frame decodes");
    assert_eq!(used, bytes.len());
    assert_eq!((frame.kind, frame.epoch, frame.seq), (kind, epoch, seq));
    assert_eq!(&frame.payload[..], payload);

    match kind {
        FrameType::Batch => {
            check_batch(seq, payload);
            match wire::decode_batch_frame(&frame) {
                Ok((first, last, muts)) => {
                    assert_eq!(last, seq);
                    let (f, b) = wire::parse_batch_payload(seq, payload).expect("agrees");
                    assert_eq!((first, b.len()), (f, muts.len()));
                }
                Err(_) => assert!(wire::parse_batch_payload(seq, payload).is_err()),
            }
        }
        FrameType::BulkChunk => {
            check_body(kind, payload);
        }
        // The origin epoch, then a batch payload.
        FrameType::ReplayBatch if payload.len() >= 8 => check_batch(seq, &payload[8..]),
        FrameType::ReplayBatch
        | FrameType::Ack
        | FrameType::PromoteAck
        | FrameType::Fence
        | FrameType::Heartbeat => {}
        _ => match Control::decode(&frame) {
            Ok(c) => {
                assert_eq!(c.frame_type(), kind);
                let (f2, _) = wire::decode_frame(&c.encode(epoch, seq)).expect("re-encoded");
                assert_eq!(Control::decode(&f2).expect("re-decoded"), c);
            }
            Err(e) => {
                assert!(matches!(e, wire::FrameError::BadPayload { kind: k, .. } if k == kind))
            }
        },
    }
});
