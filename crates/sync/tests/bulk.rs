//! Bulk transfers of a large state in bounded steps, interleaved with the live
//! stream: the standby ends with exactly the active's state, in the native
//! and in a foreign stream version, with several standbys at once.
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use hitless_sync::{Mutation, Replica};

/// Records in the state before the attach: far more than one bulk chunk.
const RECORDS: u64 = 60_000;

fn load(a: &Replica, version: u32) {
    for chunk in 0..RECORDS / 500 {
        let batch = (chunk * 500..(chunk + 1) * 500)
            .map(|i| {
                if version == 1 {
                    put(i, &format!("initial-{i}-{}", "x".repeat(40)))
                } else {
                    put_v2(i, &format!("initial-{i}-{}", "x".repeat(40)))
                }
            })
            .collect();
        a.apply(batch).unwrap();
    }
}

/// Overwrites, inserts and deletes all over the key space until `stop`.
fn writer(a: Replica, version: u32, stop: Arc<AtomicBool>) -> thread::JoinHandle<u64> {
    thread::spawn(move || {
        let mut i = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let k = (i * 7919) % (RECORDS + 5_000);
            let v = format!("w{i}");
            let m = if version == 1 {
                put(k, &v)
            } else {
                put_v2(k, &v)
            };
            let mut batch = vec![m];
            if i.is_multiple_of(5) {
                let d = (i * 104_729) % (RECORDS + 5_000);
                batch.push(Mutation::delete("kv", format!("k{d}").into_bytes()));
            }
            a.apply(batch).unwrap();
            i += 1;
        }
        i
    })
}

fn wait_applied(s: &Replica, seq: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.status().applied_seq < seq && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
}

fn attach_under_writes(active_version: u32, standby_versions: &[u32]) {
    let (a, h) = active(active_version, "a");
    load(&a, active_version);
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(a.clone(), active_version, stop.clone());
    thread::sleep(Duration::from_millis(30));
    let standbys: Vec<Replica> = standby_versions
        .iter()
        .enumerate()
        .map(|(i, v)| standby(*v, &format!("s{i}")))
        .collect();
    // All attach at once (the first as the HA standby).
    let follows: Vec<_> = standbys
        .iter()
        .enumerate()
        .map(|(i, s)| s.follow_tcp(h.local_addr(), i == 0).unwrap())
        .collect();
    for s in &standbys {
        s.wait_ready(Duration::from_secs(30)).unwrap();
    }
    thread::sleep(Duration::from_millis(50));
    stop.store(true, Ordering::SeqCst);
    let writes = w.join().unwrap();
    assert!(writes > 0, "writes went on during the transfer");
    let st = a.status();
    assert_eq!(st.snapshots_sent, standbys.len() as u64);
    for sb in &st.standbys {
        assert!(
            sb.bulk_sent >= RECORDS / 2,
            "progress is reported: {} records sent to {}",
            sb.bulk_sent,
            sb.node
        );
    }
    let (aseq, _) = a.records();
    for (s, v) in standbys.iter().zip(standby_versions) {
        wait_applied(s, aseq);
        assert_eq!(s.status().applied_seq, aseq);
        // The states are equal, compared in the version whose build knows
        // both (a v1 build has no transforms).
        let (ad, sd) = if *v <= active_version {
            (a.digest_in(*v).unwrap(), s.digest())
        } else {
            (a.digest(), s.digest_in(active_version).unwrap())
        };
        assert_eq!(ad, sd, "standby of version {v} differs from the active");
        assert!(s.status().digest_matched);
        if *v == active_version {
            assert_eq!(a.records(), s.records());
        }
    }
    drop(follows);
    a.shutdown();
    for s in standbys {
        s.shutdown();
    }
}

#[test]
fn a_large_state_attaches_in_steps_while_writes_go_on_and_ends_identical() {
    attach_under_writes(1, &[1]);
}

#[test]
fn a_foreign_version_standby_attaches_in_steps_while_writes_go_on() {
    // v2 active, v1 standby: the stream is converted down, and the active
    // builds its digest in v1 in steps while it serves writes.
    attach_under_writes(2, &[1]);
}

#[test]
fn a_newer_standby_of_an_older_active_attaches_in_steps() {
    attach_under_writes(1, &[2]);
}

#[test]
fn three_standbys_attach_at_once_under_writes() {
    attach_under_writes(2, &[2, 1, 2]);
}

#[test]
fn a_native_standby_attaches_beside_a_foreign_one_one_after_the_other() {
    let (a, h) = active(2, "a");
    load(&a, 2);
    let s1 = standby(1, "s1");
    let _f1 = s1.follow_tcp(h.local_addr(), true).unwrap();
    s1.wait_ready(Duration::from_secs(30)).unwrap();
    let s2 = standby(2, "s2");
    let _f2 = s2.follow_tcp(h.local_addr(), false).unwrap();
    s2.wait_ready(Duration::from_secs(30)).unwrap();
    assert_eq!(a.status().standbys.len(), 2);
    assert_eq!(a.digest_in(1).unwrap(), s1.digest());
    assert_eq!(a.digest(), s2.digest());
    a.shutdown();
    s1.shutdown();
    s2.shutdown();
}
