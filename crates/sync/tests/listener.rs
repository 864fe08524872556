//! The sync listener holds the line: a hello's epoch fences nothing, every connection has a
//! handshake deadline, and the listener holds at most a capped number of connections.
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use hitless_sync::wire::{Control, FrameType};
use hitless_sync::{serve_with, ControlEpoch, Role, ServeLimits};

fn hello(epoch: u64, node: &str) -> Vec<u8> {
    Control::Hello {
        service: "kv".into(),
        node: node.into(),
        native: 1,
        reads: vec![1],
        writes: vec![1],
        ha: true,
        epoch: ControlEpoch(epoch),
        resume: None,
        formats: None,
    }
    .encode(ControlEpoch(epoch), 0)
}

/// Waits (at most 10 s) until `f` holds.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < until, "never happened: {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// True once the peer ended the connection (end of stream or reset), false if it is still
/// open after `wait`.
fn closed_within(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            // A refusal frame may come first.
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn a_hello_at_epoch_u64_max_does_not_fence_the_instance_in_control() {
    let (a, h) = active(1, "a");
    let mut s = TcpStream::connect(h.local_addr()).unwrap();
    s.write_all(&hello(u64::MAX, "intruder")).unwrap();
    // Refused: a refusal frame at the active's own epoch, then the end of the connection.
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let f = hitless_sync::wire::read_frame(&mut s)
        .unwrap()
        .expect("a refusal");
    assert_eq!(f.kind, FrameType::Refuse);
    assert_eq!(f.epoch, ControlEpoch(1));
    assert!(closed_within(&mut s, Duration::from_secs(10)));
    assert_eq!(a.role(), Role::Active);
    assert_eq!(a.epoch(), ControlEpoch(1));
    let t = a.apply(vec![put(1, "still acknowledged")]).unwrap();
    assert_eq!(t.epoch, ControlEpoch(1));
    a.shutdown();
}

#[test]
fn a_standby_frame_at_a_newer_epoch_ends_its_link_and_fences_nothing() {
    let (a, h) = active(1, "a");
    let s = standby(1, "s");
    let _f = s.follow_tcp(h.local_addr(), true).unwrap();
    a.wait_standbys_ready(1, Duration::from_secs(5)).unwrap();
    // The standby's next acknowledgement or heartbeat carries epoch 9.
    s.fence(ControlEpoch(9));
    eventually("the active drops the standby", || {
        a.status().standbys.is_empty()
    });
    assert_eq!(a.role(), Role::Active);
    assert_eq!(a.epoch(), ControlEpoch(1));
    a.apply(vec![put(1, "x")]).unwrap();
    a.shutdown();
    s.shutdown();
}

fn limited(deadline: Duration, max: usize) -> (hitless_sync::Replica, hitless_sync::ServeHandle) {
    let r = standby(1, "a");
    r.activate(ControlEpoch(1)).unwrap();
    let limits = ServeLimits {
        handshake_deadline: deadline,
        max_connections: max,
    };
    let h = serve_with(
        TcpListener::bind("127.0.0.1:0").unwrap(),
        vec![r.clone()],
        limits,
    )
    .unwrap();
    (r, h)
}

fn silent(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n).map(|_| TcpStream::connect(addr).unwrap()).collect()
}

#[test]
fn the_connection_beyond_the_cap_is_closed_at_once() {
    // A deadline far beyond the test: only the cap can close the 17th connection.
    let (a, h) = limited(Duration::from_secs(120), 16);
    let mut held = silent(h.local_addr(), 16);
    eventually("16 connections held", || h.connections() == 16);
    let mut extra = TcpStream::connect(h.local_addr()).unwrap();
    // At once: well before any handshake timeout could have closed it.
    assert!(closed_within(&mut extra, Duration::from_secs(2)));
    assert_eq!(h.connections(), 16);
    // The held ones are still open.
    assert!(!closed_within(&mut held[0], Duration::from_millis(100)));
    // Room again once one ends: a real standby attaches.
    drop(held.pop());
    eventually("a slot given back", || h.connections() == 15);
    let s = standby(1, "s");
    let _f = s.follow_tcp(h.local_addr(), true).unwrap();
    a.wait_standbys_ready(1, Duration::from_secs(5)).unwrap();
    assert_eq!(h.connections(), 16);
    a.shutdown();
    s.shutdown();
}

#[test]
fn a_hello_trickled_a_byte_at_a_time_is_cut_off_at_the_deadline() {
    let deadline = Duration::from_millis(500);
    let (a, h) = limited(deadline, 16);
    let mut s = TcpStream::connect(h.local_addr()).unwrap();
    let bytes = hello(1, "slow");
    let started = Instant::now();
    let mut cut = false;
    // Each byte comes well within any per-read timeout; the whole hello would take 3 s.
    for b in bytes.iter().take(30) {
        if s.write_all(&[*b]).is_err() {
            cut = true;
            break;
        }
        thread::sleep(Duration::from_millis(100));
        if started.elapsed() > deadline * 4 {
            break;
        }
    }
    assert!(cut || closed_within(&mut s, Duration::from_secs(1)));
    eventually("the slot given back", || h.connections() == 0);
    assert!(a.status().standbys.is_empty());
    a.shutdown();
}

fn expect(node: &str, addr: &str) -> hitless_sync::ExpectedStandby {
    hitless_sync::ExpectedStandby {
        node: node.into(),
        addr: Some(addr.parse().unwrap()),
    }
}

#[test]
fn an_unexpected_standby_is_refused_a_snapshot() {
    let (a, h) = active(1, "a");
    a.apply(vec![put(1, "secret")]).unwrap();
    a.expect_standbys(Some(vec![expect("s", "127.0.0.1")]))
        .unwrap();
    // Another name, from an expected address.
    let x = standby(1, "x");
    let err = x.follow_tcp(h.local_addr(), true).unwrap_err();
    assert!(err.to_string().contains("did not tell"), "{err}");
    // The expected name, from another address than the one expected.
    a.expect_standbys(Some(vec![expect("s", "10.9.9.9")]))
        .unwrap();
    let s = standby(1, "s");
    let err = s.follow_tcp(h.local_addr(), true).unwrap_err();
    assert!(err.to_string().contains("did not tell"), "{err}");
    assert_eq!(a.status().snapshots_sent, 0);
    assert_eq!(x.get("kv", b"k1").unwrap(), None);
    assert_eq!(s.get("kv", b"k1").unwrap(), None);
    // The expected standby from its address is served.
    a.expect_standbys(Some(vec![expect("s", "127.0.0.1")]))
        .unwrap();
    let _f = s.follow_tcp(h.local_addr(), true).unwrap();
    a.wait_standbys_ready(1, Duration::from_secs(5)).unwrap();
    assert_eq!(a.status().snapshots_sent, 1);
    // No longer expected: detached.
    a.expect_standbys(Some(vec![expect("t", "127.0.0.1")]))
        .unwrap();
    eventually("the standby detached", || a.status().standbys.is_empty());
    a.shutdown();
    x.shutdown();
    s.shutdown();
}

#[test]
fn too_many_expected_standbys_are_refused_and_change_nothing() {
    let (a, h) = active(1, "a");
    a.expect_standbys(Some(vec![expect("s", "127.0.0.1")]))
        .unwrap();
    let many = (0..=hitless_sync::MAX_EXPECTED)
        .map(|i| expect(&format!("n{i}"), "127.0.0.1"))
        .collect();
    let err = a.expect_standbys(Some(many)).unwrap_err();
    assert!(err.to_string().contains("at most 16"), "{err}");
    // The previous list still holds: "s" is served, "x" refused.
    let s = standby(1, "s");
    let _f = s.follow_tcp(h.local_addr(), true).unwrap();
    let x = standby(1, "x");
    assert!(x.follow_tcp(h.local_addr(), true).is_err());
    a.shutdown();
    s.shutdown();
    x.shutdown();
}
