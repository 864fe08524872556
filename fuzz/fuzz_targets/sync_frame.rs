//! hitless-sync frames from a raw byte stream: `decode_frame`, `decode_header`, `read_frame`
//! and `read_frame_into` must agree on every frame and every error, and each accepted frame
//! must be the canonical encoding of what it decoded to.
//!
//! Input: one byte choosing the read chunk size of the stream readers, then the stream.
#![no_main]

use hitless_fuzz::Chunked;
use hitless_sync::wire::{self, FrameError, HEADER_LEN, MAX_PAYLOAD};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let mut rest = stream;
    let mut reader = Chunked::new(stream, chunk);
    let mut reader_into = Chunked::new(stream, chunk.rotate_left(4));
    let mut buf = Vec::new();
    // Every accepted frame consumes at least a header: the loop is bounded by the input.
    loop {
        let decoded = wire::decode_frame(rest);
        let read = wire::read_frame(&mut reader);
        let read_into = wire::read_frame_into(&mut reader_into, &mut buf);
        match decoded {
            Ok((frame, used)) => {
                assert_eq!(used, HEADER_LEN + frame.payload.len());
                assert!(used <= rest.len());
                assert!(frame.payload.len() <= MAX_PAYLOAD);
                let h = wire::decode_header(rest).expect("an accepted frame has a valid header");
                assert_eq!(
                    (h.kind, h.len, h.epoch, h.seq),
                    (frame.kind, frame.payload.len(), frame.epoch, frame.seq)
                );
                // Version, flags and length are fixed by the format: the encoding is canonical.
                let again = wire::encode_frame(frame.kind, frame.epoch, frame.seq, &frame.payload);
                assert_eq!(again, &rest[..used]);
                let r = read.expect("read_frame accepts what decode_frame accepts");
                assert_eq!(r.as_ref(), Some(&frame));
                let ri = read_into.expect("read_frame_into accepts what decode_frame accepts");
                assert_eq!(ri, Some(h));
                assert_eq!(&buf[..], &frame.payload[..]);
                rest = &rest[used..];
                assert_eq!(reader.remaining(), rest);
                assert_eq!(reader_into.remaining(), rest);
            }
            Err(e) => {
                if rest.is_empty() {
                    assert!(matches!(read, Ok(None)), "{read:?}");
                    assert!(matches!(read_into, Ok(None)), "{read_into:?}");
                } else {
                    let re = read.expect_err("read_frame refuses what decode_frame refuses");
                    let rie =
                        read_into.expect_err("read_frame_into refuses what decode_frame refuses");
                    // The header is checked before its payload is read: a header error is the
                    // same for all three, and a payload-level error leaves no payload behind.
                    if wire::decode_header(rest).is_ok() {
                        assert!(buf.is_empty(), "read_frame_into kept a refused payload");
                    } else {
                        assert_eq!(re.to_string(), rie.to_string());
                    }
                    if let FrameError::Truncated { needed, have } = e {
                        assert_eq!(have, rest.len());
                        assert!(needed > have);
                    }
                }
                break;
            }
        }
    }
});
