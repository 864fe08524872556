//! Building and removing the lab network: namespaces on a bridge.

use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::exec::{run_in, run_tool, NETNS_DIR};
use crate::plan::{
    bridge_name, link_name, validate_prefix, Plan, Role, GATEWAY_HOST, SERVICE_HOST,
};
use crate::NetlabError;

/// The value of [`Topology::kind`] for a network of namespaces.
pub const KIND_NETNS: &str = "netns";
/// The name of the interface of every host inside its namespace.
pub const INTERFACE: &str = "eth0";

/// How long [`destroy`] waits for the kernel to let go of the links of deleted namespaces.
const DESTROY_WAIT: Duration = Duration::from_secs(5);
const DESTROY_POLL: Duration = Duration::from_millis(50);

/// One host of the lab network: a namespace with one interface on the bridge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    /// The network namespace (`/run/netns/<netns>`).
    pub netns: String,
    /// The host's address on its interface.
    pub addr: Ipv4Addr,
    /// The interface inside the namespace (`eth0`).
    pub interface: String,
}

/// The hosts that take part in the HA protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hosts {
    /// The primary appliance.
    pub primary: Host,
    /// The secondary appliance.
    pub secondary: Host,
    /// The witness (reserved: nothing runs there yet).
    pub witness: Host,
}

/// What [`create`] built; enough to run things on it, partition it and show it. It is saved by
/// the lab, but [`destroy`] does not need it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    /// `"netns"`.
    pub kind: String,
    /// The prefix of every name.
    pub prefix: String,
    /// The subnet mask length of every address.
    pub prefix_len: u8,
    /// The bridge in the root namespace.
    pub bridge: String,
    /// The root namespace's address on the bridge: the management path from the operator's CLI
    /// to the agents' APIs. No partition cuts it.
    pub gateway: Ipv4Addr,
    /// The appliances and the witness.
    pub hosts: Hosts,
    /// Where the lab's clients run.
    pub client: Host,
    /// The address the appliance in control serves on. netlab configures it nowhere: the agents
    /// add and remove it, and announce it with [`crate::announce`] when they add it.
    pub service_addr: Ipv4Addr,
}

impl Topology {
    /// The host of `role`.
    pub fn host(&self, role: Role) -> &Host {
        match role {
            Role::Primary => &self.hosts.primary,
            Role::Secondary => &self.hosts.secondary,
            Role::Witness => &self.hosts.witness,
            Role::Client => &self.client,
        }
    }

    /// The namespaces of every host, in [`Role::ALL`] order.
    pub fn namespaces(&self) -> Vec<&str> {
        Role::ALL
            .iter()
            .map(|r| self.host(*r).netns.as_str())
            .collect()
    }

    /// The topology a plan describes (names and addresses; nothing is made).
    pub fn of(plan: &Plan) -> Topology {
        let host = |role: Role| Host {
            netns: plan.netns(role),
            addr: plan.addr(role.host()),
            interface: INTERFACE.to_string(),
        };
        Topology {
            kind: KIND_NETNS.to_string(),
            prefix: plan.prefix.clone(),
            prefix_len: plan.prefix_len,
            bridge: bridge_name(&plan.prefix),
            gateway: plan.addr(GATEWAY_HOST),
            hosts: Hosts {
                primary: host(Role::Primary),
                secondary: host(Role::Secondary),
                witness: host(Role::Witness),
            },
            client: host(Role::Client),
            service_addr: plan.addr(SERVICE_HOST),
        }
    }
}

/// What [`destroy`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cleaned {
    /// Namespaces deleted.
    pub namespaces: Vec<String>,
    /// Links of the root namespace that were present (the bridge, host ends of veths); those
    /// of deleted namespaces go with them.
    pub links: Vec<String>,
}

impl Cleaned {
    /// Nothing was there.
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty() && self.links.is_empty()
    }
}

/// Sysctls set inside every namespace before its interface arrives, with why.
///
/// The service address moves between the appliances (the agents add it to `eth0` of the one in
/// control), so:
/// - `ip_nonlocal_bind=1`: an agent may bind the service address before it holds it (a standby
///   preparing its front) instead of failing with "cannot assign requested address".
/// - `arp_accept=1`: a host creates a neighbour entry from a gratuitous ARP, so a client (or the
///   peer) that never talked to the service address learns its new place from the announcement
///   of the appliance taking it. (Existing entries are updated by gratuitous ARP anyway.)
/// - `arp_announce=2`: ARP requests carry the host's own address as sender, never the service
///   address, so neighbours do not cache the service address at an appliance from an incidental
///   request it sent.
/// - `disable_ipv6=1`: partitions filter IPv4 addresses; IPv6 link-local traffic would otherwise
///   still connect hosts a partition separates. Nothing in the lab uses IPv6.
const NETNS_SYSCTLS: &[(&str, &str)] = &[
    ("/proc/sys/net/ipv4/ip_nonlocal_bind", "1"),
    ("/proc/sys/net/ipv4/conf/all/arp_accept", "1"),
    ("/proc/sys/net/ipv4/conf/default/arp_accept", "1"),
    ("/proc/sys/net/ipv4/conf/all/arp_announce", "2"),
    ("/proc/sys/net/ipv4/conf/default/arp_announce", "2"),
    ("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1"),
    ("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1"),
];

/// br_netfilter settings of the root namespace that make the bridge pass its frames through the
/// root namespace's iptables/arptables (whose FORWARD policy may well be DROP, e.g. with docker).
const BRIDGE_NF: &[&str] = &[
    "/proc/sys/net/bridge/bridge-nf-call-iptables",
    "/proc/sys/net/bridge/bridge-nf-call-arptables",
];

/// Builds the lab network of `plan`, first removing whatever a previous run with the same prefix
/// left behind.
///
/// It makes the namespaces `<prefix>-primary`, `-secondary`, `-witness`, `-client`; the bridge
/// `<prefix>-br` in the root namespace with the gateway address (.254); one veth per namespace
/// whose host end `<prefix>-pri|sec|wit|cli` is a port of the bridge and whose other end is
/// `eth0` inside the namespace, up, with the host's address; `lo` up. No default route: every
/// host and the gateway share the subnet, and the root namespace routes nothing for the lab, so
/// an off-subnet destination fails fast ("network unreachable") instead of timing out.
///
/// Every namespace gets, before its interface arrives (so `eth0` inherits them):
/// - `net.ipv4.ip_nonlocal_bind=1`: an agent may bind the service address before it holds it;
/// - `net.ipv4.conf.*.arp_accept=1`: a host that never talked to the service address learns its
///   place from the gratuitous ARP of the appliance taking it ([`crate::announce`]);
/// - `net.ipv4.conf.*.arp_announce=2`: ARP requests carry the host's own address, never the
///   service address, so no neighbour caches the service address from an incidental request;
/// - `net.ipv6.conf.*.disable_ipv6=1`: partitions filter IPv4, so no IPv6 link-local path may
///   bypass them.
///
/// Everything is made in the network namespace of the calling thread (the root namespace,
/// unless the thread [`crate::enter`]ed another); [`destroy`] must be called from the same.
///
/// If `br_netfilter` is loaded and makes bridges call iptables/arptables, those settings of the
/// **root namespace** are turned off (a warning is logged): otherwise the host's firewall would
/// filter the traffic between the hosts. They are global to the root namespace's bridges and
/// are not turned back on by [`destroy`].
///
/// On any failure everything made so far is removed again and the first error is returned.
pub fn create(plan: &Plan) -> Result<Topology, NetlabError> {
    plan.validate()?;
    let leftovers = destroy(&plan.prefix)?;
    if !leftovers.is_empty() {
        tracing::info!(
            prefix = %plan.prefix,
            namespaces = ?leftovers.namespaces,
            links = ?leftovers.links,
            "netlab: removed leftovers of an earlier run"
        );
    }
    let topo = Topology::of(plan);
    match build(&topo) {
        Ok(()) => {
            tracing::info!(prefix = %topo.prefix, bridge = %topo.bridge, gateway = %topo.gateway, "netlab: network created");
            Ok(topo)
        }
        Err(e) => {
            if let Err(undo) = destroy(&plan.prefix) {
                tracing::warn!(error = %undo, "netlab: could not undo a failed create");
            }
            Err(e)
        }
    }
}

fn build(topo: &Topology) -> Result<(), NetlabError> {
    bridge_without_netfilter()?;
    let gateway = format!("{}/{}", topo.gateway, topo.prefix_len);
    ip(&["link", "add", &topo.bridge, "type", "bridge"])?;
    ip(&["addr", "add", &gateway, "dev", &topo.bridge])?;
    ip(&["link", "set", &topo.bridge, "up"])?;
    for role in Role::ALL {
        let host = topo.host(role);
        let link = link_name(&topo.prefix, role);
        let addr = format!("{}/{}", host.addr, topo.prefix_len);
        ip(&["netns", "add", &host.netns])?;
        set_sysctls(&host.netns)?;
        ip(&[
            "link",
            "add",
            &link,
            "type",
            "veth",
            "peer",
            "name",
            &host.interface,
            "netns",
            &host.netns,
        ])?;
        ip(&["link", "set", &link, "master", &topo.bridge])?;
        ip(&["link", "set", &link, "up"])?;
        ip(&[
            "-n",
            &host.netns,
            "addr",
            "add",
            &addr,
            "dev",
            &host.interface,
        ])?;
        ip(&["-n", &host.netns, "link", "set", &host.interface, "up"])?;
        ip(&["-n", &host.netns, "link", "set", "lo", "up"])?;
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<String, NetlabError> {
    run_tool("ip", args, None, None)
}

fn write_sysctl(path: &str, value: &str) -> Result<(), NetlabError> {
    fs::write(path, value).map_err(|source| NetlabError::Io {
        action: format!("write {value} to"),
        path: path.to_string(),
        source,
    })
}

fn set_sysctls(netns: &str) -> Result<(), NetlabError> {
    // /proc/sys/net shows the settings of the namespace of the thread that opens it.
    run_in(netns, || {
        NETNS_SYSCTLS
            .iter()
            .try_for_each(|(path, value)| write_sysctl(path, value))
    })?
}

fn bridge_without_netfilter() -> Result<(), NetlabError> {
    for path in BRIDGE_NF {
        match fs::read_to_string(path) {
            Ok(v) if v.trim() == "0" => {}
            Ok(_) => {
                tracing::warn!(
                    setting = path,
                    "netlab: br_netfilter passes bridged traffic to the firewall; turning it off \
                     for the bridges of the root namespace"
                );
                write_sysctl(path, "0")?;
            }
            // br_netfilter is not loaded: bridges do not call the firewall.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(NetlabError::Io {
                    action: "read".to_string(),
                    path: path.to_string(),
                    source,
                })
            }
        }
    }
    Ok(())
}

/// Removes every network namespace and every root-namespace link whose name starts with
/// `<prefix>-`, and nothing else.
///
/// It works from the names alone, so it also cleans up after a crash that lost the saved
/// topology, and it is idempotent: a second call finds nothing and returns an empty
/// [`Cleaned`]. Partition tables live inside the namespaces and go with them. Processes still
/// running inside a namespace keep it alive (unnamed) until they exit; stop them first.
pub fn destroy(prefix: &str) -> Result<Cleaned, NetlabError> {
    validate_prefix(prefix)?;
    let start = format!("{prefix}-");
    let links = prefixed_links(&start)?;
    let namespaces = prefixed_namespaces(&start)?;
    for ns in &namespaces {
        match ip(&["netns", "delete", ns]) {
            Ok(_) => {}
            // Gone meanwhile (a concurrent destroy): what we wanted.
            Err(_) if !Path::new(NETNS_DIR).join(ns).exists() => {}
            Err(e) => return Err(e),
        }
    }
    // Deleting a namespace destroys its veth pairs asynchronously; delete what is left in the
    // root namespace and wait, bounded, until nothing with the prefix remains, so that a create
    // right after does not trip over a link on its way out.
    let deadline = Instant::now() + DESTROY_WAIT;
    loop {
        let remaining = prefixed_links(&start)?;
        if remaining.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            return Err(NetlabError::Leftover {
                names: remaining,
                waited: DESTROY_WAIT,
            });
        }
        for link in &remaining {
            if let Err(e) = ip(&["link", "delete", link]) {
                // "Cannot find device": it went away with its namespace meanwhile.
                tracing::debug!(%link, error = %e, "netlab: link delete failed; checking again");
            }
        }
        thread::sleep(DESTROY_POLL);
    }
    let cleaned = Cleaned { namespaces, links };
    if !cleaned.is_empty() {
        tracing::info!(%prefix, namespaces = ?cleaned.namespaces, links = ?cleaned.links, "netlab: removed");
    }
    Ok(cleaned)
}

fn prefixed_namespaces(start: &str) -> Result<Vec<String>, NetlabError> {
    let entries = match fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(NetlabError::Io {
                action: "read".to_string(),
                path: NETNS_DIR.to_string(),
                source,
            })
        }
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| NetlabError::Io {
            action: "read".to_string(),
            path: NETNS_DIR.to_string(),
            source,
        })?;
        if let Some(name) = entry.file_name().to_str() {
            if name.starts_with(start) {
                names.push(name.to_string());
            }
        }
    }
    names.sort();
    Ok(names)
}

fn prefixed_links(start: &str) -> Result<Vec<String>, NetlabError> {
    let out = ip(&["-j", "link", "show"])?;
    let mut names = link_names(&out).map_err(|reason| NetlabError::Output {
        command: "ip -j link show".to_string(),
        reason,
    })?;
    names.retain(|n| n.starts_with(start));
    names.sort();
    Ok(names)
}

/// The `ifname`s in the output of `ip -j link show`.
fn link_names(json: &str) -> Result<Vec<String>, String> {
    let links: Vec<serde_json::Value> =
        serde_json::from_str(json).map_err(|e| format!("not a JSON array of links: {e}"))?;
    links
        .iter()
        .map(|l| {
            l.get("ifname")
                .and_then(|n| n.as_str())
                .map(str::to_string)
                .ok_or_else(|| format!("a link without an ifname: {l}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_topology_of_the_default_plan() {
        let t = Topology::of(&Plan::default());
        assert_eq!(t.kind, "netns");
        assert_eq!(t.bridge, "hl-br");
        assert_eq!(t.gateway, Ipv4Addr::new(198, 18, 0, 254));
        assert_eq!(t.hosts.primary.netns, "hl-primary");
        assert_eq!(t.hosts.primary.addr, Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(t.hosts.secondary.addr, Ipv4Addr::new(198, 18, 0, 2));
        assert_eq!(t.hosts.witness.netns, "hl-witness");
        assert_eq!(t.hosts.witness.addr, Ipv4Addr::new(198, 18, 0, 3));
        assert_eq!(t.client.netns, "hl-client");
        assert_eq!(t.client.addr, Ipv4Addr::new(198, 18, 0, 100));
        assert_eq!(t.service_addr, Ipv4Addr::new(198, 18, 0, 10));
        assert_eq!(t.client.interface, "eth0");
        assert_eq!(
            t.namespaces(),
            ["hl-primary", "hl-secondary", "hl-witness", "hl-client"]
        );
    }

    #[test]
    fn the_topology_serializes_with_the_fields_the_lab_shows() {
        let t = Topology::of(&Plan::default());
        let v = serde_json::to_value(&t).unwrap();
        assert_eq!(v["kind"], "netns");
        assert_eq!(v["hosts"]["primary"]["netns"], "hl-primary");
        assert_eq!(v["hosts"]["secondary"]["addr"], "198.18.0.2");
        assert_eq!(v["hosts"]["witness"]["addr"], "198.18.0.3");
        assert_eq!(v["client"]["netns"], "hl-client");
        assert_eq!(v["client"]["addr"], "198.18.0.100");
        assert_eq!(v["service_addr"], "198.18.0.10");
        assert_eq!(v["gateway"], "198.18.0.254");
        let back: Topology = serde_json::from_value(v).unwrap();
        assert_eq!(back, t);
    }

    #[test]
    fn link_names_are_read_from_ip_json() {
        let json =
            r#"[{"ifindex":1,"ifname":"lo"},{"ifindex":7,"ifname":"hl-pri","link_index":2}]"#;
        assert_eq!(link_names(json).unwrap(), ["lo", "hl-pri"]);
        assert!(link_names("[{\"ifindex\":1}]")
            .unwrap_err()
            .contains("without an ifname"));
        assert!(link_names("garbage").unwrap_err().contains("JSON"));
    }

    #[test]
    fn destroy_refuses_a_bad_prefix_before_touching_anything() {
        // An empty prefix would match every "-..." name; a prefix with a dash would reach into
        // another prefix's names.
        for bad in ["", "a-b", "UP"] {
            let e = destroy(bad).unwrap_err();
            assert!(
                matches!(e, NetlabError::InvalidName { .. }),
                "{bad:?}: {e:?}"
            );
        }
    }
}
