//! The RESP server: one thread per connection, pipelined requests, replies to writes
//! released only when durable.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use hitless_sync::AckToken;

use crate::db::{sync_error_reply, Db, Outcome};
use crate::resp::{parse_request, Limits, Reply};

/// Renders the instance section of INFO.
pub type InfoFn = Arc<dyn Fn() -> String + Send + Sync>;

/// Server bounds.
#[derive(Debug, Clone, Copy)]
pub struct ServerConfig {
    /// Request limits.
    pub limits: Limits,
    /// Most simultaneous client connections; more are refused with an error.
    pub max_connections: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            limits: Limits::default(),
            max_connections: 1024,
        }
    }
}

/// Accepts clients on `listener` forever (on the calling thread).
pub fn serve(listener: TcpListener, db: Arc<Db>, info: InfoFn, cfg: ServerConfig) {
    let open = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a client failed");
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        };
        if open.fetch_add(1, Ordering::AcqRel) >= cfg.max_connections {
            open.fetch_sub(1, Ordering::AcqRel);
            let _ = stream.write_all(b"-ERR max number of clients reached\r\n");
            continue;
        }
        let (db, info, open) = (db.clone(), info.clone(), open.clone());
        let spawned = std::thread::Builder::new()
            .name("kvd-client".into())
            .spawn(move || {
                if let Err(e) = handle(&mut stream, &db, &*info, &cfg.limits) {
                    tracing::debug!(error = %e, "client connection ended");
                }
                open.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a client thread");
        }
    }
}

enum Pending {
    Ready(Reply),
    Wait(AckToken, Reply),
}

/// Serves one client until it quits, closes, or sends a malformed request.
pub fn handle(
    stream: &mut TcpStream,
    db: &Db,
    info: &dyn Fn() -> String,
    limits: &Limits,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf: Vec<u8> = Vec::with_capacity(16 << 10);
    let mut chunk = vec![0u8; 64 << 10];
    let mut out = Vec::with_capacity(16 << 10);
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut pos = 0;
        let mut pending = Vec::new();
        let mut close = false;
        loop {
            match parse_request(&buf[pos..], limits) {
                Ok(Some((args, used))) => {
                    pos += used;
                    if args.is_empty() {
                        continue;
                    }
                    match db.execute(&args, info) {
                        Outcome::Now(r) => pending.push(Pending::Ready(r)),
                        Outcome::Durable(t, r) => pending.push(Pending::Wait(t, r)),
                        Outcome::Quit(r) => {
                            pending.push(Pending::Ready(r));
                            close = true;
                            break;
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "closing a client after a protocol error");
                    pending.push(Pending::Ready(Reply::err(format!("Protocol error: {e}"))));
                    close = true;
                    break;
                }
            }
        }
        buf.drain(..pos);
        out.clear();
        for p in pending {
            match p {
                Pending::Ready(r) => r.encode(&mut out),
                Pending::Wait(t, r) => match db.wait_durable(t) {
                    Ok(()) => r.encode(&mut out),
                    Err(e) => sync_error_reply(&e).encode(&mut out),
                },
            }
        }
        stream.write_all(&out)?;
        if close {
            let _ = stream.flush();
            return Ok(());
        }
    }
}
