//! RESP framing for the service front: finds where one request or reply ends, without
//! interpreting it. The front only needs message boundaries to count what is in flight and to
//! replay unanswered requests after a failover.

use thiserror::Error;

/// The largest single message the front will buffer.
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024;
/// The deepest nesting of arrays accepted in a reply.
pub const MAX_DEPTH: usize = 32;
/// The most elements accepted in one array.
pub const MAX_ELEMENTS: i64 = 16 * 1024 * 1024;

/// Malformed RESP input.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("a RESP message has an invalid length header: {0:?}")]
    BadLength(String),
    #[error("a RESP message of {0} bytes exceeds the limit of {MAX_MESSAGE} bytes")]
    TooLarge(usize),
    #[error("a RESP reply is nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("a RESP message starts with an unknown type byte 0x{0:02x}")]
    UnknownType(u8),
    #[error("a RESP bulk string is not terminated by CRLF")]
    MissingCrlf,
}

fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|p| from + p)
}

fn parse_int(line: &[u8]) -> Result<i64, FrameError> {
    let text = std::str::from_utf8(line)
        .map_err(|_| FrameError::BadLength(String::from_utf8_lossy(line).into_owned()))?;
    text.parse::<i64>()
        .map_err(|_| FrameError::BadLength(text.to_owned()))
}

/// Returns the length of the first complete message in `buf`, `Ok(None)` if more bytes are
/// needed, or an error if the bytes cannot be RESP. Inline commands (a bare line) are accepted
/// as requests.
pub fn message_len(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    let r = scan(buf, 0, 0);
    if let Ok(None) = r {
        if buf.len() > MAX_MESSAGE {
            return Err(FrameError::TooLarge(buf.len()));
        }
    }
    r
}

fn scan(buf: &[u8], at: usize, depth: usize) -> Result<Option<usize>, FrameError> {
    if depth > MAX_DEPTH {
        return Err(FrameError::TooDeep);
    }
    let Some(&kind) = buf.get(at) else {
        return Ok(None);
    };
    if depth == 0 && !matches!(kind, b'+' | b'-' | b':' | b'$' | b'*') {
        if kind.is_ascii_graphic() || kind == b' ' {
            // Inline command: the line is the request; like Redis, a bare LF ends it too.
            return Ok(buf[at..].iter().position(|&c| c == b'\n').map(|p| p + 1));
        }
        return Err(FrameError::UnknownType(kind));
    }
    let Some(eol) = find_crlf(buf, at + 1) else {
        return Ok(None);
    };
    let header_end = eol + 2;
    match kind {
        b'+' | b'-' | b':' => Ok(Some(header_end - at)),
        b'$' => {
            let n = parse_int(&buf[at + 1..eol])?;
            if n < 0 {
                return Ok(Some(header_end - at));
            }
            let n = usize::try_from(n).map_err(|_| FrameError::BadLength(n.to_string()))?;
            if n > MAX_MESSAGE {
                return Err(FrameError::TooLarge(n));
            }
            let end = header_end + n + 2;
            if buf.len() < end {
                return Ok(None);
            }
            if &buf[end - 2..end] != b"\r\n" {
                return Err(FrameError::MissingCrlf);
            }
            Ok(Some(end - at))
        }
        b'*' => {
            let n = parse_int(&buf[at + 1..eol])?;
            if n < 0 {
                return Ok(Some(header_end - at));
            }
            if n > MAX_ELEMENTS {
                return Err(FrameError::BadLength(n.to_string()));
            }
            let mut pos = header_end;
            for _ in 0..n {
                match scan(buf, pos, depth + 1)? {
                    Some(len) => pos += len,
                    None => return Ok(None),
                }
            }
            Ok(Some(pos - at))
        }
        // Inline command: any printable first byte; the line is the request. Like Redis, a
        // bare LF ends it too.
        b if b.is_ascii_graphic() || b == b' ' => {
            if depth > 0 {
                return Err(FrameError::UnknownType(b));
            }
            Ok(Some(header_end - at))
        }
        other => Err(FrameError::UnknownType(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_messages_have_their_exact_length() {
        assert_eq!(message_len(b"+OK\r\n"), Ok(Some(5)));
        assert_eq!(message_len(b":12\r\nextra"), Ok(Some(5)));
        assert_eq!(message_len(b"$3\r\nabc\r\n"), Ok(Some(9)));
        assert_eq!(message_len(b"$-1\r\n"), Ok(Some(5)));
        assert_eq!(
            message_len(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n"),
            Ok(Some(20))
        );
        assert_eq!(message_len(b"PING\r\n"), Ok(Some(6)));
        assert_eq!(message_len(b"PING\nGET"), Ok(Some(5)));
        assert_eq!(message_len(b"*2\r\n*1\r\n:1\r\n+x\r\n"), Ok(Some(16)));
    }

    #[test]
    fn partial_messages_need_more_bytes() {
        for full in [
            &b"$3\r\nabc\r\n"[..],
            b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n",
            b"+OK\r\n",
        ] {
            for cut in 0..full.len() {
                assert_eq!(message_len(&full[..cut]), Ok(None), "cut at {cut}");
            }
        }
    }

    #[test]
    fn malformed_messages_are_errors() {
        assert!(matches!(
            message_len(b"$x\r\n"),
            Err(FrameError::BadLength(_))
        ));
        assert!(matches!(
            message_len(b"$3\r\nabcXY"),
            Err(FrameError::MissingCrlf)
        ));
        assert!(matches!(
            message_len(b"$999999999999\r\n"),
            Err(FrameError::TooLarge(_))
        ));
        assert!(matches!(
            message_len(b"\x01\r\n"),
            Err(FrameError::UnknownType(1))
        ));
        let deep = "*1\r\n".repeat(MAX_DEPTH + 2);
        assert_eq!(message_len(deep.as_bytes()), Err(FrameError::TooDeep));
    }

    proptest::proptest! {
        #[test]
        fn never_panics_and_never_overruns(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            if let Ok(Some(n)) = message_len(&bytes) {
                proptest::prop_assert!(n <= bytes.len());
                proptest::prop_assert!(n > 0);
            }
        }
    }
}
