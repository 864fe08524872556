use std::collections::BTreeMap;
use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use crate::frame::{
    read_frame_in, write_frame, write_frame_in, FormatRange, FrameKind, BUILD_FORMATS,
};
use crate::{ControlEpoch, ControlError};

/// The role the agent assigns to an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// In control: serves clients and feeds standbys.
    Active,
    /// Hot standby: applies the active's state stream.
    Standby,
    /// Running but neither serving nor syncing (for example a freshly started extra).
    Spare,
}

/// How the active acknowledges writes with respect to its designated HA standby.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    /// A write is acknowledged only once the designated HA standby has it.
    #[default]
    Synchronous,
    /// A write is acknowledged locally; standbys catch up in the background.
    Asynchronous,
}

/// Full role assignment sent by the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Configure {
    /// The instance's identifier as the agent knows it (checked against the instance's own).
    pub instance_id: String,
    /// Role to take.
    pub role: Role,
    /// Control epoch; commands carrying an older epoch are refused.
    pub epoch: ControlEpoch,
    /// For a standby: the active's state-sync address to attach to.
    pub active_sync_addr: Option<String>,
    /// For a standby: whether it is the designated HA standby (the one the active waits for).
    pub designated_ha: bool,
    /// Acknowledgement mode for the active.
    pub sync_mode: SyncMode,
}

/// A command from the agent to an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentCommand {
    /// Take a role, epoch and peers.
    Configure(Configure),
    /// Become active in `epoch`. For a planned switchover the agent quiesces the old active
    /// first and waits for this instance to have caught up.
    Promote {
        /// The new control epoch.
        epoch: ControlEpoch,
    },
    /// Stop accepting new writes, let in-flight writes finish (they keep waiting rather than
    /// failing), so that a standby can catch up to the final sequence.
    Quiesce {
        /// The epoch in which the quiesce happens.
        epoch: ControlEpoch,
    },
    /// Become a standby of a new active.
    Demote {
        /// The new control epoch.
        epoch: ControlEpoch,
        /// The new active's state-sync address to attach to.
        new_active_sync_addr: Option<String>,
    },
    /// Stop acknowledging anything now: another instance is or will be in control.
    Fence {
        /// The epoch that fences this instance.
        epoch: ControlEpoch,
    },
    /// The standby `instance_id` is gone for good (its process exited or its appliance was
    /// lost) and the control plane wrote it off: stop holding acknowledgements for it (the
    /// HA grace), it will never be promoted.
    StandbyGone {
        /// The gone standby's instance identifier (its sync node name).
        instance_id: String,
    },
    /// Report [`InstanceStatus`].
    StatusRequest,
    /// Exit cleanly.
    Shutdown,
    /// The agent's answer to the instance's [`Hello`]: the control frame formats it reads and
    /// writes. Sent with request id 0 and in the frozen [`crate::HANDSHAKE_VERSION`], only to
    /// an instance whose hello announced its formats; not answered. Both ends then write the
    /// highest format in both ranges; with none, the instance answers an `Error` and ends
    /// the connection.
    Hello {
        /// Formats the agent reads and writes.
        formats: crate::FormatRange,
    },
}

impl AgentCommand {
    /// The command's name, as it is spelt on the wire (for logs).
    pub fn kind(&self) -> &'static str {
        match self {
            AgentCommand::Configure(_) => "configure",
            AgentCommand::Promote { .. } => "promote",
            AgentCommand::Quiesce { .. } => "quiesce",
            AgentCommand::Demote { .. } => "demote",
            AgentCommand::Fence { .. } => "fence",
            AgentCommand::StandbyGone { .. } => "standby_gone",
            AgentCommand::StatusRequest => "status_request",
            AgentCommand::Shutdown => "shutdown",
            AgentCommand::Hello { .. } => "hello",
        }
    }
}

/// A command with the request id its reply will carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentMessage {
    /// Chosen by the agent; echoed in the reply.
    pub request_id: u64,
    /// The command.
    pub command: AgentCommand,
}

/// Schema versions one replicated service can read and write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaSupport {
    /// Versions this instance can read (apply) from a peer.
    pub read: Vec<u32>,
    /// Versions this instance can write (emit) to a peer, natively or through a downgrade.
    pub write: Vec<u32>,
    /// The version this instance stores natively.
    pub native: u32,
}

/// First message of an instance on every new control connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The instance's identifier.
    pub instance_id: String,
    /// Version of the image (software) it runs.
    pub image_version: String,
    /// Schema versions per replicated service.
    pub schemas: BTreeMap<String, SchemaSupport>,
    /// Kernel release of a VM guest, if known.
    pub kernel_release: Option<String>,
    /// Address clients (or the front proxy) reach the service on.
    pub service_addr: String,
    /// Address standbys attach to for state sync.
    pub sync_addr: String,
    /// Control frame formats the instance reads and writes; [`crate::serve`] fills it in
    /// (`None`: an instance from before negotiation, [`crate::LEGACY_FORMATS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub formats: Option<crate::FormatRange>,
}

/// State-sync progress of one replicated service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// Highest sequence applied locally.
    pub applied_seq: u64,
    /// How many sequences behind the active this instance is (0 on the active).
    pub lag: u64,
    /// The initial bulk transfer has completed.
    pub bulk_done: bool,
    /// Sequence at which the state digest last matched the active's, if ever.
    pub digest_verified_at: Option<u64>,
    /// This service has sufficient state to take over.
    pub ready: bool,
}

/// An instance's report to the agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceStatus {
    /// The current role, `None` until configured.
    pub role: Option<Role>,
    /// The current control epoch.
    pub epoch: ControlEpoch,
    /// Progress per replicated service.
    pub services: BTreeMap<String, ServiceStatus>,
    /// All services are ready.
    pub ready: bool,
    /// Highest sequence acknowledged to clients (active) or to the active (standby).
    pub acked_seq: u64,
    /// The instance is fenced: it acknowledges nothing.
    pub fenced: bool,
    /// The instance is quiesced: new writes wait.
    pub quiesced: bool,
    /// What the instance's state and process take in memory, if it reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryUse>,
}

/// An instance's memory use, for planning: every instance an upgrade starts holds a whole
/// copy of the state, so the agent checks before it starts one that the limit holds it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryUse {
    /// Resident memory of the instance's service process, bytes.
    pub rss_bytes: u64,
    /// The memory the instance may use, bytes (its cgroup's limit, or the guest's memory),
    /// if known.
    pub limit_bytes: Option<u64>,
    /// Records in the replicated state.
    pub records: u64,
}

/// A message from an instance to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum InstanceMessage {
    /// Sent unprompted when a control connection opens.
    Hello(Hello),
    /// Reply to [`AgentCommand::StatusRequest`].
    Status {
        /// The request answered.
        request_id: u64,
        /// The status.
        status: InstanceStatus,
    },
    /// The command was carried out.
    Ack {
        /// The request answered.
        request_id: u64,
    },
    /// The command was refused or failed.
    Error {
        /// The request answered (0 when the request could not be decoded).
        request_id: u64,
        /// Why.
        message: String,
    },
}

fn to_body<T: Serialize>(msg: &T) -> Result<Vec<u8>, ControlError> {
    serde_json::to_vec(msg).map_err(|e| ControlError::Body(e.to_string()))
}

fn read_kind<R: Read + ?Sized, T: for<'de> Deserialize<'de>>(
    r: &mut R,
    expected: FrameKind,
    formats: FormatRange,
    is_handshake: impl Fn(&T) -> bool,
) -> Result<Option<T>, ControlError> {
    let Some((version, kind, body)) = read_frame_in(r, formats)? else {
        return Ok(None);
    };
    if kind != expected {
        return Err(ControlError::WrongKind {
            expected,
            found: kind,
        });
    }
    let msg: T = serde_json::from_slice(&body).map_err(|e| ControlError::Body(e.to_string()))?;
    // Out of range, only a handshake message in the frozen format is read.
    if !formats.contains(version) && !is_handshake(&msg) {
        return Err(ControlError::UnsupportedVersion {
            found: version,
            range: formats,
        });
    }
    Ok(Some(msg))
}

/// Writes one agent message as a frame.
pub fn write_agent_message<W: Write + ?Sized>(
    w: &mut W,
    msg: &AgentMessage,
) -> Result<(), ControlError> {
    write_frame(w, FrameKind::Agent, &to_body(msg)?)
}

/// Writes one instance message as a frame.
pub fn write_instance_message<W: Write + ?Sized>(
    w: &mut W,
    msg: &InstanceMessage,
) -> Result<(), ControlError> {
    write_frame(w, FrameKind::Instance, &to_body(msg)?)
}

/// Writes one agent message as a frame in format `version`.
pub fn write_agent_message_in<W: Write + ?Sized>(
    w: &mut W,
    version: u8,
    msg: &AgentMessage,
) -> Result<(), ControlError> {
    write_frame_in(w, version, FrameKind::Agent, &to_body(msg)?)
}

/// Writes one instance message as a frame in format `version`.
pub fn write_instance_message_in<W: Write + ?Sized>(
    w: &mut W,
    version: u8,
    msg: &InstanceMessage,
) -> Result<(), ControlError> {
    write_frame_in(w, version, FrameKind::Instance, &to_body(msg)?)
}

/// Reads one agent message; `Ok(None)` on a clean end of stream.
pub fn read_agent_message<R: Read + ?Sized>(
    r: &mut R,
) -> Result<Option<AgentMessage>, ControlError> {
    read_agent_message_in(r, BUILD_FORMATS)
}

/// Reads one agent message in any format of `formats` (or the agent's hello in the frozen
/// [`crate::HANDSHAKE_VERSION`]).
pub fn read_agent_message_in<R: Read + ?Sized>(
    r: &mut R,
    formats: FormatRange,
) -> Result<Option<AgentMessage>, ControlError> {
    read_kind(r, FrameKind::Agent, formats, |m: &AgentMessage| {
        matches!(m.command, AgentCommand::Hello { .. })
    })
}

/// Reads one instance message; `Ok(None)` on a clean end of stream.
pub fn read_instance_message<R: Read + ?Sized>(
    r: &mut R,
) -> Result<Option<InstanceMessage>, ControlError> {
    read_instance_message_in(r, BUILD_FORMATS)
}

/// Reads one instance message in any format of `formats` (or the instance's hello in the
/// frozen [`crate::HANDSHAKE_VERSION`]).
pub fn read_instance_message_in<R: Read + ?Sized>(
    r: &mut R,
    formats: FormatRange,
) -> Result<Option<InstanceMessage>, ControlError> {
    read_kind(r, FrameKind::Instance, formats, |m: &InstanceMessage| {
        matches!(m, InstanceMessage::Hello(_))
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn role() -> impl Strategy<Value = Role> {
        prop_oneof![Just(Role::Active), Just(Role::Standby), Just(Role::Spare)]
    }

    fn text() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9:._/ -]{0,24}"
    }

    fn command() -> impl Strategy<Value = AgentCommand> {
        prop_oneof![
            (
                text(),
                role(),
                any::<u64>(),
                proptest::option::of(text()),
                any::<bool>(),
                any::<bool>()
            )
                .prop_map(
                    |(instance_id, role, epoch, active_sync_addr, designated_ha, sync)| {
                        AgentCommand::Configure(Configure {
                            instance_id,
                            role,
                            epoch: crate::ControlEpoch(epoch),
                            active_sync_addr,
                            designated_ha,
                            sync_mode: if sync {
                                SyncMode::Synchronous
                            } else {
                                SyncMode::Asynchronous
                            },
                        })
                    }
                ),
            any::<u64>().prop_map(|epoch| AgentCommand::Promote {
                epoch: crate::ControlEpoch(epoch)
            }),
            any::<u64>().prop_map(|epoch| AgentCommand::Quiesce {
                epoch: crate::ControlEpoch(epoch)
            }),
            (any::<u64>(), proptest::option::of(text())).prop_map(|(epoch, a)| {
                AgentCommand::Demote {
                    epoch: crate::ControlEpoch(epoch),
                    new_active_sync_addr: a,
                }
            }),
            any::<u64>().prop_map(|epoch| AgentCommand::Fence {
                epoch: crate::ControlEpoch(epoch)
            }),
            text().prop_map(|instance_id| AgentCommand::StandbyGone { instance_id }),
            Just(AgentCommand::StatusRequest),
            Just(AgentCommand::Shutdown),
            (1u8..=2, 0u8..=1).prop_map(|(min, extra)| AgentCommand::Hello {
                formats: crate::format_range(min, (min + extra).min(2)).unwrap(),
            }),
        ]
    }

    fn service_status() -> impl Strategy<Value = ServiceStatus> {
        (
            any::<u64>(),
            any::<u64>(),
            any::<bool>(),
            proptest::option::of(any::<u64>()),
            any::<bool>(),
        )
            .prop_map(|(applied_seq, lag, bulk_done, digest_verified_at, ready)| {
                ServiceStatus {
                    applied_seq,
                    lag,
                    bulk_done,
                    digest_verified_at,
                    ready,
                }
            })
    }

    fn instance_message() -> impl Strategy<Value = InstanceMessage> {
        prop_oneof![
            (
                text(),
                text(),
                proptest::collection::btree_map(
                    text(),
                    (
                        proptest::collection::vec(any::<u32>(), 0..4),
                        proptest::collection::vec(any::<u32>(), 0..4),
                        any::<u32>()
                    )
                        .prop_map(|(read, write, native)| SchemaSupport {
                            read,
                            write,
                            native
                        }),
                    0..3
                ),
                proptest::option::of(text()),
                text(),
                text()
            )
                .prop_map(
                    |(
                        instance_id,
                        image_version,
                        schemas,
                        kernel_release,
                        service_addr,
                        sync_addr,
                    )| {
                        InstanceMessage::Hello(Hello {
                            instance_id,
                            image_version,
                            schemas,
                            kernel_release,
                            service_addr,
                            sync_addr,
                            formats: None,
                        })
                    }
                ),
            (
                any::<u64>(),
                proptest::option::of(role()),
                any::<u64>(),
                proptest::collection::btree_map(text(), service_status(), 0..3),
                any::<bool>(),
                any::<u64>(),
                any::<bool>(),
                any::<bool>(),
                proptest::option::of((
                    any::<u64>(),
                    proptest::option::of(any::<u64>()),
                    any::<u64>()
                ))
            )
                .prop_map(
                    |(
                        request_id,
                        role,
                        epoch,
                        services,
                        ready,
                        acked_seq,
                        fenced,
                        quiesced,
                        memory,
                    )| {
                        InstanceMessage::Status {
                            request_id,
                            status: InstanceStatus {
                                role,
                                epoch: crate::ControlEpoch(epoch),
                                services,
                                ready,
                                acked_seq,
                                fenced,
                                quiesced,
                                memory: memory.map(|(rss_bytes, limit_bytes, records)| MemoryUse {
                                    rss_bytes,
                                    limit_bytes,
                                    records,
                                }),
                            },
                        }
                    }
                ),
            any::<u64>().prop_map(|request_id| InstanceMessage::Ack { request_id }),
            (any::<u64>(), ".{0,64}").prop_map(|(request_id, message)| InstanceMessage::Error {
                request_id,
                message
            }),
        ]
    }

    proptest! {
        #[test]
        fn agent_messages_round_trip(request_id in any::<u64>(), command in command()) {
            let msg = AgentMessage { request_id, command };
            let mut buf = Vec::new();
            write_agent_message(&mut buf, &msg).unwrap();
            let back = read_agent_message(&mut std::io::Cursor::new(buf)).unwrap().unwrap();
            prop_assert_eq!(back, msg);
        }

        #[test]
        fn instance_messages_round_trip(msg in instance_message()) {
            let mut buf = Vec::new();
            write_instance_message(&mut buf, &msg).unwrap();
            let back = read_instance_message(&mut std::io::Cursor::new(buf)).unwrap().unwrap();
            prop_assert_eq!(back, msg);
        }

        #[test]
        fn arbitrary_bodies_in_valid_frames_are_body_errors(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let f = crate::encode_frame(FrameKind::Agent, &body).unwrap();
            match read_agent_message(&mut std::io::Cursor::new(f)) {
                Ok(Some(_)) => {} // the bytes happened to be a valid message
                Ok(None) => prop_assert!(false, "a whole frame is not end of stream"),
                Err(e) => prop_assert!(matches!(e, ControlError::Body(_)), "{}", e),
            }
        }
    }

    #[test]
    fn wrong_direction_is_rejected() {
        let mut buf = Vec::new();
        write_instance_message(&mut buf, &InstanceMessage::Ack { request_id: 1 }).unwrap();
        let err = read_agent_message(&mut std::io::Cursor::new(buf)).unwrap_err();
        assert!(matches!(err, ControlError::WrongKind { .. }), "{err}");
    }

    #[test]
    fn json_shape_is_tagged_and_readable() {
        let msg = AgentMessage {
            request_id: 7,
            command: AgentCommand::Promote {
                epoch: crate::ControlEpoch(3),
            },
        };
        let v: serde_json::Value = serde_json::from_slice(&to_body(&msg).unwrap()).unwrap();
        assert_eq!(v["command"]["type"], "promote");
        assert_eq!(v["command"]["epoch"], 3);
        assert_eq!(v["request_id"], 7);
    }

    /// The JSON of messages carrying an epoch is byte for byte what it was when the epoch was
    /// a bare `u64`: `ControlEpoch` serializes as its plain number, so older peers read it.
    #[test]
    fn epoch_messages_keep_their_exact_json() {
        let promote = AgentMessage {
            request_id: 7,
            command: AgentCommand::Promote {
                epoch: ControlEpoch(3),
            },
        };
        let promote_json = r#"{"request_id":7,"command":{"type":"promote","epoch":3}}"#;
        assert_eq!(serde_json::to_string(&promote).unwrap(), promote_json);
        let back: AgentMessage = serde_json::from_str(promote_json).unwrap();
        assert_eq!(back, promote);

        let configure = AgentMessage {
            request_id: 8,
            command: AgentCommand::Configure(Configure {
                instance_id: "i-1".into(),
                role: Role::Standby,
                epoch: ControlEpoch(12),
                active_sync_addr: Some("10.0.0.1:7000".into()),
                designated_ha: true,
                sync_mode: SyncMode::Synchronous,
            }),
        };
        let configure_json = concat!(
            r#"{"request_id":8,"command":{"type":"configure","instance_id":"i-1","#,
            r#""role":"standby","epoch":12,"active_sync_addr":"10.0.0.1:7000","#,
            r#""designated_ha":true,"sync_mode":"synchronous"}}"#
        );
        assert_eq!(serde_json::to_string(&configure).unwrap(), configure_json);
        let back: AgentMessage = serde_json::from_str(configure_json).unwrap();
        assert_eq!(back, configure);
    }
}
