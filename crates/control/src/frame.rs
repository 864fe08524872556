use std::io::{ErrorKind, Read, Write};

use crate::ControlError;

/// Magic bytes opening every frame.
pub const MAGIC: [u8; 4] = *b"HLCT";
/// The frame format version this crate speaks.
pub const FRAME_VERSION: u8 = 1;
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
    kind: FrameKind,
    len: usize,
    crc: u32,
}

fn parse_header(h: &[u8; HEADER_LEN]) -> Result<Header, ControlError> {
    let magic = [h[0], h[1], h[2], h[3]];
    if magic != MAGIC {
        return Err(ControlError::BadMagic(magic));
    }
    if h[4] != FRAME_VERSION {
        return Err(ControlError::UnsupportedVersion {
            found: h[4],
            supported: FRAME_VERSION,
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
    Ok(Header { kind, len, crc })
}

fn check_crc(expected: u32, body: &[u8]) -> Result<(), ControlError> {
    let actual = crc32c::crc32c(body);
    if actual != expected {
        return Err(ControlError::Checksum { expected, actual });
    }
    Ok(())
}

/// Encodes one frame around `body`.
pub fn encode_frame(kind: FrameKind, body: &[u8]) -> Result<Vec<u8>, ControlError> {
    if body.len() > MAX_BODY_LEN {
        return Err(ControlError::Oversized {
            len: body.len(),
            max: MAX_BODY_LEN,
        });
    }
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.push(FRAME_VERSION);
    out.push(kind as u8);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&crc32c::crc32c(body).to_be_bytes());
    out.extend_from_slice(body);
    Ok(out)
}

/// Decodes one frame from the start of `buf`.
///
/// Returns `Ok(None)` when `buf` holds only part of a frame (more bytes are needed), or the
/// kind, the body and the number of bytes consumed.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(FrameKind, Vec<u8>, usize)>, ControlError> {
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
    let header = parse_header(&h)?;
    let end = HEADER_LEN + header.len;
    if buf.len() < end {
        return Ok(None);
    }
    let body = &buf[HEADER_LEN..end];
    check_crc(header.crc, body)?;
    Ok(Some((header.kind, body.to_vec(), end)))
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
    let header = parse_header(&h)?;
    let mut body = vec![0u8; header.len];
    let got = read_full(r, &mut body)?;
    if got < header.len {
        return Err(ControlError::Truncated {
            got: HEADER_LEN + got,
            want: HEADER_LEN + header.len,
        });
    }
    check_crc(header.crc, &body)?;
    Ok(Some((header.kind, body)))
}

/// Writes one frame and flushes the stream.
pub fn write_frame<W: Write + ?Sized>(
    w: &mut W,
    kind: FrameKind,
    body: &[u8],
) -> Result<(), ControlError> {
    let frame = encode_frame(kind, body)?;
    w.write_all(&frame)?;
    w.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
