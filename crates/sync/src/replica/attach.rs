//! The active's side of a link: the accept loop, the handshake (the hello read and checked,
//! the welcome built), a resume from the log, and the standby's acknowledgements.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use tracing::{debug, info, warn};

use super::active::note_ha_dropped;
use super::batch::encode_frame_body;
use super::link::{FrameReader, LinkCore, Outbox, Watchdog};
use super::{lock, not_active, Link, LinkState, Replica, Role};
use crate::log::LogEntry;
use crate::schema::negotiate;
use crate::wire::{self, BatchRef, Control, FrameType, FrameWriter};
use crate::{Conn, Digest, Epoch, Mutation, Seq, SyncError, VersionSet};

/// Accept loop serving standbys on a listener; stops when dropped.
#[derive(Debug)]
pub struct ServeHandle {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl ServeHandle {
    /// Address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
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

/// Serves standbys of several replicated services on one listener: each
/// connection is routed to the replica whose service its hello names.
pub fn serve(listener: TcpListener, replicas: Vec<Replica>) -> io::Result<ServeHandle> {
    let addr = listener.local_addr()?;
    // Blocking accept: a standby's connection is taken the moment it
    // arrives (no polling delay on a re-attach); `ServeHandle::stop` wakes
    // the loop by connecting to it.
    listener.set_nonblocking(false)?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let thread = thread::Builder::new()
        .name("sync-accept".into())
        .spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok(_) if stop2.load(Ordering::SeqCst) => break,
                    Ok((stream, peer)) => {
                        let replicas = replicas.clone();
                        let _ =
                            thread::Builder::new()
                                .name("sync-handshake".into())
                                .spawn(move || {
                                    if let Err(e) = accept_one(stream, &replicas) {
                                        debug!(%peer, error = %e, "standby connection refused");
                                    }
                                });
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
        thread: Some(thread),
    })
}

fn accept_one(stream: TcpStream, replicas: &[Replica]) -> Result<(), SyncError> {
    stream.set_nonblocking(false)?;
    let timeout = replicas
        .first()
        .map_or(Duration::from_secs(5), |r| r.inner.config.ack_timeout);
    stream.set_read_timeout(Some(timeout))?;
    let mut conn = Conn::tcp(stream.try_clone()?)?;
    let hello = read_hello(&mut conn)?;
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
        return Err(SyncError::Refused(reason));
    };
    stream.set_read_timeout(None)?;
    r.attach_hello(conn, hello)
}

fn read_hello(conn: &mut Conn) -> Result<Control, SyncError> {
    let f = wire::read_frame(&mut conn.reader)?.ok_or_else(|| {
        SyncError::Protocol("the standby closed the connection before its hello".into())
    })?;
    if f.kind != FrameType::Hello {
        return Err(SyncError::Protocol(format!(
            "expected a hello, got {:?}",
            f.kind
        )));
    }
    Ok(Control::decode(&f)?)
}

impl Replica {
    /// Serves standbys of this service on `listener` (accept loop thread).
    pub fn serve(&self, listener: TcpListener) -> io::Result<ServeHandle> {
        serve(listener, vec![self.clone()])
    }

    /// Active side: runs the handshake on an accepted connection and attaches
    /// the standby (bulk snapshot, then live stream) without stopping writes.
    /// Returns once the handshake is done; the transfer runs on threads.
    pub fn attach(&self, mut conn: Conn) -> Result<(), SyncError> {
        let dog = Watchdog::arm(conn.closer.clone(), self.inner.config.ack_timeout);
        let hello = read_hello(&mut conn);
        dog.disarm();
        self.attach_hello(conn, hello?)
    }

    fn attach_hello(&self, mut conn: Conn, hello: Control) -> Result<(), SyncError> {
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
            self.fence(peer_epoch);
            let e = SyncError::Fenced {
                current: my_epoch,
                newer: peer_epoch,
            };
            return refuse(&mut conn, peer_epoch, e);
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
                self.fence(f.epoch);
                return Err(SyncError::Fenced {
                    current: my_epoch,
                    newer: f.epoch,
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
