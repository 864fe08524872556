//! The service front moves clients between instances without client errors.

use std::net::SocketAddr;
use std::time::Duration;

use hitless_agent::front::{Front, FrontLimits, Route};
use hitless_core::ControlEpoch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A RESP backend that answers every request with `+<name>` (so a reply names who served it).
/// With `swallow_first`, it closes the connection on its first request without replying.
async fn backend(name: &'static str, swallow_first: bool) -> SocketAddr {
    let reply = format!("+{name}\r\n").into_bytes();
    serve_requests(move || {
        if swallow_first {
            None
        } else {
            Some(vec![reply.clone()])
        }
    })
    .await
}

/// A backend that answers each whole request with the writes `answer` gives (each its own
/// write, 5 ms apart), or closes the connection when it gives `None`.
async fn serve_requests(
    answer: impl Fn() -> Option<Vec<Vec<u8>>> + Clone + Send + 'static,
) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    while let Ok(Some(len)) = hitless_agent::resp::message_len(&buf) {
                        buf.drain(..len);
                        let Some(writes) = answer() else {
                            return;
                        };
                        for (i, w) in writes.iter().enumerate() {
                            if i > 0 {
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                            if s.write_all(w).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

/// A front listening on a free port, routed to `backend` at epoch 1.
fn front_at(backend: SocketAddr) -> (Front, hitless_agent::front::Listening) {
    let front = Front::new(FrontLimits::default()).unwrap();
    let listening = front.listen("127.0.0.1:0".parse().unwrap()).unwrap();
    front.set_route(Route {
        epoch: ControlEpoch(1),
        backend: Some(backend),
        hold: false,
    });
    (front, listening)
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

/// Waits (at most 2 s) until the front has no request in flight.
async fn nothing_in_flight(front: &Front) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while front.inflight() != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a request stays in flight"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn request(c: &mut TcpStream) -> String {
    c.write_all(b"*1\r\n$4\r\nPING\r\n").await.unwrap();
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut byte))
            .await
            .expect("a reply within 5 s")
            .unwrap();
        assert!(n > 0, "the front closed the client connection");
        buf.push(byte[0]);
    }
    String::from_utf8(buf).unwrap()
}

#[tokio::test]
async fn planned_switch_moves_an_open_connection_to_the_new_instance() {
    let a = backend("a", false).await;
    let b = backend("b", false).await;
    let (front, listening) = front_at(a);
    let mut client = TcpStream::connect(listening.addr).await.unwrap();
    assert_eq!(request(&mut client).await, "+a\r\n");
    front.hold();
    assert_eq!(front.inflight(), 0);
    front.set_route(Route {
        epoch: ControlEpoch(2),
        backend: Some(b),
        hold: false,
    });
    assert_eq!(request(&mut client).await, "+b\r\n");
    assert_eq!(request(&mut client).await, "+b\r\n");
}

#[tokio::test]
async fn requests_sent_during_a_hold_wait_and_then_reach_the_new_instance() {
    let a = backend("a", false).await;
    let b = backend("b", false).await;
    let (front, listening) = front_at(a);
    let mut client = TcpStream::connect(listening.addr).await.unwrap();
    assert_eq!(request(&mut client).await, "+a\r\n");
    front.hold();
    let waiter = tokio::spawn(async move {
        let r = request(&mut client).await;
        (r, client)
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiter.is_finished(), "a held request must not be answered");
    front.set_route(Route {
        epoch: ControlEpoch(2),
        backend: Some(b),
        hold: false,
    });
    let (reply, _) = waiter.await.unwrap();
    assert_eq!(reply, "+b\r\n");
}

#[tokio::test]
async fn an_unanswered_request_is_replayed_to_the_successor_after_a_crash() {
    let dying = backend("dying", true).await;
    let successor = backend("successor", false).await;
    let (front, listening) = front_at(dying);
    let mut client = TcpStream::connect(listening.addr).await.unwrap();
    let waiter = tokio::spawn(async move { request(&mut client).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    front.set_route(Route {
        epoch: ControlEpoch(2),
        backend: Some(successor),
        hold: false,
    });
    assert_eq!(waiter.await.unwrap(), "+successor\r\n");
    assert_eq!(front.stats(true).replayed, 1);
}

#[tokio::test]
async fn malformed_client_input_gets_an_error_and_a_closed_connection() {
    let a = backend("a", false).await;
    let (front, listening) = front_at(a);
    let mut client = TcpStream::connect(listening.addr).await.unwrap();
    client.write_all(b"$x\r\n").await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("-ERR protocol error"), "{text}");
    assert_eq!(front.inflight(), 0);
}

/// A client that goes away in the middle of a request (killed while writing) leaves nothing
/// behind: its connection to the front closes and is no longer counted.
#[tokio::test]
async fn a_client_that_closes_mid_request_is_let_go() {
    let a = backend("a", false).await;
    let (front, listening) = front_at(a);
    let mut client = TcpStream::connect(listening.addr).await.unwrap();
    assert_eq!(request(&mut client).await, "+a\r\n");
    client
        .write_all(b"*3\r\n$3\r\nSET\r\n$1\r\nk")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(front.stats(true).connections, 1);
    drop(client);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while front.stats(true).connections > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the front still holds the closed client's connection"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A RESP3 instance: every request is answered with a push (out of band), then a map of one
/// pair. The client gets both whole; the push answers no request, so each map pairs with its
/// own request and nothing stays in flight.
#[tokio::test]
async fn resp3_pushes_and_maps_pass_whole_and_pair_with_the_right_request() {
    const PUSH: &[u8] = b">2\r\n+message\r\n+hi\r\n";
    const MAP: &[u8] = b"%1\r\n+a\r\n+b\r\n";
    // The push and the reply in separate writes, as a server may send them.
    let addr = serve_requests(|| Some(vec![PUSH.to_vec(), MAP.to_vec()])).await;
    let (front, listening) = front_at(addr);
    let mut client = TcpStream::connect(listening.addr).await.unwrap();
    for _ in 0..3 {
        client.write_all(b"*1\r\n$4\r\nPING\r\n").await.unwrap();
        let want = [PUSH, MAP].concat();
        assert_eq!(read_n(&mut client, want.len()).await, want);
        nothing_in_flight(&front).await;
    }
}

/// Blank lines between requests (as `redis-cli --pipe` input often has) are no request: the
/// front drops them, like Redis, and every real request still gets its own reply.
#[tokio::test]
async fn blank_lines_between_requests_are_dropped_not_answered() {
    let a = backend("a", false).await;
    let (front, listening) = front_at(a);
    let mut client = TcpStream::connect(listening.addr).await.unwrap();
    client
        .write_all(b"\r\n*1\r\n$4\r\nPING\r\n\r\n\n  \r\nPING\r\n\r\n*1\r\n$4\r\nPING\r\n")
        .await
        .unwrap();
    let want = b"+a\r\n+a\r\n+a\r\n";
    assert_eq!(read_n(&mut client, want.len()).await, want);
    nothing_in_flight(&front).await;
    // The connection is still served.
    assert_eq!(request(&mut client).await, "+a\r\n");
}

#[tokio::test]
async fn a_front_binds_an_address_its_host_does_not_hold_yet() {
    // The service address of a pair of hosts is added to an interface only once this host
    // takes control: the front listens on it before that (IP_FREEBIND).
    let front = Front::new(FrontLimits::default()).unwrap();
    // TEST-NET-2, held by no host.
    let listening = front
        .listen("198.51.100.77:26399".parse().unwrap())
        .expect("a front listens on an address not yet on this host");
    assert_eq!(
        listening.addr,
        "198.51.100.77:26399".parse::<SocketAddr>().unwrap()
    );
    listening.stop();
}

#[tokio::test]
async fn a_fenced_front_answers_nothing_until_the_fence_is_lifted() {
    let a = backend("a", false).await;
    let (front, listening) = front_at(a);
    let mut client = TcpStream::connect(listening.addr).await.unwrap();
    assert_eq!(request(&mut client).await, "+a\r\n");
    // Its agent stalled: nothing goes to the instance, nothing comes back.
    front.fence(None);
    let waiter = tokio::spawn(async move {
        let r = request(&mut client).await;
        (r, client)
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiter.is_finished(), "a fenced front answered a request");
    // The peer link settled that this agent's routes still hold.
    front.lift_stall_fence();
    let (reply, _) = waiter.await.unwrap();
    assert_eq!(reply, "+a\r\n");
}

#[tokio::test]
async fn an_expired_lease_stops_forwarding_as_a_fence_does() {
    let a = backend("a", false).await;
    let (front, listening) = front_at(a);
    let mut client = TcpStream::connect(listening.addr).await.unwrap();
    front.renew_lease(Duration::from_millis(20));
    tokio::time::sleep(Duration::from_millis(40)).await;
    // Nothing renewed the lease (its watchdog did not run): no request goes out.
    let waiter = tokio::spawn(async move { request(&mut client).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !waiter.is_finished(),
        "a front forwarded on an expired lease"
    );
    front.renew_lease(Duration::from_secs(60));
    front.lift_fence();
    assert_eq!(waiter.await.unwrap(), "+a\r\n");
}

#[tokio::test]
async fn with_lease_guarded_reads_a_front_serves_only_while_it_holds_the_witness_lease() {
    let a = backend("a", false).await;
    let (front, listening) = front_at(a);
    front.require_read_lease();
    let mut client = TcpStream::connect(listening.addr).await.unwrap();
    // No lease granted yet: nothing is forwarded.
    let waiter = tokio::spawn(async move {
        let r = request(&mut client).await;
        (r, client)
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiter.is_finished(), "a front served without the lease");
    // Granted: the request held meanwhile goes on.
    front.renew_read_lease(Duration::from_millis(150));
    let (reply, mut client) = waiter.await.unwrap();
    assert_eq!(reply, "+a\r\n");
    // Run out (the witness could have granted it to the other appliance): nothing again.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let waiter = tokio::spawn(async move { request(&mut client).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !waiter.is_finished(),
        "a front served after its lease ran out"
    );
    front.renew_read_lease(Duration::from_secs(60));
    assert_eq!(waiter.await.unwrap(), "+a\r\n");
}

#[tokio::test]
async fn after_stepping_down_only_a_higher_epoch_route_lifts_the_fence_and_the_old_instance_never_answers(
) {
    // The old instance in control takes the request but answers only after a while (it
    // waits out its HA grace and then acknowledges alone): that answer must never reach the
    // client once its driver stepped down.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let slow_old = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if s.write_all(b"+old\r\n").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let new = backend("new", false).await;
    let (front, listening) = front_at(slow_old);
    let mut client = TcpStream::connect(listening.addr).await.unwrap();
    let waiter = tokio::spawn(async move { request(&mut client).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    front.fence(Some(ControlEpoch(1)));
    // A stall's lift does not lift a step-down's fence, nor does a route of the same epoch.
    front.lift_stall_fence();
    front.set_route(Route {
        epoch: ControlEpoch(1),
        backend: Some(slow_old),
        hold: false,
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiter.is_finished(),
        "the superseded instance's answer reached the client"
    );
    assert!(front.fenced());
    front.set_route(Route {
        epoch: ControlEpoch(2),
        backend: Some(new),
        hold: false,
    });
    assert_eq!(waiter.await.unwrap(), "+new\r\n");
    assert!(!front.fenced());
    assert_eq!(front.stats(true).replayed, 1);
}

#[tokio::test]
async fn closing_the_clients_ends_every_connection_at_once() {
    // The service address is leaving this host: its clients must learn it now (and reconnect
    // to the new holder), not wait out their own timeouts.
    let a = backend("a", false).await;
    let (front, listening) = front_at(a);
    let mut client = TcpStream::connect(listening.addr).await.unwrap();
    assert_eq!(request(&mut client).await, "+a\r\n");
    front.close_clients();
    let mut byte = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(2), client.read(&mut byte))
        .await
        .expect("the connection is closed within 2 s")
        .unwrap_or(0);
    assert_eq!(n, 0, "the connection stayed open");
    // New clients are served as before (the listener is the caller's to stop).
    let mut again = TcpStream::connect(listening.addr).await.unwrap();
    assert_eq!(request(&mut again).await, "+a\r\n");
}
