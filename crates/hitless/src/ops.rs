//! The agent daemon entry point and operator commands against a running agent's API.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use hitless_agent::api::StatusAnswer;
use hitless_agent::driver::ProgressLine;
use hitless_core::{Outcome, Report};

use crate::ApiArgs;

/// The API addresses of the lab's agents (primary first) that commands without `--api` ask,
/// and the lab's run directory (which holds its tokens file), once a lab command has read its
/// layout.
static LAB: std::sync::RwLock<Option<(Vec<String>, PathBuf)>> = std::sync::RwLock::new(None);

/// The tokens file named by `--token-file` or `HITLESS_TOKEN_FILE`, if any.
static TOKEN_FILE: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();

/// Makes commands without `--api` ask the agents of the lab in `dir`, laid out as `layout`.
pub fn use_lab(layout: &crate::lab::Layout, dir: &Path) {
    *LAB.write().unwrap_or_else(|e| e.into_inner()) = Some((
        layout.apis.iter().map(ToString::to_string).collect(),
        dir.to_owned(),
    ));
}

/// Makes every request to an agent present a token of `file` (`--token-file`).
pub fn use_token_file(file: Option<PathBuf>) {
    let _ = TOKEN_FILE.set(file);
}

/// The lab's API addresses and run directory: those of the lab a command works on, else those
/// of the lab in the default run directory.
fn lab() -> (Vec<String>, PathBuf) {
    if let Some(lab) = LAB.read().unwrap_or_else(|e| e.into_inner()).clone() {
        return lab;
    }
    let dir = Path::new(crate::lab::DEFAULT_DIR);
    let layout = crate::lab::Layout::load(dir).unwrap_or_else(|_| crate::lab::Layout::loopback());
    (
        layout.apis.iter().map(ToString::to_string).collect(),
        dir.to_owned(),
    )
}

/// The lab's API addresses (see [`lab`]).
pub fn lab_apis() -> Vec<String> {
    lab().0
}

/// The token to present to the agent at `api`: a lab command presents its lab's token to the
/// lab's agents; otherwise a token of the file `--token-file` or `HITLESS_TOKEN_FILE` names,
/// else, when `api` is an agent of the lab in the default run directory, one of that lab's
/// tokens file (if there is one); else none.
fn bearer(api: &str) -> anyhow::Result<Option<String>> {
    let commanded = LAB.read().unwrap_or_else(|e| e.into_inner()).clone();
    let given = TOKEN_FILE.get().cloned().flatten();
    let Some(file) = token_file_for(api, commanded, given, lab) else {
        return Ok(None);
    };
    // Read at every request: a lab brought up again in the same run directory (`lab faults`
    // runs one after another) has a new token in the same file.
    Ok(Some(hitless_agent::auth::Credential::load(&file)?.token))
}

/// The tokens file whose token goes to `api` (see [`bearer`]): `commanded` is the lab a lab
/// command works on, `given` the file `--token-file` names, `default_lab` the lab in the default
/// run directory (asked only when needed).
fn token_file_for(
    api: &str,
    commanded: Option<(Vec<String>, PathBuf)>,
    given: Option<PathBuf>,
    default_lab: impl FnOnce() -> (Vec<String>, PathBuf),
) -> Option<PathBuf> {
    let lab_file = |(apis, dir): (Vec<String>, PathBuf)| {
        let file = crate::lab::tokens_file(&dir);
        (apis.iter().any(|a| a == api) && file.exists()).then_some(file)
    };
    commanded
        .and_then(lab_file)
        .or(given)
        .or_else(|| lab_file(default_lab()))
}

/// `request` with the credential for `api` (see [`bearer`]).
fn authorized(api: &str, request: ureq::Request) -> anyhow::Result<ureq::Request> {
    Ok(match bearer(api)? {
        Some(token) => request.set("Authorization", &format!("Bearer {token}")),
        None => request,
    })
}

/// `hitless agent --config FILE`.
pub fn agent(config: &Path) -> anyhow::Result<()> {
    let config = hitless_agent::AgentConfig::load(config)?;
    hitless_agent::daemon::raise_priority();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(hitless_agent::run(config))?;
    Ok(())
}

fn agent_url(api: &str, path: &str) -> String {
    format!("http://{api}{path}")
}

fn api_error(e: ureq::Error) -> anyhow::Error {
    match e {
        ureq::Error::Status(code, resp) => {
            let body: serde_json::Value = resp.into_json().unwrap_or_default();
            let msg = body
                .get("error")
                .and_then(|m| m.as_str())
                .unwrap_or("no detail")
                .to_owned();
            let hint = match code {
                401 => "; give `hitless` a tokens file with --token-file or HITLESS_TOKEN_FILE",
                403 => "; use a token with the operator role",
                _ => "",
            };
            anyhow::anyhow!("the agent refused the request (HTTP {code}): {msg}{hint}")
        }
        ureq::Error::Transport(t) => anyhow::anyhow!("cannot reach the agent: {t}"),
    }
}

fn http() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(2))
        .timeout(Duration::from_secs(40))
        .build()
}

/// GET a JSON document.
pub fn get<T: serde::de::DeserializeOwned>(api: &str, path: &str) -> anyhow::Result<T> {
    let r = authorized(api, http().get(&agent_url(api, path)))?
        .call()
        .map_err(api_error)?;
    r.into_json()
        .with_context(|| format!("the agent at {api} sent an undecodable answer"))
}

/// POST a JSON body; returns the agent's `ok` message.
pub fn post(api: &str, path: &str, body: serde_json::Value) -> anyhow::Result<String> {
    let r = authorized(api, http().post(&agent_url(api, path)))?
        .send_json(body)
        .map_err(api_error)?;
    let v: serde_json::Value = r.into_json()?;
    Ok(v.get("ok")
        .and_then(|m| m.as_str())
        .unwrap_or_default()
        .to_owned())
}

/// The status of the agent that drives the pair: `--api` if given, else the lab's agents.
pub fn driving_status(api: &ApiArgs) -> anyhow::Result<(String, StatusAnswer)> {
    let candidates: Vec<String> = match &api.api {
        Some(a) => vec![a.clone()],
        None => lab_apis(),
    };
    let mut first: Option<(String, StatusAnswer)> = None;
    let mut errors = Vec::new();
    for a in candidates {
        match get::<StatusAnswer>(&a, "/v1/status") {
            Ok(s) if s.driving => return Ok((a, s)),
            Ok(s) => {
                first.get_or_insert((a, s));
            }
            Err(e) => errors.push(format!("{a}: {}", crate::error_text(&e))),
        }
    }
    first.ok_or_else(|| {
        anyhow::anyhow!(
            "no agent answered ({}); is the lab up (`hitless lab up`) or --api right?",
            errors.join("; ")
        )
    })
}

/// Prints a status as tables.
pub fn print_status(s: &StatusAnswer) {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(vec![
        "instance",
        "appliance",
        "version",
        "state",
        "role",
        "applied seq",
        "lag",
        "pid",
        "kernel",
        "backend",
    ]);
    let engine = s.engine.as_ref();
    let mut all = s.local.instances.clone();
    if let Some(p) = &s.peer {
        all.extend(p.instances.clone());
    }
    if let Some(e) = engine {
        for row in &e.instances {
            let live = all.iter().find(|x| x.instance == row.id);
            let applied = live.map(|_| String::new()).unwrap_or_default();
            t.add_row(vec![
                row.id.to_string(),
                row.appliance.to_string(),
                row.version.to_string(),
                format!("{:?}", row.state),
                format!("{:?}", row.role),
                applied,
                String::new(),
                live.and_then(|l| l.pid)
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
                live.and_then(|l| l.kernel_release.clone())
                    .unwrap_or_default(),
                live.map(|l| l.backend.clone()).unwrap_or_default(),
            ]);
        }
    }
    println!(
        "appliance answering: {} ({})",
        s.appliance,
        if s.driving { "driving" } else { "following" }
    );
    if let Some(e) = engine {
        println!(
            "phase: {}{}   epoch: {}   in control: {} ({})",
            e.phase,
            e.step
                .as_ref()
                .map(|st| format!(" / step {st}"))
                .unwrap_or_default(),
            e.epoch.0,
            e.in_control
                .map(|i| i.to_string())
                .unwrap_or_else(|| "none".into()),
            e.control_version.map(|v| v.to_string()).unwrap_or_default(),
        );
        if let Some(st) = &e.stuck {
            println!("NEEDS THE OPERATOR: {} -> run {}", st.reason, st.hint());
        }
        if let Some(w) = &e.witness {
            println!("witness record: {w}");
        }
    }
    if !s.witness.is_empty() {
        println!("witness: {}", s.witness);
    }
    println!("{t}");
    for (name, d) in [("local", Some(&s.local)), ("peer", s.peer.as_ref())] {
        if let Some(d) = d {
            println!(
                "front on {} ({name}): listening={} connections={} in-flight={} forwarded={} replayed={}",
                d.appliance.map(|a| a.to_string()).unwrap_or_default(),
                d.front.listening,
                d.front.connections,
                d.front.inflight,
                d.front.forwarded,
                d.front.replayed
            );
        }
    }
    if let Some(e) = &s.peer_error {
        println!("peer: {e}");
    }
}

/// `hitless status`.
pub fn status(api: &ApiArgs, json: bool) -> anyhow::Result<()> {
    let (_, s) = driving_status(api)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print_status(&s);
    }
    Ok(())
}

/// How an upgrade ended, as seen through the API.
#[derive(Debug, Clone)]
pub struct UpgradeEnd {
    pub outcome: Outcome,
    pub switchovers: u64,
}

/// Follows the progress of the running ISSU until it finishes (bounded), printing each line
/// when `print` is set and calling `on_line` for each. Commits automatically when the engine
/// waits for the operator's acceptance if `auto_commit`.
pub fn follow(
    api: &str,
    since: u64,
    bound: Duration,
    auto_commit: bool,
    on_line: impl FnMut(&ProgressLine),
) -> anyhow::Result<UpgradeEnd> {
    follow_with(api, since, bound, auto_commit, Duration::ZERO, on_line)
}

/// [`follow`], and when the engine says it needs the operator, keeps watching for `patience`
/// in case another agent takes over driving (a split that heals: the driver that was cut off
/// steps down, and the other's engine carries on).
pub fn follow_with(
    api: &str,
    since: u64,
    bound: Duration,
    auto_commit: bool,
    patience: Duration,
    mut on_line: impl FnMut(&ProgressLine),
) -> anyhow::Result<UpgradeEnd> {
    let start = Instant::now();
    let mut next = since;
    // Lines below this were printed before the ISSU began (the driver's own history).
    let mut floor = since;
    let mut switchovers = 0;
    let mut api = api.to_owned();
    let mut committed = false;
    let mut stuck: Option<(Instant, anyhow::Error)> = None;
    let mut last_check = Instant::now();
    while start.elapsed() < bound {
        if let Some((at, _)) = &stuck {
            if at.elapsed() >= patience {
                let (_, e) = stuck.take().expect("stuck");
                return Err(e);
            }
        }
        // The agent followed may have stopped driving while it still answers (it stepped
        // down to a driver at a higher epoch): follow the one that drives.
        let check_driver = stuck.is_some() || last_check.elapsed() > Duration::from_millis(500);
        let batch: Option<Vec<ProgressLine>> = if check_driver {
            last_check = Instant::now();
            match get::<StatusAnswer>(&api, "/v1/status") {
                Ok(st) if st.driving => get(&api, &format!("/v1/progress?since={next}")).ok(),
                _ => None,
            }
        } else {
            get(&api, &format!("/v1/progress?since={next}")).ok()
        };
        let Some(batch) = batch else {
            // The driving agent may have changed (its appliance was lost, or it stepped down).
            if let Ok((a, st)) = driving_status(&ApiArgs { api: None }) {
                if a != api && st.driving {
                    api = a;
                    next = 0;
                    floor = 0;
                    stuck = None;
                    // The new driver does not repeat the step it resumed at.
                    let at_commit = st
                        .engine
                        .as_ref()
                        .and_then(|e| e.step.as_deref())
                        .is_some_and(|s| s == "await-commit");
                    if auto_commit && !committed && at_commit {
                        match post(&api, "/v1/commit", serde_json::json!({})) {
                            Ok(_) => committed = true,
                            Err(e) => tracing::warn!("commit not accepted: {e:#}"),
                        }
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        for l in batch {
            next = l.seq + 1;
            on_line(&l);
            match &l.report {
                Report::ControlMoved { .. } => switchovers += 1,
                Report::Step { step, .. }
                    if auto_commit && !committed && step.name() == "await-commit" =>
                {
                    // Refused when a fault started a rollback meanwhile: the progress says what
                    // happens next.
                    match post(&api, "/v1/commit", serde_json::json!({})) {
                        Ok(_) => committed = true,
                        Err(e) => tracing::warn!("commit not accepted: {e:#}"),
                    }
                }
                Report::Stuck(s) if floor <= l.seq => {
                    let e = anyhow::anyhow!(
                        "the ISSU needs the operator: {} (resume with {}; `hitless status` shows the pair)",
                        s.reason,
                        s.hint()
                    );
                    stuck.get_or_insert((Instant::now(), e));
                }
                Report::Finished(o) if floor <= l.seq => {
                    return Ok(UpgradeEnd {
                        outcome: o.clone(),
                        switchovers,
                    });
                }
                Report::Step { step, .. } if !auto_commit && step.name() == "await-commit" => {
                    bail!("waiting for the operator's commit");
                }
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Some((_, e)) = stuck {
        return Err(e);
    }
    bail!("the upgrade did not finish within {bound:?}; see `hitless status`")
}

/// Describes a progress line in one sentence.
pub fn describe(l: &ProgressLine) -> String {
    match &l.report {
        Report::Accepted { request } => format!("accepted: {request}"),
        Report::Rejected { request, reason } => format!("rejected: {request}: {reason}"),
        Report::Step { step, detail } => format!(
            "step {}{}: {detail}",
            step.name(),
            step.procedure_step()
                .map(|p| format!(" (procedure step {p})"))
                .unwrap_or_default()
        ),
        Report::Stuck(s) => format!(
            "needs the operator: {} (resume with {})",
            s.reason,
            s.hint()
        ),
        Report::Finished(Outcome::Committed { version }) => {
            format!("committed: all instances on {version}")
        }
        Report::Finished(Outcome::RolledBack { version, reason }) => {
            format!("rolled back to {version}: {reason}")
        }
        Report::ControlMoved { to, epoch, version } => {
            format!("control moved to {to} ({version}) at epoch {}", epoch.0)
        }
    }
}

/// `hitless upgrade --to IMAGE`: commits once every instance runs the target unless
/// `no_commit`, which leaves the pair waiting for `hitless commit` or `hitless rollback`
/// (the rollback timer reverts it if neither comes).
pub fn upgrade(api: &ApiArgs, to: &Path, no_commit: bool) -> anyhow::Result<()> {
    let image = std::fs::canonicalize(to)
        .with_context(|| format!("the image directory {} does not exist", to.display()))?;
    let (api, _) = driving_status(api)?;
    let lines: Vec<ProgressLine> = get(&api, "/v1/progress")?;
    let since = lines.last().map(|l| l.seq + 1).unwrap_or(0);
    let msg = post(&api, "/v1/upgrade", serde_json::json!({ "image": image }))?;
    println!("{msg}");
    let bar = indicatif::ProgressBar::new_spinner();
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    if tty {
        bar.enable_steady_tick(Duration::from_millis(100));
    }
    let started = Instant::now();
    let mut waiting = false;
    let end = follow(&api, since, Duration::from_secs(3600), !no_commit, |l| {
        let line = format!(
            "{:>8.3} s  {}",
            started.elapsed().as_secs_f64(),
            describe(l)
        );
        if tty {
            bar.println(line);
        } else {
            eprintln!("{line}");
        }
        if let Report::Step { step, .. } = &l.report {
            bar.set_message(format!("step {}", step.name()));
            if no_commit && step.name() == "await-commit" {
                waiting = true;
            }
        }
    });
    if waiting {
        bar.finish_and_clear();
        println!("every instance runs the target; accept with `hitless commit` or revert with `hitless rollback`");
        return Ok(());
    }
    let end = end?;
    bar.finish_and_clear();
    match end.outcome {
        Outcome::Committed { version } => {
            println!(
                "upgrade committed: every instance runs {version} ({} control moves)",
                end.switchovers
            );
            Ok(())
        }
        Outcome::RolledBack { version, reason } => {
            bail!("the upgrade rolled back to {version}: {reason}")
        }
    }
}

/// `hitless abort|rollback|commit`.
pub fn operator(api: &ApiArgs, what: &str) -> anyhow::Result<()> {
    let (api, _) = driving_status(api)?;
    let msg = post(&api, &format!("/v1/{what}"), serde_json::json!({}))?;
    println!("{msg}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lab_token_goes_to_the_labs_agents_only_and_a_given_file_to_the_others() {
        let tmp = tempfile::tempdir().unwrap();
        let lab_dir = tmp.path().to_owned();
        std::fs::write(crate::lab::tokens_file(&lab_dir), "").unwrap();
        let lab = || (vec!["198.18.0.1:27701".to_owned()], lab_dir.clone());
        let given = Some(PathBuf::from("/etc/hitless/my-token"));
        let lab_tokens = crate::lab::tokens_file(&lab_dir);
        // A lab command presents its lab's token to its agents, whatever file is given.
        assert_eq!(
            token_file_for("198.18.0.1:27701", Some(lab()), given.clone(), lab),
            Some(lab_tokens.clone())
        );
        // Another agent gets the given file's token, or none.
        assert_eq!(
            token_file_for("10.0.0.1:27701", Some(lab()), given.clone(), lab),
            given
        );
        assert_eq!(
            token_file_for("10.0.0.1:27701", Some(lab()), None, lab),
            None
        );
        // Without a lab command, the default lab's agents get its token unless a file is given.
        assert_eq!(
            token_file_for("198.18.0.1:27701", None, None, lab),
            Some(lab_tokens)
        );
        assert_eq!(
            token_file_for("198.18.0.1:27701", None, given.clone(), lab),
            given
        );
        // A lab without a tokens file gets no token.
        let bare = || (vec!["127.0.0.1:27701".to_owned()], tmp.path().join("none"));
        assert_eq!(token_file_for("127.0.0.1:27701", None, None, bare), None);
    }
}
