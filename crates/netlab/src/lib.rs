//! Real hosts on one machine, and partitions between them.
//!
//! `hitless lab up --hosts netns` runs each agent on a host of its own, so that the peer link,
//! the instances' state sync and the clients cross a real network that can be cut. This crate
//! builds that network on one Linux machine (it needs root: `CAP_SYS_ADMIN` and
//! `CAP_NET_ADMIN`, the `ip` and `nft` tools):
//!
//! ```text
//!   root namespace: bridge <prefix>-br, gateway .254 (the operator's CLI reaches the agents' APIs here)
//!      |               |                 |                |
//!   <prefix>-pri    <prefix>-sec      <prefix>-wit     <prefix>-cli      (veth host ends)
//!      |               |                 |                |
//!   eth0 .1         eth0 .2           eth0 .3          eth0 .100          (inside the namespaces)
//!   <prefix>-primary <prefix>-secondary <prefix>-witness <prefix>-client
//!
//!   service address .10: held by the appliance in control; the agents add and remove it
//! ```
//!
//! Linux announces nothing when an IPv4 address is added: after the service address moves,
//! the other hosts keep sending to its old place until their neighbour entry expires (about
//! half a minute). Whoever adds it calls [`announce`] right after.
//!
//! Addresses come from the [`Plan`]'s subnet (198.18.0.0/24 by default, a range reserved for
//! benchmarks); every name starts with its prefix (`hl`), so [`destroy`] can remove everything
//! from the prefix alone, also after a crash.
//!
//! | module | role |
//! |---|---|
//! | `plan` | [`Plan`] and its validation; the names and addresses derived from it |
//! | `topology` | [`create`], [`destroy`] and the [`Topology`] that `create` returns |
//! | `exec` | running inside a namespace: [`enter`] (this thread), [`run_in`] (a new thread), [`command_in`] (a child process); bounded runs of `ip`/`nft` |
//! | `arp` | [`announce`]: the gratuitous ARP whoever moves the service address sends after adding it |
//! | `partition` | [`Partition`]s as nftables rules inside the namespaces: [`partition`], [`heal`], [`active`] |
//!
//! Everything is blocking; `ip` and `nft` runs are bounded in time (10 s) and in captured
//! output. Errors are [`NetlabError`]s; those of a tool name its command line and its stderr.
//!
//! ```no_run
//! use hitless_netlab::{create, destroy, heal, partition, Partition, Plan};
//!
//! let topo = create(&Plan::default())?;
//! partition(&topo, Partition::PartitionPeers)?;
//! // ... the appliances cannot reach each other; clients still reach both ...
//! assert_eq!(heal(&topo)?, Some(Partition::PartitionPeers));
//! destroy(&topo.prefix)?;
//! # Ok::<(), hitless_netlab::NetlabError>(())
//! ```

mod arp;
mod error;
mod exec;
mod partition;
mod plan;
mod topology;

pub use arp::{announce, ANNOUNCEMENTS};
pub use error::NetlabError;
pub use exec::{command_in, enter, netns_path, run_in, validate_netns_name, NETNS_DIR};
pub use partition::{active, heal, partition, rules, script, NsRules, Partition};
pub use plan::{
    bridge_name, link_name, netns_name, table_name, validate_prefix, Plan, Role, CLIENT_HOST,
    GATEWAY_HOST, MAX_PREFIX_CHARS, MAX_SUBNET_BITS, MIN_SUBNET_BITS, PRIMARY_HOST, SECONDARY_HOST,
    SERVICE_HOST, WITNESS_HOST,
};
pub use topology::{create, destroy, Cleaned, Host, Hosts, Topology, INTERFACE, KIND_NETNS};
