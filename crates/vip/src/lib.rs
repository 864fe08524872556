//! The device's moving service address (virtual IP).
//!
//! # What and why
//!
//! A hitless network device is two appliances (hosts). Clients reach the service through one
//! address, the *service address*, which only the appliance whose instance is in control holds.
//! When control moves to the other appliance, the address moves with it: the losing appliance
//! removes it, the winning one adds it and tells the link about it so that neighbours (clients
//! on the segment, the gateway, the switches' forwarding tables) send to the new host at once
//! instead of waiting for their caches to expire.
//!
//! [`Vip`] does this for one address on one interface, over rtnetlink (no `ip` binary) and raw
//! sockets, with a blocking API meant to be called from `spawn_blocking`:
//!
//! - [`Vip::claim`] adds the address (already present is fine) and starts announcing it;
//! - [`Vip::announce_now`] sends one more burst;
//! - [`Vip::release`] stops announcing and removes the address (absent is fine);
//! - [`Vip::is_held`] and [`Vip::stats`] report;
//! - [`remove_stale`], [`local_addresses`] and [`is_local`] serve the agent's start checks.
//!
//! # Announcement policy
//!
//! IPv4 announces with gratuitous ARP (the request form, see [`announce`] for why), IPv6 with
//! unsolicited neighbour advertisements (override flag, to ff02::1, hop limit 255); IPv6
//! addresses are added with `nodad` so they are usable at once (the address moves between two
//! hosts by design, duplicate detection would only hold it back for a second or more).
//!
//! On a claim a *burst* goes out ([`AnnounceConfig::burst`] announcements,
//! [`AnnounceConfig::burst_interval_ms`] apart, 5 at 100 ms by default): one frame can be lost,
//! five rarely are, and a switch that was still learning sees the later ones. After the burst
//! one announcement goes out every [`AnnounceConfig::refresh_ms`] (10 s by default, 0 turns it
//! off) for as long as the address is held: a neighbour that missed the burst, or that was
//! told otherwise since, converges within one refresh period.
//!
//! # The split-heal case
//!
//! Users of keepalived, Pacemaker's IPaddr2 and vip-manager report two failure shapes after a
//! network partition: both hosts still hold the address once the partition heals, and the host
//! that kept control announces nothing after the heal, so clients that followed the other side
//! during the split stay on the wrong host until their caches expire. This crate answers both
//! with the agent:
//!
//! - the side that lost control calls [`Vip::release`], which stops its announcements *before*
//!   removing the address, so it never contradicts the holder after it gave up control;
//! - the holder calls [`Vip::announce_now`] when the peer link returns after a split: a fresh
//!   burst wins back every neighbour the other side announced to, and the periodic refresh is
//!   the safety net if that call is missed;
//! - an agent that starts (after a crash, say) removes an address it may have left behind with
//!   [`remove_stale`] before it decides whether it holds control.
//!
//! # Dropping a [`Vip`]
//!
//! Dropping stops the announcer but does *not* remove the address. A crashing agent could not
//! remove it either, so correctness must not rest on it; the agent removes a stale address at
//! start with [`remove_stale`], and releases explicitly when it loses control. Removing on drop
//! would also take the address away from a holder whose handle is merely being replaced.
//!
//! # Removing an IPv4 address that is a subnet's primary
//!
//! Linux deletes the secondary addresses of a subnet together with its primary address unless
//! `promote_secondaries` is on for the interface. The service address is the primary when it
//! was added before the host's own address of the same subnet (the host's address was re-added
//! while the service address was held, say); removing it would then silently take the host's
//! own address with it. Before such a removal this crate turns `promote_secondaries` on for
//! that interface (and says so in the log), or refuses with [`VipError::Secondaries`].
//!
//! # Privileges and namespaces
//!
//! Adding and removing addresses needs `CAP_NET_ADMIN`, sending raw frames `CAP_NET_RAW`. All
//! work happens in the network namespace of the calling thread; the announcer thread started by
//! [`Vip::claim`] inherits the namespace of the thread that called it.

pub mod announce;
pub mod config;
mod netlink;

use std::io;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;

use announce::{lock, Announcer, Counters, Target};
pub use config::{AnnounceConfig, ConfigError, VipConfig};

/// What went wrong with the service address.
#[derive(Debug, thiserror::Error)]
pub enum VipError {
    /// The configuration breaks a rule.
    #[error("invalid service address configuration: {0}")]
    Config(#[from] ConfigError),
    /// The interface does not exist in this network namespace.
    #[error("interface {interface} does not exist on this host")]
    InterfaceNotFound {
        /// The configured interface name.
        interface: String,
    },
    /// The interface has no 6-byte link-layer address to announce.
    #[error("interface {interface} has no Ethernet address, so the service address cannot be announced on it")]
    NoEthernetAddress {
        /// The configured interface name.
        interface: String,
    },
    /// Looking up the interface failed.
    #[error(
        "cannot look up interface {interface}: {source}{}",
        hint(source, "CAP_NET_ADMIN")
    )]
    Lookup {
        /// The configured interface name.
        interface: String,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// Listing the host's addresses or links failed.
    #[error("cannot list the addresses of this host: {source}")]
    List {
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// Adding the address failed.
    #[error(
        "cannot add {addr}/{prefix_len} to {interface}: {source}{}",
        hint(source, "CAP_NET_ADMIN")
    )]
    Add {
        /// The service address.
        addr: IpAddr,
        /// Its prefix length.
        prefix_len: u8,
        /// The interface.
        interface: String,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// Removing the address failed.
    #[error(
        "cannot remove {addr} from {interface}: {source}{}",
        hint(source, "CAP_NET_ADMIN")
    )]
    Remove {
        /// The service address.
        addr: IpAddr,
        /// The interface.
        interface: String,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// Removing the address would remove the other addresses of its subnet too, and that could
    /// not be prevented.
    #[error("cannot remove {addr} from {interface} without removing the other addresses of its subnet: turning on promote_secondaries failed: {source}")]
    Secondaries {
        /// The service address.
        addr: IpAddr,
        /// The interface.
        interface: String,
        /// Why the setting could not be written.
        #[source]
        source: io::Error,
    },
    /// The announcer thread could not be started.
    #[error("cannot start announcing {addr}: {source}")]
    Announcer {
        /// The service address.
        addr: IpAddr,
        /// Why the thread did not start.
        #[source]
        source: io::Error,
    },
}

/// Names the capability a permission error points at.
fn hint(err: &io::Error, capability: &str) -> String {
    match err.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => format!(" (the agent needs {capability})"),
        _ => String::new(),
    }
}

/// What [`Vip::claim`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Claimed {
    /// The address was added to the interface.
    Added,
    /// The address was on the interface already (a repeated claim, or left by an earlier run).
    AlreadyPresent,
}

/// Counters and state of one service address, for status pages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VipStats {
    /// The interface.
    pub interface: String,
    /// The service address.
    pub addr: IpAddr,
    /// Its prefix length.
    pub prefix_len: u8,
    /// Whether this handle holds the address (claimed and not released).
    pub claimed: bool,
    /// When the current claim began, in milliseconds since the Unix epoch.
    pub held_since_unix_ms: Option<u64>,
    /// Announcements sent since the handle was made.
    pub announcements_sent: u64,
    /// Announcements that failed since the handle was made.
    pub announce_errors: u64,
    /// The text of the latest failure.
    pub last_error: Option<String>,
}

/// An address of this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LocalAddress {
    /// The interface it is on.
    pub interface: String,
    /// The address.
    pub addr: IpAddr,
    /// Its prefix length.
    pub prefix_len: u8,
}

/// The link the address lives on, as resolved last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LinkInfo {
    index: u32,
    mac: [u8; 6],
}

/// The service address of this appliance: claim it when the local instance takes control,
/// release it when control leaves. See the crate documentation.
pub struct Vip {
    config: VipConfig,
    link: Mutex<LinkInfo>,
    /// The running announcer; `Some` while claimed. Its lock also serialises claim and release.
    announcer: Mutex<Option<(Announcer, Target)>>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for Vip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vip").field("config", &self.config).finish()
    }
}

fn resolve(interface: &str) -> Result<LinkInfo, VipError> {
    let link = netlink::link_by_name(interface)
        .map_err(|source| VipError::Lookup {
            interface: interface.to_owned(),
            source,
        })?
        .ok_or_else(|| VipError::InterfaceNotFound {
            interface: interface.to_owned(),
        })?;
    let mac: [u8; 6] = link
        .hw_addr
        .as_slice()
        .try_into()
        .ok()
        .filter(|m| *m != [0u8; 6])
        .ok_or_else(|| VipError::NoEthernetAddress {
            interface: interface.to_owned(),
        })?;
    Ok(LinkInfo {
        index: link.index,
        mac,
    })
}

fn index_of(interface: &str) -> Result<u32, VipError> {
    netlink::link_by_name(interface)
        .map_err(|source| VipError::Lookup {
            interface: interface.to_owned(),
            source,
        })?
        .map(|l| l.index)
        .ok_or_else(|| VipError::InterfaceNotFound {
            interface: interface.to_owned(),
        })
}

/// Removes every entry of `addr` from the link (Linux allows one address with several
/// prefixes); true if there was one.
fn remove_all(interface: &str, index: u32, addr: IpAddr) -> Result<bool, VipError> {
    let remove_err = |source| VipError::Remove {
        addr,
        interface: interface.to_owned(),
        source,
    };
    let present = netlink::addresses(Some(index)).map_err(remove_err)?;
    let mut removed = false;
    for a in present.iter().filter(|a| a.addr == addr) {
        if has_dependent_secondaries(a, &present) {
            keep_secondaries(interface, addr)?;
        }
        removed |= netlink::delete_address(index, addr, a.prefix_len).map_err(remove_err)?;
    }
    Ok(removed)
}

/// Whether deleting `entry` would take other addresses with it: Linux deletes the secondary
/// addresses of a subnet with its primary address unless `promote_secondaries` is on. The
/// service address is a primary when it was added before the host's own address of the same
/// subnet (after the host's address was re-added, say).
fn has_dependent_secondaries(entry: &netlink::Addr, present: &[netlink::Addr]) -> bool {
    let IpAddr::V4(primary) = entry.addr else {
        return false;
    };
    if entry.secondary {
        return false;
    }
    let mask = u32::MAX
        .checked_shl(32 - u32::from(entry.prefix_len))
        .unwrap_or(0);
    present.iter().any(|other| match other.addr {
        IpAddr::V4(o) => {
            other.secondary
                && other.prefix_len == entry.prefix_len
                && u32::from(o) & mask == u32::from(primary) & mask
        }
        IpAddr::V6(_) => false,
    })
}

/// Turns on `promote_secondaries` for the interface so that removing the service address
/// keeps the other addresses of its subnet.
fn keep_secondaries(interface: &str, addr: IpAddr) -> Result<(), VipError> {
    let path = format!("/proc/sys/net/ipv4/conf/{interface}/promote_secondaries");
    let on = std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "1");
    if !on {
        std::fs::write(&path, "1\n").map_err(|source| VipError::Secondaries {
            addr,
            interface: interface.to_owned(),
            source,
        })?;
        tracing::info!(interface, %addr,
            "turned on promote_secondaries so that removing the service address keeps the other addresses of its subnet");
    }
    Ok(())
}

impl Vip {
    /// Validates the configuration and resolves the interface (its index and MAC) now: a
    /// missing interface is [`VipError::InterfaceNotFound`].
    pub fn new(config: VipConfig) -> Result<Self, VipError> {
        config.validate()?;
        let link = resolve(&config.interface)?;
        Ok(Vip {
            config,
            link: Mutex::new(link),
            announcer: Mutex::new(None),
            counters: Arc::new(Counters::default()),
        })
    }

    /// The configuration this handle was made with.
    pub fn config(&self) -> &VipConfig {
        &self.config
    }

    /// Adds the address to the interface (already present is fine) and starts announcing it: a
    /// burst, then a refresh every `refresh_ms`, until [`Vip::release`] or drop. Claiming a
    /// held address again sends a fresh burst.
    ///
    /// The interface is resolved again, so an interface recreated since [`Vip::new`] (a new
    /// index or MAC) is used as it is now.
    pub fn claim(&self) -> Result<Claimed, VipError> {
        let mut announcer = lock(&self.announcer);
        let cfg = &self.config;
        let link = resolve(&cfg.interface)?;
        *lock(&self.link) = link;
        let added =
            netlink::add_address(link.index, cfg.addr, cfg.prefix_len).map_err(|source| {
                tracing::error!(vip = %cfg, error = %source, "cannot add the service address");
                VipError::Add {
                    addr: cfg.addr,
                    prefix_len: cfg.prefix_len,
                    interface: cfg.interface.clone(),
                    source,
                }
            })?;
        let claimed = match added {
            netlink::Added::Added => Claimed::Added,
            netlink::Added::AlreadyPresent => Claimed::AlreadyPresent,
        };
        let target = Target {
            ifindex: link.index,
            mac: link.mac,
            addr: cfg.addr,
        };
        match announcer.as_ref() {
            Some((running, t)) if *t == target => running.burst(),
            _ => {
                if let Some((old, _)) = announcer.take() {
                    old.stop();
                }
                match Announcer::start(target, cfg.announce, Arc::clone(&self.counters)) {
                    Ok(a) => *announcer = Some((a, target)),
                    Err(source) => {
                        // Leave the interface as it was found.
                        if claimed == Claimed::Added {
                            if let Err(e) =
                                netlink::delete_address(link.index, cfg.addr, cfg.prefix_len)
                            {
                                tracing::warn!(vip = %cfg, error = %e,
                                    "cannot take back the address after the announcer failed");
                            }
                        }
                        *lock(&self.counters.held_since) = None;
                        return Err(VipError::Announcer {
                            addr: cfg.addr,
                            source,
                        });
                    }
                }
            }
        }
        lock(&self.counters.held_since).get_or_insert_with(SystemTime::now);
        if claimed == Claimed::Added {
            tracing::info!(vip = %cfg, outcome = ?claimed, "claimed the service address");
        } else {
            // Re-asserted while held (after every route re-assertion): not news.
            tracing::debug!(vip = %cfg, outcome = ?claimed, "claimed the service address");
        }
        Ok(claimed)
    }

    /// Sends one more burst now (restarting a burst in progress). The agent calls it when the
    /// peer link returns after a split, so clients that followed the other side come back.
    /// Does nothing when the address is not claimed.
    pub fn announce_now(&self) {
        match lock(&self.announcer).as_ref() {
            Some((a, _)) => {
                tracing::info!(vip = %self.config, "announcing the service address again");
                a.burst();
            }
            None => {
                tracing::debug!(vip = %self.config, "not claimed: nothing to announce");
            }
        }
    }

    /// Stops announcing (the announcer thread ends within a bound) and then removes the
    /// address from the interface (absent, or the interface gone, is fine). Announcements stop
    /// first so that this host never contradicts the new holder, even when the removal fails.
    pub fn release(&self) -> Result<(), VipError> {
        let mut announcer = lock(&self.announcer);
        if let Some((a, _)) = announcer.take() {
            a.stop();
        }
        *lock(&self.counters.held_since) = None;
        let cfg = &self.config;
        let index = match index_of(&cfg.interface) {
            Ok(i) => i,
            Err(VipError::InterfaceNotFound { .. }) => {
                tracing::info!(vip = %cfg, "released the service address (the interface is gone)");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let removed = remove_all(&cfg.interface, index, cfg.addr).inspect_err(|e| {
            tracing::error!(vip = %cfg, error = %e, "cannot remove the service address");
        })?;
        tracing::info!(vip = %cfg, removed, "released the service address");
        Ok(())
    }

    /// Whether the address is on the interface now (with any prefix).
    pub fn is_held(&self) -> Result<bool, VipError> {
        let index = index_of(&self.config.interface)?;
        let present =
            netlink::addresses(Some(index)).map_err(|source| VipError::List { source })?;
        Ok(present.iter().any(|a| a.addr == self.config.addr))
    }

    /// Counters and state for status pages.
    pub fn stats(&self) -> VipStats {
        let held_since = *lock(&self.counters.held_since);
        VipStats {
            interface: self.config.interface.clone(),
            addr: self.config.addr,
            prefix_len: self.config.prefix_len,
            claimed: held_since.is_some(),
            held_since_unix_ms: held_since.map(|t| {
                t.duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64)
            }),
            announcements_sent: self.counters.sent.load(Ordering::Relaxed),
            announce_errors: self.counters.errors.load(Ordering::Relaxed),
            last_error: lock(&self.counters.last_error).clone(),
        }
    }
}

impl Drop for Vip {
    /// Stops the announcer and leaves the address where it is: see the crate documentation.
    fn drop(&mut self) {
        let announcer = self
            .announcer
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some((a, _)) = announcer {
            tracing::info!(vip = %self.config,
                "handle dropped while claimed: announcements stop, the address stays");
            a.stop();
        }
    }
}

/// Removes `addr` from `interface` if it is there (with any prefix); true if it was. The agent
/// calls it at start for an address an earlier run may have left behind.
pub fn remove_stale(interface: &str, addr: IpAddr) -> Result<bool, VipError> {
    config::validate_interface_name(interface)?;
    let index = index_of(interface)?;
    let removed = remove_all(interface, index, addr)?;
    if removed {
        tracing::info!(%addr, interface, "removed a stale service address");
    }
    Ok(removed)
}

/// Every address of this host (of the calling thread's network namespace).
pub fn local_addresses() -> Result<Vec<LocalAddress>, VipError> {
    let links = netlink::links().map_err(|source| VipError::List { source })?;
    let addrs = netlink::addresses(None).map_err(|source| VipError::List { source })?;
    Ok(addrs
        .into_iter()
        .map(|a| LocalAddress {
            interface: links
                .iter()
                .find(|l| l.index == a.index)
                .map_or_else(|| format!("#{}", a.index), |l| l.name.clone()),
            addr: a.addr,
            prefix_len: a.prefix_len,
        })
        .collect())
}

/// Whether `addr` is an address of this host. The agent refuses at start a configuration that
/// names an address the host does not have.
pub fn is_local(addr: IpAddr) -> Result<bool, VipError> {
    let addrs = netlink::addresses(None).map_err(|source| VipError::List { source })?;
    Ok(addrs.iter().any(|a| a.addr == addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handle_can_be_shared_with_blocking_tasks() {
        fn send_sync<T: Send + Sync + 'static>() {}
        send_sync::<Vip>();
        send_sync::<VipError>();
    }

    #[test]
    fn permission_errors_name_the_capability() {
        let err = VipError::Add {
            addr: "198.18.0.10".parse().unwrap(),
            prefix_len: 24,
            interface: "eth0".into(),
            source: io::Error::from_raw_os_error(libc::EPERM),
        };
        assert_eq!(
            err.to_string(),
            "cannot add 198.18.0.10/24 to eth0: Operation not permitted (os error 1) (the agent needs CAP_NET_ADMIN)"
        );
        let err = VipError::Remove {
            addr: "198.18.0.10".parse().unwrap(),
            interface: "eth0".into(),
            source: io::Error::from_raw_os_error(libc::ENOBUFS),
        };
        assert!(!err.to_string().contains("CAP_"));
    }

    fn entry(addr: &str, prefix_len: u8, secondary: bool) -> netlink::Addr {
        netlink::Addr {
            index: 2,
            addr: addr.parse().unwrap(),
            prefix_len,
            secondary,
        }
    }

    #[test]
    fn only_a_primary_with_secondaries_of_its_subnet_has_dependents() {
        let vip = entry("198.18.0.10", 24, false);
        let own = entry("198.18.0.2", 24, true);
        let other_subnet = entry("198.19.0.2", 24, false);
        assert!(has_dependent_secondaries(&vip, &[vip.clone(), own.clone()]));
        assert!(!has_dependent_secondaries(
            &vip,
            &[vip.clone(), other_subnet]
        ));
        // A secondary service address takes nothing with it.
        let vip2 = entry("198.18.0.10", 24, true);
        let own2 = entry("198.18.0.2", 24, false);
        assert!(!has_dependent_secondaries(&vip2, &[own2, vip2.clone()]));
        // A /32 has no secondaries; /0 covers everything.
        let host = entry("198.18.0.10", 32, false);
        assert!(!has_dependent_secondaries(
            &host,
            &[host.clone(), own.clone()]
        ));
        let all = entry("198.18.0.10", 0, false);
        assert!(has_dependent_secondaries(
            &all,
            &[all.clone(), entry("10.1.2.3", 0, true)]
        ));
        let v6 = entry("2001:db8::10", 64, false);
        assert!(!has_dependent_secondaries(&v6, std::slice::from_ref(&v6)));
    }

    #[test]
    fn a_bad_config_is_refused_before_touching_the_kernel() {
        let err = Vip::new(VipConfig {
            interface: "eth0:1".into(),
            addr: "198.18.0.10".parse().unwrap(),
            prefix_len: 24,
            announce: AnnounceConfig::default(),
        })
        .unwrap_err();
        assert!(matches!(
            err,
            VipError::Config(ConfigError::InterfaceName { .. })
        ));
        assert_eq!(
            err.to_string(),
            "invalid service address configuration: \"eth0:1\" is not a valid interface name: it contains ':'"
        );
    }
}
