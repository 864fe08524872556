//! The QEMU backend.
//!
//! A VM is one `qemu-system-x86_64` process:
//!
//! * machine `q35` (default) with two 16550 UARTs: `ttyS0` is the console,
//!   written to the console log; `ttyS1` carries the control channel and is
//!   a unix socket in server mode on the host. Both need only built-in
//!   drivers of a stock distribution kernel, so an initramfs without modules
//!   can use them. `microvm` is available with the control channel on a
//!   virtio-serial port named `hitless.control` (the guest then needs the
//!   virtio modules);
//! * KVM when the process-wide probe ([`probe_kvm`]) says it works, TCG
//!   otherwise;
//! * QMP on `<run_dir>/qmp.sock`, driven by [`QmpClient`];
//! * user networking with `hostfwd` rules for the spec's port forwards
//!   (virtio-net);
//! * `-no-reboot` plus `panic=-1`: a guest reboot or panic ends the process,
//!   so the instance's exit is QEMU's exit.

pub mod kvm;
pub mod qmp;

use crate::Watched;
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use crate::cgroup::{CgroupVersion, InstanceCgroup};
use crate::exit::ExitWatch;
use crate::process::{on_spawner, remove_stale_socket, KILL_WAIT};
use crate::{
    Accel, Backend, BackendKind, ControlEndpoint, ExitInfo, InstanceHandle, InstanceInfo,
    InstanceSpec, InstanceStatus, Payload, PortForward, VmPayload, VmmError,
};
pub use kvm::{probe_kvm, KvmVerdict};
use qmp::{QmpClient, RunState};

/// Machine model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MachineType {
    /// PC with Q35 chipset, PCI devices.
    Q35,
    /// Minimal virtio-mmio machine.
    Microvm,
}

/// Guest device carrying the control channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlDevice {
    /// Second UART, `ttyS1` (Q35 only).
    Serial,
    /// virtio-serial port named `hitless.control` (guest sees `vport*p1`).
    VirtioSerial,
}

impl ControlDevice {
    fn guest_name(self) -> &'static str {
        match self {
            ControlDevice::Serial => "ttyS1",
            ControlDevice::VirtioSerial => "hitless.control",
        }
    }
}

/// Options of the QEMU backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuConfig {
    /// QEMU binary (absolute, or looked up in `PATH`).
    pub qemu_binary: PathBuf,
    /// Machine model.
    pub machine: MachineType,
    /// Control channel device.
    pub control_device: ControlDevice,
    /// Force an accelerator; `None` probes KVM once per process.
    pub accel: Option<Accel>,
    /// Bound of the KVM probe.
    pub kvm_probe_timeout: Duration,
    /// Bound for QMP to come up after the process starts.
    pub qmp_connect_timeout: Duration,
    /// Bound for one QMP reply.
    pub qmp_reply_timeout: Duration,
    /// Always attach a user-mode NIC, even without port forwards.
    pub always_network: bool,
}

impl Default for QemuConfig {
    fn default() -> Self {
        QemuConfig {
            qemu_binary: "qemu-system-x86_64".into(),
            machine: MachineType::Q35,
            control_device: ControlDevice::Serial,
            accel: None,
            kvm_probe_timeout: Duration::from_secs(4),
            qmp_connect_timeout: Duration::from_secs(10),
            qmp_reply_timeout: Duration::from_secs(5),
            always_network: false,
        }
    }
}

/// Finds `bin` (absolute or in `PATH`).
pub fn find_binary(bin: &Path) -> Option<PathBuf> {
    if bin.is_absolute() {
        return bin.is_file().then(|| bin.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(bin))
            .find(|p| p.is_file())
    })
}

/// The kernel release stored in a bzImage header (e.g. `6.1.0-56-amd64`),
/// or `None` when `path` is not a bzImage with a version string. The header's
/// `kernel_version` field is an offset (from 0x200) of up to 64 KiB.
pub fn kernel_release(path: &Path) -> Option<String> {
    let mut f = File::open(path).ok()?;
    let mut head = vec![0u8; 0x10200];
    let n = read_up_to(&mut f, &mut head);
    head.truncate(n);
    if head.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let off = u16::from_le_bytes([head[0x20e], head[0x20f]]) as usize;
    if off == 0 {
        return None;
    }
    let s = head.get(off + 0x200..)?;
    let end = s.iter().position(|&b| b == 0).unwrap_or(s.len()).min(256);
    let text = std::str::from_utf8(&s[..end]).ok()?;
    text.split_whitespace().next().map(str::to_owned)
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    n
}

/// Runs instances as QEMU virtual machines (see the module docs).
#[derive(Debug, Clone)]
pub struct QemuBackend {
    config: QemuConfig,
    cgroup: Option<CgroupVersion>,
}

impl Default for QemuBackend {
    fn default() -> Self {
        QemuBackend::new(QemuConfig::default())
    }
}

fn check_file(what: &'static str, path: &Path) -> Result<(), VmmError> {
    match std::fs::metadata(path) {
        Ok(md) if md.is_file() => Ok(()),
        Ok(_) => Err(VmmError::BadPath {
            what,
            path: path.into(),
            reason: "not a regular file".into(),
        }),
        Err(e) => Err(VmmError::BadPath {
            what,
            path: path.into(),
            reason: e.to_string(),
        }),
    }
}

fn tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(len.saturating_sub(max)));
    let mut s = String::new();
    let _ = f.take(max).read_to_string(&mut s);
    s.trim().to_string()
}

impl QemuBackend {
    /// A backend with `config`.
    pub fn new(config: QemuConfig) -> Self {
        QemuBackend {
            config,
            cgroup: CgroupVersion::detect(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &QemuConfig {
        &self.config
    }

    /// The QEMU binary, if installed.
    pub fn qemu_path(&self) -> Option<PathBuf> {
        find_binary(&self.config.qemu_binary)
    }

    /// The accelerator VMs started now would use; may run the KVM probe
    /// (once per process) with `kernel`.
    pub fn accel_for(&self, qemu: &Path, kernel: &Path) -> Accel {
        if let Some(a) = self.config.accel {
            return a;
        }
        if kvm::cached_verdict(qemu, kernel, "host", self.config.kvm_probe_timeout).usable() {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }

    /// The QEMU command line for `spec` (without the binary).
    pub fn command_line(
        &self,
        spec: &InstanceSpec,
        vm: &VmPayload,
        accel: Accel,
    ) -> Result<Vec<String>, VmmError> {
        if self.config.machine == MachineType::Microvm
            && self.config.control_device == ControlDevice::Serial
        {
            return Err(VmmError::InvalidSpec(
                "microvm has a single UART: use the virtio-serial control device".into(),
            ));
        }
        let path = |p: &Path| -> Result<String, VmmError> {
            let s = p.to_str().ok_or_else(|| {
                VmmError::InvalidSpec(format!("path {} is not UTF-8", p.display()))
            })?;
            if s.contains(',') {
                return Err(VmmError::InvalidSpec(format!(
                    "path {s} contains a comma, which QEMU options cannot carry"
                )));
            }
            Ok(s.to_string())
        };
        let mut a: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
        push(&[
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ]);
        push(&["-name", &spec.id]);
        let (machine, virtio_suffix) = match self.config.machine {
            MachineType::Q35 => ("q35", "pci"),
            MachineType::Microvm => ("microvm", "device"),
        };
        push(&["-M", machine]);
        match accel {
            Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
            // The translation cache would otherwise grow to 1 GiB by default: bound it, so a
            // guest's memory use (and its cgroup limit) stays predictable.
            Accel::Tcg => push(&["-accel", "tcg,tb-size=64", "-cpu", "max"]),
        }
        push(&[
            "-m",
            &vm.memory_mib.to_string(),
            "-smp",
            &vm.vcpus.to_string(),
        ]);
        push(&["-kernel", &path(&vm.kernel)?]);
        if let Some(i) = &vm.initramfs {
            push(&["-initrd", &path(i)?]);
        }
        let mut cmdline = vm.cmdline.trim().to_string();
        if !cmdline
            .split_whitespace()
            .any(|w| w.starts_with("console="))
        {
            cmdline.push_str(" console=ttyS0");
        }
        if !cmdline.split_whitespace().any(|w| w.starts_with("panic=")) {
            cmdline.push_str(" panic=-1");
        }
        cmdline.push_str(" hitless.control=");
        cmdline.push_str(self.config.control_device.guest_name());
        push(&["-append", cmdline.trim()]);
        let console = path(&spec.console_log_path())?;
        push(&[
            "-chardev",
            &format!("file,id=console,path={console},append=on"),
            "-serial",
            "chardev:console",
        ]);
        let ctl = path(&spec.control_socket)?;
        push(&[
            "-chardev",
            &format!("socket,id=control,path={ctl},server=on,wait=off"),
        ]);
        match self.config.control_device {
            ControlDevice::Serial => push(&["-serial", "chardev:control"]),
            ControlDevice::VirtioSerial => push(&[
                "-device",
                &format!("virtio-serial-{virtio_suffix},id=vser0"),
                "-device",
                "virtserialport,bus=vser0.0,chardev=control,name=hitless.control",
            ]),
        }
        let qmp = path(&qmp_path(spec))?;
        push(&["-qmp", &format!("unix:{qmp},server=on,wait=off")]);
        if !spec.ports.is_empty() || self.config.always_network {
            let mut netdev = "user,id=net0".to_string();
            for p in &spec.ports {
                netdev.push_str(&format!(
                    ",hostfwd=tcp:{}:{}-:{}",
                    p.host_addr, p.host_port, p.guest_port
                ));
            }
            push(&["-netdev", &netdev]);
            push(&[
                "-device",
                &format!("virtio-net-{virtio_suffix},netdev=net0"),
            ]);
        }
        Ok(a)
    }

    fn launch(&self, spec: &InstanceSpec, vm: &VmPayload) -> Result<QemuHandle, VmmError> {
        let qemu = self
            .qemu_path()
            .ok_or_else(|| VmmError::MissingTool(self.config.qemu_binary.display().to_string()))?;
        check_file("kernel", &vm.kernel)?;
        if let Some(i) = &vm.initramfs {
            check_file("initramfs", i)?;
        }
        if !(16..=1 << 20).contains(&vm.memory_mib) {
            return Err(VmmError::InvalidSpec(format!(
                "guest memory of {} MiB is outside 16..=1048576",
                vm.memory_mib
            )));
        }
        if !(1..=64).contains(&vm.vcpus) {
            return Err(VmmError::InvalidSpec(format!(
                "{} vCPUs is outside 1..=64",
                vm.vcpus
            )));
        }
        let qmp_sock = qmp_path(spec);
        if qmp_sock.as_os_str().len() >= 108 {
            return Err(VmmError::InvalidSpec(format!(
                "QMP socket path {} is too long for a unix socket",
                qmp_sock.display()
            )));
        }
        std::fs::create_dir_all(&spec.run_dir).map_err(|e| {
            VmmError::io(
                format!("creating run directory {}", spec.run_dir.display()),
                e,
            )
        })?;
        if let Some(parent) = spec.control_socket.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| VmmError::io(format!("creating directory {}", parent.display()), e))?;
        }
        remove_stale_socket(&spec.control_socket)?;
        remove_stale_socket(&qmp_sock)?;
        let accel = self.accel_for(&qemu, &vm.kernel);
        let args = self.command_line(spec, vm, accel)?;

        let cgroup = match &self.cgroup {
            _ if spec.limits.is_empty() => None,
            Some(v) => Some(InstanceCgroup::create(v, &spec.id, &spec.limits)?),
            None => {
                return Err(VmmError::Cgroup {
                    path: "/sys/fs/cgroup".into(),
                    reason: "resource limits were requested but no cgroup hierarchy was found"
                        .into(),
                })
            }
        };
        let procs_files: Vec<CString> = cgroup
            .iter()
            .flat_map(|c| c.dirs().iter())
            .map(|d| CString::new(d.join("cgroup.procs").as_os_str().as_bytes()))
            .collect::<Result<_, _>>()
            .map_err(|_| VmmError::InvalidSpec("cgroup path contains a NUL byte".into()))?;

        let qemu_log = spec.run_dir.join("qemu.log");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&qemu_log)
            .map_err(|e| VmmError::io(format!("opening {}", qemu_log.display()), e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| VmmError::io("duplicating the log fd", e))?;
        let mut cmd = Command::new(&qemu);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // SAFETY: the hook runs between fork and exec and only makes
        // async-signal-safe system calls (prctl, setsid, open, write, close)
        // on CStrings built before the fork; it does not allocate.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                for f in &procs_files {
                    let fd = libc::open(f.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                    let err = std::io::Error::last_os_error();
                    libc::close(fd);
                    if !ok {
                        return Err(err);
                    }
                }
                Ok(())
            });
        }
        tracing::debug!(id = %spec.id, ?args, "starting QEMU");
        // Spawned on the long-lived spawner thread so PR_SET_PDEATHSIG only
        // fires when the agent process dies.
        let spawned = on_spawner(move || cmd.spawn().map(|c| c.id()));
        let pid = spawned.map_err(|e| VmmError::Launch {
            id: spec.id.clone(),
            stage: "starting QEMU",
            source: e,
        })?;
        let watch = ExitWatch::spawn(pid as i32).map_err(|e| {
            // SAFETY: pid is our unreaped child, so it cannot be recycled.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
            VmmError::io("starting reaper thread", e)
        })?;
        let mut handle = QemuHandle {
            id: spec.id.clone(),
            pid,
            watch,
            qmp: None,
            qmp_path: qmp_sock,
            cgroup,
            console: spec.console_log_path(),
            qemu_log,
            control: spec.control_socket.clone(),
            ports: spec.ports.clone(),
            accel,
            kernel_release: kernel_release(&vm.kernel),
            control_device: self.config.control_device,
        };
        match QmpClient::connect(
            &handle.qmp_path,
            self.config.qmp_connect_timeout,
            self.config.qmp_reply_timeout,
        )
        .and_then(|mut c| c.query_status().map(|s| (c, s)))
        {
            Ok((c, st)) => {
                tracing::info!(id = %spec.id, pid, %accel, status = %st.status, "VM started");
                handle.qmp = Some(c);
                Ok(handle)
            }
            Err(e) => {
                let _ = handle.kill();
                let why = tail(&handle.qemu_log, 2048);
                Err(VmmError::Launch {
                    id: spec.id.clone(),
                    stage: "connecting to QMP",
                    source: std::io::Error::other(format!("{e}; QEMU said: {why}")),
                })
            }
        }
    }
}

fn qmp_path(spec: &InstanceSpec) -> PathBuf {
    spec.run_dir.join("qmp.sock")
}

impl Backend for QemuBackend {
    fn start(&self, spec: &InstanceSpec) -> Result<Box<dyn InstanceHandle>, VmmError> {
        Ok(Box::new(self.start_vm(spec)?))
    }

    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }
}

impl QemuBackend {
    /// Like [`Backend::start`], returning the concrete handle (with QMP access).
    pub fn start_vm(&self, spec: &InstanceSpec) -> Result<QemuHandle, VmmError> {
        spec.validate()?;
        let Payload::Vm(vm) = &spec.payload else {
            return Err(VmmError::WrongPayload {
                backend: BackendKind::Qemu,
                payload: "process",
            });
        };
        self.launch(spec, vm)
    }
}

/// A running QEMU virtual machine.
#[derive(Debug)]
pub struct QemuHandle {
    id: String,
    pid: u32,
    watch: ExitWatch,
    qmp: Option<QmpClient>,
    qmp_path: PathBuf,
    cgroup: Option<InstanceCgroup>,
    console: PathBuf,
    qemu_log: PathBuf,
    control: PathBuf,
    ports: Vec<PortForward>,
    accel: Accel,
    kernel_release: Option<String>,
    control_device: ControlDevice,
}

impl QemuHandle {
    /// The QMP session (connected at start).
    pub fn qmp(&mut self) -> Result<&mut QmpClient, VmmError> {
        if self.watch.get().is_some() {
            return Err(VmmError::AlreadyExited(
                self.watch.get().unwrap_or(ExitInfo::Code(-1)),
            ));
        }
        self.qmp
            .as_mut()
            .ok_or(VmmError::Qmp(qmp::QmpError::Closed))
    }

    /// `query-status` over QMP.
    pub fn query_status(&mut self) -> Result<RunState, VmmError> {
        Ok(self.qmp()?.query_status()?)
    }

    /// The accelerator in use.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// QEMU's own stdout/stderr log.
    pub fn qemu_log(&self) -> &Path {
        &self.qemu_log
    }
}

impl Watched for QemuHandle {
    fn watched_id(&self) -> &str {
        &self.id
    }

    fn watch(&self) -> &ExitWatch {
        &self.watch
    }

    fn cleanup(&mut self) -> Result<(), VmmError> {
        self.qmp = None;
        if let Some(cg) = self.cgroup.as_mut() {
            cg.remove()?;
        }
        let _ = remove_stale_socket(&self.control);
        let _ = remove_stale_socket(&self.qmp_path);
        Ok(())
    }
}

impl InstanceHandle for QemuHandle {
    fn id(&self) -> &str {
        &self.id
    }

    fn pid(&self) -> Option<u32> {
        self.watch.get().is_none().then_some(self.pid)
    }

    fn status(&mut self) -> InstanceStatus {
        self.watched_status()
    }

    fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitInfo>, VmmError> {
        self.watched_wait_timeout(timeout)
    }

    fn exit_watch(&self) -> ExitWatch {
        self.watch.clone()
    }

    fn stop(&mut self, grace: Duration) -> Result<ExitInfo, VmmError> {
        if let Some(e) = self.watch.get() {
            return self.finish(e);
        }
        match self.qmp().and_then(|q| Ok(q.system_powerdown()?)) {
            Ok(()) => {
                if let Some(e) = self.watch.wait_timeout(grace) {
                    tracing::info!(id = %self.id, %e, "VM powered down");
                    return self.finish(e);
                }
                tracing::warn!(id = %self.id, ?grace, "VM did not power down, killing it");
            }
            Err(e) => {
                tracing::warn!(id = %self.id, error = %e, "powerdown request failed, killing the VM");
            }
        }
        self.kill()
    }

    fn kill(&mut self) -> Result<ExitInfo, VmmError> {
        self.watch
            .signal(Signal::SIGKILL)
            .map_err(|e| VmmError::io(format!("sending SIGKILL to QEMU pid {}", self.pid), e))?;
        match self.watch.wait_timeout(KILL_WAIT) {
            Some(e) => self.finish(e),
            None => Err(VmmError::Timeout(KILL_WAIT, "QEMU to die after SIGKILL")),
        }
    }

    fn control_endpoint(&self) -> ControlEndpoint {
        ControlEndpoint::Unix(self.control.clone())
    }

    fn console_log(&self) -> &Path {
        &self.console
    }

    fn info(&self) -> InstanceInfo {
        InstanceInfo {
            id: self.id.clone(),
            backend: BackendKind::Qemu,
            pid: self.pid(),
            kernel_release: self.kernel_release.clone(),
            accel: Some(self.accel),
            guest_control_device: Some(self.control_device.guest_name().into()),
            control: self.control_endpoint(),
            qmp_socket: Some(self.qmp_path.clone()),
            console_log: self.console.clone(),
            ports: self.ports.clone(),
            cgroups: self
                .cgroup
                .as_ref()
                .map(|c| c.dirs().to_vec())
                .unwrap_or_default(),
        }
    }

    fn vm_run_state(&mut self) -> Option<Result<RunState, VmmError>> {
        Some(self.query_status())
    }
}

impl Drop for QemuHandle {
    fn drop(&mut self) {
        if self.watch.get().is_none() {
            tracing::warn!(id = %self.id, pid = self.pid, "handle dropped while running, killing the VM");
            if let Err(e) = self.kill() {
                tracing::warn!(id = %self.id, error = %e, "kill on drop failed");
            }
        } else if let Err(e) = self.cleanup() {
            tracing::warn!(id = %self.id, error = %e, "cleanup on drop failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PortForward, ResourceLimits};

    fn spec() -> (InstanceSpec, VmPayload) {
        let vm = VmPayload {
            kernel: "/boot/vmlinuz".into(),
            initramfs: Some("/tmp/i.cpio".into()),
            cmdline: "quiet".into(),
            memory_mib: 256,
            vcpus: 2,
        };
        (
            InstanceSpec {
                id: "vm1".into(),
                payload: Payload::Vm(vm.clone()),
                run_dir: "/run/h/vm1".into(),
                limits: ResourceLimits::default(),
                ports: vec![PortForward::loopback(16379, 6379)],
                control_socket: "/run/h/vm1/control.sock".into(),
            },
            vm,
        )
    }

    #[test]
    fn command_line_carries_spec() {
        let (s, vm) = spec();
        let a = QemuBackend::default()
            .command_line(&s, &vm, Accel::Tcg)
            .unwrap()
            .join(" ");
        for want in [
            "-M q35",
            "-accel tcg,tb-size=64 -cpu max",
            "-m 256 -smp 2",
            "-initrd /tmp/i.cpio",
            "-append quiet console=ttyS0 panic=-1 hitless.control=ttyS1",
            "path=/run/h/vm1/control.sock,server=on,wait=off",
            "-serial chardev:control",
            "-qmp unix:/run/h/vm1/qmp.sock,server=on,wait=off",
            "-netdev user,id=net0,hostfwd=tcp:127.0.0.1:16379-:6379",
            "virtio-net-pci,netdev=net0",
        ] {
            assert!(a.contains(want), "{want:?} missing from {a}");
        }
    }

    #[test]
    fn microvm_needs_virtio_serial_and_commas_rejected() {
        let (mut s, vm) = spec();
        let mut b = QemuBackend::new(QemuConfig {
            machine: MachineType::Microvm,
            ..QemuConfig::default()
        });
        assert!(b.command_line(&s, &vm, Accel::Kvm).is_err());
        b.config.control_device = ControlDevice::VirtioSerial;
        let a = b.command_line(&s, &vm, Accel::Kvm).unwrap().join(" ");
        assert!(a.contains("virtio-serial-device"), "{a}");
        assert!(a.contains("name=hitless.control"), "{a}");
        assert!(a.contains("hitless.control=hitless.control"), "{a}");
        s.control_socket = "/run/a,b.sock".into();
        assert!(matches!(
            b.command_line(&s, &vm, Accel::Kvm),
            Err(VmmError::InvalidSpec(_))
        ));
    }

    #[test]
    fn kernel_release_from_bzimage_header() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bz");
        let mut img = vec![0u8; 0x1000];
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x20e..0x210].copy_from_slice(&0x300u16.to_le_bytes());
        let v = b"6.1.0-test (builder@host) #1 SMP\0";
        img[0x500..0x500 + v.len()].copy_from_slice(v);
        std::fs::write(&p, &img).unwrap();
        assert_eq!(kernel_release(&p).as_deref(), Some("6.1.0-test"));
        img[0x202] = b'X';
        std::fs::write(&p, &img).unwrap();
        assert_eq!(kernel_release(&p), None);
    }
}
