//! The agent front's length-prefixed framing, `hitless_agent::framing::LengthPrefixedFraming`
//! (requests and replies of services that frame each message as a big-endian `u32` length and
//! that many bytes): it decides where each request and reply ends, to count what is in flight
//! and to replay unanswered requests.
//!
//! The first input byte sets the bound on a message's declared length (`16 * byte`, or the
//! front's own bound, `resp::MAX_MESSAGE`, for 255); the rest is the stream. Checked against an
//! independent reading of the prefix: a complete message is its 4-byte prefix and exactly the
//! bytes it declares, never longer than the input, and does not depend on the bytes after it;
//! every strict prefix of it needs more bytes; a declared length above the bound is refused as
//! soon as the prefix is whole, naming that length and the bound, and never otherwise; requests
//! and replies are framed alike and no reply is a push. Splitting the whole stream message by
//! message consumes it in order and stops at the first refusal or incomplete message.
#![no_main]

use hitless_agent::framing::{Framing, FramingError, LengthPrefixedFraming, LENGTH_PREFIX};
use hitless_agent::resp::MAX_MESSAGE;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, buf)) = data.split_first() else {
        return;
    };
    let max = if selector == u8::MAX {
        MAX_MESSAGE
    } else {
        16 * usize::from(selector)
    };
    let f = LengthPrefixedFraming::new(max);
    assert_eq!(f.max_message(), LENGTH_PREFIX + max);
    let mut at = 0;
    // Each round consumes at least the 4 bytes of a prefix.
    loop {
        let rest = &buf[at..];
        let r = f.request_len(rest);
        assert_eq!(
            f.reply_len(rest),
            r.clone()
                .map(|n| n.map(|len| hitless_agent::framing::ReplyFrame { len, push: false })),
            "requests and replies framed differently"
        );
        let declared = rest
            .get(..LENGTH_PREFIX)
            .map(|p| u32::from_be_bytes(p.try_into().unwrap()) as usize);
        match (declared, &r) {
            (None, r) => {
                assert_eq!(r, &Ok(None), "a partial prefix");
                return;
            }
            (Some(d), Err(FramingError::TooLarge { len, max: m })) => {
                assert!(d > max && *len == d && *m == max, "refused {d} under {max}");
                return;
            }
            (Some(d), Err(e)) => panic!("unexpected refusal of a prefix of {d}: {e}"),
            (Some(d), Ok(None)) => {
                assert!(d <= max, "declared {d} above {max} not refused");
                assert!(rest.len() < LENGTH_PREFIX + d, "a whole message not seen");
                return;
            }
            (Some(d), Ok(Some(n))) => {
                let n = *n;
                assert!(d <= max, "declared {d} above {max} accepted");
                assert_eq!(n, LENGTH_PREFIX + d);
                assert!(n <= rest.len());
                assert_eq!(
                    f.request_len(&rest[..n]),
                    Ok(Some(n)),
                    "depends on bytes after it"
                );
                let step = (n / 128).max(1);
                for cut in (0..n).step_by(step).chain(n.saturating_sub(4)..n) {
                    assert_eq!(f.request_len(&rest[..cut]), Ok(None), "prefix {cut} of {n}");
                }
                at += n;
            }
        }
    }
});
