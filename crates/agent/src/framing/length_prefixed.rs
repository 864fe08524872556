//! Length-prefixed framing: a big-endian `u32` length, then that many bytes.

use super::{Framing, FramingError, OnProtocolError, Protocol, ReplyFrame};

/// The bytes of the length in front of every message.
pub const LENGTH_PREFIX: usize = 4;

/// Every request and every reply is a big-endian `u32` length followed by that many bytes
/// (zero is allowed); replies come in the order of the requests, one each, and nothing is
/// pushed. A length above the bound is a protocol error: the protocol has no error reply, so
/// the front closes the connection.
#[derive(Debug, Clone, Copy)]
pub struct LengthPrefixedFraming {
    max_len: usize,
}

impl LengthPrefixedFraming {
    /// A framing refusing messages that declare more than `max_len` bytes (after the prefix).
    pub fn new(max_len: usize) -> Self {
        Self { max_len }
    }

    /// The bound on a message's declared length.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The length of the first complete message in `buf` (prefix included), `Ok(None)` if
    /// more bytes are needed, or an error as soon as the prefix declares more than the bound.
    pub fn message_len(&self, buf: &[u8]) -> Result<Option<usize>, FramingError> {
        let Some(prefix) = buf.get(..LENGTH_PREFIX) else {
            return Ok(None);
        };
        let declared = u32::from_be_bytes(prefix.try_into().expect("4 bytes"));
        // A u32 fits a usize on every target the agent builds for (64-bit Linux); saturate
        // elsewhere, which the bound then refuses.
        let len = usize::try_from(declared).unwrap_or(usize::MAX);
        if len > self.max_len {
            return Err(FramingError::TooLarge {
                len,
                max: self.max_len,
            });
        }
        let total = LENGTH_PREFIX + len;
        Ok((buf.len() >= total).then_some(total))
    }
}

impl Framing for LengthPrefixedFraming {
    fn protocol(&self) -> Protocol {
        Protocol::LengthPrefixed
    }

    fn holds_requests(&self) -> bool {
        true
    }

    fn request_len(&self, buf: &[u8]) -> Result<Option<usize>, FramingError> {
        self.message_len(buf)
    }

    fn reply_len(&self, buf: &[u8]) -> Result<Option<ReplyFrame>, FramingError> {
        Ok(self
            .message_len(buf)?
            .map(|len| ReplyFrame { len, push: false }))
    }

    fn on_protocol_error(&self, _: &FramingError) -> OnProtocolError {
        OnProtocolError::Close
    }

    fn max_message(&self) -> usize {
        LENGTH_PREFIX.saturating_add(self.max_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(payload: &[u8]) -> Vec<u8> {
        let mut m = (payload.len() as u32).to_be_bytes().to_vec();
        m.extend_from_slice(payload);
        m
    }

    #[test]
    fn a_message_is_its_prefix_and_the_bytes_it_declares() {
        let f = LengthPrefixedFraming::new(1024);
        let mut two = framed(b"hello");
        two.extend(framed(b""));
        assert_eq!(f.request_len(&two), Ok(Some(9)));
        assert_eq!(f.request_len(&two[9..]), Ok(Some(4)), "an empty message");
        assert_eq!(
            f.reply_len(&two),
            Ok(Some(ReplyFrame {
                len: 9,
                push: false
            }))
        );
    }

    #[test]
    fn every_strict_prefix_needs_more_bytes() {
        let f = LengthPrefixedFraming::new(1024);
        let m = framed(b"a message");
        for cut in 0..m.len() {
            assert_eq!(f.request_len(&m[..cut]), Ok(None), "cut at {cut}");
            assert_eq!(f.reply_len(&m[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn a_length_above_the_bound_is_refused_from_the_prefix_alone() {
        let f = LengthPrefixedFraming::new(8);
        assert_eq!(f.request_len(&framed(&[0; 8])), Ok(Some(12)));
        assert_eq!(
            f.request_len(&9u32.to_be_bytes()),
            Err(FramingError::TooLarge { len: 9, max: 8 })
        );
        assert_eq!(
            f.reply_len(&u32::MAX.to_be_bytes()),
            Err(FramingError::TooLarge {
                len: u32::MAX as usize,
                max: 8
            })
        );
        assert_eq!(
            f.on_protocol_error(&FramingError::TooLarge { len: 9, max: 8 }),
            OnProtocolError::Close
        );
        let text = FramingError::TooLarge { len: 9, max: 8 }.to_string();
        assert_eq!(
            text,
            "a length-prefixed message declares 9 bytes, above the limit of 8 bytes"
        );
    }

    proptest::proptest! {
        #[test]
        fn never_panics_and_never_overruns(
            declared in 0u32..80,
            tail in proptest::collection::vec(proptest::num::u8::ANY, 0..96),
            cut in 0usize..100,
            max in 0usize..64,
        ) {
            let f = LengthPrefixedFraming::new(max);
            let mut bytes = declared.to_be_bytes().to_vec();
            bytes.extend_from_slice(&tail);
            bytes.truncate(cut);
            let d = declared as usize;
            let want = if bytes.len() < LENGTH_PREFIX {
                Ok(None)
            } else if d > max {
                Err(FramingError::TooLarge { len: d, max })
            } else if bytes.len() < LENGTH_PREFIX + d {
                Ok(None)
            } else {
                Ok(Some(LENGTH_PREFIX + d))
            };
            proptest::prop_assert_eq!(f.request_len(&bytes), want.clone());
            proptest::prop_assert_eq!(
                f.reply_len(&bytes),
                want.map(|n| n.map(|len| ReplyFrame { len, push: false }))
            );
        }
    }
}
