//! The control channel end to end, over a unix socket pair and over a pair of pipes.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::thread;
use std::time::{Duration, Instant};

use hitless_control::{
    serve, serve_unix_listener, write_agent_message, AgentCommand, AgentMessage, Configure,
    ControlClient, ControlError, ControlHandler, Hello, InstanceStatus, Reply, Role, SchemaSupport,
    ServeOutcome, ServiceStatus, SyncMode,
};

const T: Duration = Duration::from_secs(5);

/// A handler with real epoch rules: commands from an older epoch are refused.
#[derive(Default)]
struct Fake {
    role: Option<Role>,
    epoch: u64,
    fenced: bool,
    quiesced: bool,
    upstream: Option<String>,
    delay_status: Option<Duration>,
}

impl Fake {
    fn check_epoch(&self, epoch: u64) -> Result<(), String> {
        if epoch < self.epoch {
            return Err(format!(
                "epoch {epoch} is older than current epoch {}",
                self.epoch
            ));
        }
        Ok(())
    }
}

impl ControlHandler for Fake {
    fn hello(&mut self) -> Hello {
        let mut schemas = BTreeMap::new();
        schemas.insert(
            "kv".to_string(),
            SchemaSupport {
                read: vec![1, 2],
                write: vec![1, 2],
                native: 2,
            },
        );
        Hello {
            instance_id: "i-1".into(),
            image_version: "2.0.0".into(),
            schemas,
            kernel_release: None,
            service_addr: "127.0.0.1:1".into(),
            sync_addr: "127.0.0.1:2".into(),
            formats: None,
        }
    }
    fn configure(&mut self, cfg: &Configure) -> Result<(), String> {
        if cfg.instance_id != "i-1" {
            return Err(format!("this is i-1, not {}", cfg.instance_id));
        }
        self.check_epoch(cfg.epoch.0)?;
        self.role = Some(cfg.role);
        self.epoch = cfg.epoch.0;
        self.upstream = cfg.active_sync_addr.clone();
        Ok(())
    }
    fn promote(&mut self, epoch: hitless_control::ControlEpoch) -> Result<(), String> {
        self.check_epoch(epoch.0)?;
        self.role = Some(Role::Active);
        self.epoch = epoch.0;
        self.quiesced = false;
        Ok(())
    }
    fn quiesce(&mut self, epoch: hitless_control::ControlEpoch) -> Result<(), String> {
        self.check_epoch(epoch.0)?;
        self.quiesced = true;
        Ok(())
    }
    fn demote(
        &mut self,
        epoch: hitless_control::ControlEpoch,
        addr: Option<&str>,
    ) -> Result<(), String> {
        self.check_epoch(epoch.0)?;
        self.role = Some(Role::Standby);
        self.epoch = epoch.0;
        self.upstream = addr.map(str::to_string);
        Ok(())
    }
    fn fence(&mut self, epoch: hitless_control::ControlEpoch) -> Result<(), String> {
        self.check_epoch(epoch.0)?;
        self.fenced = true;
        Ok(())
    }
    fn standby_gone(&mut self, _instance_id: &str) -> Result<(), String> {
        Ok(())
    }
    fn status(&mut self) -> InstanceStatus {
        if let Some(d) = self.delay_status.take() {
            thread::sleep(d);
        }
        let mut services = BTreeMap::new();
        services.insert(
            "kv".into(),
            ServiceStatus {
                applied_seq: self.epoch * 10,
                lag: 0,
                bulk_done: true,
                digest_verified_at: Some(self.epoch * 10),
                ready: true,
            },
        );
        InstanceStatus {
            role: self.role,
            epoch: hitless_control::ControlEpoch(self.epoch),
            services,
            ready: true,
            acked_seq: self.epoch * 10,
            fenced: self.fenced,
            quiesced: self.quiesced,
            memory: None,
        }
    }
    fn shutdown(&mut self) -> Result<(), String> {
        Ok(())
    }
}

fn configure(epoch: u64, role: Role) -> Configure {
    Configure {
        instance_id: "i-1".into(),
        role,
        epoch: hitless_control::ControlEpoch(epoch),
        active_sync_addr: Some("10.0.0.1:7000".into()),
        designated_ha: true,
        sync_mode: SyncMode::Synchronous,
    }
}

/// Drives a full role lifecycle through `client` and checks each effect in the status.
fn lifecycle<W: Write>(client: &mut ControlClient<W>) {
    let hello = client.wait_hello(T).unwrap();
    assert_eq!(hello.instance_id, "i-1");
    assert_eq!(hello.schemas["kv"].native, 2);

    let s = client.status(T).unwrap();
    assert_eq!(s.role, None, "an unconfigured instance has no role");

    client.configure(configure(3, Role::Standby), T).unwrap();
    let s = client.status(T).unwrap();
    assert_eq!((s.role, s.epoch.0), (Some(Role::Standby), 3));

    // Stale epoch is refused with the instance's reason.
    match client.promote(hitless_control::ControlEpoch(2), T) {
        Err(ControlError::Remote { message, .. }) => {
            assert!(message.contains("older"), "{message}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Wrong identity is refused.
    let mut wrong = configure(4, Role::Active);
    wrong.instance_id = "i-9".into();
    assert!(matches!(
        client.configure(wrong, T),
        Err(ControlError::Remote { .. })
    ));

    client.quiesce(hitless_control::ControlEpoch(3), T).unwrap();
    assert!(client.status(T).unwrap().quiesced);
    client.promote(hitless_control::ControlEpoch(4), T).unwrap();
    let s = client.status(T).unwrap();
    assert_eq!(
        (s.role, s.epoch.0, s.quiesced),
        (Some(Role::Active), 4, false)
    );
    assert_eq!(s.services["kv"].applied_seq, 40);
    client
        .demote(
            hitless_control::ControlEpoch(5),
            Some("10.0.0.2:7000".into()),
            T,
        )
        .unwrap();
    client.fence(hitless_control::ControlEpoch(5), T).unwrap();
    let s = client.status(T).unwrap();
    assert_eq!((s.role, s.fenced), (Some(Role::Standby), true));
    assert_eq!(
        client
            .request(
                AgentCommand::Fence {
                    epoch: hitless_control::ControlEpoch(6)
                },
                T
            )
            .unwrap(),
        Reply::Ack
    );
    client.shutdown(T).unwrap();
}

#[test]
fn lifecycle_over_unix_socketpair() {
    let (agent, instance) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || {
        let mut h = Fake::default();
        let r = instance.try_clone().unwrap();
        serve(r, &instance, &mut h).unwrap()
    });
    let mut client = ControlClient::from_unix(agent).unwrap();
    lifecycle(&mut client);
    assert_eq!(server.join().unwrap(), ServeOutcome::Shutdown);
}

#[test]
fn lifecycle_over_pipe_pair() {
    // Two one-way pipes, as a serial line or a virtio-serial port would give.
    let (to_instance_r, to_instance_w) = std::io::pipe().unwrap();
    let (to_agent_r, to_agent_w) = std::io::pipe().unwrap();
    let server = thread::spawn(move || {
        let mut h = Fake::default();
        serve(to_instance_r, to_agent_w, &mut h).unwrap()
    });
    let mut client = ControlClient::new(to_agent_r, to_instance_w);
    lifecycle(&mut client);
    assert_eq!(server.join().unwrap(), ServeOutcome::Shutdown);
}

#[test]
fn late_reply_times_out_then_is_discarded() {
    let (agent, instance) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || {
        let mut h = Fake {
            delay_status: Some(Duration::from_millis(400)),
            ..Fake::default()
        };
        let r = instance.try_clone().unwrap();
        serve(r, &instance, &mut h).unwrap()
    });
    let mut client = ControlClient::from_unix(agent).unwrap();
    client.wait_hello(T).unwrap();
    let start = Instant::now();
    let err = client.status(Duration::from_millis(100)).unwrap_err();
    assert!(
        matches!(err, ControlError::Timeout { request_id: 1, .. }),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_millis(400));
    // The late Status for request 1 must not be taken as the reply to request 2.
    client.configure(configure(1, Role::Active), T).unwrap();
    assert_eq!(client.status(T).unwrap().role, Some(Role::Active));
    client.shutdown(T).unwrap();
    server.join().unwrap();
}

#[test]
fn garbage_body_gets_an_error_reply_and_garbage_framing_ends_the_connection() {
    let (agent, instance) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || {
        let mut h = Fake::default();
        let r = instance.try_clone().unwrap();
        serve(r, &instance, &mut h)
    });
    let mut raw = agent.try_clone().unwrap();
    let mut client = ControlClient::from_unix(agent).unwrap();
    client.wait_hello(T).unwrap();
    // An intact frame whose body is not a message: the instance answers with an error.
    let frame =
        hitless_control::encode_frame(hitless_control::FrameKind::Agent, b"{not json").unwrap();
    raw.write_all(&frame).unwrap();
    // The error (request id 0) is reported on the next request rather than lost.
    match client.status(T) {
        Err(ControlError::Remote { message, .. }) => {
            assert!(message.contains("not a valid"), "{message}")
        }
        other => panic!("expected the malformed-frame error, got {other:?}"),
    }
    // The channel still works.
    assert_eq!(client.status(T).unwrap().role, None);
    // Now break the framing: the instance gives up on this connection with a clear error.
    raw.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let err = server.join().unwrap().unwrap_err();
    assert!(matches!(err, ControlError::BadMagic(_)), "{err}");
    // The agent sees the connection gone (a refused write or the end of stream), not a hang.
    match client.status(T) {
        Err(ControlError::Closed) | Err(ControlError::Io(_)) => {}
        other => panic!("expected a closed channel, got {other:?}"),
    }
}

#[test]
fn truncated_stream_is_a_truncation_error() {
    let (mut agent, instance) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || {
        let mut h = Fake::default();
        let r = instance.try_clone().unwrap();
        serve(r, std::io::sink(), &mut h)
    });
    let mut buf = Vec::new();
    write_agent_message(
        &mut buf,
        &AgentMessage {
            request_id: 1,
            command: AgentCommand::Promote {
                epoch: hitless_control::ControlEpoch(1),
            },
        },
    )
    .unwrap();
    agent.write_all(&buf[..buf.len() - 3]).unwrap();
    drop(agent);
    let err = server.join().unwrap().unwrap_err();
    assert!(matches!(err, ControlError::Truncated { .. }), "{err}");
}

#[test]
fn unix_listener_accepts_reconnects_until_shutdown() {
    let dir = std::env::temp_dir().join(format!("hitless-control-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ctl.sock");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let server = thread::spawn(move || {
        let mut h = Fake::default();
        serve_unix_listener(&listener, &mut h).map(|_| h.epoch)
    });
    {
        let mut c = ControlClient::connect_unix(&path).unwrap();
        c.wait_hello(T).unwrap();
        c.configure(configure(7, Role::Standby), T).unwrap();
    } // dropped: the instance keeps its state and accepts the next agent connection
    let mut c = ControlClient::connect_unix(&path).unwrap();
    c.wait_hello(T).unwrap();
    assert_eq!(c.status(T).unwrap().epoch, hitless_control::ControlEpoch(7));
    c.shutdown(T).unwrap();
    assert_eq!(server.join().unwrap().unwrap(), 7);
    let _ = std::fs::remove_dir_all(&dir);
}
