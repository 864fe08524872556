//! Messages from the peer agent: each line the peer link receives is decoded with
//! `serde_json::from_slice::<hitless_agent::remote::PeerMsg>`. Decoding must never panic.
//!
//! Checked: a decoded message serializes, the serialized form decodes again, and from then on
//! the encoding is a fixed point (same JSON value and same bytes); and a message is one JSON
//! object tagged by `msg`.
#![no_main]

use hitless_agent::remote::PeerMsg;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|line: &[u8]| {
    let Ok(m) = serde_json::from_slice::<PeerMsg>(line) else {
        return;
    };
    let once = serde_json::to_vec(&m).expect("a decoded message serializes");
    let v: serde_json::Value = serde_json::from_slice(&once).expect("serialized JSON parses");
    assert!(v.get("msg").is_some_and(|t| t.is_string()), "untagged: {v}");
    let m2: PeerMsg = serde_json::from_slice(&once).unwrap_or_else(|e| {
        panic!(
            "re-encoded message refused: {e}\n{}",
            String::from_utf8_lossy(&once)
        )
    });
    let twice = serde_json::to_vec(&m2).expect("serializes");
    let v2: serde_json::Value = serde_json::from_slice(&twice).expect("parses");
    assert_eq!(v, v2);
    assert_eq!(once, twice);
});
