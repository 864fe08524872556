//! Standbys attaching mid-stream and re-attaching after being killed.
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;
use hitless_sync::Mutation;

#[test]
fn standby_attaching_mid_stream_while_writes_continue_ends_identical() {
    let (a, h) = active(1, "a");
    for i in 0..5_000 {
        a.apply(vec![put(i, "initial")]).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (a, stop) = (a.clone(), stop.clone());
        thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let batch = (0..16)
                    .map(|j| put((i * 16 + j) % 8_000, &format!("w{i}")))
                    .collect();
                a.apply(batch).unwrap();
                if i.is_multiple_of(7) {
                    a.apply(vec![Mutation::delete(
                        "kv",
                        format!("k{}", i % 8_000).into_bytes(),
                    )])
                    .unwrap();
                }
                i += 1;
            }
            i
        })
    };
    thread::sleep(Duration::from_millis(50));
    let s = standby(1, "s");
    let _f = s.follow_tcp(h.local_addr(), true).unwrap();
    s.wait_ready(Duration::from_secs(10)).unwrap();
    thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::SeqCst);
    let batches = writer.join().unwrap();
    assert!(batches > 0);
    // Synchronous mode: once the last apply returned, the standby has it all.
    let (aseq, arecs) = a.records();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while s.status().applied_seq < aseq && std::time::Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    let (sseq, srecs) = s.records();
    assert_eq!(aseq, sseq);
    assert_eq!(arecs, srecs);
    assert_eq!(a.digest(), s.digest());
    let st = a.status();
    assert_eq!(st.standbys.len(), 1);
    assert!(st.standbys[0].ready, "{st:?}");
    a.shutdown();
    s.shutdown();
}

#[test]
fn standby_killed_and_reattached_catches_up() {
    let (a, h) = active(1, "a");
    let s = standby(1, "s");
    let f = s.follow_tcp(h.local_addr(), true).unwrap();
    s.wait_ready(Duration::from_secs(5)).unwrap();
    for i in 0..1_000 {
        a.apply(vec![put(i, "one")]).unwrap();
    }
    // Kill the standby's link (as if its process died) and keep writing.
    f.stop();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !a.status().standbys.is_empty() && std::time::Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    assert!(
        a.status().standbys.is_empty(),
        "the active noticed the dead link"
    );
    for i in 500..2_000 {
        a.apply(vec![put(i, "two")]).unwrap();
    }
    // A fresh instance re-attaches under the same node name.
    let s2 = standby(1, "s");
    let _f2 = s2.follow_tcp(h.local_addr(), true).unwrap();
    s2.wait_ready(Duration::from_secs(5)).unwrap();
    a.apply(vec![put(9_999, "after")]).unwrap();
    assert_eq!(a.records(), s2.records());
    assert_eq!(
        s2.get("kv", b"k9999").unwrap().as_deref(),
        Some(b"after".as_slice())
    );
    a.shutdown();
    s.shutdown();
    s2.shutdown();
}
