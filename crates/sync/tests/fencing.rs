//! Fencing, switchover and synchronous acknowledgement.
mod common;

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use hitless_sync::wire::{self, Control, FrameType};
use hitless_sync::{Conn, Digest, Role, SyncError};

#[test]
fn old_active_fenced_after_switchover_cannot_acknowledge() {
    let (a, ha) = active(1, "a");
    let b = standby(1, "b");
    let _fb = b.follow_tcp(ha.local_addr(), true).unwrap();
    a.wait_standbys_ready(1, Duration::from_secs(5)).unwrap();
    let mut acked = Vec::new();
    for i in 0..500 {
        acked.push(a.apply(vec![put(i, "x")]).unwrap());
    }
    let epoch = a.switchover("b", Duration::from_secs(5)).unwrap();
    assert_eq!(epoch, hitless_sync::ControlEpoch(2));
    assert_eq!(b.role(), Role::Active);
    assert_eq!(b.epoch(), hitless_sync::ControlEpoch(2));
    assert_ne!(a.role(), Role::Active);
    // Nothing acknowledged is lost.
    let last = acked.last().unwrap().seq;
    assert_eq!(b.status().applied_seq, last);
    assert_eq!(a.records(), b.records());
    // The demoted active acknowledges nothing and applies nothing.
    let err = a.apply(vec![put(1, "lost?")]).unwrap_err();
    assert!(
        matches!(err, SyncError::NotActive { .. } | SyncError::Fenced { .. }),
        "{err}"
    );
    assert_eq!(
        a.get("kv", b"k1").unwrap().as_deref(),
        Some(b"x".as_slice())
    );
    // The new active accepts writes; the old one becomes its standby.
    let hb = b.serve(TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
    let _fa = a.follow_tcp(hb.local_addr(), true).unwrap();
    a.wait_ready(Duration::from_secs(5)).unwrap();
    b.wait_standbys_ready(1, Duration::from_secs(5)).unwrap();
    let t = b.apply(vec![put(1, "new")]).unwrap();
    assert_eq!(t.epoch, hitless_sync::ControlEpoch(2));
    assert_eq!(
        a.get("kv", b"k1").unwrap().as_deref(),
        Some(b"new".as_slice())
    );
    a.shutdown();
    b.shutdown();
}

/// A standby's hello never raises the epoch of the instance in control: only the control
/// plane does. The standby is refused, and the active keeps acknowledging.
#[test]
fn a_standby_hello_at_a_newer_epoch_is_refused_and_fences_nothing() {
    let (a, h) = active(1, "a");
    let s = standby(1, "s");
    s.fence(hitless_sync::ControlEpoch(5));
    let err = s.follow_tcp(h.local_addr(), true).unwrap_err();
    assert!(err.to_string().contains("epoch 5"), "{err}");
    assert_eq!(a.role(), Role::Active);
    assert_eq!(a.epoch(), hitless_sync::ControlEpoch(1));
    a.apply(vec![put(1, "x")]).unwrap();
    a.shutdown();
}

/// A scripted active: accepts one standby, sends `frames` after the welcome.
fn fake_active(welcome_epoch: u64, frames: Vec<Vec<u8>>) -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let f = wire::read_frame(&mut s).unwrap().unwrap();
        assert_eq!(f.kind, FrameType::Hello);
        let w = Control::Welcome {
            node: "fake".into(),
            native: 1,
            stream_version: 1,
            tables: vec!["kv".into()],
            format: None,
        };
        use std::io::Write;
        let _ = s.write_all(&w.encode(hitless_sync::ControlEpoch(welcome_epoch), 0));
        for f in frames {
            let _ = s.write_all(&f);
        }
        // Drain acks until the standby hangs up.
        let mut buf = [0u8; 4096];
        let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
        while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
    });
    addr
}

pub fn empty_bulk(epoch: u64) -> Vec<Vec<u8>> {
    vec![
        Control::BulkBegin { seq: 0, records: 0 }.encode(hitless_sync::ControlEpoch(epoch), 0),
        Control::BulkEnd {
            seq: 0,
            digest: Digest::default(),
            last_epoch: hitless_sync::ControlEpoch(0),
        }
        .encode(hitless_sync::ControlEpoch(epoch), 0),
    ]
}

pub fn batch(epoch: u64, first: u64, muts: &[hitless_sync::Mutation]) -> Vec<u8> {
    let mut p = first.to_le_bytes().to_vec();
    p.extend_from_slice(&wire::encode_batch_payload(muts));
    wire::encode_frame(
        FrameType::Batch,
        hitless_sync::ControlEpoch(epoch),
        first + muts.len() as u64 - 1,
        &p,
    )
}

#[test]
fn stale_epoch_frames_rejected() {
    let mut frames = empty_bulk(5);
    frames.push(batch(5, 1, &[put(1, "ok")]));
    frames.push(batch(4, 2, &[put(2, "stale")]));
    let addr = fake_active(5, frames);
    let s = standby(1, "s");
    let f = s.follow_tcp(addr, true).unwrap();
    let err = f.join().unwrap_err().to_string();
    assert!(err.contains("epoch 4") && err.contains("epoch 5"), "{err}");
    assert_eq!(s.status().applied_seq, 1);
    assert_eq!(
        s.get("kv", b"k1").unwrap().as_deref(),
        Some(b"ok".as_slice())
    );
    assert_eq!(s.get("kv", b"k2").unwrap(), None);
    s.shutdown();
}

/// A reader that holds what it reads while the gate is closed.
struct Gated {
    inner: TcpStream,
    open: Arc<AtomicBool>,
}

impl Read for Gated {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        // Bytes that arrived while the gate is closed are held until it opens.
        while !self.open.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(1));
        }
        Ok(n)
    }
}

#[test]
fn sync_mode_never_acknowledges_before_ha_standby_applied() {
    let (a, h) = active(1, "a");
    let s = standby(1, "s");
    let stream = TcpStream::connect(h.local_addr()).unwrap();
    let open = Arc::new(AtomicBool::new(true));
    let reader = Gated {
        inner: stream.try_clone().unwrap(),
        open: open.clone(),
    };
    let closer = stream.try_clone().unwrap();
    let conn = Conn::from_halves(
        reader,
        stream,
        Some(Box::new(move || {
            let _ = closer.shutdown(std::net::Shutdown::Both);
        })),
        "gated",
    );
    let _f = s.follow(conn, true).unwrap();
    s.wait_ready(Duration::from_secs(5)).unwrap();
    // The standby counts for acknowledgements once the active sees it in sync.
    a.wait_standbys_ready(1, Duration::from_secs(5)).unwrap();
    // Every acknowledgement finds the mutation applied on the standby.
    for i in 0..300 {
        let t = a.apply(vec![put(i, "x")]).unwrap();
        assert!(s.status().applied_seq >= t.seq);
    }
    // With the standby stalled, apply does not return.
    open.store(false, Ordering::SeqCst);
    let a2 = a.clone();
    let started = Instant::now();
    let pending = thread::spawn(move || a2.apply(vec![put(1_000, "held")]));
    thread::sleep(Duration::from_millis(300));
    assert!(
        !pending.is_finished(),
        "acknowledged before the standby applied"
    );
    assert_eq!(s.get("kv", b"k1000").unwrap(), None);
    open.store(true, Ordering::SeqCst);
    let t = pending.join().unwrap().unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(s.status().applied_seq >= t.seq);
    assert_eq!(
        s.get("kv", b"k1000").unwrap().as_deref(),
        Some(b"held".as_slice())
    );
    a.shutdown();
    s.shutdown();
}

/// A client whose reply waits on a batch that a quiesce already found durable must get its
/// acknowledgement even if it looks only after the old active learned of the new epoch (a
/// switchover completing while the client's thread was not scheduled).
#[test]
fn a_batch_found_durable_stays_acknowledged_after_a_newer_epoch_is_learned() {
    let (a, h) = active(1, "a");
    let b = standby(1, "b");
    let _fb = b.follow_tcp(h.local_addr(), true).unwrap();
    a.wait_standbys_ready(1, Duration::from_secs(5)).unwrap();
    let early = a.submit(vec![put(1, "x")]).unwrap();
    let last = a.submit(vec![put(2, "y")]).unwrap();
    // The quiesce's wait: everything up to `last` is durable.
    a.wait_durable(last).unwrap();
    a.fence(hitless_sync::ControlEpoch(2));
    assert_eq!(a.epoch(), hitless_sync::ControlEpoch(2));
    a.wait_durable(early)
        .expect("a batch found durable stays durable after a newer epoch");
    a.wait_durable(last).unwrap();
    // A batch submitted in the old epoch and never found durable is not acknowledged.
    let (c, hc) = active(1, "c");
    let d = standby(1, "d");
    let _fd = d.follow_tcp(hc.local_addr(), true).unwrap();
    c.wait_standbys_ready(1, Duration::from_secs(5)).unwrap();
    let unseen = c.submit(vec![put(3, "z")]).unwrap();
    c.fence(hitless_sync::ControlEpoch(2));
    let err = c.wait_durable(unseen).unwrap_err();
    assert!(matches!(err, SyncError::Fenced { .. }), "{err}");
    a.shutdown();
    b.shutdown();
    c.shutdown();
    d.shutdown();
}
