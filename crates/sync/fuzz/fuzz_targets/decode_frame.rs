//! Fuzzes the frame decoder and the payload decoders behind it.
#![no_main]

use hitless_sync::wire::{self, Control, FrameType};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok((frame, used)) = wire::decode_frame(rest) {
        match frame.kind {
            FrameType::Batch => {
                let _ = wire::decode_batch_frame(&frame);
            }
            FrameType::BulkChunk => {
                let _ = wire::decode_batch(frame.kind, &frame.payload);
                if let Ok(b) = wire::BatchRef::parse(frame.kind, &frame.payload) {
                    assert_eq!(b.iter().count(), b.len());
                }
            }
            FrameType::ReplayBatch if frame.payload.len() >= 8 => {
                if let Ok((_, b)) = wire::parse_batch_payload(frame.seq, &frame.payload[8..]) {
                    assert_eq!(b.iter().filter(|m| m.value.is_none()).count(), b.deletes());
                }
            }
            _ => {
                let _ = Control::decode(&frame);
            }
        }
        rest = &rest[used..];
    }
    let _ = wire::read_frame(&mut &data[..]);
    let mut buf = Vec::new();
    let _ = wire::read_frame_into(&mut &data[..], &mut buf);
});
