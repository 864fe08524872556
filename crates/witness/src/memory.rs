//! A witness held in memory: the reference the conformance suite is checked against, and a
//! witness for tests of drivers (several clients share one [`MemoryWitness`] by cloning it).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::{Cas, Lease, Versioned, Witness, WitnessError, WitnessKind, WitnessRecord};

#[derive(Default)]
struct Inner {
    record: Versioned,
    lease: Option<(String, Instant)>,
    unreachable: bool,
}

/// A witness in memory. Clones share the record.
#[derive(Clone, Default)]
pub struct MemoryWitness {
    inner: Arc<Mutex<Inner>>,
}

impl MemoryWitness {
    /// An empty witness.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes every request fail as unreachable (or answer again).
    pub fn set_unreachable(&self, unreachable: bool) {
        self.lock().unreachable = unreachable;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reach(&self) -> Result<std::sync::MutexGuard<'_, Inner>, WitnessError> {
        let g = self.lock();
        if g.unreachable {
            return Err(WitnessError::Unreachable {
                endpoint: self.endpoint(),
                detail: "cut off (test)".into(),
            });
        }
        Ok(g)
    }
}

#[async_trait]
impl Witness for MemoryWitness {
    fn kind(&self) -> WitnessKind {
        WitnessKind::Builtin
    }

    fn endpoint(&self) -> String {
        "memory".into()
    }

    async fn read(&self) -> Result<Versioned, WitnessError> {
        Ok(self.reach()?.record.clone())
    }

    async fn compare_and_swap(
        &self,
        expected: u64,
        record: &WitnessRecord,
    ) -> Result<Cas, WitnessError> {
        let mut g = self.reach()?;
        if g.record.revision != expected {
            return Ok(Cas::Conflict(g.record.clone()));
        }
        g.record = Versioned {
            record: record.clone(),
            revision: expected + 1,
        };
        Ok(Cas::Swapped {
            revision: expected + 1,
        })
    }

    async fn lease(&self, holder: &str, ttl: Duration) -> Result<Lease, WitnessError> {
        let mut g = self.reach()?;
        let now = Instant::now();
        if let Some((h, until)) = &g.lease {
            if h != holder && *until > now {
                return Ok(Lease::Refused {
                    holder: Some(h.clone()),
                    retry_after: *until - now,
                });
            }
        }
        g.lease = Some((holder.to_string(), now + ttl));
        Ok(Lease::Granted { ttl })
    }

    async fn release(&self, holder: &str) -> Result<(), WitnessError> {
        let mut g = self.reach()?;
        if g.lease.as_ref().is_some_and(|(h, _)| h == holder) {
            g.lease = None;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_memory_witness_passes_the_conformance_suite() {
        let w = MemoryWitness::new();
        crate::conformance::run_all(&w, &w.clone()).await;
    }
}
