//! Frame format negotiation: an end of the next release's format range (the
//! test-only format `NEXT_WIRE_VERSION`, feature `next-format`) talks to an end
//! of this build's range in both directions (bulk attach, live stream, resume
//! after a reconnect, planned switchover); two next-release ends use the next
//! format on the wire; ends without a common format are refused at connect.
mod common;

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use hitless_sync::wire::{self, Control, FormatRange, FrameType, NEXT_WIRE_VERSION, WIRE_VERSION};
use hitless_sync::{Conn, FollowHandle, Replica, Role, ServeHandle};

/// Most bytes a tap records (the scenarios move far less).
const TAP_LIMIT: usize = 32 << 20;

fn range(min: u8, max: u8) -> FormatRange {
    wire::format_range(min, max).unwrap()
}

fn current() -> FormatRange {
    wire::BUILD_FORMATS
}

fn next() -> FormatRange {
    range(WIRE_VERSION, NEXT_WIRE_VERSION)
}

fn replica(node: &str, formats: FormatRange) -> Replica {
    let mut c = config(node);
    c.formats = formats;
    Replica::new(schema(1), c)
}

fn serve(r: &Replica) -> ServeHandle {
    r.serve(TcpListener::bind("127.0.0.1:0").unwrap()).unwrap()
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(2));
    }
}

/// Bytes that crossed a link, as the standby end saw them.
#[derive(Clone, Default)]
struct Tap(Arc<Mutex<Vec<u8>>>);

impl Tap {
    fn record(&self, b: &[u8]) {
        let mut v = self.0.lock().unwrap();
        let room = TAP_LIMIT.saturating_sub(v.len());
        v.extend_from_slice(&b[..b.len().min(room)]);
    }

    /// (version, type) of every whole frame recorded.
    fn frames(&self) -> Vec<(u8, u8)> {
        let v = self.0.lock().unwrap();
        let mut out = Vec::new();
        let mut pos = 0;
        while v.len() - pos >= wire::HEADER_LEN {
            let len = u32::from_le_bytes(v[pos + 8..pos + 12].try_into().unwrap()) as usize;
            if v.len() - pos < wire::HEADER_LEN + len {
                break;
            }
            out.push((v[pos + 4], v[pos + 5]));
            pos += wire::HEADER_LEN + len;
        }
        out
    }

    /// Asserts the handshake frames are in the frozen format and every other
    /// frame in `format`; returns how many frames were recorded.
    fn assert_format(&self, format: u8, dir: &str) -> usize {
        let frames = self.frames();
        assert!(!frames.is_empty(), "no {dir} frame recorded");
        for (v, t) in &frames {
            let handshake = [
                FrameType::Hello as u8,
                FrameType::Welcome as u8,
                FrameType::Refuse as u8,
            ]
            .contains(t);
            let want = if handshake {
                wire::HANDSHAKE_VERSION
            } else {
                format
            };
            assert_eq!(*v, want, "{dir} frame of type {t} in format {v}");
        }
        frames.len()
    }
}

struct TapRead(TcpStream, Tap);

impl Read for TapRead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.0.read(buf)?;
        self.1.record(&buf[..n]);
        Ok(n)
    }
}

struct TapWrite(TcpStream, Tap);

impl Write for TapWrite {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.0.write(buf)?;
        self.1.record(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// `s` follows the active at `h`; returns the handle and the taps of what the
/// active sent and what the standby sent.
fn follow_tapped(s: &Replica, h: &ServeHandle) -> (FollowHandle, Tap, Tap) {
    let stream = TcpStream::connect(h.local_addr()).unwrap();
    stream.set_nodelay(true).unwrap();
    let closer = stream.try_clone().unwrap();
    let (rx, tx) = (Tap::default(), Tap::default());
    let conn = Conn::from_halves(
        TapRead(stream.try_clone().unwrap(), rx.clone()),
        TapWrite(stream, tx.clone()),
        Some(Box::new(move || {
            let _ = closer.shutdown(std::net::Shutdown::Both);
        })),
        "tapped",
    );
    let f = s.follow(conn, true).unwrap();
    (f, rx, tx)
}

fn write_some(a: &Replica, from: u64, n: u64, tag: &str) {
    for i in from..from + n {
        a.apply(vec![put(i % 150, tag), put(10_000 + i, tag)])
            .unwrap();
    }
}

fn assert_same(a: &Replica, b: &Replica) {
    let seq = a.status().applied_seq;
    wait_for("the standby to catch up", || b.status().applied_seq == seq);
    assert_eq!(a.records(), b.records());
    assert_eq!(a.digest(), b.digest());
}

/// Bulk attach, live stream, resume after a reconnect and a planned
/// switchover (with the old active resuming from the new one) between an
/// active of range `ra` and a standby of range `rs`, checking every frame on
/// the wire is in `format`.
fn scenario(ra: FormatRange, rs: FormatRange, format: u8) {
    let a = replica("a", ra);
    a.activate(hitless_sync::ControlEpoch(1)).unwrap();
    let ha = serve(&a);
    let s = replica("s", rs);
    write_some(&a, 0, 200, "before");
    // Bulk attach while writes go on, then the live stream.
    let (f, rx, tx) = follow_tapped(&s, &ha);
    write_some(&a, 200, 100, "during");
    s.wait_ready(Duration::from_secs(5)).unwrap();
    write_some(&a, 300, 100, "live");
    assert_same(&a, &s);
    assert!(rx.assert_format(format, "active->standby") > 3);
    assert!(tx.assert_format(format, "standby->active") > 1);
    assert_eq!(a.status().snapshots_sent, 1);
    // Resume after a reconnect.
    f.stop();
    wait_for("the active to drop the link", || {
        a.status().standbys.is_empty()
    });
    write_some(&a, 400, 100, "away");
    let (_f2, rx, tx) = follow_tapped(&s, &ha);
    s.wait_ready(Duration::from_secs(5)).unwrap();
    write_some(&a, 500, 50, "back");
    assert_same(&a, &s);
    assert_eq!(a.status().resumes_sent, 1, "{:?}", a.status());
    rx.assert_format(format, "active->standby after resume");
    tx.assert_format(format, "standby->active after resume");
    // Planned switchover; the old active follows the new one and resumes.
    let epoch = a.switchover("s", Duration::from_secs(5)).unwrap();
    assert_eq!(s.role(), Role::Active);
    let hs = serve(&s);
    let t = s.apply(vec![put(1, "s-era")]).unwrap();
    assert_eq!(t.epoch, epoch);
    write_some(&s, 600, 50, "s-era");
    let (_fa, rx, tx) = follow_tapped(&a, &hs);
    a.wait_ready(Duration::from_secs(5)).unwrap();
    write_some(&s, 650, 50, "s-live");
    assert_same(&s, &a);
    assert_eq!(s.status().resumes_sent, 1, "{:?}", s.status());
    rx.assert_format(format, "new active->old active");
    tx.assert_format(format, "old active->new active");
    drop(ha);
    a.shutdown();
    s.shutdown();
}

#[test]
fn next_release_active_streams_the_current_format_to_a_current_standby() {
    scenario(next(), current(), WIRE_VERSION);
}

#[test]
fn current_active_streams_the_current_format_to_a_next_release_standby() {
    scenario(current(), next(), WIRE_VERSION);
}

#[test]
fn two_next_release_ends_negotiate_the_next_format_and_work() {
    scenario(next(), next(), NEXT_WIRE_VERSION);
}

#[test]
fn ends_without_a_common_format_are_refused_naming_both_ranges() {
    let only_next = range(NEXT_WIRE_VERSION, NEXT_WIRE_VERSION);
    for (ra, rs) in [(current(), only_next), (only_next, current())] {
        let a = replica("a", ra);
        a.activate(hitless_sync::ControlEpoch(1)).unwrap();
        let ha = serve(&a);
        let s = replica("s", rs);
        let err = s.follow_tcp(ha.local_addr(), true).unwrap_err().to_string();
        let want = format!(
            "no common sync frame format: the active reads and writes sync formats {ra}, the standby {rs}"
        );
        assert!(err.contains(&want), "{err}");
        assert!(a.status().standbys.is_empty());
        // Nothing changed on either end: the active still serves a standby that fits.
        let ok = replica("ok", ra);
        let _f = ok.follow_tcp(ha.local_addr(), true).unwrap();
        ok.wait_ready(Duration::from_secs(5)).unwrap();
        a.shutdown();
    }
}

/// A scripted active: reads the hello, answers `welcome`, then sends `frames`
/// and drains what the standby sends.
fn fake_active(welcome: Control, frames: Vec<Vec<u8>>) -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let f = wire::read_frame(&mut s).unwrap().unwrap();
        assert_eq!(f.kind, FrameType::Hello);
        let _ = s.write_all(&welcome.encode(hitless_sync::ControlEpoch(1), 0));
        for f in frames {
            let _ = s.write_all(&f);
        }
        let mut buf = [0u8; 4096];
        let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
        while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
    });
    addr
}

fn welcome(format: Option<u8>) -> Control {
    Control::Welcome {
        node: "fake".into(),
        native: 1,
        stream_version: 1,
        tables: vec!["kv".into()],
        format,
    }
}

#[test]
fn standby_refuses_a_welcome_outside_its_range() {
    // The active chose the next format, which this standby does not read.
    let s = replica("s", current());
    let addr = fake_active(welcome(Some(NEXT_WIRE_VERSION)), vec![]);
    let err = s.follow_tcp(addr, true).unwrap_err().to_string();
    assert!(
        err.contains("the active chose sync frame format 3, outside this end's formats 2..=2"),
        "{err}"
    );
    // An active from before negotiation names no format: it speaks format 2,
    // which a standby reading only the next format refuses.
    let s = replica("s2", range(NEXT_WIRE_VERSION, NEXT_WIRE_VERSION));
    let addr = fake_active(welcome(None), vec![]);
    let err = s.follow_tcp(addr, true).unwrap_err().to_string();
    assert!(err.contains("format 2, outside"), "{err}");
}

#[test]
fn corrupt_version_byte_after_negotiation_ends_the_link_with_a_clear_error() {
    let begin = Control::BulkBegin { seq: 0, records: 0 };
    let good = wire::encode_frame_in(
        NEXT_WIRE_VERSION,
        FrameType::BulkBegin,
        hitless_sync::ControlEpoch(1),
        0,
        &serde_json::to_vec(&begin).unwrap(),
    );
    let mut bad = wire::encode_frame_in(
        NEXT_WIRE_VERSION,
        FrameType::Heartbeat,
        hitless_sync::ControlEpoch(1),
        0,
        &[],
    );
    bad[4] = 77;
    let s = replica("s", next());
    let addr = fake_active(welcome(Some(NEXT_WIRE_VERSION)), vec![good, bad]);
    let f = s.follow_tcp(addr, true).unwrap();
    let err = f.join().unwrap_err().to_string();
    assert!(
        err.contains("unsupported sync frame format 77 (this end reads formats 2..=3)"),
        "{err}"
    );
    assert_eq!(s.role(), Role::Standby);
}
