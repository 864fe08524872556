//! `hitless lab issu`: the lab brought up, loaded, upgraded under client load, verified and
//! reported.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::bail;
use hitless_core::{Outcome, Report};

use super::bench::{require_redis_tools, Benchmark};
use super::checker::{verify, Checker};
use super::report::{print_report, FinalControl, IssuReport};
use super::sampler::Sampler;
use super::{
    backend_name, inject, parse_fault, spawn_agent, stop_agents, up_inner, NAMES, SERVICE_ADDR,
};
use crate::ops;
use crate::{ApiArgs, Backend, LabIssuArgs};

/// `hitless lab issu`.
pub fn issu(args: &LabIssuArgs) -> anyhow::Result<()> {
    require_redis_tools()?;
    let fault = args.fault.as_deref().map(parse_fault).transpose()?;
    let dir = args.up.dir.clone();
    if !args.json {
        eprintln!(
            "bringing the lab up ({} backend)...",
            backend_name(args.up.backend)
        );
    }
    let result = run_issu(args, fault.as_ref());
    if !args.keep {
        stop_agents(&dir);
    }
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    if report.acked_lost > 0 {
        bail!("{} acknowledged writes were lost", report.acked_lost);
    }
    Ok(())
}

fn run_issu(args: &LabIssuArgs, fault: Option<&(String, String)>) -> anyhow::Result<IssuReport> {
    let dir = &args.up.dir;
    let up_started = Instant::now();
    let before = up_inner(&args.up)?;
    if !args.json {
        eprintln!("lab up in {:.1} s", up_started.elapsed().as_secs_f64());
    }
    let service: SocketAddr = SERVICE_ADDR.parse()?;
    let checker = Checker::start(service, 2);
    let requests = match args.up.backend {
        Backend::Process => 1000,
        Backend::Qemu => 100,
    };
    let bench = Benchmark::start(dir, service, requests)?;
    std::thread::sleep(Duration::from_millis(500));
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
    let sampler = Sampler::start();
    let issu_start = Instant::now();
    let issu_offset_s = checker.stats.origin.elapsed().as_secs_f64();
    ops::post(&api, "/v1/upgrade", serde_json::json!({ "image": target }))?;
    let mut injected = false;
    let mut timeline = Vec::new();
    let mut fault_error = None;
    let mut restart: Option<std::thread::JoinHandle<String>> = None;
    let bound = match args.up.backend {
        Backend::Process => Duration::from_secs(300),
        Backend::Qemu => Duration::from_secs(1800),
    };
    let end = ops::follow(&api, since, bound, true, |l| {
        let line = format!(
            "{:>7.3} s  {}",
            issu_start.elapsed().as_secs_f64(),
            ops::describe(l)
        );
        if !args.json {
            eprintln!("{line}");
        }
        timeline.push(line);
        if let (Some((kind, step)), false) = (fault, injected) {
            if let Report::Step { step: s, .. } = &l.report {
                if s.name() == step {
                    injected = true;
                    // Let the step get under way before a failure; an operator command goes in
                    // at once (the step may be over in less than that on processes).
                    if kind != "abort" && kind != "rollback" {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    checker.stats.mark_ns.store(
                        checker.stats.origin.elapsed().as_nanos() as u64,
                        Ordering::Release,
                    );
                    match inject(dir, kind) {
                        Ok(what) => {
                            let line = format!(
                                "{:>7.3} s  fault: {what}",
                                issu_start.elapsed().as_secs_f64()
                            );
                            if !args.json {
                                eprintln!("{line}");
                            }
                            timeline.push(line);
                            if kind.starts_with("appliance-lost") {
                                // The agent is restarted a moment later, on the same
                                // configuration and journal; it rejoins the pair.
                                let i = usize::from(kind.ends_with("secondary"));
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
    if let Some(line) = restart.take().and_then(|t| t.join().ok()) {
        if !args.json {
            eprintln!("{line}");
        }
        timeline.push(line);
    }
    checker.stats.measuring.store(false, Ordering::Release);
    let (peak_instances, guest_kernels) = sampler.finish();
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
    let end = end?;
    if let Some(e) = fault_error {
        bail!("the fault could not be injected: {e}");
    }
    let (lost, samples) = verify(service, &acked)?;
    for s in &samples {
        eprintln!("LOST: {s}");
    }
    for s in stats.error_samples.lock().expect("samples").iter() {
        eprintln!("client error: {s}");
    }
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
    let (result, detail, to_version) = match &end.outcome {
        Outcome::Committed { version } => (
            "committed",
            format!("all instances on {version}"),
            version.to_string(),
        ),
        Outcome::RolledBack { version, reason } => ("rolled_back", reason.clone(), {
            let _ = version;
            "2.0.0".to_owned()
        }),
    };
    let outage = stats.max_gap_after_mark_ns.load(Ordering::Acquire);
    let failover_ms = (injected && outage > 0).then(|| outage as f64 / 1e6);
    Ok(IssuReport {
        result: result.into(),
        from_version,
        to_version,
        backend: backend_name(args.up.backend).into(),
        fault: args.fault.clone(),
        fault_injected: injected,
        final_control: FinalControl {
            appliance: control.map(|c| c.appliance.to_string()).unwrap_or_default(),
            version: control.map(|c| c.version.to_string()).unwrap_or_default(),
            epoch: engine.epoch.0,
        },
        acked_writes: acked.len() as u64,
        acked_lost: lost,
        client_errors: errors_during + bench_summary.errors,
        max_gap_ms: stats.max_gap_ns.load(Ordering::Acquire) as f64 / 1e6,
        max_gap_at_s: (stats.max_gap_end_ns.load(Ordering::Acquire) as f64 / 1e9 - issu_offset_s)
            .max(0.0),
        failover_ms,
        switchovers: end.switchovers,
        issu_seconds,
        peak_instances,
        guest_kernels,
        benchmark: bench_summary,
        outcome_detail: detail,
        timeline,
    })
}
