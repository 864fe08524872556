//! A small QMP client.
//!
//! QMP is line-delimited JSON over a unix socket: the server sends a greeting
//! (`{"QMP": {...}}`), the client leaves negotiation mode with
//! `qmp_capabilities`, then each command (`{"execute": ...}`) gets exactly
//! one `{"return": ...}` or `{"error": ...}` reply. Asynchronous events
//! (`{"event": ...}`) may arrive at any point; they are kept, bounded, for
//! inspection.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Longest QMP line accepted.
pub const MAX_LINE: usize = 1 << 20;
/// Events kept before the oldest are dropped.
pub const MAX_EVENTS: usize = 64;

/// QMP failures.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Socket I/O failed.
    #[error("I/O on the QMP socket failed: {0}")]
    Io(#[from] std::io::Error),
    /// The server sent something that is not QMP.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The server rejected a command.
    #[error("command {command} failed: {class}: {desc}")]
    Command {
        /// Command name.
        command: String,
        /// QMP error class.
        class: String,
        /// Human-readable description.
        desc: String,
    },
    /// No reply within the bound.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The server closed the connection.
    #[error("the QMP server closed the connection")]
    Closed,
}

/// A connected, negotiated QMP session.
#[derive(Debug)]
pub struct QmpClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    greeting: Value,
    events: VecDeque<Value>,
    timeout: Duration,
}

/// Run state as returned by `query-status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunState {
    /// QEMU's run state name (`running`, `paused`, `shutdown`, ...).
    pub status: String,
    /// Whether vCPUs are running.
    pub running: bool,
}

impl QmpClient {
    /// Connects to `path`, retrying until `connect_timeout` while the socket
    /// does not exist yet, and negotiates capabilities. Each later reply is
    /// awaited for at most `reply_timeout`.
    pub fn connect(
        path: &Path,
        connect_timeout: Duration,
        reply_timeout: Duration,
    ) -> Result<QmpClient, QmpError> {
        let deadline = Instant::now() + connect_timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e)
                    if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused)
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) if Instant::now() >= deadline => {
                    tracing::debug!(error = %e, "QMP connect timed out");
                    return Err(QmpError::Timeout(connect_timeout));
                }
                Err(e) => return Err(e.into()),
            }
        };
        stream.set_read_timeout(Some(reply_timeout))?;
        stream.set_write_timeout(Some(reply_timeout))?;
        let writer = stream.try_clone()?;
        let mut c = QmpClient {
            reader: BufReader::new(stream),
            writer,
            greeting: Value::Null,
            events: VecDeque::new(),
            timeout: reply_timeout,
        };
        let greeting = c.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "expected a greeting, got {greeting}"
            )));
        }
        c.greeting = greeting;
        c.execute("qmp_capabilities", None)?;
        Ok(c)
    }

    /// The server greeting (holds the QEMU version).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// QEMU version as `major.minor.micro`, from the greeting.
    pub fn qemu_version(&self) -> Option<String> {
        let v = self.greeting.pointer("/QMP/version/qemu")?;
        Some(format!(
            "{}.{}.{}",
            v.get("major")?.as_u64()?,
            v.get("minor")?.as_u64()?,
            v.get("micro")?.as_u64()?
        ))
    }

    fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|e| match e.kind() {
                ErrorKind::WouldBlock | ErrorKind::TimedOut => QmpError::Timeout(self.timeout),
                _ => QmpError::Io(e),
            })?;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        if line.last() != Some(&b'\n') {
            return Err(QmpError::Protocol(format!(
                "line longer than {MAX_LINE} bytes or truncated"
            )));
        }
        serde_json::from_slice(&line).map_err(|e| QmpError::Protocol(format!("invalid JSON ({e})")))
    }

    /// Runs `command` with optional `arguments` and returns its `return`
    /// value. Events seen meanwhile are queued (see [`QmpClient::take_events`]).
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer.write_all(text.as_bytes())?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let m = self.read_message()?;
            if m.get("event").is_some() {
                if self.events.len() == MAX_EVENTS {
                    self.events.pop_front();
                }
                self.events.push_back(m);
                if Instant::now() >= deadline {
                    return Err(QmpError::Timeout(self.timeout));
                }
                continue;
            }
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                return Err(QmpError::Command {
                    command: command.into(),
                    class: e.get("class").and_then(Value::as_str).unwrap_or("?").into(),
                    desc: e.get("desc").and_then(Value::as_str).unwrap_or("?").into(),
                });
            }
            return Err(QmpError::Protocol(format!("unexpected message {m}")));
        }
    }

    /// `query-status`.
    pub fn query_status(&mut self) -> Result<RunState, QmpError> {
        let r = self.execute("query-status", None)?;
        let status = r
            .get("status")
            .and_then(Value::as_str)
            .ok_or_else(|| QmpError::Protocol(format!("query-status returned {r}")))?;
        Ok(RunState {
            status: status.into(),
            running: r.get("running").and_then(Value::as_bool).unwrap_or(false),
        })
    }

    /// `system_powerdown`: ACPI power button press.
    pub fn system_powerdown(&mut self) -> Result<(), QmpError> {
        self.execute("system_powerdown", None).map(|_| ())
    }

    /// `quit`: QEMU exits immediately. The connection closing before the
    /// reply arrives counts as success.
    pub fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute("quit", None) {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(QmpError::Io(e)) if e.kind() == ErrorKind::ConnectionReset => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Drains the events received so far.
    pub fn take_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn serve(script: Vec<(&'static str, &'static str)>) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let l = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            w.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}}, \"capabilities\": []}}\n").unwrap();
            for (expect, reply) in script {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                let v: Value = serde_json::from_str(&line).unwrap();
                assert_eq!(v["execute"], expect);
                w.write_all(reply.as_bytes()).unwrap();
            }
        });
        (dir, path)
    }

    #[test]
    fn negotiates_and_parses_replies() {
        let (_d, path) = serve(vec![
            ("qmp_capabilities", "{\"return\": {}}\n"),
            (
                "query-status",
                "{\"event\": \"RESUME\", \"timestamp\": {}}\n{\"return\": {\"status\": \"running\", \"running\": true}}\n",
            ),
            (
                "system_powerdown",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}}\n",
            ),
        ]);
        let mut c =
            QmpClient::connect(&path, Duration::from_secs(2), Duration::from_secs(2)).unwrap();
        assert_eq!(c.qemu_version().as_deref(), Some("7.2.0"));
        let st = c.query_status().unwrap();
        assert_eq!(
            st,
            RunState {
                status: "running".into(),
                running: true
            }
        );
        assert_eq!(c.take_events().len(), 1);
        let err = c.system_powerdown().unwrap_err();
        assert!(
            matches!(err, QmpError::Command { ref class, .. } if class == "GenericError"),
            "{err}"
        );
    }

    #[test]
    fn garbage_and_missing_greeting_are_errors() {
        let (_d, path) = serve(vec![("qmp_capabilities", "not json\n")]);
        let err =
            QmpClient::connect(&path, Duration::from_secs(2), Duration::from_secs(2)).unwrap_err();
        assert!(matches!(err, QmpError::Protocol(_)), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let err = QmpClient::connect(
            &dir.path().join("none"),
            Duration::from_millis(100),
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(matches!(err, QmpError::Timeout(_)), "{err}");
    }

    #[test]
    fn silent_server_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sock");
        let l = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            std::thread::sleep(Duration::from_millis(500));
            drop(s);
        });
        let err = QmpClient::connect(&path, Duration::from_secs(1), Duration::from_millis(100))
            .unwrap_err();
        assert!(matches!(err, QmpError::Timeout(_)), "{err}");
        t.join().unwrap();
    }
}
