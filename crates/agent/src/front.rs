//! The service front: the device's one stable service address.
//!
//! Clients connect to the front; the front forwards each connection to the instance in
//! control, whichever appliance it is on. It understands RESP framing (not the commands), so
//! it knows how many requests of each connection are in flight. That lets it:
//! - *hold* for a planned switchover: new requests wait in the front while the replies of
//!   those in flight come back, so that the old active is idle when control moves; then the
//!   held requests go to the new instance in control (no client error, a short gap);
//! - *replay* after an unplanned failover: requests sent to an instance that died before
//!   replying are sent again to its successor. Writes acknowledged by the dead instance are
//!   on the successor already (synchronous replication), so replaying unanswered requests
//!   loses nothing; a non-idempotent command (INCR, LPUSH) that the dead instance applied but
//!   never answered may be applied twice: at-least-once for unanswered requests, exactly as a
//!   client library retrying on a new connection would do.
//!
//! Every buffer and wait is bounded: a client's unsent input, the time a connection waits for
//! a new route after its instance died, the connect timeout.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::resp;

/// Where the front sends requests.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Route {
    /// The control epoch of the instance in control.
    pub epoch: u64,
    /// The service address of the instance in control, if any.
    pub backend: Option<SocketAddr>,
    /// While true, no new request is forwarded (a planned switchover is under way).
    pub hold: bool,
}

/// Bounds of the front.
#[derive(Clone, Debug)]
pub struct FrontLimits {
    /// The most unsent client input buffered per connection.
    pub max_buffered: usize,
    /// How long a connection waits for a new instance in control after its own died.
    pub failover_wait: Duration,
    /// Connect timeout to an instance.
    pub connect_timeout: Duration,
    /// The most client connections at once.
    pub max_connections: usize,
}

impl Default for FrontLimits {
    fn default() -> Self {
        Self {
            max_buffered: 64 * 1024 * 1024,
            failover_wait: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(1),
            max_connections: 4096,
        }
    }
}

/// Errors of the front.
#[derive(Debug, Error)]
pub enum FrontError {
    #[error("cannot listen on the service address {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{inflight} requests were still in flight after waiting {waited:?} to drain")]
    DrainTimeout { inflight: usize, waited: Duration },
}

struct Shared {
    route: watch::Sender<Route>,
    inflight: AtomicUsize,
    connections: AtomicUsize,
    forwarded: AtomicU64,
    replayed: AtomicU64,
    limits: FrontLimits,
}

/// Counters of the front.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct FrontStats {
    pub connections: usize,
    pub inflight: usize,
    pub forwarded: u64,
    pub replayed: u64,
    pub route: Option<Route>,
    pub listening: bool,
}

/// The service front. Cheap to clone.
#[derive(Clone)]
pub struct Front {
    shared: Arc<Shared>,
}

/// A listening front; dropping it (or `stop`) stops accepting new connections. Established
/// connections keep being served.
pub struct Listening {
    task: JoinHandle<()>,
    pub addr: SocketAddr,
}

impl Listening {
    /// Stops accepting new connections.
    pub fn stop(self) {
        self.task.abort();
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Front {
    /// A front with no route yet: connections wait (bounded) until one is set.
    pub fn new(limits: FrontLimits) -> Self {
        let (route, _) = watch::channel(Route {
            epoch: 0,
            backend: None,
            hold: false,
        });
        Self {
            shared: Arc::new(Shared {
                route,
                inflight: AtomicUsize::new(0),
                connections: AtomicUsize::new(0),
                forwarded: AtomicU64::new(0),
                replayed: AtomicU64::new(0),
                limits,
            }),
        }
    }

    /// Listens on `addr` (with SO_REUSEPORT, so that the binding can move between appliances
    /// without a window in which nobody listens).
    pub fn listen(&self, addr: SocketAddr) -> Result<Listening, FrontError> {
        let err = |source| FrontError::Listen { addr, source };
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(err)?;
        socket.set_reuseaddr(true).map_err(err)?;
        socket.set_reuseport(true).map_err(err)?;
        socket.bind(addr).map_err(err)?;
        let listener: TcpListener = socket.listen(1024).map_err(err)?;
        let addr = listener.local_addr().map_err(err)?;
        let front = self.clone();
        let task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        let n = front.shared.connections.load(Ordering::Relaxed);
                        if n >= front.shared.limits.max_connections {
                            warn!(%peer, "refusing a client: {n} connections already");
                            continue;
                        }
                        let front = front.clone();
                        tokio::spawn(async move { front.serve(stream).await });
                    }
                    Err(e) => {
                        warn!("accept failed on the service address: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        });
        info!(%addr, "service address bound");
        Ok(Listening { task, addr })
    }

    /// Sets where requests go.
    pub fn set_route(&self, route: Route) {
        debug!(?route, "front route");
        self.shared.route.send_replace(route);
    }

    /// The current route.
    pub fn route(&self) -> Route {
        self.shared.route.borrow().clone()
    }

    /// Requests forwarded and not yet answered, over all connections.
    pub fn inflight(&self) -> usize {
        self.shared.inflight.load(Ordering::Acquire)
    }

    /// Counters.
    pub fn stats(&self, listening: bool) -> FrontStats {
        FrontStats {
            connections: self.shared.connections.load(Ordering::Relaxed),
            inflight: self.inflight(),
            forwarded: self.shared.forwarded.load(Ordering::Relaxed),
            replayed: self.shared.replayed.load(Ordering::Relaxed),
            route: Some(self.route()),
            listening,
        }
    }

    /// Stops forwarding new requests and waits until every request in flight is answered.
    pub async fn hold_and_drain(&self, bound: Duration) -> Result<(), FrontError> {
        self.shared.route.send_modify(|r| r.hold = true);
        let start = tokio::time::Instant::now();
        loop {
            let n = self.inflight();
            if n == 0 {
                return Ok(());
            }
            if start.elapsed() >= bound {
                return Err(FrontError::DrainTimeout {
                    inflight: n,
                    waited: bound,
                });
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }

    /// Releases a hold without changing the instance in control (an aborted switchover).
    pub fn release(&self) {
        self.shared.route.send_modify(|r| r.hold = false);
    }

    async fn serve(self, client: TcpStream) {
        self.shared.connections.fetch_add(1, Ordering::Relaxed);
        let mut conn = Conn {
            front: self.clone(),
            inflight: Vec::new(),
            inflight_bytes: 0,
        };
        if let Err(reason) = conn.run(client).await {
            debug!("client connection closed: {reason}");
        }
        let left = conn.inflight.len();
        self.shared.inflight.fetch_sub(left, Ordering::AcqRel);
        self.shared.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Conn {
    front: Front,
    /// Lengths of the requests forwarded and not yet answered, oldest first, and their bytes
    /// (kept for replay).
    inflight: Vec<(usize, bytes::Bytes)>,
    inflight_bytes: usize,
}

struct Backend {
    stream: TcpStream,
    epoch: u64,
    addr: SocketAddr,
}

impl Conn {
    async fn run(&mut self, mut client: TcpStream) -> Result<(), String> {
        client.set_nodelay(true).ok();
        let limits = self.front.shared.limits.clone();
        let mut route_rx = self.front.shared.route.subscribe();
        let mut cbuf = BytesMut::with_capacity(16 * 1024);
        let mut bbuf = BytesMut::with_capacity(16 * 1024);
        let mut backend: Option<Backend> = None;
        // The epoch whose instance this connection lost; it waits for a newer one.
        let mut lost_epoch: Option<u64> = None;
        let mut lost_since: Option<tokio::time::Instant> = None;
        let mut client_open = true;
        loop {
            let route = route_rx.borrow_and_update().clone();
            // Move to the route's instance when it differs from ours and nothing is in flight
            // on ours (a planned switchover), or when ours is gone (a failover).
            let wants_move = match (&backend, route.backend) {
                (Some(b), Some(addr)) => b.addr != addr || b.epoch != route.epoch,
                (None, Some(_)) => true,
                (_, None) => false,
            };
            let usable_route = lost_epoch.is_none_or(|lost| route.epoch > lost);
            if wants_move
                && !route.hold
                && usable_route
                && (backend.is_none() || self.inflight.is_empty())
            {
                let addr = route.backend.expect("checked above");
                match tokio::time::timeout(limits.connect_timeout, TcpStream::connect(addr)).await {
                    Ok(Ok(stream)) => {
                        stream.set_nodelay(true).ok();
                        let mut b = Backend {
                            stream,
                            epoch: route.epoch,
                            addr,
                        };
                        bbuf.clear();
                        if !self.inflight.is_empty() {
                            // Replay what the lost instance never answered, in order.
                            let n = self.inflight.len() as u64;
                            for (_, req) in &self.inflight {
                                b.stream
                                    .write_all(req)
                                    .await
                                    .map_err(|e| format!("replay to {addr}: {e}"))?;
                            }
                            self.front.shared.replayed.fetch_add(n, Ordering::Relaxed);
                        }
                        backend = Some(b);
                        lost_epoch = None;
                        lost_since = None;
                    }
                    Ok(Err(e)) => {
                        debug!(%addr, "connect to the instance in control failed: {e}");
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(_) => debug!(%addr, "connect to the instance in control timed out"),
                }
            }
            if let Some(since) = lost_since {
                if since.elapsed() > limits.failover_wait {
                    return Err(format!(
                        "no instance in control within {:?} after losing one",
                        limits.failover_wait
                    ));
                }
            }
            if backend.is_none() && route.backend.is_none() && !client_open {
                return Ok(());
            }
            // Forward complete requests unless holding.
            if let Some(b) = backend.as_mut() {
                if !route.hold && b.epoch == route.epoch {
                    let start = self.inflight.len();
                    let mut out_len = 0;
                    loop {
                        match resp::message_len(&cbuf[out_len..]) {
                            Ok(Some(n)) => {
                                let req =
                                    bytes::Bytes::copy_from_slice(&cbuf[out_len..out_len + n]);
                                self.inflight.push((n, req));
                                self.inflight_bytes += n;
                                out_len += n;
                            }
                            Ok(None) => break,
                            Err(e) => {
                                let msg = format!("-ERR protocol error: {e}\r\n");
                                let _ = client.write_all(msg.as_bytes()).await;
                                return Err(format!("client sent malformed RESP: {e}"));
                            }
                        }
                    }
                    if out_len > 0 {
                        let added = self.inflight.len() - start;
                        self.front
                            .shared
                            .inflight
                            .fetch_add(added, Ordering::AcqRel);
                        self.front
                            .shared
                            .forwarded
                            .fetch_add(added as u64, Ordering::Relaxed);
                        let chunk = cbuf.split_to(out_len);
                        if let Err(e) = b.stream.write_all(&chunk).await {
                            debug!("write to instance failed: {e}");
                            lost_epoch = Some(b.epoch);
                            lost_since.get_or_insert_with(tokio::time::Instant::now);
                            backend = None;
                            continue;
                        }
                    }
                } else if self.inflight.is_empty()
                    && route.backend.is_some()
                    && !route.hold
                    && b.epoch != route.epoch
                {
                    // Planned move with nothing in flight: handled at the top of the loop.
                    continue;
                }
            }
            if !client_open && self.inflight.is_empty() && cbuf.is_empty() {
                return Ok(());
            }
            let can_read_client = client_open && cbuf.len() < limits.max_buffered;
            tokio::select! {
                r = client.read_buf(&mut cbuf), if can_read_client => {
                    match r {
                        Ok(0) => client_open = false,
                        Ok(_) => {}
                        Err(e) => return Err(format!("client read: {e}")),
                    }
                }
                r = async {
                    match backend.as_mut() {
                        Some(b) => b.stream.read_buf(&mut bbuf).await,
                        None => std::future::pending().await,
                    }
                } => {
                    match r {
                        Ok(0) | Err(_) => {
                            let b = backend.take().expect("read from a backend");
                            warn!(addr = %b.addr, epoch = b.epoch, inflight = self.inflight.len(), "instance connection lost");
                            lost_epoch = Some(b.epoch);
                            lost_since = Some(tokio::time::Instant::now());
                            bbuf.clear();
                        }
                        Ok(_) => {
                            // Forward complete replies; each answers the oldest request.
                            let mut n_replies = 0;
                            let mut len = 0;
                            while n_replies < self.inflight.len() {
                                match resp::message_len(&bbuf[len..]) {
                                    Ok(Some(n)) => { len += n; n_replies += 1; }
                                    Ok(None) => break,
                                    Err(e) => return Err(format!("instance sent malformed RESP: {e}")),
                                }
                            }
                            if n_replies > 0 {
                                let out = bbuf.split_to(len);
                                for (n, _) in self.inflight.drain(..n_replies) {
                                    self.inflight_bytes -= n;
                                }
                                self.front.shared.inflight.fetch_sub(n_replies, Ordering::AcqRel);
                                client.write_all(&out).await.map_err(|e| format!("client write: {e}"))?;
                            } else if bbuf.len() > resp::MAX_MESSAGE {
                                return Err("instance reply exceeds the message limit".into());
                            }
                            if self.inflight.is_empty() && !bbuf.is_empty() {
                                // Unsolicited bytes: drop them.
                                bbuf.advance(bbuf.len());
                            }
                        }
                    }
                }
                _ = route_rx.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(50)), if backend.is_none() => {}
            }
        }
    }
}
