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
//! | 1     | frame format version (see Format versions below)        |
//! | 1     | kind: 1 = agent to instance, 2 = instance to agent      |
//! | 4     | body length (at most [`MAX_BODY_LEN`])                  |
//! | 4     | CRC32C of the body                                      |
//! | n     | body: one JSON-encoded [`AgentMessage`] or [`InstanceMessage`] |
//!
//! Malformed, truncated or oversized input yields a [`ControlError`], never a panic.
//!
//! # Format versions
//!
//! Each end reads and writes a [`FormatRange`] of frame formats (default
//! [`BUILD_FORMATS`], [`MIN_FRAME_VERSION`]`..=`[`FRAME_VERSION`]). The instance's
//! [`Hello`] announces its range; the agent answers with [`AgentCommand::Hello`] carrying its
//! own; both then write the highest format in both ranges and read any format of their range.
//! With no common format the agent's requests fail with [`ControlError::NoCommonFormat`] and
//! the instance answers an `Error` and ends the connection, both naming the two ranges. The
//! two hellos are written in the frozen [`HANDSHAKE_VERSION`] (the layout above), which every
//! build reads for a hello whatever its range. An end from before negotiation announces no
//! range and is taken to speak format 1 only. Test builds (feature `next-format`) also know a
//! stand-in next format, `NEXT_FRAME_VERSION`, whose CRC32C covers the header's version,
//! kind and length as well as the body.
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
#[cfg(any(test, feature = "next-format"))]
pub use frame::NEXT_FRAME_VERSION;
pub use frame::{
    decode_frame, decode_frame_in, encode_frame, encode_frame_in, format_range, known_formats,
    read_frame, read_frame_in, write_frame, write_frame_in, FormatRange, FrameKind, VersionedFrame,
    BUILD_FORMATS, FRAME_VERSION, HANDSHAKE_VERSION, HEADER_LEN, LEGACY_FORMATS, MAGIC,
    MAX_BODY_LEN, MIN_FRAME_VERSION,
};
/// The control epoch every message carries: the same type the engine and the sync library use,
/// on the wire its plain number.
pub use hitless_epoch::ControlEpoch;
pub use message::{
    read_agent_message, read_agent_message_in, read_instance_message, read_instance_message_in,
    write_agent_message, write_agent_message_in, write_instance_message, write_instance_message_in,
    AgentCommand, AgentMessage, Configure, Hello, InstanceMessage, InstanceStatus, MemoryUse, Role,
    SchemaSupport, ServiceStatus, SyncMode,
};
pub use server::{serve, serve_unix_listener, serve_with_formats, ControlHandler, ServeOutcome};
