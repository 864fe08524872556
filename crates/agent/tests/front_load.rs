//! The service front against real kvd instances (in this process): a new client is served
//! while a thousand connections are busy, and a planned switchover neither waits for a client
//! that never reads its replies nor for a long pipeline, while every request runs exactly
//! once and in order.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hitless_agent::front::{Front, FrontLimits, Route};
use hitless_control::ControlHandler;
use hitless_core::ControlEpoch;
use hitless_sync::{Replica, ReplicaConfig, ServeHandle};
use kvd::db::Db;
use kvd::node::{Node, NodeConfig, NodeControl};
use kvd::resp::{encode_request, parse_reply, Reply};
use kvd::SchemaVersion;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A kvd instance served from this process: clients, state sync, and its control handler.
struct Kvd {
    node: Arc<Node>,
    service: SocketAddr,
    sync: SocketAddr,
    _sync: ServeHandle,
}

impl Kvd {
    fn start(id: &str) -> Kvd {
        let service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let sync = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (service_addr, sync_addr) = (service.local_addr().unwrap(), sync.local_addr().unwrap());
        let replica = Replica::new(SchemaVersion::V1.schema(), ReplicaConfig::new(id));
        let sync_handle = replica.serve(sync).unwrap();
        let db = Arc::new(Db::new(replica, SchemaVersion::V1, Duration::from_secs(10)));
        let node = Node::start(
            db.clone(),
            NodeConfig {
                instance_id: id.into(),
                image_version: "test".into(),
                service_addr: service_addr.to_string(),
                sync_addr: sync_addr.to_string(),
                kernel_release: None,
            },
        );
        let info: kvd::server::InfoFn = Arc::new(String::new);
        std::thread::spawn(move || {
            kvd::server::serve(service, db, info, kvd::server::ServerConfig::default())
        });
        Kvd {
            node,
            service: service_addr,
            sync: sync_addr,
            _sync: sync_handle,
        }
    }

    fn control(&self) -> NodeControl {
        NodeControl(self.node.clone())
    }

    fn applied(&self) -> u64 {
        self.node.db().replica().status().applied_seq
    }
}

/// A blocking RESP client.
struct Client {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Client { s, buf: Vec::new() }
    }

    fn send(&mut self, args: &[&str]) {
        self.s.write_all(&encode_request(args)).unwrap();
    }

    fn reply(&mut self) -> Reply {
        loop {
            if let Some((r, n)) = parse_reply(&self.buf).expect("a valid reply") {
                self.buf.drain(..n);
                return r;
            }
            let mut chunk = [0u8; 64 * 1024];
            let n = self.s.read(&mut chunk).expect("a reply in time");
            assert!(n > 0, "the connection was closed");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn cmd(&mut self, args: &[&str]) -> Reply {
        self.send(args);
        self.reply()
    }
}

fn front_to(backend: SocketAddr) -> (Front, SocketAddr, hitless_agent::front::Listening) {
    let front = Front::new(FrontLimits::default()).unwrap();
    let listening = front.listen("127.0.0.1:0".parse().unwrap()).unwrap();
    front.set_route(Route {
        epoch: ControlEpoch(1),
        backend: Some(backend),
        hold: false,
    });
    (front, listening.addr, listening)
}

/// A busy client: SET and GET one after the other as fast as answers come, until `stop`.
async fn busy(
    addr: SocketAddr,
    i: usize,
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    started: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
) {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        errors.fetch_add(1, Ordering::Relaxed);
        return;
    };
    s.set_nodelay(true).unwrap();
    let mut buf = Vec::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("busy:{i}:{}", n % 64);
        let req = if n.is_multiple_of(2) {
            encode_request(&["SET", &key, "v"])
        } else {
            encode_request(&["GET", &key])
        };
        if s.write_all(&req).await.is_err() {
            errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let reply = loop {
            if let Some((r, used)) = parse_reply(&buf).expect("a valid reply") {
                buf.drain(..used);
                break r;
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout(Duration::from_secs(30), s.read(&mut chunk)).await {
                Ok(Ok(k)) if k > 0 => buf.extend_from_slice(&chunk[..k]),
                _ => {
                    errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        };
        if matches!(reply, Reply::Error(_)) {
            errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if n == 0 {
            started.fetch_add(1, Ordering::Relaxed);
        }
        n += 1;
        served.fetch_add(1, Ordering::Relaxed);
    }
}

/// More busy connections than kvd used to accept, and than the instance's process limit used
/// to allow threads for.
const BUSY: usize = 1100;
/// The longest a new client's request may wait for its answer. Generous: on two shared cores
/// the answer takes milliseconds; a client starved by the busy ones waits seconds or forever.
const ANSWER_BOUND: Duration = Duration::from_secs(3);

#[test]
fn a_new_client_is_served_while_a_thousand_connections_are_busy() {
    let k = Kvd::start("i1");
    k.node.start_active(hitless_core::ControlEpoch(1)).unwrap();
    let (_front, addr, _listening) = front_to(k.service);
    let load = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (served, started, errors) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let tasks: Vec<_> = (0..BUSY)
        .map(|i| {
            load.spawn(busy(
                addr,
                i,
                stop.clone(),
                served.clone(),
                started.clone(),
                errors.clone(),
            ))
        })
        .collect();
    // Every busy connection is being served before the new client comes.
    let deadline = Instant::now() + Duration::from_secs(60);
    while (started.load(Ordering::Relaxed) as usize) < BUSY {
        assert_eq!(
            errors.load(Ordering::Relaxed),
            0,
            "a busy connection failed before all were served"
        );
        assert!(
            Instant::now() < deadline,
            "only {} of {BUSY} busy connections were served within 60 s",
            started.load(Ordering::Relaxed)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = served.load(Ordering::Relaxed);
    let mut c = Client::connect(addr);
    let mut slowest = Duration::ZERO;
    for i in 0..100 {
        let t = Instant::now();
        let r = c.cmd(&["SET", &format!("new:{i}"), "x"]);
        let took = t.elapsed();
        assert_eq!(r, Reply::ok(), "request {i} of the new client");
        assert!(
            took < ANSWER_BOUND,
            "request {i} of the new client waited {took:?} for its answer"
        );
        slowest = slowest.max(took);
    }
    let meanwhile = served.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    load.block_on(async {
        for t in tasks {
            let _ = t.await;
        }
    });
    assert_eq!(errors.load(Ordering::Relaxed), 0, "busy connections failed");
    assert!(
        meanwhile >= BUSY as u64,
        "the busy connections were served only {meanwhile} times while the new client was"
    );
    eprintln!("the new client's slowest answer: {slowest:?}; busy requests meanwhile: {meanwhile}");
}

fn integer(r: &Reply) -> i64 {
    match r {
        Reply::Integer(n) => *n,
        other => panic!("expected an integer reply, got {other:?}"),
    }
}

/// Pairs of requests (INCR, then GET of a large value) pipelined by the client that never
/// reads: their replies (tens of megabytes) fill the buffers between it, the front and the
/// instance, so that thousands of its requests stay in flight.
const NEVER_READ: usize = 3000;
/// The size of the value the never-reading client GETs.
const BIG: usize = 16 * 1024;
/// Requests of the client that pipelines while it reads.
const PIPELINED: usize = 50_000;

#[test]
fn a_switchover_completes_while_a_client_never_reads_and_another_pipelines() {
    let old = Kvd::start("i1");
    let new = Kvd::start("i2");
    old.node
        .start_active(hitless_core::ControlEpoch(1))
        .unwrap();
    new.node
        .start_standby(Some(old.sync.to_string()), hitless_core::ControlEpoch(1))
        .unwrap();
    old.node
        .db()
        .replica()
        .wait_standbys_ready(1, Duration::from_secs(20))
        .expect("the new instance follows the old one");
    let (front, addr, _listening) = front_to(old.service);
    let big = "b".repeat(BIG);
    assert_eq!(
        Client::connect(addr).cmd(&["SET", "big", &big]),
        Reply::ok()
    );

    // A client pipelines INCRs and GETs and reads nothing until the switchover is over.
    let mut quiet = Client::connect(addr);
    let quiet_writer = {
        let mut s = quiet.s.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut pair = encode_request(&["INCR", "quiet"]);
            pair.extend(encode_request(&["GET", "big"]));
            for _ in 0..NEVER_READ / 100 {
                s.write_all(&pair.repeat(100)).unwrap();
            }
        })
    };
    // Another pipelines INCRs while it reads their replies.
    let busy = Client::connect(addr);
    let mut busy_reader = Client {
        s: busy.s.try_clone().unwrap(),
        buf: Vec::new(),
    };
    let busy_writer = {
        let mut s = busy.s.try_clone().unwrap();
        std::thread::spawn(move || {
            let req = encode_request(&["INCR", "busy"]);
            for _ in 0..PIPELINED / 100 {
                s.write_all(&req.repeat(100)).unwrap();
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    let busy_check = std::thread::spawn(move || {
        for k in 1..=PIPELINED as i64 {
            assert_eq!(
                integer(&busy_reader.reply()),
                k,
                "the pipelining client's INCR replies run in order, each once"
            );
        }
    });
    // A third writes one key at a time throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let steady = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut c = Client::connect(addr);
            let mut acked = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("steady:{i}");
                assert_eq!(c.cmd(&["SET", &key, "v"]), Reply::ok(), "SET {key}");
                acked.push(key);
                i += 1;
            }
            acked
        })
    };
    // Wait until the quiet client's requests are stuck in flight: its replies have nowhere
    // to go (more than half of its requests, for longer than it takes to answer them).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut since: Option<Instant> = None;
    loop {
        let n = front.inflight();
        if n < NEVER_READ {
            since = None;
        } else if since.get_or_insert_with(Instant::now).elapsed() > Duration::from_millis(300) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the quiet client's requests never piled up in flight ({n} in flight)"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let held_inflight = front.inflight();

    // The planned switchover, as the driver runs it.
    let t0 = Instant::now();
    front.hold();
    old.control()
        .quiesce(hitless_core::ControlEpoch(1))
        .expect("quiesce");
    let want = old.applied();
    while new.applied() < want {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the new instance did not catch up"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    new.control()
        .promote(hitless_core::ControlEpoch(2))
        .expect("promote");
    old.control()
        .demote(hitless_core::ControlEpoch(2), Some(&new.sync.to_string()))
        .expect("demote");
    front.set_route(Route {
        epoch: ControlEpoch(2),
        backend: Some(new.service),
        hold: false,
    });
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "the switchover took {took:?} with {held_inflight} requests in flight"
    );

    // Now the quiet client reads: every INCR ran once, in order, on one instance or the other.
    quiet_writer.join().unwrap();
    for k in 1..=NEVER_READ as i64 {
        assert_eq!(
            integer(&quiet.reply()),
            k,
            "the quiet client's INCR replies run in order, each once"
        );
        assert_eq!(quiet.reply(), Reply::bulk(big.clone().into_bytes()));
    }
    busy_writer.join().unwrap();
    busy_check.join().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    let acked = steady.join().unwrap();

    // The new instance holds everything that was acknowledged.
    let mut direct = Client::connect(new.service);
    assert_eq!(
        direct.cmd(&["GET", "quiet"]),
        Reply::bulk(NEVER_READ.to_string().into_bytes())
    );
    assert_eq!(
        direct.cmd(&["GET", "busy"]),
        Reply::bulk(PIPELINED.to_string().into_bytes())
    );
    for key in &acked {
        assert_eq!(
            direct.cmd(&["GET", key]),
            Reply::bulk(b"v".to_vec()),
            "{key}"
        );
    }
    eprintln!(
        "switchover in {took:?} with {held_inflight} requests in flight; {} steady writes",
        acked.len()
    );
}
