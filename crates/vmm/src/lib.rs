//! Hypervisor backends behind one trait.
//!
//! An *instance* is one running copy of a versioned OS image: either a
//! sandboxed host process ([`ProcessBackend`]) or a QEMU virtual machine
//! ([`QemuBackend`]). Both are driven through the same two traits:
//!
//! * [`Backend`] starts instances from an [`InstanceSpec`];
//! * [`InstanceHandle`] observes and ends one running instance.
//!
//! The spec is deliberately independent of the image format: it holds plain
//! paths and strings, so whoever unpacks an image turns it into a spec.
//!
//! # Control channel
//!
//! Every instance has a control channel, reachable on the host as a unix
//! stream socket ([`ControlEndpoint`]). The agent is always the *client*:
//!
//! * for a VM, QEMU listens on the socket and forwards bytes to a guest serial
//!   port (the guest device name is passed on the kernel command line as
//!   `hitless.control=<dev>` and reported in [`InstanceInfo::guest_control_device`]);
//! * for a process, the payload itself is expected to listen on the socket,
//!   whose path it receives in the [`CONTROL_SOCKET_ENV`] environment variable.
//!
//! # Waiting for exit
//!
//! Each handle owns a reaper thread that blocks in `waitid(2)`; the exit is
//! published through an [`ExitWatch`], which can be cloned and waited on with
//! a bound from any thread, without polling.
//!
//! # Stopping
//!
//! [`InstanceHandle::stop`] sends SIGTERM and kills after the grace. A process
//! payload never runs as PID 1 of its PID namespace (where the kernel drops
//! signals it has no handler for): the sandbox's PID 1 is a minimal init
//! ([`init`]) that forwards SIGTERM, SIGINT, SIGHUP, SIGUSR1 and SIGUSR2 to
//! it, reaps zombies and exits with its status, so a graceful stop does not
//! depend on the service installing a handler.

#![deny(missing_docs)]

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod cgroup;
mod exit;
pub mod init;
mod process;
mod qemu;

pub use cgroup::{CgroupVersion, InstanceCgroup};
pub use exit::ExitWatch;
pub use process::{ProcessBackend, ProcessConfig, ProcessHandle};
pub use qemu::qmp::{QmpClient, QmpError, RunState};
pub use qemu::{
    find_binary, kernel_release, probe_kvm, ControlDevice, KvmVerdict, MachineType, QemuBackend,
    QemuConfig, QemuHandle,
};

/// Environment variable through which a process instance learns the path of
/// the unix socket it should listen on for the control channel.
pub const CONTROL_SOCKET_ENV: &str = "HITLESS_CONTROL_SOCKET";

/// Environment variable through which a process instance learns its id.
pub const INSTANCE_ID_ENV: &str = "HITLESS_INSTANCE_ID";

/// Which backend runs an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// A host process in its own PID, mount, UTS and IPC namespaces.
    Process,
    /// A QEMU virtual machine.
    Qemu,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Process => "process",
            BackendKind::Qemu => "qemu",
        })
    }
}

/// A backend name that is neither `process` nor `qemu`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown backend {0:?}: expected process or qemu")]
pub struct UnknownBackend(pub String);

impl std::str::FromStr for BackendKind {
    type Err = UnknownBackend;

    /// Reads the names [`BackendKind`]'s `Display` writes (`process`, `qemu`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "process" => Ok(BackendKind::Process),
            "qemu" => Ok(BackendKind::Qemu),
            other => Err(UnknownBackend(other.to_string())),
        }
    }
}

/// What an instance runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Payload {
    /// A program run directly in a process sandbox.
    Process(ProcessPayload),
    /// A kernel (plus optional initramfs) booted in a virtual machine.
    Vm(VmPayload),
}

/// A program for the process sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessPayload {
    /// Absolute path of the executable.
    pub binary: PathBuf,
    /// Arguments, not including `argv[0]` (which is set to `binary`).
    pub args: Vec<String>,
    /// Environment variables. The environment is *not* inherited from the
    /// agent apart from `PATH`; [`CONTROL_SOCKET_ENV`] and
    /// [`INSTANCE_ID_ENV`] are always added.
    pub env: Vec<(String, String)>,
}

/// A kernel to boot in a virtual machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmPayload {
    /// Kernel image (bzImage).
    pub kernel: PathBuf,
    /// Initramfs (newc cpio, optionally compressed), if any.
    pub initramfs: Option<PathBuf>,
    /// Kernel command line. The backend appends `console=ttyS0` (if no
    /// `console=` is present) and `hitless.control=<dev>`.
    pub cmdline: String,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Number of virtual CPUs.
    pub vcpus: u32,
}

/// CPU bandwidth limit: `quota_us` of CPU time per `period_us` of wall time
/// (`quota_us == 2 * period_us` is two full CPUs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuQuota {
    /// CPU time allowed per period, in microseconds.
    pub quota_us: u64,
    /// Length of the period, in microseconds (1000..=1_000_000).
    pub period_us: u64,
}

impl CpuQuota {
    /// A quota of `millicpus` thousandths of one CPU over a 100 ms period.
    pub fn from_millicpus(millicpus: u64) -> Self {
        CpuQuota {
            quota_us: millicpus.saturating_mul(100),
            period_us: 100_000,
        }
    }
}

/// Resource limits applied through a per-instance cgroup. For a VM the limits
/// apply to the whole QEMU process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceLimits {
    /// Memory limit in bytes.
    pub memory_bytes: Option<u64>,
    /// CPU bandwidth limit.
    pub cpu: Option<CpuQuota>,
    /// Maximum number of tasks (processes and threads).
    pub pids_max: Option<u64>,
}

impl ResourceLimits {
    /// True when no limit is set (no cgroup needs to be created).
    pub fn is_empty(&self) -> bool {
        self.memory_bytes.is_none() && self.cpu.is_none() && self.pids_max.is_none()
    }
}

/// A TCP port forward from the host into an instance.
///
/// For a VM this becomes a QEMU user-network `hostfwd`. A process instance
/// shares the host network namespace (unless
/// [`ProcessConfig::new_network_namespace`] is set), so for it forwards are
/// informational: the payload binds `host_port` itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortForward {
    /// Host address to bind (normally loopback).
    pub host_addr: IpAddr,
    /// Host port.
    pub host_port: u16,
    /// Guest port.
    pub guest_port: u16,
}

impl PortForward {
    /// A forward from `127.0.0.1:host_port` to guest port `guest_port`.
    pub fn loopback(host_port: u16, guest_port: u16) -> Self {
        Self::on(IpAddr::V4(Ipv4Addr::LOCALHOST), host_port, guest_port)
    }

    /// A forward from `host_addr:host_port` to guest port `guest_port`.
    pub fn on(host_addr: IpAddr, host_port: u16, guest_port: u16) -> Self {
        PortForward {
            host_addr,
            host_port,
            guest_port,
        }
    }
}

/// Everything a backend needs to start an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceSpec {
    /// Instance id: 1..=64 characters of `[A-Za-z0-9._-]`, not starting with
    /// a dot. Used for the cgroup name and the sandbox hostname.
    pub id: String,
    /// What to run.
    pub payload: Payload,
    /// Run directory, created if missing. The console log and backend sockets
    /// live here; a process instance also uses it as its working directory.
    pub run_dir: PathBuf,
    /// Resource limits.
    pub limits: ResourceLimits,
    /// TCP ports to expose.
    pub ports: Vec<PortForward>,
    /// Path of the control channel unix socket (see the crate docs). Must be
    /// shorter than 108 bytes (the `sun_path` limit).
    pub control_socket: PathBuf,
}

impl InstanceSpec {
    /// Checks the parts of the spec every backend relies on.
    pub fn validate(&self) -> Result<(), VmmError> {
        validate_id(&self.id)?;
        let ctl = self.control_socket.as_os_str().len();
        if ctl == 0 || ctl >= 108 {
            return Err(VmmError::InvalidSpec(format!(
                "control socket path {} must be 1..=107 bytes long",
                self.control_socket.display()
            )));
        }
        if self.run_dir.as_os_str().is_empty() {
            return Err(VmmError::InvalidSpec("run directory is empty".into()));
        }
        if let Some(cpu) = self.limits.cpu {
            if !(1000..=1_000_000).contains(&cpu.period_us) || cpu.quota_us < 1000 {
                return Err(VmmError::InvalidSpec(format!(
                    "cpu quota {}us per {}us is out of range (period 1000..=1000000, quota >= 1000)",
                    cpu.quota_us, cpu.period_us
                )));
            }
        }
        if let Some(mem) = self.limits.memory_bytes {
            if mem < 1 << 20 {
                return Err(VmmError::InvalidSpec(format!(
                    "memory limit of {mem} bytes is below 1 MiB"
                )));
            }
        }
        Ok(())
    }

    /// Path of the console log (stdout+stderr or serial console) in the run
    /// directory.
    pub fn console_log_path(&self) -> PathBuf {
        self.run_dir.join("console.log")
    }
}

fn validate_id(id: &str) -> Result<(), VmmError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(VmmError::InvalidSpec(format!(
            "instance id {id:?} must be 1..=64 characters of [A-Za-z0-9._-] not starting with '.'"
        )))
    }
}

/// How an instance ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitInfo {
    /// The process exited with this status code.
    Code(i32),
    /// The process was killed by this signal number.
    Signal(i32),
}

impl ExitInfo {
    /// True for exit code 0.
    pub fn success(&self) -> bool {
        matches!(self, ExitInfo::Code(0))
    }

    /// The terminating signal, if any.
    pub fn signal(&self) -> Option<i32> {
        match self {
            ExitInfo::Signal(s) => Some(*s),
            ExitInfo::Code(_) => None,
        }
    }
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitInfo::Code(c) => write!(f, "exited with code {c}"),
            ExitInfo::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// CPU virtualization used for a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accel {
    /// Hardware virtualization through `/dev/kvm`.
    Kvm,
    /// QEMU's software emulator.
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// Coarse state of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceStatus {
    /// The instance process is alive.
    Running,
    /// The instance process has ended.
    Exited(ExitInfo),
}

impl InstanceStatus {
    /// True while running.
    pub fn is_running(&self) -> bool {
        matches!(self, InstanceStatus::Running)
    }
}

/// Where the agent connects for the instance control channel.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlEndpoint {
    /// A unix stream socket; the agent connects to it.
    Unix(PathBuf),
}

impl ControlEndpoint {
    /// The socket path.
    pub fn path(&self) -> &Path {
        match self {
            ControlEndpoint::Unix(p) => p,
        }
    }
}

/// Descriptive facts about a running instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// Instance id.
    pub id: String,
    /// Backend running it.
    pub backend: BackendKind,
    /// Host pid whose SIGKILL takes the whole instance down.
    pub pid: Option<u32>,
    /// Guest kernel release for a VM (read from the bzImage header).
    pub kernel_release: Option<String>,
    /// Accelerator a VM runs under.
    pub accel: Option<Accel>,
    /// Guest device carrying the control channel (VM only), e.g. `ttyS1`.
    pub guest_control_device: Option<String>,
    /// Control channel endpoint on the host.
    pub control: ControlEndpoint,
    /// QMP socket of a VM.
    pub qmp_socket: Option<PathBuf>,
    /// Console log path.
    pub console_log: PathBuf,
    /// Exposed ports.
    pub ports: Vec<PortForward>,
    /// Cgroup directories created for the instance.
    pub cgroups: Vec<PathBuf>,
}

/// Errors of the backends.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The spec is unusable as given.
    #[error("invalid instance spec: {0}")]
    InvalidSpec(String),
    /// The spec's payload is of the wrong kind for this backend.
    #[error("the {backend} backend cannot run a {payload} payload")]
    WrongPayload {
        /// Backend asked.
        backend: BackendKind,
        /// Payload kind given.
        payload: &'static str,
    },
    /// A file the spec names does not exist or is unusable.
    #[error("{what} {path} is not usable: {reason}")]
    BadPath {
        /// What the file is for.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why it is unusable.
        reason: String,
    },
    /// A required host tool is missing.
    #[error("{0} was not found on this host")]
    MissingTool(String),
    /// An I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Starting the instance failed inside the sandbox before the payload ran.
    #[error("starting instance {id} failed while {stage}: {source}")]
    Launch {
        /// Instance id.
        id: String,
        /// Setup step that failed.
        stage: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Cgroup setup or teardown failed.
    #[error("cgroup {path}: {reason}")]
    Cgroup {
        /// The cgroup directory.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A QMP exchange failed.
    #[error("QMP: {0}")]
    Qmp(#[from] QmpError),
    /// The instance did not reach the expected state in time.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
    /// The instance has already exited.
    #[error("instance has already {0}")]
    AlreadyExited(ExitInfo),
}

impl VmmError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        VmmError::Io {
            context: context.into(),
            source,
        }
    }
}

/// A hypervisor backend: turns specs into running instances.
pub trait Backend: Send + Sync {
    /// Starts an instance. On error nothing is left running and any cgroup
    /// created for it is removed.
    fn start(&self, spec: &InstanceSpec) -> Result<Box<dyn InstanceHandle>, VmmError>;

    /// Which backend this is.
    fn kind(&self) -> BackendKind;

    /// Stops `handle` (gracefully, then by force after `grace`) and starts
    /// `spec` again.
    fn restart(
        &self,
        handle: &mut dyn InstanceHandle,
        spec: &InstanceSpec,
        grace: Duration,
    ) -> Result<Box<dyn InstanceHandle>, VmmError> {
        if handle.status().is_running() {
            handle.stop(grace)?;
        }
        self.start(spec)
    }
}

/// One running (or ended) instance.
///
/// Dropping a handle whose instance is still running kills it (SIGKILL) and
/// removes its cgroup: an instance never outlives its handle silently.
pub trait InstanceHandle: Send {
    /// Instance id.
    fn id(&self) -> &str;

    /// Host pid whose SIGKILL takes the whole instance down (the sandbox's
    /// PID 1, or the QEMU process). `None` once the instance is reaped.
    fn pid(&self) -> Option<u32>;

    /// Host pid of the service itself: for a process instance the payload,
    /// the only child of the sandbox's init; otherwise [`InstanceHandle::pid`].
    /// What to sample for the service's memory, to renice, or to freeze in a
    /// fault test. `None` once the instance is reaped.
    fn service_pid(&self) -> Option<u32> {
        self.pid()
    }

    /// Current status (never blocks).
    fn status(&mut self) -> InstanceStatus;

    /// Waits up to `timeout` for the instance to end.
    fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitInfo>, VmmError>;

    /// A cloneable exit notification, usable from other threads.
    fn exit_watch(&self) -> ExitWatch;

    /// Graceful stop: SIGTERM for a process, ACPI powerdown over QMP for a VM;
    /// after `grace`, SIGKILL. Waits for the exit and cleans up (cgroup,
    /// sockets). Stopping an instance that already ended returns its exit.
    fn stop(&mut self, grace: Duration) -> Result<ExitInfo, VmmError>;

    /// SIGKILL now, wait for the exit (bounded) and clean up.
    fn kill(&mut self) -> Result<ExitInfo, VmmError>;

    /// Where the agent connects for the control channel.
    fn control_endpoint(&self) -> ControlEndpoint;

    /// The console log file.
    fn console_log(&self) -> &Path;

    /// Descriptive facts.
    fn info(&self) -> InstanceInfo;

    /// The VM run state over QMP (`query-status`); `None` for backends
    /// without a VM monitor, whose health is simply [`InstanceHandle::status`].
    fn vm_run_state(&mut self) -> Option<Result<RunState, VmmError>> {
        None
    }
}

/// What both backends' handles share: an exit watch, and a cleanup once the instance ended.
/// The [`InstanceHandle`] methods that only depend on those are written once, here.
pub(crate) trait Watched {
    fn watched_id(&self) -> &str;
    fn watch(&self) -> &ExitWatch;
    /// Removes what the instance left behind (cgroup, sockets).
    fn cleanup(&mut self) -> Result<(), VmmError>;

    /// Cleans up after the exit `e` and returns it.
    fn finish(&mut self, e: ExitInfo) -> Result<ExitInfo, VmmError> {
        self.cleanup()?;
        Ok(e)
    }

    /// [`InstanceHandle::status`].
    fn watched_status(&mut self) -> InstanceStatus {
        match self.watch().get() {
            None => InstanceStatus::Running,
            Some(e) => {
                if let Err(err) = self.cleanup() {
                    tracing::warn!(id = %self.watched_id(), error = %err, "cleanup after exit failed");
                }
                InstanceStatus::Exited(e)
            }
        }
    }

    /// [`InstanceHandle::wait_timeout`].
    fn watched_wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitInfo>, VmmError> {
        match self.watch().wait_timeout(timeout) {
            Some(e) => self.finish(e).map(Some),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_kind_parses_the_names_it_displays_and_serializes() {
        for kind in [BackendKind::Process, BackendKind::Qemu] {
            let name = kind.to_string();
            assert_eq!(name.parse::<BackendKind>(), Ok(kind));
            assert_eq!(serde_json::to_string(&kind).unwrap(), format!("\"{name}\""));
        }
        assert_eq!(
            "kvm".parse::<BackendKind>(),
            Err(UnknownBackend("kvm".to_string()))
        );
    }

    fn spec(id: &str) -> InstanceSpec {
        InstanceSpec {
            id: id.into(),
            payload: Payload::Process(ProcessPayload {
                binary: "/bin/true".into(),
                args: vec![],
                env: vec![],
            }),
            run_dir: "/tmp/x".into(),
            limits: ResourceLimits::default(),
            ports: vec![],
            control_socket: "/tmp/x/ctl.sock".into(),
        }
    }

    #[test]
    fn ids_are_validated() {
        assert!(spec("kvd-1.a_b").validate().is_ok());
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            let err = spec(bad).validate().unwrap_err();
            assert!(matches!(err, VmmError::InvalidSpec(_)), "{bad:?}: {err}");
        }
    }

    #[test]
    fn long_control_socket_rejected() {
        let mut s = spec("a");
        s.control_socket = PathBuf::from(format!("/tmp/{}", "y".repeat(110)));
        assert!(s.validate().is_err());
    }

    #[test]
    fn cpu_quota_bounds() {
        let mut s = spec("a");
        s.limits.cpu = Some(CpuQuota::from_millicpus(500));
        assert!(s.validate().is_ok());
        s.limits.cpu = Some(CpuQuota {
            quota_us: 10,
            period_us: 100_000,
        });
        assert!(s.validate().is_err());
    }

    #[test]
    fn exit_info_display_and_serde() {
        let e = ExitInfo::Signal(9);
        assert_eq!(e.to_string(), "killed by signal 9");
        let j = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<ExitInfo>(&j).unwrap(), e);
        assert!(ExitInfo::Code(0).success());
        assert!(!ExitInfo::Code(1).success());
    }
}
