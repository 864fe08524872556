//! The peer link: this agent and the other appliance's agent.
//!
//! Each agent accepts the peer's connection on `peer_listen` and connects to the peer's
//! `peer_addr`; it sends on the connection it opened and receives on the one it accepted.
//! Messages are JSON lines (at most [`MAX_LINE`] bytes each). A heartbeat goes out every
//! interval whatever else is sent; the peer is declared lost when nothing has arrived for
//! `interval x misses`, and recovered when messages arrive again. Outgoing messages wait in a
//! bounded queue; when the queue is full the oldest non-heartbeat traffic is refused with an
//! error rather than growing memory.

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
    /// A line from the peer that could not be decoded (it is skipped).
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
                tokio::spawn(async move {
                    let mut reader = BufReader::new(stream);
                    let mut line = Vec::new();
                    loop {
                        line.clear();
                        let n = match (&mut reader)
                            .take(MAX_LINE as u64 + 1)
                            .read_until(b'\n', &mut line)
                            .await
                        {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if n > MAX_LINE {
                            let _ = ev
                                .send(PeerEvent::Malformed(format!(
                                    "a peer message exceeds {MAX_LINE} bytes; closing the connection"
                                )))
                                .await;
                            break;
                        }
                        seen.send_replace(Some(Instant::now()));
                        match serde_json::from_slice::<M>(&line) {
                            Ok(m) => {
                                if ev.send(PeerEvent::Message(m)).await.is_err() {
                                    return;
                                }
                            }
                            Err(e) => {
                                let _ = ev
                                    .send(PeerEvent::Malformed(format!(
                                        "undecodable peer message: {e}"
                                    )))
                                    .await;
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
            let mut tick = tokio::time::interval(interval / 2);
            // After a pause, the next judgement comes a whole half-interval later (not at once).
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
        tokio::spawn(sender(peer, interval, out_rx, heartbeat));
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

async fn sender<M: Serialize + Send + 'static>(
    peer: SocketAddr,
    interval: Duration,
    mut out_rx: mpsc::Receiver<M>,
    heartbeat: impl Fn() -> M + Send + Sync + 'static,
) {
    let mut conn: Option<TcpStream> = None;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending: Option<Vec<u8>> = None;
    loop {
        if conn.is_none() {
            match tokio::time::timeout(interval, TcpStream::connect(peer)).await {
                Ok(Ok(s)) => {
                    s.set_nodelay(true).ok();
                    conn = Some(s);
                }
                _ => {
                    // Keep the queue bounded while disconnected: drop nothing, wait a beat.
                    tokio::time::sleep(interval / 2).await;
                    continue;
                }
            }
        }
        let line = match pending.take() {
            Some(l) => l,
            None => {
                let msg = tokio::select! {
                    m = out_rx.recv() => match m { Some(m) => m, None => return },
                    _ = tick.tick() => heartbeat(),
                };
                let mut line = match serde_json::to_vec(&msg) {
                    Ok(l) => l,
                    Err(e) => {
                        warn!("cannot encode a peer message: {e}");
                        continue;
                    }
                };
                line.push(b'\n');
                line
            }
        };
        let s = conn.as_mut().expect("connected above");
        if let Err(e) = s.write_all(&line).await {
            debug!("peer link write failed: {e}; reconnecting");
            conn = None;
            pending = Some(line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
