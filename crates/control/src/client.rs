use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::message::{read_instance_message_in, write_agent_message_in};
use crate::{
    AgentCommand, AgentMessage, Configure, ControlEpoch, ControlError, FormatRange, Hello,
    InstanceMessage, InstanceStatus, BUILD_FORMATS, HANDSHAKE_VERSION, LEGACY_FORMATS,
};

/// Bound on messages buffered between the reader thread and the caller.
const INBOX_BOUND: usize = 64;

/// A request answered later than this is logged: the channel was busy for that long.
const SLOW_REQUEST: Duration = Duration::from_secs(1);

/// A successful reply to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The command was carried out.
    Ack,
    /// The instance's status (reply to [`AgentCommand::StatusRequest`]).
    Status(InstanceStatus),
}

/// The agent (host) end of a control channel.
///
/// A reader thread decodes frames from the stream into a bounded queue; [`Self::request`]
/// writes a command and waits for the reply with the same request id, discarding stale
/// replies to earlier requests that timed out. A [`Hello`] may arrive at any time (the
/// instance restarted behind a persistent serial port) and is recorded.
pub struct ControlClient<W: Write> {
    writer: W,
    /// Control frame formats this end reads and writes.
    formats: FormatRange,
    /// Format of the frames written: the frozen handshake format until a hello is answered.
    version: u8,
    /// A hello arrived that this end has not answered yet.
    hello_pending: bool,
    /// The last hello announced formats none of which this end has (until the next hello).
    refused: Option<FormatRange>,
    inbox: Receiver<Result<InstanceMessage, ControlError>>,
    next_id: u64,
    hello: Option<Hello>,
    hellos_seen: u64,
    closed: bool,
    closer: Option<UnixStream>,
    heard: Heard,
    _reader: JoinHandle<()>,
}

/// When the instance last sent anything on a control channel: readable while a request
/// holds the client, so that a health probe can tell a busy channel from a silent one.
#[derive(Debug, Clone)]
pub struct Heard(Arc<(Instant, AtomicU64)>);

impl Heard {
    fn new() -> Self {
        Heard(Arc::new((Instant::now(), AtomicU64::new(0))))
    }

    fn touch(&self) {
        let nanos = u64::try_from(self.0 .0.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.0 .1.fetch_max(nanos, Ordering::Relaxed);
    }

    /// Time since the last message from the instance (since the client was built if none).
    pub fn since(&self) -> Duration {
        let at = Duration::from_nanos(self.0 .1.load(Ordering::Relaxed));
        self.0 .0.elapsed().saturating_sub(at)
    }
}

impl ControlClient<UnixStream> {
    /// Connects to an instance listening on a unix socket.
    pub fn connect_unix(path: impl AsRef<Path>) -> Result<Self, ControlError> {
        let stream = UnixStream::connect(path)?;
        Self::from_unix(stream)
    }

    /// Wraps a connected unix stream. The stream is shut down when the client is dropped.
    pub fn from_unix(stream: UnixStream) -> Result<Self, ControlError> {
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        let reader = stream.try_clone()?;
        let closer = stream.try_clone()?;
        let mut c = Self::new(reader, stream);
        c.closer = Some(closer);
        Ok(c)
    }
}

impl ControlClient<std::fs::File> {
    /// Opens a character device (a virtio-serial port `/dev/vport*p*` seen from the host side
    /// is a unix socket; a QEMU chardev pipe or a serial port is a file) for reading and writing.
    pub fn open_device(path: impl AsRef<Path>) -> Result<Self, ControlError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        let reader = file.try_clone()?;
        Ok(Self::new(reader, file))
    }
}

impl<W: Write> ControlClient<W> {
    /// Builds a client over any reader/writer pair. The reader moves to a thread that ends
    /// when the stream ends, fails beyond recovery, or the client is dropped and one more
    /// message arrives.
    pub fn new<R: Read + Send + 'static>(reader: R, writer: W) -> Self {
        Self::with_formats(reader, writer, BUILD_FORMATS)
    }

    /// Like [`Self::new`] for an agent end that reads and writes the control frame formats
    /// `formats` (see [`crate::format_range`]). On the instance's [`Hello`] this end answers
    /// with its own range ([`AgentCommand::Hello`], in the frozen
    /// [`crate::HANDSHAKE_VERSION`]) and both ends then write the highest format in both
    /// ranges; with none, requests fail with [`ControlError::NoCommonFormat`] until the
    /// instance says hello again.
    pub fn with_formats<R: Read + Send + 'static>(
        mut reader: R,
        writer: W,
        formats: FormatRange,
    ) -> Self {
        let (tx, rx) = sync_channel(INBOX_BOUND);
        let heard = Heard::new();
        let touched = heard.clone();
        let handle = std::thread::Builder::new()
            .name("control-client-reader".into())
            .spawn(move || loop {
                match read_instance_message_in(&mut reader, formats) {
                    Ok(Some(msg)) => {
                        touched.touch();
                        if tx.send(Ok(msg)).is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        let fatal = !e.is_recoverable();
                        if tx.send(Err(e)).is_err() || fatal {
                            return;
                        }
                    }
                }
            })
            .expect("spawning a thread only fails when the process is out of resources");
        ControlClient {
            writer,
            formats,
            version: HANDSHAKE_VERSION,
            hello_pending: false,
            refused: None,
            inbox: rx,
            next_id: 1,
            hello: None,
            hellos_seen: 0,
            closed: false,
            closer: None,
            heard,
            _reader: handle,
        }
    }

    /// A handle that tells when the instance last sent anything on this channel.
    pub fn heard(&self) -> Heard {
        self.heard.clone()
    }

    /// The most recent [`Hello`] received, if any.
    pub fn hello(&self) -> Option<&Hello> {
        self.hello.as_ref()
    }

    /// How many [`Hello`] messages have arrived; more than one means the instance restarted.
    pub fn hellos_seen(&self) -> u64 {
        self.hellos_seen
    }

    /// Waits for the instance's [`Hello`] (returns at once if one has already arrived).
    pub fn wait_hello(&mut self, timeout: Duration) -> Result<Hello, ControlError> {
        let deadline = Instant::now() + timeout;
        while self.hello.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_message(left)? {
                Some(msg) => self.absorb_unsolicited(msg),
                None => {
                    return Err(ControlError::Timeout {
                        request_id: 0,
                        timeout,
                    })
                }
            }
        }
        self.answer_hello()?;
        Ok(self.hello.clone().expect("checked above"))
    }

    /// Answers the last hello if not done yet: picks the format both ends write from now on.
    fn answer_hello(&mut self) -> Result<(), ControlError> {
        if self.hello_pending {
            self.hello_pending = false;
            self.refused = None;
            let announced = self.hello.as_ref().and_then(|h| h.formats);
            let instance = announced.unwrap_or(LEGACY_FORMATS);
            let common = self.formats.highest_common(&instance);
            if announced.is_some() {
                // Sent even without a common format, so the instance can tell why.
                write_agent_message_in(
                    &mut self.writer,
                    HANDSHAKE_VERSION,
                    &AgentMessage {
                        request_id: 0,
                        command: AgentCommand::Hello {
                            formats: self.formats,
                        },
                    },
                )?;
            }
            match common {
                Some(v) => {
                    tracing::debug!(agent = %self.formats, %instance, format = v, "control format negotiated");
                    self.version = v;
                }
                None => self.refused = Some(instance),
            }
        }
        match self.refused {
            Some(instance) => Err(ControlError::NoCommonFormat {
                agent: self.formats,
                instance,
            }),
            None => Ok(()),
        }
    }

    /// Sends `command` and waits up to `timeout` for its reply.
    ///
    /// An `Error` reply becomes [`ControlError::Remote`]; no reply in time becomes
    /// [`ControlError::Timeout`] (a late reply is later discarded).
    pub fn request(
        &mut self,
        command: AgentCommand,
        timeout: Duration,
    ) -> Result<Reply, ControlError> {
        let what = command.kind();
        let began = Instant::now();
        let r = self.request_inner(command, timeout);
        let took = began.elapsed();
        if took >= SLOW_REQUEST {
            tracing::warn!(
                command = what,
                took_ms = took.as_millis() as u64,
                ok = r.is_ok(),
                "a control request was slow to be answered"
            );
        }
        r
    }

    fn request_inner(
        &mut self,
        command: AgentCommand,
        timeout: Duration,
    ) -> Result<Reply, ControlError> {
        if self.closed {
            return Err(ControlError::Closed);
        }
        self.answer_hello()?;
        let request_id = self.next_id;
        self.next_id += 1;
        let wants_status = matches!(command, AgentCommand::StatusRequest);
        write_agent_message_in(
            &mut self.writer,
            self.version,
            &AgentMessage {
                request_id,
                command,
            },
        )?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(msg) = self.next_message(left)? else {
                return Err(ControlError::Timeout {
                    request_id,
                    timeout,
                });
            };
            match msg {
                InstanceMessage::Ack { request_id: id } if id == request_id => {
                    if wants_status {
                        return Err(ControlError::UnexpectedReply {
                            request_id,
                            what: "an acknowledgement instead of a status".into(),
                        });
                    }
                    return Ok(Reply::Ack);
                }
                InstanceMessage::Status {
                    request_id: id,
                    status,
                } if id == request_id => {
                    if !wants_status {
                        return Err(ControlError::UnexpectedReply {
                            request_id,
                            what: "a status instead of an acknowledgement".into(),
                        });
                    }
                    return Ok(Reply::Status(status));
                }
                InstanceMessage::Error {
                    request_id: id,
                    message,
                } if id == request_id || id == 0 => {
                    return Err(ControlError::Remote {
                        request_id,
                        message,
                    });
                }
                other => self.absorb_unsolicited(other),
            }
        }
    }

    /// Sends [`AgentCommand::Configure`].
    pub fn configure(&mut self, cfg: Configure, timeout: Duration) -> Result<(), ControlError> {
        self.request(AgentCommand::Configure(cfg), timeout)
            .map(drop)
    }

    /// Sends [`AgentCommand::Promote`].
    pub fn promote(&mut self, epoch: ControlEpoch, timeout: Duration) -> Result<(), ControlError> {
        self.request(AgentCommand::Promote { epoch }, timeout)
            .map(drop)
    }

    /// Sends [`AgentCommand::Quiesce`].
    pub fn quiesce(&mut self, epoch: ControlEpoch, timeout: Duration) -> Result<(), ControlError> {
        self.request(AgentCommand::Quiesce { epoch }, timeout)
            .map(drop)
    }

    /// Sends [`AgentCommand::Demote`].
    pub fn demote(
        &mut self,
        epoch: ControlEpoch,
        new_active_sync_addr: Option<String>,
        timeout: Duration,
    ) -> Result<(), ControlError> {
        self.request(
            AgentCommand::Demote {
                epoch,
                new_active_sync_addr,
            },
            timeout,
        )
        .map(drop)
    }

    /// Sends [`AgentCommand::Fence`].
    pub fn fence(&mut self, epoch: ControlEpoch, timeout: Duration) -> Result<(), ControlError> {
        self.request(AgentCommand::Fence { epoch }, timeout)
            .map(drop)
    }

    /// Asks for the instance's status.
    pub fn status(&mut self, timeout: Duration) -> Result<InstanceStatus, ControlError> {
        match self.request(AgentCommand::StatusRequest, timeout)? {
            Reply::Status(s) => Ok(s),
            Reply::Ack => unreachable!("request() maps an Ack to a status request to an error"),
        }
    }

    /// Sends [`AgentCommand::Shutdown`].
    pub fn shutdown(&mut self, timeout: Duration) -> Result<(), ControlError> {
        self.request(AgentCommand::Shutdown, timeout).map(drop)
    }

    fn absorb_unsolicited(&mut self, msg: InstanceMessage) {
        match msg {
            InstanceMessage::Hello(h) => {
                tracing::debug!(instance = %h.instance_id, version = %h.image_version, "control hello");
                self.hello = Some(h);
                self.hellos_seen += 1;
                // A new connection (or a restarted instance): negotiate afresh.
                self.hello_pending = true;
                self.version = HANDSHAKE_VERSION;
            }
            other => tracing::debug!(?other, "discarding a stale control reply"),
        }
    }

    /// Next decoded message, `Ok(None)` on timeout.
    fn next_message(&mut self, timeout: Duration) -> Result<Option<InstanceMessage>, ControlError> {
        if self.closed {
            return Err(ControlError::Closed);
        }
        match self.inbox.recv_timeout(timeout) {
            Ok(Ok(msg)) => Ok(Some(msg)),
            Ok(Err(e)) => {
                if !e.is_recoverable() {
                    self.closed = true;
                }
                Err(e)
            }
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => {
                self.closed = true;
                Err(ControlError::Closed)
            }
        }
    }
}

impl<W: Write> Drop for ControlClient<W> {
    fn drop(&mut self) {
        if let Some(s) = self.closer.take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}
