//! The local appliance: instances on this host, their control channels, and the front.
//!
//! The driver (see [`crate::driver`]) composes engine commands into [`Op`]s addressed to an
//! appliance; the ops for this appliance run here, those for the peer travel over the peer
//! link and run in the peer agent's `Appliance`. Observations (an instance exited) flow back
//! the same way.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hitless_control::{AgentCommand, Configure, ControlClient, Hello, InstanceStatus};
use hitless_core::{ApplianceId, ControlEpoch, ImageRef, InstanceId};
use hitless_image::service::{self, Protocol, ServiceContract};
use hitless_vmm::{
    Backend, InstanceHandle, InstanceSpec, Payload, PortForward, ProcessPayload, ResourceLimits,
    VmPayload,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::config::{AgentConfig, BackendKind};
use crate::front::{Front, Listening, Route};
use crate::images::{ImageCatalog, ImageKind};
use crate::remote::OpError;

/// The guest device of the control channel (the QEMU backend's second serial port).
pub const GUEST_CONTROL_DEVICE: &str = "ttyS1";
/// The address of the host's loopback as seen from a QEMU user-networking guest.
pub const GUEST_HOST_ADDR: &str = "10.0.2.2";

/// An operation on one appliance.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Op {
    /// Start an instance of an image.
    Start {
        instance: InstanceId,
        image: ImageRef,
    },
    /// Send a control command to an instance.
    Control {
        instance: InstanceId,
        command: AgentCommand,
    },
    /// Ask an instance for its status.
    Status { instance: InstanceId },
    /// Stop an instance gracefully (then kill after the grace period).
    Stop { instance: InstanceId },
    /// Kill an instance now (fault injection and fencing of a hung instance).
    Kill { instance: InstanceId },
    /// Hold the front: no new request is forwarded. Requests in flight are not waited for
    /// (see `front`); `bound_ms` is kept for agents that still wait for them.
    FrontHold { bound_ms: u64 },
    /// Set the front's route; `listen` says whether this appliance owns the service address;
    /// `protocol`, the protocol of the instance routed to, applies to new connections
    /// (`None`: unchanged, as agents of earlier releases send).
    FrontRoute {
        route: Route,
        listen: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        protocol: Option<Protocol>,
    },
    /// Register an image directory in the catalog.
    AddImage { dir: PathBuf },
    /// Describe this appliance.
    Describe,
}

/// Facts about a started instance.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Started {
    pub instance: InstanceId,
    pub appliance: ApplianceId,
    pub image: ImageRef,
    /// Where the front reaches the service.
    pub service_addr: SocketAddr,
    /// Where a standby of the same backend attaches for state sync.
    pub sync_addr: String,
    /// The client protocol the image declares (the front frames the instance's traffic by
    /// it). Agents that predate it only ran RESP services.
    #[serde(default)]
    pub protocol: Protocol,
    pub pid: Option<u32>,
    pub kernel_release: Option<String>,
    pub hello: Hello,
    pub console_log: PathBuf,
    pub backend: String,
}

/// A successful op's result.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum OpOk {
    Started(Box<Started>),
    Done,
    Status(Box<InstanceStatus>),
    Stopped { exit: String },
    Described(Box<Description>),
    Added { image: ImageRef },
}

/// What an appliance reports about itself.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Description {
    pub appliance: Option<ApplianceId>,
    pub instances: Vec<Started>,
    pub front: crate::front::FrontStats,
}

/// Something that happened on an appliance without being asked.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "observation", rename_all = "kebab-case")]
pub enum Observation {
    /// An instance ended. `expected` when it ended because of a `Stop`/`Kill` op.
    Exited {
        instance: InstanceId,
        reason: String,
        expected: bool,
    },
    /// A running instance stopped answering health probes on its control channel (hung or
    /// frozen: its process is still there). Reported once per episode.
    Unresponsive {
        instance: InstanceId,
        detail: String,
    },
}

/// How an appliance probes the health of its instances over their control channels.
#[derive(Clone, Copy, Debug)]
pub struct HealthProbe {
    /// Time between probes.
    pub interval: Duration,
    /// Bound on one probe's answer.
    pub timeout: Duration,
    /// Consecutive failed probes that make an instance unresponsive.
    pub misses: u32,
}

impl HealthProbe {
    /// Bounds for a backend: processes answer in microseconds; software-emulated guests can
    /// stall for seconds under load.
    pub fn for_backend(backend: BackendKind) -> Self {
        match backend {
            BackendKind::Process => HealthProbe {
                interval: Duration::from_millis(100),
                timeout: Duration::from_millis(250),
                misses: 3,
            },
            BackendKind::Qemu => HealthProbe {
                interval: Duration::from_millis(500),
                timeout: Duration::from_secs(3),
                misses: 3,
            },
        }
    }

    /// Longest silence before an instance is reported unresponsive.
    pub fn bound(&self) -> Duration {
        (self.interval + self.timeout) * self.misses
    }
}

struct Local {
    started: Started,
    handle: Mutex<Box<dyn InstanceHandle>>,
    control: Mutex<ControlClient<std::os::unix::net::UnixStream>>,
    /// When the instance last sent anything on its control channel.
    heard: hitless_control::Heard,
    stopping: AtomicBool,
    /// Reported unresponsive by the health probes (and not answering since).
    unresponsive: AtomicBool,
    /// A quiesce holds the control channel: the instance may legitimately stay silent until
    /// the writes submitted before it are durable (bounded by its acknowledgement timeout,
    /// and by the request's own timeout), e.g. while a writer waits on a standby that was
    /// cut off. Health probes do not count that silence as a miss.
    quiescing: AtomicBool,
}

/// This appliance.
pub struct Appliance {
    me: ApplianceId,
    config: AgentConfig,
    backend: Arc<dyn Backend>,
    catalog: Mutex<ImageCatalog>,
    instances: Mutex<HashMap<InstanceId, Arc<Local>>>,
    /// Port slots by owner, claimed while an instance boots and held while it runs.
    slots: Mutex<HashMap<u16, InstanceId>>,
    front: Front,
    listening: Mutex<Option<Listening>>,
    /// The service address as a virtual IP of this host's, when the pair runs on two hosts.
    vip: std::sync::OnceLock<hitless_vip::Vip>,
    observations: mpsc::Sender<Observation>,
}

/// Bound of one control request.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on delivering a fence over an instance's control channel.
const FENCE_TIMEOUT: Duration = Duration::from_millis(250);

impl Appliance {
    /// The local appliance.
    pub fn new(
        me: ApplianceId,
        config: AgentConfig,
        backend: Arc<dyn Backend>,
        catalog: ImageCatalog,
        front: Front,
        observations: mpsc::Sender<Observation>,
    ) -> Arc<Self> {
        Arc::new(Self {
            me,
            config,
            backend,
            catalog: Mutex::new(catalog),
            instances: Mutex::new(HashMap::new()),
            slots: Mutex::new(HashMap::new()),
            front,
            listening: Mutex::new(None),
            vip: std::sync::OnceLock::new(),
            observations,
        })
    }

    /// Makes the service address a virtual IP this appliance holds while its front listens
    /// (set once, at start).
    pub fn set_vip(&self, vip: hitless_vip::Vip) {
        if self.vip.set(vip).is_err() {
            warn!("the service address's virtual IP was already set; keeping the first");
        }
    }

    /// Stops serving the service address here (the front stops accepting, then the virtual
    /// address goes): this agent's driver stepped down to a driver at a higher epoch, which
    /// routes the fronts from now on.
    pub fn stand_down_front(&self, epoch: ControlEpoch) {
        // Until the new driver's route (of a higher epoch) arrives, nothing goes to this
        // appliance's old instance in control and none of its answers reaches a client.
        self.front.fence(Some(epoch));
        let mut l = self.listening.lock().expect("listening lock");
        if let Err(e) = self.give_up_address(&mut l, "this agent's driver stepped down") {
            warn!("cannot release the service address after stepping down: {e}");
        }
    }

    /// Gives up the service address without fencing the front (the route stays): this
    /// appliance is cut off from both its peer and the witness and can acknowledge nothing its
    /// lost standby would gate; clients are better served by the other side. Taken back by a
    /// route that listens ([`Self::reclaim_address`]).
    pub fn release_address(&self, why: &str) {
        let mut l = self.listening.lock().expect("listening lock");
        if let Err(e) = self.give_up_address(&mut l, why) {
            warn!("cannot release the service address: {e}");
        }
    }

    /// Serves the service address again with the front's current route (after
    /// [`Self::release_address`]).
    pub async fn reclaim_address(self: &Arc<Self>) -> Result<(), String> {
        let route = self.front.route();
        self.exec(Op::FrontRoute {
            route,
            listen: true,
            protocol: None,
        })
        .await
        .map(|_| ())
    }

    /// Stops serving the service address here: the front stops accepting, its clients are
    /// closed while the address is still here (they can follow it only on new connections),
    /// then the virtual address goes. Without a virtual address (one host), the clients stay:
    /// the other front binds the same address.
    fn give_up_address(
        &self,
        listening: &mut Option<Listening>,
        why: &str,
    ) -> Result<(), hitless_vip::VipError> {
        let was_listening = listening.take().map(Listening::stop).is_some();
        if was_listening {
            info!(addr = %self.config.service_addr, why, "service address released");
        }
        if let Some(vip) = self.vip.get() {
            if was_listening {
                self.front.close_clients();
            }
            vip.release()?;
        }
        Ok(())
    }

    /// The front.
    pub fn front(&self) -> &Front {
        &self.front
    }

    /// Whether this appliance's front serves the service address now.
    pub fn holds_address(&self) -> bool {
        self.listening.lock().expect("listening lock").is_some()
    }

    /// The virtual service address, if the pair runs on two hosts.
    pub fn vip(&self) -> Option<&hitless_vip::Vip> {
        self.vip.get()
    }

    /// The HA grace given to instances (see [`crate::config::InstanceConfig::ha_grace_ms`]).
    /// With a witness there is none: the instance in control waits for a lost standby until
    /// the witness has dropped it and the driver says so (`StandbyGone`), bounded only by
    /// its acknowledgement timeout.
    pub fn ha_grace_ms(&self) -> u64 {
        if self.config.witness.kind != hitless_witness::WitnessKind::None {
            return crate::config::WITNESS_HA_GRACE_MS;
        }
        self.config
            .instances
            .ha_grace_ms
            .unwrap_or(match self.config.backend {
                BackendKind::Process => 1000,
                BackendKind::Qemu => 5000,
            })
    }

    /// What the pair's witness is, for status: its kind and endpoints, or the warning that
    /// without one a partition can lose acknowledged writes.
    pub fn witness_summary(&self) -> String {
        self.config.witness.summary()
    }

    /// This appliance's id.
    pub fn id(&self) -> ApplianceId {
        self.me
    }

    /// The image catalog.
    pub fn catalog(&self) -> ImageCatalog {
        self.catalog.lock().expect("catalog lock").clone()
    }

    /// Runs one op.
    pub async fn exec(self: &Arc<Self>, op: Op) -> Result<OpOk, String> {
        match op {
            Op::Start { instance, image } => {
                let me = self.clone();
                tokio::task::spawn_blocking(move || me.start(instance, image))
                    .await
                    .map_err(|e| format!("start task failed: {e}"))?
            }
            Op::Control { instance, command } => {
                // Fencing is best effort (the epoch fences regardless) and usually aimed at an
                // instance that failed: it must not hold up what follows it.
                let timeout = if matches!(command, AgentCommand::Fence { .. }) {
                    FENCE_TIMEOUT
                } else {
                    CONTROL_TIMEOUT
                };
                let local = self.get(instance)?;
                let quiesce = matches!(command, AgentCommand::Quiesce { .. });
                tokio::task::spawn_blocking(move || {
                    let mut c = local.control.lock().expect("control lock");
                    local.quiescing.store(quiesce, Ordering::Release);
                    let r = c.request(command, timeout);
                    local.quiescing.store(false, Ordering::Release);
                    match r {
                        Ok(_) => Ok(OpOk::Done),
                        Err(e) => Err(format!("instance {instance}: {e}")),
                    }
                })
                .await
                .map_err(|e| format!("control task failed: {e}"))?
            }
            Op::Status { instance } => {
                let local = self.get(instance)?;
                // The service's own view of its limit may not see its cgroup: the configured
                // limit bounds it.
                let configured = self.config.instances.memory_mib * 1024 * 1024;
                tokio::task::spawn_blocking(move || {
                    let mut c = local.control.lock().expect("control lock");
                    match c.status(CONTROL_TIMEOUT) {
                        Ok(mut s) => {
                            if let Some(m) = s.memory.as_mut() {
                                m.limit_bytes =
                                    Some(m.limit_bytes.map_or(configured, |l| l.min(configured)));
                            }
                            Ok(OpOk::Status(Box::new(s)))
                        }
                        Err(e) => Err(format!("instance {instance}: {e}")),
                    }
                })
                .await
                .map_err(|e| format!("status task failed: {e}"))?
            }
            Op::Stop { instance } | Op::Kill { instance } => {
                // A hung instance cannot stop gracefully: it is killed at once.
                let kill = matches!(op, Op::Kill { .. })
                    || self
                        .get(instance)
                        .is_ok_and(|l| l.unresponsive.load(Ordering::Acquire));
                let Ok(local) = self.get(instance) else {
                    // Unknown or already gone: stopping is idempotent.
                    return Ok(OpOk::Stopped {
                        exit: "not running".into(),
                    });
                };
                local.stopping.store(true, Ordering::Release);
                let grace = Duration::from_millis(self.config.instances.stop_grace_ms);
                let me = self.clone();
                let probe = HealthProbe::for_backend(self.config.backend);
                tokio::task::spawn_blocking(move || {
                    if !kill {
                        // Ask nicely first over the control channel, then through the backend.
                        ask_to_stop(&local.control, instance, &probe);
                    }
                    let mut h = local.handle.lock().expect("handle lock");
                    let exit = if kill { h.kill() } else { h.stop(grace) };
                    me.forget(instance);
                    match exit {
                        Ok(e) => Ok(OpOk::Stopped {
                            exit: e.to_string(),
                        }),
                        Err(e) => Err(format!("stopping instance {instance}: {e}")),
                    }
                })
                .await
                .map_err(|e| format!("stop task failed: {e}"))?
            }
            Op::FrontHold { bound_ms: _ } => {
                self.front.hold();
                Ok(OpOk::Done)
            }
            Op::FrontRoute {
                route,
                listen,
                protocol,
            } => {
                // A route of an older epoch comes from a driver that has been superseded (its
                // ops were in flight when it stepped down after a split): it must not move
                // the service address back.
                let current = self.front.route().epoch;
                if route.epoch < current {
                    return Err(format!(
                        "refused a front route of epoch {} (this front routes at epoch {current}): it comes from a superseded driver",
                        route.epoch
                    ));
                }
                if let Some(p) = protocol.filter(|p| *p != self.front.protocol()) {
                    self.front.set_protocol(p);
                }
                self.front.set_route(route);
                let mut l = self.listening.lock().expect("listening lock");
                if listen {
                    if l.is_none() {
                        *l = Some(
                            self.front
                                .listen(self.config.service_addr)
                                .map_err(|e| e.to_string())?,
                        );
                    }
                    // The front listens first (IP_FREEBIND), then the address comes: no
                    // client reaches this host before something accepts it. Claiming is
                    // idempotent and announces again each time, so a route re-asserted after
                    // a split healed brings back the clients that followed the other side.
                    if let Some(vip) = self.vip.get() {
                        vip.claim().map_err(|e| e.to_string())?;
                    }
                } else {
                    self.give_up_address(&mut l, "control is elsewhere")
                        .map_err(|e| e.to_string())?;
                }
                Ok(OpOk::Done)
            }
            Op::AddImage { dir } => {
                // Verifying digests reads every file: keep it off the async workers.
                let me = self.clone();
                tokio::task::spawn_blocking(move || {
                    let mut cat = me.catalog.lock().expect("catalog lock");
                    let image = cat.add(&dir).map_err(|e| e.to_string())?;
                    // Remembered, so that an agent that restarts can still start it.
                    if let Err(e) = crate::images::remember(&me.config.data_dir, &dir) {
                        warn!(dir = %dir.display(), "cannot record the image for a restart: {e}");
                    }
                    Ok(OpOk::Added { image })
                })
                .await
                .map_err(|e| format!("image task failed: {e}"))?
            }
            Op::Describe => Ok(OpOk::Described(Box::new(self.describe()))),
        }
    }

    /// The instances running here and the front's state.
    pub fn describe(&self) -> Description {
        let mut instances: Vec<Started> = self
            .instances
            .lock()
            .expect("instances lock")
            .values()
            .map(|l| l.started.clone())
            .collect();
        instances.sort_by_key(|s| s.instance);
        let listening = self.listening.lock().expect("listening lock").is_some();
        Description {
            appliance: Some(self.me),
            instances,
            front: self.front.stats(listening),
        }
    }

    /// Kills every instance (the agent is going away; instances share its fate).
    pub fn kill_all(&self) {
        let all: Vec<_> = self
            .instances
            .lock()
            .expect("instances lock")
            .drain()
            .collect();
        for (_, l) in all {
            l.stopping.store(true, Ordering::Release);
            if let Ok(mut h) = l.handle.lock() {
                let _ = h.kill();
            }
        }
    }

    fn get(&self, id: InstanceId) -> Result<Arc<Local>, String> {
        self.instances
            .lock()
            .expect("instances lock")
            .get(&id)
            .cloned()
            .ok_or_else(|| format!("instance {id} is not running on the {} appliance", self.me))
    }

    /// Claims a free port slot for `id` (slots are claimed from the start of a boot, not only
    /// once the instance answers, so two boots never share ports).
    fn claim_slot(&self, id: InstanceId) -> Result<u16, String> {
        let mut slots = self.slots.lock().expect("slots lock");
        if let Some((s, _)) = slots.iter().find(|(_, owner)| **owner == id) {
            return Ok(*s);
        }
        let slot = (0..16u16)
            .find(|s| !slots.contains_key(s))
            .ok_or_else(|| "no free instance slot (16 instances already)".to_owned())?;
        slots.insert(slot, id);
        Ok(slot)
    }

    /// Releases the slot of `id`.
    fn release_slot(&self, id: InstanceId) {
        self.slots
            .lock()
            .expect("slots lock")
            .retain(|_, owner| *owner != id);
    }

    /// Forgets an instance that ended.
    fn forget(&self, id: InstanceId) {
        self.instances.lock().expect("instances lock").remove(&id);
        self.release_slot(id);
    }

    fn start(self: &Arc<Self>, id: InstanceId, image: ImageRef) -> Result<OpOk, String> {
        if let Ok(existing) = self.get(id) {
            // Idempotent: a re-executed start of a running instance reports it again.
            return Ok(OpOk::Started(Box::new(existing.started.clone())));
        }
        let slot = self.claim_slot(id)?;
        let r = self.boot(id, image, slot);
        if r.is_err() {
            self.release_slot(id);
        }
        r
    }

    fn boot(self: &Arc<Self>, id: InstanceId, image: ImageRef, slot: u16) -> Result<OpOk, String> {
        let img = self
            .catalog
            .lock()
            .expect("catalog lock")
            .get(&image)
            .map_err(|e| e.to_string())?;
        let port = self.config.instances.port_base + slot * 2;
        let (service_port, sync_port) = (port, port + 1);
        let name = format!("{}-{id}", self.me.name());
        let run_dir = self.config.data_dir.join("instances").join(id.to_string());
        std::fs::create_dir_all(&run_dir)
            .map_err(|e| format!("cannot create {}: {e}", run_dir.display()))?;
        let control_socket = run_dir.join("control.sock");
        let _ = std::fs::remove_file(&control_socket);
        // A VM's cgroup holds the whole QEMU process: guest memory plus the emulator's own
        // (device models, bounded translation cache).
        let overhead_mib = match self.config.backend {
            BackendKind::Process => 0,
            BackendKind::Qemu => 384,
        };
        let limits = ResourceLimits {
            memory_bytes: Some((self.config.instances.memory_mib + overhead_mib) * 1024 * 1024),
            cpu: Some(hitless_vmm::CpuQuota::from_millicpus(
                u64::from(self.config.instances.cpu_percent) * 10,
            )),
            // The front opens one connection to the instance per client, and a service may
            // serve each with a thread: allow every client the front accepts, plus the
            // service's own threads.
            pids_max: Some(self.front.max_connections() as u64 + 256),
        };
        let host = self.config.instances.host_addr;
        let contract = &img.manifest.service;
        let (payload, ports, sync_addr) = match (self.config.backend, &img.kind) {
            (BackendKind::Process, _) => {
                let args = process_args(
                    contract,
                    id,
                    host,
                    (service_port, sync_port),
                    &control_socket,
                    self.ha_grace_ms(),
                );
                (
                    Payload::Process(ProcessPayload {
                        binary: img.binary.clone(),
                        args,
                        env: vec![("RUST_LOG".into(), "info".into())],
                    }),
                    vec![],
                    SocketAddr::new(host, sync_port).to_string(),
                )
            }
            (
                BackendKind::Qemu,
                ImageKind::Vm {
                    kernel,
                    initramfs,
                    cmdline: base,
                },
            ) => {
                let cmdline = vm_cmdline(base, contract, id, self.ha_grace_ms());
                (
                    Payload::Vm(VmPayload {
                        kernel: kernel.clone(),
                        initramfs: Some(initramfs.clone()),
                        cmdline,
                        memory_mib: self.config.instances.memory_mib as u32,
                        vcpus: self.config.instances.vcpus,
                    }),
                    vec![
                        PortForward::on(host, service_port, contract.service_port),
                        PortForward::on(host, sync_port, contract.sync_port),
                    ],
                    // What the guests dial: inside a guest, loopback is the guest itself, so
                    // a loopback host address is reached through the emulated gateway; any
                    // other host address is dialled as it is (user-mode networking connects
                    // from the host).
                    if host.is_loopback() {
                        format!("{GUEST_HOST_ADDR}:{sync_port}")
                    } else {
                        SocketAddr::new(host, sync_port).to_string()
                    },
                )
            }
            (BackendKind::Qemu, ImageKind::Process) => {
                return Err(format!(
                    "image {} {} is a process image; the QEMU backend needs a VM image (hitless image build --kind vm)",
                    image.name, image.version
                ))
            }
        };
        let spec = InstanceSpec {
            id: name.clone(),
            payload,
            run_dir: run_dir.clone(),
            limits,
            ports,
            control_socket: control_socket.clone(),
        };
        let handle = self
            .backend
            .start(&spec)
            .map_err(|e| format!("starting instance {id}: {e}"))?;
        let boot_bound = match self.config.backend {
            BackendKind::Process => Duration::from_secs(15),
            BackendKind::Qemu => Duration::from_secs(180),
        };
        let endpoint = handle.control_endpoint().path().to_owned();
        let (control, hello) = match connect_control(&endpoint, boot_bound) {
            Ok(x) => x,
            Err(e) => {
                let mut h = handle;
                let _ = h.kill();
                return Err(format!(
                    "instance {id} did not answer on its control channel: {e} (console log: {})",
                    spec.console_log_path().display()
                ));
            }
        };
        let info = handle.info();
        let started = Started {
            instance: id,
            appliance: self.me,
            image,
            service_addr: SocketAddr::new(host, service_port),
            sync_addr,
            protocol: contract.protocol,
            // The service's own process (not the sandbox's init): what is reniced below and
            // what memory sampling and fault injection look at.
            pid: handle.service_pid(),
            kernel_release: hello.kernel_release.clone().or(info.kernel_release),
            hello,
            console_log: handle.console_log().to_owned(),
            backend: format!("{}", self.backend.kind()),
        };
        // Every instance, process or VM, runs below the control plane: a bulk transfer or a
        // client load that saturates the CPUs must not delay heartbeats and health probes
        // until a healthy peer or instance is written off.
        if let Some(pid) = started.pid {
            deprioritise(pid);
        }
        info!(instance = %id, pid = ?started.pid, service = %started.service_addr, "instance started");
        let watch = handle.exit_watch();
        let local = Arc::new(Local {
            started: started.clone(),
            handle: Mutex::new(handle),
            heard: control.heard(),
            control: Mutex::new(control),
            stopping: AtomicBool::new(false),
            unresponsive: AtomicBool::new(false),
            quiescing: AtomicBool::new(false),
        });
        self.instances
            .lock()
            .expect("instances lock")
            .insert(id, local.clone());
        // Watch for the instance's end and probe its health; every wait is bounded and the
        // loop ends with the instance.
        let me = Arc::downgrade(self);
        let tx = self.observations.clone();
        let probe = HealthProbe::for_backend(self.config.backend);
        let mut health = Health::default();
        std::thread::Builder::new()
            .name(format!("exit-{id}"))
            .spawn(move || loop {
                if let Some(exit) = watch.wait_timeout(probe.interval) {
                    let expected = local.stopping.load(Ordering::Acquire);
                    if let Some(me) = me.upgrade() {
                        me.forget(id);
                    }
                    if !expected {
                        warn!(instance = %id, %exit, "instance exited unexpectedly");
                    }
                    let _ = tx.blocking_send(Observation::Exited {
                        instance: id,
                        reason: exit.to_string(),
                        expected,
                    });
                    return;
                }
                if me.strong_count() == 0 {
                    return;
                }
                if local.stopping.load(Ordering::Acquire) {
                    continue;
                }
                let report = health.probe(&local, &probe);
                local.unresponsive.store(health.reported, Ordering::Release);
                if let Some(detail) = report {
                    warn!(instance = %id, %detail, "instance unresponsive");
                    let _ = tx.blocking_send(Observation::Unresponsive {
                        instance: id,
                        detail,
                    });
                }
            })
            .map_err(|e| format!("cannot spawn the exit watcher: {e}"))?;
        Ok(OpOk::Started(Box::new(started)))
    }
}

/// The command line of a process instance: the image's argument template with this
/// instance's values. A process shares the host's network, so it listens on the host
/// address's ports of its slot.
fn process_args(
    contract: &ServiceContract,
    id: InstanceId,
    host: std::net::IpAddr,
    (service_port, sync_port): (u16, u16),
    control_socket: &std::path::Path,
    ha_grace_ms: u64,
) -> Vec<String> {
    service::expand(
        &contract.args,
        &service::Values {
            instance_id: id.to_string(),
            service_listen: SocketAddr::new(host, service_port).to_string(),
            sync_listen: SocketAddr::new(host, sync_port).to_string(),
            service_port,
            sync_port,
            control: control_socket.display().to_string(),
            ha_grace_ms,
        },
    )
}

/// The kernel command line of a VM instance: the image's own, plus the `hitless.*`
/// parameters the guest's init exports as `HITLESS_*` and substitutes into the image's
/// argument template. The guest listens on the contract's ports on every interface (the
/// backend forwards host loopback ports to them); the control channel is the guest's second
/// serial port (the QEMU backend's default).
fn vm_cmdline(base: &str, contract: &ServiceContract, id: InstanceId, ha_grace_ms: u64) -> String {
    let params = service::kernel_params(&service::Values {
        instance_id: id.to_string(),
        service_listen: format!("0.0.0.0:{}", contract.service_port),
        sync_listen: format!("0.0.0.0:{}", contract.sync_port),
        service_port: contract.service_port,
        sync_port: contract.sync_port,
        control: format!("/dev/{GUEST_CONTROL_DEVICE}"),
        ha_grace_ms,
    });
    format!("{base} quiet {params}")
}

/// Asks an instance over its control channel to shut down; returns whether it acknowledged.
/// The request is never skipped because the channel is busy: health probes stop probing
/// once `stopping` is set and yield the channel to a pending stop, and a probe already in
/// flight ends within its own bound, which is what this waits for the channel (plus a
/// margin). Only a request that holds the channel longer than that (a hung instance's)
/// makes the stop go on without the request.
fn ask_to_stop<W: std::io::Write>(
    control: &Mutex<ControlClient<W>>,
    instance: InstanceId,
    probe: &HealthProbe,
) -> bool {
    let channel_wait = probe.timeout + Duration::from_millis(250);
    match lock_within(control, channel_wait) {
        Some(mut c) => match c.shutdown(probe.timeout) {
            Ok(()) => true,
            Err(e) => {
                warn!(%instance, "the instance did not acknowledge its shutdown request: {e}");
                false
            }
        },
        None => {
            warn!(
                %instance,
                "the control channel stayed busy for {channel_wait:?}: stopping without the shutdown request"
            );
            false
        }
    }
}

/// Takes `m` within `bound` (polling: the holder is a blocking request with its own bound).
fn lock_within<T>(m: &Mutex<T>, bound: Duration) -> Option<std::sync::MutexGuard<'_, T>> {
    let deadline = Instant::now() + bound;
    loop {
        match m.try_lock() {
            Ok(g) => return Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => return Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(std::sync::TryLockError::WouldBlock) => return None,
        }
    }
}

/// Health probing state of one instance.
#[derive(Default)]
struct Health {
    misses: u32,
    /// Since when the control channel has been busy with other requests.
    busy_since: Option<Instant>,
    reported: bool,
}

impl Health {
    /// The instance answered: misses are forgiven.
    fn answered(&mut self) -> Option<String> {
        if self.reported {
            info!("instance answers its health probes again");
        }
        *self = Health::default();
        None
    }

    /// One probe; returns what to report when the instance just became unresponsive.
    fn probe(&mut self, local: &Local, probe: &HealthProbe) -> Option<String> {
        if local.quiescing.load(Ordering::Acquire) {
            // Bounded by the quiesce request's own timeout, which fails the switchover.
            return None;
        }
        self.probe_channel(&local.control, &local.heard, &local.stopping, probe)
    }

    /// One probe over `control`. A probe yields to a stop: none is sent once `stopping` is
    /// set, even after the channel was taken (the stop's shutdown request is waiting for it).
    fn probe_channel<W: std::io::Write>(
        &mut self,
        control: &Mutex<ControlClient<W>>,
        heard: &hitless_control::Heard,
        stopping: &AtomicBool,
        probe: &HealthProbe,
    ) -> Option<String> {
        if stopping.load(Ordering::Acquire) {
            return None;
        }
        let failure = match control.try_lock() {
            Ok(_) if stopping.load(Ordering::Acquire) => return None,
            Ok(mut c) => {
                self.busy_since = None;
                match c.status(probe.timeout) {
                    Ok(_) => None,
                    Err(e) => Some(e.to_string()),
                }
            }
            // Another request holds the channel (the driver polls status, sometimes back to
            // back): the instance is alive as long as it keeps answering on it. A channel
            // that is busy and silent past a probe's bound is a failed probe.
            Err(_) => {
                let since = *self.busy_since.get_or_insert_with(Instant::now);
                let bound = probe.interval + probe.timeout;
                if heard.since() <= bound {
                    return self.answered();
                }
                if since.elapsed() <= bound {
                    return None;
                }
                Some(format!(
                    "the control channel has been busy for {} ms and the instance silent for {} ms",
                    since.elapsed().as_millis(),
                    heard.since().as_millis()
                ))
            }
        };
        match failure {
            None => self.answered(),
            Some(e) => {
                self.misses += 1;
                if self.misses >= probe.misses && !self.reported {
                    self.reported = true;
                    Some(format!(
                        "{} health probes in a row failed (last: {e})",
                        self.misses
                    ))
                } else {
                    None
                }
            }
        }
    }
}

/// Lowers the scheduling priority of an instance's process (nice 5), so that the control
/// plane (heartbeats, the front, the driver) keeps its deadlines when instances saturate the
/// CPUs: software-emulated guests, a bulk transfer of millions of records, hundreds of clients.
fn deprioritise(pid: u32) {
    // Linux applies a nice value per thread: every thread of the process (vCPUs included);
    // threads the instance starts later inherit it from the thread that starts them.
    let tasks: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
                .collect()
        })
        .unwrap_or_else(|_| vec![pid]);
    for tid in tasks {
        // SAFETY: setpriority takes plain integers and touches no memory of ours.
        let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 5) };
        if r != 0 {
            warn!(
                pid,
                tid,
                "cannot lower the instance's priority: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Connects to an instance's control socket (retrying while it boots) and waits for its Hello.
fn connect_control(
    path: &std::path::Path,
    bound: Duration,
) -> Result<(ControlClient<std::os::unix::net::UnixStream>, Hello), String> {
    let deadline = Instant::now() + bound;
    let mut last = String::from("no attempt");
    while Instant::now() < deadline {
        match ControlClient::connect_unix(path) {
            Ok(mut c) => {
                let left = deadline.saturating_duration_since(Instant::now());
                match c.wait_hello(left.max(Duration::from_millis(100))) {
                    Ok(h) => return Ok((c, h)),
                    Err(e) => last = e.to_string(),
                }
            }
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("no hello within {bound:?} (last error: {last})"))
}

/// The role the agent assigns over the control channel to an instance holding `role` in the
/// pair, and whether it is the designated HA standby (`Configure::designated_ha`). The one
/// mapping from the engine's roles (`hitless_core::Role`) to the control channel's
/// (`hitless_control::Role`); the instance maps those to its replica's
/// (`hitless_sync::Role`). See "Roles at each layer" in docs/ARCHITECTURE.md.
pub fn control_role(role: hitless_core::Role) -> (hitless_control::Role, bool) {
    use hitless_control::Role as Control;
    use hitless_core::Role as Pair;
    match role {
        Pair::InControl => (Control::Active, false),
        Pair::HaStandby => (Control::Standby, true),
        Pair::LocalStandby => (Control::Standby, false),
        Pair::Spare => (Control::Spare, false),
    }
}

/// The pair role of a standby the engine attaches with `designated_ha` (the way back from a
/// standby's `Configure` to [`control_role`]'s argument).
pub fn standby_role(designated_ha: bool) -> hitless_core::Role {
    if designated_ha {
        hitless_core::Role::HaStandby
    } else {
        hitless_core::Role::LocalStandby
    }
}

/// Builds the Configure command giving `instance` the pair role `role` at `epoch`; a standby
/// follows `active_sync_addr`.
pub fn configure(
    instance: InstanceId,
    role: hitless_core::Role,
    epoch: ControlEpoch,
    active_sync_addr: Option<&str>,
) -> AgentCommand {
    let (role, designated_ha) = control_role(role);
    AgentCommand::Configure(Configure {
        instance_id: instance.to_string(),
        role,
        epoch,
        active_sync_addr: active_sync_addr.map(str::to_owned),
        designated_ha,
        sync_mode: hitless_control::SyncMode::Synchronous,
    })
}

/// Builds the Configure command for a standby following `active_sync_addr`.
pub fn standby_config(
    instance: InstanceId,
    epoch: ControlEpoch,
    active_sync_addr: &str,
    designated_ha: bool,
) -> AgentCommand {
    configure(
        instance,
        standby_role(designated_ha),
        epoch,
        Some(active_sync_addr),
    )
}

/// Builds the Configure command for the instance in control.
pub fn active_config(instance: InstanceId, epoch: ControlEpoch) -> AgentCommand {
    configure(instance, hitless_core::Role::InControl, epoch, None)
}

/// Reads a status reply.
pub fn as_status(r: Result<OpOk, OpError>) -> Result<InstanceStatus, OpError> {
    match r? {
        OpOk::Status(s) => Ok(*s),
        other => Err(OpError::unexpected("a status", &other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_pair_role_maps_to_one_control_assignment_and_back() {
        use hitless_control::Role as Control;
        use hitless_core::Role as Pair;
        assert_eq!(control_role(Pair::InControl), (Control::Active, false));
        assert_eq!(control_role(Pair::HaStandby), (Control::Standby, true));
        assert_eq!(control_role(Pair::LocalStandby), (Control::Standby, false));
        assert_eq!(control_role(Pair::Spare), (Control::Spare, false));
        for ha in [true, false] {
            assert_eq!(control_role(standby_role(ha)), (Control::Standby, ha));
        }
    }

    #[test]
    fn configure_commands_carry_the_mapped_role_and_the_epoch_number() {
        let id = InstanceId(4);
        let AgentCommand::Configure(c) = standby_config(id, ControlEpoch(9), "10.0.0.2:1", true)
        else {
            panic!("not a Configure");
        };
        assert_eq!(c.role, hitless_control::Role::Standby);
        assert!(c.designated_ha);
        assert_eq!(c.epoch, ControlEpoch(9));
        assert_eq!(c.active_sync_addr.as_deref(), Some("10.0.0.2:1"));
        assert_eq!(c.instance_id, id.to_string());
        let AgentCommand::Configure(c) = active_config(id, ControlEpoch(10)) else {
            panic!("not a Configure");
        };
        assert_eq!(c.role, hitless_control::Role::Active);
        assert!(!c.designated_ha);
        assert_eq!(c.epoch, ControlEpoch(10));
        assert_eq!(c.active_sync_addr, None);
    }
    use hitless_control::{write_instance_message, InstanceMessage};
    use std::os::unix::net::UnixStream;

    const PROBE: HealthProbe = HealthProbe {
        interval: Duration::from_millis(10),
        timeout: Duration::from_millis(40),
        misses: 3,
    };

    /// Probes every interval for `span` while another request holds the channel; the instance
    /// end sends a stale reply every `every` (none when `None`). Returns the first report.
    fn probe_while_busy(every: Option<Duration>, span: Duration) -> Option<String> {
        let (agent_end, mut instance_end) = UnixStream::pair().expect("socket pair");
        let control = Mutex::new(ControlClient::from_unix(agent_end).expect("client"));
        let heard = control.lock().unwrap().heard();
        let _held = control.lock().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let talker = std::thread::spawn(move || {
            while !s.load(Ordering::Acquire) {
                if let Some(every) = every {
                    let msg = InstanceMessage::Ack { request_id: 7 };
                    write_instance_message(&mut instance_end, &msg).expect("write");
                    std::thread::sleep(every);
                } else {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        });
        let mut health = Health::default();
        let began = Instant::now();
        let mut report = None;
        while began.elapsed() < span && report.is_none() {
            report = health.probe_channel(&control, &heard, &AtomicBool::new(false), &PROBE);
            std::thread::sleep(PROBE.interval);
        }
        stop.store(true, Ordering::Release);
        talker.join().unwrap();
        report
    }

    #[test]
    fn a_channel_kept_busy_by_answered_requests_is_not_a_lost_heartbeat() {
        // Answers arrive well within a probe's bound, for ten bounds in a row.
        let report = probe_while_busy(Some(Duration::from_millis(15)), Duration::from_millis(500));
        assert_eq!(report, None);
    }

    #[test]
    fn a_channel_busy_and_silent_past_the_bound_is_a_lost_heartbeat() {
        let report = probe_while_busy(None, Duration::from_secs(2)).expect("reported");
        assert!(
            report.contains("3 health probes in a row failed") && report.contains("silent"),
            "{report}"
        );
    }

    fn contract(args: &[&str]) -> ServiceContract {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        ServiceContract::from_parts(Protocol::LengthPrefixed, 9000, 9001, &args).unwrap()
    }

    #[test]
    fn the_process_command_line_is_the_images_template_expanded() {
        let c = contract(&[
            "serve",
            "--bind={service_listen}",
            "--replicate",
            "{sync_listen}",
            "--ctl",
            "{control}",
            "--name={instance_id}",
            "--grace",
            "{ha_grace_ms}",
            "--ports={service_port},{sync_port}",
        ]);
        let args = process_args(
            &c,
            InstanceId(7),
            "198.18.0.1".parse().unwrap(),
            (20010, 20011),
            std::path::Path::new("/data/instances/i7/control.sock"),
            1500,
        );
        assert_eq!(
            args,
            [
                "serve",
                "--bind=198.18.0.1:20010",
                "--replicate",
                "198.18.0.1:20011",
                "--ctl",
                "/data/instances/i7/control.sock",
                "--name=i7",
                "--grace",
                "1500",
                "--ports=20010,20011",
            ]
        );
        // A format-1 process image gets the command line every image got before contracts.
        let legacy = ServiceContract::legacy(hitless_image::Kind::Process, &[]);
        let args = process_args(
            &legacy,
            InstanceId(2),
            loopback(),
            (1, 2),
            "/c".as_ref(),
            1000,
        );
        assert_eq!(args.len(), 10, "{args:?}");
        for value in ["i2", "127.0.0.1:1", "127.0.0.1:2", "/c", "1000"] {
            assert!(args.iter().any(|a| a == value), "{value} in {args:?}");
        }
        // An image with an empty template gets no arguments at all.
        assert!(process_args(
            &contract(&[]),
            InstanceId(1),
            loopback(),
            (1, 2),
            "/c".as_ref(),
            1
        )
        .is_empty());
    }

    fn loopback() -> std::net::IpAddr {
        std::net::Ipv4Addr::LOCALHOST.into()
    }

    #[test]
    fn the_vm_command_line_carries_the_contracts_ports() {
        let line = vm_cmdline("console=ttyS0", &contract(&[]), InstanceId(3), 5000);
        assert_eq!(
            line,
            "console=ttyS0 quiet hitless.instance=i3 hitless.service=0.0.0.0:9000 \
             hitless.sync=0.0.0.0:9001 hitless.control_device=/dev/ttyS1 hitless.ha_grace_ms=5000"
        );
    }

    #[test]
    fn a_stop_waits_for_a_busy_channel_and_still_asks_the_instance() {
        let (agent_end, mut instance_end) = UnixStream::pair().expect("socket pair");
        let control = Arc::new(Mutex::new(
            ControlClient::from_unix(agent_end).expect("client"),
        ));
        // A "probe" holds the channel for 150 ms when the stop comes.
        let held = control.clone();
        let (taken_tx, taken_rx) = std::sync::mpsc::channel();
        let prober = std::thread::spawn(move || {
            let _g = held.lock().unwrap();
            taken_tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(150));
        });
        taken_rx.recv().unwrap();
        let instance = std::thread::spawn(move || {
            let msg = hitless_control::read_agent_message(&mut instance_end)
                .expect("read")
                .expect("a message");
            let ack = InstanceMessage::Ack {
                request_id: msg.request_id,
            };
            write_instance_message(&mut instance_end, &ack).expect("write");
            msg.command
        });
        let probe = HealthProbe::for_backend(BackendKind::Process);
        let t = Instant::now();
        assert!(ask_to_stop(&control, InstanceId(1), &probe));
        assert!(
            t.elapsed() >= Duration::from_millis(100),
            "{:?}",
            t.elapsed()
        );
        assert!(matches!(instance.join().unwrap(), AgentCommand::Shutdown));
        prober.join().unwrap();
    }

    #[test]
    fn a_health_probe_yields_to_a_pending_stop() {
        let (agent_end, instance_end) = UnixStream::pair().expect("socket pair");
        let control = Mutex::new(ControlClient::from_unix(agent_end).expect("client"));
        let heard = control.lock().unwrap().heard();
        let stopping = AtomicBool::new(true);
        let mut health = Health::default();
        let t = Instant::now();
        for _ in 0..5 {
            assert_eq!(
                health.probe_channel(&control, &heard, &stopping, &PROBE),
                None
            );
        }
        // No probe waited for an answer, none was sent, and none counted as a miss.
        assert!(t.elapsed() < PROBE.timeout, "{:?}", t.elapsed());
        assert_eq!(health.misses, 0);
        instance_end.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 1];
        let read = std::io::Read::read(&mut &instance_end, &mut buf);
        assert!(
            matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "the instance received {read:?}"
        );
        // Without a stop, the same probe is sent (and times out on this silent instance).
        stopping.store(false, Ordering::Release);
        assert_eq!(
            health.probe_channel(&control, &heard, &stopping, &PROBE),
            None
        );
        assert_eq!(health.misses, 1);
    }
}
