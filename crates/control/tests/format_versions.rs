//! Control frame format negotiation: an end of the next release's format range (the test-only
//! `NEXT_FRAME_VERSION`, feature `next-format`) talks to an end of this build's range, agent
//! end and instance end both ways; two next-release ends use the next format on the wire;
//! ends without a common format are refused at connect naming both ranges.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use hitless_control::{
    read_agent_message_in, serve_with_formats, write_instance_message_in, AgentCommand, Configure,
    ControlClient, ControlError, ControlHandler, FormatRange, Hello, InstanceMessage,
    InstanceStatus, Role, ServeOutcome, SyncMode, FRAME_VERSION, HANDSHAKE_VERSION, HEADER_LEN,
    NEXT_FRAME_VERSION,
};

const T: Duration = Duration::from_secs(5);

fn range(min: u8, max: u8) -> FormatRange {
    hitless_control::format_range(min, max).unwrap()
}

fn current() -> FormatRange {
    hitless_control::BUILD_FORMATS
}

fn next() -> FormatRange {
    range(FRAME_VERSION, NEXT_FRAME_VERSION)
}

fn only_next() -> FormatRange {
    range(NEXT_FRAME_VERSION, NEXT_FRAME_VERSION)
}

/// A handler that keeps the role and epoch it is told.
#[derive(Default)]
struct Inst {
    role: Option<Role>,
    epoch: u64,
}

impl ControlHandler for Inst {
    fn hello(&mut self) -> Hello {
        Hello {
            instance_id: "i-1".into(),
            image_version: "2.0.0".into(),
            schemas: BTreeMap::new(),
            kernel_release: None,
            service_addr: "127.0.0.1:1".into(),
            sync_addr: "127.0.0.1:2".into(),
            formats: None,
        }
    }
    fn configure(&mut self, cfg: &Configure) -> Result<(), String> {
        self.role = Some(cfg.role);
        self.epoch = cfg.epoch.0;
        Ok(())
    }
    fn promote(&mut self, epoch: hitless_control::ControlEpoch) -> Result<(), String> {
        self.role = Some(Role::Active);
        self.epoch = epoch.0;
        Ok(())
    }
    fn quiesce(&mut self, _epoch: hitless_control::ControlEpoch) -> Result<(), String> {
        Ok(())
    }
    fn demote(
        &mut self,
        epoch: hitless_control::ControlEpoch,
        _addr: Option<&str>,
    ) -> Result<(), String> {
        self.role = Some(Role::Standby);
        self.epoch = epoch.0;
        Ok(())
    }
    fn fence(&mut self, _epoch: hitless_control::ControlEpoch) -> Result<(), String> {
        Ok(())
    }
    fn standby_gone(&mut self, _instance_id: &str) -> Result<(), String> {
        Ok(())
    }
    fn status(&mut self) -> InstanceStatus {
        InstanceStatus {
            role: self.role,
            epoch: hitless_control::ControlEpoch(self.epoch),
            ..InstanceStatus::default()
        }
    }
    fn shutdown(&mut self) -> Result<(), String> {
        Ok(())
    }
}

/// Bytes that crossed the channel, as the agent end saw them.
#[derive(Clone, Default)]
struct Tap(Arc<Mutex<Vec<u8>>>);

impl Tap {
    fn record(&self, b: &[u8]) {
        let mut v = self.0.lock().unwrap();
        if v.len() < 1 << 20 {
            v.extend_from_slice(b);
        }
    }

    /// Format version of every whole frame recorded.
    fn versions(&self) -> Vec<u8> {
        let v = self.0.lock().unwrap();
        let mut out = Vec::new();
        let mut pos = 0;
        while v.len() - pos >= HEADER_LEN {
            let len = u32::from_be_bytes(v[pos + 6..pos + 10].try_into().unwrap()) as usize;
            if v.len() - pos < HEADER_LEN + len {
                break;
            }
            out.push(v[pos + 4]);
            pos += HEADER_LEN + len;
        }
        out
    }
}

struct TapRead(UnixStream, Tap);

impl Read for TapRead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.0.read(buf)?;
        self.1.record(&buf[..n]);
        Ok(n)
    }
}

struct TapWrite(UnixStream, Tap);

impl Write for TapWrite {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.0.write(buf)?;
        self.1.record(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

type Served = thread::JoinHandle<Result<ServeOutcome, ControlError>>;

/// An instance end of range `instance` and an agent end of range `agent`, with taps of what
/// the instance sent (`rx`) and what the agent sent (`tx`).
fn pair(agent: FormatRange, instance: FormatRange) -> (ControlClient<TapWrite>, Served, Tap, Tap) {
    let (a, i) = UnixStream::pair().unwrap();
    let served = thread::spawn(move || {
        let r = i.try_clone().unwrap();
        serve_with_formats(r, i, &mut Inst::default(), instance)
    });
    let (rx, tx) = (Tap::default(), Tap::default());
    let client = ControlClient::with_formats(
        TapRead(a.try_clone().unwrap(), rx.clone()),
        TapWrite(a, tx.clone()),
        agent,
    );
    (client, served, rx, tx)
}

fn configure(epoch: u64) -> Configure {
    Configure {
        instance_id: "i-1".into(),
        role: Role::Standby,
        epoch: hitless_control::ControlEpoch(epoch),
        active_sync_addr: None,
        designated_ha: true,
        sync_mode: SyncMode::Synchronous,
    }
}

/// A few commands both ways, then shutdown; every frame after the handshake is in `format`.
fn scenario(agent: FormatRange, instance: FormatRange, format: u8) {
    let (mut c, served, rx, tx) = pair(agent, instance);
    let hello = c.wait_hello(T).unwrap();
    assert_eq!(hello.formats, Some(instance));
    c.configure(configure(3), T).unwrap();
    c.promote(hitless_control::ControlEpoch(4), T).unwrap();
    let st = c.status(T).unwrap();
    assert_eq!((st.role, st.epoch.0), (Some(Role::Active), 4));
    c.shutdown(T).unwrap();
    assert_eq!(served.join().unwrap().unwrap(), ServeOutcome::Shutdown);
    // Instance -> agent: the hello in the frozen format, then three replies and the
    // shutdown's ack in the negotiated one.
    let mut want = vec![HANDSHAKE_VERSION];
    want.extend([format; 4]);
    assert_eq!(rx.versions(), want);
    // Agent -> instance: its hello in the frozen format, then four commands.
    let mut want = vec![HANDSHAKE_VERSION];
    want.extend([format; 4]);
    assert_eq!(tx.versions(), want);
}

#[test]
fn next_release_agent_talks_to_a_current_instance_in_the_current_format() {
    scenario(next(), current(), FRAME_VERSION);
}

#[test]
fn current_agent_talks_to_a_next_release_instance_in_the_current_format() {
    scenario(current(), next(), FRAME_VERSION);
}

#[test]
fn two_next_release_ends_negotiate_the_next_format_and_work() {
    scenario(next(), next(), NEXT_FRAME_VERSION);
}

#[test]
fn ends_without_a_common_format_are_refused_naming_both_ranges() {
    for (agent, instance) in [(current(), only_next()), (only_next(), current())] {
        let (mut c, served, _rx, _tx) = pair(agent, instance);
        let err = c.wait_hello(T).unwrap_err();
        let want = format!(
            "no common control frame format: the agent reads and writes control formats \
             {agent}, the instance {instance}"
        );
        assert_eq!(err.to_string(), want);
        // Every request is refused the same way, and nothing is sent.
        let err = c.promote(hitless_control::ControlEpoch(2), T).unwrap_err();
        assert!(matches!(err, ControlError::NoCommonFormat { .. }), "{err}");
        // The instance learns it from the agent's hello and ends the connection.
        let served = served.join().unwrap().unwrap_err();
        assert_eq!(served.to_string(), want);
    }
}

#[test]
fn agent_answers_an_instance_from_before_negotiation_in_its_format() {
    let (a, i) = UnixStream::pair().unwrap();
    let instance = thread::spawn(move || {
        let mut r = i.try_clone().unwrap();
        let mut w = i;
        // A legacy hello: no formats.
        write_instance_message_in(&mut w, 1, &InstanceMessage::Hello(Inst::default().hello()))
            .unwrap();
        let m = read_agent_message_in(&mut r, hitless_control::BUILD_FORMATS)
            .unwrap()
            .unwrap();
        write_instance_message_in(
            &mut w,
            1,
            &InstanceMessage::Ack {
                request_id: m.request_id,
            },
        )
        .unwrap();
        m
    });
    let mut c = ControlClient::with_formats(a.try_clone().unwrap(), a, next());
    c.wait_hello(T).unwrap();
    c.promote(hitless_control::ControlEpoch(7), T).unwrap();
    // No hello was sent to it: the first thing it read was the command, in format 1.
    let m = instance.join().unwrap();
    assert_eq!(
        m.command,
        AgentCommand::Promote {
            epoch: hitless_control::ControlEpoch(7)
        }
    );
}

#[test]
fn corrupt_version_byte_after_negotiation_is_a_clear_error() {
    let (a, i) = UnixStream::pair().unwrap();
    let instance = thread::spawn(move || {
        let mut r = i.try_clone().unwrap();
        let mut w = i;
        let hello = Hello {
            formats: Some(next()),
            ..Inst::default().hello()
        };
        write_instance_message_in(&mut w, HANDSHAKE_VERSION, &InstanceMessage::Hello(hello))
            .unwrap();
        let m = read_agent_message_in(&mut r, next()).unwrap().unwrap();
        assert_eq!(
            m.command,
            AgentCommand::Hello {
                formats: only_next()
            }
        );
        let m = read_agent_message_in(&mut r, next()).unwrap().unwrap();
        let mut f = hitless_control::encode_frame_in(
            NEXT_FRAME_VERSION,
            hitless_control::FrameKind::Instance,
            format!("{{\"type\":\"ack\",\"request_id\":{}}}", m.request_id).as_bytes(),
        )
        .unwrap();
        f[4] = 77;
        w.write_all(&f).unwrap();
        // A reply in the frozen format that is not a hello is out of range too.
        let f = hitless_control::encode_frame_in(
            HANDSHAKE_VERSION,
            hitless_control::FrameKind::Instance,
            format!("{{\"type\":\"ack\",\"request_id\":{}}}", m.request_id).as_bytes(),
        )
        .unwrap();
        let _ = w.write_all(&f);
        thread::sleep(Duration::from_millis(200));
    });
    let mut c = ControlClient::with_formats(a.try_clone().unwrap(), a, only_next());
    c.wait_hello(T).unwrap();
    let err = c.promote(hitless_control::ControlEpoch(7), T).unwrap_err();
    assert_eq!(
        err.to_string(),
        "control frame format 77 is not supported; this end reads control formats 2..=2"
    );
    instance.join().unwrap();
}

#[test]
fn instance_reads_only_a_hello_in_the_frozen_format_outside_its_range() {
    let (a, i) = UnixStream::pair().unwrap();
    let served = thread::spawn(move || {
        let r = i.try_clone().unwrap();
        serve_with_formats(r, i, &mut Inst::default(), only_next())
    });
    // An agent from before negotiation: commands in format 1, no hello.
    let mut r = a.try_clone().unwrap();
    let mut w = a;
    let hello = hitless_control::read_instance_message_in(&mut r, hitless_control::BUILD_FORMATS)
        .unwrap()
        .unwrap();
    assert!(matches!(hello, InstanceMessage::Hello(_)));
    hitless_control::write_agent_message(
        &mut w,
        &hitless_control::AgentMessage {
            request_id: 1,
            command: AgentCommand::Promote {
                epoch: hitless_control::ControlEpoch(2),
            },
        },
    )
    .unwrap();
    let err = served.join().unwrap().unwrap_err();
    assert_eq!(
        err.to_string(),
        "control frame format 1 is not supported; this end reads control formats 2..=2"
    );
}
