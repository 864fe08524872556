//! Synchronous routing netlink (rtnetlink): look up links, list, add and delete addresses.
//!
//! Every request opens its own socket, carries `NLM_F_ACK` (or is a dump) and waits for the
//! kernel's acknowledgement, error or end of dump under a deadline, reading a bounded number of
//! datagrams. Errors come back as `io::Error` with the kernel's errno; the caller names the
//! action.

use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE,
    NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage,
};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// Longest wait for the kernel's answer to one request (all of a dump's parts included).
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Longest wait for one datagram (the socket's receive timeout).
const RECV_TIMEOUT: Duration = Duration::from_secs(1);
/// Most datagrams read for one request; a dump of a host with very many addresses takes a few
/// hundred.
const MAX_DATAGRAMS: usize = 100_000;
/// Most messages collected from one dump.
const MAX_MESSAGES: usize = 1_000_000;
/// Most attempts at a dump the kernel reports as interrupted by a concurrent change.
const DUMP_ATTEMPTS: usize = 3;

/// A link as the kernel describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Link {
    pub index: u32,
    pub name: String,
    /// The link-layer address; empty for links without one.
    pub hw_addr: Vec<u8>,
}

/// One address of one link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Addr {
    pub index: u32,
    pub addr: IpAddr,
    pub prefix_len: u8,
    /// IPv4: a secondary address (another address of the same subnet came first).
    pub secondary: bool,
}

/// Outcome of an add whose address may already be there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Added {
    Added,
    AlreadyPresent,
}

struct Rtnl {
    socket: Socket,
    seq: u32,
}

impl Rtnl {
    fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        set_recv_timeout(&socket, RECV_TIMEOUT)?;
        Ok(Rtnl { socket, seq: 0 })
    }

    /// Sends one request and collects the messages of its answer. A request that is not a dump
    /// is acknowledged by the kernel; a dump ends with `NLMSG_DONE`.
    /// A dump, tried again (a bounded number of times) when the kernel reports that it was
    /// interrupted by a concurrent change.
    fn dump(&mut self, message: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
        let mut attempt = 1;
        loop {
            match self.request(message.clone(), true, 0) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted && attempt < DUMP_ATTEMPTS => {
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    fn request(
        &mut self,
        message: RouteNetlinkMessage,
        dump: bool,
        extra_flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | extra_flags | if dump { NLM_F_DUMP } else { NLM_F_ACK };
        header.sequence_number = seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        let sent = self.socket.send(&buf, 0)?;
        if sent != buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("the kernel took {sent} of {} bytes", buf.len()),
            ));
        }

        let deadline = Instant::now() + REQUEST_DEADLINE;
        let mut answer = Vec::new();
        let mut interrupted = false;
        for _ in 0..MAX_DATAGRAMS {
            if Instant::now() >= deadline {
                break;
            }
            let (datagram, _) = match self.socket.recv_from_full() {
                Ok(d) => d,
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut
                        || e.kind() == io::ErrorKind::Interrupted =>
                {
                    continue
                }
                Err(e) => return Err(e),
            };
            let mut offset = 0;
            while offset < datagram.len() {
                let part = &datagram[offset..];
                let len = NetlinkBuffer::new_checked(part)
                    .map_err(|e| invalid_data(format!("a malformed netlink message: {e}")))?
                    .length() as usize;
                if len == 0 || len > part.len() {
                    return Err(invalid_data(format!(
                        "a netlink message of {len} bytes in {} bytes",
                        part.len()
                    )));
                }
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&part[..len])
                    .map_err(|e| invalid_data(format!("an unreadable netlink message: {e}")))?;
                // Messages are 4-byte aligned within a datagram.
                offset += (len + 3) & !3;
                if msg.header.sequence_number != seq {
                    continue;
                }
                interrupted |= msg.header.flags & NLM_F_DUMP_INTR != 0;
                match msg.payload {
                    NetlinkPayload::Error(err) => {
                        return match err.code {
                            None => Ok(answer),
                            Some(code) => Err(io::Error::from_raw_os_error(code.get().abs())),
                        };
                    }
                    NetlinkPayload::Done(done) => {
                        return if done.code != 0 {
                            Err(io::Error::from_raw_os_error(done.code.abs()))
                        } else if interrupted {
                            Err(io::Error::new(
                                io::ErrorKind::Interrupted,
                                "the kernel's tables changed while they were read",
                            ))
                        } else {
                            Ok(answer)
                        };
                    }
                    NetlinkPayload::InnerMessage(inner) => {
                        if answer.len() >= MAX_MESSAGES {
                            return Err(invalid_data(format!(
                                "more than {MAX_MESSAGES} messages in one answer"
                            )));
                        }
                        answer.push(inner);
                    }
                    NetlinkPayload::Overrun(_) => {
                        return Err(invalid_data("the kernel reported an overrun".to_owned()))
                    }
                    _ => {}
                }
            }
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the kernel did not answer within {REQUEST_DEADLINE:?}"),
        ))
    }
}

fn invalid_data(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn set_recv_timeout(socket: &Socket, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: the descriptor is owned by `socket` and open for this call; `tv` is a valid
    // `timeval` that lives across the call and its exact size is passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn link_from(msg: LinkMessage) -> Option<Link> {
    let mut name = None;
    let mut hw_addr = Vec::new();
    for attr in msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => name = Some(n),
            LinkAttribute::Address(a) => hw_addr = a,
            _ => {}
        }
    }
    Some(Link {
        index: msg.header.index,
        name: name?,
        hw_addr,
    })
}

/// The link named `name`; `Ok(None)` when there is none.
pub(crate) fn link_by_name(name: &str) -> io::Result<Option<Link>> {
    let mut rtnl = Rtnl::open()?;
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
    match rtnl.request(RouteNetlinkMessage::GetLink(msg), false, 0) {
        Ok(answer) => Ok(answer.into_iter().find_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => link_from(l).filter(|l| l.name == name),
            _ => None,
        })),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Every link of the network namespace.
pub(crate) fn links() -> io::Result<Vec<Link>> {
    let mut rtnl = Rtnl::open()?;
    let answer = rtnl.dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))?;
    Ok(answer
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => link_from(l),
            _ => None,
        })
        .collect())
}

/// Every address of the network namespace, or of one link.
pub(crate) fn addresses(index: Option<u32>) -> io::Result<Vec<Addr>> {
    let mut rtnl = Rtnl::open()?;
    let answer = rtnl.dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))?;
    Ok(answer
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewAddress(a) => addr_from(a),
            _ => None,
        })
        .filter(|a| index.map_or(true, |i| a.index == i))
        .collect())
}

fn addr_from(msg: AddressMessage) -> Option<Addr> {
    // IFA_LOCAL is the address of this host (on point-to-point links IFA_ADDRESS is the
    // peer's); IPv6 usually sends IFA_ADDRESS only.
    let mut local = None;
    let mut address = None;
    for attr in msg.attributes {
        match attr {
            AddressAttribute::Local(a) => local = Some(a),
            AddressAttribute::Address(a) => address = Some(a),
            _ => {}
        }
    }
    Some(Addr {
        index: msg.header.index,
        addr: local.or(address)?,
        prefix_len: msg.header.prefix_len,
        secondary: msg.header.flags.contains(AddressHeaderFlags::Secondary),
    })
}

fn address_message(index: u32, addr: IpAddr, prefix_len: u8) -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.family = match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    msg.header.prefix_len = prefix_len;
    msg.header.index = index;
    msg.attributes.push(AddressAttribute::Local(addr));
    msg.attributes.push(AddressAttribute::Address(addr));
    msg
}

/// Adds `addr/prefix_len` to the link; `EEXIST` (the same address and prefix is there) is
/// [`Added::AlreadyPresent`]. IPv6 addresses skip duplicate address detection (`nodad`) so they
/// are usable at once: the address moves between the two appliances of a pair by design.
pub(crate) fn add_address(index: u32, addr: IpAddr, prefix_len: u8) -> io::Result<Added> {
    let mut msg = address_message(index, addr, prefix_len);
    if addr.is_ipv6() {
        msg.header.flags |= AddressHeaderFlags::Nodad;
        msg.attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    let mut rtnl = Rtnl::open()?;
    match rtnl.request(
        RouteNetlinkMessage::NewAddress(msg),
        false,
        NLM_F_CREATE | NLM_F_EXCL,
    ) {
        Ok(_) => Ok(Added::Added),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(Added::AlreadyPresent),
        Err(e) => Err(e),
    }
}

/// Deletes `addr/prefix_len` from the link; `Ok(false)` when it was not there
/// (`EADDRNOTAVAIL`).
pub(crate) fn delete_address(index: u32, addr: IpAddr, prefix_len: u8) -> io::Result<bool> {
    let msg = address_message(index, addr, prefix_len);
    let mut rtnl = Rtnl::open()?;
    match rtnl.request(RouteNetlinkMessage::DelAddress(msg), false, 0) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_messages_carry_family_prefix_index_and_the_address() {
        let msg = address_message(7, "198.18.0.10".parse().unwrap(), 24);
        assert_eq!(msg.header.family, AddressFamily::Inet);
        assert_eq!(msg.header.prefix_len, 24);
        assert_eq!(msg.header.index, 7);
        assert_eq!(
            addr_from(msg),
            Some(Addr {
                index: 7,
                addr: "198.18.0.10".parse().unwrap(),
                prefix_len: 24,
                secondary: false,
            })
        );
        let msg = address_message(3, "2001:db8::10".parse().unwrap(), 64);
        assert_eq!(msg.header.family, AddressFamily::Inet6);
    }

    #[test]
    fn the_local_address_wins_over_the_peer_address() {
        let mut msg = AddressMessage::default();
        msg.header.index = 2;
        msg.header.prefix_len = 32;
        msg.attributes
            .push(AddressAttribute::Address("10.0.0.2".parse().unwrap()));
        msg.attributes
            .push(AddressAttribute::Local("10.0.0.1".parse().unwrap()));
        assert_eq!(
            addr_from(msg).unwrap().addr,
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(addr_from(AddressMessage::default()), None);
    }
}
