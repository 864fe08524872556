//! Shared helpers of the integration tests: start kvd binaries, drive them over the
//! control channel, talk RESP to them.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hitless_control::{Configure, ControlClient, Hello, InstanceStatus, Role, SyncMode};
use kvd::resp::{encode_request, parse_reply, Reply};

pub const T: Duration = Duration::from_secs(10);

pub fn bin(version: u32) -> &'static str {
    match version {
        1 => env!("CARGO_BIN_EXE_kvd-v1"),
        _ => env!("CARGO_BIN_EXE_kvd-v2"),
    }
}

/// A kvd process with its control connection.
pub struct Instance {
    pub id: String,
    child: Child,
    pub ctl: ControlClient<UnixStream>,
    pub hello: Hello,
    pub log: PathBuf,
}

impl Instance {
    pub fn start(version: u32, id: &str, dir: &Path) -> Instance {
        let sock = dir.join(format!("{id}.sock"));
        let log = dir.join(format!("{id}.log"));
        let child = Command::new(bin(version))
            .args(["--instance-id", id, "--service-listen", "127.0.0.1:0"])
            .args(["--sync-listen", "127.0.0.1:0", "--control-listen"])
            .arg(&sock)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start kvd");
        let deadline = Instant::now() + T;
        let mut ctl = loop {
            match ControlClient::connect_unix(&sock) {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("kvd {id} control socket never came up: {e}"),
            }
        };
        let hello = ctl.wait_hello(T).expect("hello");
        assert_eq!(hello.instance_id, id);
        Instance {
            id: id.to_string(),
            child,
            ctl,
            hello,
            log,
        }
    }

    pub fn configure(&mut self, role: Role, epoch: u64, active: Option<&Instance>, ha: bool) {
        let cfg = Configure {
            instance_id: self.id.clone(),
            role,
            epoch: hitless_control::ControlEpoch(epoch),
            active_sync_addr: active.map(|a| a.hello.sync_addr.clone()),
            designated_ha: ha,
            sync_mode: SyncMode::Synchronous,
        };
        self.ctl.configure(cfg, T).expect("configure");
    }

    pub fn status(&mut self) -> InstanceStatus {
        self.ctl.status(T).expect("status")
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.hello.service_addr)
    }

    /// Polls status until `pred` holds.
    pub fn wait_for(
        &mut self,
        what: &str,
        pred: impl Fn(&InstanceStatus) -> bool,
    ) -> InstanceStatus {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = self.status();
            if pred(&s) {
                return s;
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                panic!(
                    "{}: timed out waiting for {what}; last status {s:?}\nlog:\n{log}",
                    self.id
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.ctl.shutdown(Duration::from_secs(2));
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal blocking RESP client.
pub struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub fn connect(addr: &str) -> Client {
        let stream = TcpStream::connect(addr).expect("connect to kvd");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn cmd(&mut self, args: &[&str]) -> Reply {
        self.stream.write_all(&encode_request(args)).expect("send");
        self.read_reply()
    }

    /// Sends a command; `None` if the server closed the connection instead of replying.
    pub fn try_cmd(&mut self, args: &[&str]) -> Option<Reply> {
        if self.stream.write_all(&encode_request(args)).is_err() {
            return None;
        }
        loop {
            if let Some((r, n)) = parse_reply(&self.buf).expect("valid reply") {
                self.buf.drain(..n);
                return Some(r);
            }
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    pub fn read_reply(&mut self) -> Reply {
        loop {
            if let Some((r, n)) = parse_reply(&self.buf).expect("valid reply") {
                self.buf.drain(..n);
                return r;
            }
            let mut chunk = [0u8; 65536];
            let n = self.stream.read(&mut chunk).expect("read reply");
            assert!(n > 0, "kvd closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

pub fn bulk(s: &str) -> Reply {
    Reply::bulk(s.as_bytes().to_vec())
}

pub fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kvd-it-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
