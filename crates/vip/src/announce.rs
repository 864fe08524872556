//! Announcements: gratuitous ARP (IPv4) and unsolicited neighbour advertisements (IPv6), the
//! frames, the raw sockets that send them, and the background thread that sends bursts and
//! refreshes.
//!
//! IPv4 uses the *request* form of gratuitous ARP (RFC 5227 "ARP announcement": opcode 1,
//! sender and target protocol address both the service address, target hardware address zero,
//! to the Ethernet broadcast address). Every host that already has an entry for the address
//! updates it (RFC 826's merge rule applies to requests and replies alike, and Linux does so by
//! default), and the request form is the one RFC 5227 specifies for announcing; the reply form
//! carries a target hardware address that some stacks check against their own, and reports
//! of VIP tools that switched to replies only and then saw caches not updated exist. One form,
//! sent several times, keeps the count of frames equal to the configured burst.
//!
//! IPv6 sends a neighbour advertisement with the override flag and without the solicited
//! flag, the target link-layer address option carrying the interface's MAC, from the service
//! address to the all-nodes group ff02::1 with hop limit 255 (RFC 4861 7.2.6).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crate::config::AnnounceConfig;

/// Length of a gratuitous ARP frame without Ethernet padding (14 + 28 bytes).
pub const ARP_FRAME_LEN: usize = 42;
/// Length of a neighbour advertisement with a target link-layer address option.
pub const NA_LEN: usize = 32;

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IP: u16 = 0x0800;
const ARP_HTYPE_ETHERNET: u16 = 1;
const ARP_OP_REQUEST: u16 = 1;
const ICMPV6_NEIGHBOUR_ADVERTISEMENT: u8 = 136;
const NA_FLAG_OVERRIDE: u8 = 0x20;
const ND_OPT_TARGET_LINK_LAYER_ADDRESS: u8 = 2;
/// `ICMP6_FILTER` from `<netinet/icmp6.h>` (level `IPPROTO_ICMPV6`).
const ICMP6_FILTER: libc::c_int = 1;
/// The all-nodes link-local multicast group.
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// Longest wait for the announcer thread to end after it is told to stop.
pub(crate) const STOP_JOIN_BOUND: Duration = Duration::from_secs(2);
/// Longest sleep of the announcer thread when it has nothing scheduled (it wakes earlier on
/// every request).
const IDLE_WAIT: Duration = Duration::from_secs(3600);

/// A gratuitous ARP request announcing that `ip` is at `mac`.
pub fn gratuitous_arp(mac: [u8; 6], ip: Ipv4Addr) -> [u8; ARP_FRAME_LEN] {
    let mut f = [0u8; ARP_FRAME_LEN];
    // Ethernet: broadcast destination, our source, type ARP.
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    // ARP: Ethernet / IPv4, 6 / 4 byte addresses, request.
    f[14..16].copy_from_slice(&ARP_HTYPE_ETHERNET.to_be_bytes());
    f[16..18].copy_from_slice(&ETH_P_IP.to_be_bytes());
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&ARP_OP_REQUEST.to_be_bytes());
    // Sender hardware and protocol address: our MAC, the service address.
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip.octets());
    // Target hardware address (32..38) stays zero; target protocol address: the same address.
    f[38..42].copy_from_slice(&ip.octets());
    f
}

/// An unsolicited neighbour advertisement (ICMPv6 part only) announcing that `target` is at
/// `mac`, override flag set. The checksum is left zero: the kernel computes it for raw ICMPv6
/// sockets.
pub fn neighbour_advertisement(mac: [u8; 6], target: Ipv6Addr) -> [u8; NA_LEN] {
    let mut p = [0u8; NA_LEN];
    p[0] = ICMPV6_NEIGHBOUR_ADVERTISEMENT;
    // Code (1) and checksum (2..4) stay zero: the kernel fills in the checksum.
    // Flags: router 0, solicited 0, override 1.
    p[4] = NA_FLAG_OVERRIDE;
    p[8..24].copy_from_slice(&target.octets());
    p[24] = ND_OPT_TARGET_LINK_LAYER_ADDRESS;
    p[25] = 1; // option length in units of 8 bytes
    p[26..32].copy_from_slice(&mac);
    p
}

/// What to announce where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Target {
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub addr: IpAddr,
}

/// A socket able to send the announcement of one target.
pub(crate) enum Sender {
    /// `AF_PACKET`/`SOCK_RAW` with protocol 0: sends whole Ethernet frames, receives nothing.
    Arp {
        fd: OwnedFd,
        frame: [u8; ARP_FRAME_LEN],
    },
    /// `AF_INET6`/`SOCK_RAW`/`IPPROTO_ICMPV6` bound to the service address, every ICMPv6 type
    /// filtered out on receive.
    Na { fd: OwnedFd, packet: [u8; NA_LEN] },
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn setsockopt<T>(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `fd` is an open descriptor owned by the caller; `value` points to a live `T`
    // whose exact size is passed, and the kernel only reads it during the call.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    })
    .map(drop)
}

fn socket(domain: libc::c_int, ty: libc::c_int, protocol: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes plain integers and returns a new descriptor or -1.
    let fd = check(unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, protocol) })?;
    // SAFETY: `fd` was just returned by socket(2), is open and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr_in6(addr: Ipv6Addr, scope_id: u32) -> libc::sockaddr_in6 {
    // SAFETY: sockaddr_in6 is plain old data; all zero bytes is a valid value.
    let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    sa.sin6_addr.s6_addr = addr.octets();
    sa.sin6_scope_id = scope_id;
    sa
}

impl Sender {
    pub(crate) fn open(target: &Target) -> io::Result<Sender> {
        match target.addr {
            IpAddr::V4(ip) => {
                let fd = socket(libc::AF_PACKET, libc::SOCK_RAW, 0)?;
                Ok(Sender::Arp {
                    fd,
                    frame: gratuitous_arp(target.mac, ip),
                })
            }
            IpAddr::V6(ip) => {
                let fd = socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6)?;
                // Receive nothing: every bit set blocks that ICMPv6 type.
                setsockopt(&fd, libc::IPPROTO_ICMPV6, ICMP6_FILTER, &[u32::MAX; 8])?;
                let hops: libc::c_int = 255;
                setsockopt(&fd, libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_HOPS, &hops)?;
                setsockopt(&fd, libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, &hops)?;
                let ifindex = target.ifindex as libc::c_int;
                setsockopt(&fd, libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_IF, &ifindex)?;
                let no_loop: libc::c_int = 0;
                setsockopt(&fd, libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_LOOP, &no_loop)?;
                // Source address: the service address itself.
                let sa = sockaddr_in6(ip, target.ifindex);
                // SAFETY: `fd` is open; `sa` is a valid sockaddr_in6 whose exact size is passed.
                check(unsafe {
                    libc::bind(
                        fd.as_raw_fd(),
                        (&sa as *const libc::sockaddr_in6).cast(),
                        std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                    )
                })?;
                Ok(Sender::Na {
                    fd,
                    packet: neighbour_advertisement(target.mac, ip),
                })
            }
        }
    }

    /// Sends one announcement without blocking.
    pub(crate) fn send(&self, ifindex: u32) -> io::Result<()> {
        let (rc, len) = match self {
            Sender::Arp { fd, frame } => {
                // SAFETY: sockaddr_ll is plain old data; all zero bytes is a valid value.
                let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                sll.sll_family = libc::AF_PACKET as libc::c_ushort;
                sll.sll_protocol = ETH_P_ARP.to_be();
                sll.sll_ifindex = ifindex as libc::c_int;
                sll.sll_halen = 6;
                sll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
                // SAFETY: `fd` is open; `frame` is a live buffer of the given length; `sll`
                // is a valid sockaddr_ll whose exact size is passed.
                let rc = unsafe {
                    libc::sendto(
                        fd.as_raw_fd(),
                        frame.as_ptr().cast(),
                        frame.len(),
                        libc::MSG_DONTWAIT,
                        (&sll as *const libc::sockaddr_ll).cast(),
                        std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                    )
                };
                (rc, frame.len())
            }
            Sender::Na { fd, packet } => {
                let sa = sockaddr_in6(ALL_NODES, ifindex);
                // SAFETY: `fd` is open; `packet` is a live buffer of the given length; `sa` is
                // a valid sockaddr_in6 whose exact size is passed.
                let rc = unsafe {
                    libc::sendto(
                        fd.as_raw_fd(),
                        packet.as_ptr().cast(),
                        packet.len(),
                        libc::MSG_DONTWAIT,
                        (&sa as *const libc::sockaddr_in6).cast(),
                        std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                    )
                };
                (rc, packet.len())
            }
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        if rc as usize != len {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("sent {rc} of {len} bytes"),
            ));
        }
        Ok(())
    }
}

/// Counters shared between the handle and the announcer thread.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub sent: AtomicU64,
    pub errors: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    pub held_since: Mutex<Option<SystemTime>>,
}

impl Counters {
    fn record_error(&self, target: &Target, err: &io::Error) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let text = err.to_string();
        let mut last = lock(&self.last_error);
        // The same failure repeats on every tick: warn when it changes, not every time.
        if last.as_deref() != Some(text.as_str()) {
            tracing::warn!(addr = %target.addr, ifindex = target.ifindex, error = %text,
                "cannot announce the service address");
        } else {
            tracing::debug!(addr = %target.addr, error = %text, "announcement failed again");
        }
        *last = Some(text);
    }
}

/// Locks a mutex whose data stays consistent even if a holder panicked (counters and flags).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Debug, Default)]
struct Control {
    stop: bool,
    burst_requested: bool,
}

#[derive(Debug, Default)]
struct Shared {
    control: Mutex<Control>,
    wake: Condvar,
}

/// The background thread announcing one target: a burst at start, a burst on request, a
/// refresh in between.
pub(crate) struct Announcer {
    shared: Arc<Shared>,
    handle: Option<JoinHandle<()>>,
}

impl Announcer {
    pub(crate) fn start(
        target: Target,
        config: AnnounceConfig,
        counters: Arc<Counters>,
    ) -> io::Result<Announcer> {
        let shared = Arc::new(Shared::default());
        let thread_shared = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name(format!("vip-announce-{}", target.addr))
            .spawn(move || run(target, config, &thread_shared, &counters))?;
        Ok(Announcer {
            shared,
            handle: Some(handle),
        })
    }

    /// Asks for one more burst (restarting one in progress).
    pub(crate) fn burst(&self) {
        lock(&self.shared.control).burst_requested = true;
        self.shared.wake.notify_all();
    }

    /// Stops the thread and waits for it at most [`STOP_JOIN_BOUND`]; a thread that does not
    /// end in time is left to end on its own (it sends nothing more once it sees the flag).
    pub(crate) fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        lock(&self.shared.control).stop = true;
        self.shared.wake.notify_all();
        let Some(handle) = self.handle.take() else {
            return;
        };
        let deadline = Instant::now() + STOP_JOIN_BOUND;
        while !handle.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        if handle.is_finished() {
            if handle.join().is_err() {
                tracing::error!("the announcer thread panicked");
            }
        } else {
            tracing::warn!(
                "the announcer thread did not end within {STOP_JOIN_BOUND:?}; it is left to end on its own"
            );
        }
    }
}

impl Drop for Announcer {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

fn run(target: Target, config: AnnounceConfig, shared: &Shared, counters: &Counters) {
    let interval = Duration::from_millis(config.burst_interval_ms);
    let refresh = (config.refresh_ms > 0).then(|| Duration::from_millis(config.refresh_ms));
    let mut sender: Option<Sender> = None;
    let mut burst_left = config.burst;
    let mut next_send = Some(Instant::now());

    loop {
        {
            let mut control = lock(&shared.control);
            loop {
                if control.stop {
                    return;
                }
                if control.burst_requested {
                    control.burst_requested = false;
                    burst_left = config.burst;
                    next_send = Some(Instant::now());
                }
                let now = Instant::now();
                match next_send {
                    Some(at) if at <= now => break,
                    Some(at) => {
                        control = shared
                            .wake
                            .wait_timeout(control, at - now)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                    }
                    None => {
                        control = shared
                            .wake
                            .wait_timeout(control, IDLE_WAIT)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                    }
                }
            }
        }

        send_one(&target, &mut sender, counters);
        let now = Instant::now();
        burst_left = burst_left.saturating_sub(1);
        next_send = if burst_left > 0 {
            Some(now + interval)
        } else {
            refresh.map(|r| now + r)
        };
    }
}

fn send_one(target: &Target, sender: &mut Option<Sender>, counters: &Counters) {
    if sender.is_none() {
        match Sender::open(target) {
            Ok(s) => *sender = Some(s),
            Err(e) => return counters.record_error(target, &e),
        }
    }
    let Some(s) = sender.as_ref() else { return };
    match s.send(target.ifindex) {
        Ok(()) => {
            counters.sent.fetch_add(1, Ordering::Relaxed);
            tracing::trace!(addr = %target.addr, "announced the service address");
        }
        Err(e) => {
            counters.record_error(target, &e);
            // Open a fresh socket next time (the address or the interface may have changed).
            *sender = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0x00, 0x5e, 0x10, 0x20, 0x30];

    #[test]
    fn gratuitous_arp_frame_bytes_are_exact() {
        let f = gratuitous_arp(MAC, Ipv4Addr::new(198, 18, 0, 10));
        #[rustfmt::skip]
        let expected: [u8; ARP_FRAME_LEN] = [
            // Ethernet: broadcast <- MAC, ARP
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x02, 0x00, 0x5e, 0x10, 0x20, 0x30,
            0x08, 0x06,
            // htype 1, ptype IPv4, hlen 6, plen 4, op request
            0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01,
            // sender MAC, sender IP
            0x02, 0x00, 0x5e, 0x10, 0x20, 0x30, 198, 18, 0, 10,
            // target MAC (zero), target IP (the same address)
            0, 0, 0, 0, 0, 0, 198, 18, 0, 10,
        ];
        assert_eq!(f, expected);
    }

    #[test]
    fn neighbour_advertisement_bytes_are_exact() {
        let target: Ipv6Addr = "2001:db8::10".parse().unwrap();
        let p = neighbour_advertisement(MAC, target);
        #[rustfmt::skip]
        let expected: [u8; NA_LEN] = [
            136, 0, 0, 0,              // type NA, code 0, checksum (kernel)
            0x20, 0, 0, 0,             // R=0 S=0 O=1, reserved
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, // target
            2, 1, 0x02, 0x00, 0x5e, 0x10, 0x20, 0x30, // target link-layer address option
        ];
        assert_eq!(p, expected);
    }

    #[test]
    fn a_stopped_announcer_that_cannot_send_ends_quickly_and_counts_errors() {
        // Interface index u32::MAX names no interface: every send fails, the thread keeps going
        // and ends on stop.
        let counters = Arc::new(Counters::default());
        let target = Target {
            ifindex: u32::MAX,
            mac: MAC,
            addr: "198.18.0.10".parse().unwrap(),
        };
        let config = AnnounceConfig {
            burst: 3,
            burst_interval_ms: 10,
            refresh_ms: 0,
        };
        let a = Announcer::start(target, config, Arc::clone(&counters)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while counters.errors.load(Ordering::Relaxed) + counters.sent.load(Ordering::Relaxed) < 3
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        let started = Instant::now();
        a.stop();
        assert!(started.elapsed() < STOP_JOIN_BOUND);
        assert_eq!(
            counters.errors.load(Ordering::Relaxed) + counters.sent.load(Ordering::Relaxed),
            3,
            "a burst of 3 and no refresh makes exactly 3 attempts"
        );
        if counters.errors.load(Ordering::Relaxed) > 0 {
            assert!(lock(&counters.last_error).is_some());
        }
    }
}
