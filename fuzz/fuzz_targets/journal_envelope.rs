//! hitless-journal envelopes (journal records, metadata values and the bytes mirrored from the
//! peer): `envelope::decode` on arbitrary bytes, and on the input wrapped in a valid envelope.
//!
//! Checked: an accepted envelope is exactly the encoding of its body (header fields fixed, no
//! trailing bytes), a refused one names the defect its header shows, and any body wrapped by
//! `encode` decodes back to itself while any single-bit change of it is refused.
#![no_main]

use hitless_journal::envelope::{self, EnvelopeError, HEADER_LEN, MAX_BODY_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // As stored or received.
    match envelope::decode(data) {
        Ok(body) => {
            assert_eq!(body.len() + HEADER_LEN, data.len());
            assert_eq!(body, &data[HEADER_LEN..]);
            assert_eq!(envelope::encode(body).expect("in bounds"), data);
        }
        Err(e) => match e {
            EnvelopeError::ShortHeader { len } => assert!(len == data.len() && len < HEADER_LEN),
            EnvelopeError::TruncatedBody { declared, actual } => {
                assert!(actual < declared && declared <= MAX_BODY_LEN);
                assert_eq!(actual + HEADER_LEN, data.len());
            }
            EnvelopeError::TrailingBytes { declared, extra } => {
                assert_eq!(declared + extra + HEADER_LEN, data.len());
            }
            EnvelopeError::BadChecksum { stored, computed } => {
                assert_ne!(stored, computed);
                assert_eq!(computed, crc32c_of(&data[HEADER_LEN..]));
            }
            _ => assert!(data.len() >= HEADER_LEN),
        },
    }

    // As written: the input is a body.
    let env = envelope::encode(data).expect("fuzz inputs are below the body limit");
    assert_eq!(envelope::decode(&env), Ok(data));
    // Flip one bit chosen by the input: the envelope must no longer decode.
    if !data.is_empty() {
        let bit = data
            .iter()
            .fold(0usize, |a, &b| a.wrapping_mul(31).wrapping_add(b.into()))
            % (env.len() * 8);
        let mut bad = env.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        assert!(
            envelope::decode(&bad).is_err(),
            "bit {bit} flipped undetected"
        );
    }
});

/// CRC32C, bit by bit, independent of the crate's implementation.
fn crc32c_of(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
