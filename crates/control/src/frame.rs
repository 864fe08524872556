use std::io::{ErrorKind, Read, Write};

use crate::ControlError;

/// Magic bytes opening every frame.
pub const MAGIC: [u8; 4] = *b"HLCT";
/// The frame format version this build writes by default (its newest).
pub const FRAME_VERSION: u8 = 1;
/// The oldest frame format this build reads and writes (the journal's
/// `MIN_FORMAT_VERSION..=FORMAT_VERSION` in the same style).
pub const MIN_FRAME_VERSION: u8 = 1;
/// Format of the handshake frames (the instance's [`crate::Hello`], the agent's
/// [`crate::AgentCommand::Hello`] and the instance's answer to it): frozen, so
/// every build reads them whatever its range.
pub const HANDSHAKE_VERSION: u8 = 1;
/// A test-only next format standing in for the next release's: the CRC32C also
/// covers the header bytes 4..10 (version, kind, length), not only the body.
#[cfg(any(test, feature = "next-format"))]
pub const NEXT_FRAME_VERSION: u8 = 2;

/// An inclusive range of control frame formats (what an end reads and writes).
pub use hitless_format::FormatRange;

/// The control formats this build reads and writes by default.
pub const BUILD_FORMATS: FormatRange = FormatRange {
    min: MIN_FRAME_VERSION,
    max: FRAME_VERSION,
};

/// What an end that announces no range speaks (a build from before negotiation).
pub const LEGACY_FORMATS: FormatRange = FormatRange { min: 1, max: 1 };

/// The control formats this build has codecs for (test builds also know `NEXT_FRAME_VERSION`).
pub fn known_formats() -> FormatRange {
    #[cfg(any(test, feature = "next-format"))]
    let max = NEXT_FRAME_VERSION;
    #[cfg(not(any(test, feature = "next-format")))]
    let max = FRAME_VERSION;
    FormatRange {
        min: MIN_FRAME_VERSION,
        max,
    }
}

/// The control format range `min..=max`; fails if it is empty or names a format this build
/// does not know.
pub fn format_range(min: u8, max: u8) -> Result<FormatRange, ControlError> {
    let known = known_formats();
    FormatRange::new(min, max, known).map_err(|_| ControlError::BadFormatRange {
        range: FormatRange { min, max },
        known,
    })
}

/// Bytes in a frame header: magic, version, kind, length, CRC32C.
pub const HEADER_LEN: usize = 14;
/// Largest body accepted or produced (1 MiB).
pub const MAX_BODY_LEN: usize = 1 << 20;

/// Direction of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// Agent to instance: carries an [`crate::AgentMessage`].
    Agent = 1,
    /// Instance to agent: carries an [`crate::InstanceMessage`].
    Instance = 2,
}

impl FrameKind {
    fn from_byte(b: u8) -> Result<Self, ControlError> {
        match b {
            1 => Ok(FrameKind::Agent),
            2 => Ok(FrameKind::Instance),
            other => Err(ControlError::UnknownKind(other)),
        }
    }
}

struct Header {
    version: u8,
    kind: FrameKind,
    len: usize,
    crc: u32,
}

/// Checks a header of a frame in any format of `formats` or in the frozen
/// [`HANDSHAKE_VERSION`] (whether such a frame is a handshake message is
/// checked once its body is decoded, see `crate::message`).
fn parse_header(h: &[u8; HEADER_LEN], formats: FormatRange) -> Result<Header, ControlError> {
    let magic = [h[0], h[1], h[2], h[3]];
    if magic != MAGIC {
        return Err(ControlError::BadMagic(magic));
    }
    let version = h[4];
    let readable = formats.contains(version) && known_formats().contains(version);
    if !readable && version != HANDSHAKE_VERSION {
        return Err(ControlError::UnsupportedVersion {
            found: version,
            range: formats,
        });
    }
    let kind = FrameKind::from_byte(h[5])?;
    let len = u32::from_be_bytes([h[6], h[7], h[8], h[9]]) as usize;
    if len > MAX_BODY_LEN {
        return Err(ControlError::Oversized {
            len,
            max: MAX_BODY_LEN,
        });
    }
    let crc = u32::from_be_bytes([h[10], h[11], h[12], h[13]]);
    Ok(Header {
        version,
        kind,
        len,
        crc,
    })
}

/// The CRC32C of a frame in format `version`: of the body, and in the next
/// format of the header's version, kind and length too.
fn frame_crc(version: u8, header: &[u8], body: &[u8]) -> u32 {
    #[cfg(any(test, feature = "next-format"))]
    if version == NEXT_FRAME_VERSION {
        return crc32c::crc32c_append(crc32c::crc32c(&header[4..10]), body);
    }
    let _ = (version, header);
    crc32c::crc32c(body)
}

fn check_crc(h: &Header, header: &[u8], body: &[u8]) -> Result<(), ControlError> {
    let expected = h.crc;
    let actual = frame_crc(h.version, header, body);
    if actual != expected {
        return Err(ControlError::Checksum { expected, actual });
    }
    Ok(())
}

/// Encodes one frame around `body`.
pub fn encode_frame(kind: FrameKind, body: &[u8]) -> Result<Vec<u8>, ControlError> {
    encode_frame_in(FRAME_VERSION, kind, body)
}

/// Encodes one frame around `body` in format `version` (one of [`known_formats`]).
pub fn encode_frame_in(version: u8, kind: FrameKind, body: &[u8]) -> Result<Vec<u8>, ControlError> {
    if !known_formats().contains(version) {
        return Err(ControlError::UnsupportedVersion {
            found: version,
            range: known_formats(),
        });
    }
    if body.len() > MAX_BODY_LEN {
        return Err(ControlError::Oversized {
            len: body.len(),
            max: MAX_BODY_LEN,
        });
    }
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.push(version);
    out.push(kind as u8);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    let crc = frame_crc(version, &out, body);
    out.extend_from_slice(&crc.to_be_bytes());
    out.extend_from_slice(body);
    Ok(out)
}

/// Decodes one frame from the start of `buf`.
///
/// Returns `Ok(None)` when `buf` holds only part of a frame (more bytes are needed), or the
/// kind, the body and the number of bytes consumed.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(FrameKind, Vec<u8>, usize)>, ControlError> {
    Ok(decode_frame_in(buf, BUILD_FORMATS)?.map(|(_, k, b, n)| (k, b, n)))
}

/// A decoded frame: its format, kind, body and the bytes it took.
pub type VersionedFrame = (u8, FrameKind, Vec<u8>, usize);

/// Like [`decode_frame`] for a frame in any format of `formats` (or in the frozen
/// [`HANDSHAKE_VERSION`]); also returns the frame's format.
pub fn decode_frame_in(
    buf: &[u8],
    formats: FormatRange,
) -> Result<Option<VersionedFrame>, ControlError> {
    if buf.len() < HEADER_LEN {
        // Reject a wrong magic as early as possible.
        let n = buf.len().min(4);
        if buf[..n] != MAGIC[..n] {
            let mut m = [0u8; 4];
            m[..n].copy_from_slice(&buf[..n]);
            return Err(ControlError::BadMagic(m));
        }
        return Ok(None);
    }
    let mut h = [0u8; HEADER_LEN];
    h.copy_from_slice(&buf[..HEADER_LEN]);
    let header = parse_header(&h, formats)?;
    let end = HEADER_LEN + header.len;
    if buf.len() < end {
        return Ok(None);
    }
    let body = &buf[HEADER_LEN..end];
    check_crc(&header, &h, body)?;
    Ok(Some((header.version, header.kind, body.to_vec(), end)))
}

/// Reads exactly `buf.len()` bytes. Returns the count read before EOF if the stream ends.
fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> Result<usize, ControlError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => return Ok(got),
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(ControlError::Io(e)),
        }
    }
    Ok(got)
}

/// Reads one frame from a blocking stream.
///
/// Returns `Ok(None)` on a clean end of stream at a frame boundary. A stream ending inside a
/// frame yields [`ControlError::Truncated`]. After a [`ControlError::Checksum`] the stream is
/// still aligned on the next frame.
pub fn read_frame<R: Read + ?Sized>(
    r: &mut R,
) -> Result<Option<(FrameKind, Vec<u8>)>, ControlError> {
    Ok(read_frame_in(r, BUILD_FORMATS)?.map(|(_, k, b)| (k, b)))
}

/// Like [`read_frame`] for a frame in any format of `formats` (or in the frozen
/// [`HANDSHAKE_VERSION`]); also returns the frame's format.
pub fn read_frame_in<R: Read + ?Sized>(
    r: &mut R,
    formats: FormatRange,
) -> Result<Option<(u8, FrameKind, Vec<u8>)>, ControlError> {
    let mut h = [0u8; HEADER_LEN];
    let got = read_full(r, &mut h)?;
    if got == 0 {
        return Ok(None);
    }
    if got < HEADER_LEN {
        // Prefer the more telling error when the fragment is not even ours.
        let n = got.min(4);
        if h[..n] != MAGIC[..n] {
            let mut m = [0u8; 4];
            m[..n].copy_from_slice(&h[..n]);
            return Err(ControlError::BadMagic(m));
        }
        return Err(ControlError::Truncated {
            got,
            want: HEADER_LEN,
        });
    }
    let header = parse_header(&h, formats)?;
    let mut body = vec![0u8; header.len];
    let got = read_full(r, &mut body)?;
    if got < header.len {
        return Err(ControlError::Truncated {
            got: HEADER_LEN + got,
            want: HEADER_LEN + header.len,
        });
    }
    check_crc(&header, &h, &body)?;
    Ok(Some((header.version, header.kind, body)))
}

/// Writes one frame and flushes the stream.
pub fn write_frame<W: Write + ?Sized>(
    w: &mut W,
    kind: FrameKind,
    body: &[u8],
) -> Result<(), ControlError> {
    write_frame_in(w, FRAME_VERSION, kind, body)
}

/// Writes one frame in format `version` and flushes the stream.
pub fn write_frame_in<W: Write + ?Sized>(
    w: &mut W,
    version: u8,
    kind: FrameKind,
    body: &[u8],
) -> Result<(), ControlError> {
    let frame = encode_frame_in(version, kind, body)?;
    w.write_all(&frame)?;
    w.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hellos_serialize_their_format_ranges_as_before() {
        let agent = crate::AgentCommand::Hello {
            formats: format_range(1, 2).unwrap(),
        };
        assert_eq!(
            serde_json::to_string(&agent).unwrap(),
            r#"{"type":"hello","formats":{"min":1,"max":2}}"#
        );
        let instance = crate::Hello {
            instance_id: "i".into(),
            image_version: "1".into(),
            schemas: Default::default(),
            kernel_release: None,
            service_addr: "s".into(),
            sync_addr: "y".into(),
            formats: Some(format_range(1, 1).unwrap()),
        };
        assert_eq!(
            serde_json::to_string(&instance).unwrap(),
            r#"{"instance_id":"i","image_version":"1","schemas":{},"kernel_release":null,"service_addr":"s","sync_addr":"y","formats":{"min":1,"max":1}}"#
        );
    }

    #[test]
    fn frame_round_trips_through_buffer_and_stream() {
        let f = encode_frame(FrameKind::Agent, b"{\"x\":1}").unwrap();
        let (k, body, used) = decode_frame(&f).unwrap().unwrap();
        assert_eq!(
            (k, body.as_slice(), used),
            (FrameKind::Agent, &b"{\"x\":1}"[..], f.len())
        );
        let mut cur = std::io::Cursor::new(f);
        let (k, body) = read_frame(&mut cur).unwrap().unwrap();
        assert_eq!((k, body.as_slice()), (FrameKind::Agent, &b"{\"x\":1}"[..]));
        assert!(read_frame(&mut cur).unwrap().is_none());
    }

    #[test]
    fn corrupted_body_is_a_checksum_error_and_stream_stays_aligned() {
        let mut bytes = encode_frame(FrameKind::Instance, b"hello").unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        bytes.extend(encode_frame(FrameKind::Instance, b"next").unwrap());
        let mut cur = std::io::Cursor::new(bytes);
        let err = read_frame(&mut cur).unwrap_err();
        assert!(matches!(err, ControlError::Checksum { .. }), "{err}");
        assert!(err.is_recoverable());
        assert_eq!(read_frame(&mut cur).unwrap().unwrap().1, b"next");
    }

    #[test]
    fn oversized_length_is_rejected_before_allocation() {
        let mut f = encode_frame(FrameKind::Agent, b"").unwrap();
        f[6..10].copy_from_slice(&u32::MAX.to_be_bytes());
        let err = read_frame(&mut std::io::Cursor::new(f.clone())).unwrap_err();
        assert!(matches!(err, ControlError::Oversized { .. }), "{err}");
        assert!(matches!(
            decode_frame(&f),
            Err(ControlError::Oversized { .. })
        ));
        let big = vec![0u8; MAX_BODY_LEN + 1];
        assert!(matches!(
            encode_frame(FrameKind::Agent, &big),
            Err(ControlError::Oversized { .. })
        ));
    }

    #[test]
    fn bad_magic_version_and_kind_are_named() {
        let good = encode_frame(FrameKind::Agent, b"{}").unwrap();
        let mut m = good.clone();
        m[0] = b'X';
        assert!(matches!(decode_frame(&m), Err(ControlError::BadMagic(_))));
        let mut v = good.clone();
        v[4] = 9;
        assert!(matches!(
            decode_frame(&v),
            Err(ControlError::UnsupportedVersion { found: 9, .. })
        ));
        let mut k = good.clone();
        k[5] = 7;
        assert!(matches!(
            decode_frame(&k),
            Err(ControlError::UnknownKind(7))
        ));
        assert!(matches!(
            decode_frame(b"GET / HTTP/1.1"),
            Err(ControlError::BadMagic(_))
        ));
    }

    #[test]
    fn next_format_differs_on_the_wire_and_decodes_only_within_range() {
        let body = b"{\"type\":\"ack\",\"request_id\":3}";
        let v1 = encode_frame(FrameKind::Instance, body).unwrap();
        let v2 = encode_frame_in(NEXT_FRAME_VERSION, FrameKind::Instance, body).unwrap();
        assert_eq!(v2[4], NEXT_FRAME_VERSION);
        // The checksum covers more in the next format.
        assert_ne!(v1[10..14], v2[10..14]);
        let next = format_range(1, 2).unwrap();
        let (v, k, b, used) = decode_frame_in(&v2, next).unwrap().unwrap();
        assert_eq!(
            (v, k, b.as_slice(), used),
            (2, FrameKind::Instance, &body[..], v2.len())
        );
        let (v, k, b) = read_frame_in(&mut std::io::Cursor::new(&v2), next)
            .unwrap()
            .unwrap();
        assert_eq!((v, k, b.as_slice()), (2, FrameKind::Instance, &body[..]));
        let err = decode_frame(&v2).unwrap_err();
        assert_eq!(
            err.to_string(),
            "control frame format 2 is not supported; this end reads control formats 1..=1"
        );
        // Relabelled as format 1, the next format's checksum does not hold.
        let mut relabelled = v2.clone();
        relabelled[4] = 1;
        assert!(matches!(
            decode_frame_in(&relabelled, next),
            Err(ControlError::Checksum { .. })
        ));
    }

    #[test]
    fn format_ranges_are_checked_and_negotiate_the_highest_common_format() {
        assert!(matches!(
            format_range(2, 1),
            Err(ControlError::BadFormatRange { .. })
        ));
        let err = format_range(1, 9).unwrap_err();
        assert_eq!(
            err.to_string(),
            "control format range 1..=9 is invalid: this build knows control formats 1..=2"
        );
        let a = format_range(1, 2).unwrap();
        let b = format_range(2, 2).unwrap();
        assert_eq!(a.highest_common(&b), Some(2));
        assert_eq!(a.highest_common(&BUILD_FORMATS), Some(1));
        assert_eq!(b.highest_common(&BUILD_FORMATS), None);
        assert!(!BUILD_FORMATS.contains(NEXT_FRAME_VERSION));
        assert!(encode_frame_in(9, FrameKind::Agent, b"").is_err());
    }

    #[test]
    fn truncated_frames_are_reported_with_sizes() {
        let f = encode_frame(FrameKind::Agent, b"0123456789").unwrap();
        for cut in 1..f.len() {
            assert!(decode_frame(&f[..cut]).unwrap().is_none());
            let err = read_frame(&mut std::io::Cursor::new(&f[..cut])).unwrap_err();
            match err {
                ControlError::Truncated { got, want } => {
                    assert_eq!(got, cut);
                    assert!(want > got);
                }
                other => panic!("cut at {cut}: {other}"),
            }
        }
    }

    proptest! {
        #[test]
        fn any_body_round_trips(body in proptest::collection::vec(any::<u8>(), 0..4096), agent in any::<bool>()) {
            let kind = if agent { FrameKind::Agent } else { FrameKind::Instance };
            let f = encode_frame(kind, &body).unwrap();
            let (k, b, used) = decode_frame(&f).unwrap().unwrap();
            prop_assert_eq!(k, kind);
            prop_assert_eq!(b, body);
            prop_assert_eq!(used, f.len());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_frame(&bytes);
            let mut cur = std::io::Cursor::new(&bytes);
            for _ in 0..8 {
                match read_frame(&mut cur) {
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(e) if e.is_recoverable() => continue,
                    Err(_) => break,
                }
            }
        }

        #[test]
        fn flipped_bit_is_always_detected(body in proptest::collection::vec(any::<u8>(), 1..256), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut f = encode_frame(FrameKind::Agent, &body).unwrap();
            let i = pos.index(f.len());
            f[i] ^= 1 << bit;
            // Either rejected or, if the length field shrank/grew, incomplete: never the original body.
            if let Ok(Some((_, b, _))) = decode_frame(&f) {
                prop_assert_ne!(b, body);
            }
        }
    }
}
