//! The standby's side of a link: the handshake (the hello built, the welcome checked), then
//! the stream of the active, one handler per frame type over a [`Session`] that holds what
//! the stream keeps between frames.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::{debug, info, warn};

use super::batch::{apply_converted, Converted};
use super::link::{FLink, FrameReader, Incoming, LinkCore, Watchdog};
use super::{lock, Replica, Role};
use crate::log::LogEntry;
use crate::wire::{self, BatchRef, Control, FrameType, MutationRef, ResumePoint};
use crate::{Conn, Digest, Epoch, Record, SchemaVersion, Seq, SyncError};

/// The longest a leaving standby waits for the active to close the link after its Leave.
const LEAVE_WAIT: Duration = Duration::from_millis(500);

pub(super) struct FollowState {
    pub(super) link: Arc<FLink>,
    pub(super) stream_version: SchemaVersion,
    pub(super) active_seq: Seq,
    pub(super) reported_lag: u64,
    pub(super) bulk_done: bool,
    pub(super) digest_matched: bool,
    pub(super) digest_seq: Seq,
    /// The active reported this standby in sync (counting for sync acks).
    pub(super) in_sync: bool,
}

/// A running standby link. Dropping the handle leaves the link running;
/// [`FollowHandle::stop`] ends it.
#[derive(Debug)]
pub struct FollowHandle {
    link: Arc<FLink>,
    thread: Option<thread::JoinHandle<()>>,
}

impl FollowHandle {
    /// True once the link ended (error, stop, promotion or fencing).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Tells the active this standby detaches on purpose ([`FrameType::Leave`]: it is not
    /// a lost HA standby, see [`ReplicaConfig::ha_grace`]), then closes the link and waits
    /// for it to end. Use it when the control plane stops or re-points the standby.
    ///
    /// [`ReplicaConfig::ha_grace`]: crate::ReplicaConfig::ha_grace
    pub fn leave(self) {
        self.link.leaving.store(true, Ordering::Release);
        let sent = self.link.send(&wire::encode_frame(
            FrameType::Leave,
            crate::ControlEpoch(0),
            0,
            &[],
        ));
        // Let the active read the Leave and close the link itself (bounded): closing first
        // could make the active see a dropped HA standby (a failed write) before it reads
        // the Leave, and hold acknowledgements for the HA grace. Only an active heard from
        // lately is waited for: a hung or cut-off one (a failover promoting this standby) is
        // not.
        let heard_lately = self.link.core.idle_for() < LEAVE_WAIT;
        if sent.is_ok() && heard_lately {
            let deadline = Instant::now() + LEAVE_WAIT;
            while self.thread.as_ref().is_some_and(|t| !t.is_finished())
                && Instant::now() < deadline
            {
                thread::sleep(Duration::from_millis(1));
            }
        }
        self.stop();
    }

    /// Closes the link and waits for it to end.
    pub fn stop(mut self) {
        self.link.core.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Waits for the link to end; returns the error that ended it, if any
    /// (as [`SyncError::Protocol`] carrying the original message).
    pub fn join(mut self) -> Result<(), SyncError> {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        match lock(&self.link.result).take() {
            Some(Err(e)) => Err(SyncError::Protocol(e)),
            _ => Ok(()),
        }
    }
}

impl Replica {
    /// Standby side: connects to an active over `conn`, announces this
    /// instance's versions (`ha`: designated HA standby), receives the bulk
    /// snapshot and then the live stream. The local state is replaced by the
    /// snapshot. Returns once the handshake is done.
    pub fn follow(&self, mut conn: Conn, ha: bool) -> Result<FollowHandle, SyncError> {
        let schema = &self.inner.schema;
        let cfg = &self.inner.config;
        let (my_epoch, resume) = {
            let st = self.state();
            if st.role != Role::Standby {
                return Err(SyncError::NotStandby { role: st.role });
            }
            if st.follow.as_ref().is_some_and(|f| !f.link.core.is_closed()) {
                return Err(SyncError::Protocol(
                    "this standby already follows an active".into(),
                ));
            }
            let resume = (st.history_ok && st.seq > 0 && st.last_epoch > crate::ControlEpoch(0))
                .then_some(ResumePoint {
                    seq: st.seq,
                    epoch: st.last_epoch,
                });
            (st.epoch, resume)
        };
        let hello = Control::Hello {
            service: schema.service().into(),
            node: cfg.node.clone(),
            native: schema.version(),
            reads: schema.reads().0,
            writes: schema.writes().0,
            ha,
            epoch: my_epoch,
            resume,
            formats: Some(cfg.formats),
        };
        let dog = Watchdog::arm(conn.closer.clone(), cfg.ack_timeout);
        let welcome = (|| -> Result<(wire::Frame, Control), SyncError> {
            conn.writer.write_all(&hello.encode(my_epoch, 0))?;
            conn.writer.flush()?;
            let f = wire::read_frame(&mut conn.reader)?.ok_or_else(|| {
                SyncError::Protocol("the active closed the connection during the handshake".into())
            })?;
            let c = match f.kind {
                FrameType::Welcome | FrameType::Refuse => Control::decode(&f)?,
                k => {
                    return Err(SyncError::Protocol(format!(
                        "expected a welcome, got {k:?}"
                    )))
                }
            };
            Ok((f, c))
        })();
        dog.disarm();
        let (frame, welcome) = welcome.inspect_err(|_| {
            if let Some(c) = &conn.closer {
                c();
            }
        })?;
        let (stream_version, format) = match welcome {
            Control::Refuse { reason } => return Err(SyncError::Refused(reason)),
            Control::Welcome {
                stream_version,
                format,
                ..
            } => (stream_version, format.unwrap_or(wire::HANDSHAKE_VERSION)),
            _ => unreachable!(),
        };
        if !cfg.formats.contains(format) {
            if let Some(c) = &conn.closer {
                c();
            }
            return Err(SyncError::Protocol(format!(
                "the active chose sync frame format {format}, outside this end's formats {}",
                cfg.formats
            )));
        }
        let writer = wire::format_writer(conn.writer, format)?;
        if !schema.reads().contains(stream_version) {
            return Err(SyncError::Protocol(format!(
                "the active chose stream version {stream_version}, which this build cannot read"
            )));
        }
        let link = Arc::new(FLink {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            core: LinkCore::new(conn.closer.clone()),
            leaving: AtomicBool::new(false),
            writer: Mutex::new(writer),
            result: Mutex::new(None),
        });
        {
            let mut st = self.state();
            if frame.epoch < st.epoch {
                let e = SyncError::StaleEpoch {
                    frame: frame.epoch,
                    current: st.epoch,
                };
                drop(st);
                link.core.close();
                return Err(e);
            }
            if st.role != Role::Standby {
                link.core.close();
                return Err(SyncError::NotStandby { role: st.role });
            }
            st.set_epoch(frame.epoch);
            st.follow = Some(FollowState {
                link: link.clone(),
                stream_version,
                active_seq: frame.seq,
                reported_lag: 0,
                bulk_done: false,
                digest_matched: false,
                digest_seq: 0,
                in_sync: false,
            });
        }
        let me = self.clone();
        let l2 = link.clone();
        let reader = conn.reader;
        let thread = thread::Builder::new()
            .name("sync-follow".into())
            .spawn(move || {
                if !ha {
                    // Not the HA standby: no client's acknowledgement waits for this stream.
                    if let Some(f) = me.inner.config.background_thread {
                        f();
                    }
                }
                let r = me.receive(&l2, reader, stream_version);
                let err = r.as_ref().err().map(|e| e.to_string());
                if let Some(e) = &err {
                    warn!(error = %e, "standby link ended");
                }
                l2.core.close();
                *lock(&l2.result) = Some(r.map(|_| ()).map_err(|e| e.to_string()));
                let mut st = me.state();
                if st.follow.as_ref().is_some_and(|f| f.link.id == l2.id) {
                    st.follow = None;
                }
                if err.is_some() {
                    st.last_error = err;
                }
                drop(st);
                me.inner.cond.notify_all();
            })?;
        let me = self.clone();
        let l3 = link.clone();
        thread::Builder::new()
            .name("sync-follow-tick".into())
            .spawn(move || me.tick_standby(&l3))?;
        Ok(FollowHandle {
            link,
            thread: Some(thread),
        })
    }

    fn tick_standby(&self, link: &FLink) {
        let cfg = &self.inner.config;
        while link.core.sleep(cfg.heartbeat) {
            if link.core.idle_for() > cfg.link_timeout {
                warn!("active silent for too long: closing the link");
                link.core.close();
                break;
            }
            let (epoch, seq) = {
                let st = self.state();
                (st.epoch, st.seq)
            };
            if link
                .send(&wire::encode_frame(FrameType::Heartbeat, epoch, seq, &[]))
                .is_err()
            {
                link.core.close();
            }
        }
    }

    /// Converts borrowed stream-version mutations to native ones.
    fn to_native<'a>(
        &self,
        muts: impl Iterator<Item = MutationRef<'a>>,
        sv: SchemaVersion,
    ) -> Result<Vec<Converted>, SyncError> {
        let schema = &self.inner.schema;
        let native = schema.version();
        let mut out = Vec::new();
        for m in muts {
            let table = m.table;
            if !schema.has_table(sv, table) {
                return Err(SyncError::UnknownTable {
                    service: schema.service().into(),
                    version: sv,
                    table: table.into(),
                });
            }
            let c = match m.value {
                None => {
                    if schema.has_table(native, table) {
                        Converted::Delete(table.into(), m.key.to_vec())
                    } else {
                        Converted::Dropped
                    }
                }
                Some(v) => {
                    let rec = Record::new(table, m.key, v);
                    match schema.convert(&rec, sv, native)? {
                        Some(r) if schema.has_table(native, &r.table) => {
                            Converted::Put(r.table, r.key, r.value)
                        }
                        Some(_) => Converted::Dropped,
                        None if schema.has_table(native, table) => {
                            Converted::Delete(rec.table, rec.key)
                        }
                        None => Converted::Dropped,
                    }
                }
            };
            out.push(c);
        }
        Ok(out)
    }

    /// Checks that every table a native-version body names is declared.
    fn check_native_tables(&self, body: &BatchRef<'_>) -> Result<(), SyncError> {
        let schema = &self.inner.schema;
        if let Some(t) = body.single_table() {
            if !schema.has_table(schema.version(), t) {
                return Err(SyncError::UnknownTable {
                    service: schema.service().into(),
                    version: schema.version(),
                    table: t.into(),
                });
            }
            return Ok(());
        }
        let mut last: Option<&str> = None;
        for m in body.iter() {
            if last == Some(m.table) {
                continue;
            }
            if !schema.has_table(schema.version(), m.table) {
                return Err(SyncError::UnknownTable {
                    service: schema.service().into(),
                    version: schema.version(),
                    table: m.table.into(),
                });
            }
            last = Some(m.table);
        }
        Ok(())
    }

    /// Applies one streamed batch (live or replayed) as a whole: everything
    /// is checked and converted first, then applied and logged under the
    /// lock. `raw` is the body as received (count, then mutations).
    #[allow(clippy::too_many_arguments)]
    fn apply_stream_batch(
        &self,
        sv: SchemaVersion,
        first: Seq,
        last: Seq,
        origin: Epoch,
        body: BatchRef<'_>,
        raw: &[u8],
    ) -> Result<(), SyncError> {
        let schema = &self.inner.schema;
        let native = schema.version();
        let (conv, log_body) = if sv == native {
            self.check_native_tables(&body)?;
            (None, None)
        } else {
            let conv = self.to_native(body.iter(), sv)?;
            let mut nb = Vec::with_capacity(raw.len() + 16);
            let mut count = 0u32;
            nb.extend_from_slice(&0u32.to_le_bytes());
            for c in &conv {
                match c {
                    Converted::Put(t, k, v) => wire::encode_mutation(&mut nb, t, k, Some(v)),
                    Converted::Delete(t, k) => wire::encode_mutation(&mut nb, t, k, None),
                    Converted::Dropped => continue,
                }
                count += 1;
            }
            nb[..4].copy_from_slice(&count.to_le_bytes());
            (Some(conv), Some(Bytes::from(nb)))
        };
        let mut st = self.state();
        if first != st.seq + 1 {
            return Err(SyncError::Sequence {
                expected: st.seq + 1,
                got: first,
            });
        }
        match conv {
            None => {
                let mut cache: Option<(&str, usize)> = None;
                for m in body.iter() {
                    let idx = match cache {
                        Some((n, i)) if n == m.table => i,
                        _ => {
                            let Some(i) = st.store.index_of(m.table) else {
                                continue;
                            };
                            cache = Some((m.table, i));
                            i
                        }
                    };
                    match m.value {
                        Some(v) => st.store.put(schema, idx, m.key, v),
                        None => st.store.delete(idx, m.key),
                    }
                }
            }
            Some(conv) => apply_converted(&mut st.store, schema, conv),
        }
        st.applied(first, last, origin);
        let body = match log_body {
            _ if st.log.disabled() => Bytes::new(),
            Some(b) => b,
            None => st.log.copy_body(raw),
        };
        st.log.push(LogEntry {
            first,
            last,
            epoch: origin,
            body,
        });
        if let Some(fs) = st.follow.as_mut() {
            fs.active_seq = fs.active_seq.max(last);
        }
        Ok(())
    }

    /// The stream of the active, frame by frame (see [`Session`]), until the link ends, this
    /// standby is promoted, or an error.
    fn receive(
        &self,
        link: &FLink,
        reader: Box<dyn Read + Send>,
        sv: SchemaVersion,
    ) -> Result<(), SyncError> {
        let mut frames = FrameReader::new(reader, 1 << 20, self.inner.config.formats);
        let mut session = Session::new(self, link, sv);
        loop {
            if link.core.is_closed() {
                return Ok(());
            }
            let read = frames.next(&link.core);
            if read.is_err() && link.leaving.load(Ordering::Acquire) {
                return Ok(());
            }
            let Some(f) = read? else {
                if link.core.is_closed() || link.leaving.load(Ordering::Acquire) {
                    return Ok(());
                }
                return Err(SyncError::Protocol("the active closed the link".into()));
            };
            let cur = self.epoch();
            if f.epoch < cur {
                return Err(SyncError::StaleEpoch {
                    frame: f.epoch,
                    current: cur,
                });
            }
            if session.on_frame(&f)? == Next::Done {
                return Ok(());
            }
            // Acknowledge once no frame is already waiting: one ack covers a burst.
            if session.caught_up && frames.is_drained() {
                session.ack_applied()?;
            }
        }
    }

    /// [`Replica::follow`] over a new TCP connection to `addr`.
    pub fn follow_tcp(
        &self,
        addr: impl ToSocketAddrs,
        ha: bool,
    ) -> Result<FollowHandle, SyncError> {
        let stream = TcpStream::connect(addr)?;
        self.follow(Conn::tcp(stream)?, ha)
    }
}

/// Whether a standby's stream goes on after a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Next {
    /// Read the next frame.
    Frame,
    /// The stream ended as it should (a promotion).
    Done,
}

/// Progress of a bulk snapshot being received.
struct BulkProgress {
    /// Sequence the transfer began at.
    begin: Seq,
    /// Records the active had when it began (progress only).
    announced: u64,
    /// Records received in chunks so far.
    received: u64,
}

/// What a standby's stream keeps between frames: one `on_<frame>` handler per frame type
/// reads and updates it.
struct Session<'a> {
    replica: &'a Replica,
    link: &'a FLink,
    /// Negotiated stream version.
    sv: SchemaVersion,
    /// A bulk snapshot in progress.
    bulk: Option<BulkProgress>,
    /// A resume in progress: (from, to).
    resume: Option<(Seq, Seq)>,
    /// A bulk snapshot or a resume completed: applied batches are acknowledged from here on.
    caught_up: bool,
    /// Highest sequence acknowledged to the active; never goes back.
    acked: Seq,
}

impl<'a> Session<'a> {
    fn new(replica: &'a Replica, link: &'a FLink, sv: SchemaVersion) -> Self {
        Session {
            replica,
            link,
            sv,
            bulk: None,
            resume: None,
            caught_up: false,
            acked: 0,
        }
    }

    /// Handles one frame of the active. A control message is decoded once, here.
    fn on_frame(&mut self, f: &Incoming<'_>) -> Result<Next, SyncError> {
        match f.kind {
            FrameType::Batch => self.on_batch(f)?,
            FrameType::BulkChunk => self.on_bulk_chunk(f)?,
            FrameType::ReplayBatch => self.on_replay_batch(f)?,
            FrameType::Heartbeat => self.on_heartbeat(f)?,
            FrameType::Fence => self.replica.fence(f.epoch),
            FrameType::BulkBegin
            | FrameType::BulkEnd
            | FrameType::ResumeBegin
            | FrameType::ResumeEnd
            | FrameType::DigestCheck
            | FrameType::Promote
            | FrameType::Refuse => match f.control()? {
                Control::BulkBegin { seq, records } => self.on_bulk_begin(seq, records)?,
                Control::BulkEnd {
                    seq,
                    digest,
                    last_epoch,
                } => self.on_bulk_end(f.epoch, seq, digest, last_epoch)?,
                Control::ResumeBegin { from, seq, .. } => self.on_resume_begin(from, seq)?,
                Control::ResumeEnd {
                    seq,
                    last_epoch,
                    digest,
                } => self.on_resume_end(f.epoch, seq, last_epoch, digest)?,
                Control::DigestCheck { digest } => self.on_digest_check(f.epoch, f.seq, digest)?,
                Control::Promote { last_seq } => {
                    self.on_promote(f.epoch, last_seq)?;
                    return Ok(Next::Done);
                }
                Control::Refuse { reason } => return Err(SyncError::Refused(reason)),
                c => unreachable!(
                    "a {:?} frame decoded as a {:?} message (the decoder checks they match)",
                    f.kind,
                    c.frame_type()
                ),
            },
            k => {
                return Err(SyncError::Protocol(format!(
                    "unexpected {k:?} frame from the active"
                )))
            }
        }
        Ok(Next::Frame)
    }

    /// Acknowledges what is applied, if it is more than acknowledged so far.
    fn ack_applied(&mut self) -> Result<(), SyncError> {
        let (seq, epoch) = {
            let st = self.replica.state();
            (st.seq, st.epoch)
        };
        if seq > self.acked {
            self.link
                .send(&wire::encode_frame(FrameType::Ack, epoch, seq, &[]))?;
            self.acked = seq;
        }
        Ok(())
    }

    /// A bulk snapshot or a resume completed at `seq`, which the active was told (and
    /// acknowledged).
    fn caught_up_at(&mut self, seq: Seq) {
        assert!(
            seq >= self.acked,
            "acknowledged sequence going back from {} to {seq}",
            self.acked
        );
        self.caught_up = true;
        self.acked = seq;
    }

    fn on_bulk_begin(&mut self, seq: Seq, records: u64) -> Result<(), SyncError> {
        if self.bulk.is_some() || self.caught_up || self.resume.is_some() {
            return Err(SyncError::Protocol("a second bulk snapshot began".into()));
        }
        let mut st = self.replica.state();
        st.store.clear();
        // Empty now: keeping the digest in the stream version
        // from here on costs no scan.
        st.store.track(&self.replica.inner.schema, self.sv);
        // Live batches after `seq` arrive between the chunks
        // (see `bulk`); the state is a whole history only once
        // the transfer ends.
        st.seq = seq;
        st.last_epoch = crate::ControlEpoch(0);
        st.history_ok = false;
        st.log.reset(seq, crate::ControlEpoch(0));
        self.bulk = Some(BulkProgress {
            begin: seq,
            announced: records,
            received: 0,
        });
        Ok(())
    }

    fn on_bulk_chunk(&mut self, f: &Incoming<'_>) -> Result<(), SyncError> {
        let replica = self.replica;
        let schema = &replica.inner.schema;
        let Some(progress) = self.bulk.as_mut() else {
            return Err(SyncError::Protocol(
                "bulk chunk outside a bulk snapshot".into(),
            ));
        };
        if self.caught_up {
            return Err(SyncError::Protocol("bulk chunk out of place".into()));
        }
        let body = BatchRef::parse(FrameType::BulkChunk, f.payload)?;
        if body.deletes() > 0 {
            return Err(SyncError::Protocol("a bulk chunk holds a delete".into()));
        }
        progress.received += body.len() as u64;
        let conv = if self.sv == schema.version() {
            replica.check_native_tables(&body)?;
            None
        } else {
            Some(replica.to_native(body.iter(), self.sv)?)
        };
        let mut st = replica.state();
        // A chunk is read at the sequence it carries: every batch
        // up to it is applied here, none after it.
        if f.seq != st.seq {
            return Err(SyncError::Protocol(format!(
                "bulk chunk read at sequence {} arrived at applied sequence {}",
                f.seq, st.seq
            )));
        }
        match conv {
            None => {
                for m in body.iter() {
                    let v = m.value.expect("checked");
                    if let Some(i) = st.store.index_of(m.table) {
                        st.store.put(schema, i, m.key, v);
                    }
                }
            }
            Some(conv) => apply_converted(&mut st.store, schema, conv),
        }
        Ok(())
    }

    fn on_bulk_end(
        &mut self,
        epoch: Epoch,
        seq: Seq,
        digest: Digest,
        last_epoch: Epoch,
    ) -> Result<(), SyncError> {
        let replica = self.replica;
        let Some(BulkProgress {
            begin,
            announced,
            received,
        }) = self.bulk.take()
        else {
            return Err(SyncError::Protocol(
                "bulk end without a bulk snapshot".into(),
            ));
        };
        let local = {
            let st = replica.state();
            if seq != st.seq {
                return Err(SyncError::Protocol(format!(
                    "bulk transfer begun at {begin} ended at {seq} with {} applied",
                    st.seq
                )));
            }
            replica.digest_held(st, self.sv)?
        };
        debug!(begin, end = seq, announced, received, "bulk received");
        let matched = local == digest;
        {
            let mut st = replica.state();
            st.last_epoch = last_epoch;
            st.history_ok = matched;
            st.log.reset(seq, last_epoch);
            st.snapshots_received += 1;
            if let Some(fs) = st.follow.as_mut() {
                fs.bulk_done = true;
                fs.digest_matched = matched;
                fs.digest_seq = seq;
                fs.active_seq = fs.active_seq.max(seq);
            }
        }
        replica.inner.cond.notify_all();
        if !matched {
            warn!(
                seq,
                "digest after bulk snapshot does not match the active's"
            );
        }
        let mut out = Control::DigestResult { seq, matched }.encode(epoch, seq);
        out.extend_from_slice(&wire::encode_frame(FrameType::Ack, epoch, seq, &[]));
        self.link.send(&out)?;
        self.caught_up_at(seq);
        Ok(())
    }

    fn on_resume_begin(&mut self, from: Seq, seq: Seq) -> Result<(), SyncError> {
        if self.bulk.is_some() || self.caught_up || self.resume.is_some() || seq < from {
            return Err(SyncError::Protocol("resume out of place".into()));
        }
        let mut st = self.replica.state();
        if st.seq != from || !st.history_ok {
            return Err(SyncError::Protocol(format!(
                "the active offered a resume from sequence {from}, but this standby is at {}",
                st.seq
            )));
        }
        // Usually tracked since the bulk transfer or the start;
        // otherwise built in steps at the resume's end.
        st.store.track(&self.replica.inner.schema, self.sv);
        self.resume = Some((from, seq));
        Ok(())
    }

    fn on_replay_batch(&mut self, f: &Incoming<'_>) -> Result<(), SyncError> {
        let Some((_, to)) = self.resume else {
            return Err(SyncError::Protocol(
                "replayed batch outside a resume".into(),
            ));
        };
        if f.payload.len() < 8 {
            return Err(wire::FrameError::BadPayload {
                kind: FrameType::ReplayBatch,
                reason: "missing origin epoch".into(),
            }
            .into());
        }
        let origin = crate::ControlEpoch(u64::from_le_bytes(
            f.payload[..8].try_into().expect("8 bytes"),
        ));
        if origin.0 == 0 || origin > f.epoch || f.seq > to {
            return Err(SyncError::Protocol(format!(
                "replayed batch ending at {} of epoch {} does not fit a resume to {to} at epoch {}",
                f.seq, origin.0, f.epoch.0
            )));
        }
        let (first, body) =
            wire::parse_batch_payload(f.seq, &f.payload[8..]).map_err(|e| match e {
                wire::FrameError::BadPayload { reason, .. } => wire::FrameError::BadPayload {
                    kind: FrameType::ReplayBatch,
                    reason,
                },
                e => e,
            })?;
        self.replica
            .apply_stream_batch(self.sv, first, f.seq, origin, body, &f.payload[16..])
    }

    fn on_resume_end(
        &mut self,
        epoch: Epoch,
        seq: Seq,
        last_epoch: Epoch,
        digest: Digest,
    ) -> Result<(), SyncError> {
        let replica = self.replica;
        let Some((from, to)) = self.resume.take() else {
            return Err(SyncError::Protocol("resume end without a resume".into()));
        };
        let (applied, mine) = {
            let st = replica.state();
            (st.seq, st.last_epoch)
        };
        if seq != to || applied != to {
            return Err(SyncError::Protocol(format!(
                "resume to {to} ended at {seq} with {applied} applied"
            )));
        }
        // Only this thread changes a standby's state: the
        // digest built in steps is the one at `seq`.
        let local = replica.digest_held(replica.state(), self.sv)?;
        let matched = local == digest && mine == last_epoch;
        {
            let mut st = replica.state();
            st.history_ok = matched;
            if matched {
                st.resumes_received += 1;
            }
            if let Some(fs) = st.follow.as_mut() {
                fs.bulk_done = matched;
                fs.digest_matched = matched;
                fs.digest_seq = seq;
                fs.active_seq = fs.active_seq.max(seq);
            }
        }
        replica.inner.cond.notify_all();
        let mut out = Control::DigestResult { seq, matched }.encode(epoch, seq);
        if !matched {
            let _ = self.link.send(&out);
            return Err(SyncError::Protocol(format!(
                "after resuming from {from} to {seq} the state differs from the active's; \
                 the next attach transfers a full snapshot"
            )));
        }
        info!(from, to = seq, "resumed from the active's log");
        out.extend_from_slice(&wire::encode_frame(FrameType::Ack, epoch, seq, &[]));
        self.link.send(&out)?;
        self.caught_up_at(seq);
        Ok(())
    }

    fn on_batch(&mut self, f: &Incoming<'_>) -> Result<(), SyncError> {
        if !self.caught_up && self.bulk.is_none() {
            return Err(SyncError::Protocol(
                "live mutations before the bulk snapshot ended".into(),
            ));
        }
        let (first, body) = wire::parse_batch_payload(f.seq, f.payload)?;
        self.replica
            .apply_stream_batch(self.sv, first, f.seq, f.epoch, body, &f.payload[8..])
    }

    /// The active's digest at sequence `at`, inline in the stream.
    fn on_digest_check(&mut self, epoch: Epoch, at: Seq, digest: Digest) -> Result<(), SyncError> {
        let replica = self.replica;
        let st = replica.state();
        let seq = st.seq;
        let local = replica.digest_held(st, self.sv)?;
        if !self.caught_up || seq != at {
            return Err(SyncError::Protocol(format!(
                "digest check at {at} arrived at applied sequence {seq}"
            )));
        }
        let matched = local == digest;
        {
            let mut st = replica.state();
            if let Some(fs) = st.follow.as_mut() {
                fs.digest_matched = matched;
                fs.digest_seq = seq;
            }
        }
        replica.inner.cond.notify_all();
        self.link
            .send(&Control::DigestResult { seq, matched }.encode(epoch, seq))?;
        Ok(())
    }

    fn on_heartbeat(&mut self, f: &Incoming<'_>) -> Result<(), SyncError> {
        if f.payload.len() != 9 {
            return Err(SyncError::Protocol(
                "heartbeat payload is not 9 bytes".into(),
            ));
        }
        let lag = u64::from_le_bytes(f.payload[..8].try_into().expect("8 bytes"));
        let mut st = self.replica.state();
        if let Some(fs) = st.follow.as_mut() {
            fs.active_seq = fs.active_seq.max(f.seq);
            fs.reported_lag = lag;
            fs.in_sync = f.payload[8] == 1;
        }
        drop(st);
        self.replica.inner.cond.notify_all();
        Ok(())
    }

    /// Takes control at `epoch` if everything up to `last_seq` is applied; the stream ends
    /// with it.
    fn on_promote(&mut self, epoch: Epoch, last_seq: Seq) -> Result<(), SyncError> {
        let replica = self.replica;
        let mut st = replica.state();
        if epoch <= st.epoch || st.seq != last_seq || !self.caught_up {
            let e = format!(
                "promotion to epoch {} at sequence {last_seq} refused: at epoch {}, applied {}",
                epoch.0, st.epoch.0, st.seq
            );
            drop(st);
            let _ = self
                .link
                .send(&Control::Refuse { reason: e.clone() }.encode(epoch, 0));
            return Err(SyncError::Protocol(e));
        }
        st.role = Role::Active;
        st.set_epoch(epoch);
        st.follow = None;
        st.quiesced = false;
        let epoch = st.epoch;
        drop(st);
        info!(epoch = epoch.0, seq = last_seq, "promoted by switchover");
        let _ = self.link.send(&wire::encode_frame(
            FrameType::PromoteAck,
            epoch,
            last_seq,
            &[],
        ));
        self.link.core.close();
        replica.inner.cond.notify_all();
        replica.notify_role(Role::Active, epoch);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Mutation, ReplicaConfig, Schema};

    /// Collects what a session sends to the active.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            lock(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        /// The frames sent so far (kind, epoch number, seq), taken.
        fn take(&self) -> Vec<(FrameType, u64, Seq)> {
            let bytes = std::mem::take(&mut *lock(&self.0));
            let mut at = 0;
            let mut out = Vec::new();
            while at < bytes.len() {
                let (f, n) = wire::decode_frame(&bytes[at..]).expect("a whole frame");
                out.push((f.kind, f.epoch.0, f.seq));
                at += n;
            }
            out
        }
    }

    fn standby() -> (Replica, FLink, Sink) {
        let r = Replica::new(Schema::new("kv", 1).table("kv"), ReplicaConfig::new("b"));
        // As the handshake leaves it: at the epoch of the active's welcome.
        r.state().set_epoch(crate::ControlEpoch(1));
        let sink = Sink::default();
        let link = FLink {
            id: 1,
            core: LinkCore::new(None),
            leaving: AtomicBool::new(false),
            writer: Mutex::new(Box::new(sink.clone())),
            result: Mutex::new(None),
        };
        (r, link, sink)
    }

    /// Feeds one encoded frame to the session.
    fn feed(s: &mut Session<'_>, frame: &[u8]) -> Result<Next, SyncError> {
        let (f, _) = wire::decode_frame(frame).expect("a whole frame");
        s.on_frame(&Incoming {
            kind: f.kind,
            epoch: f.epoch,
            seq: f.seq,
            payload: &f.payload,
        })
    }

    fn batch(epoch: Epoch, first: Seq, muts: &[Mutation]) -> Vec<u8> {
        let mut p = first.to_le_bytes().to_vec();
        p.extend(wire::encode_batch_payload(muts));
        let last = first + muts.len() as u64 - 1;
        wire::encode_frame(FrameType::Batch, epoch, last, &p)
    }

    #[test]
    fn a_frame_the_active_never_sends_is_refused_before_its_payload_is_read() {
        let (r, link, sink) = standby();
        let mut s = Session::new(&r, &link, 1);
        let err = feed(
            &mut s,
            &wire::encode_frame(FrameType::Hello, crate::ControlEpoch(1), 0, b"not json"),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("unexpected Hello frame from the active"),
            "{err}"
        );
        assert!(sink.take().is_empty());
    }

    #[test]
    fn frames_out_of_place_are_refused_and_apply_nothing() {
        let (r, link, _sink) = standby();
        let mut s = Session::new(&r, &link, 1);
        let put = [Mutation::put("kv", b"k".to_vec(), b"v".to_vec())];
        let chunk = {
            let p = wire::encode_batch_payload(&put);
            wire::encode_frame(FrameType::BulkChunk, crate::ControlEpoch(1), 0, &p)
        };
        let err = feed(&mut s, &chunk).unwrap_err();
        assert!(err.to_string().contains("outside a bulk snapshot"), "{err}");
        let err = feed(&mut s, &batch(crate::ControlEpoch(1), 1, &put)).unwrap_err();
        assert!(
            err.to_string().contains("before the bulk snapshot"),
            "{err}"
        );
        assert_eq!(r.records(), (0, Vec::new()));
    }

    #[test]
    fn a_bulk_snapshot_then_batches_are_acknowledged_once_each() {
        let (r, link, sink) = standby();
        let mut s = Session::new(&r, &link, 1);
        let begin = Control::BulkBegin { seq: 0, records: 0 }.encode(crate::ControlEpoch(1), 0);
        assert_eq!(feed(&mut s, &begin).unwrap(), Next::Frame);
        let (_, empty) = r.digest();
        let end = Control::BulkEnd {
            seq: 0,
            digest: empty,
            last_epoch: crate::ControlEpoch(0),
        }
        .encode(crate::ControlEpoch(1), 0);
        assert_eq!(feed(&mut s, &end).unwrap(), Next::Frame);
        assert!(s.caught_up);
        assert_eq!(
            sink.take(),
            vec![(FrameType::DigestResult, 1, 0), (FrameType::Ack, 1, 0)]
        );
        let put = |k: &[u8]| Mutation::put("kv", k.to_vec(), b"v".to_vec());
        feed(
            &mut s,
            &batch(crate::ControlEpoch(1), 1, &[put(b"a"), put(b"b")]),
        )
        .unwrap();
        s.ack_applied().unwrap();
        assert_eq!(sink.take(), vec![(FrameType::Ack, 1, 2)]);
        // Nothing new applied: nothing acknowledged again.
        s.ack_applied().unwrap();
        assert!(sink.take().is_empty());
        assert_eq!(s.acked, 2);
        assert_eq!(r.records().0, 2);
        // A batch that does not continue the sequence is refused.
        let err = feed(&mut s, &batch(crate::ControlEpoch(1), 4, &[put(b"c")])).unwrap_err();
        assert!(
            matches!(
                err,
                SyncError::Sequence {
                    expected: 3,
                    got: 4
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_promotion_before_catching_up_is_refused_and_changes_nothing() {
        let (r, link, sink) = standby();
        let mut s = Session::new(&r, &link, 1);
        let promote = Control::Promote { last_seq: 0 }.encode(crate::ControlEpoch(2), 0);
        let err = feed(&mut s, &promote).unwrap_err();
        assert!(err.to_string().contains("refused"), "{err}");
        assert_eq!(sink.take(), vec![(FrameType::Refuse, 2, 0)]);
        assert_eq!(
            (r.role(), r.epoch()),
            (Role::Standby, crate::ControlEpoch(1))
        );
    }
}
