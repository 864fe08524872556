//! What runs during the ISSU, sampled from the agents' status: how many instances, their
//! guest kernels and each instance's memory (from `/proc/<pid>/status` of its process: the
//! sandboxed service, or the QEMU process of a VM).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hitless_core::InstanceId;

use super::report::InstanceFigures;
use crate::ops;
use crate::ApiArgs;

/// How often the sampler asks the driving agent and reads /proc.
pub(super) const INTERVAL: Duration = Duration::from_millis(100);

/// What the sampler saw.
#[derive(Debug, Default)]
pub(super) struct Sampled {
    pub peak_instances: u64,
    pub guest_kernels: Vec<String>,
    pub instances: Vec<InstanceFigures>,
}

/// One instance as seen so far.
#[derive(Debug, Default)]
struct Seen {
    appliance: String,
    version: String,
    pid: Option<u32>,
    peak_rss: Option<u64>,
    rss: Option<u64>,
    first_rss: Option<u64>,
    first_seen: Option<Duration>,
}

pub(super) struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Sampled>,
}

impl Sampler {
    /// Starts sampling; times are reported from `origin` on.
    pub(super) fn start(origin: Instant) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0u64;
            let mut kernels = std::collections::BTreeSet::new();
            let mut seen: BTreeMap<InstanceId, Seen> = BTreeMap::new();
            // Bounded by the ISSU's own bound; stops when told.
            while !s.load(Ordering::Acquire) {
                if let Ok((_, st)) = ops::driving_status(&ApiArgs { api: None }) {
                    let at = origin.elapsed();
                    let all: Vec<_> = st
                        .local
                        .instances
                        .iter()
                        .chain(st.peer.iter().flat_map(|p| p.instances.iter()))
                        .collect();
                    peak = peak.max(all.len() as u64);
                    kernels.extend(all.iter().filter_map(|i| i.kernel_release.clone()));
                    for i in &all {
                        let e = seen.entry(i.instance).or_default();
                        e.appliance = i.appliance.to_string();
                        e.version = i.image.version.to_string();
                        e.pid = i.pid;
                        e.first_seen.get_or_insert(at);
                        if let Some((hwm, rss)) = i.pid.and_then(memory) {
                            e.peak_rss = e.peak_rss.max(Some(hwm));
                            e.rss = Some(rss);
                            e.first_rss.get_or_insert(rss);
                        }
                    }
                }
                std::thread::sleep(INTERVAL);
            }
            Sampled {
                peak_instances: peak,
                guest_kernels: kernels.into_iter().collect(),
                instances: seen
                    .into_iter()
                    .map(|(id, e)| InstanceFigures {
                        instance: id.to_string(),
                        appliance: e.appliance,
                        version: e.version,
                        pid: e.pid,
                        peak_rss_bytes: e.peak_rss,
                        rss_bytes: e.rss,
                        first_rss_bytes: e.first_rss,
                        first_seen_s: e.first_seen.unwrap_or_default().as_secs_f64(),
                    })
                    .collect(),
            }
        });
        Self { stop, thread }
    }

    pub(super) fn finish(self) -> Sampled {
        self.stop.store(true, Ordering::Release);
        self.thread.join().unwrap_or_default()
    }
}

/// The peak (VmHWM) and current (VmRSS) resident set of `pid`, in bytes.
fn memory(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_memory(&text)
}

fn parse_memory(status: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_figures_are_read_from_proc_status() {
        let status = "Name:\tkvd\nVmPeak:\t  200000 kB\nVmHWM:\t   51200 kB\nVmRSS:\t   40960 kB\n";
        assert_eq!(parse_memory(status), Some((51200 * 1024, 40960 * 1024)));
        assert_eq!(parse_memory("Name:\tkthreadd\n"), None);
        let me = memory(std::process::id()).expect("this process's memory");
        assert!(me.0 >= me.1 && me.1 > 0, "{me:?}");
    }
}
