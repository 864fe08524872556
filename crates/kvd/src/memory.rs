//! This process's memory use and limit, as the agent plans with them.
//!
//! The limit is the smallest of the memory cgroup's limit (v2 `memory.max`, or v1
//! `memory.limit_in_bytes`, found through `/proc/self/cgroup`) and the machine's memory
//! (`MemTotal`: a VM guest's whole memory).

use std::fs;

/// Resident memory of this process, bytes (`VmRSS`).
pub fn rss_bytes() -> Option<u64> {
    status_kib(&fs::read_to_string("/proc/self/status").ok()?, "VmRSS:").map(|k| k * 1024)
}

/// The memory this process may use, bytes, if any limit is known.
pub fn limit_bytes() -> Option<u64> {
    let cgroup = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut limits: Vec<u64> = cgroup_limits(&cgroup, |p| fs::read_to_string(p).ok());
    if let Some(total) = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| status_kib(&m, "MemTotal:"))
    {
        limits.push(total * 1024);
    }
    limits.into_iter().min()
}

/// The value in KiB of a `Name:   123 kB` line.
fn status_kib(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(name))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Limits of the memory cgroups named in a `/proc/self/cgroup` text, read with `read`.
fn cgroup_limits(cgroup: &str, read: impl Fn(&str) -> Option<String>) -> Vec<u64> {
    let mut out = Vec::new();
    for line in cgroup.lines() {
        // "hierarchy-id:controllers:path"
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let path = path.trim_end_matches('/');
        let file = if ctrls.is_empty() {
            format!("/sys/fs/cgroup{path}/memory.max")
        } else if ctrls.split(',').any(|c| c == "memory") {
            format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes")
        } else {
            continue;
        };
        // "max" (v2) or a huge number (v1) means no limit.
        if let Some(v) = read(&file).and_then(|t| t.trim().parse::<u64>().ok()) {
            if v < 1 << 60 {
                out.push(v);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_v2_cgroup_limit_is_read_and_max_means_none() {
        let read = |p: &str| match p {
            "/sys/fs/cgroup/hitless/i1/memory.max" => Some("536870912\n".to_string()),
            "/sys/fs/cgroup/other/memory.max" => Some("max\n".to_string()),
            _ => None,
        };
        assert_eq!(cgroup_limits("0::/hitless/i1\n", read), vec![536870912]);
        assert_eq!(cgroup_limits("0::/other\n", read), Vec::<u64>::new());
    }

    #[test]
    fn a_v1_memory_cgroup_limit_is_read_and_other_controllers_ignored() {
        let read = |p: &str| match p {
            "/sys/fs/cgroup/memory/hitless/i2/memory.limit_in_bytes" => {
                Some("268435456".to_string())
            }
            "/sys/fs/cgroup/memory/memory.limit_in_bytes" => {
                Some("9223372036854771712".to_string())
            }
            _ => None,
        };
        let text = "12:cpu,cpuacct:/hitless/i2\n7:memory:/hitless/i2\n";
        assert_eq!(cgroup_limits(text, read), vec![268435456]);
        assert_eq!(cgroup_limits("7:memory:/\n", read), Vec::<u64>::new());
        assert_eq!(cgroup_limits("garbage\n", read), Vec::<u64>::new());
    }

    #[test]
    fn status_lines_parse() {
        let t = "Name:\tkvd\nVmRSS:\t  123456 kB\nMemTotal: 2048 kB\n";
        assert_eq!(status_kib(t, "VmRSS:"), Some(123456));
        assert_eq!(status_kib(t, "MemTotal:"), Some(2048));
        assert_eq!(status_kib(t, "VmHWM:"), None);
        assert!(
            rss_bytes().unwrap() > 0,
            "this test process has resident memory"
        );
    }
}
