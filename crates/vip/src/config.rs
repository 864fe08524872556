//! Configuration of the service address and of its announcements, with validation.

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Longest Linux interface name in bytes (`IFNAMSIZ` is 16 with the terminating NUL).
pub const MAX_INTERFACE_NAME_LEN: usize = 15;

/// Bounds of [`AnnounceConfig::burst`].
pub const BURST_RANGE: std::ops::RangeInclusive<u32> = 1..=100;
/// Bounds of [`AnnounceConfig::burst_interval_ms`].
pub const BURST_INTERVAL_MS_RANGE: std::ops::RangeInclusive<u64> = 10..=10_000;
/// Bounds of a non-zero [`AnnounceConfig::refresh_ms`].
pub const REFRESH_MS_RANGE: std::ops::RangeInclusive<u64> = 100..=3_600_000;

/// How the holder of the service address tells its neighbours where the address lives.
///
/// On a claim (and on every [`crate::Vip::announce_now`]) `burst` announcements go out,
/// `burst_interval_ms` apart; afterwards one announcement goes out every `refresh_ms` for as
/// long as the address is held (0 turns the refresh off).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnnounceConfig {
    /// Announcements in one burst (1..=100).
    pub burst: u32,
    /// Time between two announcements of a burst, in milliseconds (10..=10000).
    pub burst_interval_ms: u64,
    /// Time between two refresh announcements after the burst, in milliseconds: 0 (no
    /// refresh) or 100..=3600000.
    pub refresh_ms: u64,
}

impl Default for AnnounceConfig {
    fn default() -> Self {
        AnnounceConfig {
            burst: 5,
            burst_interval_ms: 100,
            refresh_ms: 10_000,
        }
    }
}

impl AnnounceConfig {
    /// Checks every field against its bounds.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !BURST_RANGE.contains(&self.burst) {
            return Err(ConfigError::Burst(self.burst));
        }
        if !BURST_INTERVAL_MS_RANGE.contains(&self.burst_interval_ms) {
            return Err(ConfigError::BurstInterval(self.burst_interval_ms));
        }
        if self.refresh_ms != 0 && !REFRESH_MS_RANGE.contains(&self.refresh_ms) {
            return Err(ConfigError::Refresh(self.refresh_ms));
        }
        Ok(())
    }
}

/// The service address: which address, with which prefix, on which interface, announced how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipConfig {
    /// The interface the address is added to and announced on (e.g. `eth0`).
    pub interface: String,
    /// The service address itself.
    pub addr: IpAddr,
    /// Its prefix length (0..=32 for IPv4, 0..=128 for IPv6).
    pub prefix_len: u8,
    /// The announcement policy.
    #[serde(default)]
    pub announce: AnnounceConfig,
}

impl VipConfig {
    /// Checks the interface name, the address, the prefix length and the announcement policy.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_interface_name(&self.interface)?;
        validate_service_addr(self.addr)?;
        let max = max_prefix_len(self.addr);
        if self.prefix_len > max {
            return Err(ConfigError::PrefixLen {
                addr: self.addr,
                prefix_len: self.prefix_len,
                max,
            });
        }
        self.announce.validate()
    }
}

impl fmt::Display for VipConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} on {}", self.addr, self.prefix_len, self.interface)
    }
}

/// The longest prefix for the address's family.
pub fn max_prefix_len(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// Checks a name against the rules Linux applies to interface names: 1 to 15 bytes, not `.`
/// or `..`, and no `/`, `:`, NUL or whitespace.
pub fn validate_interface_name(name: &str) -> Result<(), ConfigError> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_INTERFACE_NAME_LEN {
        Some("it is longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("it is a path component")
    } else if name.contains('/') {
        Some("it contains '/'")
    } else if name.contains(':') {
        Some("it contains ':'")
    } else if name.contains('\0') {
        Some("it contains a NUL byte")
    } else if name.chars().any(char::is_whitespace) {
        Some("it contains whitespace")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(ConfigError::InterfaceName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Refuses addresses no client can reach as a service address.
pub fn validate_service_addr(addr: IpAddr) -> Result<(), ConfigError> {
    let reason = if addr.is_unspecified() {
        Some("the unspecified address")
    } else if addr.is_multicast() {
        Some("a multicast address")
    } else if addr.is_loopback() {
        Some("a loopback address")
    } else if matches!(addr, IpAddr::V4(v4) if v4.is_broadcast()) {
        Some("the broadcast address")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(ConfigError::Addr { addr, reason }),
        None => Ok(()),
    }
}

/// A configuration value outside its bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The burst size is outside 1..=100.
    #[error("announce.burst must be between 1 and 100, not {0}")]
    Burst(u32),
    /// The interval between burst announcements is outside 10..=10000 ms.
    #[error("announce.burst_interval_ms must be between 10 and 10000, not {0}")]
    BurstInterval(u64),
    /// The refresh period is neither 0 nor within 100..=3600000 ms.
    #[error("announce.refresh_ms must be 0 (no refresh) or between 100 and 3600000, not {0}")]
    Refresh(u64),
    /// The interface name breaks a Linux naming rule.
    #[error("{name:?} is not a valid interface name: {reason}")]
    InterfaceName {
        /// The name as given.
        name: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// The address cannot serve clients.
    #[error("{addr} cannot be a service address: it is {reason}")]
    Addr {
        /// The address as given.
        addr: IpAddr,
        /// What kind of address it is.
        reason: &'static str,
    },
    /// The prefix length is longer than the address.
    #[error("prefix length {prefix_len} is too long for {addr} (at most {max})")]
    PrefixLen {
        /// The address as given.
        addr: IpAddr,
        /// The prefix length as given.
        prefix_len: u8,
        /// The longest prefix of the address's family.
        max: u8,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vip(interface: &str, addr: &str, prefix_len: u8) -> VipConfig {
        VipConfig {
            interface: interface.to_owned(),
            addr: addr.parse().unwrap(),
            prefix_len,
            announce: AnnounceConfig::default(),
        }
    }

    #[test]
    fn defaults_are_five_at_100_ms_then_every_10_s_and_valid() {
        let a = AnnounceConfig::default();
        assert_eq!(
            (a.burst, a.burst_interval_ms, a.refresh_ms),
            (5, 100, 10_000)
        );
        a.validate().unwrap();
    }

    #[test]
    fn announce_bounds_are_inclusive_and_refresh_zero_means_off() {
        let ok = |burst, burst_interval_ms, refresh_ms| {
            AnnounceConfig {
                burst,
                burst_interval_ms,
                refresh_ms,
            }
            .validate()
        };
        assert!(ok(1, 10, 0).is_ok());
        assert!(ok(100, 10_000, 3_600_000).is_ok());
        assert!(ok(5, 100, 100).is_ok());
        assert_eq!(ok(0, 100, 0), Err(ConfigError::Burst(0)));
        assert_eq!(ok(101, 100, 0), Err(ConfigError::Burst(101)));
        assert_eq!(ok(5, 9, 0), Err(ConfigError::BurstInterval(9)));
        assert_eq!(ok(5, 10_001, 0), Err(ConfigError::BurstInterval(10_001)));
        assert_eq!(ok(5, 100, 99), Err(ConfigError::Refresh(99)));
        assert_eq!(ok(5, 100, 3_600_001), Err(ConfigError::Refresh(3_600_001)));
        assert_eq!(
            ok(0, 100, 0).unwrap_err().to_string(),
            "announce.burst must be between 1 and 100, not 0"
        );
    }

    #[test]
    fn interface_names_follow_linux_rules() {
        for good in ["eth0", "a", "br-lan.100", "enp0s31f6", "x23456789012345"] {
            validate_interface_name(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        let reason = |name: &str| match validate_interface_name(name) {
            Err(ConfigError::InterfaceName { reason, .. }) => reason,
            other => panic!("{name:?}: {other:?}"),
        };
        assert_eq!(reason(""), "it is empty");
        assert_eq!(reason("x234567890123456"), "it is longer than 15 bytes");
        assert_eq!(reason("."), "it is a path component");
        assert_eq!(reason(".."), "it is a path component");
        assert_eq!(reason("eth/0"), "it contains '/'");
        assert_eq!(reason("eth0:1"), "it contains ':'");
        assert_eq!(reason("eth 0"), "it contains whitespace");
        assert_eq!(reason("eth\t0"), "it contains whitespace");
        assert_eq!(reason("eth\x000"), "it contains a NUL byte");
        // Bytes, not characters: 8 two-byte characters are 16 bytes.
        assert_eq!(reason("éééééééé"), "it is longer than 15 bytes");
    }

    #[test]
    fn unusable_addresses_are_refused_with_the_reason() {
        let err = |addr: &str| vip("eth0", addr, 24).validate().unwrap_err().to_string();
        assert_eq!(
            err("0.0.0.0"),
            "0.0.0.0 cannot be a service address: it is the unspecified address"
        );
        assert_eq!(
            err("::"),
            ":: cannot be a service address: it is the unspecified address"
        );
        assert!(err("224.0.0.1").ends_with("a multicast address"));
        assert!(err("ff02::1").ends_with("a multicast address"));
        assert!(err("127.0.0.2").ends_with("a loopback address"));
        assert!(err("::1").ends_with("a loopback address"));
        assert!(err("255.255.255.255").ends_with("the broadcast address"));
        vip("eth0", "198.18.0.10", 24).validate().unwrap();
        vip("eth0", "2001:db8::10", 64).validate().unwrap();
    }

    #[test]
    fn prefix_length_is_bounded_by_the_family() {
        vip("eth0", "198.18.0.10", 32).validate().unwrap();
        vip("eth0", "198.18.0.10", 0).validate().unwrap();
        vip("eth0", "2001:db8::10", 128).validate().unwrap();
        assert_eq!(
            vip("eth0", "198.18.0.10", 33).validate(),
            Err(ConfigError::PrefixLen {
                addr: "198.18.0.10".parse().unwrap(),
                prefix_len: 33,
                max: 32
            })
        );
        assert_eq!(
            vip("eth0", "2001:db8::10", 129)
                .validate()
                .unwrap_err()
                .to_string(),
            "prefix length 129 is too long for 2001:db8::10 (at most 128)"
        );
    }

    #[test]
    fn toml_fills_announce_defaults_and_refuses_unknown_fields() {
        let c: VipConfig = toml::from_str(
            "interface = \"eth0\"\naddr = \"198.18.0.10\"\nprefix_len = 24\n[announce]\nburst = 3\n",
        )
        .unwrap();
        assert_eq!(c.announce.burst, 3);
        assert_eq!(c.announce.burst_interval_ms, 100);
        assert_eq!(c.announce.refresh_ms, 10_000);
        assert_eq!(c.to_string(), "198.18.0.10/24 on eth0");
        let unknown = toml::from_str::<VipConfig>(
            "interface = \"eth0\"\naddr = \"198.18.0.10\"\nprefix_len = 24\nprefix = 24\n",
        );
        assert!(unknown.unwrap_err().to_string().contains("unknown field"));
        let unknown = toml::from_str::<AnnounceConfig>("bursts = 3\n");
        assert!(unknown.unwrap_err().to_string().contains("unknown field"));
    }

    proptest! {
        #[test]
        fn announce_validation_matches_the_documented_bounds(
            burst in 0u32..200,
            interval in 0u64..20_000,
            refresh in prop_oneof![0u64..200, 3_599_900u64..3_600_100, any::<u64>()],
        ) {
            let c = AnnounceConfig { burst, burst_interval_ms: interval, refresh_ms: refresh };
            let expected = (1..=100).contains(&burst)
                && (10..=10_000).contains(&interval)
                && (refresh == 0 || (100..=3_600_000).contains(&refresh));
            prop_assert_eq!(c.validate().is_ok(), expected);
        }

        #[test]
        fn interface_name_validation_matches_the_linux_rules(name in "[a-z0-9./: \t-]{0,20}") {
            let expected = !name.is_empty()
                && name.len() <= 15
                && name != "."
                && name != ".."
                && !name.contains(['/', ':', ' ', '\t']);
            prop_assert_eq!(validate_interface_name(&name).is_ok(), expected);
        }
    }
}
