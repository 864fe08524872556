//! RESP framing (RESP2 and RESP3), over [`crate::resp`].

use super::{Framing, FramingError, OnProtocolError, Protocol, ReplyFrame};
use crate::resp;

/// RESP2 and RESP3: requests are multibulk arrays or inline commands, blank lines between
/// them are dropped; replies may be RESP3 maps, sets, attributes and pushes, and a push
/// answers no request. A malformed request gets `-ERR protocol error: ...` before the
/// connection closes, as Redis does.
#[derive(Debug, Clone, Copy, Default)]
pub struct RespFraming;

impl Framing for RespFraming {
    fn protocol(&self) -> Protocol {
        Protocol::Resp
    }

    fn holds_requests(&self) -> bool {
        true
    }

    fn filler_len(&self, buf: &[u8]) -> usize {
        resp::blank_prefix(buf)
    }

    fn request_len(&self, buf: &[u8]) -> Result<Option<usize>, FramingError> {
        Ok(resp::message_len(buf)?)
    }

    fn reply_len(&self, buf: &[u8]) -> Result<Option<ReplyFrame>, FramingError> {
        Ok(resp::reply_len(buf)?)
    }

    fn on_protocol_error(&self, err: &FramingError) -> OnProtocolError {
        OnProtocolError::Reply(format!("-ERR protocol error: {err}\r\n").into_bytes())
    }

    fn max_message(&self) -> usize {
        resp::MAX_MESSAGE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_blank_lines_are_measured_as_the_resp_module_does() {
        let f = RespFraming;
        assert_eq!(f.request_len(b"*1\r\n$4\r\nPING\r\n+x"), Ok(Some(14)));
        assert_eq!(f.request_len(b"*1\r\n$4\r\nPI"), Ok(None));
        assert_eq!(f.request_len(b"PING\r\n"), Ok(Some(6)));
        assert_eq!(f.filler_len(b"\r\n\n PING\r\n"), 3);
        assert!(matches!(
            f.request_len(b"$x\r\n"),
            Err(FramingError::Resp(resp::FrameError::BadLength(_)))
        ));
    }

    #[test]
    fn a_map_is_one_reply_and_a_push_answers_no_request() {
        let f = RespFraming;
        assert_eq!(
            f.reply_len(b"%1\r\n+a\r\n+b\r\n+next\r\n"),
            Ok(Some(ReplyFrame {
                len: 12,
                push: false
            }))
        );
        assert_eq!(
            f.reply_len(b">2\r\n+msg\r\n+x\r\n%1\r\n"),
            Ok(Some(ReplyFrame {
                len: 14,
                push: true
            }))
        );
    }

    #[test]
    fn a_protocol_error_is_answered_with_a_resp_error_naming_it() {
        let f = RespFraming;
        let err = f.request_len(b"$x\r\n").unwrap_err();
        let OnProtocolError::Reply(reply) = f.on_protocol_error(&err) else {
            panic!("RESP answers a protocol error");
        };
        let text = String::from_utf8(reply).unwrap();
        assert!(text.starts_with("-ERR protocol error: "), "{text}");
        assert!(text.contains("invalid length header"), "{text}");
        assert!(text.ends_with("\r\n") && !text[..text.len() - 2].contains('\r'));
    }
}
