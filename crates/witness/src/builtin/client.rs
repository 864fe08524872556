//! The client of the `hitless witness` daemon: one [`BuiltinWitness`] per pair, keeping one
//! connection to the first endpoint that answers.

use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::BufStream;
use tokio::net::TcpStream;

use super::frame::{read_frame, write_frame, FormatRange, HANDSHAKE_FORMATS};
use super::wire::{check_name, client_formats, Request, Response, WireError};
use crate::{Cas, Lease, Versioned, Witness, WitnessError, WitnessKind, WitnessRecord};

struct Conn {
    io: BufStream<TcpStream>,
    addr: SocketAddr,
    version: u8,
}

/// A client of the builtin witness for one pair.
///
/// Calls are served one at a time on one connection; a connection that fails is dropped and
/// the next call opens another, trying the endpoints in order. A call on a kept connection
/// that turns out dead is sent once more on a fresh one (a compare-and-swap sent twice is
/// answered by a conflict carrying the record it wrote, which [`crate::change`] recognises).
pub struct BuiltinWitness {
    endpoints: Vec<SocketAddr>,
    pair: String,
    timeout: Duration,
    conn: tokio::sync::Mutex<Option<Conn>>,
}

/// Why one exchange failed.
enum Failure {
    /// The connection is lost (worth one more try on a new one).
    Lost(String),
    /// The witness answered something unreadable.
    Protocol(String),
    /// The witness refused (its error answer).
    Rejected(String),
}

impl From<WireError> for Failure {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Io(_) | WireError::Truncated { .. } => Failure::Lost(e.to_string()),
            other => Failure::Protocol(other.to_string()),
        }
    }
}

impl BuiltinWitness {
    /// A client of `pair` at `endpoints` (tried in order), every call bounded by `timeout`.
    pub fn new(
        endpoints: Vec<SocketAddr>,
        pair: String,
        timeout: Duration,
    ) -> Result<Self, WitnessError> {
        if endpoints.is_empty() {
            return Err(WitnessError::Config(
                "the builtin witness needs at least one endpoint".into(),
            ));
        }
        check_name("pair", &pair).map_err(|e| WitnessError::Config(e.to_string()))?;
        if timeout.is_zero() {
            return Err(WitnessError::Config(
                "the witness request timeout must be above zero".into(),
            ));
        }
        Ok(BuiltinWitness {
            endpoints,
            pair,
            timeout,
            conn: tokio::sync::Mutex::new(None),
        })
    }

    /// The pair this client serves.
    pub fn pair(&self) -> &str {
        &self.pair
    }

    fn unreachable(&self, detail: String) -> WitnessError {
        WitnessError::Unreachable {
            endpoint: self.endpoint(),
            detail,
        }
    }

    /// Sends `request` and returns the answer, within the timeout.
    async fn call(&self, request: Request) -> Result<Response, WitnessError> {
        let answer = match tokio::time::timeout(self.timeout, self.exchange(&request)).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(self.unreachable(format!("no answer within {:?}", self.timeout)));
            }
        };
        match answer {
            Response::Error { message } => Err(WitnessError::Rejected(message)),
            other => Ok(other),
        }
    }

    async fn exchange(&self, request: &Request) -> Result<Response, WitnessError> {
        let mut slot = self.conn.lock().await;
        // Taken out while in use: a call given up half way drops the connection with it.
        let kept = slot.take();
        let reused = kept.is_some();
        let mut conn = match kept {
            Some(c) => c,
            None => self.connect().await?,
        };
        let result = match send(&mut conn, request).await {
            Err(Failure::Lost(why)) if reused => {
                tracing::debug!(addr = %conn.addr, why, "witness connection lost; reconnecting");
                conn = self.connect().await?;
                send(&mut conn, request).await
            }
            other => other,
        };
        match result {
            Ok(r) => {
                *slot = Some(conn);
                Ok(r)
            }
            Err(Failure::Lost(why)) => Err(self.unreachable(format!("{}: {why}", conn.addr))),
            Err(Failure::Protocol(why)) => Err(WitnessError::Protocol(why)),
            Err(Failure::Rejected(why)) => Err(WitnessError::Rejected(why)),
        }
    }

    /// Connects to the first endpoint that answers a hello.
    async fn connect(&self) -> Result<Conn, WitnessError> {
        // Each endpoint gets its share of the call's time: a silent first one leaves time for
        // the others.
        let share = self.timeout / self.endpoints.len().max(1) as u32;
        let mut failures = Vec::new();
        let mut rejected = None;
        for &addr in &self.endpoints {
            match tokio::time::timeout(share, open(addr)).await {
                Ok(Ok(conn)) => return Ok(conn),
                Ok(Err(Failure::Rejected(why))) => {
                    failures.push(format!("{addr}: {why}"));
                    rejected = Some(why);
                }
                Ok(Err(Failure::Lost(why) | Failure::Protocol(why))) => {
                    failures.push(format!("{addr}: {why}"))
                }
                Err(_) => failures.push(format!("{addr}: no connection within {share:?}")),
            }
        }
        match rejected {
            Some(why) if failures.len() == 1 => Err(WitnessError::Rejected(why)),
            _ => Err(self.unreachable(failures.join("; "))),
        }
    }
}

/// Opens a connection to `addr` and agrees on a format.
async fn open(addr: SocketAddr) -> Result<Conn, Failure> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| Failure::Lost(e.to_string()))?;
    let _ = stream.set_nodelay(true);
    let mut conn = Conn {
        io: BufStream::new(stream),
        addr,
        version: HANDSHAKE_FORMATS.min,
    };
    let ours = client_formats();
    match send(&mut conn, &Request::Hello { formats: ours }).await? {
        Response::Hello { format } if ours.contains(format) => {
            conn.version = format;
            tracing::debug!(%addr, format, "witness connection opened");
            Ok(conn)
        }
        Response::Hello { format } => Err(Failure::Protocol(format!(
            "the witness chose format {format}, outside this end's {ours}"
        ))),
        Response::Error { message } => Err(Failure::Rejected(message)),
        other => Err(Failure::Protocol(format!(
            "the witness answered {other:?} to a hello"
        ))),
    }
}

/// One request and its answer on `conn`.
async fn send(conn: &mut Conn, request: &Request) -> Result<Response, Failure> {
    let frame = request.encode(conn.version)?;
    write_frame(&mut conn.io, &frame).await?;
    let accept = match request {
        Request::Hello { .. } => HANDSHAKE_FORMATS,
        _ => FormatRange {
            min: conn.version,
            max: conn.version,
        },
    };
    match read_frame(&mut conn.io, accept).await? {
        Some(f) => Ok(Response::decode(&f)?),
        None => Err(Failure::Lost("the witness closed the connection".into())),
    }
}

fn unexpected(what: &str, answer: &Response) -> WitnessError {
    WitnessError::Protocol(format!("the witness answered {answer:?} to a {what}"))
}

#[async_trait]
impl Witness for BuiltinWitness {
    fn kind(&self) -> WitnessKind {
        WitnessKind::Builtin
    }

    fn endpoint(&self) -> String {
        let addrs: Vec<String> = self.endpoints.iter().map(|a| a.to_string()).collect();
        addrs.join(",")
    }

    async fn read(&self) -> Result<Versioned, WitnessError> {
        match self
            .call(Request::Read {
                pair: self.pair.clone(),
            })
            .await?
        {
            Response::Record { current } => Ok(current),
            other => Err(unexpected("read", &other)),
        }
    }

    async fn compare_and_swap(
        &self,
        expected: u64,
        record: &WitnessRecord,
    ) -> Result<Cas, WitnessError> {
        let request = Request::Cas {
            pair: self.pair.clone(),
            expected_revision: expected,
            record: record.clone(),
        };
        match self.call(request).await? {
            Response::Swapped { revision } if revision > expected => Ok(Cas::Swapped { revision }),
            Response::Conflict { current } => Ok(Cas::Conflict(current)),
            other => Err(unexpected("compare-and-swap", &other)),
        }
    }

    async fn lease(&self, holder: &str, ttl: Duration) -> Result<Lease, WitnessError> {
        let request = Request::Lease {
            pair: self.pair.clone(),
            holder: holder.to_owned(),
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
        };
        match self.call(request).await? {
            Response::Granted { ttl_ms } => Ok(Lease::Granted {
                ttl: Duration::from_millis(ttl_ms),
            }),
            Response::Refused {
                holder,
                retry_after_ms,
            } => Ok(Lease::Refused {
                holder,
                retry_after: Duration::from_millis(retry_after_ms),
            }),
            other => Err(unexpected("lease", &other)),
        }
    }

    async fn release(&self, holder: &str) -> Result<(), WitnessError> {
        let request = Request::Release {
            pair: self.pair.clone(),
            holder: holder.to_owned(),
        };
        match self.call(request).await? {
            Response::Released => Ok(()),
            other => Err(unexpected("release", &other)),
        }
    }
}
