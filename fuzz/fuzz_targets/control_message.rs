//! hitless-control messages past the frame checks: the input body is wrapped in a valid frame
//! so the fuzzer works on the JSON decoding of `AgentMessage` and `InstanceMessage`.
//!
//! Input: one byte choosing the direction (even: agent, odd: instance), then the body.
//! Checked: the reader of that direction decodes or refuses the body as `Body`, a decoded
//! message writes and reads back equal, and its re-encoding is a fixed point.
#![no_main]

use hitless_control::{
    encode_frame, read_agent_message, read_instance_message, write_agent_message,
    write_instance_message, ControlError, FrameKind, MAX_BODY_LEN,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&dir, body)) = data.split_first() else {
        return;
    };
    if body.len() > MAX_BODY_LEN {
        return;
    }
    let kind = if dir % 2 == 0 {
        FrameKind::Agent
    } else {
        FrameKind::Instance
    };
    let frame = encode_frame(kind, body).expect("within the body limit");
    match kind {
        FrameKind::Agent => match read_agent_message(&mut &frame[..]) {
            Ok(Some(m)) => {
                let mut out = Vec::new();
                write_agent_message(&mut out, &m).expect("re-encodes");
                let back = read_agent_message(&mut &out[..]).expect("re-reads");
                assert_eq!(back.as_ref(), Some(&m));
                let mut out2 = Vec::new();
                write_agent_message(&mut out2, &back.unwrap()).expect("re-encodes");
                assert_eq!(out, out2);
            }
            Ok(None) => panic!("a whole frame read as the end of the stream"),
            Err(e) => assert!(matches!(e, ControlError::Body(_)), "{e}"),
        },
        FrameKind::Instance => match read_instance_message(&mut &frame[..]) {
            Ok(Some(m)) => {
                let mut out = Vec::new();
                write_instance_message(&mut out, &m).expect("re-encodes");
                let back = read_instance_message(&mut &out[..]).expect("re-reads");
                assert_eq!(back.as_ref(), Some(&m));
                let mut out2 = Vec::new();
                write_instance_message(&mut out2, &back.unwrap()).expect("re-encodes");
                assert_eq!(out, out2);
            }
            Ok(None) => panic!("a whole frame read as the end of the stream"),
            Err(e) => assert!(matches!(e, ControlError::Body(_)), "{e}"),
        },
    }
});
