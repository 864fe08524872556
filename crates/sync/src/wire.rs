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
    /// The frame format version is not supported.
    #[error("unsupported frame format version {0} (this build reads version {WIRE_VERSION})")]
    BadVersion(u8),
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

/// Parses and validates a header (everything but the CRC, which needs the payload).
pub fn decode_header(buf: &[u8]) -> Result<Header, FrameError> {
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
    if buf[4] != WIRE_VERSION {
        return Err(FrameError::BadVersion(buf[4]));
    }
    let kind = FrameType::from_u8(buf[5]).ok_or(FrameError::BadType(buf[5]))?;
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
    Ok(Header {
        kind,
        len,
        epoch: u64::from_le_bytes(buf[12..20].try_into().expect("8 bytes")),
        seq: u64::from_le_bytes(buf[20..28].try_into().expect("8 bytes")),
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
    let h = decode_header(buf)?;
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
    let h = decode_header(&header)?;
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
    let h = decode_header(&header)?;
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
        self.buf.extend_from_slice(&epoch.to_le_bytes());
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
        let frame = encode_frame(FrameType::Batch, 1, u64::MAX, &batch(u64::MAX - 1, &two));
        let (frame, _) = decode_frame(&frame).unwrap();
        let (first, last, muts) = decode_batch_frame(&frame).unwrap();
        assert_eq!((first, last, muts.len()), (u64::MAX - 1, u64::MAX, 2));
        // Sequence numbers start at 1, whatever the last one.
        assert!(parse_batch_payload(u64::MAX, &batch(0, &[])).is_err());
    }
}
