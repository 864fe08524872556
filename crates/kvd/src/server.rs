//! The RESP server: one thread per connection, pipelined requests, replies to writes
//! released only when durable.
//!
//! A connection costs a thread with a small stack and buffers that grow only with what the
//! client sends; the instance's process limit must allow [`ServerConfig::max_connections`]
//! threads beside its own few. A connection opened before control moved away in a planned
//! switchover ([`crate::db::Outcome::NotWritable`]) is closed at its first write refused after
//! the move, once the replies to its earlier requests are sent: the write and every later
//! request were not executed, and a front sends them to the new instance in control.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// Default of [`ServerConfig::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// Stack of a connection thread: parsing and executing a command needs little; the buffers
/// are on the heap.
const CONNECTION_STACK: usize = 256 * 1024;
/// Bytes read from a client at a time.
const READ_CHUNK: usize = 16 * 1024;

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
        // Taken at accept: a request on this connection that finds control moved away since
        // was sent before the move.
        let moves = db.gate.moves();
        let (db, info, open) = (db.clone(), info.clone(), open.clone());
        let spawned = std::thread::Builder::new()
            .name("kvd-client".into())
            .stack_size(CONNECTION_STACK)
            .spawn(move || {
                if let Err(e) = handle(&mut stream, &db, &*info, &cfg.limits, moves) {
                    tracing::debug!(error = %e, "client connection ended");
                }
                open.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            // The connection is closed without a word: nothing was read from it.
            tracing::warn!(error = %e, "cannot start a client thread");
        }
    }
}

enum Pending {
    Ready(Reply),
    Wait(AckToken, Reply),
}

/// Serves one client until it quits, closes, or sends a malformed request. `moves` is
/// [`crate::db::Gate::moves`] when the connection was accepted.
pub fn handle(
    stream: &mut TcpStream,
    db: &Db,
    info: &dyn Fn() -> String,
    limits: &Limits,
    moves: u64,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; READ_CHUNK];
    let mut out = Vec::new();
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
                        Outcome::NotWritable(r) => {
                            if db.gate.moves() > moves {
                                // Control moved away after this connection was opened: neither
                                // this request nor any later one runs here.
                                tracing::debug!(
                                    "closing a client: its write came after control moved away"
                                );
                                close = true;
                                break;
                            }
                            pending.push(Pending::Ready(r));
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
            linger_close(stream, &mut chunk);
            return Ok(());
        }
    }
}

/// How long a closing connection waits for its client to close in turn.
const LINGER: Duration = Duration::from_secs(10);

/// Closes gracefully: the replies already written go out before the end of the stream, and
/// what the client still sends is read and dropped until it closes too (at most [`LINGER`]).
/// Closing a socket with unread input would reset the connection and could drop replies not
/// yet transmitted, which a front would then take for requests never executed.
fn linger_close(stream: &mut TcpStream, chunk: &mut [u8]) {
    if stream.shutdown(Shutdown::Write).is_err() {
        return;
    }
    let deadline = Instant::now() + LINGER;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(chunk) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}
