//! The peer link: this agent and the other appliance's agent.
//!
//! Each agent accepts the peer's connection on `peer_listen` and connects to the peer's
//! `peer_addr`; it sends on the connection it opened and receives on the one it accepted.
//! Messages are JSON lines (at most [`MAX_LINE`] bytes each). A heartbeat goes out every
//! interval whatever else is sent; the peer is declared lost when nothing has arrived for
//! `interval x misses`, and recovered when messages arrive again. Outgoing messages wait in a
//! bounded queue; when the queue is full the oldest non-heartbeat traffic is refused with an
//! error rather than growing memory.
//!
//! # Formats
//!
//! Each agent reads and writes a range of message formats ([`FormatRange`], default
//! [`BUILD_FORMATS`]). On each connection the connecting agent first sends a hello line
//! with its range and the accepting agent answers a welcome line with its own range and the
//! highest format in both (none: no common format, reported on both sides as
//! [`PeerEvent::Malformed`] naming both ranges, and the connection is closed; the sender
//! tries again after the loss bound, in case the peer was upgraded meanwhile). The two
//! handshake lines are frozen: plain JSON lines (format 1), read by every build. A message
//! line in format 1 is the JSON message itself (it starts with `{` or `"`, never a digit); in
//! any later format it starts with the format number and a space. An agent from before
//! negotiation sends no hello (its first line is a message: it speaks format 1) and answers
//! none (after a heartbeat interval without a welcome, the sender takes the peer for such an agent;
//! that agent reports the hello line as undecodable once and skips it).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// The longest message line accepted from the peer.
pub const MAX_LINE: usize = 8 * 1024 * 1024;
/// Outgoing messages queued at most.
pub const OUTBOX: usize = 4096;
/// The longest handshake line accepted.
const MAX_HANDSHAKE_LINE: usize = 4096;
/// The oldest peer message format this build reads and writes.
pub const MIN_PEER_FORMAT: u8 = 1;
/// The newest peer message format this build reads and writes.
pub const PEER_FORMAT: u8 = 1;
/// A test-only next format, standing in for the next release's: each line starts with `2 `.
#[cfg(test)]
pub const NEXT_PEER_FORMAT: u8 = 2;

/// An inclusive range of peer message formats (what an agent reads and writes).
pub use hitless_format::FormatRange;

/// The peer formats this build reads and writes by default.
pub const BUILD_FORMATS: FormatRange = FormatRange {
    min: MIN_PEER_FORMAT,
    max: PEER_FORMAT,
};

/// What an agent from before negotiation speaks.
pub const LEGACY_FORMATS: FormatRange = FormatRange { min: 1, max: 1 };

/// The peer formats this build has codecs for (test builds also know the next one).
pub fn known_formats() -> FormatRange {
    #[cfg(test)]
    let max = NEXT_PEER_FORMAT;
    #[cfg(not(test))]
    let max = PEER_FORMAT;
    FormatRange {
        min: MIN_PEER_FORMAT,
        max,
    }
}

/// The peer format range `min..=max`; fails if it is empty or names a format this build does
/// not know.
pub fn format_range(min: u8, max: u8) -> Result<FormatRange, PeerError> {
    let known = known_formats();
    FormatRange::new(min, max, known).map_err(|_| PeerError::BadFormats {
        range: FormatRange { min, max },
        known,
    })
}

/// The frozen handshake lines (plain JSON lines whatever the formats).
#[derive(Debug, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Handshake {
    /// Connecting agent -> accepting agent: the formats it reads and writes.
    HitlessPeerHello { formats: FormatRange },
    /// Accepting agent -> connecting agent: its formats and the format chosen, if any.
    HitlessPeerWelcome {
        formats: FormatRange,
        format: Option<u8>,
    },
}

/// Encodes one message line in format `version`.
fn encode_line<M: Serialize>(version: u8, m: &M) -> Result<Vec<u8>, serde_json::Error> {
    let mut line = Vec::new();
    if version != 1 {
        line.extend_from_slice(format!("{version} ").as_bytes());
    }
    serde_json::to_writer(&mut line, m)?;
    line.push(b'\n');
    Ok(line)
}

/// Decodes one message line in any format of `formats`.
fn decode_line<M: DeserializeOwned>(line: &[u8], formats: FormatRange) -> Result<M, String> {
    let digits = line.iter().take_while(|b| b.is_ascii_digit()).count();
    let (version, body) = if digits == 0 {
        (1u32, line)
    } else {
        let v = std::str::from_utf8(&line[..digits])
            .ok()
            .and_then(|d| d.parse::<u32>().ok())
            .unwrap_or(u32::MAX);
        if line.get(digits) != Some(&b' ') {
            return Err("undecodable peer message: a format number without a space".into());
        }
        (v, &line[digits + 1..])
    };
    let readable =
        u8::try_from(version).is_ok_and(|v| formats.contains(v) && known_formats().contains(v));
    if !readable {
        return Err(format!(
            "peer message in format {version}: this agent reads peer formats {formats}; skipped"
        ));
    }
    serde_json::from_slice::<M>(body).map_err(|e| format!("undecodable peer message: {e}"))
}

/// Errors of the peer link.
#[derive(Debug, Error)]
pub enum PeerError {
    #[error("cannot listen for the peer agent on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the queue of messages to the peer agent is full ({OUTBOX} messages)")]
    Full,
    #[error("the peer link is closed")]
    Closed,
    #[error("peer format range {range} is invalid: this build knows peer formats {known}")]
    BadFormats {
        range: FormatRange,
        known: FormatRange,
    },
    #[error(
        "no common peer-link format: this agent reads and writes peer formats {local}, \
         the peer agent {peer}"
    )]
    NoCommonFormat {
        local: FormatRange,
        peer: FormatRange,
    },
}

/// What the link tells the agent.
#[derive(Debug)]
pub enum PeerEvent<M> {
    /// A message from the peer.
    Message(M),
    /// Nothing from the peer for the failure-detection bound.
    Lost,
    /// Messages from the peer arrive again after a loss (or for the first time).
    Up,
    /// A line from the peer that could not be decoded (it is skipped), or a connection
    /// closed at its handshake (no common format).
    Malformed(String),
}

/// The sending side of the link. Cheap to clone.
#[derive(Clone)]
pub struct PeerLink<M> {
    tx: mpsc::Sender<M>,
    up: Arc<AtomicBool>,
}

impl<M> PeerLink<M>
where
    M: Serialize + DeserializeOwned + Send + 'static,
{
    /// Starts the link. `heartbeat` makes the heartbeat message sent every `interval`;
    /// events arrive on the returned receiver.
    pub async fn start(
        listen: SocketAddr,
        peer: SocketAddr,
        interval: Duration,
        misses: u32,
        heartbeat: impl Fn() -> M + Send + Sync + 'static,
    ) -> Result<(Self, mpsc::Receiver<PeerEvent<M>>), PeerError> {
        Self::start_with_formats(listen, peer, interval, misses, BUILD_FORMATS, heartbeat).await
    }

    /// Like [`Self::start`] for an agent that reads and writes the message formats `formats`.
    pub async fn start_with_formats(
        listen: SocketAddr,
        peer: SocketAddr,
        interval: Duration,
        misses: u32,
        formats: FormatRange,
        heartbeat: impl Fn() -> M + Send + Sync + 'static,
    ) -> Result<(Self, mpsc::Receiver<PeerEvent<M>>), PeerError> {
        format_range(formats.min, formats.max)?;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| PeerError::Listen {
                addr: listen,
                source,
            })?;
        let (tx, out_rx) = mpsc::channel::<M>(OUTBOX);
        let (ev_tx, ev_rx) = mpsc::channel::<PeerEvent<M>>(OUTBOX);
        let up = Arc::new(AtomicBool::new(false));
        let (seen_tx, seen_rx) = tokio::sync::watch::channel(None::<Instant>);
        // Receiver: accept the peer's connection(s) and read lines.
        let ev = ev_tx.clone();
        let idle = idle_bound(interval * misses);
        tokio::spawn(async move {
            loop {
                let Ok((stream, from)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                debug!(%from, "peer agent connected");
                stream.set_nodelay(true).ok();
                let ev = ev.clone();
                let seen = seen_tx.clone();
                let formats = formats;
                tokio::spawn(async move {
                    let mut reader = BufReader::new(stream);
                    let mut line = Vec::new();
                    let mut first = true;
                    loop {
                        line.clear();
                        let mut limited = (&mut reader).take(MAX_LINE as u64 + 1);
                        let read = limited.read_until(b'\n', &mut line);
                        let n = match tokio::time::timeout(idle, read).await {
                            Ok(Ok(0)) | Ok(Err(_)) => break,
                            Ok(Ok(n)) => n,
                            Err(_) => {
                                // Heartbeats stopped: the peer reconnects when it can, and this
                                // connection (dead, or cut one way) would otherwise stay open.
                                debug!(%from, ?idle, "peer connection idle: closing it");
                                break;
                            }
                        };
                        if n > MAX_LINE {
                            let _ = ev
                                .send(PeerEvent::Malformed(format!(
                                    "a peer message exceeds {MAX_LINE} bytes; closing the connection"
                                )))
                                .await;
                            break;
                        }
                        if std::mem::take(&mut first) {
                            match accept_handshake(&mut reader, &line, formats).await {
                                Ok(true) => continue,
                                Ok(false) => {}
                                Err(e) => {
                                    warn!(%from, "peer link: {e}");
                                    let _ = ev.send(PeerEvent::Malformed(e)).await;
                                    break;
                                }
                            }
                        }
                        seen.send_replace(Some(Instant::now()));
                        match decode_line::<M>(&line, formats) {
                            Ok(m) => {
                                if ev.send(PeerEvent::Message(m)).await.is_err() {
                                    return;
                                }
                            }
                            Err(e) => {
                                let _ = ev.send(PeerEvent::Malformed(e)).await;
                            }
                        }
                    }
                });
            }
        });
        // Failure detector.
        let bound = interval * misses;
        let ev = ev_tx.clone();
        let up_flag = up.clone();
        tokio::spawn(async move {
            // Judged every fifth of an interval: the peer is declared lost at most a fifth of
            // an interval after its silence reached the bound (a judgement every half interval
            // let it run up to 25 ms over a 50 ms heartbeat's bound).
            let mut tick = tokio::time::interval(interval / 5);
            // After a pause, the next judgement comes a whole tick later (not at once).
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut prev = tokio::time::Instant::now();
            let mut paused_ticks = 0u32;
            loop {
                tick.tick().await;
                // A tick that comes late means this agent itself was not running (starved of
                // CPU, stopped): the peer's heartbeats may be waiting unread in the socket.
                // Give the receiver a turn before judging, a bounded number of times in a row.
                let now = tokio::time::Instant::now();
                let gap = now.duration_since(prev);
                prev = now;
                if gap > interval && paused_ticks < misses {
                    paused_ticks += 1;
                    debug!(
                        ?gap,
                        "failure detector ran late: judging the peer on the next tick"
                    );
                    continue;
                }
                paused_ticks = 0;
                let Some(last) = *seen_rx.borrow() else {
                    continue;
                };
                let alive = last.elapsed() < bound;
                let was = up_flag.load(Ordering::Acquire);
                if alive != was && (alive || was) {
                    up_flag.store(alive, Ordering::Release);
                    let e = if alive {
                        info!("peer agent is up");
                        PeerEvent::Up
                    } else {
                        warn!(?bound, silent = ?last.elapsed(), "peer agent lost: no heartbeat");
                        PeerEvent::Lost
                    };
                    if ev.send(e).await.is_err() {
                        return;
                    }
                }
            }
        });
        // Sender: keep a connection to the peer, send queued messages and heartbeats.
        tokio::spawn(sender(
            peer,
            interval,
            interval * misses,
            formats,
            out_rx,
            ev_tx,
            heartbeat,
        ));
        Ok((Self { tx, up }, ev_rx))
    }

    /// Queues a message for the peer.
    pub fn send(&self, m: M) -> Result<(), PeerError> {
        self.tx.try_send(m).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => PeerError::Full,
            mpsc::error::TrySendError::Closed(_) => PeerError::Closed,
        })
    }

    /// Whether the peer is currently considered up.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }
}

/// Accepting side of the handshake, on the first line of a connection: answers a hello
/// (`Ok(true)`: the line is consumed) or takes a first line that is not one for a message of
/// an agent from before negotiation (`Ok(false)`). `Err`: no common format (the welcome
/// saying so was sent).
async fn accept_handshake(
    reader: &mut BufReader<TcpStream>,
    line: &[u8],
    formats: FormatRange,
) -> Result<bool, String> {
    let (peer, hello) = match serde_json::from_slice::<Handshake>(line) {
        Ok(Handshake::HitlessPeerHello { formats: peer }) => (peer, true),
        _ => (LEGACY_FORMATS, false),
    };
    let format = formats.highest_common(&peer);
    if hello {
        let welcome = Handshake::HitlessPeerWelcome { formats, format };
        let mut out = serde_json::to_vec(&welcome).map_err(|e| e.to_string())?;
        out.push(b'\n');
        if let Err(e) = reader.get_mut().write_all(&out).await {
            return Err(format!("cannot answer the peer agent's hello: {e}"));
        }
    }
    match format {
        Some(v) => {
            debug!(%formats, %peer, format = v, "peer link format negotiated (incoming)");
            Ok(hello)
        }
        None => Err(PeerError::NoCommonFormat {
            local: formats,
            peer,
        }
        .to_string()),
    }
}

/// Connecting side of the handshake: the format to write, or why there is none.
async fn connect_handshake(
    s: &mut TcpStream,
    formats: FormatRange,
    wait: Duration,
) -> Result<u8, String> {
    let mut hello =
        serde_json::to_vec(&Handshake::HitlessPeerHello { formats }).map_err(|e| e.to_string())?;
    hello.push(b'\n');
    s.write_all(&hello)
        .await
        .map_err(|e| format!("cannot send the hello to the peer agent: {e}"))?;
    let mut line = Vec::new();
    let mut r = BufReader::new(&mut *s).take(MAX_HANDSHAKE_LINE as u64);
    let reply = tokio::time::timeout(wait, r.read_until(b'\n', &mut line)).await;
    let peer = match reply {
        Ok(Ok(n)) if n > 0 => match serde_json::from_slice::<Handshake>(&line) {
            Ok(Handshake::HitlessPeerWelcome {
                formats: peer,
                format,
            }) => {
                return match format {
                    Some(v) if formats.contains(v) => Ok(v),
                    Some(v) => Err(format!(
                        "the peer agent chose peer format {v}, outside this agent's formats {formats}"
                    )),
                    None => Err(PeerError::NoCommonFormat {
                        local: formats,
                        peer,
                    }
                    .to_string()),
                };
            }
            _ => return Err("the peer agent answered its hello with an undecodable line".into()),
        },
        Ok(Ok(_)) | Ok(Err(_)) => {
            return Err("the peer agent closed the connection at its hello".into())
        }
        // No answer: an agent from before negotiation, which speaks format 1.
        Err(_) => LEGACY_FORMATS,
    };
    formats.highest_common(&peer).ok_or_else(|| {
        PeerError::NoCommonFormat {
            local: formats,
            peer,
        }
        .to_string()
    })
}

/// How long an incoming peer connection may stay silent before it is closed: several loss
/// bounds (heartbeats come every interval), and at least a second.
fn idle_bound(loss_bound: Duration) -> Duration {
    (loss_bound * 4).max(Duration::from_secs(1))
}

async fn sender<M: Serialize + Send + 'static>(
    peer: SocketAddr,
    interval: Duration,
    bound: Duration,
    formats: FormatRange,
    mut out_rx: mpsc::Receiver<M>,
    ev: mpsc::Sender<PeerEvent<M>>,
    heartbeat: impl Fn() -> M + Send + Sync + 'static,
) {
    let mut conn: Option<(TcpStream, u8)> = None;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending: Option<M> = None;
    loop {
        if conn.is_none() {
            match tokio::time::timeout(interval, TcpStream::connect(peer)).await {
                Ok(Ok(mut s)) => {
                    s.set_nodelay(true).ok();
                    // A connection whose data goes unacknowledged for the loss bound is
                    // aborted by the kernel, so that the next write fails and a new connection
                    // is made. Without it, heartbeats written during a one-way cut wait in the
                    // send buffer for TCP's retransmission backoff (tens of seconds) after the
                    // cut heals, and the peer keeps taking this agent for lost meanwhile.
                    if let Err(e) = socket2::SockRef::from(&s).set_tcp_user_timeout(Some(bound)) {
                        warn!(
                            "peer link: cannot bound unacknowledged data (TCP_USER_TIMEOUT): {e}"
                        );
                    }
                    // Waiting for the welcome longer than a heartbeat interval could make
                    // an agent from before negotiation (which never answers) take this one
                    // for lost.
                    match connect_handshake(&mut s, formats, interval).await {
                        Ok(v) => {
                            debug!(%formats, format = v, "peer link format negotiated (outgoing)");
                            conn = Some((s, v));
                        }
                        Err(e) => {
                            warn!("peer link: {e}");
                            if ev.send(PeerEvent::Malformed(e)).await.is_err() {
                                return;
                            }
                            // The peer may be upgraded meanwhile: try again, not in a loop.
                            tokio::time::sleep(bound).await;
                            continue;
                        }
                    }
                }
                _ => {
                    // Keep the queue bounded while disconnected: drop nothing, wait a beat.
                    tokio::time::sleep(interval / 2).await;
                    continue;
                }
            }
        }
        let msg = match pending.take() {
            Some(m) => m,
            None => tokio::select! {
                m = out_rx.recv() => match m { Some(m) => m, None => return },
                _ = tick.tick() => heartbeat(),
            },
        };
        let (s, version) = conn.as_mut().expect("connected above");
        let line = match encode_line(*version, &msg) {
            Ok(l) => l,
            Err(e) => {
                warn!("cannot encode a peer message: {e}");
                continue;
            }
        };
        if let Err(e) = s.write_all(&line).await {
            debug!("peer link write failed: {e}; reconnecting");
            conn = None;
            pending = Some(msg);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt;

    #[test]
    fn handshake_lines_serialize_their_format_ranges_as_before() {
        let hello = Handshake::HitlessPeerHello {
            formats: format_range(1, 2).unwrap(),
        };
        assert_eq!(
            serde_json::to_string(&hello).unwrap(),
            r#"{"hitless-peer-hello":{"formats":{"min":1,"max":2}}}"#
        );
        let welcome = Handshake::HitlessPeerWelcome {
            formats: format_range(1, 1).unwrap(),
            format: Some(1),
        };
        assert_eq!(
            serde_json::to_string(&welcome).unwrap(),
            r#"{"hitless-peer-welcome":{"formats":{"min":1,"max":1},"format":1}}"#
        );
    }

    #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
    enum Msg {
        Beat,
        Hello(u32),
    }

    fn free_addr() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }

    async fn next_non_beat(rx: &mut mpsc::Receiver<PeerEvent<Msg>>) -> PeerEvent<Msg> {
        loop {
            let e = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("an event within 5 s")
                .expect("open");
            if !matches!(e, PeerEvent::Message(Msg::Beat)) {
                return e;
            }
        }
    }

    #[tokio::test]
    async fn messages_cross_both_ways_and_each_side_sees_the_other_up() {
        let (a_addr, b_addr) = (free_addr(), free_addr());
        let (a, mut a_rx) =
            PeerLink::start(a_addr, b_addr, Duration::from_millis(20), 3, || Msg::Beat)
                .await
                .unwrap();
        let (b, mut b_rx) =
            PeerLink::start(b_addr, a_addr, Duration::from_millis(20), 3, || Msg::Beat)
                .await
                .unwrap();
        assert!(matches!(next_non_beat(&mut b_rx).await, PeerEvent::Up));
        assert!(matches!(next_non_beat(&mut a_rx).await, PeerEvent::Up));
        assert!(a.is_up() && b.is_up());
        a.send(Msg::Hello(7)).unwrap();
        assert!(matches!(
            next_non_beat(&mut b_rx).await,
            PeerEvent::Message(Msg::Hello(7))
        ));
        b.send(Msg::Hello(9)).unwrap();
        assert!(matches!(
            next_non_beat(&mut a_rx).await,
            PeerEvent::Message(Msg::Hello(9))
        ));
    }

    #[tokio::test]
    async fn a_peer_never_seen_is_neither_up_nor_lost() {
        let (_c, mut c_rx) = PeerLink::start(
            free_addr(),
            free_addr(),
            Duration::from_millis(20),
            3,
            || Msg::Beat,
        )
        .await
        .unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(200), c_rx.recv())
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn a_silent_peer_is_lost_and_then_recovered() {
        let (a_addr, b_addr) = (free_addr(), free_addr());
        let (_a, mut a_rx) =
            PeerLink::start(a_addr, b_addr, Duration::from_millis(20), 3, || Msg::Beat)
                .await
                .unwrap();
        // A fake peer: connects to a, sends a few lines, then goes silent without closing.
        let mut s = TcpStream::connect(a_addr).await.unwrap();
        s.write_all(b"\"Beat\"\n\"Beat\"\n").await.unwrap();
        assert!(matches!(next_non_beat(&mut a_rx).await, PeerEvent::Up));
        let silent_from = Instant::now();
        assert!(matches!(next_non_beat(&mut a_rx).await, PeerEvent::Lost));
        let took = silent_from.elapsed();
        assert!(
            took >= Duration::from_millis(40),
            "declared lost after {took:?}, before 3 intervals of silence"
        );
        s.write_all(b"{\"Hello\":1}\n").await.unwrap();
        assert!(matches!(
            next_non_beat(&mut a_rx).await,
            PeerEvent::Message(Msg::Hello(1))
        ));
        assert!(matches!(next_non_beat(&mut a_rx).await, PeerEvent::Up));
        // A malformed line is reported, not fatal.
        s.write_all(b"not json\n").await.unwrap();
        loop {
            match next_non_beat(&mut a_rx).await {
                PeerEvent::Malformed(m) => {
                    assert!(m.contains("undecodable"), "{m}");
                    break;
                }
                PeerEvent::Message(_) => continue,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    fn fmts(min: u8, max: u8) -> FormatRange {
        format_range(min, max).unwrap()
    }

    fn next() -> FormatRange {
        fmts(PEER_FORMAT, NEXT_PEER_FORMAT)
    }

    async fn link(
        listen: SocketAddr,
        peer: SocketAddr,
        f: FormatRange,
    ) -> (PeerLink<Msg>, mpsc::Receiver<PeerEvent<Msg>>) {
        PeerLink::start_with_formats(listen, peer, Duration::from_millis(20), 3, f, || Msg::Beat)
            .await
            .unwrap()
    }

    async fn messages_cross(fa: FormatRange, fb: FormatRange) {
        let (a_addr, b_addr) = (free_addr(), free_addr());
        let (a, mut a_rx) = link(a_addr, b_addr, fa).await;
        let (b, mut b_rx) = link(b_addr, a_addr, fb).await;
        assert!(matches!(next_non_beat(&mut b_rx).await, PeerEvent::Up));
        assert!(matches!(next_non_beat(&mut a_rx).await, PeerEvent::Up));
        a.send(Msg::Hello(7)).unwrap();
        assert!(matches!(
            next_non_beat(&mut b_rx).await,
            PeerEvent::Message(Msg::Hello(7))
        ));
        b.send(Msg::Hello(9)).unwrap();
        assert!(matches!(
            next_non_beat(&mut a_rx).await,
            PeerEvent::Message(Msg::Hello(9))
        ));
    }

    #[tokio::test]
    async fn next_release_and_current_agents_exchange_messages_both_ways() {
        messages_cross(next(), BUILD_FORMATS).await;
        messages_cross(BUILD_FORMATS, next()).await;
    }

    #[tokio::test]
    async fn two_next_release_agents_negotiate_the_next_format_and_work() {
        messages_cross(next(), next()).await;
    }

    /// A scripted accepting agent of range `theirs`: returns the hello it read and the first
    /// message line after its welcome.
    async fn scripted_acceptor(
        mine: FormatRange,
        theirs: Option<FormatRange>,
    ) -> (FormatRange, String) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (link, _rx) = link(free_addr(), addr, mine).await;
        link.send(Msg::Hello(3)).unwrap();
        let (s, _) = listener.accept().await.unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        let Handshake::HitlessPeerHello { formats } = serde_json::from_str(&line).unwrap() else {
            panic!("not a hello: {line}");
        };
        // None: an agent from before negotiation, which answers nothing.
        if let Some(theirs) = theirs {
            let welcome = Handshake::HitlessPeerWelcome {
                formats: theirs,
                format: theirs.highest_common(&formats),
            };
            let mut out = serde_json::to_vec(&welcome).unwrap();
            out.push(b'\n');
            r.get_mut().write_all(&out).await.unwrap();
        }
        loop {
            line.clear();
            r.read_line(&mut line).await.unwrap();
            if line.contains("Hello") {
                return (formats, line);
            }
        }
    }

    #[tokio::test]
    async fn lines_on_the_wire_are_in_the_negotiated_format() {
        let (hello, line) = scripted_acceptor(next(), Some(next())).await;
        assert_eq!(hello, next());
        assert_eq!(line, "2 {\"Hello\":3}\n");
        let (hello, line) = scripted_acceptor(next(), Some(BUILD_FORMATS)).await;
        assert_eq!(hello, next());
        assert_eq!(line, "{\"Hello\":3}\n");
        let (_, line) = scripted_acceptor(BUILD_FORMATS, Some(next())).await;
        assert_eq!(line, "{\"Hello\":3}\n");
        // An acceptor from before negotiation never answers: format 1 after an interval.
        let (_, line) = scripted_acceptor(next(), None).await;
        assert_eq!(line, "{\"Hello\":3}\n");
    }

    #[tokio::test]
    async fn agents_without_a_common_format_are_refused_naming_both_ranges() {
        let (a_addr, b_addr) = (free_addr(), free_addr());
        let only_next = fmts(NEXT_PEER_FORMAT, NEXT_PEER_FORMAT);
        let (a, mut a_rx) = link(a_addr, b_addr, only_next).await;
        let (_b, mut b_rx) = link(b_addr, a_addr, BUILD_FORMATS).await;
        for (rx, local, peer) in [(&mut a_rx, "2..=2", "1..=1"), (&mut b_rx, "1..=1", "2..=2")] {
            let want = format!(
                "no common peer-link format: this agent reads and writes peer formats {local}, the peer agent {peer}"
            );
            match next_non_beat(rx).await {
                PeerEvent::Malformed(m) => assert_eq!(m, want),
                other => panic!("unexpected {other:?}"),
            }
        }
        // Nothing gets through, and neither side takes the other for up.
        a.send(Msg::Hello(1)).unwrap();
        let until = Instant::now() + Duration::from_millis(200);
        while let Ok(Some(e)) = tokio::time::timeout_at(until, b_rx.recv()).await {
            assert!(matches!(e, PeerEvent::Malformed(_)), "{e:?}");
        }
        assert!(!a.is_up());
    }

    /// Connects to the agent at `addr` as a peer offering format 2 only; returns the connection
    /// and the agent's welcome line.
    async fn hello_in_format_2(addr: SocketAddr) -> (BufReader<TcpStream>, String) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"{\"hitless-peer-hello\":{\"formats\":{\"min\":2,\"max\":2}}}\n")
            .await
            .unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        (r, line)
    }

    #[tokio::test]
    async fn a_corrupt_format_number_after_negotiation_is_reported_and_skipped() {
        let a_addr = free_addr();
        let (_a, mut a_rx) = link(a_addr, free_addr(), next()).await;
        let (mut r, line) = hello_in_format_2(a_addr).await;
        assert_eq!(
            line,
            "{\"hitless-peer-welcome\":{\"formats\":{\"min\":1,\"max\":2},\"format\":2}}\n"
        );
        let s = r.get_mut();
        s.write_all(b"2 \"Beat\"\n9 {\"Hello\":4}\n99999999999 \"Beat\"\n2 {\"Hello\":5}\n")
            .await
            .unwrap();
        let mut malformed = Vec::new();
        loop {
            match next_non_beat(&mut a_rx).await {
                PeerEvent::Malformed(m) => malformed.push(m),
                PeerEvent::Up => {}
                PeerEvent::Message(Msg::Hello(5)) => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(
            malformed,
            [
                "peer message in format 9: this agent reads peer formats 1..=2; skipped",
                "peer message in format 4294967295: this agent reads peer formats 1..=2; skipped",
            ]
        );
    }

    /// A connection that stops sending (cut one way, or an attacker that never speaks) is
    /// closed once silent for the idle bound, instead of staying open for good.
    #[tokio::test]
    async fn a_silent_incoming_connection_is_closed_after_the_idle_bound() {
        let a_addr = free_addr();
        let (_a, _a_rx) = link(a_addr, free_addr(), next()).await;
        // 20 ms x 3: a loss bound of 60 ms, an idle bound of 1 s.
        assert_eq!(
            idle_bound(Duration::from_millis(60)),
            Duration::from_secs(1)
        );
        assert_eq!(
            idle_bound(Duration::from_millis(500)),
            Duration::from_secs(2)
        );
        let (mut r, mut line) = hello_in_format_2(a_addr).await;
        assert!(line.contains("hitless-peer-welcome"), "{line}");
        // Silent from now on: the agent closes its end (EOF here), well within 10 s.
        line.clear();
        let n = tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut line))
            .await
            .expect("the silent connection was not closed")
            .unwrap_or(0);
        assert_eq!(n, 0, "{line}");
    }

    /// An agent that was itself not running (starved of CPU) for longer than the bound while
    /// its peer kept beating must not take the peer for lost: the beats wait in its socket.
    #[tokio::test(flavor = "current_thread")]
    async fn a_pause_of_this_agent_is_not_taken_for_a_lost_peer() {
        let (a_addr, b_addr) = (free_addr(), free_addr());
        let (_a, mut a_rx) =
            PeerLink::start(a_addr, b_addr, Duration::from_millis(20), 3, || Msg::Beat)
                .await
                .unwrap();
        // The peer beats every 10 ms from its own thread, whatever this runtime does.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let peer = std::thread::spawn(move || {
            use std::io::Write;
            let mut c = std::net::TcpStream::connect(a_addr).unwrap();
            while !s.load(Ordering::Acquire) {
                if c.write_all(b"\"Beat\"\n").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        assert!(matches!(next_non_beat(&mut a_rx).await, PeerEvent::Up));
        for _ in 0..5 {
            // This whole runtime stops for 4x the loss bound.
            std::thread::sleep(Duration::from_millis(240));
            let until = tokio::time::Instant::now() + Duration::from_millis(100);
            while let Ok(Some(e)) = tokio::time::timeout_at(until, a_rx.recv()).await {
                assert!(
                    matches!(e, PeerEvent::Message(Msg::Beat)),
                    "a beating peer was judged after this agent's own pause: {e:?}"
                );
            }
        }
        stop.store(true, Ordering::Release);
        peer.join().unwrap();
    }
}
