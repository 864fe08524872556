//! The agent process: wires the appliance, the peer link, the driver and the API together.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hitless_core::{ApplianceId, ControlEpoch, EngineConfig};
use hitless_journal::Journal;
use thiserror::Error;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::appliance::{Appliance, Observation};
use crate::config::{AgentConfig, BackendKind};
use crate::driver::{Appliances, Driver, DriverTiming, Input, SharedView, Transition};
use crate::front::{Front, FrontLimits};
use crate::images::ImageCatalog;
use crate::peer::{PeerEvent, PeerLink};
use crate::remote::{Failure, PeerMsg, Remote};

/// Errors that stop the agent from starting.
#[derive(Debug, Error)]
pub enum AgentError {
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the journal: {0}")]
    Journal(#[from] hitless_journal::JournalError),
    #[error("cannot use the initial image: {0}")]
    Image(String),
    #[error("cannot start the hypervisor backend: {0}")]
    Backend(String),
    #[error(transparent)]
    Peer(#[from] crate::peer::PeerError),
    #[error("cannot serve the API on {addr}: {source}")]
    Api {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tokens(#[from] crate::auth::TokensError),
    #[error("bootstrap of the pair failed: {0}")]
    Bootstrap(String),
    #[error("bootstrap of the pair failed: {0}")]
    FirstPair(#[from] crate::driver::BootstrapError),
    #[error("cannot resume the pair from the journal: {0}")]
    Resume(#[from] crate::driver::JournalError),
    #[error(transparent)]
    Front(#[from] crate::front::FrontError),
    #[error("cannot use the virtual service address: {0}")]
    Vip(#[from] hitless_vip::VipError),
    #[error("cannot use the witness: {0}")]
    Witness(#[from] hitless_witness::WitnessError),
    #[error("instances.host_addr {addr} is not an address of this host ({source}); name the address of an interface here, the one the peer appliance reaches")]
    HostAddr {
        addr: std::net::IpAddr,
        source: std::io::Error,
    },
}

/// Starts the stall watchdog: a thread that renews the front's lease every 20 ms and, when
/// it finds that it did not run for longer than `bound` (the peer's failure detector: the
/// agent was stopped, or starved of CPU), fences the front and reports the gap. The peer may
/// have taken this appliance for lost and failed over meanwhile; the front must not hand an
/// old instance's answers to clients before the peer link has said so.
fn start_stall_watchdog(
    front: Front,
    bound: Duration,
) -> Result<mpsc::Receiver<Duration>, AgentError> {
    let (tx, rx) = mpsc::channel(4);
    // The lease outlasts the bound, so that a front never finds its lease expired without the
    // watchdog having fenced it (and so, later, lifting the fence wakes its connections).
    let lease = bound * 2;
    front.renew_lease(lease);
    std::thread::Builder::new()
        .name("stall-watchdog".into())
        .spawn(move || {
            let mut last = std::time::Instant::now();
            loop {
                std::thread::sleep(Duration::from_millis(20));
                let now = std::time::Instant::now();
                let gap = now.duration_since(last);
                if gap > bound {
                    // Fence before renewing: a front that sees the new lease sees the fence.
                    front.fence(None);
                    let _ = tx.try_send(gap);
                }
                front.renew_lease(lease);
                last = now;
            }
        })
        .map_err(|e| AgentError::Backend(format!("cannot start the stall watchdog: {e}")))?;
    Ok(rx)
}

/// Refuses a host address for instances that this host does not have: every instance would
/// fail to listen, one at a time, in the middle of an upgrade. The interfaces are asked (a
/// host that allows binding foreign addresses, `ip_nonlocal_bind`, would let a bind pass);
/// where they cannot be listed, a bind decides.
fn check_host_addr(addr: std::net::IpAddr) -> Result<(), AgentError> {
    let not_here = |source| AgentError::HostAddr { addr, source };
    match hitless_vip::is_local(addr) {
        Ok(true) => Ok(()),
        Ok(false) => Err(not_here(std::io::Error::new(
            std::io::ErrorKind::AddrNotAvailable,
            "no interface of this host has it",
        ))),
        Err(e) => {
            warn!("cannot list this host's addresses ({e}); checking instances.host_addr by binding it");
            std::net::TcpListener::bind((addr, 0))
                .map(drop)
                .map_err(not_here)
        }
    }
}

/// Engine bounds for a backend, in ticks of [`DriverTiming::tick`] (100 ms).
pub fn engine_config(backend: BackendKind) -> EngineConfig {
    let base = EngineConfig {
        soak_ticks: 2,
        max_lag: 1000,
        ..EngineConfig::default()
    };
    match backend {
        BackendKind::Process => EngineConfig {
            start_timeout_ticks: 150,
            sync_timeout_ticks: 300,
            switch_timeout_ticks: 50,
            stop_timeout_ticks: 100,
            verify_timeout_ticks: 100,
            ..base
        },
        BackendKind::Qemu => EngineConfig {
            // Software-emulated guests boot in tens of seconds: an ISSU takes minutes.
            rollback_timer_ticks: Some(6000),
            start_timeout_ticks: 1800,
            sync_timeout_ticks: 600,
            switch_timeout_ticks: 100,
            stop_timeout_ticks: 300,
            verify_timeout_ticks: 300,
            ..base
        },
    }
}

fn make_backend(config: &AgentConfig) -> Result<Arc<dyn hitless_vmm::Backend>, AgentError> {
    match config.backend {
        BackendKind::Process => Ok(Arc::new(hitless_vmm::ProcessBackend::new(
            hitless_vmm::ProcessConfig::default(),
        ))),
        BackendKind::Qemu => Ok(Arc::new(hitless_vmm::QemuBackend::new(
            hitless_vmm::QemuConfig::default(),
        ))),
    }
}

/// The agent's scheduling priority (nice value): above the instances (nice 5, see
/// `appliance`) and above ordinary processes, so that heartbeats, health probes and the front
/// keep their deadlines when the machine's CPUs are saturated. A peer that misses heartbeats
/// because it was not scheduled would be taken for lost.
pub const AGENT_NICE: i32 = -5;

/// Raises the calling thread's priority to [`AGENT_NICE`]; threads it starts afterwards (the
/// async runtime's) inherit it. Call it before building the runtime. Without the privilege
/// (not root, no CAP_SYS_NICE) the agent runs at its inherited priority, with a warning.
pub fn raise_priority() {
    // SAFETY: setpriority takes plain integers and touches no memory of ours; who = 0 is the
    // calling thread on Linux.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, AGENT_NICE) };
    if r != 0 {
        warn!(
            nice = AGENT_NICE,
            "cannot raise the agent's priority: {}; under full CPU load its heartbeats may be \
             late enough for the peer to take this appliance for lost",
            std::io::Error::last_os_error()
        );
    }
}

/// Who may use the API: the tokens of `[api] tokens_file` (read now, before anything is
/// created: a tokens file that cannot be used stops the start), else anyone who reaches it.
fn api_access(config: &AgentConfig) -> Result<crate::api::Access, AgentError> {
    match &config.api.tokens_file {
        Some(path) => {
            let tokens = crate::auth::Tokens::load(path)?;
            info!(file = %path.display(), tokens = tokens.len(), "the API needs a bearer token");
            Ok(crate::api::Access::Tokens(Arc::new(tokens)))
        }
        None => {
            if config.api_listen.ip().is_loopback() {
                info!(api = %config.api_listen, "the API has no tokens file: anyone on this host may use it");
            } else {
                // The configuration refuses this unless allow_unauthenticated is set.
                warn!(api = %config.api_listen, "the API serves a non-loopback address without credentials (api.allow_unauthenticated): anyone who reaches it may start an upgrade");
            }
            Ok(crate::api::Access::Open)
        }
    }
}

/// Runs the agent until the process is stopped.
pub async fn run(config: AgentConfig) -> Result<(), AgentError> {
    let me = config.appliance;
    let access = api_access(&config)?;
    check_host_addr(config.instances.host_addr)?;
    std::fs::create_dir_all(&config.data_dir).map_err(|source| AgentError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let journal: Journal<Transition> = Journal::open(config.data_dir.join("journal.redb"))?;
    let mut catalog = ImageCatalog::default();
    let initial = catalog
        .add(&config.image)
        .map_err(|e| AgentError::Image(e.to_string()))?;
    // Images added at run time (an ISSU's target): the pair may run them now.
    for dir in crate::images::remembered(&config.data_dir) {
        match catalog.add(&dir) {
            Ok(image) => {
                info!(dir = %dir.display(), %image, "image added before a restart is available again")
            }
            Err(e) => {
                warn!(dir = %dir.display(), "an image added before a restart cannot be used: {e}")
            }
        }
    }
    let backend = make_backend(&config)?;
    let front = Front::new(FrontLimits::default())?;
    let stall_rx = start_stall_watchdog(front.clone(), config.peer_timeout())?;
    let (obs_tx, mut obs_rx) = mpsc::channel::<Observation>(1024);
    let appliance = Appliance::new(me, config.clone(), backend, catalog, front, obs_tx);
    if let Some(vip) = config.vip_config() {
        // An address left on the interface by a previous run of this agent (it crashed, or
        // the host lost power) is not a claim: the pair decides who holds it now.
        if hitless_vip::remove_stale(&vip.interface, vip.addr)? {
            warn!(addr = %vip.addr, interface = %vip.interface, "removed a stale service address left by a previous run");
        }
        appliance.set_vip(hitless_vip::Vip::new(vip)?);
    }
    let driving = Arc::new(AtomicBool::new(false));
    // The driver's epoch for the heartbeat (its number: an atomic holds no ControlEpoch).
    let epoch = Arc::new(AtomicU64::new(0));
    let (hb_driving, hb_epoch) = (driving.clone(), epoch.clone());
    let (link, peer_rx) = PeerLink::<PeerMsg>::start(
        config.peer_listen,
        config.peer_addr,
        Duration::from_millis(config.heartbeat.interval_ms),
        config.heartbeat.misses,
        move || PeerMsg::Heartbeat {
            from: me,
            driving: hb_driving.load(Ordering::Acquire),
            epoch: ControlEpoch(hb_epoch.load(Ordering::Acquire)),
        },
    )
    .await?;
    let remote = Remote::new(link.clone(), me.other());
    // Requests from the peer and responses to ours are handled here, never behind the main
    // loop (which may itself be waiting for a response).
    let mut peer_rx = dispatch_peer(&appliance, &remote, driving.clone(), peer_rx);
    let apps = Appliances {
        local: appliance.clone(),
        remote: remote.clone(),
    };
    let (in_tx, mut in_rx) = mpsc::channel::<Input>(4096);
    let view: SharedView = Default::default();
    let timing = DriverTiming::default();
    let mut driver = Driver::new(
        me,
        journal,
        apps.clone(),
        in_tx.clone(),
        view.clone(),
        timing.clone(),
        engine_config(config.backend),
    );
    match crate::witness::connect(&config.witness).await? {
        Some(w) => {
            info!(kind = %w.kind(), endpoint = %w.endpoint(), pair = %config.witness.pair, "control changes are decided through the witness");
            if config.witness.reads == crate::config::ReadMode::Lease {
                crate::lease::start_keeper(
                    appliance.clone(),
                    w.clone(),
                    Duration::from_millis(config.witness.lease_ms),
                );
            }
            driver = driver.with_witness(w);
        }
        None => warn!("{}", crate::config::NO_WITNESS_WARNING),
    }
    crate::api::serve(
        config.api_listen,
        in_tx.clone(),
        view.clone(),
        apps.clone(),
        access,
        crate::api::Bounds::default(),
    )
    .await
    .map_err(|source| AgentError::Api {
        addr: config.api_listen,
        source,
    })?;
    info!(appliance = %me, api = %config.api_listen, "agent running");

    let mut peer_up_pending = false;
    // Who drives: wait a little for the peer's first heartbeat.
    let mut peer_driving = false;
    let wait_peer = tokio::time::sleep(config.peer_timeout() * 4 + Duration::from_millis(500));
    tokio::pin!(wait_peer);
    let mut pre_events = Vec::new();
    loop {
        tokio::select! {
            _ = &mut wait_peer => break,
            ev = peer_rx.recv() => match ev {
                Some(PeerEvent::Message(PeerMsg::Heartbeat { driving, .. })) => {
                    peer_driving = driving;
                    if link.is_up() { break; }
                }
                Some(PeerEvent::Up) => { pre_events.push(PeerEvent::Up); if peer_driving { break; } }
                Some(other) => pre_events.push(other),
                None => break,
            }
        }
    }
    if !peer_driving {
        if driver.restore()? {
            // This agent drove before and was restarted: its instances did not survive it.
            warn!("resuming the pair from the journal; this appliance's instances are gone");
            driver.resume_after_restart()?;
        } else if me == ApplianceId::Primary {
            // A new pair: the primary brings it up once the peer is reachable.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while !link.is_up() && tokio::time::Instant::now() < deadline {
                match tokio::time::timeout(Duration::from_millis(100), peer_rx.recv()).await {
                    Ok(Some(e)) => pre_events.push(e),
                    Ok(None) => break,
                    Err(_) => {}
                }
            }
            if !link.is_up() {
                return Err(AgentError::Bootstrap(
                    "the secondary appliance's agent did not come up within 60 s".into(),
                ));
            }
            driver.bootstrap(initial).await?;
        }
    }
    driving.store(driver.driving(), Ordering::Release);
    epoch.store(driver.epoch().0, Ordering::Release);

    let mut tick = tokio::time::interval(timing.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for e in pre_events {
        handle_peer(&mut driver, &appliance, &mut peer_up_pending, e).await;
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    let mut stall_rx = stall_rx;
    // After a stall, when the front's fence is lifted (unless the driver stepped down).
    let mut stall_settle: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            Some(gap) = stall_rx.recv() => {
                warn!(
                    stalled_ms = gap.as_millis() as u64,
                    "this agent was not running for longer than the peer's failure detector: the front is fenced until the peer link has settled who drives"
                );
                stall_settle = Some(tokio::time::Instant::now() + config.peer_timeout());
            }
            _ = tick.tick() => {
                if stall_settle.is_some_and(|t| tokio::time::Instant::now() >= t) {
                    // Every heartbeat the peer sent meanwhile has been read: a driver at a
                    // higher epoch would have made this one step down (which keeps the fence
                    // until its route arrives).
                    stall_settle = None;
                    appliance.front().lift_stall_fence();
                }
                if driver.driving() {
                    if let Err(e) = driver.input(Input::Tick).await { error!("{e}"); }
                }
            }
            Some(i) = in_rx.recv() => {
                if let Err(e) = driver.input(i).await { error!("{e}"); }
            }
            Some(o) = obs_rx.recv() => {
                if driver.driving() {
                    if let Err(e) = driver.input(Input::Observation(me, o)).await { error!("{e}"); }
                } else if let Err(e) = link.send(PeerMsg::Observed { observation: o }) {
                    warn!("cannot report an observation to the driving agent: {e}");
                }
            }
            Some(e) = peer_rx.recv() => handle_peer(&mut driver, &appliance, &mut peer_up_pending, e).await,
            _ = term.recv() => {
                info!("SIGTERM: stopping this appliance's instances");
                appliance.kill_all();
                return Ok(());
            }
            _ = tokio::signal::ctrl_c() => {
                appliance.kill_all();
                return Ok(());
            }
        }
        driving.store(driver.driving(), Ordering::Release);
        epoch.store(driver.epoch().0, Ordering::Release);
    }
}

/// Handles an event of the peer link. `peer_up_pending` is set while a returned peer has not
/// yet shown (by a heartbeat) that it does not drive: a driving agent tells its engine that
/// the peer is back only then. Two drivers after a split settle first (one steps down), so the
/// winner never acts on the loser's appliance while the loser still acts on it.
async fn handle_peer(
    driver: &mut Driver,
    appliance: &Arc<Appliance>,
    peer_up_pending: &mut bool,
    e: PeerEvent<PeerMsg>,
) {
    match e {
        PeerEvent::Message(m) => match m {
            PeerMsg::Heartbeat {
                driving,
                epoch,
                from,
            } => {
                if driving && driver.driving() {
                    // Two drivers (after a partition): the higher epoch wins, the primary on a
                    // tie. With a witness, on a tie both engines name the same instance in
                    // control (the witness grants each epoch once) and the appliance that runs
                    // it wins: an agent that restored the pair's journal after a cut and was
                    // refused a promotion has the epoch of the driver it tried to replace,
                    // and must not win for being the primary.
                    let mine = driver.epoch();
                    let peer_wins_tie =
                        match driver.hosts_control().filter(|_| driver.has_witness()) {
                            Some(here) => !here,
                            None => from == ApplianceId::Primary,
                        };
                    if epoch > mine || (epoch == mine && peer_wins_tie) {
                        let mine = driver.epoch();
                        driver.step_down();
                        appliance.stand_down_front(mine);
                    } else {
                        // The peer drove for a while (it took this agent for lost) and yields
                        // now: the service address may have moved with it.
                        driver.reassert_routes();
                    }
                }
                if *peer_up_pending && !(driving && driver.driving()) {
                    *peer_up_pending = false;
                    if let Err(e) = driver.input(Input::PeerUp).await {
                        error!("{e}");
                    }
                }
            }
            PeerMsg::Request { .. } | PeerMsg::Response { .. } => {
                // Handled by the dispatcher.
            }
            PeerMsg::Observed { observation } => {
                if let Err(e) = driver
                    .input(Input::Observation(appliance.id().other(), observation))
                    .await
                {
                    error!("{e}");
                }
            }
            PeerMsg::Journal { index, envelope } => {
                if driver.driving() {
                    return;
                }
                // The driving agent's history is the pair's: a record this agent wrote and
                // never mirrored before it died is replaced by the driver's.
                match hex::decode(&envelope) {
                    Ok(bytes) => match driver.journal_mut().adopt(index, &bytes) {
                        Ok(0) => {}
                        Ok(dropped) => warn!(
                            index,
                            dropped, "journal: records never mirrored before a restart were replaced by the driving agent's"
                        ),
                        Err(e) => warn!(index, "journal mirror refused a record: {e}"),
                    },
                    Err(e) => warn!("undecodable journal record from the peer: {e}"),
                }
                driver.publish();
            }
        },
        PeerEvent::Lost => {
            *peer_up_pending = false;
            if let Err(e) = driver.input(Input::PeerLost).await {
                error!("{e}");
            }
        }
        PeerEvent::Up => {
            if driver.driving() {
                // Until its first heartbeat says whether it drives too (see above).
                *peer_up_pending = true;
            } else if let Err(e) = driver.input(Input::PeerUp).await {
                error!("{e}");
            }
        }
        PeerEvent::Malformed(m) => warn!("peer link: {m}"),
    }
}

/// Handles the peer's requests and the responses to ours as they arrive; passes everything
/// else on to the main loop.
fn dispatch_peer(
    appliance: &Arc<Appliance>,
    remote: &Remote,
    driving: Arc<AtomicBool>,
    mut rx: mpsc::Receiver<PeerEvent<PeerMsg>>,
) -> mpsc::Receiver<PeerEvent<PeerMsg>> {
    let (tx, out) = mpsc::channel(4096);
    let a = appliance.clone();
    let r = remote.clone();
    tokio::spawn(async move {
        while let Some(e) = rx.recv().await {
            match e {
                PeerEvent::Message(PeerMsg::Response { id, result }) => r.complete(id, result),
                PeerEvent::Message(PeerMsg::Request { id, op }) => {
                    if driving.load(Ordering::Acquire) {
                        // Only the driver sends ops. Two drivers (a split just healed, or a
                        // peer that took this one for lost) settle by epoch within a
                        // heartbeat; until then neither acts on the other's appliance.
                        let refusal = "the peer agent drives the pair too: its ops are refused until one driver steps down".to_owned();
                        let _ = r.link().send(PeerMsg::Response {
                            id,
                            result: Err(Failure::refused(refusal)),
                        });
                        continue;
                    }
                    let a = a.clone();
                    let r = r.clone();
                    tokio::spawn(async move {
                        let result = a.exec(op).await.map_err(Failure::refused);
                        let _ = r.link().send(PeerMsg::Response { id, result });
                    });
                }
                PeerEvent::Lost => {
                    r.fail_all();
                    if tx.send(PeerEvent::Lost).await.is_err() {
                        return;
                    }
                }
                other => {
                    if tx.send(other).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_address_this_host_does_not_have_is_refused_naming_it() {
        check_host_addr(std::net::Ipv4Addr::LOCALHOST.into()).unwrap();
        // TEST-NET-2: documentation only, never assigned to a host.
        let addr: std::net::IpAddr = "198.51.100.77".parse().unwrap();
        let e = check_host_addr(addr).unwrap_err();
        assert!(matches!(e, AgentError::HostAddr { .. }), "{e}");
        assert!(e.to_string().contains("198.51.100.77"), "{e}");
    }
}
