//! Where the lab's appliances, clients and service address live: all on this host's loopback
//! (`--hosts loopback`), or one network namespace per appliance and one for clients on a
//! bridge (`--hosts netns`, [`hitless_netlab`]). The layout is saved in the run directory, so
//! that `lab status`, `lab partition` and `lab down` act on the lab that is running.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;

use anyhow::{bail, Context};
use hitless_netlab::Topology;
use serde::{Deserialize, Serialize};

/// How the lab lays out its appliances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Hosts {
    /// Every appliance and client on this host's loopback; the service address moves by
    /// SO_REUSEPORT between the two agents' fronts.
    Loopback,
    /// One network namespace per appliance and one for clients, on a bridge: each appliance
    /// has an address of its own, and the service address is a virtual IP held by the
    /// appliance in control.
    Netns,
}

impl std::fmt::Display for Hosts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Hosts::Loopback => "loopback",
            Hosts::Netns => "netns",
        })
    }
}

impl Hosts {
    /// `netns` where network namespaces can be made here (root, with `ip` and `nft`),
    /// `loopback` otherwise.
    pub fn default_here() -> Hosts {
        match netns_unavailable() {
            None => Hosts::Netns,
            Some(_) => Hosts::Loopback,
        }
    }
}

/// Why the two-host lab cannot run here, if it cannot.
pub fn netns_unavailable() -> Option<String> {
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("network namespaces need root".into());
    }
    for tool in ["ip", "nft"] {
        let found = std::process::Command::new(tool)
            .arg("-V")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok();
        if !found {
            return Some(format!(
                "`{tool}` is not installed (apt-get install iproute2 nftables)"
            ));
        }
    }
    None
}

/// The lab's loopback addresses. Every port is below Linux's ephemeral range
/// (32768-60999), so that no outgoing connection can hold one when an instance or agent
/// needs to bind it.
const LOOPBACK_SERVICE: &str = "127.0.0.1:26380";
const API_PORTS: [u16; 2] = [27701, 27702];
const PEER_PORTS: [u16; 2] = [27711, 27712];
pub(super) const PORT_BASES: [u16; 2] = [27800, 27900];
/// The service port on the two-host lab's service address (the port RESP clients expect).
const NETNS_SERVICE_PORT: u16 = 6379;
/// The namespace prefix of the two-host lab.
pub const NETNS_PREFIX: &str = "hl";

/// The lab's addresses.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Layout {
    pub hosts: Hosts,
    /// The network of the two-host lab.
    pub topology: Option<Topology>,
    pub service_addr: SocketAddr,
    /// Each appliance's API (primary, secondary).
    pub apis: [SocketAddr; 2],
    /// Each appliance's peer link.
    pub peers: [SocketAddr; 2],
    /// Each appliance's address for its instances.
    pub host_addrs: [IpAddr; 2],
}

const FILE: &str = "layout.json";

impl Layout {
    /// Everything on loopback.
    pub fn loopback() -> Layout {
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        Layout {
            hosts: Hosts::Loopback,
            topology: None,
            service_addr: LOOPBACK_SERVICE.parse().expect("the lab's service address"),
            apis: API_PORTS.map(|p| SocketAddr::new(lo, p)),
            peers: PEER_PORTS.map(|p| SocketAddr::new(lo, p)),
            host_addrs: [lo, lo],
        }
    }

    /// The appliances at their hosts' addresses in `topo`.
    pub fn netns(topo: Topology) -> Layout {
        let hosts = [topo.hosts.primary.addr, topo.hosts.secondary.addr].map(IpAddr::V4);
        Layout {
            hosts: Hosts::Netns,
            service_addr: SocketAddr::new(IpAddr::V4(topo.service_addr), NETNS_SERVICE_PORT),
            apis: [0, 1].map(|i| SocketAddr::new(hosts[i], API_PORTS[i])),
            peers: [0, 1].map(|i| SocketAddr::new(hosts[i], PEER_PORTS[i])),
            host_addrs: hosts,
            topology: Some(topo),
        }
    }

    /// The namespace appliance `i` runs in (none on loopback).
    pub fn appliance_netns(&self, i: usize) -> Option<&str> {
        let t = self.topology.as_ref()?;
        Some(if i == 0 {
            &t.hosts.primary.netns
        } else {
            &t.hosts.secondary.netns
        })
    }

    /// The namespace the lab's clients run in (none on loopback).
    pub fn client_netns(&self) -> Option<&str> {
        self.topology.as_ref().map(|t| t.client.netns.as_str())
    }

    /// The topology as `lab status --json` prints it.
    pub fn topology_json(&self) -> serde_json::Value {
        match &self.topology {
            Some(t) => {
                // The topology as the network crate describes it, and the service's port.
                let mut v = serde_json::to_value(t).expect("a topology serializes");
                v["service"] = serde_json::json!(self.service_addr);
                v
            }
            None => {
                let host = |a: IpAddr| serde_json::json!({ "netns": null, "addr": a });
                serde_json::json!({
                    "kind": "loopback",
                    "hosts": {
                        "primary": host(self.host_addrs[0]),
                        "secondary": host(self.host_addrs[1]),
                        "witness": serde_json::Value::Null,
                    },
                    "client": host(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                    "service_addr": self.service_addr.ip(),
                    "service": self.service_addr,
                })
            }
        }
    }

    /// Saves the layout in the run directory.
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let path = dir.join(FILE);
        std::fs::write(&path, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// The layout of the lab in `dir`; a run directory from before layouts were saved is a
    /// loopback lab.
    pub fn load(dir: &Path) -> anyhow::Result<Layout> {
        let path = dir.join(FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("reading the lab layout {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Layout::loopback()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// The topology, or an error saying the lab has none.
    pub fn require_topology(&self) -> anyhow::Result<&Topology> {
        match &self.topology {
            Some(t) => Ok(t),
            None => bail!(
                "this lab runs on loopback: partitions need the two-host lab (`hitless lab up --hosts netns`)"
            ),
        }
    }
}

/// The lab's API tokens file in its run directory `dir`.
pub fn tokens_file(dir: &Path) -> std::path::PathBuf {
    dir.join("api-tokens")
}

/// The lab's API tokens file, made (mode 0600, one operator token) if it is not there yet.
pub fn ensure_tokens(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    use hitless_agent::auth;
    let file = tokens_file(dir);
    if !file.exists() {
        let operator = auth::Credential {
            role: auth::Role::Operator,
            token: auth::generate(),
        };
        auth::write_file(&file, &[operator])
            .with_context(|| format!("writing the lab's tokens file {}", file.display()))?;
    }
    Ok(file)
}

/// Runs `f` on a thread inside the client namespace (in the calling thread's own when there
/// is none). Threads and processes `f` starts stay in that namespace: a network namespace is
/// inherited by the threads and children a thread creates.
pub fn in_clients<R: Send>(
    layout: &Layout,
    f: impl FnOnce() -> anyhow::Result<R> + Send,
) -> anyhow::Result<R> {
    let Some(ns) = layout.client_netns() else {
        return f();
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            hitless_netlab::enter(ns)
                .with_context(|| format!("entering the client namespace {ns}"))?;
            f()
        })
        .join()
        .unwrap_or_else(|_| bail!("a client thread panicked"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_two_host_topology_is_described_with_the_fields_lab_status_promises() {
        let topo = hitless_netlab::Topology::of(&hitless_netlab::Plan::default());
        let v = Layout::netns(topo).topology_json();
        assert_eq!(v["kind"], "netns");
        assert_eq!(v["hosts"]["primary"]["addr"], "198.18.0.1");
        assert_eq!(v["hosts"]["secondary"]["netns"], "hl-secondary");
        assert_eq!(v["hosts"]["witness"]["addr"], "198.18.0.3");
        assert_eq!(v["client"]["addr"], "198.18.0.100");
        assert_eq!(v["service_addr"], "198.18.0.10");
        assert_eq!(v["service"], "198.18.0.10:6379");
    }

    #[test]
    fn a_layout_reads_back_as_saved_and_a_missing_one_is_loopback() {
        let tmp = tempfile::tempdir().unwrap();
        let l = Layout::load(tmp.path()).unwrap();
        assert_eq!(l.hosts, Hosts::Loopback);
        assert_eq!(l.service_addr, LOOPBACK_SERVICE.parse().unwrap());
        l.save(tmp.path()).unwrap();
        let back = Layout::load(tmp.path()).unwrap();
        assert_eq!(back.apis, l.apis);
        assert_eq!(back.topology_json()["kind"], "loopback");
        assert!(back.require_topology().is_err());
    }
}
