//! `hitless lab issu`: the lab brought up, loaded, upgraded under client load, verified and
//! reported.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hitless_core::sim::{FaultKind, FaultSpec};
use hitless_core::{Outcome, Report};

use super::bench::{require_redis_tools, Benchmark};
use super::checker::{verify, Checker};
use super::load;
use super::report::{print_report, FinalControl, IssuReport, StandbySync, StepTime};
use super::sampler::{Sampler, INTERVAL as SAMPLE_INTERVAL};
use super::{
    address_holders, appliance_index, heal, in_clients, inject, parse_fault, spawn_agent, teardown,
    up_inner, FAULT_HOLD, NAMES,
};
use crate::ops;
use crate::{ApiArgs, Backend, LabIssuArgs};

/// `hitless lab issu`.
pub fn issu(args: &LabIssuArgs) -> anyhow::Result<()> {
    require_redis_tools()?;
    let fault = args.fault.as_deref().map(parse_fault).transpose()?;
    let dir = args.up.dir.clone();
    if !args.json {
        eprintln!("bringing the lab up ({} backend)...", args.up.backend);
    }
    let result = run_issu(args, fault.as_ref());
    if !args.keep {
        if let Err(e) = teardown(&dir) {
            eprintln!("tearing the lab down: {e:#}");
        }
    }
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    if let Some(e) = &report.verify_error {
        bail!(
            "the ISSU did not finish ({}) and the writes could not be read back: {e}",
            report.outcome_detail
        );
    }
    if report.result == "unfinished" {
        bail!("the ISSU did not finish: {}", report.outcome_detail);
    }
    if report.acked_lost > 0 {
        bail!("{} acknowledged writes were lost", report.acked_lost);
    }
    if report.state_lost > 0 {
        bail!(
            "{} of {} loaded keys read back were lost",
            report.state_lost,
            report.state_checked
        );
    }
    Ok(())
}

fn run_issu(args: &LabIssuArgs, fault: Option<&FaultSpec>) -> anyhow::Result<IssuReport> {
    let dir = &args.up.dir;
    let up_started = Instant::now();
    let mut up = args.up.clone();
    up.instance_memory_mib = Some(
        up.instance_memory_mib
            .unwrap_or_else(|| super::instance_memory_for(args.keys, args.value_size, up.backend)),
    );
    let (before, layout) = up_inner(&up)?;
    if !args.json {
        eprintln!(
            "lab up in {:.1} s ({} hosts)",
            up_started.elapsed().as_secs_f64(),
            layout.hosts
        );
    }
    let service: SocketAddr = layout.service_addr;
    let value_size = usize::try_from(args.value_size)?;
    if !args.json {
        eprintln!(
            "loading {} keys of {value_size} bytes through the service address...",
            args.keys
        );
    }
    // The clients (the loader, the checking client, redis-benchmark) run in the client
    // namespace of a two-host lab and reach the pair only through the service address.
    let loaded = in_clients(&layout, || load::load(service, args.keys, value_size))
        .with_context(|| format!("loading the state; the pair now: {}", pair_summary()))?;
    let state_keys = in_clients(&layout, || load::dbsize(service))?;
    // A reply later than this is a client error (the client reconnects): longer than any
    // failover of the backend, HA grace included.
    let reply_timeout = match args.up.backend {
        Backend::Process => Duration::from_secs(3),
        Backend::Qemu => Duration::from_secs(15),
    };
    let checker = in_clients(&layout, || Ok(Checker::start(service, 2, reply_timeout)))?;
    // Requests per test of a benchmark pass: enough that every connection keeps sending for
    // a while (with -n at or below -c, each connection sends once and a pass is mostly
    // connection set-up).
    let per_client = args.clients.saturating_mul(20);
    let requests = match args.up.backend {
        Backend::Process => per_client.max(1000),
        Backend::Qemu => 100,
    };
    let bench = in_clients(&layout, || {
        Benchmark::start(dir, service, args.clients, requests)
    })?;
    std::thread::sleep(Duration::from_millis(500));
    // The outside writers' longest gap in steady state, under the same load, to compare the
    // ISSU's with (measured in the same run: this machine is noisy).
    let steady_window = match args.up.backend {
        Backend::Process => Duration::from_secs(3),
        Backend::Qemu => Duration::from_secs(10),
    };
    checker.stats.steady.store(true, Ordering::Release);
    std::thread::sleep(steady_window);
    checker.stats.steady.store(false, Ordering::Release);
    let from_version = before
        .engine
        .as_ref()
        .and_then(|e| e.control_version)
        .map(|v| v.to_string())
        .unwrap_or_default();
    let target = dir.join("images").join("kvd-2.0.0");
    let (api, _) = ops::driving_status(&ApiArgs { api: None })?;
    let since = ops::get::<Vec<hitless_agent::driver::ProgressLine>>(&api, "/v1/progress")?
        .last()
        .map(|l| l.seq + 1)
        .unwrap_or(0);
    checker.stats.measuring.store(true, Ordering::Release);
    let issu_start = Instant::now();
    let sampler = Sampler::start(issu_start);
    let issu_offset_s = checker.stats.origin.elapsed().as_secs_f64();
    ops::post(&api, "/v1/upgrade", serde_json::json!({ "image": target }))?;
    let mut injected = false;
    let mut timeline = Vec::new();
    // Each step's progress line and the end, with the driver's clock (ms since the epoch).
    let mut marks: Vec<(String, u64)> = Vec::new();
    let mut moves = 0u64;
    let mut fault_error = None;
    let mut restart: Option<std::thread::JoinHandle<String>> = None;
    let mut healed: Option<std::thread::JoinHandle<String>> = None;
    let bound = match args.up.backend {
        Backend::Process => Duration::from_secs(300),
        Backend::Qemu => Duration::from_secs(1800),
    };
    // A split that heals may hand the pair to the other agent's engine: a driver that needs
    // the operator while cut off is not the last word until the fault has ended.
    let patience = match fault.map(|f| f.kind) {
        Some(k) if k.is_split() => FAULT_HOLD + Duration::from_secs(10),
        _ => Duration::ZERO,
    };
    let end = ops::follow_with(&api, since, bound, true, patience, |l| {
        match &l.report {
            Report::Step { step, .. } => marks.push((step.name().to_owned(), l.at_unix_ms)),
            Report::Finished(_) => marks.push(("end".to_owned(), l.at_unix_ms)),
            Report::ControlMoved { .. } => moves += 1,
            _ => {}
        }
        let line = format!(
            "{:>7.3} s  {}",
            issu_start.elapsed().as_secs_f64(),
            ops::describe(l)
        );
        if !args.json {
            eprintln!("{line}");
        }
        timeline.push(line);
        if let (Some(&FaultSpec { kind, step }), false) = (fault, injected) {
            if let Report::Step { step: s, .. } = &l.report {
                if *s == step {
                    injected = true;
                    // Let the step get under way before a failure; an operator command goes in
                    // at once (the step may be over in less than that on processes).
                    if !matches!(kind, FaultKind::Abort | FaultKind::Rollback) {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    checker.stats.mark_ns.store(
                        checker.stats.origin.elapsed().as_nanos() as u64,
                        Ordering::Release,
                    );
                    match inject(dir, kind) {
                        Ok((what, ends)) => {
                            if let Some(h) = ends {
                                let d = dir.clone();
                                healed = Some(std::thread::spawn(move || {
                                    std::thread::sleep(FAULT_HOLD);
                                    let at = issu_start.elapsed().as_secs_f64();
                                    match heal(&d, h) {
                                        Ok(what) => format!("{at:>7.3} s  {what}"),
                                        Err(e) => {
                                            format!("{at:>7.3} s  could not end the fault: {e:#}")
                                        }
                                    }
                                }));
                            }
                            let line = format!(
                                "{:>7.3} s  fault: {what}",
                                issu_start.elapsed().as_secs_f64()
                            );
                            if !args.json {
                                eprintln!("{line}");
                            }
                            timeline.push(line);
                            if matches!(
                                kind,
                                FaultKind::ApplianceLostPrimary | FaultKind::ApplianceLostSecondary
                            ) {
                                // The agent is restarted a moment later, on the same
                                // configuration and journal; it rejoins the pair.
                                let i = appliance_index(kind);
                                let d = dir.clone();
                                restart = Some(std::thread::spawn(move || {
                                    std::thread::sleep(Duration::from_millis(1500));
                                    let at = issu_start.elapsed().as_secs_f64();
                                    match spawn_agent(&d, i) {
                                        Ok(pid) => format!(
                                            "{at:>7.3} s  the {} agent restarted (pid {pid}) on its configuration and journal",
                                            NAMES[i]
                                        ),
                                        Err(e) => format!(
                                            "{at:>7.3} s  the {} agent could not be restarted: {e:#}",
                                            NAMES[i]
                                        ),
                                    }
                                }));
                            }
                        }
                        Err(e) => fault_error = Some(format!("{e:#}")),
                    }
                }
            }
        }
    });
    let issu_seconds = issu_start.elapsed().as_secs_f64();
    for t in [restart.take(), healed.take()].into_iter().flatten() {
        if let Ok(line) = t.join() {
            if !args.json {
                eprintln!("{line}");
            }
            timeline.push(line);
        }
    }
    // After a heal the pair converges: one appliance holds the service address.
    let holders = settle_address(&layout);
    checker.stats.close();
    let sampled = sampler.finish();
    // Let the load run a moment on the final instance in control.
    std::thread::sleep(Duration::from_millis(300));
    let errors_during = checker.stats.errors.load(Ordering::Relaxed);
    let bench_summary = bench.finish();
    let acked = {
        let stats = checker.stats.clone();
        let acked = checker.finish();
        (acked, stats)
    };
    let (acked, stats) = acked;
    if let Some(e) = fault_error {
        bail!("the fault could not be injected: {e}");
    }
    let client_error_samples = stats.error_samples.lock().expect("samples").clone();
    for s in &client_error_samples {
        eprintln!("client error: {s}");
    }
    // Every acknowledged write and the loaded state read back. When the ISSU did not finish
    // (it needs the operator: no instance may be in control), the report still comes out,
    // with what could not be read back counted as lost.
    let verified = in_clients(&layout, || {
        verify(service, &acked).and_then(|(lost, samples)| {
            let state = load::check(service, loaded.keys, value_size)?;
            Ok((lost, samples, state, load::dbsize(service)?))
        })
    });
    let (lost, state, state_keys_after, verify_error) = match verified {
        Ok((lost, samples, state, after)) => {
            for s in &samples {
                eprintln!("LOST: {s}");
            }
            for s in &state.samples {
                eprintln!("LOADED KEY LOST: {s}");
            }
            (lost, state, after, None)
        }
        Err(e) if end.is_err() => {
            let unread = load::StateCheck {
                checked: 0,
                missing: loaded.keys.min(load::SAMPLE_KEYS as u64),
                samples: Vec::new(),
            };
            (acked.len() as u64, unread, 0, Some(format!("{e:#}")))
        }
        Err(e) => return Err(e),
    };
    let (_, after) = ops::driving_status(&ApiArgs { api: None })?;
    let engine = after.engine.clone().unwrap_or_else(|| {
        before
            .engine
            .clone()
            .expect("engine status before the ISSU")
    });
    let control = engine
        .in_control
        .and_then(|id| engine.instances.iter().find(|r| r.id == id));
    let (result, detail, to_version) = match end.as_ref().map(|e| &e.outcome) {
        Ok(Outcome::Committed { version }) => (
            "committed",
            format!("all instances on {version}"),
            version.to_string(),
        ),
        Ok(Outcome::RolledBack { version, reason }) => ("rolled_back", reason.clone(), {
            let _ = version;
            "2.0.0".to_owned()
        }),
        Err(e) => ("unfinished", format!("{e:#}"), "2.0.0".to_owned()),
    };
    let (witness, witness_endpoint) = super::witness::describe(dir);
    let outage = stats.max_gap_after_mark_ns.load(Ordering::Acquire);
    let failover_ms = (injected && outage > 0).then(|| outage as f64 / 1e6);
    Ok(IssuReport {
        result: result.into(),
        from_version,
        to_version,
        backend: args.up.backend.to_string(),
        protocol: args.up.protocol.to_string(),
        hosts: layout.hosts.to_string(),
        address_holders: holders,
        witness,
        witness_endpoint,
        warning: (witness == super::WitnessKind::None)
            .then(|| super::witness::NO_WITNESS_WARNING.to_owned()),
        fault: args.fault.clone(),
        fault_injected: injected,
        final_control: FinalControl {
            appliance: control.map(|c| c.appliance.to_string()).unwrap_or_default(),
            version: control.map(|c| c.version.to_string()).unwrap_or_default(),
            epoch: engine.epoch,
        },
        state_keys,
        state_bytes: loaded.bytes,
        state_loaded_keys: loaded.keys,
        value_size: args.value_size,
        load_s: loaded.seconds,
        load_keys_per_s: loaded.keys as f64 / loaded.seconds.max(1e-9),
        state_keys_after,
        state_checked: state.checked,
        state_lost: state.missing,
        acked_writes: acked.len() as u64,
        acked_lost: lost,
        verify_error,
        client_errors: errors_during + bench_summary.errors,
        client_error_samples,
        max_gap_ms: stats.max_gap_ns.load(Ordering::Acquire) as f64 / 1e6,
        steady_max_gap_ms: stats.steady_max_gap_ns.load(Ordering::Acquire) as f64 / 1e6,
        steady_window_s: steady_window.as_secs_f64(),
        max_gap_at_s: (stats.max_gap_end_ns.load(Ordering::Acquire) as f64 / 1e9 - issu_offset_s)
            .max(0.0),
        failover_ms,
        switchovers: end.as_ref().map_or(moves, |e| e.switchovers),
        issu_seconds,
        standby_syncs: standby_syncs(&marks),
        steps: step_times(&marks),
        peak_instances: sampled.peak_instances,
        guest_kernels: sampled.guest_kernels,
        instances: sampled.instances,
        sample_interval_ms: SAMPLE_INTERVAL.as_millis() as u64,
        benchmark: bench_summary,
        outcome_detail: detail,
        timeline,
    })
}

/// The appliances holding the service address once the pair has settled (two-host lab):
/// waits up to 1 s for exactly one.
fn settle_address(layout: &super::Layout) -> Option<Vec<String>> {
    let start = Instant::now();
    loop {
        let holders = address_holders(layout)?;
        if holders.len() == 1 || start.elapsed() > Duration::from_secs(1) {
            return Some(holders);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The pair in one line (phase, instance in control, every instance's state and role), to
/// explain a failure.
fn pair_summary() -> String {
    match ops::driving_status(&ApiArgs { api: None }) {
        Ok((_, st)) => match st.engine {
            Some(e) => {
                let rows: Vec<String> = e
                    .instances
                    .iter()
                    .map(|r| {
                        format!(
                            "{} {} {} {:?}/{:?}",
                            r.id, r.appliance, r.version, r.state, r.role
                        )
                    })
                    .collect();
                format!(
                    "phase {}, in control {}, instances [{}]{}",
                    e.phase,
                    e.in_control.map(|i| i.to_string()).unwrap_or("none".into()),
                    rows.join(", "),
                    e.stuck
                        .map(|s| format!(", needs the operator: {}", s.reason))
                        .unwrap_or_default()
                )
            }
            None => "no agent drives".into(),
        },
        Err(e) => format!("no status ({e:#})"),
    }
}

/// Each step's duration: from its progress line to the next step's (or the end's).
fn step_times(marks: &[(String, u64)]) -> Vec<StepTime> {
    marks
        .windows(2)
        .filter(|w| w[0].0 != "end")
        .map(|w| StepTime {
            step: w[0].0.clone(),
            ms: w[1].1.saturating_sub(w[0].1) as f64,
        })
        .collect()
}

/// The steps that start a new standby and the steps that wait until it is ready.
const STANDBY_STEPS: [(&str, &str, &str); 5] = [
    (
        "start-extras",
        "sync-extras",
        "a second instance of the running version on each appliance (both at once)",
    ),
    (
        "primary-start-new",
        "primary-sync-new",
        "the target version on the primary appliance",
    ),
    (
        "primary-upgrade-old",
        "primary-sync-old",
        "the target version replacing the old instance on the primary appliance",
    ),
    (
        "secondary-start-new",
        "secondary-sync-new",
        "the target version on the secondary appliance",
    ),
    (
        "secondary-upgrade-old",
        "secondary-sync-old",
        "the target version replacing the old instance on the secondary appliance",
    ),
];

/// The start and sync times of each new standby, from the steps' durations (the first time
/// each step ran to its end).
fn standby_syncs(marks: &[(String, u64)]) -> Vec<StandbySync> {
    let times = step_times(marks);
    let first = |name: &str| times.iter().find(|t| t.step == name).map(|t| t.ms);
    STANDBY_STEPS
        .iter()
        .filter_map(|(start, sync, what)| {
            Some(StandbySync {
                step: (*sync).to_owned(),
                what: (*what).to_owned(),
                start_ms: first(start),
                sync_ms: first(sync)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_and_standby_times_come_from_consecutive_progress_lines() {
        let marks: Vec<(String, u64)> = [
            ("precheck", 1000),
            ("start-extras", 1010),
            ("sync-extras", 1030),
            ("primary-start-new", 1500),
            ("primary-sync-new", 1520),
            ("primary-switch", 3520),
            ("end", 3600),
        ]
        .iter()
        .map(|(s, t)| ((*s).to_owned(), *t))
        .collect();
        let steps = step_times(&marks);
        assert_eq!(steps.len(), 6);
        assert_eq!(steps[2].step, "sync-extras");
        assert_eq!(steps[2].ms, 470.0);
        assert_eq!(steps[5].ms, 80.0);
        let syncs = standby_syncs(&marks);
        assert_eq!(syncs.len(), 2, "{syncs:?}");
        assert_eq!(syncs[0].start_ms, Some(20.0));
        assert_eq!(syncs[0].sync_ms, 470.0);
        assert_eq!(syncs[1].step, "primary-sync-new");
        assert_eq!(syncs[1].sync_ms, 2000.0);
    }
}
