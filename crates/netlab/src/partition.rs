//! Partitions as faults: nftables rules inside the hosts' namespaces that drop the traffic
//! between chosen hosts, and their removal.
//!
//! Each affected namespace gets one table `inet <prefix>_partition` with an `input` chain
//! dropping packets *from* the cut addresses and an `output` chain dropping packets *to* them,
//! both only on `eth0` (loopback is never touched: an appliance keeps reaching the service
//! address it holds itself). The rules match addresses, not connection states, so established
//! TCP connections stop passing data too, and resume once healed if they have not timed out.
//! The table's comment names the partition, which is how [`active`] reads it back.
//!
//! Addresses: inside an appliance's namespace, the service address seen on `eth0` is always the
//! peer (the appliance's own service address is delivered over loopback), so an appliance
//! cutting its peer also cuts the service address. The witness cannot tell which appliance
//! holds the service address; it cuts it only when it is cut from both. Clients and the gateway
//! are never cut.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::exec::{run_tool, validate_netns_name};
use crate::plan::{table_name, validate_prefix, Role};
use crate::{NetlabError, Topology};

/// The marker in the table comment in front of the partition name.
const COMMENT_MARK: &str = "hitless-netlab partition=";

/// The partitions netlab can put in place. Only one is in place at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Partition {
    /// The appliances cannot reach each other; both still reach the clients and the witness.
    PartitionPeers,
    /// The primary is cut from the secondary and the witness, still reachable by clients.
    IsolatePrimary,
    /// The secondary is cut from the primary and the witness, still reachable by clients.
    IsolateSecondary,
    /// Only the traffic from the primary to the secondary is dropped; the reverse flows.
    OneWayPrimary,
    /// The witness is cut from both appliances, still reachable by clients.
    IsolateWitness,
}

impl Partition {
    /// Every partition.
    pub const ALL: [Partition; 5] = [
        Partition::PartitionPeers,
        Partition::IsolatePrimary,
        Partition::IsolateSecondary,
        Partition::OneWayPrimary,
        Partition::IsolateWitness,
    ];

    /// The kebab-case name (`partition-peers`, ...), as in serde.
    pub fn name(self) -> &'static str {
        match self {
            Partition::PartitionPeers => "partition-peers",
            Partition::IsolatePrimary => "isolate-primary",
            Partition::IsolateSecondary => "isolate-secondary",
            Partition::OneWayPrimary => "one-way-primary",
            Partition::IsolateWitness => "isolate-witness",
        }
    }

    /// The partition of a name; an unknown name gets an error listing the known ones.
    pub fn parse(name: &str) -> Result<Partition, NetlabError> {
        Partition::ALL
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| NetlabError::UnknownPartition {
                name: name.to_string(),
                expected: Partition::ALL.map(Partition::name).join(", "),
            })
    }

    /// One sentence on what the partition cuts.
    pub fn describe(self) -> &'static str {
        match self {
            Partition::PartitionPeers => {
                "the appliances cannot reach each other; both still reach clients and the witness"
            }
            Partition::IsolatePrimary => {
                "the primary is cut from the secondary and the witness; clients still reach it"
            }
            Partition::IsolateSecondary => {
                "the secondary is cut from the primary and the witness; clients still reach it"
            }
            Partition::OneWayPrimary => {
                "packets from the primary to the secondary are dropped; the reverse flows"
            }
            Partition::IsolateWitness => {
                "the witness is cut from both appliances; clients still reach it"
            }
        }
    }
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Partition {
    type Err = NetlabError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Partition::parse(s)
    }
}

/// The rules of one namespace for a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NsRules {
    /// Whose namespace.
    pub role: Role,
    /// Packets arriving on `eth0` from these addresses are dropped.
    pub drop_from: Vec<Ipv4Addr>,
    /// Packets leaving on `eth0` to these addresses are dropped.
    pub drop_to: Vec<Ipv4Addr>,
}

/// The rules `p` puts in place on `topo`, one entry per affected namespace.
pub fn rules(topo: &Topology, p: Partition) -> Vec<NsRules> {
    let primary = topo.hosts.primary.addr;
    let secondary = topo.hosts.secondary.addr;
    let witness = topo.hosts.witness.addr;
    let service = topo.service_addr;
    let both = |role, cut: Vec<Ipv4Addr>| NsRules {
        role,
        drop_from: cut.clone(),
        drop_to: cut,
    };
    match p {
        Partition::PartitionPeers => vec![
            both(Role::Primary, vec![secondary, service]),
            both(Role::Secondary, vec![primary, service]),
        ],
        Partition::IsolatePrimary => vec![
            both(Role::Primary, vec![secondary, service, witness]),
            both(Role::Secondary, vec![primary, service]),
            both(Role::Witness, vec![primary]),
        ],
        Partition::IsolateSecondary => vec![
            both(Role::Primary, vec![secondary, service]),
            both(Role::Secondary, vec![primary, service, witness]),
            both(Role::Witness, vec![secondary]),
        ],
        Partition::OneWayPrimary => vec![
            NsRules {
                role: Role::Primary,
                drop_from: vec![],
                drop_to: vec![secondary, service],
            },
            NsRules {
                role: Role::Secondary,
                drop_from: vec![primary, service],
                drop_to: vec![],
            },
        ],
        Partition::IsolateWitness => vec![
            both(Role::Primary, vec![witness]),
            both(Role::Secondary, vec![witness]),
            both(Role::Witness, vec![primary, secondary, service]),
        ],
    }
}

fn addr_set(addrs: &[Ipv4Addr]) -> String {
    let list: Vec<String> = addrs.iter().map(Ipv4Addr::to_string).collect();
    format!("{{ {} }}", list.join(", "))
}

/// The `nft -f -` script for one namespace: removes the partition table if present (the
/// add-then-delete idiom works whether it exists or not), then, if `ns_rules` is given, adds the
/// table for `p`. nft applies a script as one transaction.
pub fn script(prefix: &str, interface: &str, put: Option<(Partition, &NsRules)>) -> String {
    let table = table_name(prefix);
    let mut s = format!("table inet {table} {{}}\ndelete table inet {table}\n");
    if let Some((p, r)) = put {
        s.push_str(&format!("table inet {table} {{\n"));
        s.push_str(&format!("\tcomment \"{COMMENT_MARK}{}\"\n", p.name()));
        if !r.drop_from.is_empty() {
            s.push_str("\tchain input {\n");
            s.push_str("\t\ttype filter hook input priority filter; policy accept;\n");
            s.push_str(&format!(
                "\t\tiifname \"{interface}\" ip saddr {} drop\n",
                addr_set(&r.drop_from)
            ));
            s.push_str("\t}\n");
        }
        if !r.drop_to.is_empty() {
            s.push_str("\tchain output {\n");
            s.push_str("\t\ttype filter hook output priority filter; policy accept;\n");
            s.push_str(&format!(
                "\t\toifname \"{interface}\" ip daddr {} drop\n",
                addr_set(&r.drop_to)
            ));
            s.push_str("\t}\n");
        }
        s.push_str("}\n");
    }
    s
}

fn nft_apply(netns: &str, script: &str) -> Result<(), NetlabError> {
    run_tool("nft", &["-f", "-"], Some(netns), Some(script)).map(|_| ())
}

/// Puts `p` in place, replacing any partition already there (only one at a time). If a
/// namespace refuses its rules, the partition tables are removed from all namespaces again
/// (best effort) and the error returned: no half partition stays behind.
pub fn partition(topo: &Topology, p: Partition) -> Result<(), NetlabError> {
    check(topo)?;
    let wanted = rules(topo, p);
    let result = Role::ALL.iter().try_for_each(|role| {
        let host = topo.host(*role);
        let put = wanted.iter().find(|r| r.role == *role).map(|r| (p, r));
        nft_apply(&host.netns, &script(&topo.prefix, &host.interface, put))
    });
    match result {
        Ok(()) => {
            tracing::info!(partition = %p, prefix = %topo.prefix, "netlab: partition in place");
            Ok(())
        }
        Err(e) => {
            for role in Role::ALL {
                let host = topo.host(role);
                if let Err(undo) =
                    nft_apply(&host.netns, &script(&topo.prefix, &host.interface, None))
                {
                    tracing::warn!(netns = %host.netns, error = %undo, "netlab: could not remove a partition table after a failed partition");
                }
            }
            Err(e)
        }
    }
}

/// Removes the partition tables from every namespace and returns the partition that was in
/// place (`None` if there was none). Tables it cannot make sense of are removed all the same.
pub fn heal(topo: &Topology) -> Result<Option<Partition>, NetlabError> {
    check(topo)?;
    let found = read_all(topo);
    let first = found
        .iter()
        .find_map(|(_, f)| f.as_ref().ok().copied().flatten());
    for role in Role::ALL {
        let host = topo.host(role);
        nft_apply(&host.netns, &script(&topo.prefix, &host.interface, None))?;
    }
    let was = match verdict(topo, found) {
        Ok(was) => was,
        Err(e) => {
            tracing::warn!(error = %e, "netlab: healed partition tables that were inconsistent");
            first
        }
    };
    tracing::info!(partition = ?was.map(Partition::name), prefix = %topo.prefix, "netlab: healed");
    Ok(was)
}

/// The partition in place, read back from the tables in the namespaces. Tables that do not
/// describe exactly one partition (a crash between namespaces, a table made by hand) are an
/// error; [`heal`] removes them.
pub fn active(topo: &Topology) -> Result<Option<Partition>, NetlabError> {
    check(topo)?;
    verdict(topo, read_all(topo))
}

/// A topology read back from a file goes into nft scripts: its names must be what netlab makes.
fn check(topo: &Topology) -> Result<(), NetlabError> {
    validate_prefix(&topo.prefix)?;
    for role in Role::ALL {
        let host = topo.host(role);
        validate_netns_name(&host.netns)?;
        let i = &host.interface;
        if i.is_empty()
            || i.len() > 15
            || !i
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(NetlabError::InvalidName {
                name: i.clone(),
                what: "interface name",
                reason: "an interface name has 1 to 15 characters a-z, A-Z, 0-9, `-`, `_`, `.`",
            });
        }
    }
    Ok(())
}

type Found = Vec<(Role, Result<Option<Partition>, NetlabError>)>;

fn read_all(topo: &Topology) -> Found {
    Role::ALL
        .iter()
        .map(|role| (*role, read_one(topo, *role)))
        .collect()
}

fn read_one(topo: &Topology, role: Role) -> Result<Option<Partition>, NetlabError> {
    let netns = &topo.host(role).netns;
    let out = run_tool("nft", &["list", "ruleset"], Some(netns), None)?;
    table_partition(&out, &table_name(&topo.prefix)).map_err(|reason| NetlabError::Output {
        command: format!("nft list ruleset (in network namespace {netns})"),
        reason,
    })
}

fn verdict(topo: &Topology, found: Found) -> Result<Option<Partition>, NetlabError> {
    let mut kinds = Vec::new();
    let mut states = Vec::new();
    for (role, f) in found {
        // A namespace that cannot be read (gone, nft missing) leaves nothing to say about the
        // whole: its error is the answer.
        let f = f?;
        if let Some(p) = f {
            kinds.push((role, p));
        }
        states.push((role, f));
    }
    let Some((_, kind)) = kinds.first().copied() else {
        return Ok(None);
    };
    let mut expected: Vec<Role> = rules(topo, kind).iter().map(|r| r.role).collect();
    expected.sort();
    let mut have: Vec<Role> = kinds.iter().map(|(r, _)| *r).collect();
    have.sort();
    if kinds.iter().all(|(_, k)| *k == kind) && have == expected {
        return Ok(Some(kind));
    }
    let detail = states
        .iter()
        .map(|(role, f)| {
            let what = f.map_or("none", Partition::name);
            format!("{}: {what}", topo.host(*role).netns)
        })
        .collect::<Vec<_>>()
        .join(", ");
    Err(NetlabError::PartitionInconsistent { detail })
}

/// The partition named by table `table` in the text of `nft list ruleset`, `None` if the table
/// is absent.
fn table_partition(ruleset: &str, table: &str) -> Result<Option<Partition>, String> {
    let head = format!("table inet {table} {{");
    let mut lines = ruleset.lines().skip_while(|l| l.trim_end() != head);
    if lines.next().is_none() {
        return Ok(None);
    }
    for line in lines.take_while(|l| l.trim_end() != "}") {
        let Some(comment) = line.trim().strip_prefix("comment \"") else {
            continue;
        };
        let comment = comment.trim_end_matches('"');
        let Some(name) = comment.strip_prefix(COMMENT_MARK) else {
            return Err(format!(
                "table {table} has the comment {comment:?}, not a partition"
            ));
        };
        return Partition::parse(name)
            .map(Some)
            .map_err(|e| format!("table {table}: {e}"));
    }
    Err(format!("table {table} has no comment naming its partition"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Plan;

    fn topo() -> Topology {
        Topology::of(&Plan::default())
    }

    fn a(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 0, last)
    }

    #[test]
    fn names_round_trip_and_match_serde() {
        for p in Partition::ALL {
            assert_eq!(Partition::parse(p.name()).unwrap(), p);
            assert_eq!(p.name().parse::<Partition>().unwrap(), p);
            assert_eq!(p.to_string(), p.name());
            assert_eq!(
                serde_json::to_string(&p).unwrap(),
                format!("\"{}\"", p.name())
            );
            let back: Partition = serde_json::from_str(&format!("\"{}\"", p.name())).unwrap();
            assert_eq!(back, p);
        }
        let names: Vec<&str> = Partition::ALL.iter().map(|p| p.name()).collect();
        assert_eq!(
            names,
            [
                "partition-peers",
                "isolate-primary",
                "isolate-secondary",
                "one-way-primary",
                "isolate-witness"
            ]
        );
    }

    #[test]
    fn an_unknown_partition_lists_the_known_names() {
        let e = Partition::parse("split-brain").unwrap_err().to_string();
        assert!(e.contains("split-brain"), "{e}");
        for p in Partition::ALL {
            assert!(e.contains(p.name()), "{e}");
        }
        assert!(serde_json::from_str::<Partition>("\"split-brain\"").is_err());
    }

    #[test]
    fn no_partition_ever_cuts_the_client_or_the_gateway() {
        let t = topo();
        for p in Partition::ALL {
            for r in rules(&t, p) {
                assert_ne!(r.role, Role::Client, "{p}");
                for addr in r.drop_from.iter().chain(&r.drop_to) {
                    assert_ne!(*addr, t.client.addr, "{p}");
                    assert_ne!(*addr, t.gateway, "{p}");
                }
            }
        }
    }

    #[test]
    fn partition_peers_cuts_the_appliances_and_the_service_address_between_them() {
        let r = rules(&topo(), Partition::PartitionPeers);
        assert_eq!(
            r,
            vec![
                NsRules {
                    role: Role::Primary,
                    drop_from: vec![a(2), a(10)],
                    drop_to: vec![a(2), a(10)]
                },
                NsRules {
                    role: Role::Secondary,
                    drop_from: vec![a(1), a(10)],
                    drop_to: vec![a(1), a(10)]
                },
            ]
        );
    }

    #[test]
    fn one_way_primary_drops_only_from_primary_to_secondary() {
        let r = rules(&topo(), Partition::OneWayPrimary);
        let p = r.iter().find(|r| r.role == Role::Primary).unwrap();
        let s = r.iter().find(|r| r.role == Role::Secondary).unwrap();
        assert!(p.drop_from.is_empty());
        assert_eq!(p.drop_to, [a(2), a(10)]);
        assert_eq!(s.drop_from, [a(1), a(10)]);
        assert!(s.drop_to.is_empty());
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn isolations_cut_the_isolated_host_at_both_ends() {
        let t = topo();
        for (p, isolated, others) in [
            (
                Partition::IsolatePrimary,
                Role::Primary,
                [Role::Secondary, Role::Witness],
            ),
            (
                Partition::IsolateSecondary,
                Role::Secondary,
                [Role::Primary, Role::Witness],
            ),
            (
                Partition::IsolateWitness,
                Role::Witness,
                [Role::Primary, Role::Secondary],
            ),
        ] {
            let r = rules(&t, p);
            let own = r.iter().find(|r| r.role == isolated).unwrap();
            for other in others {
                let addr = t.host(other).addr;
                assert!(own.drop_from.contains(&addr), "{p}: {own:?}");
                assert!(own.drop_to.contains(&addr), "{p}: {own:?}");
                let theirs = r.iter().find(|r| r.role == other).unwrap();
                assert_eq!(theirs.drop_from, theirs.drop_to, "{p}");
                assert!(theirs.drop_from.contains(&t.host(isolated).addr), "{p}");
                assert!(!theirs.drop_from.contains(&t.host(other).addr), "{p}");
            }
        }
    }

    #[test]
    fn the_witness_cuts_the_service_address_only_when_cut_from_both_appliances() {
        let t = topo();
        for p in Partition::ALL {
            if let Some(w) = rules(&t, p).iter().find(|r| r.role == Role::Witness) {
                assert_eq!(
                    w.drop_to.contains(&t.service_addr),
                    p == Partition::IsolateWitness,
                    "{p}"
                );
            }
        }
    }

    #[test]
    fn the_script_replaces_the_table_and_names_the_partition() {
        let t = topo();
        let r = &rules(&t, Partition::PartitionPeers)[0];
        let s = script("hl", "eth0", Some((Partition::PartitionPeers, r)));
        assert_eq!(
            s,
            "table inet hl_partition {}\n\
             delete table inet hl_partition\n\
             table inet hl_partition {\n\
             \tcomment \"hitless-netlab partition=partition-peers\"\n\
             \tchain input {\n\
             \t\ttype filter hook input priority filter; policy accept;\n\
             \t\tiifname \"eth0\" ip saddr { 198.18.0.2, 198.18.0.10 } drop\n\
             \t}\n\
             \tchain output {\n\
             \t\ttype filter hook output priority filter; policy accept;\n\
             \t\toifname \"eth0\" ip daddr { 198.18.0.2, 198.18.0.10 } drop\n\
             \t}\n\
             }\n"
        );
    }

    #[test]
    fn the_script_leaves_out_an_empty_chain_and_heal_only_deletes() {
        let t = topo();
        let r = rules(&t, Partition::OneWayPrimary);
        let s = script("hl", "eth0", Some((Partition::OneWayPrimary, &r[0])));
        assert!(!s.contains("chain input"), "{s}");
        assert!(s.contains("oifname \"eth0\" ip daddr { 198.18.0.2, 198.18.0.10 } drop"));
        let s = script("hl", "eth0", Some((Partition::OneWayPrimary, &r[1])));
        assert!(!s.contains("chain output"), "{s}");
        assert!(s.contains("iifname \"eth0\" ip saddr { 198.18.0.1, 198.18.0.10 } drop"));
        assert_eq!(
            script("hl", "eth0", None),
            "table inet hl_partition {}\ndelete table inet hl_partition\n"
        );
    }

    const LISTED: &str =
        "table inet other {\n\tcomment \"hitless-netlab partition=isolate-primary\"\n}\n\
        table inet hl_partition {\n\
        \tcomment \"hitless-netlab partition=one-way-primary\"\n\
        \tchain output {\n\
        \t\ttype filter hook output priority filter; policy accept;\n\
        \t\toifname \"eth0\" ip daddr { 198.18.0.2, 198.18.0.10 } drop\n\
        \t}\n\
        }\n";

    #[test]
    fn the_partition_is_read_back_from_the_table_comment() {
        assert_eq!(
            table_partition(LISTED, "hl_partition").unwrap(),
            Some(Partition::OneWayPrimary)
        );
        assert_eq!(
            table_partition(LISTED, "other").unwrap(),
            Some(Partition::IsolatePrimary)
        );
        assert_eq!(table_partition(LISTED, "t1_partition").unwrap(), None);
        assert_eq!(table_partition("", "hl_partition").unwrap(), None);
    }

    #[test]
    fn a_table_without_a_partition_comment_is_an_error() {
        let bare = "table inet hl_partition {\n\tchain input {\n\t}\n}\n";
        assert!(table_partition(bare, "hl_partition")
            .unwrap_err()
            .contains("no comment"));
        let foreign = "table inet hl_partition {\n\tcomment \"mine\"\n}\n";
        assert!(table_partition(foreign, "hl_partition")
            .unwrap_err()
            .contains("not a partition"));
        let unknown = "table inet hl_partition {\n\tcomment \"hitless-netlab partition=nope\"\n}\n";
        assert!(table_partition(unknown, "hl_partition")
            .unwrap_err()
            .contains("nope"));
    }

    fn found(kinds: [Option<Partition>; 4]) -> Found {
        Role::ALL
            .into_iter()
            .zip(kinds)
            .map(|(r, k)| (r, Ok(k)))
            .collect()
    }

    #[test]
    fn a_topology_with_names_netlab_does_not_make_is_refused_before_nft_runs() {
        let mut t = topo();
        t.hosts.witness.interface = "eth0\" drop".to_string();
        let e = partition(&t, Partition::PartitionPeers).unwrap_err();
        assert!(e.to_string().contains("interface name"), "{e}");
        let mut t = topo();
        t.prefix = "hl; flush ruleset".to_string();
        let e = active(&t).unwrap_err();
        assert!(
            matches!(e, NetlabError::InvalidName { what: "prefix", .. }),
            "{e:?}"
        );
        let mut t = topo();
        t.client.netns = "../etc".to_string();
        let e = heal(&t).unwrap_err();
        assert!(e.to_string().contains("network namespace name"), "{e}");
    }

    #[test]
    fn the_verdict_needs_every_affected_namespace_and_one_kind() {
        let t = topo();
        let pp = Some(Partition::PartitionPeers);
        assert_eq!(verdict(&t, found([None; 4])).unwrap(), None);
        assert_eq!(
            verdict(&t, found([pp, pp, None, None])).unwrap(),
            Some(Partition::PartitionPeers)
        );
        // Half a partition (a crash between namespaces).
        let e = verdict(&t, found([pp, None, None, None])).unwrap_err();
        assert!(matches!(e, NetlabError::PartitionInconsistent { .. }));
        assert!(e.to_string().contains("hl-secondary: none"), "{e}");
        // Two kinds.
        let e = verdict(&t, found([pp, Some(Partition::IsolatePrimary), None, None])).unwrap_err();
        assert!(e.to_string().contains("isolate-primary"), "{e}");
        // A table where the kind puts none.
        verdict(&t, found([pp, pp, pp, None])).unwrap_err();
    }
}
