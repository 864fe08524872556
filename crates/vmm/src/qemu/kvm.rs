//! Deciding whether KVM actually works.
//!
//! `/dev/kvm` existing is not enough: on some hosts (nested virtualization
//! with incomplete CPU support) a KVM guest aborts on an MSR write or hangs
//! before printing anything. The probe boots the real guest kernel under KVM
//! with an early serial console and waits a short, bounded time for the
//! `Linux version` banner; anything else (abort, silence) means KVM is
//! unusable and VMs fall back to TCG. A real-mode toy guest is not enough:
//! the hangs seen in practice happen only once the kernel switches modes.

use std::fs::OpenOptions;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Outcome of a KVM probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvmVerdict {
    /// A KVM guest printed its banner within the bound.
    Usable {
        /// How long the banner took.
        probe: Duration,
    },
    /// KVM cannot be used.
    Unusable {
        /// Why.
        reason: String,
        /// How long the probe took.
        probe: Duration,
    },
}

impl KvmVerdict {
    /// True when KVM works.
    pub fn usable(&self) -> bool {
        matches!(self, KvmVerdict::Usable { .. })
    }

    /// Time the probe took.
    pub fn probe_time(&self) -> Duration {
        match self {
            KvmVerdict::Usable { probe } | KvmVerdict::Unusable { probe, .. } => *probe,
        }
    }
}

fn probe_dir() -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("hitless-kvm-probe-{}-{n}", std::process::id()))
}

/// Probes KVM by booting `kernel` under `qemu` with `cpu` as CPU model,
/// waiting at most `timeout` for the kernel banner on the serial console.
/// Never leaves a process behind.
pub fn probe_kvm(qemu: &Path, kernel: &Path, cpu: &str, timeout: Duration) -> KvmVerdict {
    let start = Instant::now();
    let unusable = |reason: String| KvmVerdict::Unusable {
        reason,
        probe: start.elapsed(),
    };
    if let Err(e) = OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        return unusable(format!("cannot open /dev/kvm: {e}"));
    }
    let dir = probe_dir();
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return unusable(format!("cannot create {}: {e}", dir.display()));
    }
    let serial = dir.join("serial.log");
    let stderr_path = dir.join("qemu.log");
    let verdict = (|| {
        let stderr = std::fs::File::create(&stderr_path)
            .map_err(|e| format!("cannot create {}: {e}", stderr_path.display()))?;
        let mut child = Command::new(qemu)
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .args([
                "-M", "q35", "-accel", "kvm", "-cpu", cpu, "-m", "128", "-smp", "1",
            ])
            .arg("-kernel")
            .arg(kernel)
            .args(["-append", "console=ttyS0 earlyprintk=serial panic=-1"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", qemu.display()))?;
        let deadline = start + timeout;
        let outcome = loop {
            let text = std::fs::read_to_string(&serial).unwrap_or_default();
            if text.contains("Linux version") {
                break Ok(());
            }
            match child.try_wait() {
                Ok(Some(status)) => {
                    let mut err = String::new();
                    if let Ok(f) = std::fs::File::open(&stderr_path) {
                        let _ = f.take(4096).read_to_string(&mut err);
                    }
                    let last = err.lines().last().unwrap_or("").trim().to_string();
                    break Err(format!(
                        "the probe guest exited ({status}) before booting: {last}"
                    ));
                }
                Ok(None) => {}
                Err(e) => break Err(format!("waiting for the probe guest failed: {e}")),
            }
            if Instant::now() >= deadline {
                break Err(format!(
                    "no kernel banner on the serial console within {timeout:?}"
                ));
            }
            // Polling a file here is bounded by `timeout`; the probe runs
            // once per process.
            std::thread::sleep(Duration::from_millis(50));
        };
        let _ = child.kill();
        let _ = child.wait();
        outcome
    })();
    let _ = std::fs::remove_dir_all(&dir);
    match verdict {
        Ok(()) => KvmVerdict::Usable {
            probe: start.elapsed(),
        },
        Err(reason) => unusable(reason),
    }
}

/// The process-wide verdict: probes once, then answers from the cache.
pub(crate) fn cached_verdict(
    qemu: &Path,
    kernel: &Path,
    cpu: &str,
    timeout: Duration,
) -> KvmVerdict {
    static VERDICT: OnceLock<KvmVerdict> = OnceLock::new();
    VERDICT
        .get_or_init(|| {
            let v = probe_kvm(qemu, kernel, cpu, timeout);
            match &v {
                KvmVerdict::Usable { probe } => {
                    tracing::info!(?probe, "KVM usable");
                }
                KvmVerdict::Unusable { reason, probe } => {
                    tracing::warn!(?probe, "KVM unusable ({reason}), falling back to TCG");
                }
            }
            v
        })
        .clone()
}
