//! `hitless sim issu`: the ISSU engine against a simulated pair.

use anyhow::{bail, Context};
use comfy_table::{presets::UTF8_FULL, Table};
use hitless_core::sim::{self, FaultSpec, SimReport};

/// Runs the simulated ISSU (optionally with a `KIND@STEP` fault) and prints its timeline as a
/// table, or one JSON object with `json`; with `list_faults`, prints every accepted fault one
/// per line. Fails on bad input or when an invariant was violated, not on a rollback.
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
    if report.invariant_violations > 0 {
        bail!(
            "{} invariant violation(s): {}",
            report.invariant_violations,
            report
                .violations
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    if report.acked_lost > 0 {
        bail!("{} acknowledged write(s) lost", report.acked_lost);
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
}
