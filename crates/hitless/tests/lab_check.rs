//! `hitless lab check` on two hosts: clients write through the service address while the
//! primary is cut off from its peer and the witness (`isolate-primary`), and every
//! acknowledged write is read back. Without a witness both sides acknowledge alone and the
//! heal discards one side's writes: the checker must see it. With the builtin witness nothing
//! may be lost and no two instances may acknowledge at once. Needs root (CI is); skipped
//! with a note otherwise. The lab's names and addresses are fixed: one test at a time.

use std::process::Command;
use std::sync::Mutex;

use serde_json::Value;

mod common;

use common::{lab_check_in, lab_dir};

static LAB: Mutex<()> = Mutex::new(());

fn skip() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: network namespaces need root");
        return true;
    }
    for tool in ["ip", "nft"] {
        if Command::new(tool).arg("-V").output().is_err() {
            eprintln!("SKIPPED: {tool} is not installed (scripts/setup installs it)");
            return true;
        }
    }
    false
}

/// The schedule both tests run: three rounds of `isolate-primary`, each held past the time
/// a cut-off instance in control waits before acknowledging alone (its standby's link
/// timeout, 3 s, and the HA grace, 1 s), the service address re-announced every second.
const SCHEDULE: [&str; 8] = [
    "--faults",
    "isolate-primary",
    "--rounds",
    "3",
    "--seed",
    "1",
    "--hold-ms",
    "6000",
];

fn check(name: &str, witness: &str) -> Value {
    let mut args = vec!["--hosts", "netns", "--witness", witness];
    args.extend(SCHEDULE);
    let r = lab_check_in(&lab_dir(name), &args);
    assert_eq!(r["witness"], witness);
    assert_eq!(r["rounds_run"], 3, "the schedule did not run to its end");
    assert!(
        r["acked"].as_u64().unwrap() > 1000,
        "too few writes acknowledged to judge"
    );
    r
}

#[test]
fn the_checker_reports_lost_writes_without_a_witness() {
    let _g = LAB.lock().unwrap_or_else(|e| e.into_inner());
    if skip() {
        return;
    }
    let r = check("check-none", "none");
    assert!(
        r["warning"].as_str().unwrap().contains("lose acknowledged"),
        "{}",
        r["warning"]
    );
    assert!(
        r["lost"].as_u64().unwrap() > 0,
        "no acknowledged write lost without a witness"
    );
    // Both sides acknowledged during the split.
    assert!(r["in_control_overlap_ms"].as_f64().unwrap() > 0.0);
    assert!(r["epochs"].as_array().unwrap().len() >= 2);
}

#[test]
fn the_builtin_witness_loses_nothing_under_isolate_primary() {
    let _g = LAB.lock().unwrap_or_else(|e| e.into_inner());
    if skip() {
        return;
    }
    let r = check("check-builtin", "builtin");
    assert!(r["witness_endpoint"]
        .as_str()
        .unwrap()
        .starts_with("198.18.0.3:"));
    assert_eq!(r["lost"], 0, "{}", r["lost_samples"]);
    assert_eq!(r["in_control_overlap_ms"], 0.0, "{}", r["reigns"]);
    assert_eq!(r["converged"], true);
}

#[test]
fn the_etcd_witness_loses_nothing_under_isolate_primary() {
    let _g = LAB.lock().unwrap_or_else(|e| e.into_inner());
    if skip() {
        return;
    }
    let r = check("check-etcd", "etcd");
    assert!(r["witness_endpoint"]
        .as_str()
        .unwrap()
        .contains("198.18.0.3:"));
    assert_eq!(r["lost"], 0, "{}", r["lost_samples"]);
    assert_eq!(r["in_control_overlap_ms"], 0.0, "{}", r["reigns"]);
    assert_eq!(r["converged"], true);
}
