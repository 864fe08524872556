//! Both ends of a link: liveness, the active's outbox to a standby, the standby's writer to
//! its active, the handshake watchdog and the frame reader both ends share.

use std::fmt;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tracing::debug;

use super::lock;
use crate::wire::{self, Control, FrameType};
use crate::{Epoch, SchemaVersion, Seq, SyncError};

/// Liveness shared by both ends of a link.
pub(super) struct LinkCore {
    closed: AtomicBool,
    closer: Option<Arc<dyn Fn() + Send + Sync>>,
    last_rx: Mutex<Instant>,
    tick: Mutex<()>,
    tick_cond: Condvar,
}

impl LinkCore {
    pub(super) fn new(closer: Option<Arc<dyn Fn() + Send + Sync>>) -> Self {
        LinkCore {
            closed: AtomicBool::new(false),
            closer,
            last_rx: Mutex::new(Instant::now()),
            tick: Mutex::new(()),
            tick_cond: Condvar::new(),
        }
    }

    pub(super) fn close(&self) {
        if !self.closed.swap(true, Ordering::SeqCst) {
            if let Some(c) = &self.closer {
                c();
            }
            let _g = lock(&self.tick);
            self.tick_cond.notify_all();
        }
    }

    pub(super) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    pub(super) fn touch(&self) {
        *lock(&self.last_rx) = Instant::now();
    }

    pub(super) fn idle_for(&self) -> Duration {
        lock(&self.last_rx).elapsed()
    }

    /// Sleeps up to `d` unless the link closes; returns false once closed.
    pub(super) fn sleep(&self, d: Duration) -> bool {
        let g = lock(&self.tick);
        if self.is_closed() {
            return false;
        }
        let _ = self.tick_cond.wait_timeout(g, d);
        !self.is_closed()
    }
}

pub(super) struct Outbox {
    pub(super) buf: Vec<u8>,
    pub(super) spare: Vec<u8>,
    pub(super) writing: bool,
    pub(super) writer: Option<Box<dyn Write + Send>>,
}

/// Active side of a link to one standby.
pub(super) struct Link {
    pub(super) id: u64,
    pub(super) node: String,
    pub(super) peer: String,
    pub(super) ha: bool,
    pub(super) stream_version: SchemaVersion,
    pub(super) native_version: SchemaVersion,
    pub(super) core: LinkCore,
    pub(super) out: Mutex<Outbox>,
    /// Signalled whenever queued frames were written (see `bulk`).
    pub(super) drained: Condvar,
    /// A bulk transfer writes this link's queue (changed under the state
    /// lock, so a mutation queued after it turns false is flushed by its
    /// submitter and one queued before by the transfer).
    pub(super) bulk: AtomicBool,
    /// Epoch the standby confirmed its promotion at (0: none).
    pub(super) promoted: AtomicU64,
}

impl Link {
    /// Appends encoded frames; returns false if the queue bound is exceeded.
    pub(super) fn push(&self, bytes: &[u8], max: usize) -> bool {
        let mut ob = lock(&self.out);
        ob.buf.extend_from_slice(bytes);
        ob.buf.len() <= max
    }

    /// Writes queued frames unless another thread is writing (it will pick
    /// them up). The caller writes: no thread hop on the ack path.
    pub(super) fn flush(&self) {
        let mut ob = lock(&self.out);
        while !ob.writing && !ob.buf.is_empty() && !self.core.is_closed() {
            let Some(mut w) = ob.writer.take() else {
                return;
            };
            let spare = std::mem::take(&mut ob.spare);
            let mut data = std::mem::replace(&mut ob.buf, spare);
            ob.writing = true;
            drop(ob);
            let r = w.write_all(&data).and_then(|_| w.flush());
            data.clear();
            ob = lock(&self.out);
            ob.writer = Some(w);
            ob.writing = false;
            if data.capacity() <= 4 << 20 {
                ob.spare = data;
            }
            self.drained.notify_all();
            if let Err(e) = r {
                debug!(node = %self.node, error = %e, "write to standby failed");
                drop(ob);
                self.core.close();
                return;
            }
        }
    }
}

pub(super) struct LinkState {
    pub(super) link: Arc<Link>,
    pub(super) resumed: bool,
    pub(super) snap_seq: Seq,
    pub(super) acked: Seq,
    pub(super) bulk_done: bool,
    pub(super) in_sync: bool,
    pub(super) digest_matched: bool,
    pub(super) digest_seq: Seq,
    /// Records sent so far by the bulk transfer.
    pub(super) bulk_sent: u64,
}

/// Standby side of a link to an active.
pub(super) struct FLink {
    pub(super) id: u64,
    pub(super) core: LinkCore,
    /// This standby detaches on purpose ([`FollowHandle::leave`]): the active closing the
    /// link is the expected end.
    pub(super) leaving: AtomicBool,
    pub(super) writer: Mutex<Box<dyn Write + Send>>,
    pub(super) result: Mutex<Option<Result<(), String>>>,
}

impl FLink {
    pub(super) fn send(&self, bytes: &[u8]) -> io::Result<()> {
        let mut w = lock(&self.writer);
        w.write_all(bytes)?;
        w.flush()
    }
}

impl fmt::Debug for FLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FLink").field("id", &self.id).finish()
    }
}

/// Calls `closer` unless disarmed within `timeout`: bounds handshakes on
/// streams without read timeouts.
pub(super) struct Watchdog {
    tx: Option<mpsc::Sender<()>>,
}

impl Watchdog {
    pub(super) fn arm(closer: Option<Arc<dyn Fn() + Send + Sync>>, timeout: Duration) -> Watchdog {
        let (tx, rx) = mpsc::channel::<()>();
        if let Some(c) = closer {
            let _ = thread::Builder::new()
                .name("sync-watchdog".into())
                .spawn(move || {
                    if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(timeout) {
                        c();
                    }
                });
        }
        Watchdog { tx: Some(tx) }
    }

    pub(super) fn disarm(mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(());
        }
    }
}

/// A received frame whose payload borrows the reader's reusable buffer.
pub(super) struct Incoming<'a> {
    pub(super) kind: FrameType,
    pub(super) epoch: Epoch,
    pub(super) seq: Seq,
    pub(super) payload: &'a [u8],
}

impl Incoming<'_> {
    pub(super) fn control(&self) -> Result<Control, SyncError> {
        Ok(Control::decode_payload(self.kind, self.payload)?)
    }
}

/// The reading end of a link, shared by both ends: whole frames read through a buffer into
/// one reused payload buffer (a frame is bounded by the wire's size limits), each marking the
/// link alive.
pub(super) struct FrameReader {
    r: io::BufReader<Box<dyn Read + Send>>,
    payload: Vec<u8>,
    formats: wire::FormatRange,
}

impl FrameReader {
    /// Reads `reader` through a buffer of `buffer` bytes, frames of any format in `formats`.
    pub(super) fn new(
        reader: Box<dyn Read + Send>,
        buffer: usize,
        formats: wire::FormatRange,
    ) -> Self {
        FrameReader {
            r: io::BufReader::with_capacity(buffer, reader),
            payload: Vec::new(),
            formats,
        }
    }

    /// The next frame (`None`: the peer closed the stream between frames); touches `core`.
    pub(super) fn next(&mut self, core: &LinkCore) -> Result<Option<Incoming<'_>>, SyncError> {
        let Some(h) = wire::read_frame_into_in(&mut self.r, &mut self.payload, self.formats)?
        else {
            return Ok(None);
        };
        core.touch();
        Ok(Some(Incoming {
            kind: h.kind,
            epoch: h.epoch,
            seq: h.seq,
            payload: &self.payload,
        }))
    }

    /// True if no received byte waits in the buffer (no frame is already here).
    pub(super) fn is_drained(&self) -> bool {
        self.r.buffer().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(bytes: Vec<u8>) -> FrameReader {
        FrameReader::new(
            Box::new(io::Cursor::new(bytes)),
            64 << 10,
            wire::BUILD_FORMATS,
        )
    }

    #[test]
    fn frame_reader_reads_frames_in_order_and_knows_when_none_waits() {
        let mut bytes =
            wire::encode_frame(FrameType::Heartbeat, crate::ControlEpoch(2), 7, &[1, 2, 3]);
        bytes.extend(wire::encode_frame(
            FrameType::Ack,
            crate::ControlEpoch(3),
            9,
            &[],
        ));
        let core = LinkCore::new(None);
        let mut frames = reader(bytes);
        let f = frames.next(&core).unwrap().expect("a frame");
        assert_eq!(
            (f.kind, f.epoch.0, f.seq, f.payload),
            (FrameType::Heartbeat, 2, 7, &[1u8, 2, 3][..])
        );
        // The second frame came with the first: it waits in the buffer.
        assert!(!frames.is_drained());
        let f = frames.next(&core).unwrap().expect("a frame");
        assert_eq!((f.kind, f.epoch.0, f.seq), (FrameType::Ack, 3, 9));
        assert!(f.payload.is_empty());
        assert!(frames.is_drained());
        assert!(frames.next(&core).unwrap().is_none());
    }

    #[test]
    fn frame_reader_marks_the_link_alive_on_each_frame_only() {
        let core = LinkCore::new(None);
        let mut frames = reader(wire::encode_frame(
            FrameType::Ack,
            crate::ControlEpoch(1),
            1,
            &[],
        ));
        thread::sleep(Duration::from_millis(30));
        assert!(core.idle_for() >= Duration::from_millis(30));
        frames.next(&core).unwrap().expect("a frame");
        assert!(core.idle_for() < Duration::from_millis(30));
        thread::sleep(Duration::from_millis(30));
        // The end of the stream is no sign of life.
        assert!(frames.next(&core).unwrap().is_none());
        assert!(core.idle_for() >= Duration::from_millis(30));
    }

    #[test]
    fn frame_reader_fails_on_a_frame_cut_short() {
        let mut bytes =
            wire::encode_frame(FrameType::Heartbeat, crate::ControlEpoch(1), 1, &[0; 9]);
        bytes.truncate(bytes.len() - 1);
        let core = LinkCore::new(None);
        let err = reader(bytes).next(&core).err().expect("an error");
        assert!(err.to_string().contains("truncated"), "{err}");
    }
}
