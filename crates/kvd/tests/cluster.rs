//! An active and a standby of different versions, driven over the control channel through a
//! planned switchover while a client keeps writing.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{bulk, tempdir, Client, Instance};
use hitless_control::{ControlError, Role};
use kvd::resp::Reply;

/// Writes preloaded data of every type and returns checks (command, expected reply).
fn preload(c: &mut Client) -> Vec<(Vec<String>, Reply)> {
    let mut checks = Vec::new();
    for i in 0..60 {
        assert_eq!(
            c.cmd(&["SET", &format!("s{i}"), &format!("v{i}")]),
            Reply::ok()
        );
        checks.push((vec!["GET".into(), format!("s{i}")], bulk(&format!("v{i}"))));
        assert!(matches!(
            c.cmd(&["RPUSH", &format!("l{}", i % 6), &i.to_string()]),
            Reply::Integer(_)
        ));
        assert_eq!(
            c.cmd(&["SADD", "set", &format!("m{i:02}")]),
            Reply::Integer(1)
        );
        assert!(matches!(
            c.cmd(&["HSET", "h", &format!("f{i:02}"), &i.to_string()]),
            Reply::Integer(1)
        ));
        assert_eq!(
            c.cmd(&["ZADD", "z", &format!("{}.5", 60 - i), &format!("m{i:02}")]),
            Reply::Integer(1)
        );
        assert_eq!(c.cmd(&["INCR", "counter"]), Reply::Integer(i + 1));
    }
    for l in 0..6 {
        let items: Vec<Vec<u8>> = (0..60)
            .filter(|i| i % 6 == l)
            .map(|i: i64| i.to_string().into_bytes())
            .collect();
        checks.push((
            vec!["LRANGE".into(), format!("l{l}"), "0".into(), "-1".into()],
            Reply::bulks(items),
        ));
    }
    checks.push((
        vec!["SMEMBERS".into(), "set".into()],
        Reply::bulks((0..60).map(|i| format!("m{i:02}").into_bytes())),
    ));
    checks.push((
        vec!["HGETALL".into(), "h".into()],
        Reply::bulks(
            (0..60).flat_map(|i| [format!("f{i:02}").into_bytes(), i.to_string().into_bytes()]),
        ),
    ));
    checks.push((
        vec![
            "ZRANGE".into(),
            "z".into(),
            "0".into(),
            "2".into(),
            "WITHSCORES".into(),
        ],
        Reply::bulks(["m59", "1.5", "m58", "2.5", "m57", "3.5"].map(|s| s.as_bytes().to_vec())),
    ));
    checks.push((vec!["GET".into(), "counter".into()], bulk("60")));
    checks
}

fn verify(c: &mut Client, checks: &[(Vec<String>, Reply)], acked: &[(u64, String)], who: &str) {
    for (cmd, want) in checks {
        let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
        assert_eq!(&c.cmd(&args), want, "{who}: {cmd:?}");
    }
    for (n, target) in acked {
        assert_eq!(
            c.cmd(&["GET", &format!("w{n}")]),
            bulk(&n.to_string()),
            "{who}: acknowledged write w{n} (acknowledged by {target}) is missing"
        );
    }
}

fn info(c: &mut Client) -> String {
    match c.cmd(&["INFO"]) {
        Reply::Bulk(Some(b)) => String::from_utf8(b).unwrap(),
        other => panic!("INFO gave {other:?}"),
    }
}

fn planned_switchover(old_version: u32, new_version: u32) {
    let dir = tempdir(&format!("switch-{old_version}-{new_version}"));
    let mut a = Instance::start(old_version, "a", &dir);
    let mut b = Instance::start(new_version, "b", &dir);
    assert_eq!(a.hello.schemas["kv"].native, old_version);
    assert_eq!(b.hello.schemas["kv"].native, new_version);

    a.configure(Role::Active, 1, None, false);
    b.configure(Role::Standby, 1, Some(&a), true);
    let mut ca = a.client();
    let checks = preload(&mut ca);
    b.wait_for("standby ready", |s| s.ready && s.services["kv"].bulk_done);

    // A client keeps writing; when its instance stops being in control it moves to the
    // other one (as the front proxy would) and retries the write that was refused, or that
    // the old instance handed back by closing the connection (it was not executed).
    let acked = Arc::new(Mutex::new(Vec::<(u64, String)>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, stop) = (acked.clone(), stop.clone());
        let addrs = [a.hello.service_addr.clone(), b.hello.service_addr.clone()];
        std::thread::spawn(move || {
            let mut target = 0;
            let mut c = Client::connect(&addrs[0]);
            let mut n = 0u64;
            let mut refusals = 0;
            while !stop.load(Ordering::Acquire) {
                match c.try_cmd(&["SET", &format!("w{n}"), &n.to_string()]) {
                    Some(Reply::Simple(s)) if s == "OK" => {
                        acked.lock().unwrap().push((n, addrs[target].clone()));
                        n += 1;
                    }
                    None => {
                        refusals += 1;
                        assert!(refusals < 200, "connections closed everywhere");
                        target = 1 - target;
                        c = Client::connect(&addrs[target]);
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Some(Reply::Error(e)) if e.starts_with("READONLY") => {
                        refusals += 1;
                        assert!(refusals < 200, "writes refused everywhere: {e}");
                        target = 1 - target;
                        c = Client::connect(&addrs[target]);
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    other => panic!("write w{n} failed: {other:?}"),
                }
            }
            n
        })
    };
    std::thread::sleep(Duration::from_millis(300));

    // Planned switchover: quiesce the active, let the standby catch up, promote it at a new
    // epoch, and make the old active its standby.
    a.ctl
        .quiesce(hitless_control::ControlEpoch(1), common::T)
        .unwrap();
    let a_status = a.status();
    assert!(a_status.quiesced);
    let final_seq = a_status.services["kv"].applied_seq;
    b.wait_for("standby caught up", |s| {
        s.services["kv"].applied_seq >= final_seq
    });
    b.ctl
        .promote(hitless_control::ControlEpoch(2), common::T)
        .unwrap();
    a.ctl
        .demote(
            hitless_control::ControlEpoch(2),
            Some(b.hello.sync_addr.clone()),
            common::T,
        )
        .unwrap();
    // A stale epoch is refused.
    assert!(matches!(
        a.ctl.promote(hitless_control::ControlEpoch(1), common::T),
        Err(ControlError::Remote { .. })
    ));

    let before = acked.lock().unwrap().len();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while acked.lock().unwrap().len() < before + 100 {
        assert!(
            std::time::Instant::now() < deadline,
            "writes did not resume on the new active"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Release);
    let written = writer.join().unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(acked.iter().any(|(_, t)| *t == a.hello.service_addr));
    assert!(acked.iter().any(|(_, t)| *t == b.hello.service_addr));
    assert_eq!(acked.len() as u64, written);

    // Every acknowledged write is on the new active.
    let mut cb = b.client();
    verify(&mut cb, &checks, &acked, "new active");
    let ib = info(&mut cb);
    assert!(ib.contains("role:active") && ib.contains("epoch:2"), "{ib}");
    assert!(
        ib.contains(&format!("schema_version:{new_version}")),
        "{ib}"
    );
    let sb = b.status();
    assert_eq!(
        (sb.role, sb.epoch.0, sb.fenced),
        (Some(Role::Active), 2, false)
    );

    // The old instance now follows the new one (state flows the other way between the
    // versions) and holds the same data; it refuses writes.
    let target_seq = b.status().services["kv"].applied_seq;
    a.wait_for("old active following the new one", |s| {
        s.role == Some(Role::Standby) && s.ready && s.services["kv"].applied_seq >= target_seq
    });
    let mut ca = a.client();
    verify(&mut ca, &checks, &acked, "old active, now standby");
    assert!(matches!(ca.cmd(&["SET", "x", "1"]), Reply::Error(e) if e.starts_with("READONLY")));
    assert_eq!(ca.cmd(&["DBSIZE"]), cb.cmd(&["DBSIZE"]));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn planned_switchover_from_v1_to_v2_keeps_every_acknowledged_write() {
    planned_switchover(1, 2);
}

#[test]
fn planned_switchover_from_v2_to_v1_keeps_every_acknowledged_write() {
    planned_switchover(2, 1);
}

#[test]
fn unconfigured_standby_and_fenced_instances_refuse_writes() {
    let dir = tempdir("refuse");
    let mut a = Instance::start(2, "solo", &dir);
    let mut c = a.client();
    let readonly = |r: Reply| matches!(r, Reply::Error(e) if e.starts_with("READONLY"));
    assert!(
        readonly(c.cmd(&["SET", "k", "v"])),
        "an unconfigured instance serves no writes"
    );
    assert_eq!(a.status().role, None);

    // Wrong identity and wrong sync mode are refused with reasons.
    let mut wrong = hitless_control::Configure {
        instance_id: "someone-else".into(),
        role: Role::Active,
        epoch: hitless_control::ControlEpoch(1),
        active_sync_addr: None,
        designated_ha: false,
        sync_mode: hitless_control::SyncMode::Synchronous,
    };
    assert!(matches!(
        a.ctl.configure(wrong.clone(), common::T),
        Err(ControlError::Remote { .. })
    ));
    wrong.instance_id = "solo".into();
    wrong.sync_mode = hitless_control::SyncMode::Asynchronous;
    assert!(matches!(
        a.ctl.configure(wrong, common::T),
        Err(ControlError::Remote { .. })
    ));

    a.configure(Role::Active, 3, None, false);
    assert_eq!(c.cmd(&["SET", "k", "v"]), Reply::ok());
    assert_eq!(a.status().acked_seq, 1);
    a.ctl
        .fence(hitless_control::ControlEpoch(4), common::T)
        .unwrap();
    let s = a.status();
    assert!(s.fenced && !s.ready, "{s:?}");
    assert!(readonly(c.cmd(&["SET", "k", "w"])));
    assert_eq!(c.cmd(&["GET", "k"]), bulk("v"));
    // An older epoch cannot bring it back.
    assert!(matches!(
        a.ctl.promote(hitless_control::ControlEpoch(3), common::T),
        Err(ControlError::Remote { .. })
    ));
    // Unknown commands and malformed input get clear errors; malformed input closes.
    assert_eq!(
        c.cmd(&["NOPE"]),
        Reply::Error("ERR unknown command 'nope'".into())
    );
    {
        use std::io::{Read, Write};
        let mut raw = std::net::TcpStream::connect(&a.hello.service_addr).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        raw.write_all(b"*1\r\n$abc\r\n").unwrap();
        let mut got = Vec::new();
        raw.read_to_end(&mut got).unwrap();
        let got = String::from_utf8_lossy(&got);
        assert!(
            got.starts_with("-ERR Protocol error: invalid bulk length"),
            "{got}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// One hello at epoch u64::MAX on the sync port of the instance in control used to fence it
/// (every write refused until a restart): only its control channel sets that epoch.
#[test]
fn a_sync_hello_at_epoch_u64_max_does_not_fence_the_instance_in_control() {
    use hitless_sync::wire::{Control, FrameType};
    use std::io::Write;
    let dir = tempdir("hello-epoch");
    let mut a = Instance::start(1, "a1", &dir);
    a.configure(Role::Active, 3, None, false);
    let mut c = a.client();
    assert_eq!(c.cmd(&["SET", "k", "v"]), Reply::ok());
    let hello = Control::Hello {
        service: "kv".into(),
        node: "intruder".into(),
        native: 1,
        reads: vec![1],
        writes: vec![1],
        ha: true,
        epoch: hitless_control::ControlEpoch(u64::MAX),
        resume: None,
        formats: None,
    };
    let mut raw = std::net::TcpStream::connect(&a.hello.sync_addr).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    raw.write_all(&hello.encode(hitless_control::ControlEpoch(u64::MAX), 0))
        .unwrap();
    let f = hitless_sync::wire::read_frame(&mut raw)
        .unwrap()
        .expect("a refusal");
    assert_eq!(f.kind, FrameType::Refuse);
    let s = a.status();
    assert!(!s.fenced && s.epoch.0 == 3, "{s:?}");
    assert_eq!(c.cmd(&["SET", "k", "w"]), Reply::ok());
    assert_eq!(c.cmd(&["GET", "k"]), bulk("w"));
    let _ = std::fs::remove_dir_all(&dir);
}
