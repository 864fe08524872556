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
#[derive(Debug, Clone, Error, PartialEq, Eq)]
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

/// The length of the blank lines (`\r\n` or `\n`, perhaps after spaces or tabs) at the head
/// of `buf`, complete ones only. Like Redis, a front drops them: they are no request.
pub fn blank_prefix(buf: &[u8]) -> usize {
    let mut at = 0;
    loop {
        let rest = &buf[at..];
        let pad = rest
            .iter()
            .take_while(|&&c| c == b' ' || c == b'\t')
            .count();
        let end = match rest.get(pad..) {
            Some([b'\n', ..]) => pad + 1,
            Some([b'\r', b'\n', ..]) => pad + 2,
            _ => return at,
        };
        at += end;
    }
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

pub use crate::framing::ReplyFrame;

/// Returns the first complete reply in `buf` (RESP2, or RESP3 with its maps, sets, pushes,
/// attributes, doubles, big numbers, booleans, nulls, blob errors and verbatim strings),
/// `Ok(None)` if more bytes are needed, or an error if the bytes cannot be a reply. An
/// attribute (`|`) and the reply it annotates are one frame. Streamed strings and aggregates
/// (`$?`, `*?`) are refused: no server sends them to a request.
pub fn reply_len(buf: &[u8]) -> Result<Option<ReplyFrame>, FrameError> {
    let r = scan_reply(buf, 0, 0);
    match r {
        Ok(Some(len)) => {
            // The reply proper starts after any attributes.
            let mut at = 0;
            while buf.get(at) == Some(&b'|') {
                let Some(attr) = scan_reply_one(buf, at, 0)? else {
                    return Ok(None);
                };
                at += attr;
            }
            Ok(Some(ReplyFrame {
                len,
                push: buf.get(at) == Some(&b'>'),
            }))
        }
        Ok(None) if buf.len() > MAX_MESSAGE => Err(FrameError::TooLarge(buf.len())),
        other => other.map(|_| None),
    }
}

/// A reply with its attributes.
fn scan_reply(buf: &[u8], at: usize, depth: usize) -> Result<Option<usize>, FrameError> {
    let mut pos = at;
    // Each attribute annotates what follows it; bounded by the depth and the buffer.
    while buf.get(pos) == Some(&b'|') {
        match scan_reply_one(buf, pos, depth)? {
            Some(len) => pos += len,
            None => return Ok(None),
        }
    }
    match scan_reply_one(buf, pos, depth)? {
        Some(len) => Ok(Some(pos + len - at)),
        None => Ok(None),
    }
}

/// One reply element, an attribute counting as an element of its own.
fn scan_reply_one(buf: &[u8], at: usize, depth: usize) -> Result<Option<usize>, FrameError> {
    if depth > MAX_DEPTH {
        return Err(FrameError::TooDeep);
    }
    let Some(&kind) = buf.get(at) else {
        return Ok(None);
    };
    if !matches!(
        kind,
        b'+' | b'-'
            | b':'
            | b'_'
            | b'#'
            | b','
            | b'('
            | b'$'
            | b'!'
            | b'='
            | b'*'
            | b'~'
            | b'>'
            | b'%'
            | b'|'
    ) {
        return Err(FrameError::UnknownType(kind));
    }
    let Some(eol) = find_crlf(buf, at + 1) else {
        return Ok(None);
    };
    let header_end = eol + 2;
    match kind {
        b'+' | b'-' | b':' | b'_' | b'#' | b',' | b'(' => Ok(Some(header_end - at)),
        b'$' | b'!' | b'=' => blob_len(buf, at, eol),
        _ => {
            let n = parse_int(&buf[at + 1..eol])?;
            if n < 0 {
                return Ok(Some(header_end - at));
            }
            if n > MAX_ELEMENTS {
                return Err(FrameError::BadLength(n.to_string()));
            }
            // Maps and attributes hold pairs.
            let elements = if matches!(kind, b'%' | b'|') {
                2 * n
            } else {
                n
            };
            let mut pos = header_end;
            for _ in 0..elements {
                match scan_reply(buf, pos, depth + 1)? {
                    Some(len) => pos += len,
                    None => return Ok(None),
                }
            }
            Ok(Some(pos - at))
        }
    }
}

/// The length of a length-prefixed string (`$`, `!`, `=`) at `at` whose header line ends at
/// `eol` (a negative length is a null: the header alone).
fn blob_len(buf: &[u8], at: usize, eol: usize) -> Result<Option<usize>, FrameError> {
    let header_end = eol + 2;
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
        b'$' => blob_len(buf, at, eol),
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
    fn blank_lines_at_the_head_are_measured_whole() {
        assert_eq!(blank_prefix(b"\r\n\n  \r\nPING\r\n"), 7);
        assert_eq!(blank_prefix(b"PING\r\n"), 0);
        assert_eq!(
            blank_prefix(b"  "),
            0,
            "an unfinished line is not blank yet"
        );
        assert_eq!(blank_prefix(b"\r"), 0);
        assert_eq!(blank_prefix(b""), 0);
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

    #[test]
    fn resp3_replies_are_one_frame_each() {
        let one = |b: &[u8]| reply_len(b).unwrap().unwrap();
        // A map of one pair is one reply, not three.
        assert_eq!(one(b"%1\r\n+a\r\n+b\r\n+next\r\n").len, 12);
        assert_eq!(one(b"~2\r\n:1\r\n:2\r\n").len, 12);
        assert_eq!(one(b"_\r\n").len, 3);
        assert_eq!(one(b"#t\r\n").len, 4);
        assert_eq!(one(b",1.5\r\n").len, 6);
        assert_eq!(one(b"(123456789012345678901234567890\r\n").len, 33);
        assert_eq!(one(b"!3\r\nbad\r\n").len, 9);
        assert_eq!(one(b"=7\r\ntxt:abc\r\n").len, 13);
        // An attribute and the reply it annotates are one frame.
        let attributed = b"|1\r\n+ttl\r\n:3\r\n$1\r\nv\r\n";
        assert_eq!(one(attributed).len, attributed.len());
        assert!(!one(attributed).push);
        // A map nested in an array.
        assert_eq!(one(b"*1\r\n%1\r\n+k\r\n*0\r\n").len, 16);
    }

    #[test]
    fn a_push_is_marked_as_answering_no_request() {
        let push = b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n";
        let f = reply_len(push).unwrap().unwrap();
        assert_eq!(
            f,
            ReplyFrame {
                len: push.len(),
                push: true
            }
        );
        assert!(!reply_len(b"+OK\r\n").unwrap().unwrap().push);
    }

    #[test]
    fn partial_and_malformed_replies() {
        let full = b"%1\r\n+a\r\n$1\r\nb\r\n";
        for cut in 0..full.len() {
            assert_eq!(reply_len(&full[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(reply_len(b"PING\r\n"), Err(FrameError::UnknownType(b'P')));
        assert!(matches!(
            reply_len(b"*?\r\n"),
            Err(FrameError::BadLength(_))
        ));
        let deep = "%1\r\n".repeat(MAX_DEPTH + 2);
        assert_eq!(reply_len(deep.as_bytes()), Err(FrameError::TooDeep));
    }

    proptest::proptest! {
        #[test]
        fn replies_never_panic_or_overrun(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            if let Ok(Some(f)) = reply_len(&bytes) {
                proptest::prop_assert!(f.len <= bytes.len());
                proptest::prop_assert!(f.len > 0);
            }
        }
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
