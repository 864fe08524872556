//! The agent configuration, `hitless_agent::config::AgentConfig::parse(path, text)`, on any
//! text (invalid UTF-8 in the input is replaced, so every input reaches the TOML parser).
//!
//! Checked: an accepted configuration satisfies the documented bounds (heartbeat interval and
//! misses, distinct addresses, instance resources, non-empty data directory), its peer timeout
//! is their product, and it serializes to TOML that parses back to the same configuration; a
//! refusal names the file.
#![no_main]

use std::path::Path;
use std::time::Duration;

use hitless_agent::config::AgentConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let path = Path::new("fuzz/agent.toml");
    match AgentConfig::parse(path, &text) {
        Ok(c) => {
            assert!((1..=10_000).contains(&c.heartbeat.interval_ms));
            assert!((1..=100).contains(&c.heartbeat.misses));
            let addrs = [c.api_listen, c.peer_listen, c.peer_addr, c.service_addr];
            for (i, a) in addrs.iter().enumerate() {
                assert!(!addrs[i + 1..].contains(a), "{a} used twice");
            }
            assert!((1024..=65000).contains(&c.instances.port_base));
            assert!((16..=65536).contains(&c.instances.memory_mib));
            assert!((1..=6400).contains(&c.instances.cpu_percent));
            assert!((1..=64).contains(&c.instances.vcpus));
            assert!(!c.data_dir.as_os_str().is_empty());
            assert_eq!(
                c.peer_timeout(),
                Duration::from_millis(c.heartbeat.interval_ms) * c.heartbeat.misses
            );
            let again = toml::to_string(&c).expect("a configuration serializes");
            let back = AgentConfig::parse(path, &again)
                .unwrap_or_else(|e| panic!("serialized configuration refused: {e}\n{again}"));
            assert_eq!(back, c);
        }
        Err(e) => assert!(e.to_string().contains("fuzz/agent.toml"), "{e}"),
    }
});
