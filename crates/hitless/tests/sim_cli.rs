//! `hitless sim issu`: the simulated ISSU from the command line, its JSON and its errors.

use std::process::Command;

fn hitless(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_hitless"))
        .args(args)
        .output()
        .expect("hitless runs")
}

#[test]
fn sim_json_keeps_its_field_names_and_result_names() {
    let out = hitless(&[
        "sim",
        "issu",
        "--json",
        "--fault",
        "crash-active@primary-mixed",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(r["fault"], "crash-active@primary-mixed");
    assert_eq!(r["fault_fired"], true);
    assert_eq!(r["result"], "rolled_back");
    assert_eq!(r["invariant_violations"], 0);
    assert_eq!(r["violations"], serde_json::json!([]));
    assert_eq!(r["final_control"]["appliance"], "secondary");
    assert_eq!(r["final_control"]["version"], "1.0.0");
    assert!(
        r["epoch"].as_u64().is_some_and(|e| e >= 2),
        "{}",
        r["epoch"]
    );
    assert_eq!(r["acked_lost"], 0);
    let steps = r["steps"].as_array().expect("a timeline");
    assert!(steps.iter().all(|s| s["epoch"].is_u64()));
}

#[test]
fn sim_table_prints_the_result_line() {
    let out = hitless(&["sim", "issu"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("result: committed"), "{text}");
    assert!(
        text.contains("final control: primary appliance, version 1.1.0, epoch "),
        "{text}"
    );
}

#[test]
fn sim_refuses_a_fault_outside_the_catalog() {
    let out = hitless(&["sim", "issu", "--fault", "start-fail@primary-mixed"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot happen at that step"), "{err}");
}

#[test]
fn a_reader_that_goes_away_ends_the_output_quietly() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;
    // The reader closes its end before the simulation prints anything (as `| head -0` would).
    let mut child = Command::new(env!("CARGO_BIN_EXE_hitless"))
        .args(["sim", "issu", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("hitless runs");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("hitless ends");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "{:?}: {stderr}",
        out.status
    );
}
