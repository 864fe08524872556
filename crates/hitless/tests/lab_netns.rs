//! End-to-end on two hosts: each appliance's agent in a network namespace of its own, clients
//! in a third, all on a bridge (`hitless lab ... --hosts netns`); the service address is a
//! virtual IP that moves with control, and partitions are nftables rules. The lab's names
//! and addresses are fixed, so the scenarios run one after the other. Needs root (CI is);
//! skipped with a note otherwise.

use std::process::Command;
use std::sync::Mutex;

use serde_json::Value;

mod common;

use common::{hitless, lab_dir, lab_issu_in, LabDown};

static LAB: Mutex<()> = Mutex::new(());

fn skip() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: network namespaces need root");
        return true;
    }
    for tool in ["redis-benchmark", "ip", "nft"] {
        if Command::new(tool).arg("--version").output().is_err()
            && Command::new(tool).arg("-V").output().is_err()
        {
            eprintln!("SKIPPED: {tool} is not installed (scripts/setup installs it)");
            return true;
        }
    }
    false
}

/// Runs `hitless lab issu --json --hosts netns` with extra arguments; returns the report
/// (whatever the exit status: a partition may lose writes, which the report counts).
fn lab_issu(name: &str, extra: &[&str]) -> Value {
    lab_issu_in(&lab_dir(name), "netns", extra)
}

fn namespaces() -> String {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn holds_service_address(netns: &str, addr: &str) -> bool {
    let out = Command::new("ip")
        .args(["-n", netns, "-o", "addr", "show", "to", addr])
        .output()
        .unwrap();
    out.status.success() && !out.stdout.is_empty()
}

/// The address ended on exactly the appliance in control.
fn assert_one_holder(r: &Value) {
    let holders = r["address_holders"].as_array().expect("address holders");
    assert_eq!(holders.len(), 1, "the service address on {holders:?}");
    assert_eq!(
        holders[0], r["final_control"]["appliance"],
        "the address is not where control is"
    );
}

#[test]
fn a_two_host_issu_commits_with_the_address_on_one_host_and_the_network_removed_after() {
    let _g = LAB.lock().unwrap_or_else(|e| e.into_inner());
    if skip() {
        return;
    }
    let dir = lab_dir("netns-clean");
    let r = lab_issu("netns-clean", &["--keep"]);
    let _down = LabDown(dir.clone());
    assert_eq!(r["hosts"], "netns");
    assert_eq!(r["result"], "committed");
    assert_eq!(r["final_control"]["version"], "2.0.0");
    assert!(r["acked_writes"].as_u64().unwrap() > 100);
    assert_eq!(r["acked_lost"], 0);
    assert_eq!(r["client_errors"], 0);
    assert_eq!(r["state_lost"], 0);
    assert_one_holder(&r);

    // The topology, as `lab status --json` describes it.
    let out = Command::new(hitless())
        .args(["lab", "status", "--json", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    let t = &s["topology"];
    assert_eq!(t["kind"], "netns");
    assert_eq!(t["hosts"]["primary"]["addr"], "198.18.0.1");
    assert_eq!(t["hosts"]["secondary"]["addr"], "198.18.0.2");
    assert_eq!(t["hosts"]["witness"]["addr"], "198.18.0.3");
    assert_eq!(t["client"]["addr"], "198.18.0.100");
    assert_eq!(t["service_addr"], "198.18.0.10");
    for role in ["primary", "secondary", "witness"] {
        let ns = t["hosts"][role]["netns"].as_str().unwrap();
        assert!(namespaces().contains(ns), "{ns} missing");
    }
    // Every instance listens on its host's address, not loopback.
    for i in s["local"]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .chain(s["peer"]["instances"].as_array().unwrap())
    {
        let addr = i["service_addr"].as_str().unwrap();
        assert!(addr.starts_with("198.18.0."), "instance on {addr}");
    }
    // An outside client in the client namespace reaches the service through the address.
    let ns = t["client"]["netns"].as_str().unwrap();
    let cli = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "redis-cli",
            "-h",
            "198.18.0.10",
            "-p",
            "6379",
        ])
        .args(["set", "outside", "yes"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&cli.stdout).trim(), "OK");
    let holder = r["final_control"]["appliance"].as_str().unwrap();
    assert!(holds_service_address(
        t["hosts"][holder]["netns"].as_str().unwrap(),
        "198.18.0.10"
    ));

    // Down removes every namespace and link; a second down finds nothing and succeeds.
    for _ in 0..2 {
        let out = Command::new(hitless())
            .args(["lab", "down", "--dir"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let left = namespaces();
    assert!(
        !left.lines().any(|l| l.starts_with("hl-")),
        "namespaces left: {left}"
    );
    let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(!links.contains(" hl-"), "links left: {links}");
}

#[test]
fn seed_case_on_two_hosts_fails_over_to_the_peer_and_the_address_follows() {
    let _g = LAB.lock().unwrap_or_else(|e| e.into_inner());
    if skip() {
        return;
    }
    let r = lab_issu("netns-seed", &["--fault", "crash-active@primary-mixed"]);
    assert_eq!(r["fault_injected"], true);
    assert_eq!(r["result"], "rolled_back");
    assert_eq!(r["final_control"]["appliance"], "secondary");
    assert_eq!(r["acked_lost"], 0);
    assert_one_holder(&r);
}

#[test]
fn the_address_moves_to_the_peer_when_the_appliance_in_control_is_lost() {
    let _g = LAB.lock().unwrap_or_else(|e| e.into_inner());
    if skip() {
        return;
    }
    let r = lab_issu(
        "appliance-lost",
        &["--fault", "appliance-lost-primary@primary-mixed"],
    );
    assert_eq!(r["fault_injected"], true);
    assert_eq!(r["final_control"]["appliance"], "secondary");
    assert_eq!(r["acked_lost"], 0);
    assert_eq!(r["state_lost"], 0);
    // Clients saw the service again through the address once it moved.
    assert!(
        r["failover_ms"].as_f64().unwrap() < 3000.0,
        "{}",
        r["failover_ms"]
    );
    assert_one_holder(&r);
}

#[test]
fn a_partition_between_the_appliances_heals_to_one_owner_of_the_address() {
    let _g = LAB.lock().unwrap_or_else(|e| e.into_inner());
    if skip() {
        return;
    }
    let r = lab_issu(
        "netns-partition",
        &["--fault", "partition-peers@primary-mixed"],
    );
    assert_eq!(r["fault_injected"], true);
    assert!(
        r["timeline"].as_array().unwrap().iter().any(|l| l
            .as_str()
            .unwrap()
            .contains("partition partition-peers healed")),
        "the partition was not healed"
    );
    // One driver, one instance in control, the address on that appliance only.
    assert_ne!(r["result"], "unfinished", "{}", r["outcome_detail"]);
    assert_one_holder(&r);
    // Whatever was lost is counted (none in this scenario so far; see docs/ARCHITECTURE.md
    // for the scenarios that can lose writes without a witness).
    assert!(r["acked_lost"].is_u64());
    assert_eq!(r["state_lost"], 0);
}
