use std::io::{Read, Write};
use std::os::unix::net::UnixListener;

use crate::message::{read_agent_message_in, write_instance_message_in};
use crate::{
    format_range, AgentCommand, Configure, ControlEpoch, ControlError, FormatRange, Hello,
    InstanceMessage, InstanceStatus, BUILD_FORMATS, HANDSHAKE_VERSION,
};

/// What an instance does with each control command. Each method returns `Err(message)` to
/// refuse; the message goes back to the agent.
pub trait ControlHandler {
    /// The [`Hello`] sent at the start of each connection.
    fn hello(&mut self) -> Hello;
    /// Take a role, epoch and peers.
    fn configure(&mut self, cfg: &Configure) -> Result<(), String>;
    /// Become active in `epoch`.
    fn promote(&mut self, epoch: ControlEpoch) -> Result<(), String>;
    /// Hold new writes and drain in-flight ones.
    fn quiesce(&mut self, epoch: ControlEpoch) -> Result<(), String>;
    /// Become a standby of the active at `new_active_sync_addr`.
    fn demote(
        &mut self,
        epoch: ControlEpoch,
        new_active_sync_addr: Option<&str>,
    ) -> Result<(), String>;
    /// Stop acknowledging anything.
    fn fence(&mut self, epoch: ControlEpoch) -> Result<(), String>;
    /// The standby `instance_id` is gone for good: stop holding acknowledgements for it.
    fn standby_gone(&mut self, instance_id: &str) -> Result<(), String>;
    /// Current status.
    fn status(&mut self) -> InstanceStatus;
    /// Prepare to exit; [`serve`] returns [`ServeOutcome::Shutdown`] after the Ack is sent.
    fn shutdown(&mut self) -> Result<(), String>;
}

/// Why [`serve`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServeOutcome {
    /// The agent asked the instance to shut down (and the handler agreed).
    Shutdown,
    /// The agent closed the stream.
    Disconnected,
}

/// Serves one control connection: sends [`Hello`], then answers commands until shutdown or
/// end of stream.
///
/// An intact frame with an undecodable body is answered with an `Error` (request id 0) and
/// serving continues; a framing error (bad magic, version, length, truncation) is returned
/// because the stream can no longer be trusted to be aligned.
pub fn serve<R: Read, W: Write, H: ControlHandler + ?Sized>(
    reader: R,
    writer: W,
    handler: &mut H,
) -> Result<ServeOutcome, ControlError> {
    serve_with_formats(reader, writer, handler, BUILD_FORMATS)
}

/// Like [`serve`] for an instance end that reads and writes the control frame formats
/// `formats`: its [`Hello`] announces them (in the frozen [`crate::HANDSHAKE_VERSION`]), and
/// once the agent's [`AgentCommand::Hello`] arrives it writes the highest format in both
/// ranges. With no common format it answers an `Error` naming both ranges and returns
/// [`ControlError::NoCommonFormat`]. An agent from before negotiation sends no hello: the
/// instance then writes [`crate::HANDSHAKE_VERSION`], the only format such an agent reads.
pub fn serve_with_formats<R: Read, W: Write, H: ControlHandler + ?Sized>(
    mut reader: R,
    mut writer: W,
    handler: &mut H,
    formats: FormatRange,
) -> Result<ServeOutcome, ControlError> {
    format_range(formats.min, formats.max)?;
    let mut version = HANDSHAKE_VERSION;
    let hello = Hello {
        formats: Some(formats),
        ..handler.hello()
    };
    write_instance_message_in(&mut writer, version, &InstanceMessage::Hello(hello))?;
    loop {
        let msg = match read_agent_message_in(&mut reader, formats) {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(ServeOutcome::Disconnected),
            Err(e) if e.is_recoverable() => {
                tracing::warn!(error = %e, "rejecting a malformed control frame");
                write_instance_message_in(
                    &mut writer,
                    version,
                    &InstanceMessage::Error {
                        request_id: 0,
                        message: e.to_string(),
                    },
                )?;
                continue;
            }
            Err(e) => return Err(e),
        };
        if let AgentCommand::Hello { formats: agent } = msg.command {
            match formats.highest_common(&agent) {
                Some(v) => {
                    tracing::debug!(%agent, instance = %formats, format = v, "control format negotiated");
                    version = v;
                    continue;
                }
                None => {
                    let e = ControlError::NoCommonFormat {
                        agent,
                        instance: formats,
                    };
                    write_instance_message_in(
                        &mut writer,
                        HANDSHAKE_VERSION,
                        &InstanceMessage::Error {
                            request_id: msg.request_id,
                            message: e.to_string(),
                        },
                    )?;
                    return Err(e);
                }
            }
        }
        let id = msg.request_id;
        tracing::debug!(request_id = id, command = ?msg.command, "control command");
        let (result, shutting_down) = match &msg.command {
            AgentCommand::Configure(cfg) => (handler.configure(cfg), false),
            AgentCommand::Promote { epoch } => (handler.promote(*epoch), false),
            AgentCommand::Quiesce { epoch } => (handler.quiesce(*epoch), false),
            AgentCommand::Demote {
                epoch,
                new_active_sync_addr,
            } => (
                handler.demote(*epoch, new_active_sync_addr.as_deref()),
                false,
            ),
            AgentCommand::Fence { epoch } => (handler.fence(*epoch), false),
            AgentCommand::StandbyGone { instance_id } => (handler.standby_gone(instance_id), false),
            AgentCommand::Hello { .. } => unreachable!("handled above"),
            AgentCommand::StatusRequest => {
                let status = handler.status();
                write_instance_message_in(
                    &mut writer,
                    version,
                    &InstanceMessage::Status {
                        request_id: id,
                        status,
                    },
                )?;
                continue;
            }
            AgentCommand::Shutdown => (handler.shutdown(), true),
        };
        let reply = match &result {
            Ok(()) => InstanceMessage::Ack { request_id: id },
            Err(message) => {
                tracing::warn!(request_id = id, command = ?msg.command, %message, "control command refused");
                InstanceMessage::Error {
                    request_id: id,
                    message: message.clone(),
                }
            }
        };
        write_instance_message_in(&mut writer, version, &reply)?;
        if shutting_down && result.is_ok() {
            return Ok(ServeOutcome::Shutdown);
        }
    }
}

/// Accepts agent connections on `listener` one at a time and serves each with [`serve`],
/// until the agent sends Shutdown. A connection that fails is logged and the next one is
/// accepted (the agent may reconnect at will).
pub fn serve_unix_listener<H: ControlHandler + ?Sized>(
    listener: &UnixListener,
    handler: &mut H,
) -> Result<(), ControlError> {
    loop {
        let (stream, _) = listener.accept()?;
        let reader = stream.try_clone()?;
        match serve(reader, &stream, handler) {
            Ok(ServeOutcome::Shutdown) => return Ok(()),
            Ok(ServeOutcome::Disconnected) => tracing::info!("control agent disconnected"),
            Err(e) => tracing::warn!(error = %e, "control connection failed"),
        }
    }
}
