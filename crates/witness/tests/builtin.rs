//! The builtin witness daemon and its client, in process on 127.0.0.1.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use hitless_core::{ControlEpoch, InstanceId};
use hitless_witness::builtin::frame::{
    encode_frame, read_frame, FrameKind, BUILD_FORMATS, HEADER_LEN, MAX_BODY_LEN, WIRE_VERSION,
};
use hitless_witness::builtin::{serve, Request, Response, ServeError, ServerConfig};
use hitless_witness::{
    BuiltinWitness, Cas, Lease, Versioned, Witness, WitnessError, WitnessRecord,
};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const TIMEOUT: Duration = Duration::from_secs(2);

struct Daemon {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), ServeError>>,
}

impl Daemon {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

fn config(dir: &Path, lease_max: Duration) -> ServerConfig {
    let mut c = ServerConfig::new(dir);
    c.lease_max = lease_max;
    c
}

async fn start_with(listen: SocketAddr, config: ServerConfig) -> Daemon {
    let listener = TcpListener::bind(listen).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(serve(listener, config, async {
        let _ = stopped.await;
    }));
    Daemon { addr, stop, task }
}

async fn start(dir: &Path, lease_max: Duration) -> Daemon {
    start_with("127.0.0.1:0".parse().unwrap(), config(dir, lease_max)).await
}

fn client(addrs: &[SocketAddr], pair: &str) -> BuiltinWitness {
    BuiltinWitness::new(addrs.to_vec(), pair.into(), TIMEOUT).unwrap()
}

fn rec(epoch: u64, c: u64, set: &[u64]) -> WitnessRecord {
    WitnessRecord {
        epoch: ControlEpoch(epoch),
        in_control: Some(InstanceId(c)),
        sync_set: set.iter().map(|i| InstanceId(*i)).collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_builtin_witness_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let lease_max = Duration::from_millis(500);
    let d = start(dir.path(), lease_max).await;
    // The suite's leases are granted only once the quarantine after the start is over.
    tokio::time::sleep(lease_max).await;
    let (a, b) = (client(&[d.addr], "pair-1"), client(&[d.addr], "pair-1"));
    hitless_witness::conformance::run_all(&a, &b).await;
    // Another pair is untouched.
    let other = client(&[d.addr], "pair-2");
    assert_eq!(other.read().await.unwrap(), Versioned::default());
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compare_and_swap_answered_before_a_restart_is_read_back_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), Duration::from_millis(100)).await;
    let addr = d.addr;
    let w = client(&[addr], "p");
    let Cas::Swapped { revision: r1 } = w.compare_and_swap(0, &rec(1, 1, &[])).await.unwrap()
    else {
        panic!("creation conflicted")
    };
    let Cas::Swapped { revision: r2 } = w.compare_and_swap(r1, &rec(1, 1, &[2])).await.unwrap()
    else {
        panic!("update conflicted")
    };
    d.stop().await;
    // The same client, its kept connection now dead, against the daemon restarted on the same
    // address and data directory.
    let d = start_with(addr, config(dir.path(), Duration::from_millis(100))).await;
    let expected = Versioned {
        record: rec(1, 1, &[2]),
        revision: r2,
    };
    assert_eq!(w.read().await.unwrap(), expected);
    match w.compare_and_swap(r1, &rec(9, 9, &[])).await.unwrap() {
        Cas::Conflict(v) => assert_eq!(v, expected),
        Cas::Swapped { .. } => panic!("a stale revision was written after the restart"),
    }
    assert!(matches!(
        w.compare_and_swap(r2, &rec(2, 2, &[])).await.unwrap(),
        Cas::Swapped { revision } if revision > r2
    ));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_lease_is_granted_for_one_lease_period_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let lease_max = Duration::from_millis(600);
    let d = start(dir.path(), lease_max).await;
    let started = Instant::now();
    let w = client(&[d.addr], "p");
    let ttl = Duration::from_millis(500);
    let retry_after = match w.lease("a", ttl).await.unwrap() {
        Lease::Refused {
            holder: None,
            retry_after,
        } => retry_after,
        other => panic!("a lease was answered {other:?} right after the start"),
    };
    assert!(
        !retry_after.is_zero() && retry_after <= lease_max,
        "{retry_after:?}"
    );
    // Reads and writes are served at once.
    assert!(matches!(
        w.compare_and_swap(0, &rec(1, 1, &[])).await.unwrap(),
        Cas::Swapped { .. }
    ));
    tokio::time::sleep(retry_after).await;
    assert!(started.elapsed() >= lease_max);
    assert!(matches!(
        w.lease("a", ttl).await.unwrap(),
        Lease::Granted { .. }
    ));
    // A ttl above the lease period is refused as a request.
    assert!(matches!(
        w.lease("a", lease_max + Duration::from_millis(1)).await,
        Err(WitnessError::Rejected(_))
    ));
    // Restarted while "a" holds the lease: nobody, not even "b", gets it for one period.
    let addr = d.addr;
    d.stop().await;
    let d = start_with(addr, config(dir.path(), lease_max)).await;
    let restarted = Instant::now();
    assert!(matches!(
        w.lease("b", ttl).await.unwrap(),
        Lease::Refused { holder: None, .. }
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    if restarted.elapsed() < lease_max {
        assert!(matches!(
            w.lease("b", ttl).await.unwrap(),
            Lease::Refused { .. }
        ));
    }
    tokio::time::sleep(lease_max.saturating_sub(restarted.elapsed())).await;
    assert!(matches!(
        w.lease("b", ttl).await.unwrap(),
        Lease::Granted { .. }
    ));
    d.stop().await;
}

/// Sends `bytes` on a fresh connection (after a hello if `hello`), and returns the answer
/// and whether the witness then closed the connection.
async fn send_raw(addr: SocketAddr, hello: bool, bytes: &[u8]) -> (Response, bool) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    if hello {
        let h = Request::Hello {
            formats: BUILD_FORMATS,
        };
        s.write_all(&h.encode(WIRE_VERSION).unwrap()).await.unwrap();
        let f = read_frame(&mut s, BUILD_FORMATS).await.unwrap().unwrap();
        assert!(matches!(
            Response::decode(&f).unwrap(),
            Response::Hello { .. }
        ));
    }
    s.write_all(bytes).await.unwrap();
    let f = tokio::time::timeout(TIMEOUT, read_frame(&mut s, BUILD_FORMATS))
        .await
        .expect("an answer in time")
        .unwrap()
        .expect("an answer");
    let answer = Response::decode(&f).unwrap();
    let closed = matches!(
        tokio::time::timeout(TIMEOUT, read_frame(&mut s, BUILD_FORMATS)).await,
        Ok(Ok(None)) | Ok(Err(_))
    );
    (answer, closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_get_an_error_and_leave_the_record_intact() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), Duration::from_millis(100)).await;
    let w = client(&[d.addr], "p");
    let Cas::Swapped { revision } = w.compare_and_swap(0, &rec(1, 1, &[])).await.unwrap() else {
        panic!("creation conflicted")
    };
    let before = w.read().await.unwrap();
    // A compare-and-swap that would land if it were read.
    let cas = Request::Cas {
        pair: "p".into(),
        expected_revision: revision,
        record: rec(7, 7, &[]),
    }
    .encode(WIRE_VERSION)
    .unwrap();
    let mut bad_crc = cas.clone();
    bad_crc[HEADER_LEN - 1] ^= 0x10;
    let mut bad_magic = cas.clone();
    bad_magic[..4].copy_from_slice(b"HLCT");
    let mut unknown_version = cas.clone();
    unknown_version[4] = 9;
    let mut oversized = cas[..HEADER_LEN].to_vec();
    oversized[6..10].copy_from_slice(&((MAX_BODY_LEN + 1) as u32).to_be_bytes());
    let not_json = encode_frame(WIRE_VERSION, FrameKind::Request, b"{\"type\":\"cas\"").unwrap();
    let wrong_kind = encode_frame(WIRE_VERSION, FrameKind::Response, b"{}").unwrap();
    let garbage = b"GET / HTTP/1.1\r\nHost: witness\r\n\r\n".to_vec();
    let cases: [(&str, &[u8], &str); 7] = [
        ("garbage", &garbage, "magic"),
        ("wrong magic", &bad_magic, "magic"),
        ("bad crc", &bad_crc, "checksum"),
        ("unknown version", &unknown_version, "format 9"),
        ("oversized", &oversized, "exceeds"),
        ("not json", &not_json, "malformed"),
        ("wrong kind", &wrong_kind, "Response"),
    ];
    for (name, bytes, says) in cases {
        for hello in [false, true] {
            let (answer, closed) = send_raw(d.addr, hello, bytes).await;
            match answer {
                Response::Error { message } => {
                    assert!(message.contains(says), "{name}: {message}")
                }
                other => panic!("{name}: answered {other:?}"),
            }
            assert!(closed, "{name}: the connection stays open");
        }
    }
    // A request before the hello is refused; the connection is closed.
    let (answer, closed) = send_raw(d.addr, false, &cas).await;
    assert!(matches!(answer, Response::Error { message } if message.contains("hello")));
    assert!(closed);
    // A well-formed request breaking a limit is refused, and the connection kept.
    let bad_pair = Request::Read {
        pair: "no/such".into(),
    };
    let bytes = serde_json::to_vec(&bad_pair).unwrap();
    let frame = encode_frame(WIRE_VERSION, FrameKind::Request, &bytes).unwrap();
    let (answer, closed) = send_raw(d.addr, true, &frame).await;
    assert!(matches!(answer, Response::Error { message } if message.contains("pair")));
    assert!(!closed, "a refused request closed the connection");
    assert_eq!(
        w.read().await.unwrap(),
        before,
        "a malformed frame changed the record"
    );
    d.stop().await;
}

#[tokio::test]
async fn an_unreachable_witness_answers_unreachable_within_the_timeout() {
    // Nothing listens: refused at once.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    // Listens but never answers: the timeout ends the call.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mute = silent.local_addr().unwrap();
    for addrs in [vec![dead], vec![mute], vec![dead, mute]] {
        let timeout = Duration::from_millis(300);
        let w = BuiltinWitness::new(addrs.clone(), "p".into(), timeout).unwrap();
        let t = Instant::now();
        let err = w.read().await.unwrap_err();
        assert!(
            matches!(err, WitnessError::Unreachable { .. }),
            "{addrs:?}: {err}"
        );
        assert!(
            t.elapsed() < timeout + Duration::from_millis(200),
            "{:?}",
            t.elapsed()
        );
    }
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_are_tried_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), Duration::from_millis(100)).await;
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    let w = client(&[dead, d.addr], "p");
    assert_eq!(w.read().await.unwrap(), Versioned::default());
    d.stop().await;
}

#[tokio::test]
async fn a_corrupt_record_file_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), Duration::from_millis(100)).await;
    let w = client(&[d.addr], "p");
    assert!(matches!(
        w.compare_and_swap(0, &rec(1, 1, &[])).await.unwrap(),
        Cas::Swapped { .. }
    ));
    d.stop().await;
    let path = dir.path().join("p.witness");
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 2;
    bytes[last] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = serve(
        listener,
        config(dir.path(), Duration::from_millis(100)),
        std::future::pending(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ServeError::Store(_)), "{err}");
    assert!(err.to_string().contains("p.witness"), "{err}");
}

#[tokio::test]
async fn idle_and_surplus_connections_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), Duration::from_millis(100));
    c.idle_timeout = Duration::from_millis(200);
    c.max_connections = 1;
    let d = start_with("127.0.0.1:0".parse().unwrap(), c).await;
    let mut idle = TcpStream::connect(d.addr).await.unwrap();
    // The only slot is taken: a second connection is told so and closed.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut surplus = TcpStream::connect(d.addr).await.unwrap();
    let f = read_frame(&mut surplus, BUILD_FORMATS)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(Response::decode(&f).unwrap(), Response::Error { message } if message.contains("at most 1"))
    );
    let t = Instant::now();
    let end = tokio::time::timeout(TIMEOUT, read_frame(&mut idle, BUILD_FORMATS))
        .await
        .expect("the idle connection is closed");
    assert!(matches!(end, Ok(None) | Err(_)));
    assert!(t.elapsed() < Duration::from_secs(1));
    // Its slot is free again.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let w = client(&[d.addr], "p");
    assert_eq!(w.read().await.unwrap(), Versioned::default());
    d.stop().await;
}
