//! The service address in throwaway network namespaces: namespace `a` holds it on one end of a
//! veth pair, namespace `b` captures what arrives on the other end.
//!
//! Every test skips (passing, with a note) when the host cannot make network namespaces.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use common::{in_ns, parse_arp, parse_na, Capture, Frame, Pair, IF_A, IF_B};
use hitless_vip::{
    is_local, local_addresses, remove_stale, AnnounceConfig, Claimed, ConfigError, LocalAddress,
    Vip, VipConfig, VipError,
};

const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);

fn config(addr: IpAddr, prefix_len: u8, announce: AnnounceConfig) -> VipConfig {
    VipConfig {
        interface: IF_A.to_owned(),
        addr,
        prefix_len,
        announce,
    }
}

fn announce(burst: u32, burst_interval_ms: u64, refresh_ms: u64) -> AnnounceConfig {
    AnnounceConfig {
        burst,
        burst_interval_ms,
        refresh_ms,
    }
}

/// The gratuitous ARPs for `ip` among the frames.
fn arps_for(frames: &[Frame], ip: Ipv4Addr) -> Vec<(Duration, common::Arp)> {
    frames
        .iter()
        .filter_map(|f| parse_arp(&f.bytes).map(|a| (f.at, a)))
        .filter(|(_, a)| a.sender_ip == ip.octets())
        .collect()
}

#[test]
fn claim_adds_the_address_and_release_removes_it_both_idempotent() {
    let Some(pair) = Pair::new("claim_adds_the_address_and_release_removes_it") else {
        return;
    };
    let addrs = in_ns(&pair.a, || {
        let vip = Vip::new(config(VIP4.into(), 24, announce(1, 10, 0))).unwrap();
        assert!(!vip.is_held().unwrap());
        assert!(!vip.stats().claimed);

        assert_eq!(vip.claim().unwrap(), Claimed::Added);
        assert!(vip.is_held().unwrap());
        let after_claim = pair.addresses_a();
        let stats = vip.stats();
        assert!(stats.claimed);
        assert!(stats.held_since_unix_ms.is_some());

        assert_eq!(vip.claim().unwrap(), Claimed::AlreadyPresent);
        assert!(vip.is_held().unwrap());
        assert_eq!(
            vip.stats().held_since_unix_ms,
            stats.held_since_unix_ms,
            "a repeated claim keeps the time the hold began"
        );

        vip.release().unwrap();
        assert!(!vip.is_held().unwrap());
        let after_release = pair.addresses_a();
        vip.release().unwrap();
        assert!(!vip.is_held().unwrap());
        assert!(!vip.stats().claimed);
        assert_eq!(vip.stats().held_since_unix_ms, None);
        (after_claim, after_release)
    });
    assert!(
        addrs.0.contains(&("198.18.0.10".to_owned(), 24)),
        "ip -j addr after claim: {:?}",
        addrs.0
    );
    assert!(
        !addrs.1.iter().any(|(a, _)| a == "198.18.0.10"),
        "ip -j addr after release: {:?}",
        addrs.1
    );
}

#[test]
fn the_burst_arrives_on_the_peer_with_the_address_and_the_mac() {
    let Some(pair) = Pair::new("the_burst_arrives_on_the_peer") else {
        return;
    };
    let mac = pair.mac_a();
    let capture = Capture::start(&pair.b, IF_B, Duration::from_millis(2500));
    let sent = in_ns(&pair.a, || {
        let vip = Vip::new(config(VIP4.into(), 24, AnnounceConfig::default())).unwrap();
        vip.claim().unwrap();
        // The default burst (5 at 100 ms) takes 400 ms; the capture outlasts it.
        std::thread::sleep(Duration::from_millis(1000));
        let sent = vip.stats().announcements_sent;
        vip.release().unwrap();
        sent
    });
    let arps = arps_for(&capture.finish(), VIP4);
    assert_eq!(arps.len(), 5, "one default burst: {arps:?}");
    assert_eq!(sent, 5);
    for (_, a) in &arps {
        assert_eq!(a.eth_dst, [0xff; 6], "to the Ethernet broadcast address");
        assert_eq!(a.eth_src, mac);
        assert_eq!(a.op, 1, "the request form");
        assert_eq!(a.sender_mac, mac);
        assert_eq!(a.sender_ip, VIP4.octets());
        assert_eq!(a.target_ip, VIP4.octets());
        assert_eq!(a.target_mac, [0; 6]);
    }
    for w in arps.windows(2) {
        let gap = w[1].0 - w[0].0;
        assert!(
            gap >= Duration::from_millis(50),
            "gap {gap:?} under half the interval"
        );
    }
}

#[test]
fn refresh_sends_more_later_and_release_stops_announcements() {
    let Some(pair) = Pair::new("refresh_sends_more_later") else {
        return;
    };
    let (during, after) = in_ns(&pair.a, || {
        let vip = Vip::new(config(VIP4.into(), 24, announce(2, 20, 200))).unwrap();
        let capture = Capture::start(&pair.b, IF_B, Duration::from_millis(1100));
        vip.claim().unwrap();
        let during = capture.finish();
        vip.release().unwrap();
        let after = Capture::start(&pair.b, IF_B, Duration::from_millis(700)).finish();
        (during, after)
    });
    let during = arps_for(&during, VIP4);
    // A burst of 2 within 20 ms, then one every 200 ms: 5 refreshes in 1.1 s when the claim
    // is quick, fewer when the machine is busy.
    assert!(
        (4..=8).contains(&during.len()),
        "burst and refreshes: {} frames",
        during.len()
    );
    let refresh_gaps: Vec<Duration> = during.windows(2).skip(1).map(|w| w[1].0 - w[0].0).collect();
    for gap in &refresh_gaps {
        assert!(
            *gap >= Duration::from_millis(100),
            "refresh gaps {refresh_gaps:?}"
        );
    }
    assert_eq!(arps_for(&after, VIP4).len(), 0, "nothing after release");
}

#[test]
fn announce_now_sends_one_more_burst() {
    let Some(pair) = Pair::new("announce_now_sends_one_more_burst") else {
        return;
    };
    let (frames, sent) = in_ns(&pair.a, || {
        let vip = Vip::new(config(VIP4.into(), 24, announce(3, 20, 0))).unwrap();
        vip.claim().unwrap();
        // Let the claim's burst end before listening.
        std::thread::sleep(Duration::from_millis(300));
        let capture = Capture::start(&pair.b, IF_B, Duration::from_millis(800));
        vip.announce_now();
        let frames = capture.finish();
        let sent = vip.stats().announcements_sent;
        vip.release().unwrap();
        (frames, sent)
    });
    assert_eq!(arps_for(&frames, VIP4).len(), 3, "one burst of 3");
    assert_eq!(sent, 6, "the claim's burst and the extra one");
}

#[test]
fn dropping_the_handle_stops_announcing_and_keeps_the_address() {
    let Some(pair) = Pair::new("dropping_the_handle") else {
        return;
    };
    let frames = in_ns(&pair.a, || {
        let vip = Vip::new(config(VIP4.into(), 24, announce(1, 10, 100))).unwrap();
        vip.claim().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        drop(vip);
        Capture::start(&pair.b, IF_B, Duration::from_millis(500)).finish()
    });
    assert_eq!(arps_for(&frames, VIP4).len(), 0, "no refresh after drop");
    assert!(pair.addresses_a().contains(&("198.18.0.10".to_owned(), 24)));
    // What the agent does at its next start.
    let removed = in_ns(&pair.a, || remove_stale(IF_A, VIP4.into()).unwrap());
    assert!(removed);
    assert!(!pair.addresses_a().iter().any(|(a, _)| a == "198.18.0.10"));
}

#[test]
fn ipv6_claims_without_dad_and_sends_unsolicited_neighbour_advertisements() {
    let Some(pair) = Pair::new("ipv6_neighbour_advertisements") else {
        return;
    };
    let vip6: Ipv6Addr = "2001:db8:5::10".parse().unwrap();
    let mac = pair.mac_a();
    let capture = Capture::start(&pair.b, IF_B, Duration::from_millis(2000));
    let (held, stats) = in_ns(&pair.a, || {
        let vip = Vip::new(config(vip6.into(), 64, announce(3, 50, 0))).unwrap();
        assert_eq!(vip.claim().unwrap(), Claimed::Added);
        let held = vip.is_held().unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let stats = vip.stats();
        vip.release().unwrap();
        assert!(!vip.is_held().unwrap());
        (held, stats)
    });
    assert!(held);
    assert_eq!(stats.announce_errors, 0, "{:?}", stats.last_error);
    let nas: Vec<_> = capture
        .finish()
        .iter()
        .filter_map(|f| parse_na(&f.bytes))
        .filter(|na| na.target == vip6)
        .collect();
    assert_eq!(nas.len(), 3, "one burst of 3: {nas:?}");
    for na in &nas {
        assert_eq!(na.eth_dst, [0x33, 0x33, 0, 0, 0, 1], "all-nodes multicast");
        assert_eq!(na.dst, "ff02::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(na.src, vip6);
        assert_eq!(na.hop_limit, 255);
        assert_eq!(
            na.flags & 0xe0,
            0x20,
            "override set, router and solicited clear"
        );
        assert_eq!(na.target_mac, Some(mac));
        assert!(na.checksum_ok, "the kernel filled in the checksum");
    }
}

#[test]
fn a_missing_interface_and_a_bad_config_give_the_documented_errors() {
    let Some(pair) = Pair::new("a_missing_interface") else {
        return;
    };
    in_ns(&pair.a, || {
        let mut cfg = config(VIP4.into(), 24, AnnounceConfig::default());
        cfg.interface = "nosuch0".into();
        let err = Vip::new(cfg).unwrap_err();
        assert!(
            matches!(&err, VipError::InterfaceNotFound { interface } if interface == "nosuch0")
        );
        assert_eq!(
            err.to_string(),
            "interface nosuch0 does not exist on this host"
        );

        let err = remove_stale("nosuch0", VIP4.into()).unwrap_err();
        assert!(matches!(err, VipError::InterfaceNotFound { .. }));

        let err = Vip::new(config(VIP4.into(), 33, AnnounceConfig::default())).unwrap_err();
        assert!(matches!(
            err,
            VipError::Config(ConfigError::PrefixLen { .. })
        ));
        let err = Vip::new(config(VIP4.into(), 24, announce(0, 100, 0))).unwrap_err();
        assert!(matches!(err, VipError::Config(ConfigError::Burst(0))));

        // Loopback has no Ethernet address to announce with.
        let mut cfg = config(VIP4.into(), 24, AnnounceConfig::default());
        cfg.interface = "lo".into();
        let err = Vip::new(cfg).unwrap_err();
        assert!(matches!(err, VipError::NoEthernetAddress { .. }), "{err}");
    });
    assert!(
        pair.addresses_a().is_empty(),
        "no error left an address behind"
    );
}

#[test]
fn remove_stale_removes_a_left_address_once() {
    let Some(pair) = Pair::new("remove_stale") else {
        return;
    };
    // The stale address came first, so it is the primary of the subnet and the host's own
    // address a secondary: removing it must not take the host's address with it.
    pair.ip(&pair.a, &["addr", "add", "198.18.0.99/24", "dev", IF_A]);
    pair.ip(&pair.a, &["addr", "add", "198.18.0.1/24", "dev", IF_A]);
    let stale: IpAddr = "198.18.0.99".parse().unwrap();
    let (first, second) = in_ns(&pair.a, || {
        (
            remove_stale(IF_A, stale).unwrap(),
            remove_stale(IF_A, stale).unwrap(),
        )
    });
    assert!(first, "it was there");
    assert!(!second, "it is gone");
    assert_eq!(
        pair.addresses_a(),
        vec![("198.18.0.1".to_owned(), 24)],
        "the other address stays"
    );
}

#[test]
fn is_local_knows_the_addresses_of_the_namespace() {
    let Some(pair) = Pair::new("is_local") else {
        return;
    };
    pair.ip(&pair.a, &["addr", "add", "198.18.0.1/24", "dev", IF_A]);
    in_ns(&pair.a, || {
        assert!(is_local("198.18.0.1".parse().unwrap()).unwrap());
        assert!(is_local("127.0.0.1".parse().unwrap()).unwrap());
        assert!(!is_local("198.51.100.77".parse().unwrap()).unwrap());
        let all = local_addresses().unwrap();
        assert!(
            all.contains(&LocalAddress {
                interface: IF_A.to_owned(),
                addr: "198.18.0.1".parse().unwrap(),
                prefix_len: 24,
            }),
            "{all:?}"
        );
        assert!(all
            .iter()
            .any(|a| a.interface == "lo" && a.addr == "127.0.0.1".parse::<IpAddr>().unwrap()));
    });
    // The other namespace does not have it.
    in_ns(&pair.b, || {
        assert!(!is_local("198.18.0.1".parse().unwrap()).unwrap());
    });
}

#[test]
fn a_claim_uses_the_interface_as_it_is_now_after_it_was_recreated() {
    let Some(pair) = Pair::new("a_claim_uses_the_interface_as_it_is_now") else {
        return;
    };
    let vip = in_ns(&pair.a, || {
        Vip::new(config(VIP4.into(), 24, announce(2, 20, 0))).unwrap()
    });
    // The veth pair is recreated with a new index and a new MAC.
    pair.ip(&pair.a, &["link", "del", IF_A]);
    pair.ip(
        &pair.a,
        &[
            "link",
            "add",
            "name",
            IF_A,
            "address",
            "02:00:00:aa:bb:cc",
            "type",
            "veth",
            "peer",
            "name",
            IF_B,
            "netns",
            &pair.b,
        ],
    );
    pair.ip(&pair.a, &["link", "set", IF_A, "up"]);
    pair.ip(&pair.b, &["link", "set", IF_B, "up"]);
    let capture = Capture::start(&pair.b, IF_B, Duration::from_millis(1500));
    let held = in_ns(&pair.a, || {
        assert_eq!(vip.claim().unwrap(), Claimed::Added);
        let held = vip.is_held().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        vip.release().unwrap();
        held
    });
    assert!(held);
    let arps = arps_for(&capture.finish(), VIP4);
    assert_eq!(arps.len(), 2, "{arps:?}");
    for (_, a) in &arps {
        assert_eq!(a.sender_mac, [0x02, 0, 0, 0xaa, 0xbb, 0xcc], "the new MAC");
    }
}
