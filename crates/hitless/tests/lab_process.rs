//! End-to-end: real agents, real sandboxed kvd instances, real clients (redis-benchmark and
//! the lab's checking client), on this machine's loopback (`--hosts loopback`; the two-host
//! lab has its own tests in `lab_netns.rs`). The lab uses fixed loopback ports, so the
//! scenarios run one after the other.

use std::process::Command;
use std::sync::Mutex;

use serde_json::Value;

mod common;

use common::{hitless, lab_dir, lab_issu_in, tail, LabDown};

static LAB: Mutex<()> = Mutex::new(());

/// Runs `hitless lab issu --json --hosts loopback` with extra arguments; returns the report.
fn lab_issu(name: &str, extra: &[&str]) -> Value {
    lab_issu_in(&lab_dir(name), "loopback", extra)
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
    // The default state: 10,000 loaded keys, every one read back with its value.
    assert_state_kept(&r, 10_000);
    assert_eq!(r["state_checked"], 10_000);
    assert_eq!(r["benchmark"]["clients"], 4);
    assert_figures(&r);
}

/// A service whose contract declares the opaque protocol: the front knows no request
/// boundaries, so a switchover drains connections (a client may see its connection closed,
/// with its unanswered write not acknowledged) instead of holding requests; nothing that was
/// acknowledged is lost.
#[test]
fn an_opaque_service_is_upgraded_with_connections_drained_and_nothing_acknowledged_lost() {
    let _g = LAB.lock().unwrap_or_else(|e| e.into_inner());
    if skip_without_redis_tools() {
        return;
    }
    let r = lab_issu("opaque", &["--protocol", "opaque"]);
    assert_eq!(r["protocol"], "opaque");
    assert_eq!(r["result"], "committed", "{r}");
    assert_eq!(r["final_control"]["version"], "2.0.0");
    assert!(
        r["acked_writes"].as_u64().unwrap() > 100,
        "the client wrote too little to judge"
    );
    assert_eq!(r["acked_lost"], 0);
    assert_state_kept(&r, 10_000);
    // Every client error is a connection the drain closed, never a refused write.
    for e in r["client_error_samples"].as_array().unwrap() {
        let e = e.as_str().unwrap();
        assert!(
            e.contains("connection closed") || e.contains("reset") || e.contains("Broken pipe"),
            "{e}"
        );
    }
}

/// The loaded state was there when the ISSU started and is still there, values included.
fn assert_state_kept(r: &Value, keys: u64) {
    assert_eq!(r["state_loaded_keys"], keys, "{r}");
    assert!(
        r["state_keys"].as_u64().unwrap() >= keys,
        "the service held {} keys at the start, {keys} were loaded",
        r["state_keys"]
    );
    assert!(
        r["state_keys_after"].as_u64().unwrap() >= keys,
        "the service held {} keys after the ISSU, {keys} were loaded",
        r["state_keys_after"]
    );
    let value_size = r["value_size"].as_u64().unwrap();
    assert!(
        r["state_bytes"].as_u64().unwrap() > keys * value_size,
        "state_bytes counts keys and values: {}",
        r["state_bytes"]
    );
    assert!(r["state_checked"].as_u64().unwrap() >= keys.min(10_000));
    assert_eq!(r["state_lost"], 0, "loaded keys lost: {r}");
    assert!(r["load_s"].as_f64().unwrap() > 0.0);
}

/// Memory and sync figures of a committed ISSU: every instance's peak RSS, and the start and
/// sync time of each of the five new standbys.
fn assert_figures(r: &Value) {
    let instances = r["instances"].as_array().unwrap();
    assert!(instances.len() >= 6, "{instances:?}");
    for i in instances {
        let peak = i["peak_rss_bytes"].as_u64().unwrap_or(0);
        assert!(peak > 1 << 20, "no peak RSS for {i}");
    }
    let syncs = r["standby_syncs"].as_array().unwrap();
    assert_eq!(syncs.len(), 5, "{syncs:?}");
    for s in syncs {
        assert!(s["sync_ms"].as_f64().unwrap() > 0.0, "{s}");
        assert!(s["start_ms"].as_f64().is_some(), "{s}");
    }
}

/// Scale run, with release binaries (a debug build loads a million keys too slowly to be
/// worth the wait): `scripts/test` runs it after the default suite, as
/// `cargo test --release -p hitless --test lab_process -- --ignored`.
#[test]
#[ignore = "scale run with release binaries: scripts/test runs it with cargo test --release -p hitless --test lab_process -- --ignored"]
fn a_million_keys_of_state_are_upgraded_without_a_hit() {
    let _g = LAB.lock().unwrap_or_else(|e| e.into_inner());
    if skip_without_redis_tools() {
        return;
    }
    let r = lab_issu("million", &["--keys", "1000000", "--value-size", "100"]);
    assert_eq!(r["result"], "committed", "{}", r["outcome_detail"]);
    assert_eq!(r["final_control"]["version"], "2.0.0");
    assert_eq!(r["acked_lost"], 0);
    assert_eq!(r["client_errors"], 0);
    assert_state_kept(&r, 1_000_000);
    assert_eq!(r["state_checked"], 10_000);
    // A bound, not a target: the load goes at tens of thousands of keys per second.
    assert!(
        r["load_s"].as_f64().unwrap() < 120.0,
        "loading 1,000,000 keys took {} s",
        r["load_s"]
    );
    assert_figures(&r);
}

/// 500 redis-benchmark connections through the service address during the ISSU (runs in the
/// default suite: about 20 s with debug binaries).
#[test]
fn five_hundred_benchmark_clients_see_no_error_during_the_issu() {
    let _g = LAB.lock().unwrap_or_else(|e| e.into_inner());
    if skip_without_redis_tools() {
        return;
    }
    let r = lab_issu("clients", &["--clients", "500"]);
    assert_eq!(r["result"], "committed", "{}", r["outcome_detail"]);
    assert_eq!(r["acked_lost"], 0);
    assert_eq!(r["client_errors"], 0);
    assert_eq!(r["benchmark"]["clients"], 500);
    assert!(
        !r["benchmark"]["tests"].as_object().unwrap().is_empty(),
        "redis-benchmark with 500 clients completed no test: {r}"
    );
    assert_state_kept(&r, 10_000);
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
fn a_hung_instance_in_control_is_detected_by_its_health_probes_and_failed_over() {
    let _g = LAB.lock().unwrap_or_else(|e| e.into_inner());
    if skip_without_redis_tools() {
        return;
    }
    // SIGSTOP of the new version in control: its process is there but answers nothing. The
    // agent's health probes report it, the engine fails over to the peer's old-version HA
    // standby and rolls back; the hung instance is killed, not waited for.
    let r = lab_issu("hung", &["--fault", "heartbeat-lost@primary-mixed"]);
    assert_eq!(r["fault_injected"], true);
    assert_eq!(r["result"], "rolled_back");
    assert_eq!(r["final_control"]["appliance"], "secondary");
    assert_eq!(r["final_control"]["version"], "1.0.0");
    assert_eq!(r["acked_lost"], 0);
    assert_eq!(r["client_errors"], 0);
    assert!(
        r["outcome_detail"]
            .as_str()
            .unwrap()
            .contains("heartbeat lost"),
        "{r}"
    );
}

const PRIMARY_API: &str = "127.0.0.1:27701";
const SECONDARY_API: &str = "127.0.0.1:27702";
const SERVICE: &str = "127.0.0.1:26380";

fn api_status(dir: &std::path::Path, addr: &str) -> Option<Value> {
    let (code, body) = try_http(dir, addr, "GET", "/v1/status", "")?;
    (code == 200).then(|| serde_json::from_str(&body).ok())?
}

/// Polls `f` every 100 ms until it holds or `secs` pass; returns whether it held.
fn wait_for(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    false
}

/// One RESP command on `conn`; returns the reply's first line and, for a bulk reply, its data.
fn resp(conn: &mut std::io::BufReader<std::net::TcpStream>, args: &[&str]) -> String {
    use std::io::{BufRead, Read, Write};
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    conn.get_mut().write_all(req.as_bytes()).unwrap();
    let mut line = String::new();
    conn.read_line(&mut line).unwrap();
    if let Some(n) = line.strip_prefix('$') {
        let n: i64 = n.trim().parse().unwrap();
        if n < 0 {
            return "(nil)".into();
        }
        let mut data = vec![0u8; n as usize + 2];
        conn.read_exact(&mut data).unwrap();
        data.truncate(n as usize);
        return String::from_utf8(data).unwrap();
    }
    line.trim_end().to_string()
}

/// A client connection to the lab's service address.
fn service_conn() -> std::io::BufReader<std::net::TcpStream> {
    let stream = std::net::TcpStream::connect(SERVICE).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    std::io::BufReader::new(stream)
}

fn in_control_appliance(status: &Value) -> Option<String> {
    let e = &status["engine"];
    let id = e["in_control"].as_u64()?;
    e["instances"]
        .as_array()?
        .iter()
        .find(|i| i["id"].as_u64() == Some(id))
        .and_then(|i| i["appliance"].as_str().map(str::to_string))
}

#[test]
fn an_agent_killed_and_restarted_mid_issu_rejoins_and_its_journal_later_resumes_the_pair() {
    let _g = LAB.lock().unwrap_or_else(|e| e.into_inner());
    if skip_without_redis_tools() {
        return;
    }
    // kill -9 of the driving (primary) agent mid-ISSU; the secondary finishes the ISSU from its
    // mirror of the journal; the lab restarts the primary agent on its configuration and
    // journal 1.5 s later, and keeps the pair up.
    let dir = lab_dir("agent-restart");
    let r = lab_issu(
        "agent-restart",
        &[
            "--fault",
            "appliance-lost-primary@primary-sync-new",
            "--keep",
        ],
    );
    let _down = LabDown(dir.clone());
    assert_eq!(r["fault_injected"], true);
    assert_eq!(r["result"], "rolled_back");
    assert_eq!(r["final_control"]["appliance"], "secondary");
    assert_eq!(r["final_control"]["version"], "1.0.0");
    assert_eq!(r["acked_lost"], 0);
    assert!(
        r["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l.as_str().unwrap().contains("primary agent restarted")),
        "the timeline shows the restart: {r}"
    );

    // 1. The restarted agent rejoined: it follows the secondary, holds the same journal
    //    history, and the pair has an HA standby on it again.
    let rejoined = wait_for(30, || {
        let (Some(p), Some(s)) = (
            api_status(&dir, PRIMARY_API),
            api_status(&dir, SECONDARY_API),
        ) else {
            return false;
        };
        let ha_on_primary = s["engine"]["instances"].as_array().is_some_and(|v| {
            v.iter().any(|i| {
                i["appliance"] == "primary" && i["role"] == "ha-standby" && i["state"] == "ready"
            })
        });
        p["driving"] == false
            && s["driving"] == true
            && p["journal_next_index"] == s["journal_next_index"]
            && ha_on_primary
    });
    assert!(
        rejoined,
        "the restarted primary agent did not rejoin with the driver's journal and an HA standby\nprimary: {:?}\nsecondary: {:?}\nprimary log:\n{}",
        api_status(&dir, PRIMARY_API),
        api_status(&dir, SECONDARY_API),
        tail(&dir.join("primary.log"))
    );
    let epoch_before = api_status(&dir, SECONDARY_API).unwrap()["engine"]["epoch"]
        .as_u64()
        .unwrap();

    // 2. Acknowledged writes, then the driving agent (the secondary) is lost.
    let mut conn = service_conn();
    for i in 0..300 {
        assert_eq!(
            resp(
                &mut conn,
                &["SET", &format!("restart:{i}"), &format!("v{i}")]
            ),
            "+OK"
        );
    }
    let keys_before: u64 = resp(&mut conn, &["DBSIZE"])
        .trim_start_matches(':')
        .parse()
        .unwrap();
    drop(conn);
    let pid = std::fs::read_to_string(dir.join("secondary.pid")).unwrap();
    let killed = Command::new("kill")
        .args(["-9", pid.trim()])
        .status()
        .unwrap();
    assert!(killed.success(), "kill -9 of the secondary agent {pid}");

    // 3. The restarted agent resumes the pair from its journal: it drives, at a higher epoch,
    //    with control on its own appliance, and every acknowledged write is there.
    let resumed = wait_for(15, || {
        api_status(&dir, PRIMARY_API).is_some_and(|p| {
            p["driving"] == true
                && in_control_appliance(&p).as_deref() == Some("primary")
                && p["engine"]["epoch"].as_u64().unwrap_or(0) > epoch_before
        })
    });
    assert!(
        resumed,
        "the restarted agent did not take over from its journal\nprimary: {:?}\nprimary log:\n{}",
        api_status(&dir, PRIMARY_API),
        tail(&dir.join("primary.log"))
    );
    let mut conn = service_conn();
    for i in 0..300 {
        assert_eq!(
            resp(&mut conn, &["GET", &format!("restart:{i}")]),
            format!("v{i}"),
            "acknowledged write restart:{i} after the takeover"
        );
    }
    let keys_after: u64 = resp(&mut conn, &["DBSIZE"])
        .trim_start_matches(':')
        .parse()
        .unwrap();
    assert!(
        keys_after >= keys_before,
        "keys before the takeover {keys_before}, after {keys_after}"
    );
}

/// The operator token of the lab in `dir` (its `api-tokens` file: `ROLE TOKEN` lines).
fn lab_token(dir: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("api-tokens")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("operator "))
        .map(|t| t.trim().to_owned())
}

/// A request to the agent API of the lab in `dir`, with the lab's operator token.
fn http(dir: &std::path::Path, addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    try_http(dir, addr, method, path, body).expect("a request to the agent API")
}

fn try_http(
    dir: &std::path::Path,
    addr: &str,
    method: &str,
    path: &str,
    body: &str,
) -> Option<(u16, String)> {
    let auth = format!("Authorization: Bearer {}\r\n", lab_token(dir)?);
    raw_http(addr, method, path, &auth, body)
}

fn raw_http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .ok()?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    Some((code, body))
}

#[test]
fn malformed_api_requests_are_refused_and_change_nothing() {
    let _g = LAB.lock().unwrap_or_else(|e| e.into_inner());
    let dir = lab_dir("api");
    let up = Command::new(hitless())
        .args(["lab", "up", "--hosts", "loopback", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let api = "127.0.0.1:27701";
    // The lab's agents need a token: without one an upgrade is refused and nothing starts.
    let (code, body) = raw_http(api, "POST", "/v1/upgrade", "", "{\"image\": \"/x\"}").unwrap();
    assert_eq!(code, 401, "{body}");
    let (_, before) = http(&dir, api, "GET", "/v1/status", "");
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
        let (code, body) = http(&dir, api, m, p, b);
        assert!(code >= 400, "{m} {p} {b:?} was accepted: {code} {body}");
        let v: Value = serde_json::from_str(&body)
            .unwrap_or_else(|_| panic!("error body is not JSON: {body}"));
        let msg = v["error"].as_str().unwrap_or_default();
        assert!(msg.len() > 10, "unclear error for {m} {p}: {body}");
    }
    let big = "x".repeat(200 * 1024);
    let (code, _) = http(&dir, api, "POST", "/v1/upgrade", &big);
    assert_eq!(code, 413, "an oversized body must be refused");
    let (_, after) = http(&dir, api, "GET", "/v1/status", "");
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
