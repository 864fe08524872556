//! `hitless lab faults`: one `hitless lab issu` per fault, each in a process of its own (a
//! fresh lab each time), summed up in one table: what an operator wants to know of every
//! fault before trusting a pair with it.

use std::path::Path;
use std::process::Command;

use anyhow::Context;
use serde_json::Value;

use crate::LabFaultsArgs;

/// The faults run by default: every kind, at the step where a fault hurts most (the new
/// version in control, the peer's old-version standby the only way back), and where a kind
/// cannot happen there, at a step where it can (an abort only before the primary switch; after
/// it the agent refuses an abort and asks for a rollback).
pub const DEFAULT_FAULTS: [&str; 17] = [
    "crash-active@primary-mixed",
    "crash-new@primary-mixed",
    "start-fail@primary-start-new",
    "crash-standby@primary-mixed",
    "standby-out-of-sync@primary-mixed",
    "heartbeat-lost@primary-mixed",
    "appliance-lost-primary@primary-mixed",
    "appliance-lost-secondary@primary-mixed",
    "timeout@primary-sync-new",
    "abort@primary-sync-new",
    "rollback@primary-mixed",
    "partition-peers@primary-mixed",
    "isolate-primary@primary-mixed",
    "isolate-secondary@primary-mixed",
    "one-way-primary@primary-mixed",
    "isolate-witness@primary-mixed",
    "pause-agent@primary-mixed",
];

/// One row of the table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FaultRow {
    pub fault: String,
    pub result: String,
    pub acked_writes: u64,
    pub acked_lost: u64,
    pub client_errors: u64,
    pub outage_ms: Option<f64>,
    pub max_gap_ms: f64,
    pub in_control: String,
    pub address_holders: Option<Vec<String>>,
    /// Why the run gave no report, if it gave none.
    pub error: Option<String>,
}

/// `hitless lab faults`.
pub fn faults(args: &LabFaultsArgs) -> anyhow::Result<()> {
    let list: Vec<String> = if args.fault.is_empty() {
        DEFAULT_FAULTS.iter().map(|s| (*s).to_owned()).collect()
    } else {
        args.fault.clone()
    };
    // Refused before anything runs, not after an hour of runs.
    for f in &list {
        super::parse_fault(f)?;
    }
    let exe = std::env::current_exe().context("cannot locate the hitless executable")?;
    let mut rows = Vec::new();
    for (n, f) in list.iter().enumerate() {
        if !args.json {
            eprintln!("[{}/{}] {f}...", n + 1, list.len());
        }
        let mut cmd = Command::new(&exe);
        cmd.args(["lab", "issu", "--json", "--fault", f, "--dir"])
            .arg(&args.dir)
            .args(["--backend", &args.backend.to_string()]);
        if let Some(h) = args.hosts {
            cmd.args(["--hosts", &h.to_string()]);
        }
        if let Some(w) = args.witness {
            cmd.args(["--witness", &w.to_string()]);
        }
        let out = cmd
            .output()
            .with_context(|| format!("running the lab for {f}"))?;
        rows.push(row(f, &out.stdout, &out.stderr));
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print_table(&rows, &args.dir);
    }
    let failed = rows
        .iter()
        .filter(|r| r.error.is_some() || r.result == "unfinished")
        .count();
    if failed > 0 {
        anyhow::bail!("{failed} of {} fault runs did not finish", rows.len());
    }
    Ok(())
}

fn row(fault: &str, stdout: &[u8], stderr: &[u8]) -> FaultRow {
    let mut r = FaultRow {
        fault: fault.to_owned(),
        result: "no report".into(),
        acked_writes: 0,
        acked_lost: 0,
        client_errors: 0,
        outage_ms: None,
        max_gap_ms: 0.0,
        in_control: String::new(),
        address_holders: None,
        error: None,
    };
    let v: Value = match serde_json::from_slice(stdout) {
        Ok(v) => v,
        Err(_) => {
            let text = String::from_utf8_lossy(stderr);
            r.error = Some(
                text.lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("no output")
                    .to_owned(),
            );
            return r;
        }
    };
    r.result = v["result"].as_str().unwrap_or_default().to_owned();
    r.acked_writes = v["acked_writes"].as_u64().unwrap_or(0);
    r.acked_lost = v["acked_lost"].as_u64().unwrap_or(0);
    r.client_errors = v["client_errors"].as_u64().unwrap_or(0);
    r.outage_ms = v["failover_ms"].as_f64();
    r.max_gap_ms = v["max_gap_ms"].as_f64().unwrap_or(0.0);
    r.in_control = format!(
        "{} {}",
        v["final_control"]["appliance"].as_str().unwrap_or("-"),
        v["final_control"]["version"].as_str().unwrap_or("")
    );
    r.address_holders = v["address_holders"].as_array().map(|a| {
        a.iter()
            .filter_map(|x| x.as_str().map(str::to_owned))
            .collect()
    });
    r
}

fn print_table(rows: &[FaultRow], dir: &Path) {
    println!(
        "| fault | result | acked writes | lost | client errors | outage (ms) | longest gap (ms) | in control after | address on |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        if let Some(e) = &r.error {
            println!("| {} | no report: {e} | | | | | | | |", r.fault);
            continue;
        }
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.0} | {} | {} |",
            r.fault,
            r.result.replace('_', " "),
            r.acked_writes,
            r.acked_lost,
            r.client_errors,
            r.outage_ms.map_or("-".into(), |o| format!("{o:.0}")),
            r.max_gap_ms,
            r.in_control,
            match &r.address_holders {
                None => "(one host)".to_owned(),
                Some(h) if h.is_empty() => "nobody".to_owned(),
                Some(h) => h.join(" + "),
            }
        );
    }
    println!("(each run's logs: {})", dir.display());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_default_fault_is_in_the_catalog_and_every_kind_is_covered() {
        for f in DEFAULT_FAULTS {
            super::super::parse_fault(f).unwrap_or_else(|e| panic!("{f}: {e:#}"));
        }
        for kind in hitless_core::sim::FaultKind::ALL {
            assert!(
                DEFAULT_FAULTS
                    .iter()
                    .any(|f| f.starts_with(&format!("{}@", kind.name()))),
                "{} is not run by default",
                kind.name()
            );
        }
    }

    #[test]
    fn a_run_without_a_report_keeps_its_last_error_line() {
        let r = row(
            "crash-active@primary-mixed",
            b"",
            b"first\nerror: the lab did not come up\n\n",
        );
        assert_eq!(r.error.as_deref(), Some("error: the lab did not come up"));
        let report = br#"{"result":"committed","acked_writes":5,"acked_lost":0,"client_errors":1,
            "failover_ms":12.5,"max_gap_ms":20.0,"final_control":{"appliance":"primary","version":"2.0.0"},
            "address_holders":["primary"]}"#;
        let r = row("crash-active@primary-mixed", report, b"");
        assert_eq!(r.result, "committed");
        assert_eq!(r.outage_ms, Some(12.5));
        assert_eq!(r.address_holders, Some(vec!["primary".to_owned()]));
        assert!(r.error.is_none());
    }
}
