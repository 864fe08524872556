//! The front's framing: how it tells where one request or reply of a service's protocol ends.
//!
//! The front does not interpret requests; it needs their boundaries to count what is in
//! flight per connection, to hold new requests during a planned switchover and to replay
//! unanswered ones after a failover. Each protocol the front can serve implements [`Framing`]
//! and is chosen by [`Protocol`]:
//! - [`Protocol::Resp`]: RESP2 and RESP3 (Redis and the reference service kvd), including
//!   inline commands, RESP3 attributes and pushes;
//! - [`Protocol::LengthPrefixed`]: every request and every reply is a big-endian `u32` length
//!   followed by that many bytes, replies in the order of the requests;
//! - [`Protocol::Opaque`]: no boundaries known. The front relays bytes as they come, cannot
//!   hold or replay anything, and drains connections for a planned switchover instead.

mod length_prefixed;
mod opaque;
mod resp;

use std::sync::Arc;

use thiserror::Error;

pub use length_prefixed::{LengthPrefixedFraming, LENGTH_PREFIX};
pub use opaque::OpaqueFraming;
pub use resp::RespFraming;

/// The protocol the front speaks with clients and instances: the one the image's service
/// contract declares (one vocabulary from the manifest to the front).
pub use hitless_image::Protocol;

/// The framing of each protocol.
pub trait ProtocolFraming {
    /// The framing of this protocol, with messages bounded by `max_message` bytes where the
    /// protocol declares lengths up front (length-prefixed; RESP has its own fixed bound,
    /// [`crate::resp::MAX_MESSAGE`]).
    fn framing(self, max_message: usize) -> Arc<dyn Framing>;
}

impl ProtocolFraming for Protocol {
    fn framing(self, max_message: usize) -> Arc<dyn Framing> {
        match self {
            Protocol::Resp => Arc::new(RespFraming),
            Protocol::LengthPrefixed => Arc::new(LengthPrefixedFraming::new(max_message)),
            Protocol::Opaque => Arc::new(OpaqueFraming),
        }
    }
}

/// One complete reply at the head of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyFrame {
    /// Its length in bytes.
    pub len: usize,
    /// Out-of-band data for the client (a RESP3 push: pub/sub, invalidation), which answers
    /// no request: the front passes it on and pairs nothing with it.
    pub push: bool,
}

/// Bytes that cannot be a message of the front's protocol.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum FramingError {
    /// Malformed RESP.
    #[error(transparent)]
    Resp(#[from] crate::resp::FrameError),
    /// A length prefix above the bound.
    #[error("a length-prefixed message declares {len} bytes, above the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
}

/// What the front does with a client whose request cannot be framed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnProtocolError {
    /// Sends these bytes (the protocol's own error reply), then closes the connection.
    Reply(Vec<u8>),
    /// Closes the connection: the protocol has no error reply the front could send.
    Close,
}

/// Where messages of one protocol end. Implementations are stateless: a connection's buffers
/// hold all the state, and every method looks at the head of a buffer only.
pub trait Framing: Send + Sync + std::fmt::Debug {
    /// The protocol this framing implements.
    fn protocol(&self) -> Protocol;

    /// Whether the front knows request boundaries: it then counts the requests in flight,
    /// holds new ones during a planned switchover and replays unanswered ones after a
    /// failover. Without them it relays bytes as they come and drains connections instead
    /// (see [`crate::front`]); [`Self::request_len`] and [`Self::reply_len`] then only
    /// measure the bytes at hand.
    fn holds_requests(&self) -> bool;

    /// The length of filler at the head of a client's input that is no request and gets no
    /// reply (RESP: blank lines between requests, which Redis drops too); complete filler
    /// only.
    fn filler_len(&self, buf: &[u8]) -> usize {
        let _ = buf;
        0
    }

    /// The length of the first complete request in `buf`, `Ok(None)` if more bytes are
    /// needed, or an error if the bytes cannot be a request.
    fn request_len(&self, buf: &[u8]) -> Result<Option<usize>, FramingError>;

    /// The first complete reply in `buf`, `Ok(None)` if more bytes are needed, or an error if
    /// the bytes cannot be a reply.
    fn reply_len(&self, buf: &[u8]) -> Result<Option<ReplyFrame>, FramingError>;

    /// What a client that sent bytes which are no request gets.
    fn on_protocol_error(&self, err: &FramingError) -> OnProtocolError;

    /// The largest single message: more bytes than this without a complete reply in them are
    /// an error.
    fn max_message(&self) -> usize;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_protocol_builds_its_own_framing() {
        for p in [Protocol::Resp, Protocol::LengthPrefixed, Protocol::Opaque] {
            assert_eq!(p.framing(1024).protocol(), p);
        }
        assert!(Protocol::Resp.framing(1024).holds_requests());
        assert!(Protocol::LengthPrefixed.framing(1024).holds_requests());
        assert!(!Protocol::Opaque.framing(1024).holds_requests());
        assert_eq!(Protocol::default(), Protocol::Resp);
    }

    #[test]
    fn protocols_serialize_under_their_manifest_names() {
        let names: Vec<String> = [Protocol::Resp, Protocol::LengthPrefixed, Protocol::Opaque]
            .iter()
            .map(|p| serde_json::to_string(p).unwrap())
            .collect();
        assert_eq!(names, ["\"resp\"", "\"length-prefixed\"", "\"opaque\""]);
        let back: Protocol = serde_json::from_str("\"length-prefixed\"").unwrap();
        assert_eq!(back, Protocol::LengthPrefixed);
    }

    #[test]
    fn the_length_prefixed_bound_is_the_one_given() {
        let f = Protocol::LengthPrefixed.framing(16);
        assert_eq!(f.max_message(), LENGTH_PREFIX + 16);
        assert_eq!(
            f.request_len(&17u32.to_be_bytes()),
            Err(FramingError::TooLarge { len: 17, max: 16 })
        );
    }
}
