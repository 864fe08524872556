//! The report of `hitless lab issu`, as JSON and for people.

use std::collections::BTreeMap;

use serde::Serialize;

/// The report of `hitless lab issu`.
#[derive(Debug, Clone, Serialize)]
pub struct IssuReport {
    pub result: String,
    pub from_version: String,
    pub to_version: String,
    pub backend: String,
    pub fault: Option<String>,
    pub fault_injected: bool,
    pub final_control: FinalControl,
    pub acked_writes: u64,
    pub acked_lost: u64,
    pub client_errors: u64,
    pub max_gap_ms: f64,
    /// When the longest gap ended, in seconds since the ISSU started.
    pub max_gap_at_s: f64,
    pub failover_ms: Option<f64>,
    pub switchovers: u64,
    pub issu_seconds: f64,
    /// Most instances running at once during the ISSU (both appliances).
    pub peak_instances: u64,
    /// Kernel releases reported by VM guests.
    pub guest_kernels: Vec<String>,
    pub benchmark: BenchSummary,
    pub outcome_detail: String,
    pub timeline: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FinalControl {
    pub appliance: String,
    pub version: String,
    pub epoch: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct BenchSummary {
    pub tool: String,
    pub tests: BTreeMap<String, f64>,
    pub errors: u64,
}

pub(super) fn print_report(r: &IssuReport) {
    println!();
    println!(
        "hitless lab issu: {} ({} backend)",
        r.result.replace('_', " "),
        r.backend
    );
    println!(
        "  upgrade            {} -> {}",
        r.from_version, r.to_version
    );
    if let Some(f) = &r.fault {
        println!("  fault              {f} (injected: {})", r.fault_injected);
    }
    println!("  outcome            {}", r.outcome_detail);
    println!(
        "  in control now     {} appliance, version {}, epoch {}",
        r.final_control.appliance, r.final_control.version, r.final_control.epoch
    );
    println!(
        "  acknowledged writes {} verified, {} lost",
        r.acked_writes, r.acked_lost
    );
    println!("  client errors      {}", r.client_errors);
    println!(
        "  longest ack gap    {:.1} ms (ending {:.3} s into the ISSU)",
        r.max_gap_ms, r.max_gap_at_s
    );
    if let Some(f) = r.failover_ms {
        println!(
            "  outage at fault    {f:.1} ms (longest gap between acknowledged writes around it)"
        );
    }
    println!("  control moves      {}", r.switchovers);
    println!("  ISSU duration      {:.2} s", r.issu_seconds);
    println!("  peak instances     {}", r.peak_instances);
    if !r.guest_kernels.is_empty() {
        println!("  guest kernels      {}", r.guest_kernels.join(", "));
    }
    if !r.benchmark.tests.is_empty() {
        let tests: Vec<String> = r
            .benchmark
            .tests
            .iter()
            .map(|(k, v)| format!("{k} {v:.0}/s"))
            .collect();
        println!("  redis-benchmark    {}", tests.join(", "));
    }
}
