//! Replication wire format.
//!
//! Every frame is a 32-byte header followed by a payload:
//!
//! | offset | size | field                                              |
//! |-------:|-----:|----------------------------------------------------|
//! | 0      | 4    | magic `HLSY`                                       |
//! | 4      | 1    | wire format version ([`WIRE_VERSION`])             |
//! | 5      | 1    | frame type ([`FrameType`])                         |
//! | 6      | 2    | flags, must be zero                                |
//! | 8      | 4    | payload length, little endian                      |
//! | 12     | 8    | control epoch, little endian                       |
//! | 20     | 8    | sequence number, little endian                     |
//! | 28     | 4    | CRC32C of bytes 0..28 followed by the payload      |
//!
//! # Format versions and negotiation
//!
//! A build reads and writes the formats of a [`FormatRange`] (by default
//! [`BUILD_FORMATS`], [`MIN_WIRE_VERSION`]`..=`[`WIRE_VERSION`]). The
//! standby announces its range in its [`Control::Hello`]; the active picks the
//! highest format in both ranges ([`negotiate_format`]) and names it in its
//! [`Control::Welcome`], or refuses with [`FormatError::NoCommonFormat`], which
//! names both ranges. From then on each end writes the negotiated format
//! ([`FormatWriter`] re-encodes the frames this build builds in
//! [`WIRE_VERSION`]) and reads any format of its range ([`decode_header_in`]).
//!
//! The handshake frames ([`FrameType::Hello`], [`FrameType::Welcome`],
//! [`FrameType::Refuse`]) are frozen: always written in format
//! [`HANDSHAKE_VERSION`] with the layout above, and every decoder accepts them
//! in that format whatever its range, so two ends can always learn each
//! other's ranges (and a build that predates negotiation, which reads only
//! format 2, reads them too: it ignores the added JSON fields).
//!
//! Test builds (`cfg(test)` or feature `next-format`) also know
//! `NEXT_WIRE_VERSION`, a stand-in for the next release's format: the
//! epoch and sequence fields trade places (epoch at 20, sequence at 12). It is
//! never in [`BUILD_FORMATS`]; a test opts in by configuring a wider range.
//!
//! The payload is at most [`MAX_PAYLOAD`] bytes. Decoding checks every field
//! and the CRC before returning anything, so a frame is either accepted whole
//! or rejected with a [`FrameError`]; nothing of a bad frame is ever applied.
//!
//! Mutation batches ([`FrameType::Batch`]) and bulk chunks
//! ([`FrameType::BulkChunk`]) use a compact binary payload (see
//! [`encode_mutation`] and [`decode_batch`]); the rare control frames carry
//! JSON payloads (see [`Control`]).

use std::io::Read;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::{Epoch, Mutation, SchemaVersion, Seq};

/// Frame magic.
pub const MAGIC: [u8; 4] = *b"HLSY";
/// Version of the frame format written by this build. Version 2: a bulk
/// transfer is interleaved with the live stream (each `BulkChunk` is stamped
/// with the sequence it was read at, live `Batch` frames come between the
/// chunks, and `BulkEnd` names the sequence the transfer ended at).
pub const WIRE_VERSION: u8 = 2;
/// Oldest frame format this build reads and writes (the journal's
/// `MIN_FORMAT_VERSION..=FORMAT_VERSION` in the same style).
pub const MIN_WIRE_VERSION: u8 = 2;
/// Format of the handshake frames (hello, welcome, refuse): frozen, so every
/// build can read them whatever formats it reads otherwise.
pub const HANDSHAKE_VERSION: u8 = 2;
/// A test-only next format (epoch and sequence trade places in the header),
/// standing in for the format the next release would add.
#[cfg(any(test, feature = "next-format"))]
pub const NEXT_WIRE_VERSION: u8 = 3;
/// Header length in bytes.
pub const HEADER_LEN: usize = 32;
/// Largest payload accepted or produced: 16 MiB.
pub const MAX_PAYLOAD: usize = 16 << 20;
/// Largest table name in a mutation.
pub const MAX_TABLE_NAME: usize = 255;
/// Largest key in a mutation.
pub const MAX_KEY: usize = 64 << 10;
/// Largest value in a mutation (a mutation must fit in one frame).
pub const MAX_VALUE: usize = MAX_PAYLOAD - MAX_KEY - MAX_TABLE_NAME - 64;
/// Payload size at which an encoder starts a new frame.
pub const TARGET_PAYLOAD: usize = 256 << 10;
/// Payload size at which a resume's replay starts writing: large writes keep
/// the per-frame costs (syscalls, wake-ups) negligible.
pub const BULK_PAYLOAD: usize = 4 << 20;

/// Type of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// Standby -> active: service, versions, role wishes ([`Control::Hello`]).
    Hello = 1,
    /// Active -> standby: accepted, negotiated version ([`Control::Welcome`]).
    Welcome = 2,
    /// Either way: connection refused, with a reason ([`Control::Refuse`]).
    Refuse = 3,
    /// Active -> standby: bulk snapshot starts ([`Control::BulkBegin`]).
    BulkBegin = 4,
    /// Active -> standby: records of the bulk snapshot (binary puts).
    BulkChunk = 5,
    /// Active -> standby: bulk snapshot complete, with its digest ([`Control::BulkEnd`]).
    BulkEnd = 6,
    /// Active -> standby: a run of mutations; header seq is the first one's.
    Batch = 7,
    /// Standby -> active: header seq is the last sequence applied.
    Ack = 8,
    /// Active -> standby: digest of the state at header seq ([`Control::DigestCheck`]).
    DigestCheck = 9,
    /// Standby -> active: outcome of a digest comparison ([`Control::DigestResult`]).
    DigestResult = 10,
    /// Active -> standby: take control at the header epoch ([`Control::Promote`]).
    Promote = 11,
    /// Standby -> active: promoted; header epoch is the new epoch.
    PromoteAck = 12,
    /// Either way: the header epoch supersedes the receiver's.
    Fence = 13,
    /// Either way: keepalive, header seq is the sender's applied seq.
    Heartbeat = 14,
    /// Active -> standby: the standby's state is resumed from the active's
    /// log instead of a snapshot ([`Control::ResumeBegin`]).
    ResumeBegin = 15,
    /// Active -> standby: a logged batch replayed during a resume. Payload:
    /// the epoch the batch was first applied in (u64 LE), then a
    /// [`FrameType::Batch`] payload; header seq is the batch's last sequence.
    ReplayBatch = 16,
    /// Active -> standby: resume complete, with the digest at its sequence
    /// ([`Control::ResumeEnd`]).
    ResumeEnd = 17,
    /// Standby -> active: the standby detaches on purpose (its control plane stopped or
    /// re-pointed it), so the active need not hold acknowledgements for it as for a lost HA
    /// standby. No payload; header epoch and seq are unused (0).
    Leave = 18,
}

impl FrameType {
    /// Parses a frame type byte.
    pub fn from_u8(b: u8) -> Option<Self> {
        use FrameType::*;
        Some(match b {
            1 => Hello,
            2 => Welcome,
            3 => Refuse,
            4 => BulkBegin,
            5 => BulkChunk,
            6 => BulkEnd,
            7 => Batch,
            8 => Ack,
            9 => DigestCheck,
            10 => DigestResult,
            11 => Promote,
            12 => PromoteAck,
            13 => Fence,
            14 => Heartbeat,
            15 => ResumeBegin,
            16 => ReplayBatch,
            17 => ResumeEnd,
            18 => Leave,
            _ => return None,
        })
    }
}

/// Why a frame was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The input ends inside a frame.
    #[error("frame truncated: needed {needed} bytes, have {have}")]
    Truncated {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        have: usize,
    },
    /// The magic is wrong.
    #[error("bad frame magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// The frame format version is outside the formats this end reads.
    #[error("unsupported sync frame format {version} (this end reads formats {min}..={max})")]
    BadVersion {
        /// Version byte of the frame.
        version: u8,
        /// Oldest format this end reads.
        min: u8,
        /// Newest format this end reads.
        max: u8,
    },
    /// The frame type is unknown.
    #[error("unknown frame type {0}")]
    BadType(u8),
    /// Reserved flags are set.
    #[error("reserved frame flags {0:#06x} are set")]
    BadFlags(u16),
    /// The declared payload exceeds the limit.
    #[error("frame payload of {len} bytes exceeds the limit of {limit}")]
    Oversized {
        /// Declared length.
        len: usize,
        /// Limit.
        limit: usize,
    },
    /// The CRC does not match.
    #[error("frame CRC mismatch: header says {expected:#010x}, computed {actual:#010x}")]
    BadCrc {
        /// CRC in the header.
        expected: u32,
        /// CRC computed.
        actual: u32,
    },
    /// The payload does not parse.
    #[error("malformed {kind:?} payload: {reason}")]
    BadPayload {
        /// Frame type.
        kind: FrameType,
        /// What is wrong.
        reason: String,
    },
}

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Format version the frame was written in.
    pub version: u8,
    /// Frame type.
    pub kind: FrameType,
    /// Payload length.
    pub len: usize,
    /// Control epoch.
    pub epoch: Epoch,
    /// Sequence number (meaning depends on the type).
    pub seq: Seq,
    /// CRC32C from the header.
    pub crc: u32,
}

/// A whole, CRC-checked frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Frame type.
    pub kind: FrameType,
    /// Control epoch.
    pub epoch: Epoch,
    /// Sequence number.
    pub seq: Seq,
    /// Payload bytes.
    pub payload: Bytes,
}

/// Why a format range or a negotiation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// The two ranges do not overlap.
    #[error(
        "no common sync frame format: the active reads and writes sync formats {active}, \
         the standby {standby}"
    )]
    NoCommonFormat {
        /// Range of the active.
        active: FormatRange,
        /// Range of the standby.
        standby: FormatRange,
    },
    /// A range is empty (its oldest format is newer than its newest).
    #[error("sync format range {min}..={max} is empty")]
    Empty {
        /// Oldest format.
        min: u8,
        /// Newest format.
        max: u8,
    },
    /// A configured range names a format this build cannot read or write.
    #[error(
        "sync format {version} of the range {range} is not known to this build (it knows {known})"
    )]
    Unknown {
        /// The unknown format.
        version: u8,
        /// The configured range.
        range: FormatRange,
        /// Formats this build knows.
        known: FormatRange,
    },
}

/// An inclusive range of frame format versions (what an end reads and writes).
pub use hitless_format::FormatRange;

impl From<hitless_format::RangeError> for FormatError {
    fn from(e: hitless_format::RangeError) -> Self {
        match e {
            hitless_format::RangeError::Empty { min, max } => FormatError::Empty { min, max },
            hitless_format::RangeError::Unknown {
                version,
                range,
                known,
            } => FormatError::Unknown {
                version,
                range,
                known,
            },
        }
    }
}

/// The sync formats this build reads and writes by default.
pub const BUILD_FORMATS: FormatRange = FormatRange {
    min: MIN_WIRE_VERSION,
    max: WIRE_VERSION,
};

/// What a peer that announces no range speaks: a build from before
/// negotiation reads and writes format 2 only.
pub const LEGACY_FORMATS: FormatRange = FormatRange { min: 2, max: 2 };

/// The sync formats this build has codecs for (wider than [`BUILD_FORMATS`]
/// in test builds, which also know `NEXT_WIRE_VERSION`).
pub fn known_formats() -> FormatRange {
    #[cfg(any(test, feature = "next-format"))]
    let max = NEXT_WIRE_VERSION;
    #[cfg(not(any(test, feature = "next-format")))]
    let max = WIRE_VERSION;
    FormatRange {
        min: MIN_WIRE_VERSION,
        max,
    }
}

/// The sync format range `min..=max`; fails if it is empty or names a format
/// this build does not know.
pub fn format_range(min: u8, max: u8) -> Result<FormatRange, FormatError> {
    Ok(FormatRange::new(min, max, known_formats())?)
}

/// Checks `range` is non-empty and within [`known_formats`] (a range
/// announced by a peer need not be: only this end's own must).
pub fn check_formats(range: &FormatRange) -> Result<(), FormatError> {
    Ok(range.check(known_formats())?)
}

/// Active side of the negotiation: the format a link uses, the highest in
/// both the active's (checked against what this build knows) and the
/// standby's announced range.
pub fn negotiate_format(active: FormatRange, standby: FormatRange) -> Result<u8, FormatError> {
    check_formats(&active)?;
    hitless_format::negotiate(active, standby).map_err(|e| FormatError::NoCommonFormat {
        active: e.ours,
        standby: e.theirs,
    })
}

fn is_handshake(kind: FrameType) -> bool {
    matches!(
        kind,
        FrameType::Hello | FrameType::Welcome | FrameType::Refuse
    )
}

/// Offsets of the epoch and sequence fields in format `version`.
fn epoch_seq_offsets(version: u8) -> (usize, usize) {
    #[cfg(any(test, feature = "next-format"))]
    if version == NEXT_WIRE_VERSION {
        return (20, 12);
    }
    let _ = version;
    (12, 20)
}

/// Parses and validates a header of a format in [`BUILD_FORMATS`] (or a
/// handshake frame); see [`decode_header_in`].
pub fn decode_header(buf: &[u8]) -> Result<Header, FrameError> {
    decode_header_in(buf, BUILD_FORMATS)
}

/// Parses and validates a header (everything but the CRC, which needs the
/// payload) of a frame in any format of `formats`, or a handshake frame in
/// [`HANDSHAKE_VERSION`]. A range naming formats this build does not know
/// reads only those it knows.
pub fn decode_header_in(buf: &[u8], formats: FormatRange) -> Result<Header, FrameError> {
    if buf.len() < HEADER_LEN {
        return Err(FrameError::Truncated {
            needed: HEADER_LEN,
            have: buf.len(),
        });
    }
    let magic: [u8; 4] = buf[0..4].try_into().expect("4 bytes");
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    let version = buf[4];
    let readable = formats.contains(version) && known_formats().contains(version);
    let kind = FrameType::from_u8(buf[5]);
    let handshake = version == HANDSHAKE_VERSION && kind.is_some_and(is_handshake);
    if !readable && !handshake {
        return Err(FrameError::BadVersion {
            version,
            min: formats.min,
            max: formats.max,
        });
    }
    let kind = kind.ok_or(FrameError::BadType(buf[5]))?;
    let flags = u16::from_le_bytes([buf[6], buf[7]]);
    if flags != 0 {
        return Err(FrameError::BadFlags(flags));
    }
    let len = u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes")) as usize;
    if len > MAX_PAYLOAD {
        return Err(FrameError::Oversized {
            len,
            limit: MAX_PAYLOAD,
        });
    }
    let (e, s) = epoch_seq_offsets(version);
    Ok(Header {
        version,
        kind,
        len,
        epoch: crate::ControlEpoch(u64::from_le_bytes(
            buf[e..e + 8].try_into().expect("8 bytes"),
        )),
        seq: u64::from_le_bytes(buf[s..s + 8].try_into().expect("8 bytes")),
        crc: u32::from_le_bytes(buf[28..32].try_into().expect("4 bytes")),
    })
}

fn frame_crc(header: &[u8], payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&header[..28]), payload)
}

fn check_crc(h: &Header, header: &[u8], payload: &[u8]) -> Result<(), FrameError> {
    let actual = frame_crc(header, payload);
    if actual != h.crc {
        return Err(FrameError::BadCrc {
            expected: h.crc,
            actual,
        });
    }
    Ok(())
}

/// Decodes one frame from the front of `buf`; returns it and the bytes consumed.
///
/// Fails with [`FrameError::Truncated`] if `buf` holds less than a whole frame.
pub fn decode_frame(buf: &[u8]) -> Result<(Frame, usize), FrameError> {
    decode_frame_in(buf, BUILD_FORMATS)
}

/// Like [`decode_frame`] for a frame in any format of `formats`.
pub fn decode_frame_in(buf: &[u8], formats: FormatRange) -> Result<(Frame, usize), FrameError> {
    let h = decode_header_in(buf, formats)?;
    let total = HEADER_LEN + h.len;
    if buf.len() < total {
        return Err(FrameError::Truncated {
            needed: total,
            have: buf.len(),
        });
    }
    let payload = &buf[HEADER_LEN..total];
    check_crc(&h, &buf[..HEADER_LEN], payload)?;
    Ok((
        Frame {
            kind: h.kind,
            epoch: h.epoch,
            seq: h.seq,
            payload: Bytes::copy_from_slice(payload),
        },
        total,
    ))
}

/// Reads one whole frame from a byte stream.
///
/// Returns `Ok(None)` on a clean end of stream before any byte of a frame.
/// The payload is read into a fresh buffer and CRC-checked before it is returned.
pub fn read_frame<R: Read + ?Sized>(r: &mut R) -> Result<Option<Frame>, crate::SyncError> {
    read_frame_in(r, BUILD_FORMATS)
}

/// Like [`read_frame`] for a frame in any format of `formats`.
pub fn read_frame_in<R: Read + ?Sized>(
    r: &mut R,
    formats: FormatRange,
) -> Result<Option<Frame>, crate::SyncError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(FrameError::Truncated {
                    needed: HEADER_LEN,
                    have: got,
                }
                .into())
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let h = decode_header_in(&header, formats)?;
    let mut payload = vec![0u8; h.len];
    let mut got = 0;
    while got < h.len {
        match r.read(&mut payload[got..]) {
            Ok(0) => {
                return Err(FrameError::Truncated {
                    needed: HEADER_LEN + h.len,
                    have: HEADER_LEN + got,
                }
                .into())
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    check_crc(&h, &header, &payload)?;
    Ok(Some(Frame {
        kind: h.kind,
        epoch: h.epoch,
        seq: h.seq,
        payload: Bytes::from(payload),
    }))
}

/// Reads one whole frame from a byte stream into `payload` (a buffer reused
/// across calls, so the steady state allocates nothing) and returns its
/// header.
///
/// Returns `Ok(None)` on a clean end of stream before any byte of a frame.
/// The CRC is checked before returning: on an error `payload` holds nothing
/// that may be applied.
pub fn read_frame_into<R: Read + ?Sized>(
    r: &mut R,
    payload: &mut Vec<u8>,
) -> Result<Option<Header>, crate::SyncError> {
    read_frame_into_in(r, payload, BUILD_FORMATS)
}

/// Like [`read_frame_into`] for a frame in any format of `formats`.
pub fn read_frame_into_in<R: Read + ?Sized>(
    r: &mut R,
    payload: &mut Vec<u8>,
    formats: FormatRange,
) -> Result<Option<Header>, crate::SyncError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(FrameError::Truncated {
                    needed: HEADER_LEN,
                    have: got,
                }
                .into())
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let h = decode_header_in(&header, formats)?;
    // Read straight into the buffer's spare capacity: nothing is zeroed.
    payload.clear();
    payload.reserve(h.len);
    let got = match Read::take(&mut *r, h.len as u64).read_to_end(payload) {
        Ok(n) => n,
        Err(e) => {
            payload.clear();
            return Err(e.into());
        }
    };
    if got < h.len {
        payload.clear();
        return Err(FrameError::Truncated {
            needed: HEADER_LEN + h.len,
            have: HEADER_LEN + got,
        }
        .into());
    }
    if let Err(e) = check_crc(&h, &header, payload) {
        payload.clear();
        return Err(e.into());
    }
    Ok(Some(h))
}

/// Builds frames into one contiguous output buffer (frames are batched by
/// appending several to the same buffer before one write).
#[derive(Debug, Default)]
pub struct FrameWriter {
    buf: Vec<u8>,
    open: Option<usize>,
}

impl FrameWriter {
    /// An empty writer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes of complete frames written so far.
    pub fn as_bytes(&self) -> &[u8] {
        debug_assert!(self.open.is_none());
        &self.buf
    }

    /// Length of the buffer (including any open frame).
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True if nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Discards everything buffered, keeping the allocation.
    pub fn clear(&mut self) {
        self.open = None;
        self.buf.clear();
    }

    /// Takes the buffered bytes, leaving the writer empty.
    pub fn take(&mut self) -> Vec<u8> {
        debug_assert!(self.open.is_none());
        std::mem::take(&mut self.buf)
    }

    /// Appends a complete frame.
    pub fn frame(&mut self, kind: FrameType, epoch: Epoch, seq: Seq, payload: &[u8]) {
        assert!(payload.len() <= MAX_PAYLOAD, "payload over MAX_PAYLOAD");
        self.begin(kind, epoch, seq);
        self.buf.extend_from_slice(payload);
        self.finish();
    }

    /// Starts a frame whose payload is appended with [`FrameWriter::payload`].
    pub fn begin(&mut self, kind: FrameType, epoch: Epoch, seq: Seq) {
        assert!(self.open.is_none(), "a frame is already open");
        let start = self.buf.len();
        self.buf.extend_from_slice(&MAGIC);
        self.buf.push(WIRE_VERSION);
        self.buf.push(kind as u8);
        self.buf.extend_from_slice(&0u16.to_le_bytes());
        self.buf.extend_from_slice(&0u32.to_le_bytes());
        self.buf.extend_from_slice(&epoch.0.to_le_bytes());
        self.buf.extend_from_slice(&seq.to_le_bytes());
        self.buf.extend_from_slice(&0u32.to_le_bytes());
        self.open = Some(start);
    }

    /// The payload buffer of the open frame.
    pub fn payload(&mut self) -> &mut Vec<u8> {
        assert!(self.open.is_some(), "no frame is open");
        &mut self.buf
    }

    /// Payload bytes in the open frame so far.
    pub fn open_payload_len(&self) -> usize {
        self.open.map_or(0, |s| self.buf.len() - s - HEADER_LEN)
    }

    /// True if a frame is open.
    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// Discards the open frame, if any.
    pub fn abort(&mut self) {
        if let Some(start) = self.open.take() {
            self.buf.truncate(start);
        }
    }

    /// Completes the open frame: fills in its length and CRC.
    pub fn finish(&mut self) {
        let start = self.open.take().expect("no frame is open");
        let len = self.buf.len() - start - HEADER_LEN;
        assert!(len <= MAX_PAYLOAD, "payload over MAX_PAYLOAD");
        self.buf[start + 8..start + 12].copy_from_slice(&(len as u32).to_le_bytes());
        let crc = frame_crc(
            &self.buf[start..start + HEADER_LEN],
            &self.buf[start + HEADER_LEN..],
        );
        self.buf[start + 28..start + 32].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Encodes a frame into a fresh buffer.
pub fn encode_frame(kind: FrameType, epoch: Epoch, seq: Seq, payload: &[u8]) -> Vec<u8> {
    let mut w = FrameWriter::new();
    w.frame(kind, epoch, seq, payload);
    w.take()
}

/// Encodes a frame in format `version` (a format of [`known_formats`];
/// handshake frames are always written in [`HANDSHAKE_VERSION`]).
pub fn encode_frame_in(
    version: u8,
    kind: FrameType,
    epoch: Epoch,
    seq: Seq,
    payload: &[u8],
) -> Vec<u8> {
    let mut out = encode_frame(kind, epoch, seq, payload);
    reencode_header(&mut out, version);
    out
}

/// Rewrites the native ([`WIRE_VERSION`]) frame at the front of `frame` (its
/// header and whole payload) into format `version`: header fields moved, CRC
/// recomputed. Handshake frames keep their frozen format.
fn reencode_header(frame: &mut [u8], version: u8) {
    let kind = FrameType::from_u8(frame[5]);
    if version == frame[4] || kind.is_some_and(is_handshake) {
        return;
    }
    let (e0, s0) = epoch_seq_offsets(frame[4]);
    let (e1, s1) = epoch_seq_offsets(version);
    let mut epoch = [0u8; 8];
    let mut seq = [0u8; 8];
    epoch.copy_from_slice(&frame[e0..e0 + 8]);
    seq.copy_from_slice(&frame[s0..s0 + 8]);
    frame[4] = version;
    frame[e1..e1 + 8].copy_from_slice(&epoch);
    frame[s1..s1 + 8].copy_from_slice(&seq);
    let crc = frame_crc(&frame[..HEADER_LEN], &frame[HEADER_LEN..]);
    frame[28..32].copy_from_slice(&crc.to_le_bytes());
}

/// A writer that re-encodes the frames this build builds (in
/// [`WIRE_VERSION`]) into the format negotiated for a link before they reach
/// the stream. Frames may arrive split across writes; at most one incomplete
/// frame is held (bounded by [`HEADER_LEN`] + [`MAX_PAYLOAD`]). Handshake
/// frames pass unchanged (their format is frozen).
pub struct FormatWriter<W: std::io::Write> {
    inner: W,
    version: u8,
    pending: Vec<u8>,
    out: Vec<u8>,
}

impl<W: std::io::Write> std::fmt::Debug for FormatWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FormatWriter")
            .field("version", &self.version)
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl<W: std::io::Write> FormatWriter<W> {
    /// Writes frames to `inner` in format `version`; fails if this build has
    /// no codec for it.
    pub fn new(inner: W, version: u8) -> Result<FormatWriter<W>, FormatError> {
        format_range(version, version)?;
        Ok(FormatWriter {
            inner,
            version,
            pending: Vec::new(),
            out: Vec::new(),
        })
    }

    /// Re-encodes the whole frames at the front of `buf` into `self.out`;
    /// returns the bytes consumed.
    fn convert(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut pos = 0;
        while buf.len() - pos >= HEADER_LEN {
            let h = decode_header(&buf[pos..])
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            let total = HEADER_LEN + h.len;
            if buf.len() - pos < total {
                break;
            }
            let start = self.out.len();
            self.out.extend_from_slice(&buf[pos..pos + total]);
            reencode_header(&mut self.out[start..], self.version);
            pos += total;
        }
        Ok(pos)
    }
}

/// Wraps a link's writer so it writes format `version`: the writer itself if
/// that is the format this build builds frames in.
pub fn format_writer(
    inner: Box<dyn std::io::Write + Send>,
    version: u8,
) -> Result<Box<dyn std::io::Write + Send>, FormatError> {
    if version == WIRE_VERSION {
        format_range(version, version)?;
        return Ok(inner);
    }
    Ok(Box::new(FormatWriter::new(inner, version)?))
}

impl<W: std::io::Write> std::io::Write for FormatWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.out.clear();
        if self.pending.is_empty() {
            let used = self.convert(buf)?;
            self.pending.extend_from_slice(&buf[used..]);
        } else {
            let mut pending = std::mem::take(&mut self.pending);
            pending.extend_from_slice(buf);
            let used = self.convert(&pending);
            match used {
                Ok(used) => {
                    pending.drain(..used);
                    self.pending = pending;
                }
                Err(e) => {
                    self.pending = pending;
                    return Err(e);
                }
            }
        }
        if self.pending.len() > HEADER_LEN + MAX_PAYLOAD {
            // Cannot happen with a valid header in front: a guard all the same.
            self.pending.clear();
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "an incomplete frame exceeds the largest frame",
            ));
        }
        let out = std::mem::take(&mut self.out);
        let r = self.inner.write_all(&out);
        self.out = out;
        if self.out.capacity() > BULK_PAYLOAD + HEADER_LEN {
            self.out = Vec::new();
        }
        r.map(|_| buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

const OP_PUT: u8 = 1;
const OP_DELETE: u8 = 2;

/// Appends one mutation to a batch payload.
///
/// Layout: op (1 = put, 2 = delete), table name length (u8) and bytes, key
/// length (u32 LE) and bytes, and for a put value length (u32 LE) and bytes.
/// Sizes must already be within [`MAX_TABLE_NAME`], [`MAX_KEY`], [`MAX_VALUE`].
pub fn encode_mutation(out: &mut Vec<u8>, table: &str, key: &[u8], value: Option<&[u8]>) {
    debug_assert!(table.len() <= MAX_TABLE_NAME && key.len() <= MAX_KEY);
    out.push(if value.is_some() { OP_PUT } else { OP_DELETE });
    out.push(table.len() as u8);
    out.extend_from_slice(table.as_bytes());
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(key);
    if let Some(v) = value {
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        out.extend_from_slice(v);
    }
}

/// Encoded size of one mutation.
pub fn mutation_len(table: &str, key: &[u8], value: Option<&[u8]>) -> usize {
    2 + table.len() + 4 + key.len() + value.map_or(0, |v| 4 + v.len())
}

/// Checks a mutation's sizes against the wire limits.
pub fn check_mutation(m: &Mutation) -> Result<(), crate::SyncError> {
    let (table, key, value) = match m {
        Mutation::Put { table, key, value } => (table, key, Some(value)),
        Mutation::Delete { table, key } => (table, key, None),
    };
    let too = |what, len, limit| crate::SyncError::TooLarge { what, len, limit };
    if table.len() > MAX_TABLE_NAME {
        return Err(too("table name", table.len(), MAX_TABLE_NAME));
    }
    if key.len() > MAX_KEY {
        return Err(too("key", key.len(), MAX_KEY));
    }
    if let Some(v) = value {
        if v.len() > MAX_VALUE {
            return Err(too("value", v.len(), MAX_VALUE));
        }
    }
    Ok(())
}

/// A mutation decoded from a frame payload; the slices borrow the payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireMutation {
    /// Table name.
    pub table: Bytes,
    /// Key.
    pub key: Bytes,
    /// Value, `None` for a delete.
    pub value: Option<Bytes>,
}

impl WireMutation {
    /// Table name as text (validated UTF-8 by [`decode_batch`]).
    pub fn table_str(&self) -> &str {
        std::str::from_utf8(&self.table).expect("validated at decode")
    }

    /// Converts to an owned [`Mutation`].
    pub fn to_mutation(&self) -> Mutation {
        match &self.value {
            Some(v) => Mutation::put(self.table_str(), self.key.to_vec(), v.to_vec()),
            None => Mutation::delete(self.table_str(), self.key.to_vec()),
        }
    }
}

/// A mutation borrowed from a validated batch payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MutationRef<'a> {
    /// Table name.
    pub table: &'a str,
    /// Key.
    pub key: &'a [u8],
    /// Value, `None` for a delete.
    pub value: Option<&'a [u8]>,
}

/// Parses the mutation at `*pos`; `i` numbers it for messages. `prev` is the
/// previous mutation's table name: a repeated name is not validated again.
fn parse_mutation<'a>(
    p: &'a [u8],
    pos: &mut usize,
    i: usize,
    kind: FrameType,
    prev: &mut &'a str,
) -> Result<MutationRef<'a>, FrameError> {
    let bad = |reason: String| FrameError::BadPayload { kind, reason };
    let take = |pos: &mut usize, n: usize, what: &str| -> Result<&'a [u8], FrameError> {
        if p.len() - *pos < n {
            return Err(FrameError::BadPayload {
                kind,
                reason: format!("{what} runs past the end of the payload"),
            });
        }
        let r = &p[*pos..*pos + n];
        *pos += n;
        Ok(r)
    };
    let op = take(pos, 1, "op")?[0];
    if op != OP_PUT && op != OP_DELETE {
        return Err(bad(format!("mutation {i} has unknown op {op}")));
    }
    let tlen = take(pos, 1, "table length")?[0] as usize;
    let tb = take(pos, tlen, "table name")?;
    let table = if tb == prev.as_bytes() {
        *prev
    } else {
        let t = std::str::from_utf8(tb)
            .map_err(|_| bad(format!("mutation {i} has a table name that is not UTF-8")))?;
        *prev = t;
        t
    };
    let klen = u32::from_le_bytes(take(pos, 4, "key length")?.try_into().expect("4")) as usize;
    if klen > MAX_KEY {
        return Err(bad(format!(
            "mutation {i} key of {klen} bytes exceeds {MAX_KEY}"
        )));
    }
    let key = take(pos, klen, "key")?;
    let value = if op == OP_PUT {
        let vlen =
            u32::from_le_bytes(take(pos, 4, "value length")?.try_into().expect("4")) as usize;
        Some(take(pos, vlen, "value")?)
    } else {
        None
    };
    Ok(MutationRef { table, key, value })
}

/// Reads the mutation at `*pos` of a body that [`BatchRef::parse`] validated
/// (so no bound or UTF-8 check can fail here).
#[inline]
fn next_validated<'a>(p: &'a [u8], pos: &mut usize, prev: &mut &'a str) -> MutationRef<'a> {
    let at = *pos;
    let op = p[at];
    let tlen = p[at + 1] as usize;
    let t0 = at + 2;
    let tb = &p[t0..t0 + tlen];
    let table = if tb == prev.as_bytes() {
        *prev
    } else {
        let t = std::str::from_utf8(tb).expect("validated by BatchRef::parse");
        *prev = t;
        t
    };
    let k0 = t0 + tlen;
    let klen = u32::from_le_bytes(p[k0..k0 + 4].try_into().expect("4 bytes")) as usize;
    let key = &p[k0 + 4..k0 + 4 + klen];
    let mut end = k0 + 4 + klen;
    let value = if op == OP_PUT {
        let vlen = u32::from_le_bytes(p[end..end + 4].try_into().expect("4 bytes")) as usize;
        let v = &p[end + 4..end + 4 + vlen];
        end += 4 + vlen;
        Some(v)
    } else {
        None
    };
    *pos = end;
    MutationRef { table, key, value }
}

/// A validated batch or bulk-chunk body: iterating it borrows each mutation
/// from the payload without allocating.
#[derive(Clone, Copy, Debug)]
pub struct BatchRef<'a> {
    body: &'a [u8],
    count: usize,
    deletes: usize,
    /// The one table every mutation names, if they all name the same.
    single_table: Option<&'a str>,
}

impl<'a> BatchRef<'a> {
    /// Validates a whole body (mutation count, then exactly that many
    /// well-formed mutations); any defect fails the whole body.
    pub fn parse(kind: FrameType, payload: &'a [u8]) -> Result<BatchRef<'a>, FrameError> {
        let bad = |reason: String| FrameError::BadPayload { kind, reason };
        if payload.len() < 4 {
            return Err(bad("missing mutation count".into()));
        }
        let count = u32::from_le_bytes(payload[0..4].try_into().expect("4 bytes")) as usize;
        // Every mutation takes at least 6 bytes.
        if count > (payload.len() - 4) / 6 {
            return Err(bad(format!(
                "count {count} does not fit in {} bytes",
                payload.len()
            )));
        }
        let mut pos = 4usize;
        let mut prev = "";
        let mut deletes = 0;
        let mut single_table = None;
        let mut mixed = false;
        for i in 0..count {
            let m = parse_mutation(payload, &mut pos, i, kind, &mut prev)?;
            if m.value.is_none() {
                deletes += 1;
            }
            match single_table {
                None => single_table = Some(m.table),
                // A repeated name is the same slice: compare contents only
                // when it is not.
                Some(t)
                    if !(mixed
                        || t.as_ptr() == m.table.as_ptr() && t.len() == m.table.len()
                        || t == m.table) =>
                {
                    mixed = true
                }
                _ => {}
            }
        }
        if mixed {
            single_table = None;
        }
        if pos != payload.len() {
            return Err(bad(format!(
                "{} trailing bytes after {count} mutations",
                payload.len() - pos
            )));
        }
        Ok(BatchRef {
            body: payload,
            count,
            deletes,
            single_table,
        })
    }

    /// A body this crate encoded itself (a [`crate::Batch`]), not validated
    /// again; only [`BatchRef::iter`] and [`BatchRef::len`] are meaningful.
    pub(crate) fn trusted(payload: &'a [u8]) -> BatchRef<'a> {
        BatchRef {
            body: payload,
            count: u32::from_le_bytes(payload[0..4].try_into().expect("4 bytes")) as usize,
            deletes: 0,
            single_table: None,
        }
    }

    /// Number of mutations.
    pub fn len(&self) -> usize {
        self.count
    }

    /// The table every mutation names, if they all name the same one
    /// (`None` for an empty body or several tables).
    pub fn single_table(&self) -> Option<&'a str> {
        self.single_table
    }

    /// Number of deletes among the mutations.
    pub fn deletes(&self) -> usize {
        self.deletes
    }

    /// True if the body holds no mutation.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The mutations, in order.
    pub fn iter(&self) -> impl Iterator<Item = MutationRef<'a>> + 'a {
        let body = self.body;
        let mut pos = 4usize;
        let mut prev = "";
        (0..self.count).map(move |_| next_validated(body, &mut pos, &mut prev))
    }
}

/// Decodes a whole batch or bulk-chunk payload of `count` mutations.
///
/// The payload must hold exactly `count` well-formed mutations; any defect
/// fails the whole payload.
pub fn decode_batch(kind: FrameType, payload: &Bytes) -> Result<Vec<WireMutation>, FrameError> {
    let b = BatchRef::parse(kind, payload)?;
    let base = payload.as_ptr() as usize;
    let slice = |s: &[u8]| {
        let at = s.as_ptr() as usize - base;
        payload.slice(at..at + s.len())
    };
    Ok(b.iter()
        .map(|m| WireMutation {
            table: slice(m.table.as_bytes()),
            key: slice(m.key),
            value: m.value.map(slice),
        })
        .collect())
}

/// Validates a [`FrameType::Batch`] payload whose header sequence is `last`:
/// returns the first sequence number and the borrowed body.
pub fn parse_batch_payload(last: Seq, payload: &[u8]) -> Result<(Seq, BatchRef<'_>), FrameError> {
    let bad = |reason: String| FrameError::BadPayload {
        kind: FrameType::Batch,
        reason,
    };
    if payload.len() < 8 {
        return Err(bad("missing first sequence number".into()));
    }
    let first = u64::from_le_bytes(payload[..8].try_into().expect("8 bytes"));
    if first == 0 || first > last.saturating_add(1) {
        return Err(bad(format!("sequence range {first}..={last} is invalid")));
    }
    let body = BatchRef::parse(FrameType::Batch, &payload[8..])?;
    // `first - 1 <= last` here, so this cannot overflow, even when `last` is `u64::MAX`.
    let span = last - (first - 1);
    if body.len() as u64 > span {
        return Err(bad(format!(
            "{} mutations for the {span} sequence numbers {first}..={last}",
            body.len()
        )));
    }
    Ok((first, body))
}

/// Decodes a [`FrameType::Batch`] frame: its first and last sequence numbers
/// and its mutations.
///
/// Payload layout: first sequence (u64 LE), then a batch body as in
/// [`decode_batch`]. The header sequence is the last sequence of the batch;
/// a batch may carry fewer mutations than sequence numbers when records have
/// no representation in the stream version.
pub fn decode_batch_frame(frame: &Frame) -> Result<(Seq, Seq, Vec<WireMutation>), FrameError> {
    if frame.kind != FrameType::Batch {
        return Err(FrameError::BadPayload {
            kind: FrameType::Batch,
            reason: format!("frame is a {:?}", frame.kind),
        });
    }
    let (first, _) = parse_batch_payload(frame.seq, &frame.payload)?;
    let muts = decode_batch(FrameType::Batch, &frame.payload.slice(8..))?;
    Ok((first, frame.seq, muts))
}

/// Encodes a list of mutations as a batch payload (count then mutations).
pub fn encode_batch_payload(muts: &[Mutation]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + muts.iter().map(|m| m.key().len() + 16).sum::<usize>());
    out.extend_from_slice(&(muts.len() as u32).to_le_bytes());
    for m in muts {
        match m {
            Mutation::Put { table, key, value } => {
                encode_mutation(&mut out, table, key, Some(value))
            }
            Mutation::Delete { table, key } => encode_mutation(&mut out, table, key, None),
        }
    }
    out
}

/// A position in a replicated history: the last applied sequence and the
/// epoch its batch was applied in. Within one epoch a single active numbers
/// batches, so two instances at the same position hold the same history.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumePoint {
    /// Last applied sequence.
    pub seq: Seq,
    /// Epoch the batch at `seq` was applied in.
    pub epoch: Epoch,
}

/// JSON payloads of the control frames.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Control {
    /// Standby's opening announcement.
    Hello {
        /// Service replicated.
        service: String,
        /// Standby node identifier.
        node: String,
        /// Standby's native schema version.
        native: SchemaVersion,
        /// Versions the standby can read (convert to its native one).
        reads: Vec<SchemaVersion>,
        /// Versions the standby can write (convert its native one to).
        writes: Vec<SchemaVersion>,
        /// Whether the standby is a designated HA standby (counts for sync acks).
        ha: bool,
        /// Highest epoch the standby knows.
        epoch: Epoch,
        /// Where the standby's state stands, if it holds a complete state it
        /// would like to resume from instead of receiving a snapshot.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume: Option<ResumePoint>,
        /// Frame formats the standby reads and writes (`None`: a build from
        /// before negotiation, [`LEGACY_FORMATS`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        formats: Option<FormatRange>,
    },
    /// Active's acceptance.
    Welcome {
        /// Active node identifier.
        node: String,
        /// Active's native schema version.
        native: SchemaVersion,
        /// Negotiated stream version.
        stream_version: SchemaVersion,
        /// Tables of the stream version.
        tables: Vec<String>,
        /// Frame format chosen for the link, which both ends write from the
        /// next frame on (`None`: a build from before negotiation, format 2).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        format: Option<u8>,
    },
    /// Refusal.
    Refuse {
        /// Reason, as a sentence.
        reason: String,
    },
    /// Bulk transfer begins: the standby's state is replaced by the chunks
    /// and live batches that follow, applied in order.
    BulkBegin {
        /// Sequence number the transfer begins at: the first live batch
        /// that follows starts at `seq + 1`.
        seq: Seq,
        /// Records in the state when it began (progress only: records
        /// changed during the transfer may be sent twice).
        records: u64,
    },
    /// Bulk transfer ends: the standby's state is the active's at `seq`.
    BulkEnd {
        /// Sequence number the transfer ended at.
        seq: Seq,
        /// Digest of the active's state at `seq` in the stream version.
        digest: crate::Digest,
        /// Epoch the batch at `seq` was applied in (0: unknown, which rules
        /// out a later resume from this snapshot).
        #[serde(default)]
        last_epoch: Epoch,
    },
    /// Resume begins: replayed batches follow, from `from + 1` to `seq`.
    ResumeBegin {
        /// The standby's applied sequence the replay continues from.
        from: Seq,
        /// Sequence the replay ends at.
        seq: Seq,
        /// Number of replayed batches that follow.
        batches: u64,
    },
    /// Resume ends.
    ResumeEnd {
        /// Sequence reached.
        seq: Seq,
        /// Epoch the batch at `seq` was applied in.
        last_epoch: Epoch,
        /// Digest of the active's state at `seq`, in the stream version.
        digest: crate::Digest,
    },
    /// Digest of the active's state at the header seq, in the stream version.
    DigestCheck {
        /// Digest.
        digest: crate::Digest,
    },
    /// Standby's verdict on a digest comparison.
    DigestResult {
        /// Sequence the comparison was made at.
        seq: Seq,
        /// Whether the digests matched.
        matched: bool,
    },
    /// Promote request.
    Promote {
        /// Last sequence the standby must have applied before taking control.
        last_seq: Seq,
    },
}

impl Control {
    /// Frame type carrying this control message.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Control::Hello { .. } => FrameType::Hello,
            Control::Welcome { .. } => FrameType::Welcome,
            Control::Refuse { .. } => FrameType::Refuse,
            Control::BulkBegin { .. } => FrameType::BulkBegin,
            Control::BulkEnd { .. } => FrameType::BulkEnd,
            Control::DigestCheck { .. } => FrameType::DigestCheck,
            Control::DigestResult { .. } => FrameType::DigestResult,
            Control::Promote { .. } => FrameType::Promote,
            Control::ResumeBegin { .. } => FrameType::ResumeBegin,
            Control::ResumeEnd { .. } => FrameType::ResumeEnd,
        }
    }

    /// Encodes as a frame.
    pub fn encode(&self, epoch: Epoch, seq: Seq) -> Vec<u8> {
        let json = serde_json::to_vec(self).expect("control messages serialize");
        encode_frame(self.frame_type(), epoch, seq, &json)
    }

    /// Decodes the JSON payload of a control frame, checking it matches the frame type.
    pub fn decode(frame: &Frame) -> Result<Control, FrameError> {
        Control::decode_payload(frame.kind, &frame.payload)
    }

    /// Decodes the JSON payload of a control frame of type `kind`.
    pub fn decode_payload(kind: FrameType, payload: &[u8]) -> Result<Control, FrameError> {
        let c: Control = serde_json::from_slice(payload).map_err(|e| FrameError::BadPayload {
            kind,
            reason: e.to_string(),
        })?;
        if c.frame_type() != kind {
            return Err(FrameError::BadPayload {
                kind,
                reason: format!("payload is a {:?} message", c.frame_type()),
            });
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(first: Seq, muts: &[Mutation]) -> Vec<u8> {
        let mut p = first.to_le_bytes().to_vec();
        p.extend(encode_batch_payload(muts));
        p
    }

    fn range(min: u8, max: u8) -> FormatRange {
        format_range(min, max).unwrap()
    }

    #[test]
    fn hello_encodes_its_format_range_as_before() {
        let hello = Control::Hello {
            service: "kv".into(),
            node: "n".into(),
            native: 1,
            reads: vec![1],
            writes: vec![1],
            ha: true,
            epoch: crate::ControlEpoch(3),
            resume: None,
            formats: Some(range(2, 3)),
        };
        let json = br#"{"t":"hello","service":"kv","node":"n","native":1,"reads":[1],"writes":[1],"ha":true,"epoch":3,"formats":{"min":2,"max":3}}"#;
        assert_eq!(
            hello.encode(crate::ControlEpoch(3), 9),
            encode_frame(FrameType::Hello, crate::ControlEpoch(3), 9, json)
        );
    }

    #[test]
    fn negotiation_picks_the_highest_common_format_or_names_both_ranges() {
        assert_eq!(negotiate_format(range(2, 3), range(2, 2)), Ok(2));
        assert_eq!(negotiate_format(range(2, 2), range(2, 3)), Ok(2));
        assert_eq!(negotiate_format(range(2, 3), range(2, 3)), Ok(3));
        // A peer's range may name formats this build does not know.
        assert_eq!(
            negotiate_format(range(2, 3), FormatRange { min: 3, max: 9 }),
            Ok(3)
        );
        let err = negotiate_format(range(3, 3), range(2, 2)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("3..=3") && msg.contains("2..=2"), "{msg}");
        assert!(msg.contains("no common sync frame format"), "{msg}");
        // This end's own range must be known and non-empty.
        assert!(matches!(
            format_range(2, 9),
            Err(FormatError::Unknown { version: 9, .. })
        ));
        assert!(matches!(
            format_range(3, 2),
            Err(FormatError::Empty { min: 3, max: 2 })
        ));
        assert!(!BUILD_FORMATS.contains(NEXT_WIRE_VERSION));
    }

    #[test]
    fn next_format_differs_on_the_wire_and_decodes_only_within_range() {
        let v2 = encode_frame(FrameType::Ack, crate::ControlEpoch(7), 42, b"xy");
        let v3 = encode_frame_in(
            NEXT_WIRE_VERSION,
            FrameType::Ack,
            crate::ControlEpoch(7),
            42,
            b"xy",
        );
        assert_eq!(v3[4], NEXT_WIRE_VERSION);
        assert_eq!(&v3[12..20], &42u64.to_le_bytes());
        assert_eq!(&v3[20..28], &7u64.to_le_bytes());
        assert_ne!(v2[..HEADER_LEN], v3[..HEADER_LEN]);
        let (f, used) = decode_frame_in(&v3, range(2, 3)).unwrap();
        assert_eq!(
            (f.kind, f.epoch.0, f.seq, used),
            (FrameType::Ack, 7, 42, v3.len())
        );
        assert_eq!(&f.payload[..], b"xy");
        assert_eq!(decode_header_in(&v3, range(3, 3)).unwrap().version, 3);
        // Out of range: a clear error naming the version and the range.
        let err = decode_frame(&v3).unwrap_err();
        assert_eq!(
            err,
            FrameError::BadVersion {
                version: 3,
                min: 2,
                max: 2
            }
        );
        assert!(err.to_string().contains("format 3") && err.to_string().contains("2..=2"));
        let err = decode_frame_in(&v2, range(3, 3)).unwrap_err();
        assert!(
            matches!(err, FrameError::BadVersion { version: 2, .. }),
            "{err}"
        );
        // read_frame_in and read_frame_into_in agree.
        let f2 = read_frame_in(&mut &v3[..], range(2, 3)).unwrap().unwrap();
        assert_eq!(f2, f);
        let mut buf = Vec::new();
        let h = read_frame_into_in(&mut &v3[..], &mut buf, range(2, 3))
            .unwrap()
            .unwrap();
        assert_eq!((h.epoch.0, h.seq, h.version), (7, 42, 3));
    }

    #[test]
    fn handshake_frames_keep_the_frozen_format_and_decode_in_any_range() {
        for kind in [FrameType::Hello, FrameType::Welcome, FrameType::Refuse] {
            let f = encode_frame_in(NEXT_WIRE_VERSION, kind, crate::ControlEpoch(1), 2, b"{}");
            assert_eq!(f[4], HANDSHAKE_VERSION);
            assert_eq!(f, encode_frame(kind, crate::ControlEpoch(1), 2, b"{}"));
            let (d, _) = decode_frame_in(&f, range(3, 3)).unwrap();
            assert_eq!((d.kind, d.epoch.0, d.seq), (kind, 1, 2));
        }
        // Only handshake frames: anything else in the frozen format is out of range.
        let ack = encode_frame(FrameType::Ack, crate::ControlEpoch(1), 2, &[]);
        assert!(matches!(
            decode_frame_in(&ack, range(3, 3)),
            Err(FrameError::BadVersion {
                version: 2,
                min: 3,
                max: 3
            })
        ));
    }

    #[test]
    fn corrupt_version_byte_after_negotiation_is_an_error_not_a_panic() {
        let good = encode_frame_in(
            NEXT_WIRE_VERSION,
            FrameType::Heartbeat,
            crate::ControlEpoch(3),
            4,
            b"abc",
        );
        for v in [0u8, 1, 2, 4, 200, 255] {
            let mut f = good.clone();
            f[4] = v;
            let err = decode_frame_in(&f, range(2, 3)).unwrap_err();
            match v {
                // In range but not what the frame was written in: the CRC covers the byte.
                2 => assert!(matches!(err, FrameError::BadCrc { .. }), "{err}"),
                _ => assert_eq!(
                    err,
                    FrameError::BadVersion {
                        version: v,
                        min: 2,
                        max: 3
                    }
                ),
            }
            assert!(read_frame_in(&mut &f[..], range(2, 3)).is_err());
        }
    }

    #[test]
    fn format_writer_reencodes_frames_split_across_writes() {
        use std::io::Write;
        let frames = [
            encode_frame(FrameType::Hello, crate::ControlEpoch(0), 0, b"{}"),
            encode_frame(FrameType::Batch, crate::ControlEpoch(5), 9, &[1u8; 300]),
            encode_frame(FrameType::Ack, crate::ControlEpoch(5), 9, &[]),
            encode_frame(FrameType::Refuse, crate::ControlEpoch(5), 0, b"{}"),
            encode_frame(FrameType::Heartbeat, crate::ControlEpoch(6), 10, b"x"),
        ];
        let native: Vec<u8> = frames.concat();
        let expected: Vec<u8> = frames
            .iter()
            .map(|f| {
                let (d, _) = decode_frame(f).unwrap();
                encode_frame_in(NEXT_WIRE_VERSION, d.kind, d.epoch, d.seq, &d.payload)
            })
            .collect::<Vec<_>>()
            .concat();
        for step in [1usize, 7, 31, 32, 33, 100, native.len()] {
            let mut w = FormatWriter::new(Vec::new(), NEXT_WIRE_VERSION).unwrap();
            for chunk in native.chunks(step) {
                w.write_all(chunk).unwrap();
            }
            assert!(w.pending.is_empty());
            assert_eq!(w.inner, expected, "chunks of {step}");
        }
        // Garbage is refused, not passed on.
        let mut w = FormatWriter::new(Vec::new(), NEXT_WIRE_VERSION).unwrap();
        assert!(w.write_all(&[0u8; 40]).is_err());
        assert!(w.inner.is_empty());
        assert!(FormatWriter::new(Vec::new(), 9).is_err());
    }

    #[test]
    fn batch_ending_at_the_largest_sequence_number_is_checked_without_overflow() {
        let put = Mutation::put("kv", b"k".to_vec(), b"v".to_vec());
        let two = [put.clone(), put.clone()];
        let whole = batch(1, &two);
        let (first, body) = parse_batch_payload(u64::MAX, &whole).unwrap();
        assert_eq!((first, body.len()), (1, 2));
        let last_one = batch(u64::MAX, &two[..1]);
        let (first, body) = parse_batch_payload(u64::MAX, &last_one).unwrap();
        assert_eq!((first, body.len()), (u64::MAX, 1));
        let too_many = batch(u64::MAX, &two);
        let err = parse_batch_payload(u64::MAX, &too_many).unwrap_err();
        assert!(
            err.to_string()
                .contains("2 mutations for the 1 sequence numbers"),
            "{err}"
        );
        let frame = encode_frame(
            FrameType::Batch,
            crate::ControlEpoch(1),
            u64::MAX,
            &batch(u64::MAX - 1, &two),
        );
        let (frame, _) = decode_frame(&frame).unwrap();
        let (first, last, muts) = decode_batch_frame(&frame).unwrap();
        assert_eq!((first, last, muts.len()), (u64::MAX - 1, u64::MAX, 2));
        // Sequence numbers start at 1, whatever the last one.
        assert!(parse_batch_payload(u64::MAX, &batch(0, &[])).is_err());
    }
}
