//! kvd: the reference service of hitless, a RESP (Redis protocol) key-value server whose
//! state lives in hitless-sync.
//!
//! Every write goes through the replica ([`hitless_sync::Replica`]) and is acknowledged to
//! the client only once the replica reports it durable (in synchronous mode: applied by the
//! designated HA standby). Roles and epochs come over the control channel
//! ([`hitless_control`]); an instance that is not in control answers writes with `-READONLY`,
//! and while a planned switchover quiesces it writes wait rather than fail.
//!
//! Two binaries, `kvd-v1` and `kvd-v2`, are built from this crate; they differ in the
//! replicated schema version ([`SchemaVersion`]), and version 2 carries the transforms to and
//! from version 1.

pub mod db;
pub mod memory;
pub mod node;
pub mod resp;
pub mod schema;
pub mod server;

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{ArgGroup, Parser, ValueEnum};
use hitless_control::{serve as serve_control, serve_unix_listener, ServeOutcome};
use hitless_sync::{ControlEpoch, Durability, Replica, ReplicaConfig};

pub use schema::SchemaVersion;

/// Initial role given on the command line (normally the control channel assigns it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StartRole {
    /// Take control at epoch 1 at once.
    Active,
    /// Stand by (following `--follow` if given).
    Standby,
}

/// Acknowledgement mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AckMode {
    /// Acknowledge writes once the designated HA standby has them.
    Sync,
    /// Acknowledge writes once applied locally (standbys bounded by `--max-lag`).
    Async,
}

/// Command line of `kvd-v1` / `kvd-v2`.
#[derive(Debug, Parser)]
#[command(about = "RESP key-value server whose state is replicated by hitless-sync")]
#[command(group(ArgGroup::new("control").required(true).args(["control_listen", "control_device"])))]
pub struct Args {
    /// Identifier of this instance (the agent checks it in Configure). In a VM guest it comes
    /// from the `hitless.instance=` kernel parameter.
    #[arg(long, env = "HITLESS_INSTANCE")]
    pub instance_id: String,
    /// Address to serve RESP clients on, e.g. 127.0.0.1:6379 (port 0 picks one).
    #[arg(long, env = "HITLESS_SERVICE")]
    pub service_listen: String,
    /// Address to serve standbys' state sync on.
    #[arg(long, env = "HITLESS_SYNC")]
    pub sync_listen: String,
    /// Unix socket path to serve the control channel on (one agent connection at a time).
    #[arg(long)]
    pub control_listen: Option<PathBuf>,
    /// Character device carrying the control channel (virtio-serial or serial port); a
    /// terminal device is switched to raw mode.
    #[arg(long, env = "HITLESS_CONTROL_DEVICE")]
    pub control_device: Option<PathBuf>,
    /// Initial role; without it the instance waits for Configure and serves no writes.
    #[arg(long, value_enum)]
    pub role: Option<StartRole>,
    /// With `--role standby`: the active's sync address to follow.
    #[arg(long)]
    pub follow: Option<String>,
    /// Image version reported in Hello (default: `kvd-vN/<crate version>`).
    #[arg(long)]
    pub image_version: Option<String>,
    /// Acknowledgement mode.
    #[arg(long, value_enum, default_value = "sync")]
    pub ack: AckMode,
    /// Lag bound of `--ack async`, in sequence numbers.
    #[arg(long, default_value_t = 10_000)]
    pub max_lag: u64,
    /// Bound on waiting for a write's acknowledgement, in milliseconds.
    #[arg(long, default_value_t = 5_000)]
    pub ack_timeout_ms: u64,
    /// How long a write waits for a quiesce to end before failing with TRYAGAIN, in ms.
    #[arg(long, default_value_t = 10_000)]
    pub hold_ms: u64,
    /// Most simultaneous client connections (each is a thread: the process limit must allow
    /// as many).
    #[arg(long, default_value_t = server::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// After the designated HA standby drops out, how long acknowledgements are held before
    /// they are given without it (degraded), in milliseconds; 0 gives them at once.
    #[arg(long, env = "HITLESS_HA_GRACE_MS", default_value_t = 1000)]
    pub ha_grace_ms: u64,
}

/// Failure to start kvd.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen for {what} on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Starting a service thread failed.
    #[error("cannot start {what}: {source}")]
    Start {
        /// What.
        what: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// The initial role could not be taken.
    #[error("cannot take the initial role: {0}")]
    Role(String),
    /// The control channel failed beyond recovery.
    #[error("control channel failed: {0}")]
    Control(#[from] hitless_control::ControlError),
}

/// Entry point of the `kvd-v1` and `kvd-v2` binaries.
pub fn run(version: SchemaVersion) -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .try_init();
    let args = Args::parse();
    match run_with(version, args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "kvd failed");
            eprintln!("kvd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs kvd with parsed arguments until the agent sends Shutdown.
pub fn run_with(version: SchemaVersion, args: Args) -> Result<(), StartError> {
    let bind = |what: &'static str, addr: &str| {
        TcpListener::bind(addr).map_err(|source| StartError::Bind {
            what,
            addr: addr.to_string(),
            source,
        })
    };
    let service = bind("clients", &args.service_listen)?;
    widen_backlog(&service, args.max_connections);
    let sync = bind("state sync", &args.sync_listen)?;
    let service_addr = service.local_addr().map_err(|source| StartError::Start {
        what: "clients",
        source,
    })?;
    let sync_addr = sync.local_addr().map_err(|source| StartError::Start {
        what: "state sync",
        source,
    })?;

    let mut rc = ReplicaConfig::new(args.instance_id.clone());
    rc.durability = match args.ack {
        AckMode::Sync => Durability::Sync,
        AckMode::Async => Durability::Async {
            max_lag: args.max_lag,
        },
    };
    rc.ack_timeout = Duration::from_millis(args.ack_timeout_ms);
    rc.ha_grace = Duration::from_millis(args.ha_grace_ms);
    rc.background_thread = Some(lower_this_thread);
    let replica = Replica::new(version.schema(), rc);
    let _sync_handle = replica.serve(sync).map_err(|source| StartError::Start {
        what: "state sync",
        source,
    })?;
    let db = Arc::new(db::Db::new(
        replica,
        version,
        Duration::from_millis(args.hold_ms),
    ));

    let kernel_release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|_| args.control_device.is_some());
    let node = node::Node::start(
        db.clone(),
        node::NodeConfig {
            instance_id: args.instance_id.clone(),
            image_version: args.image_version.clone().unwrap_or_else(|| {
                format!("kvd-v{}/{}", version.number(), env!("CARGO_PKG_VERSION"))
            }),
            service_addr: service_addr.to_string(),
            sync_addr: sync_addr.to_string(),
            kernel_release,
        },
    );
    match args.role {
        Some(StartRole::Active) => node
            .start_active(ControlEpoch(1))
            .map_err(StartError::Role)?,
        Some(StartRole::Standby) => node
            .start_standby(args.follow.clone(), ControlEpoch(0))
            .map_err(StartError::Role)?,
        None => {}
    }
    tracing::info!(
        instance = %args.instance_id,
        schema = version.number(),
        service = %service_addr,
        sync = %sync_addr,
        "kvd started"
    );

    stop_on_signals(node.clone()).map_err(|source| StartError::Start {
        what: "the signal handler",
        source,
    })?;

    let info_node = node.clone();
    let info: server::InfoFn = Arc::new(move || info_node.info());
    let cfg = server::ServerConfig {
        max_connections: args.max_connections,
        ..server::ServerConfig::default()
    };
    std::thread::Builder::new()
        .name("kvd-accept".into())
        .spawn(move || server::serve(service, db, info, cfg))
        .map_err(|source| StartError::Start {
            what: "clients",
            source,
        })?;

    let mut handler = node::NodeControl(node.clone());
    let result = if let Some(path) = &args.control_listen {
        remove_stale_socket(path);
        let listener = UnixListener::bind(path).map_err(|source| StartError::Bind {
            what: "the control channel",
            addr: path.display().to_string(),
            source,
        })?;
        let r = serve_unix_listener(&listener, &mut handler);
        remove_stale_socket(path);
        r.map_err(StartError::from)
    } else {
        let path = args
            .control_device
            .clone()
            .expect("clap requires one control option");
        serve_device(&path, &mut handler)
    };
    node.stop();
    tracing::info!("kvd stopped");
    result
}

/// How much lower than kvd's other threads its background replication threads run (bulk
/// transfers, streams of standbys that are not the HA standby).
const BACKGROUND_NICE: i32 = 5;

/// Lowers the calling thread's scheduling priority by [`BACKGROUND_NICE`] (lowering needs no
/// privilege).
fn lower_this_thread() {
    // SAFETY: getpriority and setpriority take plain integers and touch no memory of ours;
    // who = 0 is the calling thread on Linux (the nice value is per thread).
    unsafe {
        let now = libc::getpriority(libc::PRIO_PROCESS, 0);
        let _ = libc::setpriority(libc::PRIO_PROCESS, 0, (now + BACKGROUND_NICE).min(19));
    }
}

/// Stops gracefully on SIGTERM or SIGINT, as on the control channel's shutdown request. The
/// handler is installed, not left at its default: in a process sandbox kvd is PID 1 of its PID
/// namespace, and the kernel drops signals an init left at their default action.
fn stop_on_signals(node: Arc<node::Node>) -> std::io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    std::thread::Builder::new()
        .name("kvd-signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                tracing::info!(signal = sig, "stopping on a signal");
                node.stop();
                tracing::info!("kvd stopped");
                std::process::exit(0);
            }
        })?;
    Ok(())
}

/// Lets the accept queue of the client listener hold `connections` (as far as the kernel's
/// `somaxconn` allows): a front moves all its connections to a new instance in control at
/// once, and a queue that overflows drops connection attempts for a second.
fn widen_backlog(listener: &TcpListener, connections: usize) {
    use std::os::fd::AsRawFd;
    let backlog = libc::c_int::try_from(connections).unwrap_or(libc::c_int::MAX);
    // SAFETY: listen takes the descriptor, which `listener` keeps open, and an integer; on a
    // socket that already listens, Linux only updates the backlog.
    if unsafe { libc::listen(listener.as_raw_fd(), backlog) } != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "cannot widen the client accept queue"
        );
    }
}

/// Removes a unix socket left at `path` by an earlier run (never any other kind of file).
fn remove_stale_socket(path: &std::path::Path) {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

/// Switches a terminal device (a serial port) to raw mode, so that control frames pass
/// unchanged: no echo, no line editing, no CR/LF translation. Other devices are left as they are.
fn raw_mode(file: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: isatty only inspects the descriptor, which `file` keeps open.
    if unsafe { libc::isatty(fd) } != 1 {
        return Ok(());
    }
    // SAFETY: termios is plain data that tcgetattr fills in completely before it is read.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd is open for the duration of the call and `t` is a valid termios to write.
    if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: cfmakeraw only modifies the termios value it is given.
    unsafe { libc::cfmakeraw(&mut t) };
    // SAFETY: fd is open and `t` is a fully initialised termios.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Serves the control channel on a character device, reopening it after the host end goes
/// away or the stream loses framing, until Shutdown.
fn serve_device(path: &std::path::Path, handler: &mut node::NodeControl) -> Result<(), StartError> {
    let mut failures = 0u32;
    loop {
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .and_then(|f| Ok((f.try_clone()?, f)));
        match opened {
            Ok((reader, writer)) => match raw_mode(&writer)
                .map_err(|e| tracing::warn!(device = %path.display(), error = %e, "cannot switch the control device to raw mode"))
                .ok()
                .map(|_| serve_control(reader, writer, handler))
                .unwrap_or(Ok(ServeOutcome::Disconnected))
            {
                Ok(ServeOutcome::Shutdown) => return Ok(()),
                Ok(ServeOutcome::Disconnected) => {
                    tracing::info!("control device closed by the host");
                    failures = failures.saturating_add(1);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "control device stream failed; reopening");
                    failures = failures.saturating_add(1);
                }
            },
            Err(e) => {
                tracing::warn!(device = %path.display(), error = %e, "cannot open the control device");
                failures = failures.saturating_add(1);
            }
        }
        std::thread::sleep(Duration::from_millis((50u64 << failures.min(5)).min(1000)));
    }
}
