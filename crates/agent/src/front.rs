//! The service front: the device's one stable service address.
//!
//! Clients connect to the front; the front forwards each connection to the instance in
//! control, whichever appliance it is on, over a connection of its own to that instance. It
//! understands the framing of the service's protocol (not the commands; see
//! [`crate::framing`]: RESP by default, or length-prefixed messages), so it knows how many
//! requests of each connection are in flight. That lets it:
//! - *hold* for a planned switchover: new requests wait in the front. Requests already
//!   forwarded are not waited for (a long pipeline or a client that never reads its replies
//!   must not decide whether the pair can switch): they finish at the old instance, which
//!   stays in control until it is quiesced. The quiesce lets every write it already executed
//!   become durable; a write it had not executed by then waits, and when control moves away
//!   the old instance closes that connection after the replies to everything it executed.
//!   The front then sends the unanswered requests, in order, to the new instance in control,
//!   followed by the held ones: each request runs exactly once, and a connection's later
//!   request never runs before its earlier one, because a connection moves to the new instance
//!   only once nothing of it is in flight at the old one (answered, or handed back by a close);
//! - *replay* after an unplanned failover: requests sent to an instance that died before
//!   replying are sent again to its successor. Writes acknowledged by the dead instance are
//!   on the successor already (synchronous replication), so replaying unanswered requests
//!   loses nothing; a non-idempotent command (INCR, LPUSH) that the dead instance applied but
//!   never answered may be applied twice: at-least-once for unanswered requests, exactly as a
//!   client library retrying on a new connection would do.
//!
//! A protocol whose framing the front does not know ([`Protocol::Opaque`]) is relayed byte for
//! byte, and nothing can be held or replayed. A planned switchover *drains* such connections
//! instead: while the fronts hold, each connection to the old instance keeps flowing and is
//! closed once it has been quiet in both directions for [`FrontLimits::drain_quiet`], or
//! [`FrontLimits::drain_timeout`] after the hold began, or when the route moves on, whichever
//! comes first; new connections wait (bounded) for the new route. A connection whose instance
//! is lost, or which is still open when control moves, is closed: the client reconnects.
//!
//! Connections are served on the front's own runtime (its own worker threads), apart from the
//! agent's control plane: hundreds of busy clients must not delay the peer heartbeats, the
//! health probes or the driver (a missed heartbeat is an appliance loss and a failover), and
//! the control plane must not delay clients. Within the front every connection is a task of
//! its own, served in turn.
//!
//! Every buffer and wait is bounded: a client's unsent input, the requests in flight per
//! connection (kept for replay), the time a connection waits for a new route after its
//! instance died, the connect timeout, the number of connections.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use hitless_core::ControlEpoch;

use crate::framing::{Framing, OnProtocolError, Protocol, ProtocolFraming};
use crate::resp;

/// Where the front sends requests.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Route {
    /// The control epoch of the instance in control.
    pub epoch: ControlEpoch,
    /// The service address of the instance in control, if any.
    pub backend: Option<SocketAddr>,
    /// While true, no new request is forwarded (a planned switchover is under way).
    pub hold: bool,
}

/// Bounds of the front.
#[derive(Clone, Debug)]
pub struct FrontLimits {
    /// The most client input buffered per connection ahead of forwarding, and the most
    /// replies buffered per connection ahead of the client reading them (a single message
    /// larger than this is still passed on, up to [`resp::MAX_MESSAGE`]). With the opaque
    /// protocol, the bytes buffered each way.
    pub max_buffered: usize,
    /// The most bytes of requests in flight (forwarded, not answered) per connection; more
    /// wait in the client's input until replies come back.
    pub max_inflight: usize,
    /// Worker threads of the front's runtime.
    pub worker_threads: usize,
    /// How long a connection waits for a new instance in control after its own died.
    pub failover_wait: Duration,
    /// Connect timeout to an instance.
    pub connect_timeout: Duration,
    /// The most client connections at once.
    pub max_connections: usize,
    /// Opaque protocol: how long a connection to the old instance must have moved no byte,
    /// either way, before a planned switchover's drain closes it.
    pub drain_quiet: Duration,
    /// Opaque protocol: how long after a hold began a connection that never went quiet is
    /// closed anyway, and the most a closing connection waits for its client to take the
    /// bytes already read from the instance.
    pub drain_timeout: Duration,
}

impl Default for FrontLimits {
    fn default() -> Self {
        Self {
            max_buffered: 1024 * 1024,
            max_inflight: 8 * 1024 * 1024,
            worker_threads: 2,
            failover_wait: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(1),
            max_connections: 4096,
            drain_quiet: Duration::from_millis(30),
            drain_timeout: Duration::from_secs(1),
        }
    }
}

/// The nice value of the front's threads: below the agent's control plane (heartbeats, health
/// probes, the driver), which must keep its deadlines however busy the clients keep the front,
/// and above the instances.
pub const FRONT_NICE: i32 = 0;

/// Lowers the calling thread to [`FRONT_NICE`] (the agent's threads inherit a higher
/// priority; lowering needs no privilege).
fn lower_thread_priority() {
    // SAFETY: setpriority takes plain integers and touches no memory of ours; who = 0 is the
    // calling thread on Linux.
    let current = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    if current < FRONT_NICE {
        // SAFETY: as above.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, FRONT_NICE) } != 0 {
            warn!(
                "cannot lower the front's priority: {}",
                std::io::Error::last_os_error()
            );
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
    #[error("cannot start the front's runtime: {0}")]
    Runtime(std::io::Error),
}

/// The front's runtime, shut down without waiting when the front goes away.
struct OwnRuntime(Option<tokio::runtime::Runtime>);

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

struct Shared {
    rt: tokio::runtime::Handle,
    _owner: OwnRuntime,
    route: watch::Sender<Route>,
    inflight: AtomicUsize,
    connections: AtomicUsize,
    forwarded: AtomicU64,
    replayed: AtomicU64,
    protocol_errors: AtomicU64,
    drained: AtomicU64,
    /// The framing of new connections.
    framing: std::sync::RwLock<Arc<dyn Framing>>,
    limits: FrontLimits,
    /// The stall fence (see [`Front::fence`]).
    fence: Fence,
    /// Bumped to close every client connection (see [`Front::close_clients`]).
    closing: watch::Sender<u64>,
}

/// What keeps a front from acting on a stale view of the pair: its agent was not scheduled
/// for longer than the peer's failure detector (it may have been taken for lost, and the pair
/// failed over meanwhile), or its driver stepped down to one at a higher epoch.
struct Fence {
    origin: std::time::Instant,
    /// Forwarding is allowed until this many ns after `origin` (u64::MAX: no lease kept).
    lease_ns: AtomicU64,
    /// Set while fenced.
    fenced: std::sync::atomic::AtomicBool,
    /// While fenced: a route of an epoch above this lifts the fence (u64::MAX: only
    /// [`Front::lift_fence`] does).
    until_epoch_above: AtomicU64,
    /// Connections to instances of an epoch below this are abandoned (their unanswered
    /// requests go to the instance in control), not drained.
    abandon_below: AtomicU64,
    /// With lease-guarded reads: forwarding is allowed until this many ns after `origin`,
    /// the end of the witness lease as this host can be sure of it (u64::MAX: not required).
    read_lease_ns: AtomicU64,
}

impl Fence {
    fn new() -> Self {
        Fence {
            origin: std::time::Instant::now(),
            lease_ns: AtomicU64::new(u64::MAX),
            fenced: std::sync::atomic::AtomicBool::new(false),
            until_epoch_above: AtomicU64::new(u64::MAX),
            abandon_below: AtomicU64::new(0),
            read_lease_ns: AtomicU64::new(u64::MAX),
        }
    }

    fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    /// Whether requests may go to an instance and replies come back. The lease is read before
    /// the flag: whoever renews a lease after a stall sets the flag first, so a front that
    /// sees the renewed lease also sees the flag.
    fn may_forward(&self) -> bool {
        let lease = self.lease_ns.load(Ordering::SeqCst);
        let read_lease = self.read_lease_ns.load(Ordering::SeqCst);
        let fenced = self.fenced.load(Ordering::SeqCst);
        let now = self.now_ns();
        !fenced
            && (lease == u64::MAX || now < lease)
            && (read_lease == u64::MAX || now < read_lease)
    }
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
    /// The protocol of new connections.
    #[serde(default)]
    pub protocol: Protocol,
    /// Client requests that could not be framed, and instance replies that could not: each
    /// closed its connection (a RESP client got an error reply first).
    #[serde(default)]
    pub protocol_errors: u64,
    /// Opaque connections the front closed because control moved: drained during a planned
    /// switchover, or still open when the route changed.
    #[serde(default)]
    pub drained: u64,
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
    /// A RESP front with no route yet: connections wait (bounded) until one is set. It starts
    /// its own runtime for the connections.
    pub fn new(limits: FrontLimits) -> Result<Self, FrontError> {
        Self::with_protocol(limits, Protocol::Resp)
    }

    /// A front speaking `protocol`, with no route yet (see [`Self::new`]). A length-prefixed
    /// message may declare at most [`resp::MAX_MESSAGE`] bytes, the bound of any message.
    pub fn with_protocol(limits: FrontLimits, protocol: Protocol) -> Result<Self, FrontError> {
        let (route, _) = watch::channel(Route {
            epoch: ControlEpoch(0),
            backend: None,
            hold: false,
        });
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(limits.worker_threads.max(1))
            .thread_name("front")
            .on_thread_start(lower_thread_priority)
            .enable_all()
            .build()
            .map_err(FrontError::Runtime)?;
        Ok(Self {
            shared: Arc::new(Shared {
                rt: rt.handle().clone(),
                _owner: OwnRuntime(Some(rt)),
                route,
                inflight: AtomicUsize::new(0),
                fence: Fence::new(),
                closing: watch::channel(0).0,
                connections: AtomicUsize::new(0),
                forwarded: AtomicU64::new(0),
                replayed: AtomicU64::new(0),
                protocol_errors: AtomicU64::new(0),
                drained: AtomicU64::new(0),
                framing: std::sync::RwLock::new(protocol.framing(resp::MAX_MESSAGE)),
                limits,
            }),
        })
    }

    /// Listens on `addr` (with SO_REUSEPORT, so that the binding can move between appliances
    /// on one host without a window in which nobody listens, and with IP_FREEBIND, so that a
    /// front is ready before its host owns a moving service address).
    pub fn listen(&self, addr: SocketAddr) -> Result<Listening, FrontError> {
        let err = |source| FrontError::Listen { addr, source };
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .map_err(err)?;
        socket.set_reuse_address(true).map_err(err)?;
        socket.set_reuse_port(true).map_err(err)?;
        if addr.is_ipv4() {
            socket.set_freebind_v4(true).map_err(err)?;
        } else {
            socket.set_freebind_v6(true).map_err(err)?;
        }
        socket.set_nonblocking(true).map_err(err)?;
        socket.bind(&addr.into()).map_err(err)?;
        // A burst of clients (a benchmark opening its connections at once) must not overflow
        // the accept queue: a dropped connection attempt is retried a second later.
        let backlog = i32::try_from(self.shared.limits.max_connections).unwrap_or(i32::MAX);
        socket.listen(backlog).map_err(err)?;
        // Registering the listener needs the runtime that will poll it.
        let _in_front = self.shared.rt.enter();
        let listener = TcpListener::from_std(socket.into()).map_err(err)?;
        let addr = listener.local_addr().map_err(err)?;
        let front = self.clone();
        let task = self.shared.rt.spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        let n = front.shared.connections.load(Ordering::Relaxed);
                        if n >= front.shared.limits.max_connections {
                            warn!(%peer, "refusing a client: {n} connections already");
                            continue;
                        }
                        // Counted here, so that a burst of connections cannot pass the bound
                        // before their tasks start.
                        front.shared.connections.fetch_add(1, Ordering::Relaxed);
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
        let f = &self.shared.fence;
        let above = f.until_epoch_above.load(Ordering::SeqCst);
        if above != u64::MAX && route.epoch.0 > above && f.fenced.load(Ordering::SeqCst) {
            f.until_epoch_above.store(u64::MAX, Ordering::SeqCst);
            f.fenced.store(false, Ordering::SeqCst);
            info!(
                epoch = route.epoch.0,
                "front fence lifted by a route of a higher epoch"
            );
        }
        self.shared.route.send_replace(route);
    }

    /// Sets the protocol of the connections accepted from now on; established connections
    /// keep theirs.
    pub fn set_protocol(&self, protocol: Protocol) {
        info!(%protocol, "front protocol");
        *self
            .shared
            .framing
            .write()
            .unwrap_or_else(|e| e.into_inner()) = protocol.framing(resp::MAX_MESSAGE);
    }

    /// The protocol of new connections.
    pub fn protocol(&self) -> Protocol {
        self.framing().protocol()
    }

    fn framing(&self) -> Arc<dyn Framing> {
        self.shared
            .framing
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The most client connections this front serves at once.
    pub fn max_connections(&self) -> usize {
        self.shared.limits.max_connections
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
            protocol: self.protocol(),
            protocol_errors: self.shared.protocol_errors.load(Ordering::Relaxed),
            drained: self.shared.drained.load(Ordering::Relaxed),
        }
    }

    /// Stops forwarding new requests (a planned switchover). Requests already in flight are
    /// not waited for: they finish at the instance in control, or it hands back, by closing
    /// the connection, those it did not execute before control moved (see the module docs).
    pub fn hold(&self) {
        self.shared.route.send_modify(|r| r.hold = true);
    }

    /// Releases a hold without changing the instance in control (an aborted switchover).
    pub fn release(&self) {
        self.shared.route.send_modify(|r| r.hold = false);
    }

    /// Renews the front's lease: it forwards for `valid_for` more, unless fenced. The agent's
    /// stall watchdog renews it; a front whose agent stopped running (SIGSTOP, a starved
    /// host) finds its lease expired when it runs again, before anything tells it so.
    pub fn renew_lease(&self, valid_for: Duration) {
        let f = &self.shared.fence;
        f.lease_ns
            .store(f.now_ns() + valid_for.as_nanos() as u64, Ordering::SeqCst);
    }

    /// Requires a witness lease to forward anything (lease-guarded reads): from now on the
    /// front forwards only until the end given by [`Self::renew_read_lease`] (none yet).
    pub fn require_read_lease(&self) {
        self.shared.fence.read_lease_ns.store(0, Ordering::SeqCst);
    }

    /// The witness granted this appliance the lease: forwarding is allowed for `valid_for`
    /// from now (the caller takes it from the moment it asked, shortened by the clock drift
    /// it allows, so it ends before the witness's lease does).
    pub fn renew_read_lease(&self, valid_for: Duration) {
        let f = &self.shared.fence;
        let until = f.now_ns() + valid_for.as_nanos() as u64;
        let before = f.read_lease_ns.swap(until, Ordering::SeqCst);
        if before != u64::MAX && before <= f.now_ns() {
            // Requests held while the lease was missing go on.
            self.shared.route.send_modify(|_| {});
        }
    }

    /// Whether the front may forward now (not fenced, leases current).
    pub fn may_forward(&self) -> bool {
        self.shared.fence.may_forward()
    }

    /// Fences the front: no request goes to an instance and no reply comes back until
    /// [`Self::lift_fence`], or, with `until_epoch_above`, until a route of a higher epoch is
    /// set (connections to instances below it are then abandoned and their unanswered
    /// requests replayed to the new instance, never answered by the old one).
    pub fn fence(&self, until_epoch_above: Option<ControlEpoch>) {
        let f = &self.shared.fence;
        f.fenced.store(true, Ordering::SeqCst);
        if let Some(e) = until_epoch_above {
            f.until_epoch_above.store(e.0, Ordering::SeqCst);
            f.abandon_below.fetch_max(e.0 + 1, Ordering::SeqCst);
        }
        warn!(?until_epoch_above, "front fenced");
        // Wake every connection: one waiting for an answer must stop reading it.
        self.shared.route.send_modify(|_| {});
    }

    /// Lifts the fence (the agent settled who drives and is still the one whose routes hold).
    pub fn lift_fence(&self) {
        let f = &self.shared.fence;
        f.until_epoch_above.store(u64::MAX, Ordering::SeqCst);
        if f.fenced.swap(false, Ordering::SeqCst) {
            info!("front fence lifted");
        }
        // Wake every connection to re-evaluate.
        self.shared.route.send_modify(|_| {});
    }

    /// Lifts a fence set after a stall, unless the driver stepped down meanwhile (then only a
    /// route of a higher epoch lifts it).
    pub fn lift_stall_fence(&self) {
        if self.shared.fence.until_epoch_above.load(Ordering::SeqCst) == u64::MAX {
            self.lift_fence();
        }
    }

    /// Whether the front is fenced.
    pub fn fenced(&self) -> bool {
        self.shared.fence.fenced.load(Ordering::SeqCst)
    }

    async fn serve(self, client: TcpStream) {
        let framing = self.framing();
        let mut closing = self.shared.closing.subscribe();
        closing.borrow_and_update();
        // Ends when the front closes its clients (the service address left this host).
        let closed = async move {
            let _ = closing.changed().await;
        };
        if framing.holds_requests() {
            let mut conn = Conn {
                front: self.clone(),
                framing,
                lens: VecDeque::new(),
                unanswered: BytesMut::new(),
                written: 0,
            };
            tokio::select! {
                r = conn.run(client) => {
                    if let Err(reason) = r {
                        debug!("client connection closed: {reason}");
                    }
                }
                _ = closed => debug!("client connection closed: the service address left this host"),
            }
            let left = conn.lens.len();
            self.shared.inflight.fetch_sub(left, Ordering::AcqRel);
        } else {
            tokio::select! {
                r = relay(&self, client) => match r {
                    Ok(reason) => debug!("client connection closed: {reason}"),
                    Err(reason) => debug!("client connection closed: {reason}"),
                },
                _ = closed => debug!("client connection closed: the service address left this host"),
            }
        }
        self.shared.connections.fetch_sub(1, Ordering::Relaxed);
    }

    /// Closes every client connection (each gets a FIN, or a reset if it had sent more): call
    /// it while this host still holds the service address it is giving up. A client of a
    /// host that no longer holds its address can neither be answered (nothing can be sent
    /// from an address the host lost) nor reach it (its packets go to the new holder); closed
    /// now, it reconnects to the new holder at once instead of waiting out its own timeout.
    /// Requests in flight stay unanswered, never acknowledged.
    pub fn close_clients(&self) {
        let n = self.shared.connections.load(Ordering::Relaxed);
        self.shared.closing.send_modify(|g| *g += 1);
        if n > 0 {
            info!(
                connections = n,
                "closing the front's clients: the service address leaves this host"
            );
        }
    }
}

/// One client connection. Both directions flow at once (a client may pipeline megabytes
/// while its replies come back), each through a bounded buffer.
struct Conn {
    front: Front,
    /// Where this connection's requests and replies end.
    framing: Arc<dyn Framing>,
    /// Lengths of the requests forwarded and not yet answered, oldest first.
    lens: VecDeque<usize>,
    /// Their bytes, in order: kept until answered, so that they can be sent again to another
    /// instance (a replay after a failover, or what the old instance handed back when control
    /// moved).
    unanswered: BytesMut,
    /// How many bytes of `unanswered` went to the current instance connection.
    written: usize,
}

/// The connection to the instance in control.
struct Backend {
    r: OwnedReadHalf,
    w: OwnedWriteHalf,
    epoch: ControlEpoch,
    addr: SocketAddr,
}

impl Conn {
    async fn run(&mut self, mut client: TcpStream) -> Result<(), String> {
        client.set_nodelay(true).ok();
        let (mut cr, mut cw) = client.split();
        let limits = self.front.shared.limits.clone();
        let mut route_rx = self.front.shared.route.subscribe();
        // Client input not yet forwarded; instance output not yet split into replies; replies
        // not yet written to the client.
        let mut cbuf = BytesMut::with_capacity(4 * 1024);
        let mut bbuf = BytesMut::with_capacity(4 * 1024);
        let mut cout = BytesMut::new();
        let mut backend: Option<Backend> = None;
        // The epoch whose instance this connection lost; it waits for a newer one.
        let mut lost_epoch: Option<ControlEpoch> = None;
        let mut lost_since: Option<tokio::time::Instant> = None;
        let mut client_open = true;
        loop {
            let route = route_rx.borrow_and_update().clone();
            let may = self.front.shared.fence.may_forward();
            if may && backend.is_some() && !bbuf.is_empty() {
                // Replies held while forwarding was not allowed.
                self.answered(&mut bbuf, &mut cout)?;
            }
            // A connection to an instance its driver was superseded at is abandoned, as if
            // lost: what it did not answer goes to the instance in control.
            if let Some(b) = backend.take() {
                if b.epoch.0 < self.front.shared.fence.abandon_below.load(Ordering::SeqCst) {
                    self.lost(&b, &route_rx, &mut bbuf);
                    lost_epoch = Some(b.epoch);
                    lost_since.get_or_insert_with(tokio::time::Instant::now);
                } else {
                    backend = Some(b);
                }
            }
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
                && (backend.is_none() || self.lens.is_empty())
            {
                let addr = route.backend.expect("checked above");
                match tokio::time::timeout(limits.connect_timeout, TcpStream::connect(addr)).await {
                    Ok(Ok(stream)) => {
                        stream.set_nodelay(true).ok();
                        let (r, w) = stream.into_split();
                        backend = Some(Backend {
                            r,
                            w,
                            epoch: route.epoch,
                            addr,
                        });
                        bbuf.clear();
                        // What the lost instance never answered goes out again, in order,
                        // before anything newer.
                        self.written = 0;
                        if !self.lens.is_empty() {
                            self.front
                                .shared
                                .replayed
                                .fetch_add(self.lens.len() as u64, Ordering::Relaxed);
                        }
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
            if !client_open && cout.is_empty() {
                // A closed client's partial request can never complete: nothing is left to do
                // once everything it sent whole was answered.
                let whole_left = !matches!(self.framing.request_len(&cbuf), Ok(None));
                if self.lens.is_empty() && !whole_left {
                    return Ok(());
                }
                if backend.is_none() && route.backend.is_none() {
                    return Ok(());
                }
            }
            // Forward complete requests unless holding, as long as the requests in flight stay
            // within their bound.
            if let Some(b) = backend.as_ref() {
                if !route.hold && may && b.epoch == route.epoch {
                    self.forward(&mut cbuf, &limits, &mut cw).await?;
                }
            }
            // Read on while the buffer is under its bound, or holds no complete request yet
            // (one request may exceed the bound, up to the message limit).
            let can_read_client = client_open
                && (cbuf.len() < limits.max_buffered
                    || matches!(self.framing.request_len(&cbuf), Ok(None)));
            // Fenced, nothing goes to the instance and nothing it answers comes back: an
            // answer from an instance the pair may have failed over from is no
            // acknowledgement (unanswered, the request is replayed to the successor).
            let can_read_backend = may && backend.is_some() && cout.len() < limits.max_buffered;
            let to_send = may && self.written < self.unanswered.len();
            let no_backend = backend.is_none();
            let (br, bw) = match backend.as_mut() {
                Some(b) => (Some(&mut b.r), Some(&mut b.w)),
                None => (None, None),
            };
            let pending = &self.unanswered[self.written.min(self.unanswered.len())..];
            enum Event {
                ClientRead(std::io::Result<usize>),
                Sent(std::io::Result<usize>),
                BackendRead(std::io::Result<usize>),
                ClientWritten(std::io::Result<usize>),
                Other,
            }
            let ev = tokio::select! {
                r = cr.read_buf(&mut cbuf), if can_read_client => Event::ClientRead(r),
                r = async {
                    match bw {
                        Some(w) => w.write(pending).await,
                        None => std::future::pending().await,
                    }
                }, if to_send => Event::Sent(r),
                r = async {
                    match br {
                        Some(r) => r.read_buf(&mut bbuf).await,
                        None => std::future::pending().await,
                    }
                }, if can_read_backend => Event::BackendRead(r),
                r = cw.write(&cout), if !cout.is_empty() => Event::ClientWritten(r),
                _ = route_rx.changed() => Event::Other,
                _ = tokio::time::sleep(Duration::from_millis(50)), if no_backend => Event::Other,
            };
            match ev {
                Event::ClientRead(Ok(0)) => client_open = false,
                Event::ClientRead(Ok(_)) | Event::Other => {}
                Event::ClientRead(Err(e)) => return Err(format!("client read: {e}")),
                Event::ClientWritten(Ok(n)) => cout.advance(n),
                Event::ClientWritten(Err(e)) => return Err(format!("client write: {e}")),
                Event::Sent(Ok(n)) => self.written += n,
                Event::Sent(Err(e)) => {
                    let b = backend.take().expect("sent to a backend");
                    debug!(addr = %b.addr, "write to instance failed: {e}");
                    self.lost(&b, &route_rx, &mut bbuf);
                    lost_epoch = Some(b.epoch);
                    lost_since.get_or_insert_with(tokio::time::Instant::now);
                }
                Event::BackendRead(Ok(0)) | Event::BackendRead(Err(_)) => {
                    let b = backend.take().expect("read from a backend");
                    self.lost(&b, &route_rx, &mut bbuf);
                    lost_epoch = Some(b.epoch);
                    lost_since = Some(tokio::time::Instant::now());
                }
                // A reply read as the front was fenced, or as its lease ran out, waits in
                // `bbuf` until forwarding is allowed again (or the instance is abandoned).
                Event::BackendRead(Ok(_)) => {
                    if self.front.shared.fence.may_forward() {
                        self.answered(&mut bbuf, &mut cout)?
                    }
                }
            }
        }
    }

    /// Moves the complete requests at the head of `cbuf` to the requests in flight, within
    /// the bound of bytes in flight (a single larger request goes alone).
    async fn forward(
        &mut self,
        cbuf: &mut BytesMut,
        limits: &FrontLimits,
        cw: &mut tokio::net::tcp::WriteHalf<'_>,
    ) -> Result<(), String> {
        // Rounds end at a blank line (dropped: like Redis, it is no request and gets no
        // reply; `redis-cli --pipe` input often has some) or where forwarding stops; bounded
        // by the buffer, each round consuming bytes.
        loop {
            let blank = self.framing.filler_len(cbuf);
            if blank > 0 {
                cbuf.advance(blank);
            }
            let mut out_len = 0;
            let mut added = 0;
            let mut at_blank = false;
            loop {
                if out_len > 0 && self.framing.filler_len(&cbuf[out_len..]) > 0 {
                    at_blank = true;
                    break;
                }
                match self.framing.request_len(&cbuf[out_len..]) {
                    Ok(Some(n))
                        if !(self.lens.is_empty() && added == 0)
                            && self.unanswered.len() + out_len + n > limits.max_inflight =>
                    {
                        break
                    }
                    Ok(Some(n)) => {
                        self.lens.push_back(n);
                        out_len += n;
                        added += 1;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let shared = &self.front.shared;
                        shared.protocol_errors.fetch_add(1, Ordering::Relaxed);
                        if let OnProtocolError::Reply(reply) = self.framing.on_protocol_error(&e) {
                            let _ = cw.write_all(&reply).await;
                        }
                        return Err(format!(
                            "client sent bytes that are no {} request: {e}",
                            self.framing.protocol()
                        ));
                    }
                }
            }
            if added > 0 {
                let shared = &self.front.shared;
                shared.inflight.fetch_add(added, Ordering::AcqRel);
                shared.forwarded.fetch_add(added as u64, Ordering::Relaxed);
                self.unanswered.extend_from_slice(&cbuf[..out_len]);
                cbuf.advance(out_len);
            }
            if !at_blank {
                return Ok(());
            }
        }
    }

    /// Splits complete replies off `bbuf`: each answers the oldest request in flight, except
    /// a push (RESP3 `>`), which goes to the client and answers nothing. A reply with no
    /// request in flight is dropped.
    fn answered(&mut self, bbuf: &mut BytesMut, cout: &mut BytesMut) -> Result<(), String> {
        // Each round consumes at least one whole frame of the bounded buffer.
        while self.answered_once(bbuf, cout)? {}
        Ok(())
    }

    /// One round of [`Self::answered`]; true when it dropped an unsolicited reply and bytes
    /// are left after it.
    fn answered_once(&mut self, bbuf: &mut BytesMut, cout: &mut BytesMut) -> Result<bool, String> {
        let mut n_replies = 0;
        let mut len = 0;
        let mut unsolicited = 0;
        loop {
            match self.framing.reply_len(&bbuf[len..]) {
                Ok(Some(f)) if f.push => len += f.len,
                Ok(Some(f)) if n_replies < self.lens.len() => {
                    len += f.len;
                    n_replies += 1;
                }
                Ok(Some(f)) => {
                    // A reply with no request in flight: nothing to pair it with.
                    unsolicited = f.len;
                    break;
                }
                Ok(None) => break,
                Err(e) => {
                    let shared = &self.front.shared;
                    shared.protocol_errors.fetch_add(1, Ordering::Relaxed);
                    return Err(format!("instance sent a malformed reply: {e}"));
                }
            }
        }
        if len > 0 {
            cout.extend_from_slice(&bbuf[..len]);
            bbuf.advance(len);
        }
        if n_replies > 0 {
            let req_bytes: usize = self.lens.drain(..n_replies).sum();
            self.unanswered.advance(req_bytes);
            self.written = self.written.saturating_sub(req_bytes);
            self.front
                .shared
                .inflight
                .fetch_sub(n_replies, Ordering::AcqRel);
        } else if bbuf.len() > self.framing.max_message() {
            return Err("instance reply exceeds the message limit".into());
        }
        if unsolicited > 0 {
            debug!(
                bytes = unsolicited,
                "dropping a reply that answers no request"
            );
            bbuf.advance(unsolicited);
            return Ok(!bbuf.is_empty());
        }
        Ok(false)
    }

    /// The connection to an instance ended: what it did not answer waits for the next one.
    fn lost(&mut self, b: &Backend, route_rx: &watch::Receiver<Route>, bbuf: &mut BytesMut) {
        let route = route_rx.borrow().clone();
        if route.hold || route.epoch != b.epoch {
            // Control is moving: the old instance hands back what it did not execute; it goes
            // to the new one.
            debug!(addr = %b.addr, epoch = b.epoch.0, inflight = self.lens.len(), "instance closed the connection as control moved");
        } else {
            warn!(addr = %b.addr, epoch = b.epoch.0, inflight = self.lens.len(), "instance connection lost");
        }
        self.written = 0;
        bbuf.clear();
    }
}

/// Serves a client of a protocol whose framing the front does not know: bytes go both ways as
/// they come, each way through a buffer of at most [`FrontLimits::max_buffered`] bytes.
/// Nothing is held or replayed. The connection waits (bounded by
/// [`FrontLimits::failover_wait`]) for a route that does not hold, connects to its instance,
/// and stays with that instance: a hold drains it (it is closed once quiet in both directions,
/// or at the drain deadline), and it is closed when the route moves to another instance or
/// epoch or its instance closes or fails. A client that half-closes has its end passed on; the
/// connection ends once the instance closes too. Returns why the connection ended: `Ok` for
/// an orderly end, `Err` for a failure.
async fn relay(front: &Front, mut client: TcpStream) -> Result<&'static str, String> {
    client.set_nodelay(true).ok();
    let (mut cr, mut cw) = client.split();
    let shared = &front.shared;
    let limits = &shared.limits;
    let mut route_rx = shared.route.subscribe();
    // Client bytes not yet sent to the instance; instance bytes not yet written to the client.
    // Reads land in `cin` and `bin` first and join them at the top of each round (a buffer
    // cannot be read into while it is being written from).
    let mut cbuf = BytesMut::with_capacity(4 * 1024);
    let mut cout = BytesMut::with_capacity(4 * 1024);
    let mut cin = BytesMut::with_capacity(4 * 1024);
    let mut bin = BytesMut::with_capacity(4 * 1024);
    let mut backend: Option<Backend> = None;
    let waiting_since = tokio::time::Instant::now();
    let mut client_open = true;
    // The client's end was passed on to the instance.
    let mut shut_down = false;
    let mut last_activity = tokio::time::Instant::now();
    let mut drain_since: Option<tokio::time::Instant> = None;
    loop {
        join(&mut cbuf, &mut cin);
        join(&mut cout, &mut bin);
        cin.reserve(4 * 1024);
        bin.reserve(4 * 1024);
        let route = route_rx.borrow_and_update().clone();
        let now = tokio::time::Instant::now();
        match backend.as_mut() {
            None => {
                if !client_open && cbuf.is_empty() {
                    return Ok("the client left before it was connected");
                }
                match route.backend {
                    Some(addr) if !route.hold => {
                        match tokio::time::timeout(limits.connect_timeout, TcpStream::connect(addr))
                            .await
                        {
                            Ok(Ok(stream)) => {
                                stream.set_nodelay(true).ok();
                                let (r, w) = stream.into_split();
                                backend = Some(Backend {
                                    r,
                                    w,
                                    epoch: route.epoch,
                                    addr,
                                });
                                last_activity = tokio::time::Instant::now();
                                continue;
                            }
                            Ok(Err(e)) => {
                                debug!(%addr, "connect to the instance in control failed: {e}");
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                            Err(_) => {
                                debug!(%addr, "connect to the instance in control timed out")
                            }
                        }
                    }
                    _ => {}
                }
                if waiting_since.elapsed() > limits.failover_wait {
                    return Err(format!(
                        "no instance in control to connect to within {:?}",
                        limits.failover_wait
                    ));
                }
            }
            Some(b) => {
                if route.backend != Some(b.addr) || route.epoch != b.epoch {
                    // Control moved on: this instance is no longer the one clients reach.
                    shared.drained.fetch_add(1, Ordering::Relaxed);
                    finish(&mut cw, &cout, limits.drain_timeout).await;
                    return Ok("control moved to another instance");
                }
                if route.hold {
                    drain_since.get_or_insert(now);
                } else {
                    // A released hold (an aborted switchover): the connection carries on.
                    drain_since = None;
                }
                if let Some(since) = drain_since {
                    let quiet = cbuf.is_empty()
                        && cout.is_empty()
                        && now.duration_since(last_activity) >= limits.drain_quiet;
                    if quiet || now.duration_since(since) >= limits.drain_timeout {
                        shared.drained.fetch_add(1, Ordering::Relaxed);
                        finish(&mut cw, &cout, limits.drain_timeout).await;
                        return Ok(if quiet {
                            "drained for a planned switchover"
                        } else {
                            "still busy at the end of the drain"
                        });
                    }
                }
                if !client_open && cbuf.is_empty() && !shut_down {
                    // Pass the client's end on; the instance's replies may still follow.
                    if let Err(e) = b.w.shutdown().await {
                        debug!(addr = %b.addr, "passing the client's end to the instance failed: {e}");
                    }
                    shut_down = true;
                }
            }
        }
        // When to look again: a connection waiting for a route polls; a draining one wakes at
        // the drain deadline, or when it will have been quiet long enough if nothing is left
        // to pass on (otherwise the bytes moving, or the deadline, wake it).
        let wake = match (&backend, drain_since) {
            (None, _) => Some(now + Duration::from_millis(50)),
            (Some(_), Some(since)) => {
                let deadline = since + limits.drain_timeout;
                if cbuf.is_empty() && cout.is_empty() {
                    Some((last_activity + limits.drain_quiet).min(deadline))
                } else {
                    Some(deadline)
                }
            }
            (Some(_), None) => None,
        };
        let can_read_client = client_open && cbuf.len() < limits.max_buffered;
        let can_read_backend = backend.is_some() && cout.len() < limits.max_buffered;
        let to_send = backend.is_some() && !cbuf.is_empty();
        let (br, bw) = match backend.as_mut() {
            Some(b) => (Some(&mut b.r), Some(&mut b.w)),
            None => (None, None),
        };
        enum Event {
            ClientRead(std::io::Result<usize>),
            Sent(std::io::Result<usize>),
            BackendRead(std::io::Result<usize>),
            ClientWritten(std::io::Result<usize>),
            Other,
        }
        let ev = tokio::select! {
            r = cr.read_buf(&mut cin), if can_read_client => Event::ClientRead(r),
            r = async {
                match bw {
                    Some(w) => w.write(&cbuf).await,
                    None => std::future::pending().await,
                }
            }, if to_send => Event::Sent(r),
            r = async {
                match br {
                    Some(r) => r.read_buf(&mut bin).await,
                    None => std::future::pending().await,
                }
            }, if can_read_backend => Event::BackendRead(r),
            r = cw.write(&cout), if !cout.is_empty() => Event::ClientWritten(r),
            _ = route_rx.changed() => Event::Other,
            _ = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => Event::Other,
        };
        match ev {
            Event::ClientRead(Ok(0)) => client_open = false,
            Event::ClientRead(Ok(_)) => last_activity = tokio::time::Instant::now(),
            Event::ClientRead(Err(e)) => return Err(format!("client read: {e}")),
            Event::Sent(Ok(n)) => {
                cbuf.advance(n);
                last_activity = tokio::time::Instant::now();
            }
            Event::Sent(Err(e)) => {
                finish(&mut cw, &cout, limits.drain_timeout).await;
                return Err(format!("write to the instance failed: {e}"));
            }
            Event::BackendRead(Ok(0)) => {
                finish(&mut cw, &cout, limits.drain_timeout).await;
                return Ok("the instance closed the connection");
            }
            Event::BackendRead(Ok(_)) => last_activity = tokio::time::Instant::now(),
            Event::BackendRead(Err(e)) => {
                finish(&mut cw, &cout, limits.drain_timeout).await;
                return Err(format!("read from the instance failed: {e}"));
            }
            Event::ClientWritten(Ok(n)) => {
                cout.advance(n);
                last_activity = tokio::time::Instant::now();
            }
            Event::ClientWritten(Err(e)) => return Err(format!("client write: {e}")),
            Event::Other => {}
        }
    }
}

/// Appends what `from` holds to `to`, leaving `from` empty.
fn join(to: &mut BytesMut, from: &mut BytesMut) {
    if from.is_empty() {
        return;
    }
    if to.is_empty() {
        std::mem::swap(to, from);
    } else {
        to.extend_from_slice(from);
        from.clear();
    }
}

/// Gives a closing client what its instance already sent, for at most `bound`.
async fn finish(cw: &mut tokio::net::tcp::WriteHalf<'_>, cout: &[u8], bound: Duration) {
    if cout.is_empty() {
        return;
    }
    match tokio::time::timeout(bound, cw.write_all(cout)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!("client write while closing: {e}"),
        Err(_) => debug!(
            bytes = cout.len(),
            "the client took not all of the instance's last bytes within {bound:?}"
        ),
    }
}
