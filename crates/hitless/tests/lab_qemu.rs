//! End-to-end across real virtual machines: four QEMU guests at the peak (two per appliance),
//! each booting Debian's kernel with the lab's initramfs and kvd, upgraded under client load.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok()
}

fn kernel_present() -> bool {
    std::fs::read_dir("/boot")
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"))
        })
        .unwrap_or(false)
}

#[test]
fn qemu_lab_issu_commits_across_four_vms_without_losing_an_acknowledged_write() {
    for tool in ["qemu-system-x86_64", "redis-benchmark"] {
        if !have(tool) {
            eprintln!("SKIPPED: {tool} is not installed (scripts/setup installs it)");
            return;
        }
    }
    if !kernel_present() || !std::path::Path::new("/bin/busybox").exists() {
        eprintln!("SKIPPED: no /boot/vmlinuz-* or /bin/busybox (scripts/setup installs them)");
        return;
    }
    let dir = std::env::temp_dir().join("hitless-test-qemu");
    let out = Command::new(PathBuf::from(env!("CARGO_BIN_EXE_hitless")))
        .args([
            "lab",
            "issu",
            "--json",
            "--backend",
            "qemu",
            "--hosts",
            "loopback",
            "--dir",
        ])
        .arg(&dir)
        .output()
        .expect("running hitless lab issu --backend qemu");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}); exit {:?}\nstdout:\n{stdout}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    eprintln!("{}", serde_json::to_string_pretty(&report).unwrap());
    assert_eq!(report["backend"], "qemu");
    assert_eq!(report["result"], "committed");
    assert_eq!(report["final_control"]["version"], "2.0.0");
    assert_eq!(report["acked_lost"], 0);
    assert_eq!(report["client_errors"], 0);
    assert!(report["acked_writes"].as_u64().unwrap() > 10);
    assert!(
        report["peak_instances"].as_u64().unwrap() >= 4,
        "the upgrade must run four VMs at its peak"
    );
    let kernels = report["guest_kernels"].as_array().expect("guest kernels");
    assert!(
        !kernels.is_empty(),
        "guests must report their kernel release"
    );
}
