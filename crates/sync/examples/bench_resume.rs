//! Times a standby's re-attach by resume, from its follow call until it is
//! ready, over loopback TCP, with a cross-version pair (active schema v2,
//! standby v1) holding 10,000 keys:
//! `cargo run --release -p hitless-sync --example bench_resume [-- KEYS ROUNDS]`.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use hitless_sync::{Mutation, Record, Replica, ReplicaConfig, Schema};

fn schema(version: u32) -> Schema {
    let mut s = Schema::new("kv", version)
        .table_in(1, "kv")
        .table_in(2, "kv");
    if version >= 2 {
        s = s
            .upgrade(1, |r: &Record| {
                Ok(Some(Record {
                    value: [b"v2|".as_slice(), &r.value].concat(),
                    ..r.clone()
                }))
            })
            .downgrade(2, |r: &Record| match r.value.strip_prefix(b"v2|") {
                Some(v) => Ok(Some(Record {
                    value: v.to_vec(),
                    ..r.clone()
                })),
                None => Err("value lacks the v2| prefix".into()),
            });
    }
    s
}

fn put(k: u64, round: u64) -> Mutation {
    Mutation::put(
        "kv",
        format!("key-{k:08}").into_bytes(),
        format!("v2|value {k} of round {round} padded to look like a record").into_bytes(),
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let keys: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let rounds: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(20);
    let mut cfg = ReplicaConfig::new("a");
    cfg.heartbeat = Duration::from_millis(100);
    let a = Replica::new(schema(2), cfg);
    a.activate(hitless_sync::ControlEpoch(1)).expect("activate");
    let h = a
        .serve(TcpListener::bind("127.0.0.1:0").expect("bind"))
        .expect("serve");
    let s = Replica::new(schema(1), ReplicaConfig::new("s"));
    let mut f = s.follow_tcp(h.local_addr(), true).expect("follow");
    s.wait_ready(Duration::from_secs(10)).expect("ready");
    for chunk in (0..keys).collect::<Vec<_>>().chunks(100) {
        a.apply(chunk.iter().map(|&k| put(k, 0)).collect())
            .expect("apply");
    }
    let scans = (
        a.status().digest_scan_records,
        s.status().digest_scan_records,
    );
    let mut follow_ms = Vec::new();
    let mut ready_ms = Vec::new();
    for round in 1..=rounds as u64 {
        f.stop();
        let t = Instant::now();
        while !a.status().standbys.is_empty() {
            assert!(t.elapsed() < Duration::from_secs(5), "standby not detached");
            std::thread::sleep(Duration::from_millis(1));
        }
        // A few batches the standby misses while detached.
        for b in 0..10u64 {
            a.apply(vec![put((round * 10 + b) % keys, round)])
                .expect("apply");
        }
        let t = Instant::now();
        f = s.follow_tcp(h.local_addr(), true).expect("follow");
        let followed = t.elapsed();
        s.wait_ready(Duration::from_secs(10)).expect("ready");
        let ready = t.elapsed();
        follow_ms.push(followed.as_secs_f64() * 1e3);
        ready_ms.push(ready.as_secs_f64() * 1e3);
    }
    let st = s.status();
    assert_eq!(st.resumes_received, rounds as u64, "{st:?}");
    assert_eq!(a.digest_in(1).expect("digest"), s.digest());
    f.stop();
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let (fm, fmin, fmax) = med(&mut follow_ms);
    let (rm, rmin, rmax) = med(&mut ready_ms);
    println!("resume re-attach, {keys} keys, active v2 -> standby v1, {rounds} rounds");
    println!(
        "  follow call (connect + handshake): median {fm:.2} ms (min {fmin:.2}, max {fmax:.2})"
    );
    println!(
        "  follow call to ready:              median {rm:.2} ms (min {rmin:.2}, max {rmax:.2})"
    );
    println!(
        "  records read by digest scans during the resumes: active {}, standby {}",
        a.status().digest_scan_records - scans.0,
        st.digest_scan_records - scans.1
    );
    a.shutdown();
    s.shutdown();
}
