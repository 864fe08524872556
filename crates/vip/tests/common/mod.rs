//! Throwaway network namespaces joined by a veth pair, per-thread namespace entry, and a raw
//! capture of what arrives on the far end.

#![allow(dead_code)]

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The interface holding the service address (in namespace `a`).
pub const IF_A: &str = "vipa0";
/// Its veth peer (in namespace `b`), where captures listen.
pub const IF_B: &str = "vipb0";

static NEXT: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip {args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Two namespaces `a` and `b`, `IF_A` in `a` wired to `IF_B` in `b`, both up. Deleted on drop
/// (also when a test panics).
pub struct Pair {
    pub a: String,
    pub b: String,
}

impl Pair {
    /// `None` (with a note on stderr) when this host cannot make network namespaces: not root,
    /// or no netns support. The test then passes without checking anything.
    pub fn new(test: &str) -> Option<Pair> {
        // SAFETY: geteuid(2) has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("note: {test} skipped: not root (network namespaces need it)");
            return None;
        }
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let a = format!("hlt-vip-{pid}-{n}a");
        if let Err(e) = ip(&["netns", "add", &a]) {
            eprintln!("note: {test} skipped: no network namespace support ({e})");
            return None;
        }
        let pair = Pair {
            a: a.clone(),
            b: format!("hlt-vip-{pid}-{n}b"),
        };
        ip(&["netns", "add", &pair.b]).expect("a second namespace");
        ip(&[
            "-n", &pair.a, "link", "add", "name", IF_A, "type", "veth", "peer", "name", IF_B,
            "netns", &pair.b,
        ])
        .expect("a veth pair between the namespaces");
        for (ns, dev) in [
            (&pair.a, IF_A),
            (&pair.b, IF_B),
            (&pair.a, "lo"),
            (&pair.b, "lo"),
        ] {
            ip(&["-n", ns, "link", "set", dev, "up"]).expect("link up");
        }
        Some(pair)
    }

    /// Runs `ip` inside namespace `ns`.
    pub fn ip(&self, ns: &str, args: &[&str]) -> String {
        let mut all = vec!["-n", ns];
        all.extend_from_slice(args);
        ip(&all).unwrap()
    }

    /// The global addresses on `IF_A` as `ip -j addr` shows them: (address, prefix length).
    pub fn addresses_a(&self) -> Vec<(String, u8)> {
        let json = self.ip(&self.a, &["-j", "addr", "show", "dev", IF_A]);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        v[0]["addr_info"]
            .as_array()
            .map(|infos| {
                infos
                    .iter()
                    .filter(|i| i["scope"] == "global")
                    .map(|i| {
                        (
                            i["local"].as_str().unwrap().to_owned(),
                            i["prefixlen"].as_u64().unwrap() as u8,
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The MAC of `IF_A`.
    pub fn mac_a(&self) -> [u8; 6] {
        let json = self.ip(&self.a, &["-j", "link", "show", "dev", IF_A]);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let text = v[0]["address"].as_str().unwrap();
        let bytes: Vec<u8> = text
            .split(':')
            .map(|h| u8::from_str_radix(h, 16).unwrap())
            .collect();
        bytes.try_into().unwrap()
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        // Deleting a namespace destroys the veth end in it, and with it the pair.
        for ns in [&self.a, &self.b] {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("warning: {e}");
            }
        }
    }
}

/// Moves the calling thread into the network namespace `ns` (setns is per thread).
pub fn enter(ns: &str) {
    let file = File::open(format!("/run/netns/{ns}")).expect("the namespace file");
    // SAFETY: the descriptor is open for the duration of the call; CLONE_NEWNET asks for the
    // network namespace only, which a thread of a multithreaded process may change.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

/// Runs `f` on a thread inside namespace `ns` and returns its result (a panic in `f` fails the
/// test).
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(ns);
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// `SIOCGSTAMP` from `<linux/sockios.h>`: the kernel's receive time of the last packet read.
const SIOCGSTAMP: u32 = 0x8906;

/// One captured frame and when the kernel received it (wall clock), so that the spacing of
/// frames does not depend on how promptly the capture thread was scheduled.
#[derive(Debug, Clone)]
pub struct Frame {
    pub at: Duration,
    pub bytes: Vec<u8>,
}

/// A capture running on its own thread in a namespace.
pub struct Capture {
    handle: JoinHandle<Vec<Frame>>,
}

impl Capture {
    /// Starts capturing every incoming frame on `ifname` in `ns` for `duration`; returns once
    /// the socket listens.
    pub fn start(ns: &str, ifname: &str, duration: Duration) -> Capture {
        let (ready_tx, ready_rx) = mpsc::channel();
        let ns = ns.to_owned();
        let ifname = ifname.to_owned();
        let handle = std::thread::spawn(move || {
            enter(&ns);
            let fd = packet_socket(&ifname);
            ready_tx.send(()).unwrap();
            let deadline = Instant::now() + duration;
            let mut frames = Vec::new();
            let mut buf = [0u8; 2048];
            while Instant::now() < deadline {
                // SAFETY: sockaddr_ll is plain old data; all zero bytes is a valid value.
                let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
                // SAFETY: `fd` is open; `buf` and `from` are live, writable and of the sizes
                // passed.
                let n = unsafe {
                    libc::recvfrom(
                        fd.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        0,
                        (&mut from as *mut libc::sockaddr_ll).cast(),
                        &mut from_len,
                    )
                };
                if n < 0 {
                    continue; // receive timeout: look at the deadline again
                }
                if from.sll_pkttype == libc::PACKET_OUTGOING {
                    continue;
                }
                let mut tv = libc::timeval {
                    tv_sec: 0,
                    tv_usec: 0,
                };
                // SAFETY: `fd` is open; SIOCGSTAMP writes one timeval into the live `tv`.
                let rc = unsafe { libc::ioctl(fd.as_raw_fd(), SIOCGSTAMP as _, &mut tv) };
                assert_eq!(rc, 0, "SIOCGSTAMP: {}", std::io::Error::last_os_error());
                frames.push(Frame {
                    at: Duration::new(tv.tv_sec as u64, tv.tv_usec as u32 * 1000),
                    bytes: buf[..n as usize].to_vec(),
                });
            }
            frames
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the capture socket listens");
        Capture { handle }
    }

    /// Waits for the capture to end and returns what arrived.
    pub fn finish(self) -> Vec<Frame> {
        self.handle.join().expect("the capture thread")
    }
}

fn packet_socket(ifname: &str) -> OwnedFd {
    let eth_p_all = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: socket(2) takes plain integers.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, eth_p_all as libc::c_int) };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = CString::new(ifname).unwrap();
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(index > 0, "no interface {ifname}");
    // SAFETY: sockaddr_ll is plain old data; all zero bytes is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = eth_p_all;
    sll.sll_ifindex = index as i32;
    // SAFETY: `fd` is open; `sll` is a valid sockaddr_ll of the size passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 20_000,
    };
    // SAFETY: `fd` is open; `tv` is a valid timeval of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    fd
}

/// A gratuitous ARP as parsed from a captured frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arp {
    pub eth_dst: [u8; 6],
    pub eth_src: [u8; 6],
    pub op: u16,
    pub sender_mac: [u8; 6],
    pub sender_ip: [u8; 4],
    pub target_mac: [u8; 6],
    pub target_ip: [u8; 4],
}

/// Parses an Ethernet frame carrying an IPv4-over-Ethernet ARP packet.
pub fn parse_arp(f: &[u8]) -> Option<Arp> {
    if f.len() < 42 || f[12..14] != [0x08, 0x06] {
        return None;
    }
    if f[14..16] != [0, 1] || f[16..18] != [0x08, 0x00] || f[18] != 6 || f[19] != 4 {
        return None;
    }
    Some(Arp {
        eth_dst: f[0..6].try_into().unwrap(),
        eth_src: f[6..12].try_into().unwrap(),
        op: u16::from_be_bytes([f[20], f[21]]),
        sender_mac: f[22..28].try_into().unwrap(),
        sender_ip: f[28..32].try_into().unwrap(),
        target_mac: f[32..38].try_into().unwrap(),
        target_ip: f[38..42].try_into().unwrap(),
    })
}

/// A neighbour advertisement as parsed from a captured frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Na {
    pub eth_dst: [u8; 6],
    pub hop_limit: u8,
    pub src: std::net::Ipv6Addr,
    pub dst: std::net::Ipv6Addr,
    pub flags: u8,
    pub target: std::net::Ipv6Addr,
    pub target_mac: Option<[u8; 6]>,
    pub checksum_ok: bool,
}

/// Parses an Ethernet frame carrying an IPv6 ICMPv6 neighbour advertisement.
pub fn parse_na(f: &[u8]) -> Option<Na> {
    if f.len() < 54 + 24 || f[12..14] != [0x86, 0xdd] || f[20] != 58 {
        return None;
    }
    let payload_len = u16::from_be_bytes([f[18], f[19]]) as usize;
    let icmp = f.get(54..54 + payload_len)?;
    if icmp[0] != 136 {
        return None;
    }
    let src: [u8; 16] = f[22..38].try_into().unwrap();
    let dst: [u8; 16] = f[38..54].try_into().unwrap();
    // The checksum over the pseudo-header and the ICMPv6 message folds to 0xffff.
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for c in bytes.chunks(2) {
            let w = if c.len() == 2 {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                u16::from_be_bytes([c[0], 0])
            };
            sum += w as u32;
        }
    };
    add(&src);
    add(&dst);
    add(&(payload_len as u32).to_be_bytes());
    add(&[0, 0, 0, 58]);
    add(icmp);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let mut target_mac = None;
    let mut opts = &icmp[24..];
    while opts.len() >= 8 {
        let len = opts[1] as usize * 8;
        if len == 0 || len > opts.len() {
            break;
        }
        if opts[0] == 2 && len == 8 {
            target_mac = Some(opts[2..8].try_into().unwrap());
        }
        opts = &opts[len..];
    }
    Some(Na {
        eth_dst: f[0..6].try_into().unwrap(),
        hop_limit: f[21],
        src: src.into(),
        dst: dst.into(),
        flags: icmp[4],
        target: <[u8; 16]>::try_from(&icmp[8..24]).unwrap().into(),
        target_mac,
        checksum_ok: sum == 0xffff,
    })
}
