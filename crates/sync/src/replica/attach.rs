//! The active's side of a link: the accept loop, the handshake (the hello read and checked,
//! the welcome built), a resume from the log, and the standby's acknowledgements.

use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::active::note_ha_dropped;
use super::batch::encode_frame_body;
use super::link::{FrameReader, LinkCore, Outbox, Watchdog};
use super::{lock, not_active, Link, LinkState, Replica, Role};
use crate::log::LogEntry;
use crate::schema::negotiate;
use crate::wire::{self, BatchRef, Control, FrameType, FrameWriter};
use crate::{Conn, Digest, Epoch, Mutation, Seq, SyncError, VersionSet};

/// Time a connection to a sync listener has, from its accept, to deliver its whole hello; it
/// is then closed (and the peer's address logged). A standby's hello is one small frame
/// written at once, so this only ever cuts off peers that stall.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);

/// Most connections a sync listener holds open at once, those still in their handshake and
/// those of attached standbys alike. A connection beyond it is closed at once. An active
/// serves at most three standbys per service: the rest is room for re-attaches whose old
/// connection has not ended yet.
pub const MAX_SYNC_CONNECTIONS: usize = 16;

/// The largest hello payload accepted, checked on the frame header before any of the payload
/// is read or allocated (a real hello is a few hundred bytes).
pub const MAX_HELLO: usize = 64 << 10;

/// Most standbys an instance can be told to expect ([`Replica::expect_standbys`]).
pub const MAX_EXPECTED: usize = 16;

/// A standby the control plane tells the instance in control to serve: the name its hello
/// gives and, if known, the address it connects from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpectedStandby {
    /// The standby's node name (its instance identifier).
    pub node: String,
    /// The IP address it connects from; `None`: any address.
    pub addr: Option<IpAddr>,
}

impl ExpectedStandby {
    /// True if a hello naming `node` on a connection from `peer` is this standby.
    fn admits(&self, node: &str, peer: &str) -> bool {
        self.node == node
            && self.addr.is_none_or(|want| {
                peer.parse::<SocketAddr>()
                    .is_ok_and(|p| p.ip().to_canonical() == want.to_canonical())
            })
    }
}

/// The bounds a sync listener ([`serve_with`]) holds every connection to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServeLimits {
    /// Time from accept to a whole hello ([`HANDSHAKE_DEADLINE`] by default).
    pub handshake_deadline: Duration,
    /// Connections open at once, handshakes included ([`MAX_SYNC_CONNECTIONS`] by default).
    pub max_connections: usize,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            handshake_deadline: HANDSHAKE_DEADLINE,
            max_connections: MAX_SYNC_CONNECTIONS,
        }
    }
}

/// Accept loop serving standbys on a listener; stops when dropped.
#[derive(Debug)]
pub struct ServeHandle {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    open: Arc<AtomicUsize>,
    thread: Option<thread::JoinHandle<()>>,
}

impl ServeHandle {
    /// Address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections this listener holds open now: those in their handshake and those of
    /// attached standbys (at most [`ServeLimits::max_connections`]).
    pub fn connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Stops accepting (attached standbys stay attached).
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let Some(t) = self.thread.take() else {
            return;
        };
        // Wake the blocking accept with a connection of our own.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        if TcpStream::connect_timeout(&wake, Duration::from_secs(1)).is_ok() || t.is_finished() {
            let _ = t.join();
        } else {
            // Unreachable listener: the thread ends at its next accept.
            warn!(addr = %self.addr, "could not wake the accept loop; leaving it to end on its own");
        }
    }
}

impl Drop for ServeHandle {
    fn drop(&mut self) {
        self.halt();
    }
}

/// One connection counted against [`ServeLimits::max_connections`]; given back when dropped
/// (by the handshake thread on a refusal, by the standby's reading thread when its link ends).
pub(super) struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Logs connections closed for the cap at most once a second, with how many were closed
/// without a line since.
struct CapLog {
    last: Option<Instant>,
    unlogged: u64,
}

impl CapLog {
    const EVERY: Duration = Duration::from_secs(1);

    fn refused(&mut self, peer: SocketAddr, cap: usize) {
        if self.last.is_some_and(|t| t.elapsed() < Self::EVERY) {
            self.unlogged += 1;
            return;
        }
        warn!(
            %peer,
            cap,
            closed_unlogged = self.unlogged,
            "sync connection closed at once: the listener already holds its cap of connections"
        );
        self.last = Some(Instant::now());
        self.unlogged = 0;
    }
}

/// Serves standbys of several replicated services on one listener: each
/// connection is routed to the replica whose service its hello names. Uses the default
/// [`ServeLimits`].
pub fn serve(listener: TcpListener, replicas: Vec<Replica>) -> io::Result<ServeHandle> {
    serve_with(listener, replicas, ServeLimits::default())
}

/// [`serve`] with explicit bounds.
///
/// Threads: one accept thread, and one thread per open connection, which the cap bounds
/// ([`ServeLimits::max_connections`], counted from accept to the end of the connection). A
/// connection is taken by a thread of its own rather than on the accept thread because a
/// handshake reads the hello and then attaches the standby, which waits on the state lock:
/// done one at a time, a single stalling peer would hold back every standby behind it for
/// the whole deadline. A thread costs little next to the bulk transfer it leads to, and the
/// deadline ends a handshake thread that got no hello within [`ServeLimits::handshake_deadline`],
/// so at most `max_connections` handshake threads ever exist, each for at most the deadline.
pub fn serve_with(
    listener: TcpListener,
    replicas: Vec<Replica>,
    limits: ServeLimits,
) -> io::Result<ServeHandle> {
    let addr = listener.local_addr()?;
    // Blocking accept: a standby's connection is taken the moment it
    // arrives (no polling delay on a re-attach); `ServeHandle::stop` wakes
    // the loop by connecting to it.
    listener.set_nonblocking(false)?;
    let stop = Arc::new(AtomicBool::new(false));
    let open = Arc::new(AtomicUsize::new(0));
    let stop2 = stop.clone();
    let open2 = open.clone();
    let thread = thread::Builder::new()
        .name("sync-accept".into())
        .spawn(move || {
            let mut cap_log = CapLog {
                last: None,
                unlogged: 0,
            };
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok(_) if stop2.load(Ordering::SeqCst) => break,
                    Ok((stream, peer)) => {
                        if open2.fetch_add(1, Ordering::SeqCst) >= limits.max_connections {
                            open2.fetch_sub(1, Ordering::SeqCst);
                            let _ = stream.shutdown(std::net::Shutdown::Both);
                            cap_log.refused(peer, limits.max_connections);
                            continue;
                        }
                        let slot = Slot(open2.clone());
                        let replicas = replicas.clone();
                        let spawned =
                            thread::Builder::new()
                                .name("sync-handshake".into())
                                .spawn(move || {
                                    if let Err(e) =
                                        accept_one(stream, peer, &replicas, limits, slot)
                                    {
                                        debug!(%peer, error = %e, "standby connection refused");
                                    }
                                });
                        if let Err(e) = spawned {
                            // The closure (its stream and slot) is dropped: closed, counted off.
                            warn!(%peer, error = %e, "no thread for a sync connection; closed it");
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })?;
    Ok(ServeHandle {
        addr,
        stop,
        open,
        thread: Some(thread),
    })
}

fn accept_one(
    stream: TcpStream,
    peer: SocketAddr,
    replicas: &[Replica],
    limits: ServeLimits,
    slot: Slot,
) -> Result<(), SyncError> {
    let deadline = Instant::now() + limits.handshake_deadline;
    stream.set_nonblocking(false)?;
    let hello = match read_hello_by(&stream, deadline, limits.handshake_deadline) {
        Ok(h) => h,
        Err(e) => {
            if matches!(e, SyncError::Timeout(..)) {
                warn!(
                    %peer,
                    deadline = ?limits.handshake_deadline,
                    "sync connection closed: no whole hello within the handshake deadline"
                );
            }
            let _ = stream.shutdown(std::net::Shutdown::Both);
            return Err(e);
        }
    };
    let mut conn = Conn::tcp(stream.try_clone()?)?;
    let Control::Hello { service, .. } = &hello else {
        unreachable!()
    };
    let Some(r) = replicas
        .iter()
        .find(|r| r.inner.schema.service() == service)
    else {
        let reason = format!("service {service} is not served here");
        let _ = conn.writer.write_all(
            &Control::Refuse {
                reason: reason.clone(),
            }
            .encode(crate::ControlEpoch(0), 0),
        );
        let _ = stream.shutdown(std::net::Shutdown::Both);
        return Err(SyncError::Refused(reason));
    };
    stream.set_read_timeout(None)?;
    r.attach_hello(conn, hello, Some(slot))
}

/// Reads from a TCP stream, failing with `TimedOut` once `deadline` has passed: a peer that
/// sends a byte now and then cannot stretch the handshake past it.
struct ByDeadline<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
}

impl io::Read for ByDeadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        let mut s = self.stream;
        s.read(buf)
    }
}

/// The hello of a TCP connection, whole by `deadline` (`allowed`: the deadline's length, for
/// the error).
fn read_hello_by(
    stream: &TcpStream,
    deadline: Instant,
    allowed: Duration,
) -> Result<Control, SyncError> {
    let mut r = ByDeadline { stream, deadline };
    let timed_out = |e: SyncError| match e {
        SyncError::Io(e)
            if matches!(
                e.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ) =>
        {
            SyncError::Timeout(allowed, "the standby's hello")
        }
        e => e,
    };
    read_hello(&mut r).map_err(timed_out)
}

/// Reads a hello: the header is checked (a hello, of at most [`MAX_HELLO`] bytes) before any
/// of the payload is read or allocated.
fn read_hello(r: &mut dyn io::Read) -> Result<Control, SyncError> {
    let mut frame = vec![0u8; wire::HEADER_LEN];
    let mut got = 0;
    while got < wire::HEADER_LEN {
        match r.read(&mut frame[got..]) {
            Ok(0) => {
                return Err(SyncError::Protocol(
                    "the standby closed the connection before its hello".into(),
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let h = wire::decode_header(&frame)?;
    if h.kind != FrameType::Hello {
        return Err(SyncError::Protocol(format!(
            "expected a hello, got {:?}",
            h.kind
        )));
    }
    if h.len > MAX_HELLO {
        return Err(SyncError::HelloTooLarge {
            len: h.len,
            limit: MAX_HELLO,
        });
    }
    frame.resize(wire::HEADER_LEN + h.len, 0);
    r.read_exact(&mut frame[wire::HEADER_LEN..])?;
    let (f, _) = wire::decode_frame(&frame)?;
    Ok(Control::decode(&f)?)
}

impl Replica {
    /// Serves standbys of this service on `listener` (accept loop thread).
    pub fn serve(&self, listener: TcpListener) -> io::Result<ServeHandle> {
        serve(listener, vec![self.clone()])
    }

    /// Tells this instance which standbys it serves: a hello whose name (and, where given,
    /// address) matches none of `expected` is refused before anything of the state is sent,
    /// and attached standbys that match none are detached. `None` (the state at start) serves
    /// any standby. At most [`MAX_EXPECTED`]; a longer list is refused and changes nothing.
    pub fn expect_standbys(&self, expected: Option<Vec<ExpectedStandby>>) -> Result<(), SyncError> {
        if let Some(list) = &expected {
            if list.len() > MAX_EXPECTED {
                return Err(SyncError::TooManyExpectedStandbys {
                    given: list.len(),
                    limit: MAX_EXPECTED,
                });
            }
        }
        let mut st = self.state();
        if let Some(list) = &expected {
            for l in &st.links {
                if !list.iter().any(|e| e.admits(&l.link.node, &l.link.peer)) {
                    info!(standby = %l.link.node, peer = %l.link.peer, "detaching a standby no longer expected");
                    l.link.core.close();
                }
            }
        }
        st.expected = expected;
        Ok(())
    }

    /// Active side: runs the handshake on an accepted connection and attaches
    /// the standby (bulk snapshot, then live stream) without stopping writes.
    /// Returns once the handshake is done; the transfer runs on threads.
    pub fn attach(&self, mut conn: Conn) -> Result<(), SyncError> {
        let dog = Watchdog::arm(conn.closer.clone(), self.inner.config.ack_timeout);
        let hello = read_hello(&mut conn.reader);
        dog.disarm();
        self.attach_hello(conn, hello?, None)
    }

    /// Checks a standby's hello and attaches it. `slot`, the connection's place under the
    /// listener's cap, is held until the link ends.
    fn attach_hello(
        &self,
        mut conn: Conn,
        hello: Control,
        slot: Option<Slot>,
    ) -> Result<(), SyncError> {
        let Control::Hello {
            service,
            node,
            native,
            reads,
            writes,
            ha,
            epoch: peer_epoch,
            resume,
            formats: peer_formats,
        } = hello
        else {
            return Err(SyncError::Protocol("expected a hello".into()));
        };
        let schema = &self.inner.schema;
        let cfg = &self.inner.config;
        let refuse = |conn: &mut Conn, epoch: Epoch, err: SyncError| -> Result<(), SyncError> {
            let _ = conn.writer.write_all(
                &Control::Refuse {
                    reason: err.to_string(),
                }
                .encode(epoch, 0),
            );
            let _ = conn.writer.flush();
            if let Some(c) = &conn.closer {
                c();
            }
            Err(err)
        };
        if service != schema.service() {
            let e = SyncError::ServiceMismatch {
                local: schema.service().into(),
                peer: service,
            };
            return refuse(&mut conn, crate::ControlEpoch(0), e);
        }
        let my_epoch = self.epoch();
        if peer_epoch > my_epoch {
            // Never adopted: anyone who reaches the sync port can write a hello, and an epoch
            // taken from one would fence this instance (every write refused) until the control
            // plane, the only source of the epoch that fences, moved it again.
            warn!(
                peer = %conn.peer,
                standby = %node,
                epoch = peer_epoch.0,
                current = my_epoch.0,
                "refused a standby whose hello carries a newer epoch than this instance's"
            );
            let e = SyncError::NewerEpochFromPeer {
                peer: peer_epoch,
                current: my_epoch,
            };
            return refuse(&mut conn, my_epoch, e);
        }
        let admitted = match &self.state().expected {
            None => true,
            Some(list) => list.iter().any(|e| e.admits(&node, &conn.peer)),
        };
        if !admitted {
            warn!(
                peer = %conn.peer,
                standby = %node,
                "refused a standby the control plane did not tell this instance to serve"
            );
            let e = SyncError::UnexpectedStandby {
                node,
                peer: conn.peer.clone(),
            };
            return refuse(&mut conn, my_epoch, e);
        }
        let stream_version = match negotiate(
            schema.service(),
            schema.version(),
            &schema.writes(),
            native,
            &VersionSet(reads),
            &VersionSet(writes),
        ) {
            Ok(v) => v,
            Err(e) => {
                let epoch = self.epoch();
                return refuse(&mut conn, epoch, e);
            }
        };
        let format =
            match wire::negotiate_format(cfg.formats, peer_formats.unwrap_or(wire::LEGACY_FORMATS))
            {
                Ok(f) => f,
                Err(e) => {
                    let epoch = self.epoch();
                    return refuse(&mut conn, epoch, e.into());
                }
            };
        let mut st = self.state();
        if st.role != Role::Active {
            let (e, epoch) = (not_active(&st), st.epoch);
            drop(st);
            return refuse(&mut conn, epoch, e);
        }
        st.links.retain(|l| !l.link.core.is_closed());
        if st.links.len() >= cfg.max_standbys.min(3) {
            let (n, epoch) = (st.links.len(), st.epoch);
            drop(st);
            return refuse(&mut conn, epoch, SyncError::TooManyStandbys(n));
        }
        if stream_version != schema.version() {
            // The digest is kept in one foreign version at a time.
            if let Some(other) = st
                .links
                .iter()
                .filter(|l| l.link.node != node)
                .map(|l| l.link.stream_version)
                .find(|v| *v != schema.version() && *v != stream_version)
            {
                let epoch = st.epoch;
                drop(st);
                let e = SyncError::Protocol(format!(
                    "this active already streams version {other} to another standby and keeps \
                     the digest of one foreign version at a time; version {stream_version} \
                     must wait until that standby detaches"
                ));
                return refuse(&mut conn, epoch, e);
            }
        }
        if let Some(old) = st.links.iter().find(|l| l.link.node == node) {
            // A re-attaching standby replaces its previous link.
            old.link.core.close();
        }
        st.links.retain(|l| l.link.node != node);
        let epoch = st.epoch;
        // Frames after the welcome (itself in the frozen handshake format) are written in the
        // negotiated format.
        let mut w = wire::format_writer(conn.writer, format).expect("negotiated a known format");
        let welcome = Control::Welcome {
            node: cfg.node.clone(),
            native: schema.version(),
            stream_version,
            tables: schema.tables_of(stream_version).to_vec(),
            format: Some(format),
        }
        .encode(epoch, st.seq);
        let link = Arc::new(Link {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            node: node.clone(),
            peer: conn.peer.clone(),
            ha,
            stream_version,
            native_version: native,
            core: LinkCore::new(conn.closer.clone()),
            out: Mutex::new(Outbox {
                buf: Vec::new(),
                spare: Vec::new(),
                writing: true,
                writer: None,
            }),
            drained: Condvar::new(),
            bulk: AtomicBool::new(false),
            promoted: AtomicU64::new(0),
        });
        // Free if the state is empty; otherwise built in steps by the bulk
        // transfer or by digest checks.
        st.store.track(schema, stream_version);
        let snap_seq = st.seq;
        let snap_epoch = st.last_epoch;
        // Resume instead of a snapshot if the standby's position is on this
        // instance's history and the log still holds every batch after it.
        // Resume instead of a bulk transfer if the standby's position is on
        // this instance's history, the log still holds every batch after it,
        // and the digest at snap_seq in the stream version is kept (no scan).
        let kept = st.store.digest_kept(schema, stream_version);
        let replay = resume
            .filter(|p| p.seq > 0 && p.seq <= snap_seq && kept.is_some())
            .and_then(|p| Some((p.seq, st.log.after(p.seq, p.epoch)?)));
        if replay.is_none() {
            // The bulk transfer goes through the link's queue, in order with
            // the live stream (see `bulk`): its first frame goes first.
            let begin = Control::BulkBegin {
                seq: snap_seq,
                records: st.store.len() as u64,
            };
            link.push(&begin.encode(epoch, snap_seq), usize::MAX);
            link.bulk.store(true, Ordering::Relaxed);
        }
        if replay.is_some() {
            st.resumes_sent += 1;
        } else {
            st.snapshots_sent += 1;
        }
        st.links.push(LinkState {
            link: link.clone(),
            resumed: replay.is_some(),
            snap_seq,
            acked: 0,
            bulk_done: false,
            in_sync: false,
            digest_matched: false,
            digest_seq: 0,
            bulk_sent: 0,
        });
        drop(st);
        info!(
            service = schema.service(),
            standby = %node,
            stream_version,
            snap_seq,
            resume_from = ?replay.as_ref().map(|r| r.0),
            "standby attached"
        );
        if let Err(e) = w.write_all(&welcome).and_then(|_| w.flush()) {
            link.core.close();
            self.drop_link(link.id, Some(e.to_string()));
            return Err(e.into());
        }
        let me = self.clone();
        let l2 = link.clone();
        thread::Builder::new()
            .name("sync-bulk".into())
            .spawn(move || {
                // No client waits for it (the thread ends with the transfer).
                if let Some(f) = me.inner.config.background_thread {
                    f();
                }
                let r = match (replay, kept) {
                    (Some((from, entries)), Some(digest)) => {
                        me.send_resume(&l2, w, digest, from, entries, snap_seq, snap_epoch, epoch)
                    }
                    _ => {
                        me.hand_over(&l2, w);
                        me.send_bulk(&l2, epoch)
                    }
                };
                if let Err(e) = r {
                    warn!(standby = %l2.node, error = %e, "bulk transfer failed");
                    l2.core.close();
                }
            })?;
        let me = self.clone();
        let l2 = link.clone();
        let mut frames = FrameReader::new(conn.reader, 64 << 10, cfg.formats);
        thread::Builder::new()
            .name("sync-acks".into())
            .spawn(move || {
                // The connection counts against the listener's cap until its link ends.
                let _slot = slot;
                let r = me.read_acks(&l2, &mut frames);
                l2.core.close();
                me.drop_link(l2.id, r.err().map(|e| e.to_string()));
            })?;
        let me = self.clone();
        thread::Builder::new()
            .name("sync-tick".into())
            .spawn(move || me.tick_active(&link))?;
        Ok(())
    }

    fn drop_link(&self, id: u64, err: Option<String>) {
        let mut st = self.state();
        if let Some(pos) = st.links.iter().position(|l| l.link.id == id) {
            let l = st.links.remove(pos);
            if l.link.ha && l.in_sync {
                note_ha_dropped(&mut st, &l.link.node);
            }
            // Ends the connection now (a standby that left waits for this).
            l.link.core.close();
            info!(standby = %l.link.node, error = ?err, "standby detached");
            if err.is_some() {
                st.last_error = err;
            }
        }
        drop(st);
        self.inner.cond.notify_all();
    }

    /// Hands the writer to the live stream and sends what queued meanwhile.
    fn hand_over(&self, link: &Link, w: Box<dyn Write + Send>) {
        {
            let mut ob = lock(&link.out);
            ob.writer = Some(w);
            ob.writing = false;
        }
        link.flush();
    }

    /// Resumes a standby at `from`: replays the logged batches up to
    /// `snap_seq`, then the digest of the state at `snap_seq` (`snapshot`).
    #[allow(clippy::too_many_arguments)]
    fn send_resume(
        &self,
        link: &Link,
        mut w: Box<dyn Write + Send>,
        digest: Digest,
        from: Seq,
        entries: Vec<LogEntry>,
        snap_seq: Seq,
        snap_epoch: Epoch,
        epoch: Epoch,
    ) -> Result<(), SyncError> {
        let schema = &self.inner.schema;
        let native = schema.version();
        let sv = link.stream_version;
        let mut fw = FrameWriter::new();
        fw.frame(
            FrameType::ResumeBegin,
            epoch,
            snap_seq,
            &serde_json::to_vec(&Control::ResumeBegin {
                from,
                seq: snap_seq,
                batches: entries.len() as u64,
            })
            .expect("control messages serialize"),
        );
        let mut muts = Vec::new();
        for e in &entries {
            if link.core.is_closed() {
                return Err(SyncError::Shutdown);
            }
            if sv == native {
                fw.begin(FrameType::ReplayBatch, epoch, e.last);
                let p = fw.payload();
                p.extend_from_slice(&e.epoch.0.to_le_bytes());
                p.extend_from_slice(&e.first.to_le_bytes());
                p.extend_from_slice(&e.body);
                fw.finish();
            } else {
                muts.clear();
                let body = BatchRef::parse(FrameType::Batch, &e.body)?;
                muts.extend(body.iter().map(|m| match m.value {
                    Some(v) => Mutation::put(m.table, m.key, v),
                    None => Mutation::delete(m.table, m.key),
                }));
                encode_frame_body(
                    schema,
                    &mut fw,
                    FrameType::ReplayBatch,
                    epoch,
                    Some(e.epoch),
                    e.first,
                    e.last,
                    &muts,
                    sv,
                )?;
            }
            if fw.len() >= wire::BULK_PAYLOAD {
                w.write_all(fw.as_bytes())?;
                fw.clear();
            }
        }
        let end = Control::ResumeEnd {
            seq: snap_seq,
            last_epoch: snap_epoch,
            digest,
        };
        fw.frame(
            FrameType::ResumeEnd,
            epoch,
            snap_seq,
            &serde_json::to_vec(&end).expect("control messages serialize"),
        );
        w.write_all(fw.as_bytes())?;
        w.flush()?;
        debug!(standby = %link.node, from, to = snap_seq, batches = entries.len(), "resume sent");
        self.hand_over(link, w);
        Ok(())
    }

    /// The standby's frames (acknowledgements, digest results, a promotion's confirmation,
    /// a leave) until the link ends.
    fn read_acks(&self, link: &Link, frames: &mut FrameReader) -> Result<(), SyncError> {
        loop {
            let Some(f) = frames.next(&link.core)? else {
                return Err(SyncError::Protocol("the standby closed the link".into()));
            };
            let my_epoch = self.epoch();
            if f.epoch > my_epoch && f.kind != FrameType::PromoteAck {
                // As for a hello: a sync frame never raises this instance's epoch. The link
                // ends; the control plane fences this instance if control really moved.
                warn!(
                    peer = %link.peer,
                    standby = %link.node,
                    epoch = f.epoch.0,
                    current = my_epoch.0,
                    "closed the link of a standby that sent a newer epoch than this instance's"
                );
                return Err(SyncError::NewerEpochFromPeer {
                    peer: f.epoch,
                    current: my_epoch,
                });
            }
            match f.kind {
                FrameType::Ack | FrameType::Heartbeat => {
                    let mut st = self.state_urgent();
                    let seq_now = st.seq;
                    let mut back_in_sync = None;
                    if let Some(l) = st.links.iter_mut().find(|l| l.link.id == link.id) {
                        if f.seq > seq_now {
                            return Err(SyncError::Protocol(format!(
                                "standby acknowledged {} beyond the last sequence {seq_now}",
                                f.seq
                            )));
                        }
                        if f.seq > l.acked {
                            l.acked = f.seq;
                        }
                        if l.bulk_done && !l.in_sync && l.acked >= l.snap_seq {
                            l.in_sync = true;
                            if l.link.ha {
                                back_in_sync = Some(l.link.node.clone());
                            }
                        }
                    }
                    if let Some(node) = back_in_sync {
                        st.ha_dropped.retain(|(n, _)| *n != node);
                    }
                    self.inner.acks.fetch_add(1, Ordering::Release);
                    drop(st);
                    self.inner.cond.notify_all();
                }
                FrameType::DigestResult => {
                    let Control::DigestResult { seq, matched } = f.control()? else {
                        unreachable!()
                    };
                    let mut st = self.state();
                    let mut back_in_sync = None;
                    if let Some(l) = st.links.iter_mut().find(|l| l.link.id == link.id) {
                        if seq == l.snap_seq && !l.bulk_done {
                            l.bulk_done = true;
                            l.acked = l.acked.max(seq);
                            l.in_sync = true;
                            if l.link.ha {
                                back_in_sync = Some(l.link.node.clone());
                            }
                        }
                        l.digest_matched = matched;
                        l.digest_seq = seq;
                    }
                    if let Some(node) = back_in_sync {
                        st.ha_dropped.retain(|(n, _)| *n != node);
                    }
                    self.inner.acks.fetch_add(1, Ordering::Release);
                    drop(st);
                    if !matched {
                        warn!(standby = %link.node, seq, "standby digest mismatch");
                    }
                    self.inner.cond.notify_all();
                    // Tell the standby at once that it now counts as in sync.
                    self.heartbeat_to(link);
                }
                FrameType::PromoteAck => {
                    link.promoted.store(f.epoch.0, Ordering::SeqCst);
                    let st = self.state();
                    drop(st);
                    self.inner.cond.notify_all();
                    return Ok(());
                }
                FrameType::Refuse => {
                    let reason = match f.control()? {
                        Control::Refuse { reason } => reason,
                        _ => unreachable!(),
                    };
                    return Err(SyncError::Refused(reason));
                }
                FrameType::Leave => {
                    // Detached on purpose: it stops counting at once, without a grace.
                    let mut st = self.state();
                    if let Some(l) = st.links.iter_mut().find(|l| l.link.id == link.id) {
                        l.in_sync = false;
                    }
                    drop(st);
                    self.inner.cond.notify_all();
                    info!(standby = %link.node, "standby left");
                    return Ok(());
                }
                k => {
                    return Err(SyncError::Protocol(format!(
                        "unexpected {k:?} frame from a standby"
                    )))
                }
            }
        }
    }

    /// Queues a heartbeat to a standby: the active's seq, the standby's lag
    /// as seen here, and whether the standby counts as in sync.
    fn heartbeat_to(&self, link: &Link) {
        let (epoch, seq, lag, in_sync) = {
            let st = self.state();
            let l = st.links.iter().find(|l| l.link.id == link.id);
            let lag = l.map_or(0, |l| st.seq.saturating_sub(l.acked));
            (st.epoch, st.seq, lag, l.is_some_and(|l| l.in_sync))
        };
        let mut payload = lag.to_le_bytes().to_vec();
        payload.push(in_sync as u8);
        let hb = wire::encode_frame(FrameType::Heartbeat, epoch, seq, &payload);
        if link.push(&hb, self.inner.config.max_queue_bytes) {
            link.flush();
        }
    }

    fn tick_active(&self, link: &Link) {
        let cfg = &self.inner.config;
        while link.core.sleep(cfg.heartbeat) {
            if link.core.idle_for() > cfg.link_timeout {
                warn!(standby = %link.node, "standby silent for too long: detaching it");
                link.core.close();
                break;
            }
            self.heartbeat_to(link);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that has only `bytes`, then fails as a stalled peer would.
    struct Only(io::Cursor<Vec<u8>>);

    impl io::Read for Only {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match self.0.read(buf)? {
                0 => Err(io::ErrorKind::TimedOut.into()),
                n => Ok(n),
            }
        }
    }

    fn header(kind: FrameType, len: usize) -> Vec<u8> {
        let mut f = wire::encode_frame(kind, crate::ControlEpoch(1), 0, &[]);
        f[8..12].copy_from_slice(&(len as u32).to_le_bytes());
        f.truncate(wire::HEADER_LEN);
        f
    }

    #[test]
    fn an_oversized_hello_is_refused_on_its_header_before_its_payload_is_read() {
        // Only the header arrives: the refusal comes from it, not from waiting for 1 MiB.
        let err = read_hello(&mut Only(io::Cursor::new(header(
            FrameType::Hello,
            1 << 20,
        ))))
        .expect_err("refused");
        assert!(
            matches!(err, SyncError::HelloTooLarge { len, limit } if len == 1 << 20 && limit == MAX_HELLO),
            "{err}"
        );
    }

    #[test]
    fn a_first_frame_other_than_a_hello_is_refused_on_its_header() {
        let err = read_hello(&mut Only(io::Cursor::new(header(
            FrameType::Batch,
            1 << 20,
        ))))
        .expect_err("refused");
        assert!(err.to_string().contains("expected a hello"), "{err}");
    }

    #[test]
    fn a_hello_within_the_bound_is_read() {
        let hello = Control::Hello {
            service: "kv".into(),
            node: "s".into(),
            native: 1,
            reads: vec![1],
            writes: vec![1],
            ha: false,
            epoch: crate::ControlEpoch(2),
            resume: None,
            formats: None,
        };
        let bytes = hello.encode(crate::ControlEpoch(2), 0);
        assert_eq!(
            read_hello(&mut Only(io::Cursor::new(bytes))).unwrap(),
            hello
        );
    }
}
