//! The standby's side of a link: the handshake (the hello built, the welcome checked), then
//! the stream of the active.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::{debug, info, warn};

use super::batch::{apply_converted, Converted};
use super::link::{FLink, Incoming, LinkCore, Watchdog};
use super::{lock, Replica, Role};
use crate::log::LogEntry;
use crate::wire::{self, BatchRef, Control, FrameType, MutationRef, ResumePoint};
use crate::{Conn, Epoch, Record, SchemaVersion, Seq, SyncError};

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
    pub fn leave(self) {
        self.link.leaving.store(true, Ordering::Release);
        let sent = self
            .link
            .send(&wire::encode_frame(FrameType::Leave, 0, 0, &[]));
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
            let resume =
                (st.history_ok && st.seq > 0 && st.last_epoch > 0).then_some(ResumePoint {
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
        let stream_version = match welcome {
            Control::Refuse { reason } => return Err(SyncError::Refused(reason)),
            Control::Welcome { stream_version, .. } => stream_version,
            _ => unreachable!(),
        };
        if !schema.reads().contains(stream_version) {
            return Err(SyncError::Protocol(format!(
                "the active chose stream version {stream_version}, which this build cannot read"
            )));
        }
        let link = Arc::new(FLink {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            core: LinkCore::new(conn.closer.clone()),
            leaving: AtomicBool::new(false),
            writer: Mutex::new(conn.writer),
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
            st.epoch = frame.epoch;
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
        st.seq = last;
        st.last_epoch = origin;
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

    fn receive(
        &self,
        link: &FLink,
        reader: Box<dyn Read + Send>,
        sv: SchemaVersion,
    ) -> Result<(), SyncError> {
        let schema = &self.inner.schema;
        let native = schema.version();
        let mut r = io::BufReader::with_capacity(1 << 20, reader);
        let mut payload = Vec::new();
        let mut bulk: Option<(Seq, u64, u64)> = None; // (begin seq, announced, received)
        let mut resume: Option<(Seq, Seq)> = None; // (from, to)
        let mut bulk_done = false;
        let mut acked: Seq = 0;
        loop {
            if link.core.is_closed() {
                return Ok(());
            }
            let read = wire::read_frame_into(&mut r, &mut payload);
            if read.is_err() && link.leaving.load(Ordering::Acquire) {
                return Ok(());
            }
            let Some(h) = read? else {
                if link.core.is_closed() || link.leaving.load(Ordering::Acquire) {
                    return Ok(());
                }
                return Err(SyncError::Protocol("the active closed the link".into()));
            };
            let f = Incoming {
                kind: h.kind,
                epoch: h.epoch,
                seq: h.seq,
                payload: &payload,
            };
            link.core.touch();
            let cur = self.epoch();
            if f.epoch < cur {
                return Err(SyncError::StaleEpoch {
                    frame: f.epoch,
                    current: cur,
                });
            }
            match f.kind {
                FrameType::BulkBegin => {
                    let Control::BulkBegin { seq, records } = f.control()? else {
                        unreachable!()
                    };
                    if bulk.is_some() || bulk_done || resume.is_some() {
                        return Err(SyncError::Protocol("a second bulk snapshot began".into()));
                    }
                    let mut st = self.state();
                    st.store.clear();
                    // Empty now: keeping the digest in the stream version
                    // from here on costs no scan.
                    st.store.track(schema, sv);
                    // Live batches after `seq` arrive between the chunks
                    // (see `bulk`); the state is a whole history only once
                    // the transfer ends.
                    st.seq = seq;
                    st.last_epoch = 0;
                    st.history_ok = false;
                    st.log.reset(seq, 0);
                    bulk = Some((seq, records, 0));
                }
                FrameType::BulkChunk => {
                    let Some((_, _, received)) = bulk.as_mut() else {
                        return Err(SyncError::Protocol(
                            "bulk chunk outside a bulk snapshot".into(),
                        ));
                    };
                    if bulk_done {
                        return Err(SyncError::Protocol("bulk chunk out of place".into()));
                    }
                    let body = BatchRef::parse(FrameType::BulkChunk, f.payload)?;
                    if body.deletes() > 0 {
                        return Err(SyncError::Protocol("a bulk chunk holds a delete".into()));
                    }
                    *received += body.len() as u64;
                    let conv = if sv == native {
                        self.check_native_tables(&body)?;
                        None
                    } else {
                        Some(self.to_native(body.iter(), sv)?)
                    };
                    let mut st = self.state();
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
                }
                FrameType::BulkEnd => {
                    let Control::BulkEnd {
                        seq,
                        digest,
                        last_epoch,
                    } = f.control()?
                    else {
                        unreachable!()
                    };
                    let Some((begin, announced, received)) = bulk.take() else {
                        return Err(SyncError::Protocol(
                            "bulk end without a bulk snapshot".into(),
                        ));
                    };
                    let local = {
                        let st = self.state();
                        if seq != st.seq {
                            return Err(SyncError::Protocol(format!(
                                "bulk transfer begun at {begin} ended at {seq} with {} applied",
                                st.seq
                            )));
                        }
                        self.digest_held(st, sv)?
                    };
                    debug!(begin, end = seq, announced, received, "bulk received");
                    let matched = local == digest;
                    {
                        let mut st = self.state();
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
                    self.inner.cond.notify_all();
                    bulk_done = true;
                    if !matched {
                        warn!(
                            seq,
                            "digest after bulk snapshot does not match the active's"
                        );
                    }
                    let mut out = Control::DigestResult { seq, matched }.encode(f.epoch, seq);
                    out.extend_from_slice(&wire::encode_frame(FrameType::Ack, f.epoch, seq, &[]));
                    link.send(&out)?;
                    acked = seq;
                }
                FrameType::ResumeBegin => {
                    let Control::ResumeBegin { from, seq, .. } = f.control()? else {
                        unreachable!()
                    };
                    if bulk.is_some() || bulk_done || resume.is_some() || seq < from {
                        return Err(SyncError::Protocol("resume out of place".into()));
                    }
                    let mut st = self.state();
                    if st.seq != from || !st.history_ok {
                        return Err(SyncError::Protocol(format!(
                            "the active offered a resume from sequence {from}, but this standby is at {}",
                            st.seq
                        )));
                    }
                    // Usually tracked since the bulk transfer or the start;
                    // otherwise built in steps at the resume's end.
                    st.store.track(schema, sv);
                    resume = Some((from, seq));
                }
                FrameType::ReplayBatch => {
                    let Some((_, to)) = resume else {
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
                    let origin = u64::from_le_bytes(f.payload[..8].try_into().expect("8 bytes"));
                    if origin == 0 || origin > f.epoch || f.seq > to {
                        return Err(SyncError::Protocol(format!(
                            "replayed batch ending at {} of epoch {origin} does not fit a resume to {to} at epoch {}",
                            f.seq, f.epoch
                        )));
                    }
                    let (first, body) =
                        wire::parse_batch_payload(f.seq, &f.payload[8..]).map_err(|e| match e {
                            wire::FrameError::BadPayload { reason, .. } => {
                                wire::FrameError::BadPayload {
                                    kind: FrameType::ReplayBatch,
                                    reason,
                                }
                            }
                            e => e,
                        })?;
                    self.apply_stream_batch(sv, first, f.seq, origin, body, &f.payload[16..])?;
                }
                FrameType::ResumeEnd => {
                    let Control::ResumeEnd {
                        seq,
                        last_epoch,
                        digest,
                    } = f.control()?
                    else {
                        unreachable!()
                    };
                    let Some((from, to)) = resume.take() else {
                        return Err(SyncError::Protocol("resume end without a resume".into()));
                    };
                    let (applied, mine) = {
                        let st = self.state();
                        (st.seq, st.last_epoch)
                    };
                    if seq != to || applied != to {
                        return Err(SyncError::Protocol(format!(
                            "resume to {to} ended at {seq} with {applied} applied"
                        )));
                    }
                    // Only this thread changes a standby's state: the
                    // digest built in steps is the one at `seq`.
                    let local = self.digest_held(self.state(), sv)?;
                    let matched = local == digest && mine == last_epoch;
                    {
                        let mut st = self.state();
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
                    self.inner.cond.notify_all();
                    let mut out = Control::DigestResult { seq, matched }.encode(f.epoch, seq);
                    if !matched {
                        let _ = link.send(&out);
                        return Err(SyncError::Protocol(format!(
                            "after resuming from {from} to {seq} the state differs from the active's; \
                             the next attach transfers a full snapshot"
                        )));
                    }
                    info!(from, to = seq, "resumed from the active's log");
                    out.extend_from_slice(&wire::encode_frame(FrameType::Ack, f.epoch, seq, &[]));
                    link.send(&out)?;
                    bulk_done = true;
                    acked = seq;
                }
                FrameType::Batch => {
                    if !bulk_done && bulk.is_none() {
                        return Err(SyncError::Protocol(
                            "live mutations before the bulk snapshot ended".into(),
                        ));
                    }
                    let (first, body) = wire::parse_batch_payload(f.seq, f.payload)?;
                    self.apply_stream_batch(sv, first, f.seq, f.epoch, body, &f.payload[8..])?;
                }
                FrameType::DigestCheck => {
                    let Control::DigestCheck { digest } = f.control()? else {
                        unreachable!()
                    };
                    let st = self.state();
                    let seq = st.seq;
                    let local = self.digest_held(st, sv)?;
                    if !bulk_done || seq != f.seq {
                        return Err(SyncError::Protocol(format!(
                            "digest check at {} arrived at applied sequence {seq}",
                            f.seq
                        )));
                    }
                    let matched = local == digest;
                    {
                        let mut st = self.state();
                        if let Some(fs) = st.follow.as_mut() {
                            fs.digest_matched = matched;
                            fs.digest_seq = seq;
                        }
                    }
                    self.inner.cond.notify_all();
                    link.send(&Control::DigestResult { seq, matched }.encode(f.epoch, seq))?;
                }
                FrameType::Heartbeat => {
                    if f.payload.len() != 9 {
                        return Err(SyncError::Protocol(
                            "heartbeat payload is not 9 bytes".into(),
                        ));
                    }
                    let lag = u64::from_le_bytes(f.payload[..8].try_into().expect("8 bytes"));
                    let mut st = self.state();
                    if let Some(fs) = st.follow.as_mut() {
                        fs.active_seq = fs.active_seq.max(f.seq);
                        fs.reported_lag = lag;
                        fs.in_sync = f.payload[8] == 1;
                    }
                    drop(st);
                    self.inner.cond.notify_all();
                }
                FrameType::Promote => {
                    let Control::Promote { last_seq } = f.control()? else {
                        unreachable!()
                    };
                    let mut st = self.state();
                    if f.epoch <= st.epoch || st.seq != last_seq || !bulk_done {
                        let e = format!(
                            "promotion to epoch {} at sequence {last_seq} refused: at epoch {}, applied {}",
                            f.epoch, st.epoch, st.seq
                        );
                        drop(st);
                        let _ =
                            link.send(&Control::Refuse { reason: e.clone() }.encode(f.epoch, 0));
                        return Err(SyncError::Protocol(e));
                    }
                    st.role = Role::Active;
                    st.epoch = f.epoch;
                    st.follow = None;
                    st.quiesced = false;
                    let epoch = st.epoch;
                    drop(st);
                    info!(epoch, seq = last_seq, "promoted by switchover");
                    let _ = link.send(&wire::encode_frame(
                        FrameType::PromoteAck,
                        epoch,
                        last_seq,
                        &[],
                    ));
                    link.core.close();
                    self.inner.cond.notify_all();
                    self.notify_role(Role::Active, epoch);
                    return Ok(());
                }
                FrameType::Fence => {
                    self.fence(f.epoch);
                }
                FrameType::Refuse => {
                    let Control::Refuse { reason } = f.control()? else {
                        unreachable!()
                    };
                    return Err(SyncError::Refused(reason));
                }
                k => {
                    return Err(SyncError::Protocol(format!(
                        "unexpected {k:?} frame from the active"
                    )))
                }
            }
            if bulk_done && r.buffer().is_empty() {
                let (seq, epoch) = {
                    let st = self.state();
                    (st.seq, st.epoch)
                };
                if seq > acked {
                    link.send(&wire::encode_frame(FrameType::Ack, epoch, seq, &[]))?;
                    acked = seq;
                }
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
