//! The instance control channel.
//!
//! The agent (host end) tells an instance its role, epoch and peers, and reads its status and
//! state-sync progress, over any byte stream: a unix socket for sandboxed processes, a
//! virtio-serial or serial port for virtual machines.
//!
//! # Wire format
//!
//! Every message travels in one frame (all integers big-endian):
//!
//! | bytes | field                                                   |
//! |-------|---------------------------------------------------------|
//! | 4     | magic `HLCT`                                            |
//! | 1     | frame format version ([`FRAME_VERSION`])                |
//! | 1     | kind: 1 = agent to instance, 2 = instance to agent      |
//! | 4     | body length (at most [`MAX_BODY_LEN`])                  |
//! | 4     | CRC32C of the body                                      |
//! | n     | body: one JSON-encoded [`AgentMessage`] or [`InstanceMessage`] |
//!
//! Malformed, truncated or oversized input yields a [`ControlError`], never a panic.
//!
//! # Ends
//!
//! * [`ControlClient`] is the agent end: [`ControlClient::request`] sends one command and
//!   waits, with a timeout, for the reply carrying the same request id.
//! * [`serve`] is the instance end: it sends [`Hello`], then dispatches each command to a
//!   [`ControlHandler`] until the agent sends [`AgentCommand::Shutdown`] or the stream closes.
//!
//! All I/O is blocking `std::io`.

mod client;
mod error;
mod frame;
mod message;
mod server;

pub use client::{ControlClient, Heard, Reply};
pub use error::ControlError;
pub use frame::{
    decode_frame, encode_frame, read_frame, write_frame, FrameKind, FRAME_VERSION, HEADER_LEN,
    MAGIC, MAX_BODY_LEN,
};
pub use message::{
    read_agent_message, read_instance_message, write_agent_message, write_instance_message,
    AgentCommand, AgentMessage, Configure, Hello, InstanceMessage, InstanceStatus, MemoryUse, Role,
    SchemaSupport, ServiceStatus, SyncMode,
};
pub use server::{serve, serve_unix_listener, ControlHandler, ServeOutcome};
