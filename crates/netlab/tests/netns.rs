//! Real networks of namespaces: creation, reachability with real traffic, every partition kind,
//! heal, and removal. Needs root; skipped (with a note) otherwise.
//!
//! Every test uses its own prefix (`t<pid % 1000><tag>`) and its own subnet 198.18.<k>.0/24, so
//! the tests run in parallel, and a guard destroys its network however the test ends.

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use hitless_netlab::{
    active, announce, command_in, create, destroy, heal, partition, run_in, NetlabError, Partition,
    Plan, Topology,
};

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the effective user of the process.
    if std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
        return true;
    }
    eprintln!("skipped: network namespaces need root");
    false
}

fn prefix(tag: &str) -> String {
    format!("t{}{tag}", std::process::id() % 1000)
}

/// Destroys the network of its prefix on drop, so a failing test leaves nothing behind.
struct Net {
    prefix: String,
}

impl Drop for Net {
    fn drop(&mut self) {
        if let Err(e) = destroy(&self.prefix) {
            eprintln!("cleanup of {}: {e}", self.prefix);
        }
    }
}

fn plan(tag: &str, k: u8) -> (Net, Plan) {
    let plan = Plan {
        prefix: prefix(tag),
        subnet: Ipv4Addr::new(198, 18, k, 0),
        prefix_len: 24,
    };
    (
        Net {
            prefix: plan.prefix.clone(),
        },
        plan,
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Node {
    Primary,
    Secondary,
    Witness,
    Client,
    Gateway,
}
use Node::*;

const NODES: [Node; 5] = [Primary, Secondary, Witness, Client, Gateway];

fn addr(t: &Topology, n: Node) -> Ipv4Addr {
    match n {
        Primary => t.hosts.primary.addr,
        Secondary => t.hosts.secondary.addr,
        Witness => t.hosts.witness.addr,
        Client => t.client.addr,
        Gateway => t.gateway,
    }
}

/// Runs `f` on the node: inside its namespace, or in the root namespace for the gateway.
fn on<T: Send>(t: &Topology, n: Node, f: impl FnOnce() -> T + Send) -> T {
    let netns = match n {
        Primary => &t.hosts.primary.netns,
        Secondary => &t.hosts.secondary.netns,
        Witness => &t.hosts.witness.netns,
        Client => &t.client.netns,
        Gateway => return f(),
    };
    run_in(netns, f).unwrap()
}

fn all_pairs() -> BTreeSet<(Node, Node)> {
    let mut s = BTreeSet::new();
    for a in NODES {
        for b in NODES {
            if a != b {
                s.insert((a, b));
            }
        }
    }
    s
}

const PROBE_PORT: u16 = 47_123;

/// Which directed pairs (from, to) pass a UDP datagram right now. One socket per node receives
/// on its address; one per node sends from its address to every other node, three times. A
/// datagram counts only if it comes from the sender's address.
fn udp_matrix(t: &Topology) -> BTreeSet<(Node, Node)> {
    let receivers: Vec<(Node, UdpSocket)> = NODES
        .iter()
        .map(|n| {
            let a = addr(t, *n);
            let s = on(t, *n, move || UdpSocket::bind((a, PROBE_PORT)))
                .unwrap_or_else(|e| panic!("bind {n:?} {a}:{PROBE_PORT}: {e}"));
            s.set_nonblocking(true).unwrap();
            (*n, s)
        })
        .collect();
    let senders: Vec<(Node, UdpSocket)> = NODES
        .iter()
        .map(|n| {
            let a = addr(t, *n);
            let s = on(t, *n, move || UdpSocket::bind((a, 0))).unwrap();
            (*n, s)
        })
        .collect();
    for _ in 0..3 {
        for (from, s) in &senders {
            for to in NODES {
                if to != *from {
                    // A partition's output rule makes send_to fail with EPERM: that is a drop.
                    let _ = s.send_to(format!("{from:?}").as_bytes(), (addr(t, to), PROBE_PORT));
                }
            }
        }
        thread::sleep(Duration::from_millis(30));
    }
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_millis(500);
    let mut buf = [0u8; 64];
    while Instant::now() < deadline {
        for (to, s) in &receivers {
            while let Ok((len, src)) = s.recv_from(&mut buf) {
                let name = std::str::from_utf8(&buf[..len]).unwrap();
                let from = *NODES
                    .iter()
                    .find(|n| format!("{n:?}") == name)
                    .unwrap_or_else(|| panic!("unexpected datagram {name:?}"));
                assert_eq!(
                    src,
                    SocketAddr::from((addr(t, from), src.port())),
                    "{from:?} sent from the wrong address"
                );
                seen.insert((from, *to));
            }
        }
        thread::sleep(Duration::from_millis(10));
    }
    seen
}

/// The pairs each partition must block, written from the description of the kinds.
fn blocked(p: Partition) -> BTreeSet<(Node, Node)> {
    let both = |a, b| [(a, b), (b, a)];
    let pairs: Vec<(Node, Node)> = match p {
        Partition::PartitionPeers => both(Primary, Secondary).to_vec(),
        Partition::IsolatePrimary => [both(Primary, Secondary), both(Primary, Witness)].concat(),
        Partition::IsolateSecondary => {
            [both(Secondary, Primary), both(Secondary, Witness)].concat()
        }
        Partition::OneWayPrimary => vec![(Primary, Secondary)],
        Partition::IsolateWitness => [both(Witness, Primary), both(Witness, Secondary)].concat(),
    };
    pairs.into_iter().collect()
}

fn assert_matrix(t: &Topology, expected: &BTreeSet<(Node, Node)>, when: &str) {
    let seen = udp_matrix(t);
    let missing: Vec<_> = expected.difference(&seen).collect();
    let extra: Vec<_> = seen.difference(expected).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{when}: blocked but should pass: {missing:?}; passed but should be blocked: {extra:?}"
    );
}

fn ipv4_addrs(out: &str) -> Vec<String> {
    // `ip -o -4 addr show` lines: "2: eth0    inet 198.18.1.1/24 brd ... scope global eth0 ..."
    out.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "inet")?;
            words.next().map(str::to_string)
        })
        .collect()
}

fn ip_output(mut cmd: Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn create_connects_every_host_to_every_other_and_the_gateway() {
    if !is_root() {
        return;
    }
    let (_net, plan) = plan("a", 101);
    let t = create(&plan).unwrap();
    assert_eq!(t.kind, "netns");
    assert_eq!(t.hosts.primary.addr, Ipv4Addr::new(198, 18, 101, 1));
    assert_eq!(t.gateway, Ipv4Addr::new(198, 18, 101, 254));

    // Real TCP connections, every host to every other host and to the gateway, and the gateway
    // to every host.
    let listeners: Vec<(Node, TcpListener)> = NODES
        .iter()
        .map(|n| {
            let a = addr(&t, *n);
            (*n, on(&t, *n, move || TcpListener::bind((a, 0))).unwrap())
        })
        .collect();
    let mut connected = BTreeSet::new();
    for from in NODES {
        for (to, l) in &listeners {
            if *to == from {
                continue;
            }
            let target = l.local_addr().unwrap();
            let ok = on(&t, from, move || {
                TcpStream::connect_timeout(&target, Duration::from_secs(2)).is_ok()
            });
            if ok {
                connected.insert((from, *to));
            }
        }
    }
    assert_eq!(connected, all_pairs());
    assert_matrix(&t, &all_pairs(), "after create");

    // command_in runs inside the namespace: it sees the host's address on eth0 and nothing of
    // the service address, which only the agents configure.
    for (role_ns, host_addr) in [
        (&t.hosts.primary.netns, t.hosts.primary.addr),
        (&t.hosts.secondary.netns, t.hosts.secondary.addr),
        (&t.hosts.witness.netns, t.hosts.witness.addr),
        (&t.client.netns, t.client.addr),
    ] {
        let mut cmd = command_in(role_ns, "ip");
        cmd.args(["-o", "-4", "addr", "show", "dev", "eth0"]);
        let addrs = ipv4_addrs(&ip_output(cmd));
        assert_eq!(addrs, [format!("{host_addr}/24")], "{role_ns}");
        let mut cmd = command_in(role_ns, "ip");
        cmd.args(["-o", "-4", "addr", "show"]);
        let all = ip_output(cmd);
        assert!(
            !all.contains(&format!("{}/", t.service_addr)),
            "{role_ns}: {all}"
        );
    }
    let mut cmd = Command::new("ip");
    cmd.args(["-o", "-4", "addr", "show"]);
    let root = ip_output(cmd);
    assert!(root.contains(&format!("{}/24", t.gateway)), "{root}");
    assert!(!root.contains(&format!("{}/", t.service_addr)), "{root}");

    // A thread that entered a namespace sees that namespace's links, not the root's bridge.
    let dev = run_in(&t.hosts.primary.netns, || {
        std::fs::read_to_string("/proc/thread-self/net/dev").unwrap()
    })
    .unwrap();
    assert!(dev.contains("eth0:"), "{dev}");
    assert!(!dev.contains(&format!("{}:", t.bridge)), "{dev}");
    let root_dev = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap();
    assert!(root_dev.contains(&format!("{}:", t.bridge)), "{root_dev}");

    // The moving service address can be bound before it is held (ip_nonlocal_bind), and the
    // sysctls are set in each namespace.
    let service = t.service_addr;
    let bound = run_in(&t.hosts.secondary.netns, move || {
        TcpListener::bind((service, 0)).map(|_| ())
    })
    .unwrap();
    assert!(bound.is_ok(), "{bound:?}");
    let accept = run_in(&t.client.netns, || {
        std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/arp_accept").unwrap()
    })
    .unwrap();
    assert_eq!(accept.trim(), "1");
    assert_eq!(active(&t).unwrap(), None);
}

#[test]
fn each_partition_blocks_exactly_its_pairs_and_heal_restores_the_whole_matrix() {
    if !is_root() {
        return;
    }
    let (_net, plan) = plan("b", 102);
    let t = create(&plan).unwrap();
    assert_matrix(&t, &all_pairs(), "before any partition");
    for p in Partition::ALL {
        partition(&t, p).unwrap();
        assert_eq!(active(&t).unwrap(), Some(p));
        let expected: BTreeSet<_> = all_pairs().difference(&blocked(p)).copied().collect();
        assert_matrix(&t, &expected, p.name());
        assert_eq!(heal(&t).unwrap(), Some(p), "heal reports what it removed");
        assert_eq!(active(&t).unwrap(), None);
        assert_matrix(&t, &all_pairs(), &format!("after heal of {p}"));
    }
    // A partition replaces the one in place.
    partition(&t, Partition::IsolatePrimary).unwrap();
    partition(&t, Partition::IsolateWitness).unwrap();
    assert_eq!(active(&t).unwrap(), Some(Partition::IsolateWitness));
    let expected: BTreeSet<_> = all_pairs()
        .difference(&blocked(Partition::IsolateWitness))
        .copied()
        .collect();
    assert_matrix(&t, &expected, "isolate-witness over isolate-primary");
    assert_eq!(heal(&t).unwrap(), Some(Partition::IsolateWitness));
    assert_eq!(heal(&t).unwrap(), None, "a second heal finds nothing");
    assert_matrix(&t, &all_pairs(), "after the last heal");
}

fn read_some(s: &mut TcpStream, timeout: Duration) -> std::io::Result<Vec<u8>> {
    s.set_read_timeout(Some(timeout))?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf)?;
    Ok(buf[..n].to_vec())
}

fn assert_nothing_arrives(s: &mut TcpStream, what: &str) {
    match read_some(s, Duration::from_secs(1)) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("{what}: expected nothing under the partition, got {other:?}"),
    }
}

#[test]
fn an_established_connection_stops_passing_data_under_partition_peers_and_resumes_on_heal() {
    if !is_root() {
        return;
    }
    let (_net, plan) = plan("c", 103);
    let t = create(&plan).unwrap();
    let secondary = t.hosts.secondary.addr;
    let listener = run_in(&t.hosts.secondary.netns, move || {
        TcpListener::bind((secondary, 0)).unwrap()
    })
    .unwrap();
    let target = listener.local_addr().unwrap();
    let mut client = run_in(&t.hosts.primary.netns, move || {
        TcpStream::connect_timeout(&target, Duration::from_secs(2)).unwrap()
    })
    .unwrap();
    let (mut server, peer) = listener.accept().unwrap();
    assert_eq!(peer.ip(), t.hosts.primary.addr);

    client.write_all(b"hello").unwrap();
    assert_eq!(
        read_some(&mut server, Duration::from_secs(2)).unwrap(),
        b"hello"
    );
    server.write_all(b"back").unwrap();
    assert_eq!(
        read_some(&mut client, Duration::from_secs(2)).unwrap(),
        b"back"
    );

    partition(&t, Partition::PartitionPeers).unwrap();
    client.write_all(b"cut-1").unwrap();
    server.write_all(b"cut-2").unwrap();
    assert_nothing_arrives(&mut server, "primary -> secondary");
    assert_nothing_arrives(&mut client, "secondary -> primary");

    // The connection itself survived: once healed, TCP retransmits what was held back.
    heal(&t).unwrap();
    assert_eq!(
        read_some(&mut server, Duration::from_secs(10)).unwrap(),
        b"cut-1"
    );
    assert_eq!(
        read_some(&mut client, Duration::from_secs(10)).unwrap(),
        b"cut-2"
    );
}

fn netns_names() -> Vec<String> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "list"]);
    ip_output(cmd)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

fn link_names() -> Vec<String> {
    let mut cmd = Command::new("ip");
    cmd.args(["-o", "link", "show"]);
    ip_output(cmd)
        .lines()
        .filter_map(|l| {
            let name = l.split(": ").nth(1)?;
            Some(name.split('@').next().unwrap_or(name).to_string())
        })
        .collect()
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {out:?}");
}

/// Namespaces and links that only look like the prefix's; destroy must leave them alone.
struct Decoys {
    netns: Vec<String>,
    links: Vec<String>,
}

impl Drop for Decoys {
    fn drop(&mut self) {
        for ns in &self.netns {
            let _ = Command::new("ip").args(["netns", "delete", ns]).output();
        }
        for l in &self.links {
            let _ = Command::new("ip").args(["link", "delete", l]).output();
        }
    }
}

#[test]
fn destroy_removes_everything_of_its_prefix_and_nothing_else_and_is_idempotent() {
    if !is_root() {
        return;
    }
    let (_net, plan) = plan("d", 104);
    let p = plan.prefix.clone();
    let decoys = Decoys {
        netns: vec![format!("{p}x-keep"), format!("{p}keep")],
        links: vec![format!("{p}x-keep")],
    };
    for ns in &decoys.netns {
        run(&["ip", "netns", "add", ns]);
    }
    run(&["ip", "link", "add", &decoys.links[0], "type", "bridge"]);

    let t = create(&plan).unwrap();
    partition(&t, Partition::IsolatePrimary).unwrap();
    let ours = |names: Vec<String>| -> Vec<String> {
        names
            .into_iter()
            .filter(|n| n.starts_with(&format!("{p}-")))
            .collect()
    };
    assert_eq!(ours(netns_names()).len(), 4);
    assert_eq!(ours(link_names()).len(), 5, "bridge and four host ends");

    let cleaned = destroy(&p).unwrap();
    let mut want_ns: Vec<String> = t.namespaces().iter().map(|s| s.to_string()).collect();
    want_ns.sort();
    assert_eq!(cleaned.namespaces, want_ns);
    let mut want_links: Vec<String> = ["br", "pri", "sec", "wit", "cli"]
        .iter()
        .map(|s| format!("{p}-{s}"))
        .collect();
    want_links.sort();
    assert_eq!(cleaned.links, want_links);

    assert_eq!(ours(netns_names()), Vec::<String>::new());
    assert_eq!(ours(link_names()), Vec::<String>::new());
    for ns in &decoys.netns {
        assert!(
            netns_names().contains(ns),
            "decoy namespace {ns} was removed"
        );
    }
    assert!(
        link_names().contains(&decoys.links[0]),
        "decoy link removed"
    );

    let again = destroy(&p).unwrap();
    assert!(again.is_empty(), "{again:?}");

    // The saved topology of a destroyed network gets a clear error, naming the namespace.
    let e = partition(&t, Partition::PartitionPeers).unwrap_err();
    assert!(matches!(e, NetlabError::Enter { .. }), "{e:?}");
    assert!(e.to_string().contains(&format!("{p}-primary")), "{e}");
}

fn nft_in(netns: &str, script: &str) {
    let mut nft = command_in(netns, "nft");
    nft.args(["-f", "-"]).stdin(std::process::Stdio::piped());
    let mut child = nft.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(
        child.wait().unwrap().success(),
        "nft -f - in {netns}: {script}"
    );
}

#[test]
fn half_a_partition_is_reported_as_inconsistent_and_heal_removes_it() {
    if !is_root() {
        return;
    }
    let (_net, plan) = plan("g", 107);
    let t = create(&plan).unwrap();
    partition(&t, Partition::IsolateSecondary).unwrap();
    // As if a crash had struck between namespaces: the witness's table is missing.
    nft_in(
        &t.hosts.witness.netns,
        &format!("delete table inet {}_partition\n", t.prefix),
    );
    let e = active(&t).unwrap_err();
    assert!(
        matches!(e, NetlabError::PartitionInconsistent { .. }),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .contains(&format!("{}: none", t.hosts.witness.netns)),
        "{e}"
    );
    assert_eq!(heal(&t).unwrap(), Some(Partition::IsolateSecondary));
    assert_eq!(active(&t).unwrap(), None);
    assert_matrix(&t, &all_pairs(), "after healing half a partition");
}

#[test]
fn create_over_the_leftovers_of_a_crashed_run_succeeds() {
    if !is_root() {
        return;
    }
    let (_net, plan) = plan("e", 105);
    let p = plan.prefix.clone();
    // Half a topology, as a crash during create or an agent-less kill would leave it: a
    // namespace with its veth, a bare bridge, a stray veth pair, and a namespace holding a
    // partition table.
    run(&["ip", "netns", "add", &format!("{p}-primary")]);
    run(&["ip", "link", "add", &format!("{p}-br"), "type", "bridge"]);
    run(&[
        "ip",
        "link",
        "add",
        &format!("{p}-pri"),
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &format!("{p}-primary"),
    ]);
    run(&[
        "ip",
        "link",
        "add",
        &format!("{p}-cli"),
        "type",
        "veth",
        "peer",
        "name",
        &format!("{p}-junk"),
    ]);
    run(&["ip", "netns", "add", &format!("{p}-secondary")]);
    let table = format!(
        "table inet {p}_partition {{ comment \"hitless-netlab partition=partition-peers\"; }}\n"
    );
    nft_in(&format!("{p}-secondary"), &table);

    let t = create(&plan).unwrap();
    assert_eq!(
        active(&t).unwrap(),
        None,
        "the stale partition table is gone"
    );
    assert_matrix(&t, &all_pairs(), "created over leftovers");
    assert!(!link_names().contains(&format!("{p}-junk")));
}

#[test]
fn a_bad_plan_is_refused_with_a_clear_error_and_nothing_is_made() {
    if !is_root() {
        return;
    }
    let (_net, mut plan) = plan("f", 106);
    let p = plan.prefix.clone();
    plan.subnet = Ipv4Addr::new(198, 18, 106, 7);
    let e = create(&plan).unwrap_err();
    assert!(matches!(e, NetlabError::InvalidPlan { .. }), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("198.18.106.7") && text.contains("network address"),
        "{text}"
    );

    plan.subnet = Ipv4Addr::new(198, 18, 106, 0);
    plan.prefix_len = 30;
    let text = create(&plan).unwrap_err().to_string();
    assert!(text.contains("prefix_len 30"), "{text}");

    for bad in ["", "Upper", "a-b", "toolong"] {
        let bad_plan = Plan {
            prefix: bad.to_string(),
            ..Plan::default()
        };
        let text = create(&bad_plan).unwrap_err().to_string();
        assert!(text.contains("prefix"), "{bad:?}: {text}");
    }
    assert!(!netns_names()
        .iter()
        .any(|n| n.starts_with(&format!("{p}-"))));
    assert!(!link_names().iter().any(|n| n.starts_with(&format!("{p}-"))));
}

#[test]
fn an_unknown_partition_name_is_refused_listing_the_known_ones() {
    let e = Partition::parse("isolate-client").unwrap_err().to_string();
    assert!(e.contains("isolate-client"), "{e}");
    assert!(
        e.contains(
            "partition-peers, isolate-primary, isolate-secondary, one-way-primary, isolate-witness"
        ),
        "{e}"
    );
}

/// Which of the listeners accepts a connection within two seconds.
fn accepted_by(listeners: &[(Node, &TcpListener)]) -> Option<Node> {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        for (node, l) in listeners {
            if l.accept().is_ok() {
                return Some(*node);
            }
        }
        thread::sleep(Duration::from_millis(10));
    }
    None
}

#[test]
fn a_moved_service_address_is_reached_at_its_new_place_once_announced() {
    if !is_root() {
        return;
    }
    let (_net, plan) = plan("h", 108);
    let t = create(&plan).unwrap();
    let service = t.service_addr;
    let with_len = format!("{service}/{}", t.prefix_len);
    // Both appliances listen on the service address before holding it (ip_nonlocal_bind).
    let on_primary = on(&t, Primary, move || TcpListener::bind((service, 6380))).unwrap();
    let on_secondary = on(&t, Secondary, move || TcpListener::bind((service, 6380))).unwrap();
    on_primary.set_nonblocking(true).unwrap();
    on_secondary.set_nonblocking(true).unwrap();
    let listeners = [(Primary, &on_primary), (Secondary, &on_secondary)];
    let target = SocketAddr::from((service, 6380));
    let connect_from = |n: Node| {
        on(&t, n, move || {
            TcpStream::connect_timeout(&target, Duration::from_secs(2)).map(|_| ())
        })
    };
    let ip_in = |netns: &str, action: &str| {
        let mut cmd = command_in(netns, "ip");
        cmd.args(["addr", action, &with_len, "dev", "eth0"]);
        ip_output(cmd);
    };

    ip_in(&t.hosts.primary.netns, "add");
    announce(&t.hosts.primary.netns, "eth0", service).unwrap();
    for from in [Client, Gateway, Witness] {
        connect_from(from).unwrap_or_else(|e| panic!("{from:?} -> service on primary: {e}"));
        assert_eq!(accepted_by(&listeners), Some(Primary), "{from:?}");
    }

    // The move: every host that talked to the primary's service address reaches the secondary
    // at once, without waiting for its neighbour entry to expire.
    ip_in(&t.hosts.primary.netns, "del");
    ip_in(&t.hosts.secondary.netns, "add");
    announce(&t.hosts.secondary.netns, "eth0", service).unwrap();
    for from in [Client, Gateway, Witness] {
        connect_from(from).unwrap_or_else(|e| panic!("{from:?} -> service on secondary: {e}"));
        assert_eq!(accepted_by(&listeners), Some(Secondary), "{from:?}");
    }
}

#[test]
fn announcing_in_a_missing_namespace_names_it() {
    let e = announce(
        "netlab-test-no-such-ns",
        "eth0",
        Ipv4Addr::new(198, 18, 0, 10),
    )
    .unwrap_err();
    assert!(e.to_string().contains("netlab-test-no-such-ns"), "{e}");
}

#[test]
fn a_create_that_fails_halfway_removes_what_it_made() {
    if !is_root() {
        return;
    }
    let (_net, plan) = plan("i", 109);
    let p = plan.prefix.clone();
    // Another link (not ours: its name lacks "<prefix>-") holds the witness's veth name as an
    // alternative name, so create fails after the bridge, the primary and the secondary exist.
    let decoys = Decoys {
        netns: vec![],
        links: vec![format!("{p}keep")],
    };
    run(&["ip", "link", "add", &decoys.links[0], "type", "bridge"]);
    run(&[
        "ip",
        "link",
        "property",
        "add",
        "dev",
        &decoys.links[0],
        "altname",
        &format!("{p}-wit"),
    ]);

    let e = create(&plan).unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, NetlabError::Command { .. }), "{e:?}");
    assert!(
        text.contains(&format!("ip link add {p}-wit type veth")),
        "{text}"
    );
    assert!(text.contains("File exists"), "{text}");

    let ours = |names: Vec<String>| -> Vec<String> {
        names
            .into_iter()
            .filter(|n| n.starts_with(&format!("{p}-")))
            .collect()
    };
    assert_eq!(ours(netns_names()), Vec::<String>::new());
    assert_eq!(ours(link_names()), Vec::<String>::new());
    assert!(
        link_names().contains(&decoys.links[0]),
        "the other link was removed"
    );
}
