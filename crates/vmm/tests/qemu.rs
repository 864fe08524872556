//! QEMU backend against the installed qemu-system-x86_64 and the host's
//! distribution kernel. Skipped, with a printed reason, when either is absent.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hitless_vmm::{
    find_binary, probe_kvm, Backend, ExitInfo, InstanceHandle, InstanceSpec, KvmVerdict, Payload,
    PortForward, QemuBackend, ResourceLimits, VmPayload,
};

/// QEMU tests run one at a time: guests under TCG each want a whole core.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Boot bound under TCG.
const BOOT_BOUND: Duration = Duration::from_secs(60);

fn host_kernel() -> Option<PathBuf> {
    let mut k: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    k.sort();
    k.pop()
}

fn prerequisites() -> Option<(PathBuf, PathBuf, PathBuf)> {
    let Some(qemu) = find_binary(Path::new("qemu-system-x86_64")) else {
        eprintln!("skipping: qemu-system-x86_64 is not installed");
        return None;
    };
    let Some(kernel) = host_kernel() else {
        eprintln!("skipping: no /boot/vmlinuz-* kernel");
        return None;
    };
    let Some(busybox) = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
    else {
        eprintln!("skipping: no static busybox to build the test initramfs");
        return None;
    };
    Some((qemu, kernel, busybox))
}

/// Minimal newc cpio writer for the test initramfs.
struct Newc {
    out: Vec<u8>,
    ino: u32,
}

impl Newc {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        while self.out.len() & 3 != 0 {
            self.out.push(0);
        }
        self.out.extend_from_slice(data);
        while self.out.len() & 3 != 0 {
            self.out.push(0);
        }
    }
}

/// Guest /init: prints a banner on the console, then serves the control
/// port: `ping` -> `pong <kernel release>`, `poweroff` -> powers off.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox mount -t proc proc /proc
ctl=/dev/$(/bin/busybox sed -n 's/.*hitless.control=\([^ ]*\).*/\1/p' /proc/cmdline)
# Keep the port open: a UART with no opener drops what the host sends.
exec 3<>$ctl
/bin/busybox stty -F $ctl raw -echo
echo "HITLESS-READY $(/bin/busybox uname -r) control=$ctl"
echo "hello from the guest" >&3
while read -r cmd <&3; do
  case "$cmd" in
    ping) echo "pong $(/bin/busybox uname -r)" >&3 ;;
    poweroff) echo "bye" >&3; /bin/busybox poweroff -f ;;
  esac
done
"#;

fn initramfs(dir: &Path, busybox: &Path) -> PathBuf {
    let mut w = Newc {
        out: Vec::new(),
        ino: 0,
    };
    for d in ["bin", "dev", "proc", "sys"] {
        w.entry(d, 0o040755, &[], (0, 0));
    }
    w.entry("dev/console", 0o020600, &[], (5, 1));
    w.entry(
        "bin/busybox",
        0o100755,
        &std::fs::read(busybox).unwrap(),
        (0, 0),
    );
    w.entry("init", 0o100755, INIT.as_bytes(), (0, 0));
    w.entry("TRAILER!!!", 0, &[], (0, 0));
    let p = dir.join("initramfs.cpio");
    std::fs::write(&p, &w.out).unwrap();
    p
}

fn vm_spec(dir: &Path, id: &str, kernel: &Path, initrd: &Path) -> InstanceSpec {
    InstanceSpec {
        id: id.into(),
        payload: Payload::Vm(VmPayload {
            kernel: kernel.into(),
            initramfs: Some(initrd.into()),
            cmdline: "quiet".into(),
            memory_mib: 256,
            vcpus: 1,
        }),
        run_dir: dir.join(id),
        limits: ResourceLimits::default(),
        ports: vec![],
        control_socket: dir.join(id).join("control.sock"),
    }
}

fn wait_for_log(path: &Path, needle: &str, bound: Duration) -> String {
    let deadline = Instant::now() + bound;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) || Instant::now() >= deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn read_line(r: &mut BufReader<UnixStream>) -> String {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    line.trim().to_string()
}

#[test]
fn kvm_probe_is_bounded_and_leaves_nothing_behind() {
    let Some((qemu, kernel, _)) = prerequisites() else {
        return;
    };
    let _g = serial();
    let bound = Duration::from_secs(3);
    let v = probe_kvm(&qemu, &kernel, "host", bound);
    eprintln!("KVM verdict: {v:?}");
    assert!(v.probe_time() < bound + Duration::from_secs(2), "{v:?}");
    if let KvmVerdict::Unusable { reason, .. } = &v {
        assert!(!reason.is_empty());
    }
    if !Path::new("/dev/kvm").exists() {
        assert!(!v.usable());
    }
    // The probe's scratch directory is gone.
    let leftovers = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("hitless-kvm-probe-{}-", std::process::id()))
        })
        .count();
    assert_eq!(leftovers, 0);
}

#[test]
fn vm_boots_talks_on_control_port_and_stops() {
    let Some((_, kernel, busybox)) = prerequisites() else {
        return;
    };
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let initrd = initramfs(dir.path(), &busybox);
    let mut s = vm_spec(dir.path(), "vm-boot", &kernel, &initrd);
    // A forward with an unused host port shows user networking is wired.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    s.ports = vec![PortForward::loopback(port, 6379)];
    let backend = QemuBackend::default();
    let t0 = Instant::now();
    let mut h = backend.start_vm(&s).unwrap();
    let started = t0.elapsed();
    let info = h.info();
    eprintln!("started in {started:?} with {:?}", info.accel);
    assert_eq!(info.pid, h.pid());
    assert_eq!(
        info.kernel_release.as_deref(),
        kernel
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .strip_prefix("vmlinuz-")
    );
    assert_eq!(info.guest_control_device.as_deref(), Some("ttyS1"));
    // Connect before the guest writes: the server drops bytes while no
    // client is attached.
    let ctl = UnixStream::connect(h.control_endpoint().path()).unwrap();
    ctl.set_read_timeout(Some(BOOT_BOUND)).unwrap();
    let mut w = ctl.try_clone().unwrap();
    let mut r = BufReader::new(ctl);
    let st = h.query_status().unwrap();
    assert_eq!(st.status, "running");

    let log = wait_for_log(h.console_log(), "HITLESS-READY", BOOT_BOUND);
    let booted = t0.elapsed();
    assert!(log.contains("HITLESS-READY"), "console log:\n{log}");
    let release = info.kernel_release.clone().unwrap();
    assert!(
        log.contains(&format!("HITLESS-READY {release} control=/dev/ttyS1")),
        "{log}"
    );
    eprintln!("boot to ready: {booted:?}");
    assert_eq!(read_line(&mut r), "hello from the guest");
    w.write_all(b"ping\n").unwrap();
    assert_eq!(read_line(&mut r), format!("pong {release}"));
    // The forward's host side is listening.
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());

    // The guest has no ACPI daemon: powerdown is ignored and the VM is killed
    // after the bound.
    let t = Instant::now();
    let grace = Duration::from_secs(2);
    let e = h.stop(grace).unwrap();
    assert_eq!(e, ExitInfo::Signal(libc::SIGKILL));
    assert!(t.elapsed() >= grace);
    assert_eq!(h.pid(), None);
    assert!(
        !h.control_endpoint().path().exists(),
        "control socket left behind"
    );
}

#[test]
fn vm_powers_off_on_request_and_dies_on_kill_9() {
    let Some((_, kernel, busybox)) = prerequisites() else {
        return;
    };
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let initrd = initramfs(dir.path(), &busybox);
    let backend = QemuBackend::default();

    // kill -9 of the reported pid ends the instance.
    let s = vm_spec(dir.path(), "vm-kill", &kernel, &initrd);
    let mut h = backend.start(&s).unwrap();
    let pid = h.pid().unwrap();
    // SAFETY: kill(2) on our own child, which is not reaped yet.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    assert_eq!(
        h.wait_timeout(Duration::from_secs(10)).unwrap(),
        Some(ExitInfo::Signal(9))
    );
    assert!(!h.status().is_running());

    // A guest-initiated poweroff is a clean exit.
    let s = vm_spec(dir.path(), "vm-off", &kernel, &initrd);
    let mut h = backend.start(&s).unwrap();
    let ctl = UnixStream::connect(h.control_endpoint().path()).unwrap();
    ctl.set_read_timeout(Some(BOOT_BOUND)).unwrap();
    let mut w = ctl.try_clone().unwrap();
    let mut r = BufReader::new(ctl);
    assert_eq!(read_line(&mut r), "hello from the guest");
    w.write_all(b"poweroff\n").unwrap();
    assert_eq!(read_line(&mut r), "bye");
    assert_eq!(
        h.wait_timeout(Duration::from_secs(20)).unwrap(),
        Some(ExitInfo::Code(0))
    );
    assert!(std::fs::read_to_string(h.console_log())
        .unwrap()
        .contains("HITLESS-READY"));
}

#[test]
fn bad_vm_specs_are_clear_errors() {
    let Some((_, kernel, _)) = prerequisites() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let backend = QemuBackend::default();
    let s = vm_spec(
        dir.path(),
        "vm-bad",
        Path::new("/nonexistent/vmlinuz"),
        &kernel,
    );
    let err = backend.start(&s).err().unwrap();
    assert!(err.to_string().contains("/nonexistent/vmlinuz"), "{err}");
    let mut s = vm_spec(
        dir.path(),
        "vm-bad",
        &kernel,
        Path::new("/nonexistent/initrd"),
    );
    assert!(backend.start(&s).is_err());
    s.payload = Payload::Vm(VmPayload {
        kernel: kernel.clone(),
        initramfs: None,
        cmdline: String::new(),
        memory_mib: 1,
        vcpus: 1,
    });
    let err = backend.start(&s).err().unwrap();
    assert!(err.to_string().contains("MiB"), "{err}");
}
