//! hitless-control frames from a raw byte stream: `decode_frame` (buffer) and `read_frame`
//! (stream) must agree frame by frame, accepted frames must be the canonical encoding of their
//! body, a recoverable error must leave the stream aligned on the next frame, and the message
//! readers must accept exactly the frames of their direction whose body decodes.
//!
//! Input: one byte choosing the read chunk size of the stream readers, then the stream.
#![no_main]

use hitless_control::{
    decode_frame, encode_frame, read_agent_message, read_frame, read_instance_message,
    write_agent_message, write_instance_message, AgentMessage, ControlError, FrameKind,
    InstanceMessage, HEADER_LEN, MAX_BODY_LEN,
};
use hitless_fuzz::Chunked;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let mut rest = stream;
    let mut frames = Chunked::new(stream, chunk);
    let mut agent = Chunked::new(stream, chunk.rotate_left(3));
    let mut instance = Chunked::new(stream, chunk.rotate_left(6));
    // Each round consumes a header or stops: bounded by the input.
    loop {
        let at_start = rest;
        let decoded = decode_frame(rest);
        let read = read_frame(&mut frames);
        let am = read_agent_message(&mut agent);
        let im = read_instance_message(&mut instance);
        match decoded {
            Ok(Some((kind, body, used))) => {
                assert!(body.len() <= MAX_BODY_LEN);
                assert_eq!(used, HEADER_LEN + body.len());
                assert_eq!(encode_frame(kind, &body).expect("in bounds"), &rest[..used]);
                let (k2, b2) = read.expect("read_frame accepts it").expect("a frame");
                assert_eq!((k2, &b2), (kind, &body));
                check_message(kind, &body, am, im);
                rest = &rest[used..];
            }
            Ok(None) => {
                // Only ever a strict prefix of a frame: the stream readers hit its end.
                if rest.is_empty() {
                    assert!(matches!(read, Ok(None)), "{read:?}");
                    assert!(matches!(am, Ok(None)) && matches!(im, Ok(None)));
                } else {
                    let e = read.expect_err("a partial frame is an error at the end of a stream");
                    assert!(matches!(e, ControlError::Truncated { .. }), "{e}");
                    assert!(am.is_err() && im.is_err());
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
                assert!(am.is_err() && im.is_err());
                if !e.is_recoverable() {
                    break;
                }
                // A bad checksum inside an intact frame: all readers skip exactly that frame.
                let len = u32::from_be_bytes(rest[6..10].try_into().unwrap()) as usize;
                rest = &rest[HEADER_LEN + len..];
            }
        }
        assert!(rest.len() < at_start.len());
        assert_eq!(frames.remaining(), rest);
        assert_eq!(agent.remaining(), rest);
        assert_eq!(instance.remaining(), rest);
    }
});

/// The message readers on a frame of `kind` with `body`: the matching one decodes the body
/// exactly as serde_json does (and the result round-trips), the other refuses the direction.
fn check_message(
    kind: FrameKind,
    body: &[u8],
    am: Result<Option<AgentMessage>, ControlError>,
    im: Result<Option<InstanceMessage>, ControlError>,
) {
    match kind {
        FrameKind::Agent => {
            assert!(matches!(im, Err(ControlError::WrongKind { .. })), "{im:?}");
            match (am, serde_json::from_slice::<AgentMessage>(body)) {
                (Ok(Some(m)), Ok(j)) => {
                    assert_eq!(m, j);
                    let mut out = Vec::new();
                    write_agent_message(&mut out, &m).expect("re-encodes");
                    let back = read_agent_message(&mut &out[..]).expect("re-reads");
                    assert_eq!(back, Some(m));
                }
                (Err(ControlError::Body(_)), Err(_)) => {}
                (a, j) => panic!("read_agent_message {a:?} but serde_json {j:?}"),
            }
        }
        FrameKind::Instance => {
            assert!(matches!(am, Err(ControlError::WrongKind { .. })), "{am:?}");
            match (im, serde_json::from_slice::<InstanceMessage>(body)) {
                (Ok(Some(m)), Ok(j)) => {
                    assert_eq!(m, j);
                    let mut out = Vec::new();
                    write_instance_message(&mut out, &m).expect("re-encodes");
                    let back = read_instance_message(&mut &out[..]).expect("re-reads");
                    assert_eq!(back, Some(m));
                }
                (Err(ControlError::Body(_)), Err(_)) => {}
                (i, j) => panic!("read_instance_message {i:?} but serde_json {j:?}"),
            }
        }
    }
}
