//! The pair's witness client, built from the agent's `[witness]` section.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hitless_witness::etcd::EtcdWitness;
use hitless_witness::{Cas, Lease, Versioned, Witness, WitnessError, WitnessKind, WitnessRecord};

use crate::config::WitnessSection;

/// The witness client `section` names (none for `kind = "none"`). A witness that cannot be
/// reached yet is not an error here: its client connects when first asked, and until then
/// the engine makes no control change.
pub async fn connect(section: &WitnessSection) -> Result<Option<Arc<dyn Witness>>, WitnessError> {
    let timeout = Duration::from_millis(section.timeout_ms);
    match section.kind {
        WitnessKind::None => Ok(None),
        WitnessKind::Etcd => {
            let lazy = LazyEtcd {
                endpoints: section.endpoints.clone(),
                pair: section.pair.clone(),
                timeout,
                client: tokio::sync::Mutex::new(None),
            };
            // Checks the configuration now; an etcd that does not answer yet is connected to
            // when first asked.
            match lazy.client().await {
                Ok(_) | Err(WitnessError::Unreachable { .. }) => Ok(Some(Arc::new(lazy))),
                Err(e) => Err(e),
            }
        }
        WitnessKind::Builtin => {
            let endpoints = section
                .endpoints
                .iter()
                .map(|e| {
                    e.parse::<SocketAddr>().map_err(|_| {
                        WitnessError::Config(format!(
                            "{e:?} is not the host:port of a builtin witness"
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let w = hitless_witness::builtin::BuiltinWitness::new(
                endpoints,
                section.pair.clone(),
                timeout,
            )?;
            Ok(Some(Arc::new(w)))
        }
    }
}

/// An etcd client made when first needed (and again after a failed connect).
struct LazyEtcd {
    endpoints: Vec<String>,
    pair: String,
    timeout: Duration,
    client: tokio::sync::Mutex<Option<Arc<EtcdWitness>>>,
}

impl LazyEtcd {
    async fn client(&self) -> Result<Arc<EtcdWitness>, WitnessError> {
        let mut c = self.client.lock().await;
        if let Some(w) = c.as_ref() {
            return Ok(w.clone());
        }
        let w = Arc::new(
            EtcdWitness::connect(self.endpoints.clone(), self.pair.clone(), self.timeout).await?,
        );
        *c = Some(w.clone());
        Ok(w)
    }
}

#[async_trait]
impl Witness for LazyEtcd {
    fn kind(&self) -> WitnessKind {
        WitnessKind::Etcd
    }

    fn endpoint(&self) -> String {
        self.endpoints.join(",")
    }

    async fn read(&self) -> Result<Versioned, WitnessError> {
        self.client().await?.read().await
    }

    async fn compare_and_swap(
        &self,
        expected: u64,
        record: &WitnessRecord,
    ) -> Result<Cas, WitnessError> {
        self.client()
            .await?
            .compare_and_swap(expected, record)
            .await
    }

    async fn lease(&self, holder: &str, ttl: Duration) -> Result<Lease, WitnessError> {
        self.client().await?.lease(holder, ttl).await
    }

    async fn release(&self, holder: &str) -> Result<(), WitnessError> {
        self.client().await?.release(holder).await
    }
}
