//! `hitless lab check`: a lab of its own brought up, clients writing through the service
//! address, a seeded schedule of faults (and ISSUs during some of them) run against the pair,
//! every acknowledged write read back at the end, and the history judged: writes lost, the
//! longest outage, and whether two instances acknowledged at the same time.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hitless_core::sim::FaultKind;
use hitless_core::Outcome;
use serde::Serialize;

use super::history::{classify, read_back, ClientConfig, Clients, Outcome as WriteOutcome};
use super::schedule::{default_faults, parse_list, schedule, Fault, Round};
use super::verdict::{self, ReignSpan};
use super::witness::{self, WitnessKind};
use super::{
    in_clients, inject, pid_of, resume_agent, signal, spawn_agent, teardown, up_with, wait_pair,
    wait_pair_until, Heal, Hosts, Layout, NAMES, SIGKILL,
};
use crate::ops;
use crate::{ApiArgs, LabUpArgs};

/// `hitless lab check`'s flags.
#[derive(clap::Args, Debug, Clone)]
pub struct LabCheckArgs {
    #[command(flatten)]
    pub up: LabUpArgs,
    /// The schedule's seed: the same seed, rounds and faults give the same schedule.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Rounds of the schedule, one fault each.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub rounds: u32,
    /// The faults to pick from, comma-separated (default: every one the lab can inject):
    /// partition-peers, isolate-primary, isolate-secondary, one-way-primary, isolate-witness,
    /// kill-in-control, kill-agent-primary, kill-agent-secondary, pause-agent,
    /// restart-witness.
    #[arg(long)]
    pub faults: Option<String>,
    /// How long each fault is held before it is healed, in ms (each round adds up to a
    /// quarter more, seeded). The default outlasts what a cut-off instance in control waits
    /// before it acknowledges alone: its standby's link timeout (3 s) and the HA grace (1 s).
    #[arg(long, default_value_t = 6000, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub hold_ms: u64,
    /// Writing clients (threads in the client namespace).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub clients: u16,
    /// The service address's refresh announcement period in the check's lab, in ms
    /// (`[vip.announce] refresh_ms`; the agent's default is 10000). A holder cut off from its
    /// peer re-announces at this period and pulls clients back to it.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub announce_refresh_ms: u64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Keep the lab running after the report (tear it down with `hitless lab down`).
    #[arg(long)]
    pub keep: bool,
}

/// A write without its reply after this long is unknown.
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between two writes of a client.
const PACE: Duration = Duration::from_millis(5);
/// Most writes recorded (about 48 bytes each).
const RECORD_CAP: u64 = 4_000_000;
/// How long the pair has to converge after a fault ends (or an ISSU does).
const CONVERGE_BOUND: Duration = Duration::from_secs(30);
/// Bound of one ISSU started by the schedule.
const ISSU_BOUND: Duration = Duration::from_secs(120);
/// The clients write this long before the schedule starts and after it ends.
const SETTLE: Duration = Duration::from_millis(1000);

/// One ISSU started during a fault.
#[derive(Debug, Clone, Serialize)]
pub struct IssuRecord {
    pub round: usize,
    /// The image's version it went to.
    pub target: String,
    /// `committed`, `rolled_back`, `refused` (the agent would not start it) or `unfinished`.
    pub outcome: String,
    pub detail: String,
    pub start_ms: f64,
    /// The version in control once the pair converged after it.
    pub version_after: Option<String>,
}

/// One round as it ran.
#[derive(Debug, Clone, Serialize)]
pub struct RoundReport {
    pub round: usize,
    pub fault: Fault,
    /// What was done, and what ended it.
    pub injected: String,
    pub healed: String,
    /// When the fault was injected and healed, in ms since the clients started.
    pub start_ms: f64,
    pub end_ms: f64,
    /// Whether the pair converged (an instance in control, an in-sync HA standby on the other
    /// appliance) after the heal and after the round's ISSU, and when (ms since the heal).
    pub converged: bool,
    pub converged_after_ms: Option<f64>,
    pub issu: Option<IssuRecord>,
    /// Why the fault could not be injected or ended, if it could not.
    pub error: Option<String>,
}

/// The report of `hitless lab check`.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub seed: u64,
    pub rounds: u32,
    pub rounds_run: usize,
    pub faults: Vec<Fault>,
    pub hold_ms: u64,
    pub hosts: Hosts,
    pub witness: WitnessKind,
    pub witness_endpoint: Option<String>,
    pub warning: Option<String>,
    pub announce_refresh_ms: u64,
    pub clients: u16,
    /// Writes acknowledged, refused (`errors`) and of unknown outcome.
    pub acked: u64,
    pub errors: u64,
    pub unknown: u64,
    /// Acknowledged writes missing at the end.
    pub lost: u64,
    pub lost_samples: Vec<String>,
    /// Acknowledged appends found more than once.
    pub duplicated: u64,
    /// Why the writes could not be read back (they then all count as lost).
    pub readback_error: Option<String>,
    /// The longest time without any acknowledged write while the schedule ran.
    pub max_outage_ms: f64,
    /// When the longest outage began (the last acknowledgement before it), in ms since the
    /// clients started, and the round it began in (the last round started by then; none
    /// before the first).
    pub max_outage_at_ms: f64,
    pub max_outage_round: Option<usize>,
    /// The distinct control epochs the answering instances named.
    pub epochs: Vec<u64>,
    /// The time covered by two or more instances' acknowledging intervals (each instance at
    /// each epoch: from the reply of its first acknowledged write to the sending of its last);
    /// 0 when control never overlapped.
    pub in_control_overlap_ms: f64,
    /// Each instance-and-epoch that acknowledged writes.
    pub reigns: Vec<ReignSpan>,
    pub schedule: Vec<RoundReport>,
    pub issus: Vec<IssuRecord>,
    /// The schedule's window, in ms since the clients started.
    pub schedule_start_ms: f64,
    pub schedule_end_ms: f64,
    /// Whether the pair converged at the end, before the writes were read back.
    pub converged: bool,
    /// Whether the record cap stopped the clients early.
    pub truncated: bool,
}

/// The round running (or last started) at `at_ms`: none before the first.
fn outage_round(rounds: &[RoundReport], at_ms: f64) -> Option<usize> {
    rounds
        .iter()
        .take_while(|r| r.start_ms <= at_ms)
        .last()
        .map(|r| r.round)
}

impl CheckReport {
    /// Why the check failed, if it did.
    pub fn failure(&self) -> Option<String> {
        let mut why = Vec::new();
        if self.lost > 0 {
            why.push(format!("{} acknowledged writes were lost", self.lost));
        }
        if self.in_control_overlap_ms > 0.0 {
            why.push(format!(
                "two instances acknowledged writes at once for {:.0} ms",
                self.in_control_overlap_ms
            ));
        }
        if let Some(e) = &self.readback_error {
            why.push(format!("the writes could not be read back: {e}"));
        }
        if !self.converged {
            why.push("the pair did not converge at the end".into());
        }
        (!why.is_empty()).then(|| why.join("; "))
    }
}

/// `hitless lab check`.
pub fn check(args: &LabCheckArgs) -> anyhow::Result<()> {
    let hosts = args.up.hosts.unwrap_or_else(Hosts::default_here);
    let witness = args.up.witness;
    let faults = match &args.faults {
        Some(list) => parse_list(list)?,
        None => default_faults(hosts == Hosts::Netns, witness != WitnessKind::None),
    };
    for f in &faults {
        if f.needs_network() && hosts != Hosts::Netns {
            bail!(
                "{} needs the two-host lab (--hosts netns, as root)",
                f.name()
            );
        }
        if f.needs_witness() && witness == WitnessKind::None {
            bail!("{} needs a witness (--witness builtin or etcd)", f.name());
        }
    }
    let plan = schedule(args.seed, args.rounds, &faults, args.hold_ms);
    let dir = args.up.dir.clone();
    if !args.json {
        eprintln!(
            "bringing the lab up ({hosts} hosts, witness {witness}); {} rounds, seed {}",
            plan.len(),
            args.seed
        );
    }
    let result = run(args, hosts, &faults, &plan);
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
    if let Some(why) = report.failure() {
        bail!("{why}");
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn run(
    args: &LabCheckArgs,
    hosts: Hosts,
    faults: &[Fault],
    plan: &[Round],
) -> anyhow::Result<CheckReport> {
    let dir = &args.up.dir;
    let mut up = args.up.clone();
    up.hosts = Some(hosts);
    let (_, layout) = up_with(&up, Some(args.announce_refresh_ms))?;
    let service = layout.service_addr;
    let origin = Instant::now();
    let cfg = ClientConfig {
        clients: args.clients,
        reply_timeout: REPLY_TIMEOUT,
        pace: PACE,
        cap: RECORD_CAP,
    };
    let clients = in_clients(&layout, || Ok(Clients::start(service, cfg, origin)))?;
    std::thread::sleep(SETTLE);
    let schedule_start = origin.elapsed();
    let mut rounds = Vec::new();
    for (i, round) in plan.iter().enumerate() {
        if !args.json {
            eprintln!(
                "[{}/{}] {:>8.3} s  {} for {} ms{} ({} writes so far)",
                i + 1,
                plan.len(),
                origin.elapsed().as_secs_f64(),
                round.fault.name(),
                round.hold_ms,
                round
                    .issu_lead_ms
                    .map(|l| format!(", {l} ms into an ISSU"))
                    .unwrap_or_default(),
                clients.taken()
            );
        }
        let r = run_round(dir, &layout, i, round, origin);
        if !args.json {
            eprintln!(
                "          {} / {}; {}",
                r.injected,
                r.healed,
                match (r.converged, r.converged_after_ms) {
                    (true, Some(t)) => format!("converged {t:.0} ms after"),
                    _ => "DID NOT CONVERGE".to_owned(),
                }
            );
            if let Some(e) = &r.error {
                eprintln!("          error: {e}");
            }
            if let Some(u) = &r.issu {
                eprintln!(
                    "          ISSU to {}: {} ({})",
                    u.target, u.outcome, u.detail
                );
            }
        }
        let converged = r.converged;
        rounds.push(r);
        if !converged {
            break;
        }
    }
    let schedule_end = origin.elapsed();
    std::thread::sleep(SETTLE);
    let history = clients.finish();
    // Everything healed, every process running, the pair converged, before reading back.
    restore(dir, &layout);
    let converged = wait_pair(CONVERGE_BOUND).is_ok();
    let acked_records: Vec<_> = history
        .records
        .iter()
        .filter(|r| r.outcome == WriteOutcome::Acked)
        .copied()
        .collect();
    let (acked, errors, unknown) = verdict::counts(&history.records);
    let (lost, duplicated, lost_samples, readback_error) =
        match in_clients(&layout, || read_back(service, &acked_records)) {
            Ok(obs) => {
                let c = classify(&acked_records, &obs);
                (c.lost, c.duplicated, c.samples, None)
            }
            Err(e) => (acked, 0, Vec::new(), Some(format!("{e:#}"))),
        };
    let (witness, witness_endpoint) = witness::describe(dir);
    let issus = rounds.iter().filter_map(|r| r.issu.clone()).collect();
    let outage = verdict::longest_outage(
        &history.records,
        schedule_start.as_nanos() as u64,
        schedule_end.as_nanos() as u64,
    );
    Ok(CheckReport {
        seed: args.seed,
        rounds: args.rounds,
        rounds_run: rounds.len(),
        faults: faults.to_vec(),
        hold_ms: args.hold_ms,
        hosts,
        witness,
        witness_endpoint,
        warning: (witness == WitnessKind::None).then(|| witness::NO_WITNESS_WARNING.to_owned()),
        announce_refresh_ms: args.announce_refresh_ms,
        clients: args.clients,
        acked,
        errors,
        unknown,
        lost,
        lost_samples,
        duplicated,
        readback_error,
        max_outage_ms: outage.0 as f64 / 1e6,
        max_outage_at_ms: outage.1 as f64 / 1e6,
        max_outage_round: outage_round(&rounds, outage.1 as f64 / 1e6),
        epochs: verdict::epochs(&history),
        in_control_overlap_ms: verdict::in_control_overlap_ns(&history) as f64 / 1e6,
        reigns: verdict::reign_spans(&history),
        schedule: rounds,
        issus,
        schedule_start_ms: ms(schedule_start),
        schedule_end_ms: ms(schedule_end),
        converged,
        truncated: history.truncated,
    })
}

/// What ends a fault of the schedule.
enum Ending {
    /// Nothing: the pair recovers by itself (an instance killed).
    Nothing,
    Heal(Heal),
    /// The killed agent is started again on its configuration and journal.
    StartAgent(usize),
    /// The killed witness is started again on its data.
    StartWitness,
}

fn inject_fault(dir: &Path, layout: &Layout, fault: Fault) -> anyhow::Result<(String, Ending)> {
    Ok(match fault {
        Fault::Partition(p) => {
            hitless_netlab::partition(layout.require_topology()?, p)?;
            (
                format!("nftables partition {}", p.name()),
                Ending::Heal(Heal::Network),
            )
        }
        Fault::KillInControl => {
            let (what, _) = inject(dir, FaultKind::CrashActive)?;
            (what, Ending::Nothing)
        }
        Fault::PauseAgent => {
            let (what, heal) = inject(dir, FaultKind::PauseAgent)?;
            (
                what,
                heal.map(Ending::Heal)
                    .context("a paused agent has a resume")?,
            )
        }
        Fault::KillAgent(i) => {
            let pid = pid_of(dir, i).context("no agent pid")?;
            signal(pid, SIGKILL);
            (
                format!("kill -9 of the {} agent (pid {pid})", NAMES[i]),
                Ending::StartAgent(i),
            )
        }
        Fault::RestartWitness => {
            let pid = witness::kill(dir).context("the witness is not running")?;
            (
                format!("kill -9 of the witness (pid {pid})"),
                Ending::StartWitness,
            )
        }
    })
}

fn end_fault(dir: &Path, ending: Ending) -> anyhow::Result<String> {
    match ending {
        Ending::Nothing => Ok("nothing to end".into()),
        Ending::Heal(h) => super::heal(dir, h),
        Ending::StartAgent(i) => {
            let pid = spawn_agent(dir, i)?;
            Ok(format!("the {} agent started again (pid {pid})", NAMES[i]))
        }
        Ending::StartWitness => {
            let pid = witness::start_again(dir)?;
            Ok(format!("the witness started again on its data (pid {pid})"))
        }
    }
}

fn run_round(
    dir: &Path,
    layout: &Layout,
    index: usize,
    round: &Round,
    origin: Instant,
) -> RoundReport {
    let issu = round.issu_lead_ms.map(|lead| {
        let dir: PathBuf = dir.to_owned();
        let t = std::thread::spawn(move || run_issu(&dir, index + 1, ms(origin.elapsed())));
        std::thread::sleep(Duration::from_millis(lead));
        t
    });
    let start = origin.elapsed();
    let mut report = RoundReport {
        round: index + 1,
        fault: round.fault,
        injected: String::new(),
        healed: String::new(),
        start_ms: ms(start),
        end_ms: ms(start),
        converged: false,
        converged_after_ms: None,
        issu: None,
        error: None,
    };
    let ending = match inject_fault(dir, layout, round.fault) {
        Ok((what, ending)) => {
            report.injected = what;
            Some(ending)
        }
        Err(e) => {
            report.injected = "not injected".into();
            report.error = Some(format!("{e:#}"));
            None
        }
    };
    let hold = Duration::from_millis(round.hold_ms);
    std::thread::sleep(hold.saturating_sub(origin.elapsed() - start));
    if let Some(ending) = ending {
        match end_fault(dir, ending) {
            Ok(what) => report.healed = what,
            Err(e) => {
                report.healed = "not ended".into();
                report.error = Some(format!("{e:#}"));
            }
        }
    }
    let end = origin.elapsed();
    report.end_ms = ms(end);
    let mut converged = wait_ha(CONVERGE_BOUND).is_ok();
    if let Some(t) = issu {
        report.issu = Some(t.join().unwrap_or_else(|_| IssuRecord {
            round: index + 1,
            target: String::new(),
            outcome: "unfinished".into(),
            detail: "the ISSU's thread panicked".into(),
            start_ms: report.end_ms,
            version_after: None,
        }));
        let after = wait_ha(CONVERGE_BOUND);
        if let (Some(u), Ok(s)) = (report.issu.as_mut(), &after) {
            u.version_after = s
                .engine
                .as_ref()
                .and_then(|e| e.control_version.as_ref())
                .map(ToString::to_string);
        }
        converged = after.is_ok();
    }
    report.converged = converged;
    report.converged_after_ms = converged.then(|| ms(origin.elapsed() - end));
    report
}

/// Waits (within `bound`) until the pair could survive the loss of either appliance again: an
/// instance in control and an in-sync HA standby on the *other* appliance. The next round
/// begins only then, so that each fault meets a pair that can fail over (a standby on the
/// same appliance, or none, would make the next fault an outage by construction).
fn wait_ha(bound: Duration) -> anyhow::Result<hitless_agent::api::StatusAnswer> {
    wait_pair_until(bound, "an in-sync HA standby on the other appliance", |e| {
        let control = e
            .instances
            .iter()
            .find(|r| Some(r.id) == e.in_control)
            .map(|r| r.appliance);
        control.is_some()
            && e.instances.iter().any(|r| {
                r.role == hitless_core::Role::HaStandby
                    && r.state == hitless_core::InstanceState::Ready
                    && Some(r.appliance) != control
            })
    })
}

/// Starts an ISSU to the other image (v2 from v1, v1 from v2) and follows it to its end
/// (bounded); an ISSU refused or rolled back is an outcome, not a failure of the check.
fn run_issu(dir: &Path, round: usize, start_ms: f64) -> IssuRecord {
    let mut rec = IssuRecord {
        round,
        target: String::new(),
        outcome: "refused".into(),
        detail: String::new(),
        start_ms,
        version_after: None,
    };
    let (api, status) = match ops::driving_status(&ApiArgs { api: None }) {
        Ok(x) => x,
        Err(e) => {
            rec.detail = format!("no agent to ask: {e:#}");
            return rec;
        }
    };
    let on_v1 = status
        .engine
        .as_ref()
        .and_then(|e| e.control_version.as_ref())
        .is_none_or(|v| v.to_string().starts_with("1."));
    rec.target = if on_v1 { "2.0.0" } else { "1.0.0" }.to_owned();
    let image = dir.join("images").join(format!("kvd-{}", rec.target));
    let since = ops::get::<Vec<hitless_agent::driver::ProgressLine>>(&api, "/v1/progress")
        .ok()
        .and_then(|l| l.last().map(|l| l.seq + 1))
        .unwrap_or(0);
    if let Err(e) = ops::post(&api, "/v1/upgrade", serde_json::json!({ "image": image })) {
        rec.detail = format!("{e:#}");
        return rec;
    }
    // A split that heals may hand the pair to the other agent's engine: a driver that needs
    // the operator while cut off is not the last word at once.
    let patience = Duration::from_secs(15);
    match ops::follow_with(&api, since, ISSU_BOUND, true, patience, |_| {}) {
        Ok(end) => match end.outcome {
            Outcome::Committed { version } if version.to_string() != rec.target => {
                // The end of an earlier ISSU, read from another driver's history.
                rec.outcome = "unfinished".into();
                rec.detail = format!("its end was not seen (the driver reported an earlier ISSU committed on {version})");
            }
            Outcome::Committed { version } => {
                rec.outcome = "committed".into();
                rec.detail = format!("all instances on {version}");
            }
            Outcome::RolledBack { version, reason } => {
                rec.outcome = "rolled_back".into();
                rec.detail = format!("back on {version}: {reason}");
            }
        },
        Err(e) => {
            rec.outcome = "unfinished".into();
            rec.detail = format!("{e:#}");
        }
    }
    rec
}

/// Ends whatever a round may have left: the partition, a paused or dead agent, a dead
/// witness.
fn restore(dir: &Path, layout: &Layout) {
    if let Some(t) = &layout.topology {
        if let Err(e) = hitless_netlab::heal(t) {
            eprintln!("healing the network: {e:#}");
        }
    }
    for (i, name) in NAMES.iter().enumerate() {
        match pid_of(dir, i) {
            Some(pid) if super::alive(pid) => resume_agent(pid),
            _ => {
                if let Err(e) = spawn_agent(dir, i) {
                    eprintln!("starting the {name} agent again: {e:#}");
                }
            }
        }
    }
    if witness::load(dir).ok().flatten().is_some() && witness::running_pid(dir).is_none() {
        if let Err(e) = witness::start_again(dir) {
            eprintln!("starting the witness again: {e:#}");
        }
    }
}

fn print_report(r: &CheckReport) {
    println!();
    println!(
        "hitless lab check: seed {}, {} of {} rounds, {} hosts, witness {}{}",
        r.seed,
        r.rounds_run,
        r.rounds,
        r.hosts,
        r.witness,
        r.witness_endpoint
            .as_ref()
            .map(|e| format!(" at {e}"))
            .unwrap_or_default()
    );
    if let Some(w) = &r.warning {
        println!("  WARNING: {w}");
    }
    println!("| round | fault | held (ms) | ISSU | converged after (ms) |");
    println!("|---|---|---|---|---|");
    for x in &r.schedule {
        println!(
            "| {} | {}{} | {:.0} | {} | {} |",
            x.round,
            x.fault.name(),
            x.error
                .as_ref()
                .map(|e| format!(" (error: {e})"))
                .unwrap_or_default(),
            x.end_ms - x.start_ms,
            x.issu
                .as_ref()
                .map(|u| format!("to {}: {}", u.target, u.outcome))
                .unwrap_or_else(|| "-".into()),
            x.converged_after_ms
                .map(|t| format!("{t:.0}"))
                .unwrap_or_else(|| "NOT CONVERGED".into())
        );
    }
    println!();
    println!(
        "| acked | lost | errors | unknown | max outage (ms) | in-control overlap (ms) | epochs |"
    );
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {} | {} | {:.0} | {:.0} | {} |",
        r.acked,
        r.lost,
        r.errors,
        r.unknown,
        r.max_outage_ms,
        r.in_control_overlap_ms,
        r.epochs
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    );
    if r.max_outage_ms > 0.0 {
        println!(
            "  longest outage: from {:.0} ms, in round {}",
            r.max_outage_at_ms,
            r.max_outage_round
                .map_or_else(|| "none (before the first)".to_owned(), |n| n.to_string())
        );
    }
    for s in &r.lost_samples {
        println!("  LOST: {s}");
    }
    if let Some(e) = &r.readback_error {
        println!("  NOT READ BACK: {e}");
    }
    if r.truncated {
        println!("  (the clients stopped early: the record cap was reached)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> CheckReport {
        CheckReport {
            seed: 1,
            rounds: 1,
            rounds_run: 1,
            faults: vec![],
            hold_ms: 3000,
            hosts: Hosts::Netns,
            witness: WitnessKind::None,
            witness_endpoint: None,
            warning: None,
            announce_refresh_ms: 1000,
            clients: 8,
            acked: 10,
            errors: 0,
            unknown: 0,
            lost: 0,
            lost_samples: vec![],
            duplicated: 0,
            readback_error: None,
            max_outage_ms: 0.0,
            max_outage_at_ms: 0.0,
            max_outage_round: None,
            epochs: vec![],
            in_control_overlap_ms: 0.0,
            reigns: vec![],
            schedule: vec![],
            issus: vec![],
            schedule_start_ms: 0.0,
            schedule_end_ms: 0.0,
            converged: true,
            truncated: false,
        }
    }

    #[test]
    fn the_check_fails_on_a_loss_an_overlap_an_unread_history_or_no_convergence() {
        assert_eq!(report().failure(), None);
        let lost = CheckReport {
            lost: 2,
            ..report()
        };
        assert!(lost.failure().unwrap().contains("2 acknowledged writes"));
        let overlap = CheckReport {
            in_control_overlap_ms: 12.0,
            ..report()
        };
        assert!(overlap.failure().unwrap().contains("at once"));
        let unread = CheckReport {
            readback_error: Some("refused".into()),
            ..report()
        };
        assert!(unread.failure().is_some());
        let stuck = CheckReport {
            converged: false,
            ..report()
        };
        assert!(stuck.failure().is_some());
    }

    #[test]
    fn the_longest_outage_is_placed_in_the_round_last_started_before_it() {
        let round = |n: usize, start_ms: f64| RoundReport {
            round: n,
            fault: Fault::KillInControl,
            injected: String::new(),
            healed: String::new(),
            start_ms,
            end_ms: start_ms + 6000.0,
            converged: true,
            converged_after_ms: None,
            issu: None,
            error: None,
        };
        let rounds = [round(1, 1000.0), round(2, 9000.0), round(3, 17000.0)];
        assert_eq!(outage_round(&rounds, 500.0), None);
        assert_eq!(outage_round(&rounds, 1000.0), Some(1));
        // After round 2's heal and before round 3: still round 2's doing.
        assert_eq!(outage_round(&rounds, 16000.0), Some(2));
        assert_eq!(outage_round(&rounds, 99000.0), Some(3));
    }

    #[test]
    fn the_json_report_names_the_fields_the_lab_promises() {
        let v = serde_json::to_value(CheckReport {
            faults: vec![Fault::KillInControl],
            ..report()
        })
        .unwrap();
        for field in [
            "seed",
            "rounds",
            "witness",
            "acked",
            "lost",
            "errors",
            "unknown",
            "max_outage_ms",
            "max_outage_at_ms",
            "max_outage_round",
            "epochs",
            "in_control_overlap_ms",
            "schedule",
            "issus",
        ] {
            assert!(v.get(field).is_some(), "{field} missing");
        }
        assert_eq!(v["witness"], "none");
        assert_eq!(v["faults"][0], "kill-in-control");
    }
}
