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

#[test]
fn a_partition_prints_its_split_and_a_predicted_loss_still_exits_zero() {
    let out = hitless(&["sim", "issu", "--fault", "partition-peers@primary-mixed"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("split: cut at tick "), "{text}");
    assert!(
        text.contains("the service address held by up to 2 appliance(s)"),
        "{text}"
    );
    assert!(
        text.contains("after the heal: the primary agent drives; converged "),
        "{text}"
    );
    let lost = text
        .lines()
        .find_map(|l| l.strip_prefix("lost without a witness (predicted): "))
        .expect("the predicted-loss line");
    let n: u64 = lost.split(' ').next().unwrap().parse().unwrap();
    assert!(n > 0, "{text}");
    assert!(
        lost.ends_with(&format!(
            "of the {n} write(s) the discarded side acknowledged"
        )),
        "{text}"
    );
}

#[test]
fn sim_json_reports_the_split_fields() {
    let out = hitless(&[
        "sim",
        "issu",
        "--json",
        "--fault",
        "pause-agent@primary-mixed",
    ]);
    assert!(out.status.success());
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(r["lost_without_witness"], 0);
    assert_eq!(r["acked_lost"], 0);
    let s = &r["split"];
    assert_eq!(s["survivor"], "secondary");
    assert_eq!(s["discarded_acks"], 0);
    assert!(s["converged_after_ticks"].is_u64(), "{s}");
    assert!(s["address_holders_max"].is_u64(), "{s}");
}

#[test]
fn sim_all_runs_the_whole_catalog_and_counts_it() {
    let listed = hitless(&["sim", "issu", "--list-faults"]);
    assert!(listed.status.success());
    let catalog = String::from_utf8_lossy(&listed.stdout).lines().count();
    for kind in [
        "partition-peers@",
        "isolate-primary@",
        "isolate-secondary@",
        "one-way-primary@",
        "isolate-witness@",
        "pause-agent@",
    ] {
        assert!(
            String::from_utf8_lossy(&listed.stdout).contains(kind),
            "{kind} not listed"
        );
    }
    let out = hitless(&["sim", "issu", "--all"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "cases: {} ({catalog} faults of the catalog and the run without a fault)",
            catalog + 1
        )),
        "{text}"
    );
    assert!(text.contains("failed: 0"), "{text}");
    assert!(text.contains("incomplete: 0"), "{text}");
    let summary = text
        .lines()
        .find_map(|l| l.strip_prefix("lost without a witness (predicted): "))
        .expect("the loss summary");
    // Every case line's predicted loss adds up to the summary.
    let per_case: u64 = text
        .lines()
        .filter_map(|l| l.split("(without a witness: ").nth(1))
        .map(|rest| rest.trim_end_matches(')').parse::<u64>().unwrap())
        .sum();
    assert!(
        summary.starts_with(&format!("{per_case} acknowledged write(s) in ")),
        "{summary} vs {per_case}"
    );
}
