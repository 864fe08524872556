//! Ops on the peer appliance, over the peer link, and the messages the link carries.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hitless_core::{ApplianceId, ControlEpoch};
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
/// Agents of earlier releases send and read the sentence alone (`"Err": "..."`), so a
/// [`FailureKind::Refused`] is written in that shape, which every release reads; only a kind
/// that an earlier release does not know is written as `{"kind", "message"}`. Both shapes
/// decode.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
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

impl Serialize for Failure {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        match self.kind {
            FailureKind::Refused => s.serialize_str(&self.message),
            kind => {
                let mut st = s.serialize_struct("Failure", 2)?;
                st.serialize_field("kind", &kind)?;
                st.serialize_field("message", &self.message)?;
                st.end()
            }
        }
    }
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
        epoch: ControlEpoch,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::PeerEvent;
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use tokio::sync::mpsc;

    #[test]
    fn heartbeat_and_route_keep_their_wire_format_with_a_control_epoch() {
        // The same bytes an agent that carried the epoch as a bare number wrote and read.
        let hb = PeerMsg::Heartbeat {
            from: ApplianceId::Secondary,
            driving: true,
            epoch: ControlEpoch(7),
        };
        let wire = r#"{"msg":"heartbeat","from":"secondary","driving":true,"epoch":7}"#;
        assert_eq!(serde_json::to_string(&hb).unwrap(), wire);
        match serde_json::from_str::<PeerMsg>(wire).unwrap() {
            PeerMsg::Heartbeat { epoch, .. } => assert_eq!(epoch, ControlEpoch(7)),
            other => panic!("read back as {other:?}"),
        }
        let route = crate::front::Route {
            epoch: ControlEpoch(3),
            backend: Some("127.0.0.1:6380".parse().unwrap()),
            hold: false,
        };
        let wire = r#"{"epoch":3,"backend":"127.0.0.1:6380","hold":false}"#;
        assert_eq!(serde_json::to_string(&route).unwrap(), wire);
        assert_eq!(
            serde_json::from_str::<crate::front::Route>(wire).unwrap(),
            route
        );
    }

    const BEAT: Duration = Duration::from_millis(20);

    fn free_addr() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }

    fn beat(from: ApplianceId) -> impl Fn() -> PeerMsg + Send + Sync + 'static {
        move || PeerMsg::Heartbeat {
            from,
            driving: false,
            epoch: ControlEpoch(0),
        }
    }

    /// The primary's view of the secondary over a link that is up, and the secondary's end of
    /// it (its link and the messages it receives).
    async fn linked() -> (
        Remote,
        PeerLink<PeerMsg>,
        mpsc::Receiver<PeerEvent<PeerMsg>>,
    ) {
        let (a_addr, b_addr) = (free_addr(), free_addr());
        let (a, mut a_rx) = PeerLink::start(a_addr, b_addr, BEAT, 3, beat(ApplianceId::Primary))
            .await
            .unwrap();
        let (b, b_rx) = PeerLink::start(b_addr, a_addr, BEAT, 3, beat(ApplianceId::Secondary))
            .await
            .unwrap();
        let remote = Remote::new(a, ApplianceId::Secondary);
        // The primary's dispatcher: responses complete requests.
        let r = remote.clone();
        tokio::spawn(async move {
            while let Some(e) = a_rx.recv().await {
                if let PeerEvent::Message(PeerMsg::Response { id, result }) = e {
                    r.complete(id, result);
                }
            }
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !remote.link().is_up() {
            assert!(tokio::time::Instant::now() < deadline, "link up within 5 s");
            tokio::time::sleep(BEAT).await;
        }
        (remote, b, b_rx)
    }

    /// The id of the next request the secondary receives.
    async fn next_request(rx: &mut mpsc::Receiver<PeerEvent<PeerMsg>>) -> u64 {
        loop {
            let e = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("a request within 5 s")
                .expect("open");
            if let PeerEvent::Message(PeerMsg::Request { id, .. }) = e {
                return id;
            }
        }
    }

    #[tokio::test]
    async fn an_op_on_a_down_link_is_peer_unreachable() {
        // Nobody listens at the peer's address: the link never comes up.
        let (link, _rx) = PeerLink::start(
            free_addr(),
            free_addr(),
            BEAT,
            3,
            beat(ApplianceId::Primary),
        )
        .await
        .unwrap();
        let remote = Remote::new(link, ApplianceId::Secondary);
        let e = remote.exec(Op::Describe).await.unwrap_err();
        assert!(
            matches!(
                e,
                OpError::PeerUnreachable {
                    appliance: ApplianceId::Secondary,
                    how: Unreachable::LinkDown
                }
            ),
            "{e:?}"
        );
        assert!(e.peer_unreachable());
        assert_eq!(e.to_string(), "the secondary appliance is unreachable");
        assert!(remote.pending.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_refused_op_gives_refused_with_the_reason() {
        let (remote, b, mut b_rx) = linked().await;
        let reason = "instance i3 is not running on the secondary appliance";
        let answer = tokio::spawn(async move {
            let id = next_request(&mut b_rx).await;
            b.send(PeerMsg::Response {
                id,
                result: Err(Failure::refused(reason)),
            })
            .unwrap();
            (b, b_rx)
        });
        let e = remote
            .exec(Op::Status {
                instance: hitless_core::InstanceId(3),
            })
            .await
            .unwrap_err();
        answer.await.unwrap();
        match &e {
            OpError::Refused {
                appliance: ApplianceId::Secondary,
                reason: r,
            } => assert_eq!(r, reason),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(!e.peer_unreachable());
        assert_eq!(e.to_string(), reason);
    }

    #[tokio::test]
    async fn an_answered_op_gives_its_result() {
        let (remote, b, mut b_rx) = linked().await;
        tokio::spawn(async move {
            let id = next_request(&mut b_rx).await;
            b.send(PeerMsg::Response {
                id,
                result: Ok(OpOk::Done),
            })
            .unwrap();
            (b, b_rx)
        });
        let r = remote
            .exec(Op::AddImage {
                dir: PathBuf::from("/images/kvd-2.0.0"),
            })
            .await;
        assert!(matches!(r, Ok(OpOk::Done)), "{r:?}");
    }

    #[tokio::test]
    async fn ops_waiting_when_the_peer_is_lost_are_peer_unreachable() {
        let (remote, _b, mut b_rx) = linked().await;
        let r = remote.clone();
        let waiting = tokio::spawn(async move { r.exec(Op::Describe).await });
        // The request reached the peer, which never answers; then the peer is lost.
        next_request(&mut b_rx).await;
        remote.fail_all();
        let e = waiting.await.unwrap().unwrap_err();
        assert!(
            matches!(
                e,
                OpError::PeerUnreachable {
                    appliance: ApplianceId::Secondary,
                    how: Unreachable::Lost
                }
            ),
            "{e:?}"
        );
        assert_eq!(e.to_string(), "the secondary appliance was lost");
    }

    #[tokio::test]
    async fn an_unanswered_op_times_out_without_being_taken_for_unreachable() {
        let (remote, _b, _b_rx) = linked().await;
        // A hold's bound is its own plus 2 s.
        let e = remote
            .exec(Op::FrontHold { bound_ms: 0 })
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                OpError::Timeout {
                    appliance: ApplianceId::Secondary,
                    bound
                } if bound == Duration::from_secs(2)
            ),
            "{e:?}"
        );
        assert!(!e.peer_unreachable());
        assert!(remote.pending.lock().unwrap().is_empty());
    }

    #[test]
    fn the_plain_sentence_of_an_earlier_agent_still_decodes_as_refused() {
        let old = r#"{"msg":"response","id":7,"result":{"Err":"instance i3 is not running on the secondary appliance"}}"#;
        let PeerMsg::Response { id, result } = serde_json::from_str::<PeerMsg>(old).unwrap() else {
            panic!("not a response");
        };
        assert_eq!(id, 7);
        let f = result.unwrap_err();
        assert_eq!(
            f,
            Failure {
                kind: FailureKind::Refused,
                message: "instance i3 is not running on the secondary appliance".into(),
            }
        );
        let e = f.into_op_error(ApplianceId::Secondary);
        assert!(
            matches!(&e, OpError::Refused { appliance: ApplianceId::Secondary, reason } if reason.starts_with("instance i3")),
            "{e:?}"
        );
        // A success of an earlier agent has the same shape as ever.
        let ok = r#"{"msg":"response","id":8,"result":{"Ok":{"result":"done"}}}"#;
        let PeerMsg::Response { result, .. } = serde_json::from_str::<PeerMsg>(ok).unwrap() else {
            panic!("not a response");
        };
        assert!(matches!(result, Ok(OpOk::Done)));
    }

    #[test]
    fn a_failure_crosses_the_link_with_its_kind_and_an_unknown_kind_is_other() {
        let msg = PeerMsg::Response {
            id: 3,
            result: Err(Failure::refused("no free instance slot")),
        };
        let json = serde_json::to_string(&msg).unwrap();
        // A refusal keeps the shape an agent of the previous release reads.
        assert!(json.contains(r#""Err":"no free instance slot""#), "{json}");
        #[derive(Deserialize)]
        struct PreviousRelease {
            result: Result<serde_json::Value, String>,
        }
        let old: PreviousRelease = serde_json::from_str(&json).unwrap();
        assert_eq!(old.result.unwrap_err(), "no free instance slot");
        let PeerMsg::Response { result, .. } = serde_json::from_str::<PeerMsg>(&json).unwrap()
        else {
            panic!("not a response");
        };
        assert_eq!(
            result.unwrap_err(),
            Failure::refused("no free instance slot")
        );

        let later = r#"{"msg":"response","id":4,"result":{"Err":{"kind":"out-of-memory","message":"the host is out of memory"}}}"#;
        let PeerMsg::Response { result, .. } = serde_json::from_str::<PeerMsg>(later).unwrap()
        else {
            panic!("not a response");
        };
        let f = result.unwrap_err();
        assert_eq!(f.kind, FailureKind::Other);
        assert_eq!(f.message, "the host is out of memory");
        // A kind the previous release does not know goes typed, and reads back.
        let json = serde_json::to_string(&f).unwrap();
        assert_eq!(
            json,
            r#"{"kind":"other","message":"the host is out of memory"}"#
        );
        assert_eq!(serde_json::from_str::<Failure>(&json).unwrap(), f);
    }

    #[test]
    fn a_malformed_failure_is_refused_by_the_decoder() {
        let bad = r#"{"msg":"response","id":5,"result":{"Err":{"kind":"refused"}}}"#;
        assert!(serde_json::from_str::<PeerMsg>(bad).is_err());
    }
}
