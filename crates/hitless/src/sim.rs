//! `hitless sim issu`: the ISSU engine against a simulated pair.

use anyhow::{bail, Context};
use comfy_table::{presets::UTF8_FULL, Table};
use hitless_core::engine::EngineConfig;
use hitless_core::sim::{self, FaultSpec, SimOptions, SimReport, SimResult};

/// Runs the simulated ISSU (optionally with a `KIND@STEP` fault) and prints its timeline as a
/// table, or one JSON object with `json`; with `list_faults`, prints every accepted fault one
/// per line. Fails on bad input, when an invariant was violated, or when acknowledged writes
/// were lost beyond what the fault is predicted to lose without a witness; not on a rollback.
pub fn run(fault: Option<String>, json: bool, list_faults: bool) -> anyhow::Result<()> {
    if list_faults {
        for f in sim::fault_catalog() {
            println!("{f}");
        }
        return Ok(());
    }
    let spec = match fault.as_deref() {
        Some(text) => {
            Some(FaultSpec::parse(text).with_context(|| format!("invalid --fault {text:?}"))?)
        }
        None => None,
    };
    let report = sim::run(spec.as_ref());
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    if let Some(problem) = problem(&report) {
        bail!("{problem}");
    }
    Ok(())
}

/// What makes a run fail, if anything: an invariant violation (including an unpredicted loss
/// or a pair that did not converge after a heal), or a lost acknowledged write that the
/// fault's prediction does not cover.
fn problem(report: &SimReport) -> Option<String> {
    if report.invariant_violations > 0 {
        return Some(format!(
            "{} invariant violation(s): {}",
            report.invariant_violations,
            report
                .violations
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    let unpredicted = report
        .acked_lost
        .saturating_sub(report.lost_without_witness);
    if unpredicted > 0 {
        return Some(format!("{unpredicted} acknowledged write(s) lost"));
    }
    if report.fault.is_some() && !report.fault_fired {
        return Some("the fault never fired".to_string());
    }
    None
}

/// Runs every case of the fault catalog (and the run without a fault), prints one line per
/// case (or one JSON array of reports with `json`) and a summary; fails if any case failed.
/// With `witness` the engine decides through a (simulated) witness, and the summary also
/// counts the losses of the same cases without one.
pub fn run_all_with(json: bool, witness: bool) -> anyhow::Result<()> {
    let opts = |witness| {
        let base = SimOptions::default();
        SimOptions {
            config: EngineConfig {
                witness,
                ..base.config.clone()
            },
            ..base
        }
    };
    let cases: Vec<Option<FaultSpec>> = std::iter::once(None)
        .chain(sim::fault_catalog().into_iter().map(Some))
        .collect();
    let reports: Vec<SimReport> = cases
        .iter()
        .map(|f| sim::run_fault(f.as_ref(), &opts(witness)))
        .collect();
    let without: Option<Vec<SimReport>> = witness.then(|| {
        cases
            .iter()
            .map(|f| sim::run_fault(f.as_ref(), &opts(false)))
            .collect()
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    }
    let mut failed = Vec::new();
    let (mut committed, mut rolled_back, mut incomplete) = (0, 0, 0);
    let (mut lossy, mut lost) = (0, 0);
    for r in &reports {
        match r.result {
            SimResult::Committed => committed += 1,
            SimResult::RolledBack => rolled_back += 1,
            SimResult::Incomplete => incomplete += 1,
        }
        if r.lost_without_witness > 0 {
            lossy += 1;
            lost += r.lost_without_witness;
        }
        let case = r.fault.as_deref().unwrap_or("none");
        let verdict = problem(r);
        if !json {
            println!(
                "{case}: {}; acknowledged {}, lost {} (without a witness: {}){}",
                r.result,
                r.acked,
                r.acked_lost,
                r.lost_without_witness,
                verdict
                    .as_deref()
                    .map(|p| format!("; FAILED: {p}"))
                    .unwrap_or_default()
            );
        }
        if let Some(p) = verdict {
            failed.push(format!("{case}: {p}"));
        }
    }
    let summary = [
        format!(
            "cases: {} ({} faults of the catalog and the run without a fault)",
            reports.len(),
            reports.len() - 1
        ),
        format!("committed: {committed}, rolled back: {rolled_back}, incomplete: {incomplete}"),
        format!(
            "lost without a witness (predicted): {lost} acknowledged write(s) in {lossy} case(s)"
        ),
        format!("failed: {}", failed.len()),
    ];
    let lost_in = |rs: &[SimReport]| {
        let lossy = rs.iter().filter(|r| r.acked_lost > 0).count();
        (rs.iter().map(|r| r.acked_lost).sum::<u64>(), lossy)
    };
    let summary: Vec<String> = match &without {
        Some(without) => {
            let (n, c) = lost_in(without);
            let (wn, wc) = lost_in(&reports);
            let mut s = summary.to_vec();
            s.insert(
                s.len() - 1,
                format!(
                    "lost acknowledged writes: without a witness {n} in {c} case(s); with the witness {wn} in {wc} case(s)"
                ),
            );
            s
        }
        None => summary.to_vec(),
    };
    for line in summary {
        if json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }
    if !failed.is_empty() {
        bail!("{} case(s) failed: {}", failed.len(), failed.join("; "));
    }
    Ok(())
}

fn print_table(r: &SimReport) {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL);
    t.set_header(vec![
        "tick",
        "step",
        "in control",
        "version",
        "epoch",
        "primary",
        "secondary",
        "event",
    ]);
    for s in &r.steps {
        t.add_row(vec![
            s.tick.to_string(),
            s.step.clone(),
            s.in_control.clone(),
            s.control_version.clone(),
            s.epoch.0.to_string(),
            s.primary.join("\n"),
            s.secondary.join("\n"),
            s.note.clone(),
        ]);
    }
    println!("{t}");
    println!(
        "fault: {}{}",
        r.fault.as_deref().unwrap_or("none"),
        if r.fault.is_some() && !r.fault_fired {
            " (did not fire)"
        } else {
            ""
        }
    );
    println!(
        "result: {}{}",
        r.result,
        r.reason
            .as_deref()
            .map(|x| format!(" ({x})"))
            .unwrap_or_default()
    );
    println!(
        "final control: {} appliance, version {}, epoch {}",
        r.final_control.appliance, r.final_control.version, r.epoch.0
    );
    println!(
        "acknowledged writes: {} (lost: {}); final layout ok: {}; invariant violations: {}",
        r.acked, r.acked_lost, r.final_layout_ok, r.invariant_violations
    );
    if let Some(s) = &r.split {
        println!(
            "split: cut at tick {}, healed at tick {}; both agents drove for {} ticks; \
             the service address held by up to {} appliance(s); clients followed the other \
             side {}",
            s.cut_tick,
            s.heal_tick,
            s.split_ticks,
            s.address_holders_max,
            s.clients_moved_tick
                .map(|t| format!("at tick {t}"))
                .unwrap_or_else(|| "never".into())
        );
        println!(
            "after the heal: the {} agent drives; converged {}",
            s.survivor,
            s.converged_after_ticks
                .map(|t| format!("{t} ticks after the heal"))
                .unwrap_or_else(|| "never".into())
        );
        println!(
            "lost without a witness (predicted): {} of the {} write(s) the discarded side \
             acknowledged",
            r.lost_without_witness, s.discarded_acks
        );
    }
}
