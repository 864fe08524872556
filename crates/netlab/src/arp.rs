//! Announcing a moved address with gratuitous ARP.
//!
//! Linux sends no gratuitous ARP when an IPv4 address is added to an interface. When the
//! service address moves from one appliance to the other, the clients (and the witness, the
//! gateway) keep its old place in their neighbour tables and go on sending to the appliance that
//! gave it up, which drops the packets, until the entry expires and is probed again: about half
//! a minute with the kernel's default timers (34 s measured on this lab network). Whoever adds
//! the service address to an appliance's `eth0` announces it right after with [`announce`];
//! every host updates its entry at once (an existing entry always takes a gratuitous ARP; with
//! the `arp_accept=1` that [`crate::create`] sets, a host without one creates it), and the
//! bridge learns the new port of the address's MAC.

use std::io;
use std::mem;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::thread;
use std::time::Duration;

use crate::exec::{run_in, run_tool};
use crate::NetlabError;

/// How many announcements [`announce`] sends (one may be lost while a bridge port settles).
pub const ANNOUNCEMENTS: u32 = 3;
/// The pause between two announcements.
const ANNOUNCE_GAP: Duration = Duration::from_millis(50);

const ARP_REQUEST: u16 = 1;
const BROADCAST: [u8; 6] = [0xff; 6];

/// Sends [`ANNOUNCEMENTS`] gratuitous ARP requests for `addr` from `interface` inside `netns`
/// ("`addr` is at this interface's MAC"), broadcast on the link.
///
/// It does not check that `addr` is configured on the interface: announcing an address one
/// does not hold diverts its traffic, so call it only after adding the address.
pub fn announce(netns: &str, interface: &str, addr: Ipv4Addr) -> Result<(), NetlabError> {
    let out = run_tool(
        "ip",
        &["-j", "link", "show", "dev", interface],
        Some(netns),
        None,
    )?;
    let (ifindex, mac) = index_and_mac(&out).map_err(|reason| NetlabError::Output {
        command: format!("ip -j link show dev {interface} (in network namespace {netns})"),
        reason,
    })?;
    let packet = garp_packet(mac, addr);
    // The packet socket must be made inside the namespace: it sends on the interface of that
    // index in the namespace it belongs to.
    run_in(netns, || -> io::Result<()> {
        let socket = packet_socket()?;
        for n in 0..ANNOUNCEMENTS {
            if n > 0 {
                thread::sleep(ANNOUNCE_GAP);
            }
            send_broadcast(&socket, ifindex, &packet)?;
        }
        Ok(())
    })?
    .map_err(|source| NetlabError::Announce {
        netns: netns.to_string(),
        interface: interface.to_string(),
        addr,
        source,
    })?;
    tracing::debug!(%netns, %interface, %addr, "netlab: address announced");
    Ok(())
}

/// The interface index and MAC address in the output of `ip -j link show dev <interface>`.
fn index_and_mac(json: &str) -> Result<(i32, [u8; 6]), String> {
    let links: Vec<serde_json::Value> =
        serde_json::from_str(json).map_err(|e| format!("not a JSON array of links: {e}"))?;
    let link = links.first().ok_or("no link listed")?;
    let index = link
        .get("ifindex")
        .and_then(|i| i.as_i64())
        .and_then(|i| i32::try_from(i).ok())
        .ok_or_else(|| format!("no interface index in {link}"))?;
    let text = link
        .get("address")
        .and_then(|a| a.as_str())
        .ok_or_else(|| format!("no address in {link}"))?;
    Ok((index, parse_mac(text)?))
}

fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let bytes = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).map_err(|_| format!("{text:?} is not a MAC address")))
        .collect::<Result<Vec<u8>, String>>()?;
    bytes
        .try_into()
        .map_err(|_| format!("{text:?} is not a 6-byte MAC address"))
}

/// A gratuitous ARP request (RFC 5227 announcement form): sender and target protocol address
/// are both `addr`, the sender hardware address is `mac`, the target hardware address zero.
fn garp_packet(mac: [u8; 6], addr: Ipv4Addr) -> [u8; 28] {
    let mut p = [0u8; 28];
    p[0..2].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    p[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    p[4] = 6; // hardware address length
    p[5] = 4; // protocol address length
    p[6..8].copy_from_slice(&ARP_REQUEST.to_be_bytes());
    p[8..14].copy_from_slice(&mac);
    p[14..18].copy_from_slice(&addr.octets());
    // p[18..24]: target hardware address, zero
    p[24..28].copy_from_slice(&addr.octets());
    p
}

fn eth_p_arp() -> u16 {
    // ETH_P_ARP is 0x0806; it fits a u16.
    libc::ETH_P_ARP as u16
}

fn packet_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers; its result is checked before use.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            i32::from(eth_p_arp().to_be()),
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor socket(2) just returned; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn send_broadcast(socket: &OwnedFd, ifindex: i32, packet: &[u8]) -> io::Result<()> {
    let mut sll_addr = [0u8; 8];
    sll_addr[..6].copy_from_slice(&BROADCAST);
    let dest = libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as libc::c_ushort,
        sll_protocol: eth_p_arp().to_be(),
        sll_ifindex: ifindex,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 6,
        sll_addr,
    };
    // SAFETY: `packet` and `dest` are live for the whole call and the lengths passed are theirs;
    // the kernel only reads them. `socket` is an open descriptor owned by the caller.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&dest as *const libc::sockaddr_ll).cast(),
            mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    if sent as usize != packet.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("sent {sent} of {} bytes", packet.len()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packet_is_a_gratuitous_arp_request() {
        let mac = [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee];
        let p = garp_packet(mac, Ipv4Addr::new(198, 18, 0, 10));
        assert_eq!(
            p,
            [
                0, 1, 8, 0, 6, 4, 0, 1, // Ethernet/IPv4, request
                0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 198, 18, 0, 10, // sender
                0, 0, 0, 0, 0, 0, 198, 18, 0, 10, // target: same address
            ]
        );
    }

    #[test]
    fn index_and_mac_are_read_from_ip_json() {
        let json = r#"[{"ifindex":2,"ifname":"eth0","address":"aa:23:93:99:e5:a4"}]"#;
        assert_eq!(
            index_and_mac(json).unwrap(),
            (2, [0xaa, 0x23, 0x93, 0x99, 0xe5, 0xa4])
        );
        assert!(index_and_mac("[]").unwrap_err().contains("no link"));
        assert!(index_and_mac(r#"[{"ifindex":2,"address":"zz"}]"#)
            .unwrap_err()
            .contains("not a MAC"));
        assert!(index_and_mac(r#"[{"ifindex":2,"address":"aa:bb"}]"#)
            .unwrap_err()
            .contains("6-byte"));
        assert!(index_and_mac(r#"[{"address":"aa:bb:cc:dd:ee:ff"}]"#)
            .unwrap_err()
            .contains("interface index"));
    }
}
