//! Ops on the peer appliance, over the peer link, and the messages the link carries.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hitless_core::ApplianceId;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::oneshot;

use crate::appliance::{Observation, Op, OpOk};
use crate::peer::{PeerError, PeerLink};

/// Why an op on an appliance (this one or the peer) failed.
#[derive(Debug, Error)]
pub enum OpError {
    /// The peer link is down: the op was not sent, or the link went down before its answer.
    /// The op may or may not have run on the peer.
    #[error("the {appliance} appliance {how}")]
    PeerUnreachable {
        appliance: ApplianceId,
        how: Unreachable,
    },
    /// The peer did not answer within the op's bound (the link stayed up).
    #[error("the {appliance} appliance did not answer within {bound:?}")]
    Timeout {
        appliance: ApplianceId,
        bound: Duration,
    },
    /// Too many requests to the peer are waiting for their answer already.
    #[error("{MAX_PENDING} requests to the {appliance} appliance are already waiting")]
    Busy { appliance: ApplianceId },
    /// The request could not be queued on the peer link.
    #[error("the request to the {appliance} appliance was not sent: {source}")]
    Unsent {
        appliance: ApplianceId,
        source: PeerError,
    },
    /// The request was dropped before its answer came (the agent is shutting down).
    #[error("the request to the {appliance} appliance was dropped")]
    Dropped { appliance: ApplianceId },
    /// The appliance ran the op and it failed there; `reason` says why.
    #[error("{reason}")]
    Refused {
        appliance: ApplianceId,
        reason: String,
    },
    /// The appliance answered with a result of another kind than the op's.
    #[error("expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: String },
}

impl OpError {
    /// Whether the op failed because the peer appliance cannot be reached (rather than
    /// because the appliance refused it or answered late).
    pub fn peer_unreachable(&self) -> bool {
        matches!(self, OpError::PeerUnreachable { .. })
    }

    /// An answer of the wrong kind.
    pub fn unexpected(expected: &'static str, got: &OpOk) -> Self {
        OpError::Unexpected {
            expected,
            got: format!("{got:?}"),
        }
    }
}

/// How the peer appliance is unreachable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unreachable {
    /// The link was down when the op was to be sent.
    LinkDown,
    /// The link went down while the op waited for its answer.
    Lost,
    /// The link is closed (the agent is shutting down).
    Closed,
}

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Unreachable::LinkDown => "is unreachable",
            Unreachable::Lost => "was lost",
            Unreachable::Closed => "is unreachable: the peer link is closed",
        })
    }
}

/// What kind of failure an op answered over the peer link is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// The peer's appliance ran the op and it failed there.
    Refused,
    /// A kind this agent does not know (sent by a later release).
    #[serde(other)]
    Other,
}

/// An op's failure as the peer link carries it: its kind and its sentence.
///
/// Agents of earlier releases send the sentence alone (`"Err": "..."`); that shape still
/// decodes, as [`FailureKind::Refused`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "FailureShape")]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

/// Every shape of [`Failure`] on the wire.
#[derive(Deserialize)]
#[serde(untagged)]
enum FailureShape {
    Typed { kind: FailureKind, message: String },
    Sentence(String),
}

impl From<FailureShape> for Failure {
    fn from(s: FailureShape) -> Self {
        match s {
            FailureShape::Typed { kind, message } => Failure { kind, message },
            FailureShape::Sentence(message) => Failure {
                kind: FailureKind::Refused,
                message,
            },
        }
    }
}

impl Failure {
    /// The failure of an op this agent's appliance ran for the peer.
    pub fn refused(message: impl Into<String>) -> Self {
        Failure {
            kind: FailureKind::Refused,
            message: message.into(),
        }
    }

    /// The error of the op, as the requesting agent sees it (`peer` ran it).
    pub fn into_op_error(self, peer: ApplianceId) -> OpError {
        match self.kind {
            FailureKind::Refused | FailureKind::Other => OpError::Refused {
                appliance: peer,
                reason: self.message,
            },
        }
    }
}

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
        result: Result<OpOk, Failure>,
    },
    /// Something happened on the sender's appliance.
    Observed { observation: Observation },
    /// A journal record of the driver, to mirror (hex of the verified envelope).
    Journal { index: u64, envelope: String },
}

/// Requests sent to the peer, waiting for their result.
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<OpOk, OpError>>>>>;

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
    pub async fn exec(&self, op: Op) -> Result<OpOk, OpError> {
        let appliance = self.peer;
        if !self.link.is_up() {
            return Err(OpError::PeerUnreachable {
                appliance,
                how: Unreachable::LinkDown,
            });
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
                return Err(OpError::Busy { appliance });
            }
            p.insert(id, tx);
        }
        if let Err(e) = self.link.send(PeerMsg::Request { id, op }) {
            self.pending.lock().expect("pending lock").remove(&id);
            return Err(match e {
                PeerError::Closed => OpError::PeerUnreachable {
                    appliance,
                    how: Unreachable::Closed,
                },
                source => OpError::Unsent { appliance, source },
            });
        }
        match tokio::time::timeout(bound, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(OpError::Dropped { appliance }),
            Err(_) => {
                self.pending.lock().expect("pending lock").remove(&id);
                Err(OpError::Timeout { appliance, bound })
            }
        }
    }

    /// Completes a request with the peer's response.
    pub fn complete(&self, id: u64, result: Result<OpOk, Failure>) {
        if let Some(tx) = self.pending.lock().expect("pending lock").remove(&id) {
            let _ = tx.send(result.map_err(|f| f.into_op_error(self.peer)));
        }
    }

    /// Fails every waiting request (the peer was lost).
    pub fn fail_all(&self) {
        let all: Vec<_> = self.pending.lock().expect("pending lock").drain().collect();
        for (_, tx) in all {
            let _ = tx.send(Err(OpError::PeerUnreachable {
                appliance: self.peer,
                how: Unreachable::Lost,
            }));
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
