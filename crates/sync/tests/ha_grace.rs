//! After a designated HA standby drops out, the active holds the acknowledgements it would
//! have waited for, for `ha_grace`: a failover the control plane decided meanwhile may be
//! promoting that very standby.
mod common;

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use hitless_sync::{Replica, ServeHandle};

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(2));
    }
}

/// Applies one write on another thread; its result arrives on the channel.
fn apply_in_background(a: &Replica, k: u64) -> mpsc::Receiver<Result<(), String>> {
    let (tx, rx) = mpsc::channel();
    let a = a.clone();
    thread::spawn(move || {
        let r = a
            .apply(vec![put(k, "held")])
            .map(|_| ())
            .map_err(|e| e.to_string());
        let _ = tx.send(r);
    });
    rx
}

/// An active with `grace`, and an HA standby that was in sync and dropped out (its link
/// closed without a word, as when it crashes or hangs).
fn active_whose_ha_standby_dropped(grace: Duration) -> (Replica, ServeHandle, Replica) {
    let (a, h) = active(1, "a");
    a.set_ha_grace(grace);
    let s = standby(1, "s");
    let f = s.follow_tcp(h.local_addr(), true).unwrap();
    s.wait_ready(Duration::from_secs(5)).unwrap();
    a.apply(vec![put(1, "with the standby")]).unwrap();
    f.stop();
    wait_for("the active to drop the link", || {
        a.status().standbys.is_empty()
    });
    (a, h, s)
}

#[test]
fn acknowledgements_are_held_for_the_grace_then_given_without_the_dropped_standby() {
    let (a, _h, s) = active_whose_ha_standby_dropped(Duration::from_secs(2));
    let dropped = Instant::now();
    let rx = apply_in_background(&a, 2);
    // Held: not acknowledged while the grace runs.
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "acknowledged without the dropped HA standby during its grace"
    );
    // Then acknowledged without it (degraded), within the ack timeout.
    let r = rx.recv_timeout(Duration::from_secs(5)).expect("an answer");
    assert_eq!(r, Ok(()));
    assert!(dropped.elapsed() >= Duration::from_millis(1500));
    // Past the grace, acknowledgements no longer wait.
    let rx = apply_in_background(&a, 3);
    assert_eq!(rx.recv_timeout(Duration::from_secs(1)), Ok(Ok(())));
    a.shutdown();
    s.shutdown();
}

#[test]
fn a_standby_back_in_sync_within_the_grace_releases_the_held_acknowledgement() {
    let (a, h, s) = active_whose_ha_standby_dropped(Duration::from_secs(30));
    let rx = apply_in_background(&a, 7);
    assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
    // The standby re-attaches (a resume) and catches up: the write is acknowledged, long
    // before the grace ends, and the standby holds it.
    let _f2 = s.follow_tcp(h.local_addr(), true).unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(Ok(())));
    wait_for("the standby to apply the held write", || {
        s.get("kv", b"k7").unwrap().as_deref() == Some(b"held".as_slice())
    });
    a.shutdown();
    s.shutdown();
}

#[test]
fn the_control_plane_can_end_the_grace_early() {
    let (a, _h, s) = active_whose_ha_standby_dropped(Duration::from_secs(30));
    let rx = apply_in_background(&a, 9);
    assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
    // The control plane wrote the standby off (it will never promote it): degrade now.
    a.set_ha_grace(Duration::ZERO);
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(Ok(())));
    a.shutdown();
    s.shutdown();
}

#[test]
fn a_standby_that_never_was_in_sync_holds_nothing() {
    let (a, _h) = active(1, "a");
    a.set_ha_grace(Duration::from_secs(30));
    // No HA standby ever attached (e.g. right after a failover): acknowledged alone at once.
    let rx = apply_in_background(&a, 1);
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(Ok(())));
    a.shutdown();
}

#[test]
fn a_standby_that_leaves_on_purpose_holds_nothing() {
    let (a, h) = active(1, "a");
    a.set_ha_grace(Duration::from_secs(30));
    let s = standby(1, "s");
    let f = s.follow_tcp(h.local_addr(), true).unwrap();
    s.wait_ready(Duration::from_secs(5)).unwrap();
    // Its control plane stops or re-points it: it says so, and the active does not wait.
    f.leave();
    wait_for("the active to drop the link", || {
        a.status().standbys.is_empty()
    });
    let rx = apply_in_background(&a, 4);
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(Ok(())));
    a.shutdown();
    s.shutdown();
}

/// A leaving standby keeps its end of the link open until the active has read the Leave and
/// closed the link itself: closing first would let the active's next writes fail, take the
/// standby for a dropped HA standby, and hold every acknowledgement for the grace.
#[test]
fn a_leaving_standby_lets_the_active_close_the_link() {
    use hitless_sync::wire::{self, Control, FrameType};
    use hitless_sync::Digest;
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let active = thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let hello = wire::read_frame(&mut c).unwrap().unwrap();
        assert_eq!(hello.kind, FrameType::Hello);
        let welcome = Control::Welcome {
            node: "fake".into(),
            native: 1,
            stream_version: 1,
            tables: vec!["kv".into()],
            format: None,
        };
        c.write_all(&welcome.encode(hitless_sync::ControlEpoch(1), 0))
            .unwrap();
        c.write_all(
            &Control::BulkBegin { seq: 0, records: 0 }.encode(hitless_sync::ControlEpoch(1), 0),
        )
        .unwrap();
        let end = Control::BulkEnd {
            seq: 0,
            digest: Digest::default(),
            last_epoch: hitless_sync::ControlEpoch(0),
        };
        c.write_all(&end.encode(hitless_sync::ControlEpoch(1), 0))
            .unwrap();
        // Read up to the Leave (acknowledgements and heartbeats before it).
        loop {
            let f = wire::read_frame(&mut c)
                .unwrap()
                .expect("a Leave before the end");
            if f.kind == FrameType::Leave {
                break;
            }
        }
        // A busy active reads it late: the standby's end must still be open meanwhile.
        thread::sleep(Duration::from_millis(100));
        c.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let mut buf = [0u8; 4096];
        let watch_until = Instant::now() + Duration::from_millis(150);
        let open = loop {
            if Instant::now() > watch_until {
                break true;
            }
            // Heartbeats may still come; an end of stream must not.
            if let Ok(0) = c.read(&mut buf) {
                break false;
            }
        };
        drop(c); // the active closes the link
        open
    });
    let s = standby(1, "s");
    let f = s.follow_tcp(addr, true).unwrap();
    wait_for("the empty bulk transfer", || s.status().bulk_done);
    let began = Instant::now();
    f.leave();
    assert!(
        active.join().unwrap(),
        "the standby closed its end before the active had closed the link"
    );
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "leave took {:?}",
        began.elapsed()
    );
    s.shutdown();
}

#[test]
fn a_standby_written_off_by_the_control_plane_ends_its_grace() {
    let (a, _h, s) = active_whose_ha_standby_dropped(Duration::from_secs(30));
    let rx = apply_in_background(&a, 11);
    assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
    // Its process exited and its control plane wrote it off: it can never be promoted.
    a.standby_gone("s");
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(Ok(())));
    // Another standby that drops out still gets its grace.
    let t = standby(1, "t");
    let h2 = a
        .serve(std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .unwrap();
    let f = t.follow_tcp(h2.local_addr(), true).unwrap();
    t.wait_ready(Duration::from_secs(5)).unwrap();
    f.stop();
    wait_for("the active to drop the link", || {
        a.status().standbys.is_empty()
    });
    let rx = apply_in_background(&a, 12);
    assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
    a.standby_gone("t");
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(Ok(())));
    a.shutdown();
    s.shutdown();
    t.shutdown();
}
