//! The plan of a lab network: its prefix, its subnet, and the names and addresses derived from
//! them.

use std::fmt;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::NetlabError;

/// Host part of the primary appliance's address.
pub const PRIMARY_HOST: u32 = 1;
/// Host part of the secondary appliance's address.
pub const SECONDARY_HOST: u32 = 2;
/// Host part of the witness's address.
pub const WITNESS_HOST: u32 = 3;
/// Host part of the service address (configured by the agents, never by netlab).
pub const SERVICE_HOST: u32 = 10;
/// Host part of the clients' address.
pub const CLIENT_HOST: u32 = 100;
/// Host part of the gateway: the root namespace's address on the bridge.
pub const GATEWAY_HOST: u32 = 254;

/// Longest prefix accepted: `<prefix>-pri` must fit the 15 characters of an interface name with
/// room to spare.
pub const MAX_PREFIX_CHARS: usize = 6;
/// Shortest subnet mask accepted.
pub const MIN_SUBNET_BITS: u8 = 16;
/// Longest subnet mask accepted: the fixed host parts go up to .254, so the subnet needs at least
/// 8 host bits.
pub const MAX_SUBNET_BITS: u8 = 24;

/// What [`crate::create`] builds: every name starts with `prefix`, every address lies in
/// `subnet/prefix_len`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Names every namespace (`<prefix>-primary`), link (`<prefix>-br`, `<prefix>-pri`) and
    /// nftables table (`<prefix>_partition`). 1 to 6 characters `[a-z0-9]`, starting with a
    /// letter (nft reads a name that starts with a digit as a number).
    pub prefix: String,
    /// The network address of the subnet.
    pub subnet: Ipv4Addr,
    /// The subnet mask length, 16 to 24.
    pub prefix_len: u8,
}

impl Default for Plan {
    fn default() -> Self {
        Plan {
            prefix: "hl".to_string(),
            subnet: Ipv4Addr::new(198, 18, 0, 0),
            prefix_len: 24,
        }
    }
}

impl Plan {
    /// Checks the plan; the error names the field at fault.
    pub fn validate(&self) -> Result<(), NetlabError> {
        validate_prefix(&self.prefix).map_err(|e| NetlabError::InvalidPlan {
            reason: format!("prefix: {e}"),
        })?;
        if !(MIN_SUBNET_BITS..=MAX_SUBNET_BITS).contains(&self.prefix_len) {
            return Err(NetlabError::InvalidPlan {
                reason: format!(
                    "prefix_len {} is outside {MIN_SUBNET_BITS}..={MAX_SUBNET_BITS} (the hosts \
                     sit at fixed host parts up to .{GATEWAY_HOST})",
                    self.prefix_len
                ),
            });
        }
        let net = u32::from(self.subnet);
        if net & !mask(self.prefix_len) != 0 {
            return Err(NetlabError::InvalidPlan {
                reason: format!(
                    "subnet {} is not the network address of a /{} (that would be {})",
                    self.subnet,
                    self.prefix_len,
                    Ipv4Addr::from(net & mask(self.prefix_len))
                ),
            });
        }
        let first = self.subnet.octets()[0];
        if first == 0 || first == 127 || first >= 224 {
            return Err(NetlabError::InvalidPlan {
                reason: format!(
                    "subnet {} is not a unicast range (0/8, 127/8 and 224/3 are refused)",
                    self.subnet
                ),
            });
        }
        Ok(())
    }

    /// The address with host part `host` in the subnet. Only meaningful on a validated plan.
    pub fn addr(&self, host: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet) | (host & !mask(self.prefix_len)))
    }

    /// Name of the namespace of `role`.
    pub fn netns(&self, role: Role) -> String {
        netns_name(&self.prefix, role)
    }
}

fn mask(prefix_len: u8) -> u32 {
    match prefix_len {
        0 => 0,
        n => u32::MAX << (32 - u32::from(n.min(32))),
    }
}

/// Checks a prefix: 1 to 6 characters `[a-z0-9]`, starting with a letter.
pub fn validate_prefix(prefix: &str) -> Result<(), NetlabError> {
    let refuse = |reason| NetlabError::InvalidName {
        name: prefix.to_string(),
        what: "prefix",
        reason,
    };
    if prefix.is_empty() || prefix.len() > MAX_PREFIX_CHARS {
        return Err(refuse("a prefix has 1 to 6 characters"));
    }
    if !prefix
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(refuse("a prefix has only the characters a-z and 0-9"));
    }
    if !prefix.as_bytes()[0].is_ascii_lowercase() {
        return Err(refuse("a prefix starts with a letter a-z"));
    }
    Ok(())
}

/// The hosts of a lab network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// The primary appliance.
    Primary,
    /// The secondary appliance.
    Secondary,
    /// The witness (reserved).
    Witness,
    /// Where the lab's clients run.
    Client,
}

impl Role {
    /// Every role, in the order netlab creates them.
    pub const ALL: [Role; 4] = [Role::Primary, Role::Secondary, Role::Witness, Role::Client];

    /// The namespace suffix: `primary`, `secondary`, `witness`, `client`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Secondary => "secondary",
            Role::Witness => "witness",
            Role::Client => "client",
        }
    }

    /// The suffix of the host end of the role's veth: `pri`, `sec`, `wit`, `cli`.
    pub fn short(self) -> &'static str {
        match self {
            Role::Primary => "pri",
            Role::Secondary => "sec",
            Role::Witness => "wit",
            Role::Client => "cli",
        }
    }

    /// The host part of the role's address.
    pub fn host(self) -> u32 {
        match self {
            Role::Primary => PRIMARY_HOST,
            Role::Secondary => SECONDARY_HOST,
            Role::Witness => WITNESS_HOST,
            Role::Client => CLIENT_HOST,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `<prefix>-<role>`.
pub fn netns_name(prefix: &str, role: Role) -> String {
    format!("{prefix}-{}", role.name())
}

/// `<prefix>-<short>`: the host end of the role's veth, on the bridge.
pub fn link_name(prefix: &str, role: Role) -> String {
    format!("{prefix}-{}", role.short())
}

/// `<prefix>-br`.
pub fn bridge_name(prefix: &str) -> String {
    format!("{prefix}-br")
}

/// `<prefix>_partition`: the nftables table holding a partition inside a namespace.
pub fn table_name(prefix: &str) -> String {
    format!("{prefix}_partition")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(prefix: &str, subnet: [u8; 4], len: u8) -> Plan {
        Plan {
            prefix: prefix.to_string(),
            subnet: Ipv4Addr::from(subnet),
            prefix_len: len,
        }
    }

    fn refused(p: &Plan) -> String {
        match p.validate() {
            Err(e @ NetlabError::InvalidPlan { .. }) => e.to_string(),
            other => panic!("{p:?} should be refused as an invalid plan, got {other:?}"),
        }
    }

    #[test]
    fn the_default_plan_is_valid_and_uses_198_18_0_0_24() {
        let p = Plan::default();
        p.validate().unwrap();
        assert_eq!(p.prefix, "hl");
        assert_eq!(p.addr(PRIMARY_HOST), Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(p.addr(SECONDARY_HOST), Ipv4Addr::new(198, 18, 0, 2));
        assert_eq!(p.addr(WITNESS_HOST), Ipv4Addr::new(198, 18, 0, 3));
        assert_eq!(p.addr(SERVICE_HOST), Ipv4Addr::new(198, 18, 0, 10));
        assert_eq!(p.addr(CLIENT_HOST), Ipv4Addr::new(198, 18, 0, 100));
        assert_eq!(p.addr(GATEWAY_HOST), Ipv4Addr::new(198, 18, 0, 254));
    }

    #[test]
    fn addresses_follow_the_subnet_of_the_plan() {
        let p = plan("ab1", [10, 20, 0, 0], 16);
        p.validate().unwrap();
        assert_eq!(p.addr(PRIMARY_HOST), Ipv4Addr::new(10, 20, 0, 1));
        assert_eq!(p.addr(GATEWAY_HOST), Ipv4Addr::new(10, 20, 0, 254));
    }

    #[test]
    fn valid_prefixes_are_accepted() {
        for ok in ["a", "hl", "t1234z", "abcdef", "x9"] {
            validate_prefix(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn bad_prefixes_are_refused_with_the_reason() {
        for (bad, why) in [
            ("", "1 to 6"),
            ("abcdefg", "1 to 6"),
            ("Hl", "a-z and 0-9"),
            ("a-b", "a-z and 0-9"),
            ("a_b", "a-z and 0-9"),
            ("a/b", "a-z and 0-9"),
            ("1ab", "starts with a letter"),
        ] {
            let e = validate_prefix(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
            assert!(e.contains("prefix"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn a_plan_with_a_bad_prefix_names_the_prefix_field() {
        let e = refused(&plan("BAD", [198, 18, 0, 0], 24));
        assert!(e.contains("prefix:"), "{e}");
        assert!(e.contains("BAD"), "{e}");
    }

    #[test]
    fn a_subnet_that_is_not_a_network_address_is_refused() {
        let e = refused(&plan("hl", [198, 18, 0, 5], 24));
        assert!(e.contains("not the network address"), "{e}");
        assert!(e.contains("198.18.0.0"), "{e}");
        let e = refused(&plan("hl", [198, 18, 1, 0], 16));
        assert!(e.contains("198.18.0.0"), "{e}");
    }

    #[test]
    fn a_prefix_len_outside_16_to_24_is_refused() {
        for len in [0, 8, 15, 25, 28, 32] {
            let e = refused(&plan("hl", [10, 0, 0, 0], len));
            assert!(e.contains("prefix_len"), "{len}: {e}");
        }
        for len in [16, 20, 24] {
            plan("hl", [10, 0, 0, 0], len).validate().unwrap();
        }
    }

    #[test]
    fn non_unicast_subnets_are_refused() {
        for net in [[0, 0, 0, 0], [127, 0, 0, 0], [224, 0, 0, 0], [240, 1, 0, 0]] {
            let e = refused(&plan("hl", net, 24));
            assert!(e.contains("unicast"), "{net:?}: {e}");
        }
    }

    #[test]
    fn names_follow_the_prefix_and_fit_an_interface_name() {
        let p = "abcdef";
        assert_eq!(netns_name(p, Role::Primary), "abcdef-primary");
        assert_eq!(netns_name(p, Role::Client), "abcdef-client");
        assert_eq!(link_name(p, Role::Secondary), "abcdef-sec");
        assert_eq!(bridge_name(p), "abcdef-br");
        assert_eq!(table_name(p), "abcdef_partition");
        for role in Role::ALL {
            assert!(link_name(p, role).len() <= 15);
        }
    }
}
