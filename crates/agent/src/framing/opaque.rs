//! Opaque "framing": no boundaries known.

use super::{Framing, FramingError, OnProtocolError, Protocol, ReplyFrame};

/// A protocol the front knows nothing of: it relays bytes both ways as they come. With no
/// request boundaries there is nothing to count, hold or replay; the front drains connections
/// for a planned switchover (see [`crate::front`]). The measures below only say that all the
/// bytes at hand can go on now, and that none of them answers a request.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpaqueFraming;

impl Framing for OpaqueFraming {
    fn protocol(&self) -> Protocol {
        Protocol::Opaque
    }

    fn holds_requests(&self) -> bool {
        false
    }

    fn request_len(&self, buf: &[u8]) -> Result<Option<usize>, FramingError> {
        Ok((!buf.is_empty()).then_some(buf.len()))
    }

    fn reply_len(&self, buf: &[u8]) -> Result<Option<ReplyFrame>, FramingError> {
        Ok((!buf.is_empty()).then_some(ReplyFrame {
            len: buf.len(),
            push: true,
        }))
    }

    fn on_protocol_error(&self, _: &FramingError) -> OnProtocolError {
        OnProtocolError::Close
    }

    fn max_message(&self) -> usize {
        // Nothing is reassembled: every byte may go on as soon as it came.
        usize::MAX
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_bytes_at_hand_go_on_and_answer_nothing() {
        let f = OpaqueFraming;
        assert!(!f.holds_requests());
        assert_eq!(f.request_len(b""), Ok(None));
        assert_eq!(f.request_len(b"\x00\xffanything"), Ok(Some(10)));
        assert_eq!(f.reply_len(b""), Ok(None));
        assert_eq!(
            f.reply_len(b"abc"),
            Ok(Some(ReplyFrame { len: 3, push: true }))
        );
        assert_eq!(
            f.on_protocol_error(&FramingError::TooLarge { len: 1, max: 0 }),
            OnProtocolError::Close
        );
    }
}
