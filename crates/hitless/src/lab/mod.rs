//! `hitless lab`: a local pair of appliance agents on this machine, and the main job
//! (`hitless lab issu`): the pair upgraded v1 -> v2 under real client load, every
//! acknowledged write verified afterwards.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hitless_agent::api::StatusAnswer;
use hitless_core::sim::{FaultKind, FaultSpec};
use hitless_core::Role;
use hitless_image::manifest::SchemaDecl;

use crate::image_cmd::kvd_contract;
use crate::ops;
use crate::{ApiArgs, Backend, LabUpArgs};

mod bench;
mod check;
mod checker;
mod faults;
mod history;
mod issu;
mod layout;
mod load;
mod report;
mod sampler;
mod schedule;
mod verdict;
mod witness;

pub use check::{check, LabCheckArgs};
pub use faults::faults;
pub use issu::issu;
use layout::{in_clients, NETNS_PREFIX, PORT_BASES};
pub use layout::{tokens_file, Hosts, Layout};
pub use witness::WitnessKind;

/// The lab's default run directory.
pub const DEFAULT_DIR: &str = "/tmp/hitless-lab";
const NAMES: [&str; 2] = ["primary", "secondary"];

fn exe_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate the hitless executable")?;
    Ok(exe
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".")))
}

/// Finds the kvd binaries built beside this executable.
fn kvd_binary(version: u32) -> anyhow::Result<PathBuf> {
    let name = format!("kvd-v{version}");
    let dir = exe_dir()?;
    for cand in [dir.join(&name), dir.join("..").join(&name)] {
        if cand.is_file() {
            return Ok(cand);
        }
    }
    bail!(
        "the reference service binary {name} is not beside {} (build it with `cargo build --release --workspace --bins`)",
        dir.display()
    )
}

/// What each kvd build understands: v1 reads and writes schema 1; v2 stores schema 2 and,
/// through its registered transforms, reads and writes schema 1 too.
fn schemas(native: u32) -> anyhow::Result<BTreeMap<String, SchemaDecl>> {
    let versions: std::collections::BTreeSet<u32> = (1..=native).collect();
    let decl = SchemaDecl {
        reads: versions.clone(),
        writes: versions,
        native,
    };
    decl.validate("kvd")?;
    Ok(BTreeMap::from([("kvd".to_owned(), decl)]))
}

/// Builds the lab's two images (kvd v1 and v2) in `dir/images`.
fn build_images(
    dir: &Path,
    backend: Backend,
    protocol: hitless_image::Protocol,
) -> anyhow::Result<[PathBuf; 2]> {
    if protocol == hitless_image::Protocol::LengthPrefixed {
        bail!("kvd speaks RESP: its images can declare `resp` or `opaque`, not `{protocol}`");
    }
    let contract = |kind| hitless_image::service::ServiceContract {
        protocol,
        ..kvd_contract(kind)
    };
    let mut out = Vec::new();
    for v in [1u32, 2] {
        let bin = kvd_binary(v)?;
        let version = format!("{v}.0.0");
        let img_dir = dir.join("images").join(format!("kvd-{version}"));
        let _ = std::fs::remove_dir_all(&img_dir);
        let image = match backend {
            Backend::Process => hitless_image::build::process_image(
                &img_dir,
                "kvd",
                &version,
                &bin,
                &contract(hitless_image::Kind::Process),
                &schemas(v)?,
            ),
            Backend::Qemu => hitless_image::build::vm_image(
                &img_dir,
                "kvd",
                &version,
                &bin,
                &contract(hitless_image::Kind::Vm),
                &schemas(v)?,
                None,
            ),
        }
        .with_context(|| format!("building the kvd {version} image"))?;
        out.push(image.dir);
    }
    Ok([out[0].clone(), out[1].clone()])
}

/// What a lab run adds to the agents' configuration beyond `lab up`'s flags.
#[derive(Debug, Clone, Default)]
struct Extras {
    /// The witness the agents use (none: no `[witness]` section).
    witness: Option<witness::WitnessSpec>,
    /// The service address's refresh announcement period (`[vip.announce] refresh_ms`),
    /// when not the agent's default.
    announce_refresh_ms: Option<u64>,
    /// `[heartbeat] misses`, when not the lab's default ([`heartbeat_misses`]).
    heartbeat_misses: Option<u32>,
}

/// The lab's failure detector: heartbeats every 50 ms for processes (100 ms for QEMU guests),
/// and this many missed before the peer is taken for lost.
///
/// The lab runs both appliances, their instances, the clients and redis-benchmark on the same
/// CPUs, and loading millions of keys or hundreds of clients saturates them: a 150 ms bound
/// (the agent's default, 50 ms x 3) was seen to expire on a live peer. Without a witness a
/// false peer loss fails the pair over for nothing and can lose acknowledged writes, so the
/// bound is 300 ms (50 ms x 6). With a witness a false detection costs an outage and never a
/// write (the witness decides), and the bound is 250 ms (50 ms x 5), so that a lost appliance
/// is replaced within 300 ms. Software-emulated guests saturate the CPUs: 100 ms x 20.
fn heartbeat_misses(backend: Backend, witness: bool) -> u32 {
    match (backend, witness) {
        (Backend::Qemu, _) => 20,
        (Backend::Process, true) => 5,
        (Backend::Process, false) => 6,
    }
}

fn write_config(
    dir: &Path,
    i: usize,
    backend: Backend,
    image: &Path,
    memory_mib: Option<u64>,
    layout: &Layout,
    extras: &Extras,
) -> anyhow::Result<PathBuf> {
    // On two hosts the service address is a virtual IP the appliance in control adds to its
    // interface and announces.
    let mut vip = match &layout.topology {
        Some(t) => {
            let host = if i == 0 {
                &t.hosts.primary
            } else {
                &t.hosts.secondary
            };
            let mut v = format!(
                "\n[vip]\ninterface = \"{}\"\nprefix_len = {}\n",
                host.interface, t.prefix_len
            );
            if let Some(ms) = extras.announce_refresh_ms {
                v.push_str(&format!("\n[vip.announce]\nrefresh_ms = {ms}\n"));
            }
            v
        }
        None => String::new(),
    };
    if let Some(w) = &extras.witness {
        vip.push_str(&w.config_section());
    }
    // The agents' API takes the tokens of the lab's tokens file (the lab's commands present one).
    let tokens = layout::ensure_tokens(dir)?;
    vip.push_str(&format!(
        "\n[api]\ntokens_file = \"{}\"\n",
        tokens.display()
    ));
    let text = format!(
        r#"# hitless lab: the {name} appliance ({hosts} hosts)
appliance = "{name}"
api_listen = "{api}"
peer_listen = "{listen}"
peer_addr = "{peer}"
service_addr = "{service}"
data_dir = "{data}"
image = "{image}"
backend = "{backend}"

[heartbeat]
interval_ms = {hb_interval}
misses = {hb_misses}

[instances]
host_addr = "{host_addr}"
port_base = {port_base}
memory_mib = {mem}
cpu_percent = 200
vcpus = 1
stop_grace_ms = 3000
{vip}"#,
        name = NAMES[i],
        hosts = layout.hosts,
        api = layout.apis[i],
        listen = layout.peers[i],
        peer = layout.peers[1 - i],
        service = layout.service_addr,
        data = dir.join(NAMES[i]).display(),
        image = image.display(),
        backend = backend,
        host_addr = layout.host_addrs[i],
        port_base = PORT_BASES[i],
        mem = memory_mib.unwrap_or(if backend == Backend::Qemu { 256 } else { 512 }),
        // The failure detector: see `heartbeat_misses`.
        hb_interval = if backend == Backend::Qemu { 100 } else { 50 },
        hb_misses = extras
            .heartbeat_misses
            .unwrap_or_else(|| heartbeat_misses(backend, extras.witness.is_some())),
    );
    let path = dir.join(format!("{}.toml", NAMES[i]));
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Starts the agent of appliance `i` in the background; returns its pid.
fn spawn_agent(dir: &Path, i: usize) -> anyhow::Result<u32> {
    let exe = std::env::current_exe()?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{}.log", NAMES[i])))?;
    let layout = Layout::load(dir)?;
    // On two hosts, the agent runs in its appliance's network namespace (its instances and
    // their sandboxes inherit it).
    let mut cmd = match layout.appliance_netns(i) {
        Some(ns) => hitless_netlab::command_in(ns, &exe),
        None => Command::new(&exe),
    };
    let child = cmd
        .args(["agent", "--config"])
        .arg(dir.join(format!("{}.toml", NAMES[i])))
        .env(
            "HITLESS_LOG",
            std::env::var("HITLESS_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting an agent")?;
    let pid = child.id();
    std::fs::write(dir.join(format!("{}.pid", NAMES[i])), pid.to_string())?;
    Ok(pid)
}

use std::os::unix::process::CommandExt;

fn pid_of(dir: &Path, i: usize) -> Option<i32> {
    std::fs::read_to_string(dir.join(format!("{}.pid", NAMES[i])))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether `pid` runs (a zombie, ended but not yet reaped, does not).
fn alive(pid: i32) -> bool {
    // SAFETY: kill(2) with signal 0 only checks that the process exists; no memory is shared.
    let exists = unsafe { libc::kill(pid, 0) == 0 };
    if !exists {
        return false;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state follows the parenthesised command name.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z') | Some('X'))
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) takes plain integers; a stale pid is at worst an ESRCH error.
    unsafe {
        libc::kill(pid, sig);
    }
}

const SIGKILL: i32 = libc::SIGKILL;
const SIGTERM: i32 = libc::SIGTERM;

/// Waits until the pair is up: an instance in control and a ready HA standby.
fn wait_pair(bound: Duration) -> anyhow::Result<StatusAnswer> {
    wait_pair_until(bound, "an in-sync HA standby", |e| {
        e.instances
            .iter()
            .any(|r| r.role == Role::HaStandby && r.state == hitless_core::InstanceState::Ready)
    })
}

/// Polls the driving agent (within `bound`) until the engine has an instance in control and
/// `ready` holds of its status; `what` names what `ready` waits for, in the error.
fn wait_pair_until(
    bound: Duration,
    what: &str,
    ready: impl Fn(&hitless_core::Status) -> bool,
) -> anyhow::Result<StatusAnswer> {
    let start = Instant::now();
    let mut last = String::from("no answer yet");
    while start.elapsed() < bound {
        match ops::driving_status(&ApiArgs { api: None }) {
            Ok((_, s)) => {
                if let Some(e) = &s.engine {
                    if e.in_control.is_some() && ready(e) {
                        return Ok(s);
                    }
                    last = format!("phase {}, waiting for {what}", e.phase);
                } else {
                    last = "no agent drives yet".into();
                }
            }
            Err(e) => last = format!("{e:#}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("the lab pair was not up within {bound:?} ({last}); see the agents' logs")
}

/// `hitless lab up`.
pub fn up(args: &LabUpArgs) -> anyhow::Result<()> {
    let (s, layout) = up_inner(args)?;
    println!(
        "lab up in {} ({} hosts): service address {}, agents' API {} and {}",
        args.dir.display(),
        layout.hosts,
        layout.service_addr,
        layout.apis[0],
        layout.apis[1]
    );
    if let Some(ns) = layout.client_netns() {
        println!(
            "clients: `ip netns exec {ns} redis-cli -h {} -p {}`",
            layout.service_addr.ip(),
            layout.service_addr.port()
        );
    }
    print_witness(&args.dir);
    ops::print_status(&s);
    Ok(())
}

/// The lab's witness in one line (and what a lab without one risks).
fn print_witness(dir: &Path) {
    match witness::describe(dir) {
        (kind, Some(endpoint)) => println!(
            "witness: {kind} at {endpoint}{}",
            if witness::running_pid(dir).is_some() {
                ""
            } else {
                " (NOT RUNNING)"
            }
        ),
        (_, None) => println!("witness: none; {}", witness::NO_WITNESS_WARNING),
    }
}

fn up_inner(args: &LabUpArgs) -> anyhow::Result<(StatusAnswer, Layout)> {
    up_with(args, None)
}

/// Brings the lab up as `args` says, the service address refreshed every
/// `announce_refresh_ms` when given.
fn up_with(
    args: &LabUpArgs,
    announce_refresh_ms: Option<u64>,
) -> anyhow::Result<(StatusAnswer, Layout)> {
    let dir = &args.dir;
    for i in 0..2 {
        if let Some(pid) = pid_of(dir, i) {
            if alive(pid) {
                bail!(
                    "a lab is already running in {} (agent pid {pid}); run `hitless lab down` first",
                    dir.display()
                );
            }
        }
    }
    // The witness of a lab that crashed in this run directory (its agents are gone).
    witness::stop(dir);
    let hosts = args.hosts.unwrap_or_else(Hosts::default_here);
    let layout = match hosts {
        Hosts::Loopback => {
            ports_free(&Layout::loopback())?;
            Layout::loopback()
        }
        Hosts::Netns => {
            if let Some(why) = layout::netns_unavailable() {
                bail!("the two-host lab cannot run here: {why}; use `--hosts loopback`");
            }
            netns_free()?;
            // Leftovers of a lab that crashed: its namespaces, links and rules.
            hitless_netlab::destroy(NETNS_PREFIX).context("removing a previous lab's network")?;
            let plan = hitless_netlab::Plan {
                prefix: NETNS_PREFIX.into(),
                ..hitless_netlab::Plan::default()
            };
            Layout::netns(hitless_netlab::create(&plan).context("building the lab's network")?)
        }
    };
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    layout.save(dir)?;
    ops::use_lab(&layout, dir);
    let images = build_images(dir, args.backend, args.protocol)?;
    let extras = Extras {
        witness: witness::WitnessSpec::plan(args.witness, &layout, dir)?,
        announce_refresh_ms,
        heartbeat_misses: args.heartbeat_misses,
    };
    if let Some(w) = &extras.witness {
        witness::start(dir, w)?;
    }
    for i in 0..2 {
        write_config(
            dir,
            i,
            args.backend,
            &images[0],
            args.instance_memory_mib,
            &layout,
            &extras,
        )?;
    }
    std::fs::write(dir.join("backend"), args.backend.to_string())?;
    for i in [1, 0] {
        spawn_agent(dir, i)?;
    }
    let bound = match args.backend {
        Backend::Process => Duration::from_secs(60),
        Backend::Qemu => Duration::from_secs(600),
    };
    Ok((wait_pair(bound)?, layout))
}

/// Refuses to start when another lab (from another run directory) holds the lab's fixed
/// addresses: its agents would answer this lab's requests.
fn ports_free(layout: &Layout) -> anyhow::Result<()> {
    let addrs = [layout.service_addr]
        .into_iter()
        .chain(layout.apis)
        .chain(layout.peers)
        .chain(PORT_BASES.map(|p| std::net::SocketAddr::new(layout.host_addrs[0], p)));
    for a in addrs {
        if let Err(e) = std::net::TcpListener::bind(a) {
            bail!(
                "{a} is in use ({e}): another lab or service holds the lab's addresses; stop it first (`hitless lab down --dir ...`)"
            );
        }
    }
    Ok(())
}

/// Refuses to start when another two-host lab (from another run directory) still runs
/// processes in the lab's namespaces.
fn netns_free() -> anyhow::Result<()> {
    for name in NAMES.into_iter().chain(["witness"]) {
        let ns = format!("{NETNS_PREFIX}-{name}");
        let out = Command::new("ip").args(["netns", "pids", &ns]).output();
        if let Ok(out) = out {
            let pids = String::from_utf8_lossy(&out.stdout);
            let pids: Vec<&str> = pids.split_whitespace().collect();
            if out.status.success() && !pids.is_empty() {
                bail!(
                    "the namespace {ns} still runs processes ({}): another two-host lab is up; stop it first (`hitless lab down --dir ...`)",
                    pids.join(" ")
                );
            }
        }
    }
    Ok(())
}

/// `hitless lab down`.
pub fn down(dir: &Path) -> anyhow::Result<()> {
    let (stopped, network) = teardown(dir)?;
    println!(
        "lab down: {stopped} agent(s) stopped{network}; logs kept in {}",
        dir.display()
    );
    Ok(())
}

/// Stops the lab's agents and removes its network (also one left over by a lab that
/// crashed); returns how many agents ran and what was removed.
fn teardown(dir: &Path) -> anyhow::Result<(usize, String)> {
    let layout = Layout::load(dir)?;
    let stopped = stop_agents(dir);
    let witness = if witness::stop(dir) {
        "; witness stopped"
    } else {
        ""
    };
    let network = if layout.hosts == Hosts::Netns || leftover_netns() {
        let cleaned =
            hitless_netlab::destroy(NETNS_PREFIX).context("removing the lab's network")?;
        if cleaned.is_empty() {
            "; no network left to remove".to_owned()
        } else {
            format!(
                "; network removed ({} namespaces, {} links)",
                cleaned.namespaces.len(),
                cleaned.links.len()
            )
        }
    } else {
        String::new()
    };
    Ok((stopped, format!("{witness}{network}")))
}

/// Whether namespaces of a two-host lab are left over (its run directory may be gone).
fn leftover_netns() -> bool {
    NAMES
        .iter()
        .chain(&["witness"])
        .any(|n| hitless_netlab::netns_path(&format!("{NETNS_PREFIX}-{n}")).exists())
}

/// Stops the lab's agents (gracefully, then by force); returns how many were running.
fn stop_agents(dir: &Path) -> usize {
    // Both at once: stopping one first would look like an appliance loss to the other.
    let pids: Vec<i32> = (0..2)
        .filter_map(|i| pid_of(dir, i))
        .filter(|p| alive(*p))
        .collect();
    for p in &pids {
        signal(*p, SIGTERM);
    }
    let start = Instant::now();
    while pids.iter().any(|p| alive(*p)) && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    for p in &pids {
        if alive(*p) {
            signal(*p, SIGKILL);
        }
    }
    pids.len()
}

/// `hitless lab status`.
pub fn status(dir: &Path, json: bool) -> anyhow::Result<()> {
    if !dir.exists() {
        bail!(
            "no lab in {} (start one with `hitless lab up`)",
            dir.display()
        );
    }
    let layout = Layout::load(dir)?;
    ops::use_lab(&layout, dir);
    let partition = match &layout.topology {
        Some(t) => hitless_netlab::active(t)
            .context("reading the lab's partition rules")?
            .map(|p| p.name().to_owned()),
        None => None,
    };
    let holders = address_holders(&layout);
    if json {
        let (_, s) = ops::driving_status(&ApiArgs { api: None })?;
        let mut v = serde_json::to_value(&s)?;
        if let Some(o) = v.as_object_mut() {
            o.insert("topology".into(), layout.topology_json());
            o.insert("partition".into(), serde_json::json!(partition));
            o.insert("address_holders".into(), serde_json::json!(holders));
            let (kind, endpoint) = witness::describe(dir);
            o.insert(
                "witness".into(),
                serde_json::json!({ "kind": kind, "endpoint": endpoint }),
            );
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "lab in {} ({} hosts): service address {}{}",
        dir.display(),
        layout.hosts,
        layout.service_addr,
        match &holders {
            Some(h) if h.is_empty() => ", held by no appliance".to_owned(),
            Some(h) => format!(", held by {}", h.join(" and ")),
            None => String::new(),
        }
    );
    print_witness(dir);
    if let Some(p) = partition {
        println!("partition in place: {p} (`hitless lab heal` ends it)");
    }
    ops::status(&ApiArgs { api: None }, false)
}

/// The appliances whose interface holds the service address (two-host lab only).
fn address_holders(layout: &Layout) -> Option<Vec<String>> {
    layout.topology.as_ref()?;
    let ip = layout.service_addr.ip().to_string();
    Some(
        (0..2)
            .filter(|i| {
                let ns = layout.appliance_netns(*i).unwrap_or_default();
                Command::new("ip")
                    .args(["-n", ns, "-o", "addr", "show", "to", &ip])
                    .output()
                    .is_ok_and(|o| o.status.success() && !o.stdout.is_empty())
            })
            .map(|i| NAMES[i].to_owned())
            .collect(),
    )
}

// ---------------------------------------------------------------------------------------------
// Faults done for real.

fn find_pid(s: &StatusAnswer, id: hitless_core::InstanceId) -> Option<u32> {
    s.local
        .instances
        .iter()
        .chain(s.peer.iter().flat_map(|p| p.instances.iter()))
        .find(|x| x.instance == id)
        .and_then(|x| x.pid)
}

/// Pauses the agent of appliance `i` (SIGSTOP); returns its pid, for [`resume_agent`].
fn pause_agent(dir: &Path, i: usize) -> anyhow::Result<i32> {
    let pid = pid_of(dir, i).context("no agent pid")?;
    signal(pid, libc::SIGSTOP);
    Ok(pid)
}

/// Resumes an agent [`pause_agent`] paused (SIGCONT).
fn resume_agent(pid: i32) {
    signal(pid, libc::SIGCONT);
}

/// What ends an injected fault that lasts: a partition is healed, a paused agent resumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Heal {
    Network,
    Resume(i32),
}

/// How long a partition or a paused agent lasts in `lab issu` before it ends: well past the
/// failure detector (50 ms x 5 or x 6) and the HA grace (1 s), so that both sides act on the split.
pub(super) const FAULT_HOLD: Duration = Duration::from_secs(3);

/// The network partition a fault kind makes, if it is one.
fn partition_of(kind: FaultKind) -> Option<hitless_netlab::Partition> {
    use hitless_netlab::Partition;
    Some(match kind {
        FaultKind::PartitionPeers => Partition::PartitionPeers,
        FaultKind::IsolatePrimary => Partition::IsolatePrimary,
        FaultKind::IsolateSecondary => Partition::IsolateSecondary,
        FaultKind::OneWayPrimary => Partition::OneWayPrimary,
        FaultKind::IsolateWitness => Partition::IsolateWitness,
        _ => return None,
    })
}

/// Injects `kind`; returns a description of what was done and what ends it, if it lasts.
fn inject(dir: &Path, kind: FaultKind) -> anyhow::Result<(String, Option<Heal>)> {
    let (api, s) = ops::driving_status(&ApiArgs { api: None })?;
    if let Some(p) = partition_of(kind) {
        let layout = Layout::load(dir)?;
        hitless_netlab::partition(layout.require_topology()?, p)?;
        return Ok((
            format!("nftables partition {}", p.name()),
            Some(Heal::Network),
        ));
    }
    if kind == FaultKind::PauseAgent {
        let i = usize::from(s.appliance == hitless_core::ApplianceId::Secondary);
        let pid = pause_agent(dir, i)?;
        return Ok((
            format!("SIGSTOP of the driving {} agent (pid {pid})", NAMES[i]),
            Some(Heal::Resume(pid)),
        ));
    }
    let engine = s.engine.clone().context("no engine status")?;
    let newest = engine
        .instances
        .iter()
        .filter(|r| r.state.is_live())
        .map(|r| r.id)
        .max();
    let ha = engine
        .instances
        .iter()
        .find(|r| r.role == Role::HaStandby && r.state.is_live())
        .map(|r| r.id);
    let kill_instance = |id: Option<hitless_core::InstanceId>, sig: i32, what: &str| {
        let id = id.with_context(|| format!("no {what} instance to fault"))?;
        let pid = find_pid(&s, id).with_context(|| format!("no pid known for {id}"))?;
        signal(pid as i32, sig);
        Ok::<_, anyhow::Error>(format!("signal {sig} to {what} instance {id} (pid {pid})"))
    };
    let what = match kind {
        FaultKind::CrashActive => kill_instance(engine.in_control, SIGKILL, "in-control"),
        FaultKind::CrashNew | FaultKind::StartFail => kill_instance(newest, SIGKILL, "newest"),
        FaultKind::CrashStandby => kill_instance(ha, SIGKILL, "HA standby"),
        FaultKind::HeartbeatLost => {
            kill_instance(engine.in_control, libc::SIGSTOP, "in-control (stopped)")
        }
        FaultKind::StandbyOutOfSync => kill_instance(ha, libc::SIGSTOP, "HA standby (stopped)"),
        FaultKind::Timeout => kill_instance(newest, libc::SIGSTOP, "newest (stopped)"),
        FaultKind::ApplianceLostPrimary | FaultKind::ApplianceLostSecondary => {
            let i = appliance_index(kind);
            let pid = pid_of(dir, i).context("no agent pid")?;
            signal(pid, SIGKILL);
            Ok(format!("kill -9 of the {} agent (pid {pid})", NAMES[i]))
        }
        FaultKind::Abort | FaultKind::Rollback => {
            let request = kind.name();
            let msg = ops::post(&api, &format!("/v1/{request}"), serde_json::json!({}))?;
            Ok(format!("operator {request}: {msg}"))
        }
        FaultKind::PartitionPeers
        | FaultKind::IsolatePrimary
        | FaultKind::IsolateSecondary
        | FaultKind::OneWayPrimary
        | FaultKind::IsolateWitness
        | FaultKind::PauseAgent => unreachable!("handled above"),
    }?;
    Ok((what, None))
}

/// Ends a fault that lasts.
fn heal(dir: &Path, heal: Heal) -> anyhow::Result<String> {
    match heal {
        Heal::Network => {
            let layout = Layout::load(dir)?;
            let was = hitless_netlab::heal(layout.require_topology()?)?;
            Ok(match was {
                Some(p) => format!("partition {} healed", p.name()),
                None => "no partition was in place".to_owned(),
            })
        }
        Heal::Resume(pid) => {
            resume_agent(pid);
            Ok(format!("SIGCONT of the paused agent (pid {pid})"))
        }
    }
}

/// `hitless lab partition KIND`: cuts the two-host lab's network as the fault kind does,
/// until `hitless lab heal` (or `--for` runs out).
pub fn partition(
    dir: &Path,
    kind: hitless_netlab::Partition,
    hold: Option<Duration>,
) -> anyhow::Result<()> {
    let layout = Layout::load(dir)?;
    let topo = layout.require_topology()?;
    hitless_netlab::partition(topo, kind)?;
    println!("partition {} in place", kind.name());
    if let Some(d) = hold {
        std::thread::sleep(d);
        hitless_netlab::heal(topo)?;
        println!("healed after {} ms", d.as_millis());
    } else {
        println!("end it with `hitless lab heal`");
    }
    Ok(())
}

/// `hitless lab heal`.
pub fn heal_cmd(dir: &Path) -> anyhow::Result<()> {
    println!("{}", heal(dir, Heal::Network)?);
    Ok(())
}

/// The index (into [`NAMES`]) of the appliance an appliance-loss fault kills: 1 for the
/// secondary, 0 otherwise.
fn appliance_index(kind: FaultKind) -> usize {
    usize::from(kind == FaultKind::ApplianceLostSecondary)
}

/// Parses `--fault KIND@STEP` into the engine's fault kind and step; only the catalog's
/// combinations (`hitless sim issu --list-faults`) are accepted.
fn parse_fault(f: &str) -> anyhow::Result<FaultSpec> {
    FaultSpec::parse(f).with_context(|| format!("invalid --fault {f:?}"))
}

/// Memory limit of each instance for a state of `keys` records of `value_size` bytes: room for
/// the state at the measured cost per record (about 450 bytes beside the value), 50% headroom
/// for bulk transfers, logs and the target version's representation, and the base a small
/// state needs.
pub fn instance_memory_for(keys: u64, value_size: u64, backend: Backend) -> u64 {
    let base = if backend == Backend::Qemu { 256 } else { 512 };
    let state = keys.saturating_mul(value_size + 450) / (1 << 20);
    base + state.saturating_mul(3) / 2
}

#[cfg(test)]
mod tests {
    use super::witness::{WitnessKind, WitnessSpec};
    use super::{appliance_index, parse_fault, write_config, Backend, Extras, Layout, NAMES};
    use hitless_agent::config::ApplianceId;
    use hitless_agent::AgentConfig;
    use hitless_core::sim::{FaultKind, FaultSpec};
    use hitless_core::Step;

    #[test]
    fn a_fault_parses_into_the_engine_kind_and_step() {
        assert_eq!(
            parse_fault("appliance-lost-secondary@primary-mixed").unwrap(),
            FaultSpec {
                kind: FaultKind::ApplianceLostSecondary,
                step: Step::PrimaryMixed
            }
        );
    }

    #[test]
    fn a_fault_outside_the_catalog_is_refused() {
        for bad in [
            "crash-active",
            "melt@primary-mixed",
            "start-fail@primary-mixed",
        ] {
            let e = parse_fault(bad).expect_err(bad);
            assert!(format!("{e:#}").contains("--list-faults"), "{bad}: {e:#}");
        }
    }

    #[test]
    fn appliance_loss_kills_the_named_appliance() {
        assert_eq!(appliance_index(FaultKind::ApplianceLostPrimary), 0);
        assert_eq!(appliance_index(FaultKind::ApplianceLostSecondary), 1);
    }

    #[test]
    fn the_agent_reads_the_lab_configs_as_the_appliance_and_backend_written() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        for backend in [Backend::Process, Backend::Qemu] {
            for (i, id) in ApplianceId::ALL.into_iter().enumerate() {
                assert_eq!(NAMES[i], id.name());
                let path = write_config(
                    dir,
                    i,
                    backend,
                    &dir.join("image"),
                    None,
                    &Layout::loopback(),
                    &Extras::default(),
                )
                .unwrap();
                let c = AgentConfig::load(&path).unwrap();
                assert_eq!(c.appliance, id);
                assert_eq!(c.backend, backend);
                assert_eq!(c.witness.kind.to_string(), "none");
            }
        }
    }

    #[test]
    fn the_agents_read_the_witness_and_the_announcement_refresh_the_lab_writes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let layout = Layout::netns(hitless_netlab::Topology::of(
            &hitless_netlab::Plan::default(),
        ));
        for kind in [WitnessKind::Builtin, WitnessKind::Etcd] {
            let extras = Extras {
                witness: WitnessSpec::plan(kind, &layout, dir).unwrap(),
                announce_refresh_ms: Some(1000),
                heartbeat_misses: None,
            };
            let endpoint = extras.witness.as_ref().unwrap().endpoint();
            for i in 0..2 {
                let path = write_config(
                    dir,
                    i,
                    Backend::Process,
                    &dir.join("image"),
                    None,
                    &layout,
                    &extras,
                )
                .unwrap();
                let c = AgentConfig::load(&path).unwrap();
                assert_eq!(c.witness.kind.to_string(), kind.to_string());
                assert_eq!(c.witness.endpoints, vec![endpoint.clone()]);
                assert_eq!(c.witness.pair, "lab");
                assert_eq!(c.vip.unwrap().announce.refresh_ms, 1000);
                // A false peer loss cannot lose a write with a witness: the tighter bound.
                assert_eq!(c.heartbeat.misses, 5);
                assert_eq!(c.heartbeat.interval_ms, 50);
            }
        }
    }

    #[test]
    fn the_lab_configs_point_at_one_tokens_file_its_owner_alone_reads() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let layout = Layout::netns(hitless_netlab::Topology::of(
            &hitless_netlab::Plan::default(),
        ));
        let mut files = Vec::new();
        for i in 0..2 {
            let path = write_config(
                dir,
                i,
                Backend::Process,
                &dir.join("image"),
                None,
                &layout,
                &Extras::default(),
            )
            .unwrap();
            // The lab's agents bind addresses of their namespaces, not loopback ones.
            let c = AgentConfig::load(&path).unwrap();
            assert!(!c.api_listen.ip().is_loopback());
            let file = c.api.tokens_file.expect("the lab names a tokens file");
            let mode = std::fs::metadata(&file).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", file.display());
            let tokens = hitless_agent::auth::Tokens::load(&file).unwrap();
            let presented = hitless_agent::auth::Credential::load(&file).unwrap();
            assert_eq!(
                tokens.role_of(&presented.token),
                Some(hitless_agent::auth::Role::Operator)
            );
            files.push(file);
        }
        assert_eq!(files[0], files[1], "both agents take the same tokens");
        assert_eq!(files[0], super::tokens_file(dir));
    }

    #[test]
    fn without_a_witness_the_lab_detector_is_slower_and_an_override_wins() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let layout = Layout::loopback();
        let cases = [
            (Backend::Process, None, 6),
            (Backend::Qemu, None, 20),
            (Backend::Process, Some(9), 9),
        ];
        for (backend, misses, want) in cases {
            let extras = Extras {
                heartbeat_misses: misses,
                ..Extras::default()
            };
            let path =
                write_config(dir, 0, backend, &dir.join("image"), None, &layout, &extras).unwrap();
            let c = AgentConfig::load(&path).unwrap();
            assert_eq!(c.heartbeat.misses, want, "{backend} {misses:?}");
        }
    }
}
