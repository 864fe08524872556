//! The frames of the witness protocol: a checked envelope around one message body.
//!
//! A frame is a 14-byte header — magic `HLWT`, format version, kind, body length (big-endian
//! u32), CRC32C (big-endian u32) of the header's version, kind and length and of the body —
//! then the body (at most [`MAX_BODY_LEN`] bytes). A frame is refused whole on any mismatch;
//! decoding never trusts the length before checking it against the limit.

pub use hitless_format::FormatRange;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::WireError;

/// Magic bytes opening every frame.
pub const MAGIC: [u8; 4] = *b"HLWT";
/// The frame format this build writes (its newest).
pub const WIRE_VERSION: u8 = 1;
/// The oldest frame format this build reads and writes.
pub const MIN_WIRE_VERSION: u8 = 1;
/// The format of the hello exchange: frozen, so every build reads the other's hello whatever
/// its range and the two can agree on a format.
pub const HANDSHAKE_VERSION: u8 = 1;
/// The formats this build reads and writes.
pub const BUILD_FORMATS: FormatRange = FormatRange {
    min: MIN_WIRE_VERSION,
    max: WIRE_VERSION,
};
/// Only the frozen hello format (what a connection accepts before its hello).
pub const HANDSHAKE_FORMATS: FormatRange = FormatRange {
    min: HANDSHAKE_VERSION,
    max: HANDSHAKE_VERSION,
};
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 14;
/// Largest body accepted or produced (64 KiB: a record is a few hundred bytes).
pub const MAX_BODY_LEN: usize = 64 * 1024;

/// Direction of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// Client to witness.
    Request = 1,
    /// Witness to client.
    Response = 2,
}

impl FrameKind {
    fn from_byte(b: u8) -> Result<Self, WireError> {
        match b {
            1 => Ok(FrameKind::Request),
            2 => Ok(FrameKind::Response),
            other => Err(WireError::UnknownKind(other)),
        }
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Its format.
    pub version: u8,
    /// Its direction.
    pub kind: FrameKind,
    /// Its body (checked against the CRC).
    pub body: Vec<u8>,
}

struct Header {
    version: u8,
    kind: FrameKind,
    len: usize,
    crc: u32,
}

fn parse_header(h: &[u8; HEADER_LEN], accept: FormatRange) -> Result<Header, WireError> {
    let magic = [h[0], h[1], h[2], h[3]];
    if magic != MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    let version = h[4];
    if !accept.contains(version) || !BUILD_FORMATS.contains(version) {
        return Err(WireError::UnsupportedVersion {
            found: version,
            accepted: accept,
        });
    }
    let kind = FrameKind::from_byte(h[5])?;
    let len = u32::from_be_bytes([h[6], h[7], h[8], h[9]]) as usize;
    if len > MAX_BODY_LEN {
        return Err(WireError::Oversized {
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

fn frame_crc(header: &[u8], body: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&header[4..10]), body)
}

fn check_crc(h: &Header, header: &[u8], body: &[u8]) -> Result<(), WireError> {
    let actual = frame_crc(header, body);
    if actual != h.crc {
        return Err(WireError::Checksum {
            expected: h.crc,
            actual,
        });
    }
    Ok(())
}

/// Encodes one frame of format `version` around `body`.
pub fn encode_frame(version: u8, kind: FrameKind, body: &[u8]) -> Result<Vec<u8>, WireError> {
    if !BUILD_FORMATS.contains(version) {
        return Err(WireError::UnsupportedVersion {
            found: version,
            accepted: BUILD_FORMATS,
        });
    }
    if body.len() > MAX_BODY_LEN {
        return Err(WireError::Oversized {
            len: body.len(),
            max: MAX_BODY_LEN,
        });
    }
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.push(version);
    out.push(kind as u8);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    let crc = frame_crc(&out, body);
    out.extend_from_slice(&crc.to_be_bytes());
    out.extend_from_slice(body);
    Ok(out)
}

/// Decodes one frame of a format in `accept` from the start of `buf`: `Ok(None)` when `buf`
/// holds only the start of a frame, else the frame and the bytes it took.
pub fn decode_frame(buf: &[u8], accept: FormatRange) -> Result<Option<(Frame, usize)>, WireError> {
    if buf.len() < HEADER_LEN {
        let n = buf.len().min(MAGIC.len());
        if buf[..n] != MAGIC[..n] {
            let mut m = [0u8; 4];
            m[..n].copy_from_slice(&buf[..n]);
            return Err(WireError::BadMagic(m));
        }
        return Ok(None);
    }
    let mut h = [0u8; HEADER_LEN];
    h.copy_from_slice(&buf[..HEADER_LEN]);
    let header = parse_header(&h, accept)?;
    let end = HEADER_LEN + header.len;
    if buf.len() < end {
        return Ok(None);
    }
    let body = &buf[HEADER_LEN..end];
    check_crc(&header, &h, body)?;
    Ok(Some((
        Frame {
            version: header.version,
            kind: header.kind,
            body: body.to_vec(),
        },
        end,
    )))
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
async fn read_full<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    buf: &mut [u8],
) -> Result<usize, WireError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]).await {
            Ok(0) => return Ok(got),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(WireError::Io(e)),
        }
    }
    Ok(got)
}

/// Reads one frame of a format in `accept` from a stream: `Ok(None)` on a clean end of the
/// stream between frames, [`WireError::Truncated`] on an end inside one. The body is
/// allocated only after its length passed the limit.
pub async fn read_frame<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    accept: FormatRange,
) -> Result<Option<Frame>, WireError> {
    let mut h = [0u8; HEADER_LEN];
    let got = read_full(r, &mut h).await?;
    if got == 0 {
        return Ok(None);
    }
    if got < HEADER_LEN {
        let n = got.min(MAGIC.len());
        if h[..n] != MAGIC[..n] {
            let mut m = [0u8; 4];
            m[..n].copy_from_slice(&h[..n]);
            return Err(WireError::BadMagic(m));
        }
        return Err(WireError::Truncated {
            got,
            want: HEADER_LEN,
        });
    }
    let header = parse_header(&h, accept)?;
    let mut body = vec![0u8; header.len];
    let got = read_full(r, &mut body).await?;
    if got < header.len {
        return Err(WireError::Truncated {
            got: HEADER_LEN + got,
            want: HEADER_LEN + header.len,
        });
    }
    check_crc(&header, &h, &body)?;
    Ok(Some(Frame {
        version: header.version,
        kind: header.kind,
        body,
    }))
}

/// Writes one encoded frame and flushes the stream.
pub async fn write_frame<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    frame: &[u8],
) -> Result<(), WireError> {
    w.write_all(frame).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_frame_round_trips_through_a_buffer() {
        let f = encode_frame(1, FrameKind::Request, b"{\"x\":1}").unwrap();
        let (frame, used) = decode_frame(&f, BUILD_FORMATS).unwrap().unwrap();
        assert_eq!(used, f.len());
        assert_eq!(
            frame,
            Frame {
                version: 1,
                kind: FrameKind::Request,
                body: b"{\"x\":1}".to_vec()
            }
        );
        for cut in 0..f.len() {
            assert!(decode_frame(&f[..cut], BUILD_FORMATS).unwrap().is_none());
        }
    }

    #[tokio::test]
    async fn a_frame_round_trips_through_a_stream_and_a_cut_one_is_truncated() {
        let f = encode_frame(1, FrameKind::Response, b"body").unwrap();
        let mut two = f.clone();
        two.extend_from_slice(&f);
        let mut r = &two[..];
        for _ in 0..2 {
            let frame = read_frame(&mut r, BUILD_FORMATS).await.unwrap().unwrap();
            assert_eq!(frame.body, b"body");
        }
        assert!(read_frame(&mut r, BUILD_FORMATS).await.unwrap().is_none());
        for cut in 1..f.len() {
            let err = read_frame(&mut &f[..cut], BUILD_FORMATS).await.unwrap_err();
            assert!(
                matches!(err, WireError::Truncated { got, .. } if got == cut),
                "{err}"
            );
        }
    }

    #[test]
    fn wrong_magic_version_kind_length_and_crc_are_named() {
        let good = encode_frame(1, FrameKind::Request, b"{}").unwrap();
        let mut m = good.clone();
        m[0] = b'X';
        assert!(matches!(
            decode_frame(&m, BUILD_FORMATS),
            Err(WireError::BadMagic(_))
        ));
        assert!(matches!(
            decode_frame(b"GET /", BUILD_FORMATS),
            Err(WireError::BadMagic(_))
        ));
        let mut v = good.clone();
        v[4] = 9;
        let err = decode_frame(&v, BUILD_FORMATS).unwrap_err();
        assert!(
            matches!(err, WireError::UnsupportedVersion { found: 9, .. }),
            "{err}"
        );
        let mut k = good.clone();
        k[5] = 7;
        assert!(matches!(
            decode_frame(&k, BUILD_FORMATS),
            Err(WireError::UnknownKind(7))
        ));
        let mut l = good.clone();
        l[6..10].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            decode_frame(&l, BUILD_FORMATS),
            Err(WireError::Oversized { .. })
        ));
        let mut c = good.clone();
        let last = c.len() - 1;
        c[last] ^= 1;
        assert!(matches!(
            decode_frame(&c, BUILD_FORMATS),
            Err(WireError::Checksum { .. })
        ));
        assert!(encode_frame(1, FrameKind::Request, &vec![0; MAX_BODY_LEN + 1]).is_err());
        assert!(encode_frame(9, FrameKind::Request, b"").is_err());
    }

    #[test]
    fn the_checksum_covers_the_header_fields() {
        let good = encode_frame(1, FrameKind::Request, b"{}").unwrap();
        let mut k = good.clone();
        k[5] = FrameKind::Response as u8;
        assert!(matches!(
            decode_frame(&k, BUILD_FORMATS),
            Err(WireError::Checksum { .. })
        ));
    }

    proptest! {
        #[test]
        fn any_body_round_trips(body in proptest::collection::vec(any::<u8>(), 0..2048), req in any::<bool>()) {
            let kind = if req { FrameKind::Request } else { FrameKind::Response };
            let f = encode_frame(WIRE_VERSION, kind, &body).unwrap();
            let (frame, used) = decode_frame(&f, BUILD_FORMATS).unwrap().unwrap();
            prop_assert_eq!(used, f.len());
            prop_assert_eq!(frame.kind, kind);
            prop_assert_eq!(frame.body, body);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_frame(&bytes, BUILD_FORMATS);
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let _ = rt.block_on(read_frame(&mut &bytes[..], BUILD_FORMATS));
        }

        #[test]
        fn a_flipped_bit_never_yields_the_original_body(body in proptest::collection::vec(any::<u8>(), 1..256), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut f = encode_frame(WIRE_VERSION, FrameKind::Request, &body).unwrap();
            let i = pos.index(f.len());
            f[i] ^= 1 << bit;
            if let Ok(Some((frame, _))) = decode_frame(&f, BUILD_FORMATS) {
                prop_assert_ne!(frame.body, body);
            }
        }
    }
}
