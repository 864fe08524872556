//! kvd stops gracefully on SIGTERM even as PID 1 of a PID namespace (as in the process
//! sandbox), where the kernel drops any signal left at its default action.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The child processes of `pid` (from `/proc/<pid>/task/*/children`).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(
                    text.split_whitespace()
                        .filter_map(|p| p.parse::<u32>().ok()),
                );
            }
        }
    }
    out
}

#[test]
fn kvd_as_pid_1_of_its_namespace_stops_gracefully_on_sigterm() {
    let unshare_ok = Command::new("unshare")
        .args(["--fork", "--pid", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !unshare_ok {
        eprintln!("SKIPPED: cannot make a PID namespace here (unshare --pid needs root)");
        return;
    }
    let dir = common::tempdir("signals");
    let sock = dir.join("c.sock");
    let log = dir.join("kvd.log");
    let mut unshare = Command::new("unshare")
        .args(["--fork", "--pid", "--kill-child", common::bin(1)])
        .args(["--instance-id", "pid1", "--service-listen", "127.0.0.1:0"])
        .args(["--sync-listen", "127.0.0.1:0", "--control-listen"])
        .arg(&sock)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Up: its control socket answers.
    let deadline = Instant::now() + common::T;
    while hitless_control::ControlClient::connect_unix(&sock).is_err() {
        assert!(Instant::now() < deadline, "kvd never came up");
        std::thread::sleep(Duration::from_millis(20));
    }
    let kvd = *children(unshare.id())
        .first()
        .expect("kvd runs as unshare's child");
    // SAFETY: kill takes plain integers.
    assert_eq!(unsafe { libc::kill(kvd as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(s) = unshare.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = unshare.kill();
            panic!(
                "kvd as PID 1 ignored SIGTERM for 5 s; its log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "kvd exited with {status}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("stopping on a signal"), "{text}");
}
