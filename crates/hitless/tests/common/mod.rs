//! What the end-to-end lab tests share: the binary, run directories, `lab issu` with its JSON
//! report, and tearing a kept lab down.

#![allow(dead_code)] // each test binary uses its own part

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

pub fn hitless() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hitless"))
}

/// The run directory of a test's lab.
pub fn lab_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("hitless-test-{name}"))
}

/// Runs `hitless lab issu --json --hosts HOSTS` in `dir` with extra arguments; returns the
/// report whatever the exit status (a report that counts a loss exits non-zero), and panics
/// with both agents' logs when there is none.
pub fn lab_issu_in(dir: &Path, hosts: &str, extra: &[&str]) -> Value {
    let out = Command::new(hitless())
        .args(["lab", "issu", "--json", "--hosts", hosts, "--dir"])
        .arg(dir)
        .args(extra)
        .output()
        .expect("running hitless lab issu");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}); exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}\nprimary log:\n{}\nsecondary log:\n{}",
            out.status,
            tail(&dir.join("primary.log")),
            tail(&dir.join("secondary.log"))
        )
    });
    eprintln!("{}", serde_json::to_string_pretty(&report).unwrap());
    report
}

/// The last 40 lines of a file.
pub fn tail(p: &Path) -> String {
    let s = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Tears a kept lab down when dropped (also when the test fails).
pub struct LabDown(pub PathBuf);

impl Drop for LabDown {
    fn drop(&mut self) {
        let _ = Command::new(hitless())
            .args(["lab", "down", "--dir"])
            .arg(&self.0)
            .output();
    }
}

/// Runs `hitless lab check --json` in `dir` with extra arguments; returns the report whatever
/// the exit status (a loss exits non-zero), and panics with the agents' and the witness's
/// logs when there is none.
pub fn lab_check_in(dir: &Path, extra: &[&str]) -> Value {
    let out = Command::new(hitless())
        .args(["lab", "check", "--json", "--dir"])
        .arg(dir)
        .args(extra)
        .output()
        .expect("running hitless lab check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}); exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}\nprimary log:\n{}\nsecondary log:\n{}\nwitness log:\n{}",
            out.status,
            tail(&dir.join("primary.log")),
            tail(&dir.join("secondary.log")),
            tail(&dir.join("witness.log"))
        )
    });
    eprintln!("{}", serde_json::to_string_pretty(&report).unwrap());
    report
}
