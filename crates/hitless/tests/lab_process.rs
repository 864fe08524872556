//! End-to-end: real agents, real sandboxed kvd instances, real clients (redis-benchmark and
//! the lab's checking client), on this machine. The lab uses fixed loopback ports, so the
//! scenarios run one after the other.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use serde_json::Value;

static LAB: Mutex<()> = Mutex::new(());

fn hitless() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hitless"))
}

fn lab_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("hitless-test-{name}"))
}

/// Runs `hitless lab issu --json` with extra arguments; returns the report.
fn lab_issu(name: &str, extra: &[&str]) -> Value {
    let dir = lab_dir(name);
    let out = Command::new(hitless())
        .args(["lab", "issu", "--json", "--dir"])
        .arg(&dir)
        .args(extra)
        .output()
        .expect("running hitless lab issu");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}); exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}\nprimary log:\n{}\nsecondary log:\n{}",
            out.status,
            tail(&dir.join("primary.log")),
            tail(&dir.join("secondary.log"))
        )
    });
    eprintln!("{}", serde_json::to_string_pretty(&report).unwrap());
    report
}

fn tail(p: &Path) -> String {
    let s = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn skip_without_redis_tools() -> bool {
    let ok = Command::new("redis-benchmark")
        .arg("--version")
        .output()
        .is_ok();
    if !ok {
        eprintln!("SKIPPED: redis-benchmark is not installed (apt-get install redis-tools)");
    }
    !ok
}

#[test]
fn fault_free_issu_commits_with_every_acknowledged_write_verified() {
    let _g = LAB.lock().unwrap_or_else(|e| e.into_inner());
    if skip_without_redis_tools() {
        return;
    }
    let r = lab_issu("clean", &[]);
    assert_eq!(r["result"], "committed");
    assert_eq!(r["from_version"], "1.0.0");
    assert_eq!(r["to_version"], "2.0.0");
    assert_eq!(r["final_control"]["version"], "2.0.0");
    assert!(
        r["acked_writes"].as_u64().unwrap() > 100,
        "the client wrote too little to judge"
    );
    assert_eq!(r["acked_lost"], 0);
    assert_eq!(r["client_errors"], 0);
    assert!(r["switchovers"].as_u64().unwrap() >= 1);
    assert_eq!(r["backend"], "process");
}

#[test]
fn seed_case_crash_of_the_new_active_in_the_mixed_window_fails_over_to_the_peer() {
    let _g = LAB.lock().unwrap_or_else(|e| e.into_inner());
    if skip_without_redis_tools() {
        return;
    }
    let r = lab_issu("seed", &["--fault", "crash-active@primary-mixed"]);
    assert_eq!(r["fault_injected"], true);
    assert_eq!(r["result"], "rolled_back");
    assert_eq!(r["final_control"]["appliance"], "secondary");
    assert_eq!(r["final_control"]["version"], "1.0.0");
    assert_eq!(r["acked_lost"], 0);
    assert!(r["acked_writes"].as_u64().unwrap() > 100);
}

#[test]
fn losing_the_driving_agent_mid_issu_hands_the_journal_to_the_peer_which_finishes_it() {
    let _g = LAB.lock().unwrap_or_else(|e| e.into_inner());
    if skip_without_redis_tools() {
        return;
    }
    // kill -9 of the primary agent (it drives, and its instances share its fate); the
    // secondary agent restores the engine from its mirror of the journal and rolls back; the
    // primary agent is restarted and rejoins.
    let r = lab_issu(
        "agent-kill",
        &["--fault", "appliance-lost-primary@primary-sync-new"],
    );
    assert_eq!(r["fault_injected"], true);
    assert_eq!(r["result"], "rolled_back");
    assert_eq!(r["final_control"]["version"], "1.0.0");
    assert_eq!(r["acked_lost"], 0);
}

fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the agent API");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (code, body)
}

#[test]
fn malformed_api_requests_are_refused_and_change_nothing() {
    let _g = LAB.lock().unwrap_or_else(|e| e.into_inner());
    let dir = lab_dir("api");
    let up = Command::new(hitless())
        .args(["lab", "up", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let api = "127.0.0.1:27701";
    let (_, before) = http(api, "GET", "/v1/status", "");
    let before: Value = serde_json::from_str(&before).unwrap();
    let cases = [
        ("POST", "/v1/upgrade", "{not json"),
        ("POST", "/v1/upgrade", "{\"image\": 5}"),
        ("POST", "/v1/upgrade", "{\"image\": \"/x\", \"extra\": 1}"),
        ("POST", "/v1/upgrade", "{\"image\": \"/nonexistent/image\"}"),
        ("GET", "/v1/nothing-here", ""),
        ("POST", "/v1/commit", ""),
    ];
    for (m, p, b) in cases {
        let (code, body) = http(api, m, p, b);
        assert!(code >= 400, "{m} {p} {b:?} was accepted: {code} {body}");
        let v: Value = serde_json::from_str(&body)
            .unwrap_or_else(|_| panic!("error body is not JSON: {body}"));
        let msg = v["error"].as_str().unwrap_or_default();
        assert!(msg.len() > 10, "unclear error for {m} {p}: {body}");
    }
    let big = "x".repeat(200 * 1024);
    let (code, _) = http(api, "POST", "/v1/upgrade", &big);
    assert_eq!(code, 413, "an oversized body must be refused");
    let (_, after) = http(api, "GET", "/v1/status", "");
    let after: Value = serde_json::from_str(&after).unwrap();
    assert_eq!(before["engine"]["epoch"], after["engine"]["epoch"]);
    assert_eq!(before["engine"]["phase"], after["engine"]["phase"]);
    assert_eq!(before["engine"]["instances"], after["engine"]["instances"]);
    let down = Command::new(hitless())
        .args(["lab", "down", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(down.status.success());
}

#[test]
fn a_malformed_agent_config_is_refused_with_the_field_named_and_nothing_created() {
    let dir = lab_dir("bad-config");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("data");
    let cases = [
        ("heartbeat.misses", format!("appliance = \"primary\"\napi_listen = \"127.0.0.1:1\"\npeer_listen = \"127.0.0.1:2\"\npeer_addr = \"127.0.0.1:3\"\nservice_addr = \"127.0.0.1:4\"\ndata_dir = \"{}\"\nimage = \"/x\"\n[heartbeat]\nmisses = 0\n", data.display())),
        ("bogus", format!("appliance = \"primary\"\nbogus = true\ndata_dir = \"{}\"\n", data.display())),
        ("tertiary", "appliance = \"tertiary\"\n".to_owned()),
        ("api_listen", format!("appliance = \"primary\"\napi_listen = \"not an address\"\ndata_dir = \"{}\"\n", data.display())),
    ];
    for (needle, text) in cases {
        let cfg = dir.join("agent.toml");
        std::fs::write(&cfg, &text).unwrap();
        let out = Command::new(hitless())
            .args(["agent", "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        assert!(!out.status.success(), "accepted:\n{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(needle),
            "error does not name {needle:?}: {err}"
        );
        assert!(
            err.contains("agent.toml"),
            "error does not name the file: {err}"
        );
        assert!(
            !data.exists(),
            "a refused configuration created {}",
            data.display()
        );
    }
}
