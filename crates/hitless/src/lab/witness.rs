//! The lab's witness, the pair's third vote: the builtin daemon (`hitless witness`) or a
//! single-member etcd, run in the witness namespace of a two-host lab (on a free loopback port
//! otherwise). What was started is saved in the run directory (`witness.json`, and the pid in
//! `witness.pid` like the agents'), so that `lab down` stops it also after a lab crashed and
//! the checker can kill it and start it again on the same data.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use super::{alive, signal, Layout, SIGKILL, SIGTERM};

/// The witness the lab runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum WitnessKind {
    /// No witness: the agents decide a split alone (a partition can lose acknowledged
    /// writes).
    None,
    /// The builtin daemon, `hitless witness`.
    Builtin,
    /// A single-member etcd cluster (`/usr/bin/etcd`).
    Etcd,
}

impl std::fmt::Display for WitnessKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WitnessKind::None => "none",
            WitnessKind::Builtin => "builtin",
            WitnessKind::Etcd => "etcd",
        })
    }
}

/// What a lab without a witness risks, said wherever its report is shown.
pub const NO_WITNESS_WARNING: &str =
    "no witness: a partition can lose acknowledged writes (both sides may acknowledge alone)";

/// The etcd server the lab runs.
pub const ETCD: &str = "/usr/bin/etcd";
/// The builtin witness's port on the witness host.
const BUILTIN_PORT: u16 = 27800;
const ETCD_CLIENT_PORT: u16 = 2379;
const ETCD_PEER_PORT: u16 = 2380;
/// How long a starting witness has to accept connections.
const READY_BOUND: Duration = Duration::from_secs(20);
/// How long a stopping witness has after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// The name of the pair's record at the witness.
pub const PAIR: &str = "lab";

const SPEC_FILE: &str = "witness.json";
const PID_FILE: &str = "witness.pid";
const LOG_FILE: &str = "witness.log";

/// A witness as started: enough to start it again, stop it and describe it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WitnessSpec {
    pub kind: WitnessKind,
    /// The namespace it runs in (none on loopback).
    pub netns: Option<String>,
    /// Where the agents reach it (the builtin daemon's listener, etcd's client listener).
    pub listen: SocketAddr,
    /// etcd's peer listener.
    pub peer: Option<SocketAddr>,
    pub data_dir: PathBuf,
}

impl WitnessSpec {
    /// The witness of `kind` for the lab laid out as `layout` in `dir`; none for `none`.
    pub fn plan(kind: WitnessKind, layout: &Layout, dir: &Path) -> anyhow::Result<Option<Self>> {
        let (netns, ip) = match &layout.topology {
            Some(t) => (
                Some(t.hosts.witness.netns.clone()),
                IpAddr::V4(t.hosts.witness.addr),
            ),
            None => (None, IpAddr::V4(Ipv4Addr::LOCALHOST)),
        };
        let on_host = netns.is_some();
        let port = |fixed: u16| -> anyhow::Result<u16> {
            if on_host {
                Ok(fixed)
            } else {
                free_port()
            }
        };
        let data_dir = dir.join("witness");
        Ok(match kind {
            WitnessKind::None => None,
            WitnessKind::Builtin => Some(WitnessSpec {
                kind,
                netns,
                listen: SocketAddr::new(ip, port(BUILTIN_PORT)?),
                peer: None,
                data_dir,
            }),
            WitnessKind::Etcd => Some(WitnessSpec {
                kind,
                netns,
                listen: SocketAddr::new(ip, port(ETCD_CLIENT_PORT)?),
                peer: Some(SocketAddr::new(ip, port(ETCD_PEER_PORT)?)),
                data_dir,
            }),
        })
    }

    /// The endpoint the agents' `[witness]` section names.
    pub fn endpoint(&self) -> String {
        match self.kind {
            WitnessKind::Etcd => format!("http://{}", self.listen),
            _ => self.listen.to_string(),
        }
    }

    /// The agents' `[witness]` section.
    pub fn config_section(&self) -> String {
        format!(
            "\n[witness]\nkind = \"{}\"\nendpoints = [\"{}\"]\npair = \"{PAIR}\"\n",
            self.kind,
            self.endpoint()
        )
    }

    /// The program and arguments that run it.
    fn command_line(&self, hitless: &Path) -> (PathBuf, Vec<String>) {
        let data = self.data_dir.display().to_string();
        match (self.kind, self.peer) {
            (WitnessKind::Etcd, Some(peer)) => {
                let client = format!("http://{}", self.listen);
                let peer = format!("http://{peer}");
                (
                    PathBuf::from(ETCD),
                    vec![
                        "--name".into(),
                        PAIR.into(),
                        "--data-dir".into(),
                        data,
                        "--listen-client-urls".into(),
                        client.clone(),
                        "--advertise-client-urls".into(),
                        client,
                        "--listen-peer-urls".into(),
                        peer.clone(),
                        "--initial-advertise-peer-urls".into(),
                        peer.clone(),
                        "--initial-cluster".into(),
                        format!("{PAIR}={peer}"),
                        "--initial-cluster-state".into(),
                        "new".into(),
                    ],
                )
            }
            _ => (
                hitless.to_path_buf(),
                vec![
                    "witness".into(),
                    "--listen".into(),
                    self.listen.to_string(),
                    "--data-dir".into(),
                    data,
                ],
            ),
        }
    }
}

/// A port nobody listens on now, on loopback.
fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// The witness saved in `dir`, if the lab there runs one.
pub fn load(dir: &Path) -> anyhow::Result<Option<WitnessSpec>> {
    let path = dir.join(SPEC_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
            format!("reading the lab's witness {}", path.display())
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The witness kind and endpoint of the lab in `dir`, as its status and reports show them.
pub fn describe(dir: &Path) -> (WitnessKind, Option<String>) {
    match load(dir) {
        Ok(Some(s)) => (s.kind, Some(s.endpoint())),
        _ => (WitnessKind::None, None),
    }
}

/// Starts the witness described by `spec` for the lab in `dir` (saving the description
/// first) and waits until it accepts connections; returns its pid.
pub fn start(dir: &Path, spec: &WitnessSpec) -> anyhow::Result<u32> {
    let path = dir.join(SPEC_FILE);
    std::fs::write(&path, serde_json::to_vec_pretty(spec)?)
        .with_context(|| format!("writing {}", path.display()))?;
    spawn(dir, spec)
}

/// Starts the saved witness of the lab in `dir` again, on the same data directory.
pub fn start_again(dir: &Path) -> anyhow::Result<u32> {
    let spec = load(dir)?.context("this lab runs no witness")?;
    spawn(dir, &spec)
}

fn spawn(dir: &Path, spec: &WitnessSpec) -> anyhow::Result<u32> {
    let hitless = std::env::current_exe().context("cannot locate the hitless executable")?;
    let (program, args) = spec.command_line(&hitless);
    if spec.kind == WitnessKind::Etcd && !program.is_file() {
        bail!(
            "{} is not installed (apt-get install etcd-server), or run the lab with --witness builtin",
            program.display()
        );
    }
    std::fs::create_dir_all(&spec.data_dir)
        .with_context(|| format!("creating {}", spec.data_dir.display()))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(LOG_FILE))?;
    let mut cmd = match &spec.netns {
        Some(ns) => hitless_netlab::command_in(ns, &program),
        None => Command::new(&program),
    };
    let child = cmd
        .args(&args)
        .env(
            "HITLESS_LOG",
            std::env::var("HITLESS_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting the {} witness ({})", spec.kind, program.display()))?;
    let pid = child.id();
    std::fs::write(dir.join(PID_FILE), pid.to_string())?;
    wait_ready(dir, spec, pid as i32)?;
    Ok(pid)
}

/// Waits (bounded) until the witness accepts connections at its endpoint.
fn wait_ready(dir: &Path, spec: &WitnessSpec, pid: i32) -> anyhow::Result<()> {
    let start = Instant::now();
    while start.elapsed() < READY_BOUND {
        if !alive(pid) {
            bail!(
                "the {} witness (pid {pid}) exited at start; see {}",
                spec.kind,
                dir.join(LOG_FILE).display()
            );
        }
        if TcpStream::connect_timeout(&spec.listen, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    signal(pid, SIGKILL);
    bail!(
        "the {} witness did not accept connections at {} within {READY_BOUND:?}; see {}",
        spec.kind,
        spec.listen,
        dir.join(LOG_FILE).display()
    )
}

/// The pid of the lab's witness, if one was recorded and it still runs that witness (a pid
/// recorded by a lab that crashed may since name another process).
pub fn running_pid(dir: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(dir.join(PID_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    if !alive(pid) {
        return None;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline);
    (cmdline.contains("witness") || cmdline.contains("etcd")).then_some(pid)
}

/// Kills the lab's witness at once (kill -9); returns its pid, if it ran.
pub fn kill(dir: &Path) -> Option<i32> {
    let pid = running_pid(dir)?;
    signal(pid, SIGKILL);
    let start = Instant::now();
    while alive(pid) && start.elapsed() < STOP_GRACE {
        std::thread::sleep(Duration::from_millis(10));
    }
    Some(pid)
}

/// Stops the lab's witness (gracefully, then by force); returns whether one ran.
pub fn stop(dir: &Path) -> bool {
    let Some(pid) = running_pid(dir) else {
        return false;
    };
    signal(pid, SIGTERM);
    let start = Instant::now();
    while alive(pid) && start.elapsed() < STOP_GRACE {
        std::thread::sleep(Duration::from_millis(20));
    }
    if alive(pid) {
        signal(pid, SIGKILL);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_two_host_witness_runs_on_the_witness_host_and_the_agents_are_told_where() {
        let topo = hitless_netlab::Topology::of(&hitless_netlab::Plan::default());
        let layout = Layout::netns(topo);
        let dir = Path::new("/tmp/lab");
        let b = WitnessSpec::plan(WitnessKind::Builtin, &layout, dir)
            .unwrap()
            .unwrap();
        assert_eq!(b.netns.as_deref(), Some("hl-witness"));
        assert_eq!(b.endpoint(), "198.18.0.3:27800");
        let (prog, args) = b.command_line(Path::new("/bin/hitless"));
        assert_eq!(prog, Path::new("/bin/hitless"));
        assert_eq!(
            args,
            [
                "witness",
                "--listen",
                "198.18.0.3:27800",
                "--data-dir",
                "/tmp/lab/witness"
            ]
        );
        let e = WitnessSpec::plan(WitnessKind::Etcd, &layout, dir)
            .unwrap()
            .unwrap();
        assert_eq!(e.endpoint(), "http://198.18.0.3:2379");
        let (prog, args) = e.command_line(Path::new("/bin/hitless"));
        assert_eq!(prog, Path::new(ETCD));
        let joined = args.join(" ");
        assert!(
            joined.contains("--initial-cluster lab=http://198.18.0.3:2380"),
            "{joined}"
        );
        assert!(joined.contains("--data-dir /tmp/lab/witness"), "{joined}");
        assert!(WitnessSpec::plan(WitnessKind::None, &layout, dir)
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_saved_witness_reads_back_and_a_lab_without_one_says_none() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(describe(tmp.path()), (WitnessKind::None, None));
        let spec = WitnessSpec::plan(WitnessKind::Etcd, &Layout::loopback(), tmp.path())
            .unwrap()
            .unwrap();
        std::fs::write(
            tmp.path().join(SPEC_FILE),
            serde_json::to_vec(&spec).unwrap(),
        )
        .unwrap();
        assert_eq!(load(tmp.path()).unwrap(), Some(spec.clone()));
        assert_eq!(
            describe(tmp.path()),
            (WitnessKind::Etcd, Some(spec.endpoint()))
        );
        // No pid recorded: nothing to stop.
        assert!(!stop(tmp.path()));
        assert_eq!(running_pid(tmp.path()), None);
    }
}
