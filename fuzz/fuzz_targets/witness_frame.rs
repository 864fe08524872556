//! hitless-witness frames from a raw byte stream: `decode_frame` (buffer) and `read_frame`
//! (async stream) must agree frame by frame, each accepted frame must be the canonical encoding
//! of its body, and a request or answer decoded from one must survive its own re-encoding.
//!
//! Input: one byte choosing the read chunk size of the stream reader, then the stream.
#![no_main]

use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use hitless_witness::builtin::frame::{
    decode_frame, encode_frame, read_frame, Frame, BUILD_FORMATS, HEADER_LEN, MAX_BODY_LEN,
};
use hitless_witness::builtin::{Request, Response, WireError};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, ReadBuf};

/// An async reader over a byte slice handing out at most `chunk` bytes per poll.
struct Chunked<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = buf.remaining().min(self.chunk).min(self.data.len());
        buf.put_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Poll::Ready(Ok(()))
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let mut rest = stream;
    let mut reader = Chunked {
        data: stream,
        chunk: 1 + usize::from(chunk),
    };
    // Each accepted frame consumes at least a header: bounded by the input.
    loop {
        let at_start = rest;
        let decoded = decode_frame(rest, BUILD_FORMATS);
        let read = runtime().block_on(read_frame(&mut reader, BUILD_FORMATS));
        match decoded {
            Ok(Some((frame, used))) => {
                assert!(frame.body.len() <= MAX_BODY_LEN);
                assert_eq!(used, HEADER_LEN + frame.body.len());
                let again =
                    encode_frame(frame.version, frame.kind, &frame.body).expect("in bounds");
                assert_eq!(again, &rest[..used]);
                let streamed = read.expect("read_frame accepts it").expect("a frame");
                assert_eq!(streamed, frame);
                check_messages(&frame);
                rest = &rest[used..];
            }
            Ok(None) => {
                if rest.is_empty() {
                    assert!(matches!(read, Ok(None)), "{read:?}");
                } else {
                    assert!(matches!(read, Err(WireError::Truncated { .. })), "{read:?}");
                }
                break;
            }
            Err(e) => {
                let re = read.expect_err("read_frame refuses what decode_frame refuses");
                assert_eq!(
                    std::mem::discriminant(&e),
                    std::mem::discriminant(&re),
                    "{e} / {re}"
                );
                break;
            }
        }
        assert!(rest.len() < at_start.len());
        assert_eq!(reader.data, rest);
    }
});

/// A message decoded from a frame re-encodes to a frame that decodes to the same message.
fn check_messages(frame: &Frame) {
    if let Ok(r) = Request::decode(frame) {
        let f = r
            .encode(frame.version)
            .expect("a decoded request re-encodes");
        let (back, _) = decode_frame(&f, BUILD_FORMATS)
            .expect("re-encoded frame decodes")
            .expect("whole");
        assert_eq!(Request::decode(&back).expect("re-decodes"), r);
    }
    if let Ok(r) = Response::decode(frame) {
        let f = r
            .encode(frame.version)
            .expect("a decoded answer re-encodes");
        let (back, _) = decode_frame(&f, BUILD_FORMATS)
            .expect("re-encoded frame decodes")
            .expect("whole");
        assert_eq!(Response::decode(&back).expect("re-decodes"), r);
    }
}
