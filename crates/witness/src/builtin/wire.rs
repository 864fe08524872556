//! The messages of the witness protocol, carried as JSON in [`super::frame`] frames, and the
//! limits every request is checked against before the witness acts on it.
//!
//! A connection opens with a [`Request::Hello`] naming the client's formats, in the frozen
//! [`HANDSHAKE_VERSION`]; the witness answers [`Response::Hello`] with the highest common
//! format (or an error naming both ranges), and every later frame is in that format.

use std::time::Duration;

use hitless_format::FormatRange;
use serde::{Deserialize, Serialize};

use super::frame::{
    encode_frame, Frame, FrameKind, BUILD_FORMATS, HANDSHAKE_VERSION, MAX_BODY_LEN,
};
use crate::{Versioned, WitnessRecord};

/// Longest pair or holder name.
pub const MAX_NAME_LEN: usize = 64;
/// Shortest lease a request may ask for.
pub const MIN_TTL: Duration = Duration::from_millis(10);
/// Longest lease a request may ask for (a witness may accept less, see its lease period).
pub const MAX_TTL: Duration = Duration::from_secs(60);

/// Why a frame or a message was refused.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The bytes do not open with the witness magic.
    #[error("not a witness frame: magic {0:02x?} is not HLWT")]
    BadMagic([u8; 4]),
    /// A frame format outside the accepted range.
    #[error("witness frame format {found} is not accepted here (accepted: {accepted})")]
    UnsupportedVersion {
        /// The frame's format.
        found: u8,
        /// What this end accepts at this point of the connection.
        accepted: FormatRange,
    },
    /// A frame kind this build does not know.
    #[error("unknown witness frame kind {0}")]
    UnknownKind(u8),
    /// A frame of the other direction.
    #[error("a witness {found:?} frame where a {expected:?} frame was due")]
    WrongKind {
        /// The kind received.
        found: FrameKind,
        /// The kind due.
        expected: FrameKind,
    },
    /// A body above the limit.
    #[error("a witness frame body of {len} bytes exceeds the limit of {max}")]
    Oversized {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The CRC does not match.
    #[error("witness frame checksum mismatch: header says {expected:#010x}, content gives {actual:#010x}")]
    Checksum {
        /// The header's CRC.
        expected: u32,
        /// The CRC of what arrived.
        actual: u32,
    },
    /// The stream ended inside a frame.
    #[error("the witness connection ended inside a frame ({got} of {want} bytes)")]
    Truncated {
        /// Bytes read.
        got: usize,
        /// Bytes the frame needed.
        want: usize,
    },
    /// The body is not a message of this protocol.
    #[error("malformed witness message: {0}")]
    Body(String),
    /// A pair or holder name outside the limits.
    #[error("invalid {what} name {name:?}: 1 to {MAX_NAME_LEN} of A-Z a-z 0-9 _ -")]
    BadName {
        /// "pair" or "holder".
        what: &'static str,
        /// The name (cut to the limit).
        name: String,
    },
    /// A lease duration outside the limits.
    #[error("lease ttl of {ttl_ms} ms is outside {min_ms}..={max_ms} ms")]
    BadTtl {
        /// Asked.
        ttl_ms: u64,
        /// Shortest accepted.
        min_ms: u64,
        /// Longest accepted.
        max_ms: u64,
    },
    /// A record that breaks the record's limits.
    #[error("invalid witness record: {0}")]
    BadRecord(String),
    /// The stream failed.
    #[error("witness connection failed: {0}")]
    Io(#[from] std::io::Error),
}

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Opens a connection: the formats the client reads and writes.
    Hello {
        /// Its range.
        formats: FormatRange,
    },
    /// The pair's record.
    Read {
        /// The pair.
        pair: String,
    },
    /// Writes `record` if the stored revision is `expected_revision`.
    Cas {
        /// The pair.
        pair: String,
        /// The revision the writer read (0: no record yet).
        expected_revision: u64,
        /// The new record.
        record: WitnessRecord,
    },
    /// Grants or renews the pair's lease to `holder`.
    Lease {
        /// The pair.
        pair: String,
        /// Who asks.
        holder: String,
        /// For how long, in milliseconds.
        ttl_ms: u64,
    },
    /// Gives up `holder`'s lease.
    Release {
        /// The pair.
        pair: String,
        /// Who gives it up.
        holder: String,
    },
}

/// What the witness answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Response {
    /// The format the connection uses from now on.
    Hello {
        /// The highest format in both ranges.
        format: u8,
    },
    /// The answer to a read.
    Record {
        /// The record and its revision.
        current: Versioned,
    },
    /// A compare-and-swap that was written (durably).
    Swapped {
        /// The new revision.
        revision: u64,
    },
    /// A compare-and-swap refused: the revision had moved.
    Conflict {
        /// The record now.
        current: Versioned,
    },
    /// The lease is the asker's.
    Granted {
        /// For how long from the answer, in milliseconds.
        ttl_ms: u64,
    },
    /// The lease is not granted.
    Refused {
        /// The live holder, if any.
        holder: Option<String>,
        /// How long before asking again may succeed, in milliseconds.
        retry_after_ms: u64,
    },
    /// A release was done.
    Released,
    /// The request was refused (not the change: the request itself).
    Error {
        /// Why.
        message: String,
    },
}

/// Checks a pair or holder name: 1 to [`MAX_NAME_LEN`] of A-Z a-z 0-9 _ -.
pub fn check_name(what: &'static str, name: &str) -> Result<(), WireError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(WireError::BadName {
            what,
            name: name.chars().take(MAX_NAME_LEN).collect(),
        })
    }
}

/// Checks a lease duration against `MIN_TTL..=max`.
pub fn check_ttl(ttl_ms: u64, max: Duration) -> Result<(), WireError> {
    let (min_ms, max_ms) = (MIN_TTL.as_millis() as u64, max.as_millis() as u64);
    if ttl_ms < min_ms || ttl_ms > max_ms {
        return Err(WireError::BadTtl {
            ttl_ms,
            min_ms,
            max_ms,
        });
    }
    Ok(())
}

fn check_record(record: &WitnessRecord) -> Result<(), WireError> {
    record
        .check()
        .map_err(|e| WireError::BadRecord(e.to_string()))
}

impl Request {
    /// Checks the request's fields against the protocol's limits.
    pub fn check(&self) -> Result<(), WireError> {
        match self {
            Request::Hello { .. } => Ok(()),
            Request::Read { pair } => check_name("pair", pair),
            Request::Cas { pair, record, .. } => {
                check_name("pair", pair)?;
                check_record(record)
            }
            Request::Lease {
                pair,
                holder,
                ttl_ms,
            } => {
                check_name("pair", pair)?;
                check_name("holder", holder)?;
                check_ttl(*ttl_ms, MAX_TTL)
            }
            Request::Release { pair, holder } => {
                check_name("pair", pair)?;
                check_name("holder", holder)
            }
        }
    }

    /// Short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "hello",
            Request::Read { .. } => "read",
            Request::Cas { .. } => "cas",
            Request::Lease { .. } => "lease",
            Request::Release { .. } => "release",
        }
    }

    /// The frame of this request in format `version` (a hello: in [`HANDSHAKE_VERSION`]).
    pub fn encode(&self, version: u8) -> Result<Vec<u8>, WireError> {
        let version = match self {
            Request::Hello { .. } => HANDSHAKE_VERSION,
            _ => version,
        };
        encode_message(version, FrameKind::Request, self)
    }

    /// The request a frame carries, checked.
    pub fn decode(frame: &Frame) -> Result<Request, WireError> {
        let r: Request = decode_message(frame, FrameKind::Request)?;
        r.check()?;
        Ok(r)
    }
}

impl Response {
    /// Checks the answer's fields against the protocol's limits.
    pub fn check(&self) -> Result<(), WireError> {
        match self {
            Response::Record { current } | Response::Conflict { current } => {
                check_record(&current.record)
            }
            Response::Refused {
                holder: Some(h), ..
            } => check_name("holder", h),
            _ => Ok(()),
        }
    }

    /// The frame of this answer in format `version`.
    pub fn encode(&self, version: u8) -> Result<Vec<u8>, WireError> {
        encode_message(version, FrameKind::Response, self)
    }

    /// The answer a frame carries, checked.
    pub fn decode(frame: &Frame) -> Result<Response, WireError> {
        let r: Response = decode_message(frame, FrameKind::Response)?;
        r.check()?;
        Ok(r)
    }

    /// An error answer, its message cut to fit a frame.
    pub fn error(message: impl std::fmt::Display) -> Response {
        let mut message = message.to_string();
        if message.len() > MAX_BODY_LEN / 4 {
            let mut end = MAX_BODY_LEN / 4;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        Response::Error { message }
    }
}

fn encode_message<T: Serialize>(
    version: u8,
    kind: FrameKind,
    message: &T,
) -> Result<Vec<u8>, WireError> {
    let body = serde_json::to_vec(message).map_err(|e| WireError::Body(e.to_string()))?;
    encode_frame(version, kind, &body)
}

fn decode_message<T: for<'de> Deserialize<'de>>(
    frame: &Frame,
    expected: FrameKind,
) -> Result<T, WireError> {
    if frame.kind != expected {
        return Err(WireError::WrongKind {
            found: frame.kind,
            expected,
        });
    }
    serde_json::from_slice(&frame.body).map_err(|e| WireError::Body(e.to_string()))
}

/// The formats a client of this build announces.
pub fn client_formats() -> FormatRange {
    BUILD_FORMATS
}

#[cfg(test)]
mod tests {
    use super::super::frame::{decode_frame, WIRE_VERSION};
    use super::*;
    use hitless_core::{ControlEpoch, InstanceId};
    use proptest::prelude::*;

    fn record() -> WitnessRecord {
        WitnessRecord {
            epoch: ControlEpoch(4),
            in_control: Some(InstanceId(1)),
            sync_set: [InstanceId(2)].into(),
        }
    }

    fn requests() -> Vec<Request> {
        vec![
            Request::Hello {
                formats: BUILD_FORMATS,
            },
            Request::Read { pair: "p-1".into() },
            Request::Cas {
                pair: "p_1".into(),
                expected_revision: 3,
                record: record(),
            },
            Request::Lease {
                pair: "p".into(),
                holder: "a".into(),
                ttl_ms: 400,
            },
            Request::Release {
                pair: "p".into(),
                holder: "a".into(),
            },
        ]
    }

    fn responses() -> Vec<Response> {
        let current = Versioned {
            record: record(),
            revision: 9,
        };
        vec![
            Response::Hello { format: 1 },
            Response::Record {
                current: current.clone(),
            },
            Response::Swapped { revision: 10 },
            Response::Conflict { current },
            Response::Granted { ttl_ms: 400 },
            Response::Refused {
                holder: Some("b".into()),
                retry_after_ms: 12,
            },
            Response::Refused {
                holder: None,
                retry_after_ms: 0,
            },
            Response::Released,
            Response::error("no"),
        ]
    }

    fn frame_of(bytes: &[u8]) -> Frame {
        decode_frame(bytes, BUILD_FORMATS).unwrap().unwrap().0
    }

    #[test]
    fn every_request_and_response_round_trips() {
        for r in requests() {
            let f = r.encode(WIRE_VERSION).unwrap();
            assert_eq!(Request::decode(&frame_of(&f)).unwrap(), r);
        }
        for r in responses() {
            let f = r.encode(WIRE_VERSION).unwrap();
            assert_eq!(Response::decode(&frame_of(&f)).unwrap(), r);
        }
    }

    #[test]
    fn a_response_frame_is_not_a_request() {
        let f = Response::Released.encode(WIRE_VERSION).unwrap();
        assert!(matches!(
            Request::decode(&frame_of(&f)),
            Err(WireError::WrongKind { .. })
        ));
    }

    #[test]
    fn names_ttls_and_records_are_checked() {
        for bad in ["", "a b", "é", "a/b", &"x".repeat(65)] {
            let r = Request::Read { pair: bad.into() };
            assert!(
                matches!(r.check(), Err(WireError::BadName { .. })),
                "{bad:?}"
            );
        }
        assert!(Request::Read {
            pair: "x".repeat(64)
        }
        .check()
        .is_ok());
        let lease = |ttl_ms| Request::Lease {
            pair: "p".into(),
            holder: "h".into(),
            ttl_ms,
        };
        assert!(matches!(lease(9).check(), Err(WireError::BadTtl { .. })));
        assert!(lease(10).check().is_ok());
        assert!(lease(60_000).check().is_ok());
        assert!(matches!(
            lease(60_001).check(),
            Err(WireError::BadTtl { .. })
        ));
        let mut bad = record();
        bad.sync_set.insert(InstanceId(1));
        let cas = Request::Cas {
            pair: "p".into(),
            expected_revision: 0,
            record: bad,
        };
        assert!(matches!(cas.check(), Err(WireError::BadRecord(_))));
        let f = encode_message(WIRE_VERSION, FrameKind::Request, &cas).unwrap();
        assert!(matches!(
            Request::decode(&frame_of(&f)),
            Err(WireError::BadRecord(_))
        ));
    }

    #[test]
    fn unknown_fields_and_types_are_malformed() {
        for body in [
            &br#"{"type":"read","pair":"p","extra":1}"#[..],
            br#"{"type":"delete","pair":"p"}"#,
            br#"not json"#,
        ] {
            let f = encode_frame(WIRE_VERSION, FrameKind::Request, body).unwrap();
            assert!(matches!(
                Request::decode(&frame_of(&f)),
                Err(WireError::Body(_))
            ));
        }
    }

    #[test]
    fn a_long_error_message_still_fits_a_frame() {
        let r = Response::error("é".repeat(MAX_BODY_LEN));
        assert!(r.encode(WIRE_VERSION).is_ok());
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bodies_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            for kind in [FrameKind::Request, FrameKind::Response] {
                let f = Frame { version: WIRE_VERSION, kind, body: body.clone() };
                let _ = Request::decode(&f);
                let _ = Response::decode(&f);
            }
        }

        #[test]
        fn any_valid_lease_request_round_trips(pair in "[A-Za-z0-9_-]{1,64}", holder in "[A-Za-z0-9_-]{1,64}", ttl_ms in 10u64..=60_000) {
            let r = Request::Lease { pair, holder, ttl_ms };
            let f = r.encode(WIRE_VERSION).unwrap();
            prop_assert_eq!(Request::decode(&frame_of(&f)).unwrap(), r);
        }
    }
}
