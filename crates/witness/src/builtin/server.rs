//! The `hitless witness` daemon: serves the records of its data directory and the pairs'
//! leases over TCP.
//!
//! Every listener is assumed reachable by an attacker: connections are bounded in number,
//! each frame must arrive within the idle timeout, each request is answered within the request
//! timeout, and a malformed frame gets an error answer and the connection's end, never a
//! change of state. Requests on one pair are served one at a time, so a compare-and-swap is
//! atomic; its write is durable before its answer is sent, and it completes even if the
//! connection that asked goes away.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hitless_format::{negotiate, FormatRange};
use tokio::io::BufStream;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::frame::{read_frame, write_frame, BUILD_FORMATS, HANDSHAKE_FORMATS, HANDSHAKE_VERSION};
use super::store::{Store, StoreError, MAX_PAIRS};
use super::wire::{check_ttl, Request, Response, WireError, MAX_TTL, MIN_TTL};
use crate::Versioned;

/// The default lease period: the longest lease granted, and how long after a start no lease
/// is granted.
pub const DEFAULT_LEASE_MAX: Duration = Duration::from_secs(10);
/// The default time a connection may stay silent (or take to send one frame).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The default time to answer one request.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The default bound on connections served at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;

/// How a witness daemon runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where the records are kept.
    pub data_dir: PathBuf,
    /// The longest lease granted, and the time after a start during which none is.
    pub lease_max: Duration,
    /// How long a connection may stay silent (or take to send one frame).
    pub idle_timeout: Duration,
    /// How long one request may take to be answered.
    pub request_timeout: Duration,
    /// How many connections are served at once (more are closed at once).
    pub max_connections: usize,
}

impl ServerConfig {
    /// The defaults, keeping the records in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        ServerConfig {
            data_dir: data_dir.into(),
            lease_max: DEFAULT_LEASE_MAX,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }

    fn check(&self) -> Result<(), ServeError> {
        if self.lease_max < MIN_TTL || self.lease_max > MAX_TTL {
            return Err(ServeError::Config(format!(
                "the lease period {:?} is outside {MIN_TTL:?}..={MAX_TTL:?}",
                self.lease_max
            )));
        }
        if self.idle_timeout.is_zero() || self.request_timeout.is_zero() {
            return Err(ServeError::Config("timeouts must be above zero".into()));
        }
        if self.max_connections == 0 {
            return Err(ServeError::Config(
                "at least one connection must be allowed".into(),
            ));
        }
        Ok(())
    }
}

/// Why the daemon does not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The data directory cannot be used.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The configuration is invalid.
    #[error("invalid witness configuration: {0}")]
    Config(String),
    /// The listening socket failed.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// The failure.
        source: std::io::Error,
    },
}

/// One pair's state.
#[derive(Default)]
struct Pair {
    current: Versioned,
    lease: Option<(String, Instant)>,
}

type PairSlot = Arc<tokio::sync::Mutex<Pair>>;

struct State {
    store: Store,
    pairs: Mutex<HashMap<String, PairSlot>>,
    /// No lease is granted before this instant (one lease period after the start).
    leases_from: Instant,
    lease_max: Duration,
}

/// A witness daemon whose records are loaded: [`Server::serve`] runs it.
pub struct Server {
    state: Arc<State>,
    config: ServerConfig,
}

impl Server {
    /// Loads every record of the data directory (refusing a corrupt one). The lease
    /// quarantine of one lease period starts now.
    pub fn open(config: ServerConfig) -> Result<Server, ServeError> {
        config.check()?;
        let (store, records) = Store::open(&config.data_dir)?;
        tracing::info!(
            dir = %config.data_dir.display(),
            pairs = records.len(),
            "witness records loaded"
        );
        let pairs = records
            .into_iter()
            .map(|(name, current)| {
                let pair = Pair {
                    current,
                    lease: None,
                };
                (name, Arc::new(tokio::sync::Mutex::new(pair)))
            })
            .collect();
        Ok(Server {
            state: Arc::new(State {
                store,
                pairs: Mutex::new(pairs),
                leases_from: Instant::now() + config.lease_max,
                lease_max: config.lease_max,
            }),
            config,
        })
    }

    /// Serves connections from `listener` until `shutdown` completes.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServeError> {
        let limit = Arc::new(Semaphore::new(self.config.max_connections));
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => {
                    while connections.try_join_next().is_some() {}
                    let (stream, peer) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Out of descriptors or a connection reset before accept: pause
                            // rather than spin.
                            tracing::warn!(error = %e, "cannot accept a witness connection");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    match limit.clone().try_acquire_owned() {
                        Ok(permit) => {
                            let state = self.state.clone();
                            let config = self.config.clone();
                            connections.spawn(connection(state, config, stream, peer, permit));
                        }
                        Err(_) => refuse_busy(stream, peer, self.config.max_connections),
                    }
                }
            }
        }
        tracing::info!("witness stopping");
        connections.shutdown().await;
        Ok(())
    }
}

/// Opens the records of `config` and serves `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    Server::open(config)?.serve(listener, shutdown).await
}

/// Opens the records of `config`, listens on `listen` and serves until `shutdown` completes.
pub async fn run(
    listen: SocketAddr,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let server = Server::open(config)?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: listen.to_string(),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| ServeError::Listen {
        addr: listen.to_string(),
        source,
    })?;
    tracing::info!(listen = %local, "witness listening");
    server.serve(listener, shutdown).await
}

/// Tells a connection above the bound why it is closed, without waiting on it.
fn refuse_busy(stream: TcpStream, peer: SocketAddr, max: usize) {
    tracing::warn!(%peer, max, "witness connection refused: too many connections");
    let answer = Response::error(format!("the witness serves at most {max} connections"));
    if let Ok(frame) = answer.encode(HANDSHAKE_VERSION) {
        // Best effort: a fresh socket's buffer takes the frame, or the client sees the close.
        let _ = stream.try_write(&frame);
    }
}

async fn connection(
    state: Arc<State>,
    config: ServerConfig,
    stream: TcpStream,
    peer: SocketAddr,
    _permit: OwnedSemaphorePermit,
) {
    tracing::debug!(%peer, "witness connection opened");
    let _ = stream.set_nodelay(true);
    let mut io = BufStream::new(stream);
    let mut accept: FormatRange = HANDSHAKE_FORMATS;
    let mut version = HANDSHAKE_VERSION;
    let mut greeted = false;
    loop {
        let frame =
            match tokio::time::timeout(config.idle_timeout, read_frame(&mut io, accept)).await {
                Err(_) => {
                    tracing::debug!(%peer, "idle witness connection closed");
                    return;
                }
                Ok(Ok(None)) => return,
                Ok(Ok(Some(frame))) => frame,
                Ok(Err(WireError::Io(e))) => {
                    tracing::debug!(%peer, error = %e, "witness connection failed");
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!(%peer, error = %e, "malformed witness frame; closing");
                    answer(&mut io, version, &Response::error(&e), &config).await;
                    return;
                }
            };
        let request = match Request::decode(&frame) {
            Ok(r) => r,
            Err(e @ (WireError::Body(_) | WireError::WrongKind { .. })) => {
                tracing::warn!(%peer, error = %e, "malformed witness message; closing");
                answer(&mut io, version, &Response::error(&e), &config).await;
                return;
            }
            Err(e) => {
                tracing::debug!(%peer, error = %e, "witness request refused");
                if !answer(&mut io, version, &Response::error(&e), &config).await {
                    return;
                }
                continue;
            }
        };
        let response = match (request, greeted) {
            (Request::Hello { formats }, false) => match negotiate(BUILD_FORMATS, formats) {
                Ok(v) => {
                    greeted = true;
                    let r = Response::Hello { format: v };
                    if !answer(&mut io, version, &r, &config).await {
                        return;
                    }
                    version = v;
                    accept = FormatRange { min: v, max: v };
                    continue;
                }
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "witness client refused");
                    answer(&mut io, version, &Response::error(e), &config).await;
                    return;
                }
            },
            (Request::Hello { .. }, true) => Response::error("a second hello on one connection"),
            (_, false) => {
                answer(
                    &mut io,
                    version,
                    &Response::error("a witness connection opens with a hello"),
                    &config,
                )
                .await;
                return;
            }
            (request, true) => {
                let name = request.name();
                match tokio::time::timeout(config.request_timeout, state.handle(request)).await {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::warn!(%peer, request = name, "witness request timed out");
                        Response::error(format!("no answer within {:?}", config.request_timeout))
                    }
                }
            }
        };
        if !answer(&mut io, version, &response, &config).await {
            return;
        }
    }
}

/// Sends one answer within the request timeout; false if the connection is lost.
async fn answer(
    io: &mut BufStream<TcpStream>,
    version: u8,
    response: &Response,
    config: &ServerConfig,
) -> bool {
    let frame = match response.encode(version) {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(error = %e, "cannot encode a witness answer");
            return false;
        }
    };
    matches!(
        tokio::time::timeout(config.request_timeout, write_frame(io, &frame)).await,
        Ok(Ok(()))
    )
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl State {
    fn existing(&self, pair: &str) -> Option<PairSlot> {
        self.pairs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(pair)
            .cloned()
    }

    /// The pair's slot, made if it has none (within [`MAX_PAIRS`]: pairs without a record,
    /// a live lease or a request in progress make room).
    fn slot(&self, pair: &str) -> Result<PairSlot, Response> {
        let mut pairs = self.pairs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = pairs.get(pair) {
            return Ok(s.clone());
        }
        if pairs.len() >= MAX_PAIRS {
            let now = Instant::now();
            pairs.retain(|_, s| {
                let unused = Arc::strong_count(s) == 1;
                let empty = s.try_lock().is_ok_and(|p| {
                    let leased = matches!(&p.lease, Some((_, until)) if *until > now);
                    p.current.revision == 0 && !leased
                });
                !(unused && empty)
            });
        }
        if pairs.len() >= MAX_PAIRS {
            return Err(Response::error(format!(
                "the witness holds the most pairs it may ({MAX_PAIRS})"
            )));
        }
        let s = PairSlot::default();
        pairs.insert(pair.to_owned(), s.clone());
        Ok(s)
    }

    async fn handle(&self, request: Request) -> Response {
        match request {
            Request::Hello { .. } => Response::error("a second hello on one connection"),
            Request::Read { pair } => {
                let current = match self.existing(&pair) {
                    Some(s) => s.lock().await.current.clone(),
                    None => Versioned::default(),
                };
                Response::Record { current }
            }
            Request::Cas {
                pair,
                expected_revision,
                record,
            } => self.cas(pair, expected_revision, record).await,
            Request::Lease {
                pair,
                holder,
                ttl_ms,
            } => self.lease(&pair, holder, ttl_ms).await,
            Request::Release { pair, holder } => {
                if let Some(s) = self.existing(&pair) {
                    let mut p = s.lock().await;
                    if p.lease.as_ref().is_some_and(|(h, _)| *h == holder) {
                        p.lease = None;
                        tracing::debug!(pair, holder, "lease released");
                    }
                }
                Response::Released
            }
        }
    }

    async fn cas(&self, pair: String, expected: u64, record: crate::WitnessRecord) -> Response {
        let slot = match self.existing(&pair) {
            Some(s) => s,
            // No record: only a creation can succeed, and a conflict needs no slot.
            None if expected != 0 => {
                return Response::Conflict {
                    current: Versioned::default(),
                }
            }
            None => match self.slot(&pair) {
                Ok(s) => s,
                Err(refused) => return refused,
            },
        };
        let mut p = slot.lock_owned().await;
        if p.current.revision != expected {
            return Response::Conflict {
                current: p.current.clone(),
            };
        }
        let Some(revision) = expected.checked_add(1) else {
            return Response::error("the record's revision cannot grow further");
        };
        let next = Versioned { record, revision };
        let store = self.store.clone();
        // The write and the update of the record in memory happen together, under the pair's
        // lock, in a task that finishes even if this request is given up.
        let written = tokio::task::spawn_blocking(move || {
            store.write(&pair, &next)?;
            tracing::info!(pair, revision, record = %next.record, "witness record written");
            p.current = next;
            Ok::<_, StoreError>(())
        })
        .await;
        match written {
            Ok(Ok(())) => Response::Swapped { revision },
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot store a witness record");
                Response::error(format!("the witness cannot store the record: {e}"))
            }
            Err(e) => Response::error(format!("the witness's write failed: {e}")),
        }
    }

    async fn lease(&self, pair: &str, holder: String, ttl_ms: u64) -> Response {
        if let Err(e) = check_ttl(ttl_ms, self.lease_max) {
            return Response::error(e);
        }
        let now = Instant::now();
        if now < self.leases_from {
            // A lease granted before the restart may still be live: wait it out.
            return Response::Refused {
                holder: None,
                retry_after_ms: millis(self.leases_from - now).max(1),
            };
        }
        let slot = match self.slot(pair) {
            Ok(s) => s,
            Err(refused) => return refused,
        };
        let mut p = slot.lock().await;
        let now = Instant::now();
        if let Some((h, until)) = &p.lease {
            if *h != holder && *until > now {
                return Response::Refused {
                    holder: Some(h.clone()),
                    retry_after_ms: millis(*until - now).max(1),
                };
            }
        }
        tracing::debug!(pair, holder, ttl_ms, "lease granted");
        p.lease = Some((holder, now + Duration::from_millis(ttl_ms)));
        Response::Granted { ttl_ms }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(pair: String, ttl_ms: u64) -> Request {
        Request::Lease {
            pair,
            holder: "h".into(),
            ttl_ms,
        }
    }

    #[tokio::test]
    async fn the_number_of_pairs_is_bounded_and_idle_ones_make_room() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ServerConfig::new(dir.path());
        config.lease_max = Duration::from_millis(1000);
        let server = Server::open(config).unwrap();
        let state = server.state.clone();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        for i in 0..MAX_PAIRS {
            let r = state.handle(lease(format!("p{i}"), 1000)).await;
            assert_eq!(r, Response::Granted { ttl_ms: 1000 }, "pair {i}");
        }
        // Every slot holds a live lease: a new pair is refused, by a lease or a creation.
        let full = state.handle(lease("extra".into(), 1000)).await;
        assert!(
            matches!(&full, Response::Error { message } if message.contains("most pairs")),
            "{full:?}"
        );
        let create = Request::Cas {
            pair: "extra".into(),
            expected_revision: 0,
            record: Default::default(),
        };
        assert!(matches!(
            state.handle(create.clone()).await,
            Response::Error { .. }
        ));
        // Known pairs are still served, and reading an unknown one takes no slot.
        assert!(matches!(
            state.handle(lease("p0".into(), 1000)).await,
            Response::Granted { .. }
        ));
        assert_eq!(
            state
                .handle(Request::Read {
                    pair: "other".into()
                })
                .await,
            Response::Record {
                current: Versioned::default()
            }
        );
        // Once the leases ran out, their record-less pairs make room.
        tokio::time::sleep(Duration::from_millis(1050)).await;
        assert_eq!(
            state.handle(create).await,
            Response::Swapped { revision: 1 }
        );
        assert_eq!(state.pairs.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_lease_period_outside_the_ttl_limits_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for bad in [Duration::from_millis(9), Duration::from_secs(61)] {
            let mut config = ServerConfig::new(dir.path());
            config.lease_max = bad;
            assert!(matches!(Server::open(config), Err(ServeError::Config(_))));
        }
    }
}
