//! The agent front's RESP framing, `hitless_agent::resp::message_len` (requests) and
//! `reply_len` (RESP2 and RESP3 replies): they decide where each request and reply ends, to
//! count what is in flight and to replay unanswered requests.
//!
//! Checked: a complete message is at least one byte and never longer than the input, its
//! length does not depend on the bytes after it, every strict prefix of it needs more bytes
//! (a message arriving in pieces is never refused), and the front agrees with the service on
//! boundaries: a multibulk request kvd parses, and a reply kvd's client parser accepts within
//! the front's nesting bound, have the same length for both. The front's RESP framing
//! (`hitless_agent::framing::RespFraming`, what a connection calls) frames exactly as these
//! functions do.
#![no_main]

use hitless_agent::framing::{Framing, FramingError, RespFraming};
use hitless_agent::resp::{message_len, reply_len, MAX_DEPTH};
use kvd::resp::{parse_reply, parse_request, Limits, Reply};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|buf: &[u8]| {
    let r = message_len(buf);
    if let Ok(Some(n)) = r {
        assert!(
            n >= 1 && n <= buf.len(),
            "length {n} of {} bytes",
            buf.len()
        );
        assert_eq!(
            message_len(&buf[..n]),
            Ok(Some(n)),
            "depends on bytes after it"
        );
        let step = (n / 128).max(1);
        for cut in (0..n).step_by(step).chain(n.saturating_sub(4)..n) {
            assert_eq!(message_len(&buf[..cut]), Ok(None), "prefix {cut} of {n}");
        }
    }
    let rr = reply_len(buf);
    assert_eq!(
        RespFraming.request_len(buf),
        r.clone().map_err(FramingError::from),
        "the framing and message_len differ"
    );
    assert_eq!(
        RespFraming.reply_len(buf),
        rr.clone().map_err(FramingError::from),
        "the framing and reply_len differ"
    );
    if let Ok(Some(f)) = rr {
        let n = f.len;
        assert!(
            n >= 1 && n <= buf.len(),
            "reply length {n} of {} bytes",
            buf.len()
        );
        assert_eq!(
            reply_len(&buf[..n]),
            Ok(Some(f)),
            "reply depends on bytes after it"
        );
        let step = (n / 128).max(1);
        for cut in (0..n).step_by(step).chain(n.saturating_sub(4)..n) {
            assert_eq!(
                reply_len(&buf[..cut]),
                Ok(None),
                "reply prefix {cut} of {n}"
            );
        }
    }
    if buf.first() == Some(&b'*') {
        if let Ok(Some((_, used))) = parse_request(buf, &Limits::default()) {
            assert_eq!(
                r,
                Ok(Some(used)),
                "kvd and the front split a request differently"
            );
        }
    }
    if let Ok(Some((reply, used))) = parse_reply(buf) {
        if nesting(&reply) <= MAX_DEPTH {
            assert_eq!(
                r,
                Ok(Some(used)),
                "kvd and the front split a reply differently"
            );
            assert_eq!(
                rr.map(|f| f.map(|f| f.len)),
                Ok(Some(used)),
                "kvd and the front's reply framing split a reply differently"
            );
        }
    }
});

/// Nesting level of the deepest element of `r` (0 for a scalar or an empty array).
fn nesting(r: &Reply) -> usize {
    match r {
        Reply::Array(Some(items)) => items.iter().map(|i| 1 + nesting(i)).max().unwrap_or(0),
        _ => 0,
    }
}
