//! What runs during the ISSU, sampled from the agents' status.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::ops;
use crate::ApiArgs;

pub(super) struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(u64, Vec<String>)>,
}

impl Sampler {
    pub(super) fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0u64;
            let mut kernels = std::collections::BTreeSet::new();
            // Bounded by the ISSU's own bound; stops when told.
            while !s.load(Ordering::Acquire) {
                if let Ok((_, st)) = ops::driving_status(&ApiArgs { api: None }) {
                    let all: Vec<_> = st
                        .local
                        .instances
                        .iter()
                        .chain(st.peer.iter().flat_map(|p| p.instances.iter()))
                        .collect();
                    peak = peak.max(all.len() as u64);
                    kernels.extend(all.iter().filter_map(|i| i.kernel_release.clone()));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            (peak, kernels.into_iter().collect())
        });
        Self { stop, thread }
    }

    pub(super) fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Release);
        self.thread.join().unwrap_or_default()
    }
}
