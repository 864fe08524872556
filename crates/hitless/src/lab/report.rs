//! The report of `hitless lab issu`, as JSON and for people.

use std::collections::BTreeMap;

use hitless_core::ControlEpoch;
use serde::Serialize;

/// The report of `hitless lab issu`.
#[derive(Debug, Clone, Serialize)]
pub struct IssuReport {
    /// `committed`, `rolled_back`, or `unfinished` (the ISSU needs the operator, or did not
    /// end within its bound: `outcome_detail` says why).
    pub result: String,
    pub from_version: String,
    pub to_version: String,
    pub backend: String,
    /// The client protocol of the service contract (`resp`, `opaque`).
    pub protocol: String,
    /// Where the appliances ran: `netns` (a host each) or `loopback`.
    pub hosts: String,
    /// The appliances whose interface held the service address at the end (two hosts only):
    /// exactly one once the pair has converged.
    pub address_holders: Option<Vec<String>>,
    /// The pair's witness (`none`, `builtin`, `etcd`) and where it ran.
    pub witness: super::WitnessKind,
    pub witness_endpoint: Option<String>,
    /// What the run risks (without a witness, a partition can lose acknowledged writes).
    pub warning: Option<String>,
    pub fault: Option<String>,
    pub fault_injected: bool,
    pub final_control: FinalControl,
    /// Keys the service held when the ISSU started (DBSIZE), the loaded state included.
    pub state_keys: u64,
    /// Bytes of the loaded keys and values.
    pub state_bytes: u64,
    /// Keys loaded (`key:0` ... `key:<state_loaded_keys - 1>`) and their value size.
    pub state_loaded_keys: u64,
    pub value_size: u64,
    /// Time to load the state through the service address, and its rate.
    pub load_s: f64,
    pub load_keys_per_s: f64,
    /// Keys the service held after the ISSU (DBSIZE).
    pub state_keys_after: u64,
    /// Loaded keys read back after the ISSU (all of them, or a random sample), values
    /// compared, and how many of those were missing or held another value.
    pub state_checked: u64,
    pub state_lost: u64,
    pub acked_writes: u64,
    pub acked_lost: u64,
    /// Why the writes could not be read back after an unfinished ISSU (they then count as
    /// lost).
    pub verify_error: Option<String>,
    pub client_errors: u64,
    /// The checking client's first errors (at most 10), as it saw them.
    pub client_error_samples: Vec<String>,
    pub max_gap_ms: f64,
    /// The outside writers' longest gap in steady state before the ISSU, under the same
    /// client load, over `steady_window_s`.
    pub steady_max_gap_ms: f64,
    pub steady_window_s: f64,
    /// When the longest gap ended, in seconds since the ISSU started.
    pub max_gap_at_s: f64,
    pub failover_ms: Option<f64>,
    pub switchovers: u64,
    pub issu_seconds: f64,
    /// Most instances running at once during the ISSU (both appliances).
    pub peak_instances: u64,
    /// Kernel releases reported by VM guests.
    pub guest_kernels: Vec<String>,
    /// Every instance seen during the ISSU, with its memory.
    pub instances: Vec<InstanceFigures>,
    /// Each new standby of the ISSU: how long its start and its sync (bulk) took.
    pub standby_syncs: Vec<StandbySync>,
    /// Each step's duration.
    pub steps: Vec<StepTime>,
    /// How often instances were sampled (the resolution of their times).
    pub sample_interval_ms: u64,
    pub benchmark: BenchSummary,
    pub outcome_detail: String,
    pub timeline: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FinalControl {
    pub appliance: String,
    pub version: String,
    pub epoch: ControlEpoch,
}

/// One instance as sampled during the ISSU.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceFigures {
    pub instance: String,
    pub appliance: String,
    pub version: String,
    /// The service process (process backend) or the QEMU process (QEMU backend).
    pub pid: Option<u32>,
    /// Highest resident set of that process (VmHWM), at the last sample taken while it ran.
    pub peak_rss_bytes: Option<u64>,
    /// Resident set (VmRSS) at that sample.
    pub rss_bytes: Option<u64>,
    /// Resident set at the first sample: for an instance running when the ISSU started, its
    /// steady state with the state loaded (what the peak is compared with).
    pub first_rss_bytes: Option<u64>,
    /// When the sampler first saw it, in seconds since the ISSU started.
    pub first_seen_s: f64,
}

/// How long each step of the ISSU took (from its progress line to the next one).
#[derive(Debug, Clone, Serialize)]
pub struct StepTime {
    pub step: String,
    pub ms: f64,
}

/// One new standby brought to sufficient state during the ISSU: started, attached, bulk
/// transfer, live stream caught up, digest verified.
#[derive(Debug, Clone, Serialize)]
pub struct StandbySync {
    /// The step that waits for it to be ready.
    pub step: String,
    pub what: String,
    /// The step that started it (the `*-upgrade-old` steps stop the old instance first).
    pub start_ms: Option<f64>,
    /// From its start confirmed to ready: the attach and bulk transfer.
    pub sync_ms: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct BenchSummary {
    pub tool: String,
    /// Parallel connections (`-c`).
    pub clients: u64,
    pub tests: BTreeMap<String, f64>,
    pub errors: u64,
}

pub(super) fn print_report(r: &IssuReport) {
    println!();
    println!(
        "hitless lab issu: {} ({} backend, {} protocol, {} hosts)",
        r.result.replace('_', " "),
        r.backend,
        r.protocol,
        r.hosts
    );
    println!(
        "  upgrade            {} -> {}",
        r.from_version, r.to_version
    );
    println!(
        "  witness            {}{}",
        r.witness,
        r.witness_endpoint
            .as_ref()
            .map(|e| format!(" at {e}"))
            .unwrap_or_default()
    );
    if let Some(w) = &r.warning {
        println!("  WARNING            {w}");
    }
    if let Some(f) = &r.fault {
        println!("  fault              {f} (injected: {})", r.fault_injected);
    }
    println!("  outcome            {}", r.outcome_detail);
    println!(
        "  in control now     {} appliance, version {}, epoch {}",
        r.final_control.appliance, r.final_control.version, r.final_control.epoch.0
    );
    println!(
        "  acknowledged writes {} verified, {} lost",
        r.acked_writes, r.acked_lost
    );
    if let Some(e) = &r.verify_error {
        println!("  NOT READ BACK      {e}");
    }
    println!("  client errors      {}", r.client_errors);
    println!(
        "  state              {} keys at the start ({} loaded, {} of keys and values of {} bytes, in {:.1} s: {:.0} keys/s); {} after",
        r.state_keys,
        r.state_loaded_keys,
        human_bytes(r.state_bytes),
        r.value_size,
        r.load_s,
        r.load_keys_per_s,
        r.state_keys_after
    );
    println!(
        "  loaded keys read back {} (values compared), {} lost",
        r.state_checked, r.state_lost
    );
    println!(
        "  longest ack gap    {:.1} ms (ending {:.3} s into the ISSU); {:.1} ms in {:.0} s of steady state before it under the same load ({:.1}x)",
        r.max_gap_ms,
        r.max_gap_at_s,
        r.steady_max_gap_ms,
        r.steady_window_s,
        r.max_gap_ms / r.steady_max_gap_ms.max(0.001)
    );
    if let Some(f) = r.failover_ms {
        println!(
            "  outage at fault    {f:.1} ms (longest gap between acknowledged writes around it)"
        );
    }
    println!("  control moves      {}", r.switchovers);
    if let Some(h) = &r.address_holders {
        println!(
            "  service address    held by {}{}",
            if h.is_empty() {
                "no appliance".to_owned()
            } else {
                h.join(" and ")
            },
            if h.len() == 1 {
                ""
            } else {
                " (NOT exactly one)"
            }
        );
    }
    println!("  ISSU duration      {:.2} s", r.issu_seconds);
    println!("  peak instances     {}", r.peak_instances);
    if !r.guest_kernels.is_empty() {
        println!("  guest kernels      {}", r.guest_kernels.join(", "));
    }
    if !r.instances.is_empty() {
        println!(
            "  instances          (sampled every {} ms)",
            r.sample_interval_ms
        );
        // The instances running when the ISSU started: seen in the first sample.
        let first_sample = r
            .instances
            .iter()
            .map(|i| i.first_seen_s)
            .fold(f64::INFINITY, f64::min);
        for i in &r.instances {
            let ratio = match (i.peak_rss_bytes, i.first_rss_bytes) {
                (Some(p), Some(f)) if f > 0 && i.first_seen_s <= first_sample + 1e-3 => {
                    format!(
                        " ({:.2}x its {} at the start)",
                        p as f64 / f as f64,
                        human_bytes(f)
                    )
                }
                _ => String::new(),
            };
            println!(
                "    {:<4} {:<9} {:<6} peak RSS {:>10}{ratio}",
                i.instance,
                i.appliance,
                i.version,
                i.peak_rss_bytes
                    .map(human_bytes)
                    .unwrap_or_else(|| "-".into()),
            );
        }
    }
    if !r.standby_syncs.is_empty() {
        println!("  standby syncs      (start, then attach + bulk transfer to ready)");
        for s in &r.standby_syncs {
            println!(
                "    {:<20} {:>8} + {:>6.0} ms  {}",
                s.step,
                s.start_ms
                    .map(|v| format!("{v:.0} ms"))
                    .unwrap_or_else(|| "-".into()),
                s.sync_ms,
                s.what
            );
        }
    }
    if !r.benchmark.tests.is_empty() {
        let tests: Vec<String> = r
            .benchmark
            .tests
            .iter()
            .map(|(k, v)| format!("{k} {v:.0}/s"))
            .collect();
        println!(
            "  redis-benchmark    -c {}: {}",
            r.benchmark.clients,
            tests.join(", ")
        );
    }
}

fn human_bytes(b: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    if b as f64 >= 1024.0 * MIB {
        format!("{:.2} GiB", b as f64 / (1024.0 * MIB))
    } else {
        format!("{:.1} MiB", b as f64 / MIB)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_control_writes_its_epoch_as_a_plain_number() {
        let f = FinalControl {
            appliance: "secondary".into(),
            version: "2.0.0".into(),
            epoch: ControlEpoch(2),
        };
        assert_eq!(
            serde_json::to_string(&f).unwrap(),
            r#"{"appliance":"secondary","version":"2.0.0","epoch":2}"#
        );
    }
}
