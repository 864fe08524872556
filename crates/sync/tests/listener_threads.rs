//! A flood of connections that never finish their hello is held to the listener's cap of
//! threads and closed at the handshake deadline. Alone in its test binary: it counts the
//! process's threads.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use hitless_sync::{serve_with, ControlEpoch, Replica, ReplicaConfig, Schema, ServeLimits};

/// Threads of this process named `name`.
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|c| c.trim_end() == name)
        .count()
}

#[test]
fn a_hundred_silent_connections_do_not_become_a_hundred_threads_and_are_closed() {
    let r = Replica::new(Schema::new("kv", 1).table("kv"), ReplicaConfig::new("a"));
    r.activate(ControlEpoch(1)).unwrap();
    let limits = ServeLimits {
        handshake_deadline: Duration::from_secs(2),
        max_connections: 16,
    };
    let h = serve_with(
        TcpListener::bind("127.0.0.1:0").unwrap(),
        vec![r.clone()],
        limits,
    )
    .unwrap();
    let before = std::fs::read_dir("/proc/self/task").unwrap().count();
    let mut conns: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect(h.local_addr()).unwrap())
        .collect();
    // Every connection was accepted and either holds a slot or was closed at once.
    let until = Instant::now() + Duration::from_secs(10);
    while h.connections() < 16 {
        assert!(Instant::now() < until, "the listener never filled its cap");
        thread::sleep(Duration::from_millis(10));
    }
    let handshakes = threads_named("sync-handshake");
    let all = std::fs::read_dir("/proc/self/task").unwrap().count();
    assert!(handshakes <= 16, "{handshakes} handshake threads");
    let more = all.saturating_sub(before);
    assert!(more <= 16, "{more} more threads");
    assert!(h.connections() <= 16);
    // Past the deadline every one of them is closed and the slots given back.
    for c in &mut conns {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 64];
        let r = c.read(&mut buf);
        assert!(
            matches!(r, Ok(0))
                || matches!(&r, Err(e) if e.kind() != std::io::ErrorKind::WouldBlock && e.kind() != std::io::ErrorKind::TimedOut),
            "a silent connection stayed open: {r:?}"
        );
    }
    let until = Instant::now() + Duration::from_secs(10);
    while h.connections() > 0 || threads_named("sync-handshake") > 0 {
        assert!(
            Instant::now() < until,
            "slots or threads left after the deadline"
        );
        thread::sleep(Duration::from_millis(10));
    }
    r.shutdown();
}
