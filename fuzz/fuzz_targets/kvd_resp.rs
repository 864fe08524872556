//! kvd's RESP parsers: `parse_request` (what every client connection feeds) and
//! `parse_reply` (the client side used by tools).
//!
//! Input: one byte choosing the limits (default, or small ones so the bounds are reached),
//! then the bytes received.
//! Checked for requests: a complete request uses at most the input and parses the same from
//! exactly its own bytes, every strict prefix of it asks for more bytes (a request arriving in
//! pieces is never refused), arguments respect the limits, a partial inline line stays within
//! its limit, and a multibulk request re-encodes to a request that parses to the same arguments.
//! For replies: the parsed reply re-encodes to bytes whose parse is a fixed point.
#![no_main]

use kvd::resp::{encode_request, parse_reply, parse_request, Limits, Reply};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, buf)) = data.split_first() else {
        return;
    };
    let limits = if sel % 2 == 0 {
        Limits::default()
    } else {
        Limits {
            max_bulk: 1 + usize::from(sel >> 4),
            max_array: 1 + usize::from((sel >> 1) & 7),
            max_inline: 8 + usize::from(sel >> 2),
        }
    };
    check_request(buf, &limits);
    check_reply(buf);
});

fn check_request(buf: &[u8], limits: &Limits) {
    match parse_request(buf, limits) {
        Ok(Some((args, used))) => {
            assert!(
                used >= 1 && used <= buf.len(),
                "used {used} of {}",
                buf.len()
            );
            assert_eq!(
                parse_request(&buf[..used], limits),
                Ok(Some((args.clone(), used))),
                "a request depends on bytes after it"
            );
            for cut in cuts(used) {
                assert_eq!(
                    parse_request(&buf[..cut], limits),
                    Ok(None),
                    "prefix of {cut} of a {used}-byte request is not incomplete"
                );
            }
            if buf[0] == b'*' {
                assert!(args.len() <= limits.max_array);
                assert!(args.iter().all(|a| a.len() <= limits.max_bulk));
                let enc = encode_request(&args);
                assert_eq!(parse_request(&enc, limits), Ok(Some((args, enc.len()))));
            } else {
                assert_eq!(buf[used - 1], b'\n');
                assert!(used - 1 <= limits.max_inline);
                assert!(!buf[..used - 1].contains(&b'\n'));
            }
        }
        Ok(None) => {
            if !buf.is_empty() && buf[0] != b'*' {
                assert!(!buf.contains(&b'\n') && buf.len() <= limits.max_inline);
            }
        }
        Err(e) => {
            // Errors are sentences for the client: never empty.
            assert!(!e.to_string().is_empty());
        }
    }
}

/// Prefix lengths to try below `n`: all of them for short requests, a spread for long ones.
fn cuts(n: usize) -> impl Iterator<Item = usize> {
    let step = (n / 128).max(1);
    (0..n).step_by(step).chain(n.saturating_sub(4)..n)
}

fn check_reply(buf: &[u8]) {
    let Ok(Some((r, used))) = parse_reply(buf) else {
        return;
    };
    assert!(used >= 1 && used <= buf.len());
    assert_eq!(parse_reply(&buf[..used]), Ok(Some((r.clone(), used))));
    // Simple strings lose lone CR/LF and invalid UTF-8 on the way in: compare from the first
    // re-encoding on.
    let once = r.to_bytes();
    let (r1, n1) = parse_reply(&once)
        .expect("re-encoded reply parses")
        .expect("complete");
    assert_eq!(n1, once.len());
    let twice = r1.to_bytes();
    assert_eq!(once, twice);
    if is_plain(&r) {
        assert_eq!(r1, r);
    }
}

/// True if no simple string or error of `r` holds a CR or LF (those re-encode as spaces).
fn is_plain(r: &Reply) -> bool {
    match r {
        Reply::Simple(s) | Reply::Error(s) => !s.contains(['\r', '\n']),
        Reply::Array(Some(items)) => items.iter().all(is_plain),
        _ => true,
    }
}
