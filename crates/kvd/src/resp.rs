//! RESP2: request parsing (multibulk and inline) with bounds, and reply encoding/decoding.

/// Bounds on what a client may send.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest bulk string accepted.
    pub max_bulk: usize,
    /// Most elements in one request array.
    pub max_array: usize,
    /// Longest inline command line.
    pub max_inline: usize,
}

impl Default for Limits {
    /// 16 MiB bulks (the replication value limit), 1 Mi arguments, 64 KiB inline lines.
    fn default() -> Self {
        Limits {
            max_bulk: 16 << 20,
            max_array: 1 << 20,
            max_inline: 64 << 10,
        }
    }
}

/// A request the server cannot parse. The connection is answered with
/// `-ERR Protocol error: ...` and closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A length field is not a number.
    #[error("invalid {what} length {text:?}")]
    BadLength {
        /// Which length.
        what: &'static str,
        /// The text found.
        text: String,
    },
    /// A length exceeds the configured bound.
    #[error("{what} length {len} exceeds the limit of {max}")]
    TooLong {
        /// Which length.
        what: &'static str,
        /// The length asked for.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// Something other than a bulk string appeared inside a request array.
    #[error("expected '$', got {0:?}")]
    ExpectedBulk(char),
    /// A bulk string is not followed by CRLF.
    #[error("bulk string is not terminated by CRLF")]
    MissingCrlf,
    /// An inline command has unbalanced quotes.
    #[error("unbalanced quotes in inline request")]
    UnbalancedQuotes,
}

/// A parsed request and the bytes it used, or `None` when more bytes are needed.
pub type Parsed = Option<(Vec<Vec<u8>>, usize)>;

/// Where to find the next CRLF-terminated line; `None` if incomplete.
fn line(buf: &[u8], from: usize) -> Option<(&[u8], usize)> {
    let rel = buf[from..].windows(2).position(|w| w == b"\r\n")?;
    Some((&buf[from..from + rel], from + rel + 2))
}

fn parse_len(text: &[u8], what: &'static str) -> Result<i64, ProtocolError> {
    let bad = || ProtocolError::BadLength {
        what,
        text: String::from_utf8_lossy(&text[..text.len().min(32)]).into_owned(),
    };
    let s = std::str::from_utf8(text).map_err(|_| bad())?;
    if s.is_empty() || s.len() > 20 || s.starts_with('+') {
        return Err(bad());
    }
    s.parse::<i64>().map_err(|_| bad())
}

/// Parses one request from the start of `buf`.
///
/// Returns `Ok(None)` when more bytes are needed, `Ok(Some((args, consumed)))` for a complete
/// request (`args` may be empty for an empty inline line or `*0`), or a protocol error.
/// Incomplete input is bounded: a header that cannot complete within the limits is an error.
pub fn parse_request(buf: &[u8], limits: &Limits) -> Result<Parsed, ProtocolError> {
    if buf.is_empty() {
        return Ok(None);
    }
    if buf[0] != b'*' {
        return parse_inline(buf, limits);
    }
    let Some((head, mut pos)) = line(buf, 1) else {
        return check_partial_line(&buf[1..], "multibulk");
    };
    let n = parse_len(head, "multibulk")?;
    if n <= 0 {
        return Ok(Some((Vec::new(), pos)));
    }
    let n = n as usize;
    if n > limits.max_array {
        return Err(ProtocolError::TooLong {
            what: "multibulk",
            len: n,
            max: limits.max_array,
        });
    }
    let mut args = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        if pos >= buf.len() {
            return Ok(None);
        }
        if buf[pos] != b'$' {
            return Err(ProtocolError::ExpectedBulk(buf[pos] as char));
        }
        let Some((head, next)) = line(buf, pos + 1) else {
            return check_partial_line(&buf[pos + 1..], "bulk");
        };
        let len = parse_len(head, "bulk")?;
        if len < 0 {
            return Err(ProtocolError::BadLength {
                what: "bulk",
                text: len.to_string(),
            });
        }
        let len = len as usize;
        if len > limits.max_bulk {
            return Err(ProtocolError::TooLong {
                what: "bulk",
                len,
                max: limits.max_bulk,
            });
        }
        if buf.len() < next + len + 2 {
            return Ok(None);
        }
        if &buf[next + len..next + len + 2] != b"\r\n" {
            return Err(ProtocolError::MissingCrlf);
        }
        args.push(buf[next..next + len].to_vec());
        pos = next + len + 2;
    }
    Ok(Some((args, pos)))
}

/// An unterminated length line longer than any valid one is an error, not a wait.
fn check_partial_line(rest: &[u8], what: &'static str) -> Result<Parsed, ProtocolError> {
    if rest.len() > 22 {
        return Err(ProtocolError::BadLength {
            what,
            text: String::from_utf8_lossy(&rest[..22]).into_owned(),
        });
    }
    Ok(None)
}

fn parse_inline(buf: &[u8], limits: &Limits) -> Result<Parsed, ProtocolError> {
    let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
        if buf.len() > limits.max_inline {
            return Err(ProtocolError::TooLong {
                what: "inline request",
                len: buf.len(),
                max: limits.max_inline,
            });
        }
        return Ok(None);
    };
    if nl > limits.max_inline {
        return Err(ProtocolError::TooLong {
            what: "inline request",
            len: nl,
            max: limits.max_inline,
        });
    }
    let mut text = &buf[..nl];
    if text.last() == Some(&b'\r') {
        text = &text[..text.len() - 1];
    }
    let mut args = Vec::new();
    let mut cur: Option<Vec<u8>> = None;
    let mut quote: Option<u8> = None;
    for &b in text {
        match quote {
            Some(q) if b == q => quote = None,
            Some(_) => cur.get_or_insert_with(Vec::new).push(b),
            None if b == b'"' || b == b'\'' => {
                quote = Some(b);
                cur.get_or_insert_with(Vec::new);
            }
            None if b == b' ' || b == b'\t' => {
                if let Some(a) = cur.take() {
                    args.push(a);
                }
            }
            None => cur.get_or_insert_with(Vec::new).push(b),
        }
    }
    if quote.is_some() {
        return Err(ProtocolError::UnbalancedQuotes);
    }
    if let Some(a) = cur.take() {
        args.push(a);
    }
    Ok(Some((args, nl + 1)))
}

/// A RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+text`
    Simple(String),
    /// `-text` (the text starts with an error code such as `ERR`).
    Error(String),
    /// `:n`
    Integer(i64),
    /// `$n` bulk string, or `$-1` for `None`.
    Bulk(Option<Vec<u8>>),
    /// `*n` array, or `*-1` for `None`.
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// `+OK`
    pub fn ok() -> Reply {
        Reply::Simple("OK".into())
    }

    /// `-ERR <msg>`
    pub fn err(msg: impl std::fmt::Display) -> Reply {
        Reply::Error(format!("ERR {msg}"))
    }

    /// A bulk string.
    pub fn bulk(b: impl Into<Vec<u8>>) -> Reply {
        Reply::Bulk(Some(b.into()))
    }

    /// The nil bulk string.
    pub fn nil() -> Reply {
        Reply::Bulk(None)
    }

    /// An array of bulk strings.
    pub fn bulks<I: IntoIterator<Item = Vec<u8>>>(items: I) -> Reply {
        Reply::Array(Some(
            items.into_iter().map(|b| Reply::Bulk(Some(b))).collect(),
        ))
    }

    /// Appends the wire encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Reply::Simple(s) => {
                out.push(b'+');
                push_line_text(out, s);
            }
            Reply::Error(s) => {
                out.push(b'-');
                push_line_text(out, s);
            }
            Reply::Integer(n) => {
                out.extend_from_slice(format!(":{n}\r\n").as_bytes());
            }
            Reply::Bulk(None) => out.extend_from_slice(b"$-1\r\n"),
            Reply::Bulk(Some(b)) => {
                out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
                out.extend_from_slice(b);
                out.extend_from_slice(b"\r\n");
            }
            Reply::Array(None) => out.extend_from_slice(b"*-1\r\n"),
            Reply::Array(Some(items)) => {
                out.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
                for i in items {
                    i.encode(out);
                }
            }
        }
    }

    /// The wire encoding.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }
}

/// Simple strings and errors cannot hold CR or LF: replace them.
fn push_line_text(out: &mut Vec<u8>, s: &str) {
    out.extend(
        s.bytes()
            .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
    out.extend_from_slice(b"\r\n");
}

/// Parses one reply from the start of `buf` (the client side, used by tests and tools).
/// `Ok(None)` when more bytes are needed.
pub fn parse_reply(buf: &[u8]) -> Result<Option<(Reply, usize)>, ProtocolError> {
    parse_reply_at(buf, 0, 0)
}

fn parse_reply_at(
    buf: &[u8],
    pos: usize,
    depth: usize,
) -> Result<Option<(Reply, usize)>, ProtocolError> {
    if pos >= buf.len() {
        return Ok(None);
    }
    if depth > 64 {
        return Err(ProtocolError::TooLong {
            what: "reply nesting",
            len: depth,
            max: 64,
        });
    }
    let Some((text, next)) = line(buf, pos + 1) else {
        return Ok(None);
    };
    let s = || String::from_utf8_lossy(text).into_owned();
    match buf[pos] {
        b'+' => Ok(Some((Reply::Simple(s()), next))),
        b'-' => Ok(Some((Reply::Error(s()), next))),
        b':' => Ok(Some((Reply::Integer(parse_len(text, "integer")?), next))),
        b'$' => {
            let n = parse_len(text, "bulk")?;
            if n < 0 {
                return Ok(Some((Reply::Bulk(None), next)));
            }
            let n = n as usize;
            if buf.len() < next + n + 2 {
                return Ok(None);
            }
            if &buf[next + n..next + n + 2] != b"\r\n" {
                return Err(ProtocolError::MissingCrlf);
            }
            Ok(Some((
                Reply::Bulk(Some(buf[next..next + n].to_vec())),
                next + n + 2,
            )))
        }
        b'*' => {
            let n = parse_len(text, "array")?;
            if n < 0 {
                return Ok(Some((Reply::Array(None), next)));
            }
            let mut items = Vec::new();
            let mut p = next;
            for _ in 0..n {
                match parse_reply_at(buf, p, depth + 1)? {
                    Some((r, q)) => {
                        items.push(r);
                        p = q;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Reply::Array(Some(items)), p)))
        }
        other => Err(ProtocolError::ExpectedBulk(other as char)),
    }
}

/// Encodes a request as a multibulk array (the client side).
pub fn encode_request<A: AsRef<[u8]>>(args: &[A]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        let a = a.as_ref();
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn l() -> Limits {
        Limits::default()
    }

    #[test]
    fn multibulk_and_inline_requests_parse() {
        let (a, n) = parse_request(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nrest", &l())
            .unwrap()
            .unwrap();
        assert_eq!(a, vec![b"GET".to_vec(), b"k".to_vec()]);
        assert_eq!(n, 20);
        let (a, n) = parse_request(b"PING\r\n", &l()).unwrap().unwrap();
        assert_eq!((a, n), (vec![b"PING".to_vec()], 6));
        let (a, _) = parse_request(b"SET k \"a b\"\n", &l()).unwrap().unwrap();
        assert_eq!(a, vec![b"SET".to_vec(), b"k".to_vec(), b"a b".to_vec()]);
        let (a, n) = parse_request(b"\r\n", &l()).unwrap().unwrap();
        assert!(a.is_empty());
        assert_eq!(n, 2);
    }

    #[test]
    fn every_prefix_of_a_request_is_incomplete() {
        let req = encode_request(&["SET", "key", "some value"]);
        for cut in 0..req.len() {
            assert_eq!(
                parse_request(&req[..cut], &l()).unwrap(),
                None,
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn malformed_requests_are_errors() {
        let cases: &[&[u8]] = &[
            b"*x\r\n",
            b"*1\r\n:5\r\n",
            b"*1\r\n$-5\r\n",
            b"*1\r\n$3\r\nabcXY",
            b"*1\r\n$abc\r\n",
            b"*+1\r\n",
            b"SET \"open\r\n",
            b"*1111111111111111111111111111",
        ];
        for c in cases {
            assert!(
                parse_request(c, &l()).is_err(),
                "{:?}",
                String::from_utf8_lossy(c)
            );
        }
    }

    #[test]
    fn limits_are_enforced() {
        let small = Limits {
            max_bulk: 4,
            max_array: 2,
            max_inline: 8,
        };
        assert!(matches!(
            parse_request(b"*1\r\n$5\r\n", &small),
            Err(ProtocolError::TooLong { what: "bulk", .. })
        ));
        assert!(matches!(
            parse_request(b"*3\r\n", &small),
            Err(ProtocolError::TooLong {
                what: "multibulk",
                ..
            })
        ));
        assert!(matches!(
            parse_request(b"AAAAAAAAAAAA", &small),
            Err(ProtocolError::TooLong { .. })
        ));
        assert!(parse_request(b"*2\r\n$4\r\nabcd\r\n$0\r\n\r\n", &small)
            .unwrap()
            .is_some());
    }

    #[test]
    fn replies_encode_as_resp2() {
        let r = Reply::Array(Some(vec![
            Reply::ok(),
            Reply::err("bad\r\nthing"),
            Reply::Integer(-3),
            Reply::bulk("x"),
            Reply::nil(),
            Reply::Array(None),
        ]));
        assert_eq!(
            r.to_bytes(),
            b"*6\r\n+OK\r\n-ERR bad  thing\r\n:-3\r\n$1\r\nx\r\n$-1\r\n*-1\r\n".to_vec()
        );
    }

    fn reply() -> impl Strategy<Value = Reply> {
        let leaf = prop_oneof![
            "[a-zA-Z0-9 ]{0,10}".prop_map(Reply::Simple),
            "[a-zA-Z0-9 ]{0,10}".prop_map(Reply::Error),
            any::<i64>().prop_map(Reply::Integer),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..20))
                .prop_map(Reply::Bulk),
            Just(Reply::Array(None)),
        ];
        leaf.prop_recursive(3, 24, 5, |inner| {
            proptest::collection::vec(inner, 0..5).prop_map(|v| Reply::Array(Some(v)))
        })
    }

    proptest! {
        #[test]
        fn requests_round_trip(args in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 1..8)) {
            let req = encode_request(&args);
            let (back, n) = parse_request(&req, &l()).unwrap().unwrap();
            prop_assert_eq!(back, args);
            prop_assert_eq!(n, req.len());
        }

        #[test]
        fn replies_round_trip(r in reply()) {
            let b = r.to_bytes();
            let (back, n) = parse_reply(&b).unwrap().unwrap();
            prop_assert_eq!(back, r);
            prop_assert_eq!(n, b.len());
        }

        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = parse_request(&b, &l());
            let _ = parse_reply(&b);
            let mut star = b"*".to_vec();
            star.extend_from_slice(&b);
            let _ = parse_request(&star, &l());
        }
    }
}
