//! Ops on the peer appliance, over the peer link, and the messages the link carries.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hitless_core::ApplianceId;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::appliance::{Observation, Op, OpOk};
use crate::peer::PeerLink;

/// Messages between the two agents.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "kebab-case")]
pub enum PeerMsg {
    /// Sent every heartbeat interval.
    Heartbeat {
        from: ApplianceId,
        driving: bool,
        epoch: u64,
    },
    /// Run an op on the receiver's appliance.
    Request { id: u64, op: Op },
    /// The result of a request.
    Response {
        id: u64,
        result: Result<OpOk, String>,
    },
    /// Something happened on the sender's appliance.
    Observed { observation: Observation },
    /// A journal record of the driver, to mirror (hex of the verified envelope).
    Journal { index: u64, envelope: String },
}

/// Requests sent to the peer, waiting for their result.
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<OpOk, String>>>>>;

/// The peer appliance, as seen from this agent. Cheap to clone.
#[derive(Clone)]
pub struct Remote {
    link: PeerLink<PeerMsg>,
    pending: Pending,
    next: Arc<AtomicU64>,
    peer: ApplianceId,
}

/// Requests waiting for their response, at most.
pub const MAX_PENDING: usize = 1024;

impl Remote {
    /// The peer appliance reached over `link`.
    pub fn new(link: PeerLink<PeerMsg>, peer: ApplianceId) -> Self {
        Self {
            link,
            pending: Arc::new(Mutex::new(HashMap::new())),
            next: Arc::new(AtomicU64::new(1)),
            peer,
        }
    }

    /// The link.
    pub fn link(&self) -> &PeerLink<PeerMsg> {
        &self.link
    }

    /// Runs `op` on the peer appliance and waits (bounded) for its result.
    pub async fn exec(&self, op: Op) -> Result<OpOk, String> {
        if !self.link.is_up() {
            return Err(format!("the {} appliance is unreachable", self.peer));
        }
        let bound = match &op {
            Op::Start { .. } => Duration::from_secs(200),
            Op::Stop { .. } | Op::Kill { .. } => Duration::from_secs(60),
            // Verifying an image reads every byte of it.
            Op::AddImage { .. } => Duration::from_secs(300),
            Op::FrontHold { bound_ms } => Duration::from_millis(*bound_ms) + Duration::from_secs(2),
            _ => Duration::from_secs(15),
        };
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self.pending.lock().expect("pending lock");
            if p.len() >= MAX_PENDING {
                return Err(format!(
                    "{MAX_PENDING} requests to the {} appliance are already waiting",
                    self.peer
                ));
            }
            p.insert(id, tx);
        }
        if let Err(e) = self.link.send(PeerMsg::Request { id, op }) {
            self.pending.lock().expect("pending lock").remove(&id);
            return Err(e.to_string());
        }
        match tokio::time::timeout(bound, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err("the request to the peer appliance was dropped".into()),
            Err(_) => {
                self.pending.lock().expect("pending lock").remove(&id);
                Err(format!(
                    "the {} appliance did not answer within {bound:?}",
                    self.peer
                ))
            }
        }
    }

    /// Completes a request with the peer's response.
    pub fn complete(&self, id: u64, result: Result<OpOk, String>) {
        if let Some(tx) = self.pending.lock().expect("pending lock").remove(&id) {
            let _ = tx.send(result);
        }
    }

    /// Fails every waiting request (the peer was lost).
    pub fn fail_all(&self) {
        let all: Vec<_> = self.pending.lock().expect("pending lock").drain().collect();
        for (_, tx) in all {
            let _ = tx.send(Err(format!("the {} appliance was lost", self.peer)));
        }
    }

    /// Sends a journal record to the peer's mirror.
    pub fn mirror(&self, index: u64, envelope: Vec<u8>) {
        let _ = self.link.send(PeerMsg::Journal {
            index,
            envelope: hex::encode(&envelope),
        });
    }
}
