//! Re-attaching standbys resume from the active's log instead of receiving a
//! full snapshot, when their history matches; otherwise they get a snapshot.
mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use hitless_sync::wire::{self, Control, FrameType};
use hitless_sync::{Digest, Replica, ResumePoint, Status};

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(2));
    }
}

fn wait_detached(a: &Replica) {
    wait_for("the active to drop the link", || {
        a.status().standbys.is_empty()
    });
}

fn counters(s: &Status) -> (u64, u64, u64, u64) {
    (
        s.snapshots_sent,
        s.resumes_sent,
        s.snapshots_received,
        s.resumes_received,
    )
}

#[test]
fn reattached_standby_resumes_without_a_snapshot() {
    let (a, h) = active(1, "a");
    for i in 0..200 {
        a.apply(vec![put(i, "before")]).unwrap();
    }
    let s = standby(1, "s");
    let f = s.follow_tcp(h.local_addr(), true).unwrap();
    s.wait_ready(Duration::from_secs(5)).unwrap();
    for i in 0..300 {
        a.apply(vec![put(i % 250, "attached"), put(1_000 + i, "x")])
            .unwrap();
    }
    assert_eq!(counters(&a.status()), (1, 0, 0, 0));
    assert_eq!(counters(&s.status()), (0, 0, 1, 0));
    f.stop();
    wait_detached(&a);
    // Writes go on while the standby is away, deletes included.
    for i in 0..400 {
        a.apply(vec![put(i, "away")]).unwrap();
        if i % 10 == 0 {
            a.apply(vec![hitless_sync::Mutation::delete(
                "kv",
                format!("k{}", 1_000 + i).into_bytes(),
            )])
            .unwrap();
        }
    }
    let away_seq = a.status().applied_seq;
    assert!(s.status().applied_seq < away_seq);
    let _f2 = s.follow_tcp(h.local_addr(), true).unwrap();
    s.wait_ready(Duration::from_secs(5)).unwrap();
    // No snapshot went out for the re-attach: the log was replayed.
    assert_eq!(counters(&a.status()), (1, 1, 0, 0));
    assert_eq!(counters(&s.status()), (0, 0, 1, 1));
    let st = a.status();
    assert_eq!(st.standbys.len(), 1);
    assert!(st.standbys[0].resumed && st.standbys[0].in_sync, "{st:?}");
    // The resumed standby counts for synchronous acknowledgements again.
    a.apply(vec![put(5_000, "after")]).unwrap();
    assert_eq!(
        s.get("kv", b"k5000").unwrap().as_deref(),
        Some(b"after".as_slice())
    );
    assert_eq!(a.records(), s.records());
    assert_eq!(a.digest(), s.digest());
    a.shutdown();
    s.shutdown();
}

#[test]
fn cross_version_standby_resumes_in_its_stream_version() {
    let (a, h) = active(1, "a");
    let s = standby(2, "s");
    let f = s.follow_tcp(h.local_addr(), true).unwrap();
    s.wait_ready(Duration::from_secs(5)).unwrap();
    for i in 0..100 {
        a.apply(vec![put(i, "one")]).unwrap();
    }
    f.stop();
    wait_detached(&a);
    for i in 50..150 {
        a.apply(vec![put(i, "two")]).unwrap();
    }
    let _f2 = s.follow_tcp(h.local_addr(), true).unwrap();
    s.wait_ready(Duration::from_secs(5)).unwrap();
    assert_eq!(counters(&a.status()).1, 1, "{:?}", a.status());
    assert_eq!(s.status().resumes_received, 1);
    assert_eq!(
        s.get("kv", b"k120").unwrap().as_deref(),
        Some(b"v2|two".as_slice())
    );
    assert_eq!(a.digest(), s.digest_in(1).unwrap());
    a.shutdown();
    s.shutdown();
}

#[test]
fn diverged_standby_falls_back_to_a_snapshot() {
    let (a, h) = active(1, "a");
    let b = standby(1, "b");
    let f = b.follow_tcp(h.local_addr(), true).unwrap();
    b.wait_ready(Duration::from_secs(5)).unwrap();
    for i in 0..10 {
        a.apply(vec![put(i, "common")]).unwrap();
    }
    f.stop();
    wait_detached(&a);
    // Both sides go on separately from sequence 10: a split history.
    for i in 10..20 {
        a.apply(vec![put(i, "a-side")]).unwrap();
    }
    b.activate(hitless_sync::ControlEpoch(2)).unwrap();
    for i in 10..15 {
        b.apply(vec![put(i, "b-side")]).unwrap();
    }
    b.demote().unwrap();
    a.activate(hitless_sync::ControlEpoch(3)).unwrap();
    a.apply(vec![put(99, "a-epoch-3")]).unwrap();
    assert_eq!(b.status().applied_seq, 15);
    // b's last batch (sequence 15) was applied in epoch 2; a's sequence 15
    // belongs to epoch 1: the histories differ, so b receives a snapshot.
    let _f2 = b.follow_tcp(h.local_addr(), true).unwrap();
    b.wait_ready(Duration::from_secs(5)).unwrap();
    assert_eq!(counters(&a.status()), (2, 0, 0, 0));
    assert_eq!(counters(&b.status()).2, 2);
    assert_eq!(b.status().resumes_received, 0);
    assert_eq!(a.records(), b.records());
    assert_eq!(
        b.get("kv", b"k12").unwrap().as_deref(),
        Some(b"a-side".as_slice())
    );
    a.shutdown();
    b.shutdown();
}

#[test]
fn standby_behind_the_log_falls_back_to_a_snapshot() {
    let mut cfg = config("a");
    cfg.resume_log_batches = 50;
    let a = Replica::new(schema(1), cfg);
    a.activate(hitless_sync::ControlEpoch(1)).unwrap();
    let h = a.serve(TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
    let s = standby(1, "s");
    let f = s.follow_tcp(h.local_addr(), true).unwrap();
    s.wait_ready(Duration::from_secs(5)).unwrap();
    for i in 0..20 {
        a.apply(vec![put(i, "one")]).unwrap();
    }
    f.stop();
    wait_detached(&a);
    // More batches than the log keeps.
    for i in 0..100 {
        a.apply(vec![put(i, "two")]).unwrap();
    }
    let _f2 = s.follow_tcp(h.local_addr(), true).unwrap();
    s.wait_ready(Duration::from_secs(5)).unwrap();
    assert_eq!(counters(&a.status()), (2, 0, 0, 0));
    assert_eq!(a.records(), s.records());
    a.shutdown();
    s.shutdown();
}

#[test]
fn resume_across_planned_switchover_keeps_state_identical() {
    let (a, ha) = active(2, "a");
    let b = standby(2, "b");
    let _fb = b.follow_tcp(ha.local_addr(), true).unwrap();
    b.wait_ready(Duration::from_secs(5)).unwrap();
    for i in 0..300 {
        a.apply(vec![put_v2(i, "a-era")]).unwrap();
    }
    let seq_at_switch = a.status().applied_seq;
    assert_eq!(seq_at_switch, 300);
    let epoch = a.switchover("b", Duration::from_secs(5)).unwrap();
    assert_eq!(b.role(), hitless_sync::Role::Active);
    let hb = b.serve(TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
    // Sequence numbers continue on the new active.
    let t = b.apply(vec![put_v2(1, "b-era")]).unwrap();
    assert_eq!((t.seq, t.epoch), (seq_at_switch + 1, epoch));
    for i in 0..200 {
        b.apply(vec![put_v2(i * 3, "b-era")]).unwrap();
    }
    // The old active follows the new one and resumes: it was a standby of
    // the same history, so no snapshot is needed.
    let _fa = a.follow_tcp(hb.local_addr(), true).unwrap();
    a.wait_ready(Duration::from_secs(5)).unwrap();
    assert_eq!(counters(&b.status()), (0, 1, 1, 0));
    assert_eq!(counters(&a.status()), (1, 0, 0, 1));
    b.apply(vec![put_v2(7_777, "synced")]).unwrap();
    assert_eq!(a.records(), b.records());
    assert_eq!(a.digest(), b.digest());
    // And back again: b resumes from a after a second switchover.
    let epoch2 = b.switchover("a", Duration::from_secs(5)).unwrap();
    assert_eq!(epoch2, epoch.next());
    let ha2 = a.serve(TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
    for i in 0..50 {
        a.apply(vec![put_v2(i, "a-again")]).unwrap();
    }
    let _fb2 = b.follow_tcp(ha2.local_addr(), true).unwrap();
    b.wait_ready(Duration::from_secs(5)).unwrap();
    assert_eq!(a.status().resumes_sent, 1);
    assert_eq!(b.status().resumes_received, 1);
    assert_eq!(b.status().snapshots_received, 1);
    a.apply(vec![put_v2(8_888, "last")]).unwrap();
    assert_eq!(a.records(), b.records());
    assert_eq!(a.status().applied_seq, seq_at_switch + 1 + 200 + 1 + 50 + 1);
    drop(ha);
    a.shutdown();
    b.shutdown();
}

/// A fake active on loopback: reads the hello, answers with `frames`, then
/// waits for the standby to close. Returns the address and the hello.
fn fake_active(
    frames: impl FnOnce(&Control) -> Vec<u8> + Send + 'static,
) -> (std::net::SocketAddr, thread::JoinHandle<Control>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let hello = wire::read_frame(&mut s).unwrap().unwrap();
        let hello = Control::decode(&hello).unwrap();
        let mut out = Control::Welcome {
            node: "fake".into(),
            native: 1,
            stream_version: 1,
            tables: vec!["kv".into()],
            format: None,
        }
        .encode(hitless_sync::ControlEpoch(1), 0);
        out.extend(frames(&hello));
        s.write_all(&out).unwrap();
        let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
        let mut buf = [0u8; 4096];
        while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
        hello
    });
    (addr, t)
}

/// A standby that followed a real active to sequence 20, then detached.
fn detached_standby() -> (Replica, Replica, hitless_sync::ServeHandle) {
    let (a, h) = active(1, "a");
    let s = standby(1, "s");
    let f = s.follow_tcp(h.local_addr(), true).unwrap();
    s.wait_ready(Duration::from_secs(5)).unwrap();
    for i in 0..20 {
        a.apply(vec![put(i, "real")]).unwrap();
    }
    f.stop();
    wait_detached(&a);
    (a, s, h)
}

#[test]
fn replayed_batch_outside_a_resume_is_refused_without_applying() {
    let (a, s, _h) = detached_standby();
    let before = s.records();
    let (addr, t) = fake_active(|_| {
        // A bulk snapshot was not asked for, no resume was offered: a
        // replayed batch is out of place.
        let mut p = 1u64.to_le_bytes().to_vec();
        p.extend_from_slice(&21u64.to_le_bytes());
        p.extend_from_slice(&wire::encode_batch_payload(&[put(1, "bad")]));
        wire::encode_frame(
            FrameType::ReplayBatch,
            hitless_sync::ControlEpoch(1),
            21,
            &p,
        )
    });
    let f = s.follow_tcp(addr, true).unwrap();
    let err = f.join().unwrap_err().to_string();
    assert!(err.contains("outside a resume"), "{err}");
    assert_eq!(s.records(), before);
    t.join().unwrap();
    a.shutdown();
    s.shutdown();
}

#[test]
fn resume_ending_in_a_digest_mismatch_is_dropped_and_next_attach_takes_a_snapshot() {
    let (a, s, h) = detached_standby();
    let (addr, t) = fake_active(|hello| {
        let Control::Hello {
            resume: Some(p), ..
        } = hello
        else {
            panic!("the standby did not offer a resume point: {hello:?}");
        };
        let mut out = Control::ResumeBegin {
            from: p.seq,
            seq: p.seq,
            batches: 0,
        }
        .encode(hitless_sync::ControlEpoch(1), p.seq);
        out.extend(
            Control::ResumeEnd {
                seq: p.seq,
                last_epoch: p.epoch,
                digest: Digest::default(),
            }
            .encode(hitless_sync::ControlEpoch(1), p.seq),
        );
        out
    });
    let f = s.follow_tcp(addr, true).unwrap();
    let err = f.join().unwrap_err().to_string();
    assert!(err.contains("differs from the active's"), "{err}");
    let hello = t.join().unwrap();
    assert!(matches!(
        hello,
        Control::Hello {
            resume: Some(ResumePoint {
                seq: 20,
                epoch: hitless_sync::ControlEpoch(1)
            }),
            ..
        }
    ));
    assert_eq!(s.status().resumes_received, 0);
    // Its state is no longer trusted: the next attach is a full snapshot.
    let _f = s.follow_tcp(h.local_addr(), true).unwrap();
    s.wait_ready(Duration::from_secs(5)).unwrap();
    assert_eq!(counters(&a.status()), (2, 0, 0, 0));
    assert_eq!(s.status().snapshots_received, 2);
    assert_eq!(a.records(), s.records());
    a.shutdown();
    s.shutdown();
}

#[test]
fn resumed_cross_version_standby_becomes_ready_without_a_full_state_scan() {
    // Active v2, standby v1: the stream and both digests are in v1, which
    // the active keeps per mutation from the start and the standby natively.
    let (a, h) = active(2, "a");
    let s = standby(1, "s");
    let f = s.follow_tcp(h.local_addr(), true).unwrap();
    s.wait_ready(Duration::from_secs(5)).unwrap();
    for chunk in (0..2000u64).collect::<Vec<_>>().chunks(100) {
        a.apply(chunk.iter().map(|&i| put_v2(i, "one")).collect())
            .unwrap();
    }
    f.stop();
    wait_detached(&a);
    for i in 0..5 {
        a.apply(vec![put_v2(i, "two")]).unwrap();
    }
    let (a0, s0) = (
        a.status().digest_scan_records,
        s.status().digest_scan_records,
    );
    let _f2 = s.follow_tcp(h.local_addr(), true).unwrap();
    s.wait_ready(Duration::from_secs(5)).unwrap();
    a.wait_standbys_ready(1, Duration::from_secs(5)).unwrap();
    let (sa, ss) = (a.status(), s.status());
    assert_eq!(sa.resumes_sent, 1, "{sa:?}");
    assert_eq!(ss.resumes_received, 1, "{ss:?}");
    assert!(ss.digest_matched && sa.standbys[0].in_sync, "{ss:?} {sa:?}");
    // Neither side read the 2,000-record state to compare digests.
    assert_eq!(sa.digest_scan_records, a0, "active scanned: {sa:?}");
    assert_eq!(ss.digest_scan_records, s0, "standby scanned: {ss:?}");
    assert_eq!(
        s.get("kv", b"k3").unwrap().as_deref(),
        Some(b"two".as_slice())
    );
    // The kept digests are the real ones.
    let (_, d) = a.digest_in(1).unwrap();
    let mut scanned = hitless_sync::Digest::default();
    for r in a.records().1 {
        if r.table == "kv" {
            let v = r.value.strip_prefix(b"v2|").unwrap();
            scanned.add(&r.table, &r.key, v);
        }
    }
    assert_eq!(d, scanned);
    assert_eq!(s.digest().1, scanned);
    a.shutdown();
    s.shutdown();
}
