use std::time::Duration;

/// Everything that can go wrong on the control channel.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The underlying byte stream failed.
    #[error("control channel I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// The frame does not start with the control magic.
    #[error("frame starts with {0:02x?} instead of the control magic \"HLCT\"; the peer does not speak the control protocol")]
    BadMagic([u8; 4]),
    /// The frame format version is not one this end reads.
    #[error(
        "control frame format {found} is not supported; this end reads control formats {range}"
    )]
    UnsupportedVersion {
        /// Version found in the frame.
        found: u8,
        /// Formats this end reads.
        range: crate::FormatRange,
    },
    /// The agent and the instance share no frame format.
    #[error(
        "no common control frame format: the agent reads and writes control formats {agent}, \
         the instance {instance}"
    )]
    NoCommonFormat {
        /// Range of the agent end.
        agent: crate::FormatRange,
        /// Range of the instance end.
        instance: crate::FormatRange,
    },
    /// A configured format range is empty or names a format this build does not know.
    #[error("control format range {range} is invalid: this build knows control formats {known}")]
    BadFormatRange {
        /// The range asked for.
        range: crate::FormatRange,
        /// Formats this build knows.
        known: crate::FormatRange,
    },
    /// The frame kind byte is neither agent nor instance.
    #[error("frame kind {0} is unknown")]
    UnknownKind(u8),
    /// A frame of the wrong direction arrived.
    #[error("a {found:?} frame arrived where a {expected:?} frame was expected")]
    WrongKind {
        /// Kind the reader expected.
        expected: crate::FrameKind,
        /// Kind found in the frame.
        found: crate::FrameKind,
    },
    /// The frame body is larger than the limit.
    #[error("frame body of {len} bytes exceeds the limit of {max} bytes")]
    Oversized {
        /// Declared or actual body length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The body does not match its checksum.
    #[error("frame checksum mismatch: header says {expected:08x}, body hashes to {actual:08x}")]
    Checksum {
        /// CRC32C carried in the header.
        expected: u32,
        /// CRC32C computed over the received body.
        actual: u32,
    },
    /// The stream ended in the middle of a frame.
    #[error("stream ended in the middle of a frame: got {got} of {want} bytes")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes needed.
        want: usize,
    },
    /// The frame is intact but its body is not a valid message.
    #[error("frame body is not a valid control message: {0}")]
    Body(String),
    /// No reply arrived in time.
    #[error("no reply to request {request_id} within {timeout:?}")]
    Timeout {
        /// The request that timed out.
        request_id: u64,
        /// How long the caller waited.
        timeout: Duration,
    },
    /// The instance answered with an error.
    #[error("the instance rejected request {request_id}: {message}")]
    Remote {
        /// The rejected request.
        request_id: u64,
        /// The instance's explanation.
        message: String,
    },
    /// The reply does not fit the request (for example an Ack to a status request).
    #[error("request {request_id} got an unexpected reply: {what}")]
    UnexpectedReply {
        /// The request.
        request_id: u64,
        /// What arrived.
        what: String,
    },
    /// The channel is closed.
    #[error("the control channel is closed")]
    Closed,
}

impl ControlError {
    /// True when the stream is still aligned on a frame boundary after this error, so reading
    /// may continue with the next frame (a bad checksum or a bad body within an intact frame).
    pub fn is_recoverable(&self) -> bool {
        matches!(
            self,
            ControlError::Checksum { .. } | ControlError::Body(_) | ControlError::WrongKind { .. }
        )
    }
}
