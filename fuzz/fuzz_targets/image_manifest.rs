//! Image manifests, `hitless_image::Manifest::from_toml`, on any text (invalid UTF-8 in the
//! input is replaced, so every input reaches the TOML parser).
//!
//! Checked: an accepted manifest passes `validate`, its canonical text (`to_toml`) parses back
//! to the same manifest and is a fixed point, and its version prints and parses back to itself;
//! a refusal is a non-empty sentence.
#![no_main]

use hitless_image::{Manifest, Version};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match Manifest::from_toml(&text) {
        Ok(m) => {
            m.validate().expect("an accepted manifest is valid");
            let canonical = m.to_toml();
            let back = Manifest::from_toml(&canonical)
                .unwrap_or_else(|e| panic!("canonical text refused: {e}\n{canonical}"));
            assert_eq!(back, m, "canonical text changes the manifest:\n{canonical}");
            assert_eq!(back.to_toml(), canonical);
            let v: Version = m.version.to_string().parse().expect("version text parses");
            assert_eq!(v, m.version);
            for (svc, d) in &m.schemas {
                assert!(
                    d.reads.contains(&d.native) && d.writes.contains(&d.native),
                    "{svc}"
                );
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
