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
            }
            _ => {
                let _ = Control::decode(&frame);
            }
        }
        rest = &rest[used..];
    }
    let _ = wire::read_frame(&mut &data[..]);
});
