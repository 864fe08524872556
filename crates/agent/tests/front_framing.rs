//! The service front with each of its framings (RESP, length-prefixed, opaque) against small
//! echo instances: replies in order under pipelining, a planned switchover (held requests move
//! to the new instance; opaque connections are drained instead), protocol errors, RESP3 maps
//! and pushes, and the protocol chosen per front.
//!
//! The instances parse requests with their own code (kvd's RESP parser, a length prefix read by
//! hand), not with the front's framing, so that a framing bug is not mirrored by the service.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hitless_agent::framing::Protocol;
use hitless_agent::front::{Front, FrontLimits, Listening, Route};
use hitless_core::ControlEpoch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// What an instance has seen.
#[derive(Clone, Default)]
struct Seen {
    /// Connections accepted.
    accepted: Arc<AtomicUsize>,
    /// Bytes received, over all connections.
    received: Arc<AtomicUsize>,
    /// Whole requests received (framed protocols).
    requests: Arc<AtomicUsize>,
}

impl Seen {
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
    fn received(&self) -> usize {
        self.received.load(Ordering::SeqCst)
    }
    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// An echo instance named `name`: RESP requests are answered `+<name>:<args joined by
/// spaces>`, a length-prefixed request with the message `<name>:<payload>`, opaque bytes are
/// sent back as they came.
async fn echo(name: &'static str, protocol: Protocol) -> (SocketAddr, Seen) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Seen::default();
    let counters = seen.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            counters.accepted.fetch_add(1, Ordering::SeqCst);
            let seen = counters.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    seen.received.fetch_add(n, Ordering::SeqCst);
                    buf.extend_from_slice(&chunk[..n]);
                    let mut out = Vec::new();
                    match protocol {
                        Protocol::Opaque => out = std::mem::take(&mut buf),
                        Protocol::Resp => {
                            let limits = kvd::resp::Limits::default();
                            while let Ok(Some((args, used))) =
                                kvd::resp::parse_request(&buf, &limits)
                            {
                                buf.drain(..used);
                                seen.requests.fetch_add(1, Ordering::SeqCst);
                                let args: Vec<String> = args
                                    .iter()
                                    .map(|a| String::from_utf8_lossy(a).into_owned())
                                    .collect();
                                out.extend(format!("+{name}:{}\r\n", args.join(" ")).bytes());
                            }
                        }
                        Protocol::LengthPrefixed => {
                            while buf.len() >= 4 {
                                let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
                                if buf.len() < 4 + len {
                                    break;
                                }
                                let payload: Vec<u8> = buf.drain(..4 + len).skip(4).collect();
                                seen.requests.fetch_add(1, Ordering::SeqCst);
                                out.extend(lp(&[format!("{name}:").as_bytes(), &payload].concat()));
                            }
                        }
                    }
                    if s.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// A RESP instance that counts the requests of its one connection and writes exactly what the
/// test sends through the channel, when it sends it.
async fn scripted() -> (SocketAddr, Seen, mpsc::UnboundedSender<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let seen = Seen::default();
    let counters = seen.clone();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        counters.accepted.fetch_add(1, Ordering::SeqCst);
        let (mut r, mut w) = s.split();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            tokio::select! {
                n = r.read(&mut chunk) => {
                    let n = match n {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    let limits = kvd::resp::Limits::default();
                    while let Ok(Some((_, used))) = kvd::resp::parse_request(&buf, &limits) {
                        buf.drain(..used);
                        counters.requests.fetch_add(1, Ordering::SeqCst);
                    }
                }
                bytes = rx.recv() => match bytes {
                    Some(bytes) => w.write_all(&bytes).await.unwrap(),
                    None => return,
                },
            }
        }
    });
    (addr, seen, tx)
}

/// A length-prefixed message.
fn lp(payload: &[u8]) -> Vec<u8> {
    let mut m = u32::try_from(payload.len()).unwrap().to_be_bytes().to_vec();
    m.extend_from_slice(payload);
    m
}

/// A RESP request.
fn req(args: &[&str]) -> Vec<u8> {
    kvd::resp::encode_request(args)
}

/// A front speaking `protocol` on a free port, routed to `backend` at epoch 1.
fn front_with(protocol: Protocol, limits: FrontLimits, backend: SocketAddr) -> (Front, Listening) {
    let front = Front::with_protocol(limits, protocol).unwrap();
    let listening = front.listen("127.0.0.1:0".parse().unwrap()).unwrap();
    front.set_route(Route {
        epoch: ControlEpoch(1),
        backend: Some(backend),
        hold: false,
    });
    (front, listening)
}

fn route(front: &Front, epoch: u64, backend: SocketAddr) {
    front.set_route(Route {
        epoch: ControlEpoch(epoch),
        backend: Some(backend),
        hold: false,
    });
}

/// The next `n` bytes the front sends the client (within 5 s).
async fn read_n(c: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut got = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut got))
        .await
        .expect("the replies within 5 s")
        .unwrap();
    got
}

/// Everything the front sends until it closes the connection (within `bound`).
async fn read_to_close(c: &mut TcpStream, bound: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(bound, c.read_to_end(&mut out))
        .await
        .unwrap_or_else(|_| panic!("the front did not close the connection within {bound:?}"))
        .unwrap();
    out
}

/// Asserts that the front sends the client nothing for `quiet`.
async fn nothing_for(c: &mut TcpStream, quiet: Duration) {
    let mut byte = [0u8; 1];
    match tokio::time::timeout(quiet, c.read(&mut byte)).await {
        Err(_) => {}
        Ok(r) => panic!("the client got {r:?} where it had to wait"),
    }
}

/// Waits (at most 2 s) until `cond` holds.
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits (at most 2 s) until the front has no request in flight.
async fn nothing_in_flight(front: &Front) {
    eventually("nothing in flight", || front.inflight() == 0).await;
}

// RESP

#[tokio::test]
async fn resp_pipelined_requests_are_answered_in_order() {
    let (a, seen) = echo("a", Protocol::Resp).await;
    let (front, listening) = front_with(Protocol::Resp, FrontLimits::default(), a);
    let mut client = TcpStream::connect(listening.addr).await.unwrap();
    let n = 100;
    let mut burst = Vec::new();
    let mut want = Vec::new();
    for i in 0..n {
        burst.extend(req(&["ECHO", &i.to_string()]));
        want.extend(format!("+a:ECHO {i}\r\n").bytes());
    }
    // One write for the whole pipeline, then a request cut in pieces.
    client.write_all(&burst).await.unwrap();
    let last = req(&["ECHO", "last"]);
    for piece in last.chunks(3) {
        client.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    want.extend(b"+a:ECHO last\r\n");
    assert_eq!(read_n(&mut client, want.len()).await, want);
    nothing_in_flight(&front).await;
    assert_eq!(seen.requests(), n + 1);
    assert_eq!(front.stats(true).forwarded, n as u64 + 1);
}

#[tokio::test]
async fn resp_requests_held_over_a_planned_switchover_reach_the_new_instance() {
    let (a, seen_a) = echo("a", Protocol::Resp).await;
    let (b, seen_b) = echo("b", Protocol::Resp).await;
    let (front, listening) = front_with(Protocol::Resp, FrontLimits::default(), a);
    let mut client = TcpStream::connect(listening.addr).await.unwrap();
    client.write_all(&req(&["ECHO", "0"])).await.unwrap();
    assert_eq!(read_n(&mut client, 11).await, b"+a:ECHO 0\r\n");
    front.hold();
    let mut held = Vec::new();
    for i in 1..=5 {
        held.extend(req(&["ECHO", &i.to_string()]));
    }
    client.write_all(&held).await.unwrap();
    nothing_for(&mut client, Duration::from_millis(100)).await;
    assert_eq!(
        seen_a.requests(),
        1,
        "a held request reached the old instance"
    );
    route(&front, 2, b);
    let want: Vec<u8> = (1..=5)
        .flat_map(|i| format!("+b:ECHO {i}\r\n").into_bytes())
        .collect();
    assert_eq!(read_n(&mut client, want.len()).await, want);
    assert_eq!(seen_b.requests(), 5);
    nothing_in_flight(&front).await;
}

#[tokio::test]
async fn resp_protocol_error_is_an_err_reply_and_is_counted() {
    let (a, seen) = echo("a", Protocol::Resp).await;
    let (front, listening) = front_with(Protocol::Resp, FrontLimits::default(), a);
    let mut client = TcpStream::connect(listening.addr).await.unwrap();
    client.write_all(&req(&["ECHO", "ok"])).await.unwrap();
    assert_eq!(read_n(&mut client, 12).await, b"+a:ECHO ok\r\n");
    client.write_all(b"$x\r\n").await.unwrap();
    let rest = read_to_close(&mut client, Duration::from_secs(5)).await;
    let text = String::from_utf8_lossy(&rest);
    assert!(text.starts_with("-ERR protocol error: "), "{text}");
    assert!(text.ends_with("\r\n"), "{text}");
    assert_eq!(front.stats(true).protocol_errors, 1);
    assert_eq!(seen.requests(), 1, "the malformed bytes were forwarded");
    nothing_in_flight(&front).await;
}

/// A RESP3 map of one pair (`%1` and two elements) is one reply and answers one request: the
/// second request of the pipeline stays in flight until its own reply comes.
#[tokio::test]
async fn resp3_map_is_one_reply_for_one_request() {
    const MAP: &[u8] = b"%1\r\n+a\r\n+b\r\n";
    let (addr, seen, instance) = scripted().await;
    let (front, listening) = front_with(Protocol::Resp, FrontLimits::default(), addr);
    let mut client = TcpStream::connect(listening.addr).await.unwrap();
    client
        .write_all(&[req(&["HELLO", "3"]), req(&["PING"])].concat())
        .await
        .unwrap();
    eventually("both requests at the instance", || seen.requests() == 2).await;
    assert_eq!(front.inflight(), 2);
    instance.send(MAP.to_vec()).unwrap();
    assert_eq!(read_n(&mut client, MAP.len()).await, MAP);
    eventually("the map answered one request", || front.inflight() == 1).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        front.inflight(),
        1,
        "the map answered more than one request"
    );
    instance.send(b"+PONG\r\n".to_vec()).unwrap();
    assert_eq!(read_n(&mut client, 7).await, b"+PONG\r\n");
    nothing_in_flight(&front).await;
}

/// A RESP3 push that comes before the reply is passed to the client at once and answers no
/// request: the request keeps waiting for its reply.
#[tokio::test]
async fn resp3_push_before_a_reply_reaches_the_client_and_answers_nothing() {
    const PUSH: &[u8] = b">2\r\n+msg\r\n+x\r\n";
    let (addr, seen, instance) = scripted().await;
    let (front, listening) = front_with(Protocol::Resp, FrontLimits::default(), addr);
    let mut client = TcpStream::connect(listening.addr).await.unwrap();
    client.write_all(&req(&["GET", "k"])).await.unwrap();
    eventually("the request at the instance", || seen.requests() == 1).await;
    instance.send(PUSH.to_vec()).unwrap();
    assert_eq!(read_n(&mut client, PUSH.len()).await, PUSH);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(front.inflight(), 1, "the push answered the request");
    instance.send(b"$1\r\nv\r\n".to_vec()).unwrap();
    assert_eq!(read_n(&mut client, 7).await, b"$1\r\nv\r\n");
    nothing_in_flight(&front).await;
}

// Length-prefixed

#[tokio::test]
async fn length_prefixed_pipelined_requests_are_answered_in_order() {
    let (a, seen) = echo("a", Protocol::LengthPrefixed).await;
    let (front, listening) = front_with(Protocol::LengthPrefixed, FrontLimits::default(), a);
    let mut client = TcpStream::connect(listening.addr).await.unwrap();
    let payloads: Vec<Vec<u8>> = (0..100u32)
        .map(|i| {
            // Binary payloads of varied lengths, an empty one among them; CRLF means nothing.
            let mut p = i.to_be_bytes().to_vec();
            p.extend(std::iter::repeat_n(b'\r', (i % 7) as usize));
            if i == 50 {
                p.clear();
            }
            p
        })
        .collect();
    let burst: Vec<u8> = payloads.iter().flat_map(|p| lp(p)).collect();
    client.write_all(&burst).await.unwrap();
    // Then one request byte by byte.
    for byte in lp(b"last") {
        client.write_all(&[byte]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let want: Vec<u8> = payloads
        .iter()
        .map(|p| p.as_slice())
        .chain([&b"last"[..]])
        .flat_map(|p| lp(&[&b"a:"[..], p].concat()))
        .collect();
    assert_eq!(read_n(&mut client, want.len()).await, want);
    nothing_in_flight(&front).await;
    assert_eq!(seen.requests(), 101);
    assert_eq!(front.stats(true).forwarded, 101);
}

#[tokio::test]
async fn length_prefixed_requests_held_over_a_planned_switchover_reach_the_new_instance() {
    let (a, seen_a) = echo("a", Protocol::LengthPrefixed).await;
    let (b, seen_b) = echo("b", Protocol::LengthPrefixed).await;
    let (front, listening) = front_with(Protocol::LengthPrefixed, FrontLimits::default(), a);
    let mut client = TcpStream::connect(listening.addr).await.unwrap();
    client.write_all(&lp(b"0")).await.unwrap();
    assert_eq!(read_n(&mut client, 7).await, lp(b"a:0"));
    front.hold();
    let held: Vec<u8> = (1..=5).flat_map(|i: u8| lp(&[b'0' + i])).collect();
    client.write_all(&held).await.unwrap();
    nothing_for(&mut client, Duration::from_millis(100)).await;
    assert_eq!(
        seen_a.requests(),
        1,
        "a held request reached the old instance"
    );
    assert_eq!(front.inflight(), 0, "a held request counts as in flight");
    route(&front, 2, b);
    let want: Vec<u8> = (1..=5)
        .flat_map(|i: u8| lp(&[b'b', b':', b'0' + i]))
        .collect();
    assert_eq!(read_n(&mut client, want.len()).await, want);
    assert_eq!(seen_b.requests(), 5);
    nothing_in_flight(&front).await;
}

/// A length above the bound (the front's message limit) is a protocol error: the protocol
/// has no error reply, so the connection is closed with nothing sent, and nothing of it
/// reaches the instance.
#[tokio::test]
async fn length_prefixed_length_above_the_bound_closes_the_connection_and_is_counted() {
    let (a, seen) = echo("a", Protocol::LengthPrefixed).await;
    let (front, listening) = front_with(Protocol::LengthPrefixed, FrontLimits::default(), a);
    let mut client = TcpStream::connect(listening.addr).await.unwrap();
    client.write_all(&lp(b"ok")).await.unwrap();
    assert_eq!(read_n(&mut client, 8).await, lp(b"a:ok"));
    let too_long = u32::try_from(hitless_agent::resp::MAX_MESSAGE + 1).unwrap();
    client
        .write_all(&[&too_long.to_be_bytes()[..], b"abc"].concat())
        .await
        .unwrap();
    let rest = read_to_close(&mut client, Duration::from_secs(5)).await;
    assert!(rest.is_empty(), "the front answered {rest:?}");
    let stats = front.stats(true);
    assert_eq!(stats.protocol_errors, 1);
    assert_eq!(stats.protocol, Protocol::LengthPrefixed);
    assert_eq!(
        seen.received(),
        6,
        "bytes of the refused message reached the instance"
    );
    nothing_in_flight(&front).await;
    // A length at the bound is no error: the front waits for its bytes.
    let mut other = TcpStream::connect(listening.addr).await.unwrap();
    let at_bound = u32::try_from(hitless_agent::resp::MAX_MESSAGE).unwrap();
    other.write_all(&at_bound.to_be_bytes()).await.unwrap();
    nothing_for(&mut other, Duration::from_millis(100)).await;
    assert_eq!(front.stats(true).protocol_errors, 1);
}

// Opaque

fn opaque_limits(drain_quiet: Duration, drain_timeout: Duration) -> FrontLimits {
    FrontLimits {
        drain_quiet,
        drain_timeout,
        ..FrontLimits::default()
    }
}

#[tokio::test]
async fn opaque_bytes_pass_both_ways_as_they_come() {
    let (a, seen) = echo("a", Protocol::Opaque).await;
    let (front, listening) = front_with(Protocol::Opaque, FrontLimits::default(), a);
    let mut client = TcpStream::connect(listening.addr).await.unwrap();
    // Anything goes: bytes that are no RESP and no length prefix are no protocol error.
    let mut sent = Vec::new();
    for i in 0..200u32 {
        let chunk: Vec<u8> = [b"$x\r\n\xff\x00".as_slice(), &i.to_le_bytes()].concat();
        client.write_all(&chunk).await.unwrap();
        sent.extend(chunk);
    }
    assert_eq!(read_n(&mut client, sent.len()).await, sent);
    // A large write passes whole, through the bounded buffers.
    let big: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| i as u8).collect();
    let (mut r, mut w) = client.split();
    let (_, got) = tokio::join!(async { w.write_all(&big).await.unwrap() }, async {
        let mut got = vec![0u8; big.len()];
        tokio::time::timeout(Duration::from_secs(10), r.read_exact(&mut got))
            .await
            .expect("the echo within 10 s")
            .unwrap();
        got
    });
    assert!(got == big, "the large write came back altered");
    let stats = front.stats(true);
    assert_eq!(stats.protocol_errors, 0);
    assert_eq!(stats.inflight, 0);
    assert_eq!(stats.protocol, Protocol::Opaque);
    assert_eq!(seen.received(), sent.len() + big.len());
}

/// A planned switchover drains opaque connections: an idle connection to the old instance is
/// closed once quiet (well before the drain deadline), a connection opened during the hold
/// waits and then reaches the new instance, and nothing is replayed.
#[tokio::test]
async fn opaque_hold_drains_an_idle_connection_and_a_new_one_reaches_the_new_instance() {
    let (a, seen_a) = echo("a", Protocol::Opaque).await;
    let (b, seen_b) = echo("b", Protocol::Opaque).await;
    let limits = opaque_limits(Duration::from_millis(30), Duration::from_secs(30));
    let (front, listening) = front_with(Protocol::Opaque, limits, a);
    let mut old = TcpStream::connect(listening.addr).await.unwrap();
    old.write_all(b"hello").await.unwrap();
    assert_eq!(read_n(&mut old, 5).await, b"hello");
    front.hold();
    let rest = read_to_close(&mut old, Duration::from_secs(5)).await;
    assert!(rest.is_empty());
    assert_eq!(front.stats(true).drained, 1);
    // A new connection during the hold waits for the new route.
    let mut new = TcpStream::connect(listening.addr).await.unwrap();
    new.write_all(b"after").await.unwrap();
    nothing_for(&mut new, Duration::from_millis(100)).await;
    assert_eq!(
        seen_a.accepted(),
        1,
        "a connection opened during the hold reached a"
    );
    assert_eq!(seen_b.accepted(), 0);
    route(&front, 2, b);
    assert_eq!(read_n(&mut new, 5).await, b"after");
    assert_eq!(seen_b.received(), 5);
    assert_eq!(
        seen_a.received(),
        5,
        "the old instance got more than before the hold"
    );
    let stats = front.stats(true);
    assert_eq!(stats.replayed, 0);
    assert_eq!(stats.drained, 1);
}

/// During a drain, a connection that keeps moving bytes stays open and served; it is closed
/// once it goes quiet.
#[tokio::test]
async fn opaque_drain_waits_for_a_busy_connection_to_go_quiet() {
    let (a, _) = echo("a", Protocol::Opaque).await;
    let limits = opaque_limits(Duration::from_millis(150), Duration::from_secs(30));
    let (front, listening) = front_with(Protocol::Opaque, limits, a);
    let mut client = TcpStream::connect(listening.addr).await.unwrap();
    client.write_all(b"x").await.unwrap();
    assert_eq!(read_n(&mut client, 1).await, b"x");
    front.hold();
    let busy_until = tokio::time::Instant::now() + Duration::from_millis(400);
    while tokio::time::Instant::now() < busy_until {
        client.write_all(b"y").await.unwrap();
        assert_eq!(read_n(&mut client, 1).await, b"y");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        front.stats(true).drained,
        0,
        "a busy connection was drained"
    );
    let rest = read_to_close(&mut client, Duration::from_secs(5)).await;
    assert!(rest.is_empty());
    assert_eq!(front.stats(true).drained, 1);
}

/// A connection that never goes quiet is closed at the drain deadline.
#[tokio::test]
async fn opaque_drain_closes_a_connection_still_busy_at_the_deadline() {
    let (a, _) = echo("a", Protocol::Opaque).await;
    let limits = opaque_limits(Duration::from_secs(30), Duration::from_millis(200));
    let (front, listening) = front_with(Protocol::Opaque, limits, a);
    let client = TcpStream::connect(listening.addr).await.unwrap();
    let (mut r, mut w) = client.into_split();
    // Keep the connection busy until the front closes it.
    let writer = tokio::spawn(async move {
        while w.write_all(b"z").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let mut byte = [0u8; 1];
    r.read_exact(&mut byte).await.unwrap();
    let t0 = tokio::time::Instant::now();
    front.hold();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), r.read_to_end(&mut rest))
        .await
        .expect("closed at the drain deadline")
        .ok();
    assert!(
        t0.elapsed() >= Duration::from_millis(150),
        "closed before the deadline"
    );
    assert_eq!(front.stats(true).drained, 1);
    writer.abort();
}

/// A client that stops reading leaves instance bytes in the front's buffers, so its
/// connection never looks quiet: the drain closes it at the deadline all the same, after a
/// bounded wait for the client to take them.
#[tokio::test]
async fn opaque_drain_closes_a_client_that_does_not_read_at_the_deadline() {
    let (a, _) = echo("a", Protocol::Opaque).await;
    let limits = opaque_limits(Duration::from_millis(30), Duration::from_millis(200));
    let (front, listening) = front_with(Protocol::Opaque, limits, a);
    let client = TcpStream::connect(listening.addr).await.unwrap();
    let (_r, mut w) = client.into_split();
    // More than the socket buffers and the front's buffers hold: the echo backs up.
    let writer = tokio::spawn(async move {
        let chunk = vec![7u8; 64 * 1024];
        for _ in 0..128 {
            if w.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = tokio::time::Instant::now();
    front.hold();
    let deadline = t0 + Duration::from_secs(3);
    while front.stats(true).connections > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a client that does not read outlived the drain"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        t0.elapsed() >= Duration::from_millis(150),
        "closed before the deadline"
    );
    assert_eq!(front.stats(true).drained, 1);
    writer.abort();
}

/// When the instance of an opaque connection is lost, the connection is closed, and what the
/// client had sent is not replayed to the successor.
#[tokio::test]
async fn opaque_connection_to_a_lost_instance_is_closed_and_nothing_is_replayed() {
    // An instance that closes each connection on its first bytes, without answering.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dying = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let mut b = [0u8; 64];
            let _ = s.read(&mut b).await;
        }
    });
    let (successor, seen) = echo("successor", Protocol::Opaque).await;
    let (front, listening) = front_with(Protocol::Opaque, FrontLimits::default(), dying);
    let mut client = TcpStream::connect(listening.addr).await.unwrap();
    client.write_all(b"lost").await.unwrap();
    let rest = read_to_close(&mut client, Duration::from_secs(5)).await;
    assert!(rest.is_empty());
    route(&front, 2, successor);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        seen.accepted(),
        0,
        "the closed connection moved to the successor"
    );
    assert_eq!(front.stats(true).replayed, 0);
    eventually("the connection is let go", || {
        front.stats(true).connections == 0
    })
    .await;
    // A new connection reaches the successor.
    let mut again = TcpStream::connect(listening.addr).await.unwrap();
    again.write_all(b"again").await.unwrap();
    assert_eq!(read_n(&mut again, 5).await, b"again");
}

/// An opaque connection still open when control moves (no hold: a failover) is closed.
#[tokio::test]
async fn opaque_connection_is_closed_when_control_moves_without_a_hold() {
    let (a, _) = echo("a", Protocol::Opaque).await;
    let (b, seen_b) = echo("b", Protocol::Opaque).await;
    let (front, listening) = front_with(Protocol::Opaque, FrontLimits::default(), a);
    let mut client = TcpStream::connect(listening.addr).await.unwrap();
    client.write_all(b"1").await.unwrap();
    assert_eq!(read_n(&mut client, 1).await, b"1");
    route(&front, 2, b);
    let rest = read_to_close(&mut client, Duration::from_secs(5)).await;
    assert!(rest.is_empty());
    assert_eq!(seen_b.accepted(), 0);
    assert_eq!(front.stats(true).drained, 1);
}

// The protocol per front

/// The protocol set on a front applies to connections accepted from then on; an established
/// connection keeps its own.
#[tokio::test]
async fn a_protocol_change_applies_to_new_connections_only() {
    let (resp, _) = echo("r", Protocol::Resp).await;
    let front = Front::new(FrontLimits::default()).unwrap();
    assert_eq!(front.protocol(), Protocol::Resp);
    let listening = front.listen("127.0.0.1:0".parse().unwrap()).unwrap();
    route(&front, 1, resp);
    let mut old = TcpStream::connect(listening.addr).await.unwrap();
    old.write_all(&req(&["PING"])).await.unwrap();
    assert_eq!(read_n(&mut old, 9).await, b"+r:PING\r\n");

    let (framed, _) = echo("l", Protocol::LengthPrefixed).await;
    front.set_protocol(Protocol::LengthPrefixed);
    assert_eq!(front.stats(true).protocol, Protocol::LengthPrefixed);
    route(&front, 2, framed);
    let mut new = TcpStream::connect(listening.addr).await.unwrap();
    new.write_all(&lp(b"x")).await.unwrap();
    assert_eq!(read_n(&mut new, 7).await, lp(b"l:x"));
    // The old connection still frames RESP: malformed RESP gets a RESP error.
    old.write_all(b"$x\r\n").await.unwrap();
    let rest = read_to_close(&mut old, Duration::from_secs(5)).await;
    let text = String::from_utf8_lossy(&rest);
    assert!(text.starts_with("-ERR protocol error"), "{text}");
}
