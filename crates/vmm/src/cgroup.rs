//! Per-instance cgroups, v1 or v2.
//!
//! Layout: `<root>/<controller>/hitless/<id>` on v1 (one directory per
//! controller among memory, cpu and pids), `<root>/hitless/<id>` on v2.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::{ResourceLimits, VmmError};

/// Name of the parent cgroup every instance cgroup lives under.
pub const PARENT: &str = "hitless";

const V1_CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// Which cgroup hierarchy this host uses for resource control.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CgroupVersion {
    /// Legacy per-controller hierarchies under `root/<controller>`.
    V1 {
        /// Usually `/sys/fs/cgroup`.
        root: PathBuf,
    },
    /// The unified hierarchy mounted at `root`.
    V2 {
        /// Usually `/sys/fs/cgroup`.
        root: PathBuf,
    },
}

impl CgroupVersion {
    /// Detects the hierarchy under `/sys/fs/cgroup`. A hybrid host (v1
    /// controllers plus an empty `unified` v2 mount) counts as v1, since the
    /// controllers live there.
    pub fn detect() -> Option<CgroupVersion> {
        Self::detect_at(Path::new("/sys/fs/cgroup"))
    }

    /// Detects the hierarchy under `root`.
    pub fn detect_at(root: &Path) -> Option<CgroupVersion> {
        if root.join("cgroup.controllers").is_file() {
            Some(CgroupVersion::V2 { root: root.into() })
        } else if root.join("memory/memory.limit_in_bytes").is_file() {
            Some(CgroupVersion::V1 { root: root.into() })
        } else {
            None
        }
    }
}

/// The cgroup directories of one instance. Removed by [`InstanceCgroup::remove`]
/// or on drop.
#[derive(Debug)]
pub struct InstanceCgroup {
    version: CgroupVersion,
    dirs: Vec<PathBuf>,
    removed: bool,
}

fn write(path: &Path, value: &str) -> Result<(), VmmError> {
    fs::write(path, value).map_err(|e| VmmError::Cgroup {
        path: path.into(),
        reason: format!("writing {value:?} failed: {e}"),
    })
}

fn mkdir_fresh(dir: &Path) -> Result<(), VmmError> {
    if dir.exists() {
        // Left over from an instance that was not cleaned up: reuse only if
        // empty, which rmdir checks for us.
        fs::remove_dir(dir).map_err(|e| VmmError::Cgroup {
            path: dir.into(),
            reason: format!("already exists and cannot be removed (still in use?): {e}"),
        })?;
    }
    fs::create_dir_all(dir).map_err(|e| VmmError::Cgroup {
        path: dir.into(),
        reason: format!("cannot create: {e}"),
    })
}

impl InstanceCgroup {
    /// Creates the cgroup for `id` and writes `limits`.
    pub fn create(
        version: &CgroupVersion,
        id: &str,
        limits: &ResourceLimits,
    ) -> Result<InstanceCgroup, VmmError> {
        let mut cg = InstanceCgroup {
            version: version.clone(),
            dirs: Vec::new(),
            removed: false,
        };
        match version {
            CgroupVersion::V1 { root } => {
                for ctrl in V1_CONTROLLERS {
                    let base = root.join(ctrl);
                    if !base.join("cgroup.procs").is_file() {
                        let needed = match ctrl {
                            "cpu" => limits.cpu.is_some(),
                            "pids" => limits.pids_max.is_some(),
                            _ => limits.memory_bytes.is_some(),
                        };
                        if needed {
                            return Err(VmmError::Cgroup {
                                path: base,
                                reason: format!("the {ctrl} controller is not mounted"),
                            });
                        }
                        continue;
                    }
                    let dir = base.join(PARENT).join(id);
                    mkdir_fresh(&dir)?;
                    cg.dirs.push(dir.clone());
                    match ctrl {
                        "memory" => {
                            if let Some(m) = limits.memory_bytes {
                                write(&dir.join("memory.limit_in_bytes"), &m.to_string())?;
                            }
                        }
                        "cpu" => {
                            if let Some(q) = limits.cpu {
                                write(&dir.join("cpu.cfs_period_us"), &q.period_us.to_string())?;
                                write(&dir.join("cpu.cfs_quota_us"), &q.quota_us.to_string())?;
                            }
                        }
                        _ => {
                            if let Some(p) = limits.pids_max {
                                write(&dir.join("pids.max"), &p.to_string())?;
                            }
                        }
                    }
                }
            }
            CgroupVersion::V2 { root } => {
                let parent = root.join(PARENT);
                fs::create_dir_all(&parent).map_err(|e| VmmError::Cgroup {
                    path: parent.clone(),
                    reason: format!("cannot create: {e}"),
                })?;
                let available =
                    fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
                let wanted: Vec<&str> = ["memory", "cpu", "pids"]
                    .into_iter()
                    .filter(|c| available.split_whitespace().any(|a| a == *c))
                    .collect();
                let enable = wanted
                    .iter()
                    .map(|c| format!("+{c}"))
                    .collect::<Vec<_>>()
                    .join(" ");
                if !enable.is_empty() {
                    write(&root.join("cgroup.subtree_control"), &enable)?;
                    write(&parent.join("cgroup.subtree_control"), &enable)?;
                }
                let dir = parent.join(id);
                mkdir_fresh(&dir)?;
                cg.dirs.push(dir.clone());
                if let Some(m) = limits.memory_bytes {
                    write(&dir.join("memory.max"), &m.to_string())?;
                }
                if let Some(q) = limits.cpu {
                    write(
                        &dir.join("cpu.max"),
                        &format!("{} {}", q.quota_us, q.period_us),
                    )?;
                }
                if let Some(p) = limits.pids_max {
                    write(&dir.join("pids.max"), &p.to_string())?;
                }
            }
        }
        Ok(cg)
    }

    /// Moves `pid` into every directory of this cgroup.
    pub fn add_pid(&self, pid: u32) -> Result<(), VmmError> {
        for d in &self.dirs {
            write(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// The cgroup directories.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Which hierarchy the cgroup lives in.
    pub fn version(&self) -> &CgroupVersion {
        &self.version
    }

    fn find(&self, file: &str) -> Option<PathBuf> {
        self.dirs.iter().map(|d| d.join(file)).find(|p| p.is_file())
    }

    fn read_u64(&self, v1: &str, v2: &str) -> Result<Option<u64>, VmmError> {
        let file = match self.version {
            CgroupVersion::V1 { .. } => v1,
            CgroupVersion::V2 { .. } => v2,
        };
        let Some(path) = self.find(file) else {
            return Ok(None);
        };
        let text = fs::read_to_string(&path).map_err(|e| VmmError::Cgroup {
            path: path.clone(),
            reason: format!("cannot read: {e}"),
        })?;
        let t = text.trim();
        if t == "max" {
            return Ok(None);
        }
        t.parse().map(Some).map_err(|_| VmmError::Cgroup {
            path,
            reason: format!("unexpected content {t:?}"),
        })
    }

    /// Memory limit as the kernel reports it (`None` when unlimited on v2).
    pub fn memory_limit(&self) -> Result<Option<u64>, VmmError> {
        self.read_u64("memory.limit_in_bytes", "memory.max")
    }

    /// Current memory usage in bytes.
    pub fn memory_usage(&self) -> Result<Option<u64>, VmmError> {
        self.read_u64("memory.usage_in_bytes", "memory.current")
    }

    /// Removes the directories, retrying for up to a second while the last
    /// tasks leave.
    pub fn remove(&mut self) -> Result<(), VmmError> {
        if self.removed {
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_secs(1);
        for d in &self.dirs {
            loop {
                match fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == ErrorKind::NotFound => break,
                    Err(e) if Instant::now() < deadline => {
                        tracing::trace!(dir = %d.display(), error = %e, "cgroup busy, retrying");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => {
                        return Err(VmmError::Cgroup {
                            path: d.clone(),
                            reason: format!("cannot remove: {e}"),
                        })
                    }
                }
            }
        }
        self.removed = true;
        Ok(())
    }
}

impl Drop for InstanceCgroup {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            tracing::warn!(error = %e, "cgroup left behind");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_layouts() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(CgroupVersion::detect_at(t.path()), None);
        fs::create_dir_all(t.path().join("memory")).unwrap();
        fs::write(t.path().join("memory/memory.limit_in_bytes"), "1").unwrap();
        assert!(matches!(
            CgroupVersion::detect_at(t.path()),
            Some(CgroupVersion::V1 { .. })
        ));
        fs::write(t.path().join("cgroup.controllers"), "cpu memory").unwrap();
        assert!(matches!(
            CgroupVersion::detect_at(t.path()),
            Some(CgroupVersion::V2 { .. })
        ));
    }

    #[test]
    fn v2_layout_on_plain_directory() {
        // A plain directory stands in for cgroupfs: files are written, not
        // interpreted, which checks the layout and the values.
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("cgroup.controllers"), "cpu memory pids io").unwrap();
        let v = CgroupVersion::detect_at(t.path()).unwrap();
        let limits = ResourceLimits {
            memory_bytes: Some(64 << 20),
            cpu: Some(crate::CpuQuota::from_millicpus(250)),
            pids_max: Some(100),
        };
        let mut cg = InstanceCgroup::create(&v, "i1", &limits).unwrap();
        let dir = t.path().join("hitless/i1");
        assert_eq!(cg.dirs(), std::slice::from_ref(&dir));
        assert_eq!(
            fs::read_to_string(dir.join("cpu.max")).unwrap(),
            "25000 100000"
        );
        assert_eq!(cg.memory_limit().unwrap(), Some(64 << 20));
        assert_eq!(
            fs::read_to_string(t.path().join("cgroup.subtree_control")).unwrap(),
            "+memory +cpu +pids"
        );
        // Plain directories with files cannot be rmdir'ed: removal reports it.
        assert!(matches!(cg.remove(), Err(VmmError::Cgroup { .. })));
        fs::remove_dir_all(&dir).unwrap();
        cg.remove().unwrap();
    }
}
