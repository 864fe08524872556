//! The instance: roles and epochs from the control channel, the standby link supervisor,
//! digest verification, status and INFO.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::memory;
use hitless_control::{
    Configure, ControlHandler, Hello, InstanceStatus, MemoryUse, Role, SchemaSupport,
    ServiceStatus, SyncMode,
};
use hitless_sync::{ControlEpoch, Durability, FollowHandle};

use crate::db::Db;
use crate::schema::SERVICE;

/// Identity and addresses of this instance.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Instance identifier given by the agent.
    pub instance_id: String,
    /// Image (software) version reported in Hello.
    pub image_version: String,
    /// Bound client address.
    pub service_addr: String,
    /// Bound state-sync address.
    pub sync_addr: String,
    /// Kernel release, if running as a VM guest.
    pub kernel_release: Option<String>,
}

#[derive(Debug, Default)]
struct CtlState {
    role: Option<Role>,
    epoch: ControlEpoch,
    fenced: bool,
    quiesced: bool,
    designated_ha: bool,
}

#[derive(Default)]
struct FollowState {
    target: Option<(String, bool)>,
    handle: Option<FollowHandle>,
    next_attempt: Option<Instant>,
    failures: u32,
}

/// A running kvd instance.
pub struct Node {
    db: Arc<Db>,
    cfg: NodeConfig,
    ctl: Mutex<CtlState>,
    follow: Mutex<FollowState>,
    stopping: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Node {
    /// Builds the instance and starts its supervisor thread (standby link upkeep and digest
    /// verification of attached standbys).
    pub fn start(db: Arc<Db>, cfg: NodeConfig) -> Arc<Node> {
        let node = Arc::new(Node {
            db,
            cfg,
            ctl: Mutex::new(CtlState::default()),
            follow: Mutex::new(FollowState::default()),
            stopping: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
        });
        let n = node.clone();
        let t = std::thread::Builder::new()
            .name("kvd-supervisor".into())
            .spawn(move || n.supervise())
            .expect("spawning a thread only fails when the process is out of resources");
        lock(&node.threads).push(t);
        node
    }

    /// The database.
    pub fn db(&self) -> &Arc<Db> {
        &self.db
    }

    /// Takes control at `epoch` without the control channel (`--role active`).
    pub fn start_active(&self, epoch: ControlEpoch) -> Result<(), String> {
        self.promote_inner(epoch)
    }

    /// Follows the active at `addr` without the control channel (`--role standby`).
    pub fn start_standby(&self, addr: Option<String>, epoch: ControlEpoch) -> Result<(), String> {
        self.become_standby(epoch, addr, true, Role::Standby)
    }

    fn supervise(&self) {
        let mut last_verify = Instant::now() - Duration::from_secs(60);
        while !self.stopping.load(Ordering::Acquire) {
            // A short period, cut short by a new follow target: a new standby link and its
            // first digest check gate a switchover.
            std::thread::park_timeout(Duration::from_millis(2));
            self.tend_follow();
            if self.verify_due(last_verify) {
                last_verify = Instant::now();
                if let Err(e) = self.db.replica().verify_standbys() {
                    tracing::debug!(error = %e, "digest verification of standbys failed");
                }
            }
        }
    }

    /// An active verifies standbys whose digest has not matched yet as soon as their bulk is
    /// done, and all of them every 10 s.
    fn verify_due(&self, last: Instant) -> bool {
        let r = self.db.replica();
        if r.role() != hitless_sync::Role::Active {
            return false;
        }
        let st = r.status();
        if st.standbys.is_empty() {
            return false;
        }
        last.elapsed() >= Duration::from_secs(10)
            || st.standbys.iter().any(|s| s.bulk_done && !s.digest_matched)
    }

    /// Keeps the standby link to the wanted active up, reconnecting with bounded backoff.
    fn tend_follow(&self) {
        let mut f = lock(&self.follow);
        if f.handle.as_ref().is_some_and(|h| h.is_finished()) {
            let h = f.handle.take().expect("checked");
            if let Err(e) = h.join() {
                tracing::warn!(error = %e, "standby link ended");
            }
            f.failures += 1;
            f.next_attempt = Some(Instant::now() + backoff(f.failures));
        }
        let Some((addr, ha)) = f.target.clone() else {
            return;
        };
        if f.handle.is_some() || f.next_attempt.is_some_and(|t| Instant::now() < t) {
            return;
        }
        // Attach without holding the lock: the handshake may wait on an active that hangs,
        // and the control plane must be able to re-point this standby meanwhile.
        drop(f);
        let attached = self.db.replica().follow_tcp(addr.as_str(), ha);
        let mut f = lock(&self.follow);
        if f.target.as_ref() != Some(&(addr.clone(), ha)) || f.handle.is_some() {
            // Re-pointed (or stopped) while attaching: this link is not wanted any more.
            if let Ok(h) = attached {
                h.leave();
            }
            return;
        }
        match attached {
            Ok(h) => {
                tracing::info!(active = %addr, ha, "following the active");
                f.handle = Some(h);
                f.failures = 0;
                f.next_attempt = None;
            }
            Err(e) => {
                f.failures += 1;
                f.next_attempt = Some(Instant::now() + backoff(f.failures));
                tracing::warn!(active = %addr, error = %e, "attaching to the active failed; will retry");
            }
        }
    }

    fn set_follow_target(&self, target: Option<(String, bool)>) {
        let mut f = lock(&self.follow);
        if f.target == target && f.handle.is_some() {
            return;
        }
        if let Some(h) = f.handle.take() {
            // The control plane re-points or stops this standby: a planned detach.
            h.leave();
        }
        f.target = target;
        f.next_attempt = None;
        f.failures = 0;
    }

    fn check_epoch(st: &CtlState, epoch: ControlEpoch) -> Result<(), String> {
        if epoch < st.epoch {
            return Err(format!(
                "epoch {} is older than this instance's epoch {}",
                epoch.0, st.epoch.0
            ));
        }
        Ok(())
    }

    fn promote_inner(&self, epoch: ControlEpoch) -> Result<(), String> {
        let mut st = lock(&self.ctl);
        Self::check_epoch(&st, epoch)?;
        {
            // Promoted: stop following at once, and without a `Leave`. A `Leave` tells the
            // active this standby detaches on purpose, so that it stops waiting for it: the
            // old active of a failover may still be running (a one-way partition lets this
            // side's frames through), and would then acknowledge alone writes this instance,
            // now in control, never had. The active of a planned switchover is quiesced: no
            // write waits for this standby.
            let mut f = lock(&self.follow);
            if let Some(h) = f.handle.take() {
                h.stop();
            }
            f.target = None;
            f.next_attempt = None;
            f.failures = 0;
        }
        let r = self.db.replica();
        if r.role() != hitless_sync::Role::Active || r.epoch() != epoch {
            r.activate(epoch)
                .map_err(|e| format!("taking control failed: {e}"))?;
        }
        r.resume();
        self.db.resync_seq();
        st.role = Some(Role::Active);
        st.epoch = epoch;
        st.fenced = false;
        st.quiesced = false;
        self.db.gate.set(|g| {
            g.writable = true;
            g.quiesced = false;
            g.role = "active";
            g.epoch = epoch;
        });
        tracing::info!(epoch = epoch.0, "in control");
        Ok(())
    }

    fn become_standby(
        &self,
        epoch: ControlEpoch,
        addr: Option<String>,
        ha: bool,
        role: Role,
    ) -> Result<(), String> {
        let mut st = lock(&self.ctl);
        Self::check_epoch(&st, epoch)?;
        // Close the gate first so no write starts while stepping down. Writes waiting at a
        // quiesce were never executed: control moved away in a planned switchover.
        self.db.gate.set(|g| {
            if g.writable && g.quiesced {
                g.moves += 1;
            }
            g.writable = false;
            g.quiesced = false;
            g.role = if role == Role::Spare {
                "spare"
            } else {
                "standby"
            };
            g.epoch = epoch;
        });
        let r = self.db.replica();
        if matches!(r.role(), hitless_sync::Role::Active) {
            r.demote()
                .map_err(|e| format!("stepping down failed: {e}"))?;
        }
        r.fence(epoch);
        self.set_follow_target(addr.clone().map(|a| (a, ha)));
        st.role = Some(role);
        st.epoch = epoch;
        st.fenced = false;
        st.quiesced = false;
        st.designated_ha = ha;
        tracing::info!(epoch = epoch.0, ?role, active = ?addr, ha, "standing by");
        drop(st);
        // Attach now rather than at the supervisor's next round: after a switchover the new
        // active's clients wait for this standby.
        self.wake_supervisor();
        Ok(())
    }

    fn wake_supervisor(&self) {
        if let Some(t) = lock(&self.threads).first() {
            t.thread().unpark();
        }
    }

    fn sync_mode(&self) -> SyncMode {
        match self.db.replica().config().durability {
            Durability::Sync => SyncMode::Synchronous,
            Durability::Async { .. } => SyncMode::Asynchronous,
        }
    }

    /// The INFO reply's instance sections.
    pub fn info(&self) -> String {
        let g = self.db.gate.get();
        let s = self.db.replica().status();
        let mut out = String::new();
        out.push_str("# Server\r\n");
        out.push_str(&format!("kvd_version:{}\r\n", env!("CARGO_PKG_VERSION")));
        out.push_str(&format!("image_version:{}\r\n", self.cfg.image_version));
        out.push_str(&format!("instance_id:{}\r\n", self.cfg.instance_id));
        out.push_str(&format!(
            "schema_version:{}\r\n",
            self.db.version().number()
        ));
        out.push_str("# Replication\r\n");
        out.push_str(&format!("role:{}\r\n", g.role));
        out.push_str(&format!("epoch:{}\r\n", g.epoch.0));
        out.push_str(&format!("quiesced:{}\r\n", g.quiesced as u8));
        out.push_str(&format!("sync_role:{}\r\n", s.role));
        out.push_str(&format!("applied_seq:{}\r\n", s.applied_seq));
        out.push_str(&format!("acked_seq:{}\r\n", self.db.acked_seq()));
        out.push_str(&format!("lag:{}\r\n", s.lag));
        out.push_str(&format!("connected_standbys:{}\r\n", s.standbys.len()));
        for (i, sb) in s.standbys.iter().enumerate() {
            out.push_str(&format!(
                "standby{i}:node={},ha={},stream_version={},acked_seq={},lag={},ready={}\r\n",
                sb.node, sb.ha as u8, sb.stream_version, sb.acked_seq, sb.lag, sb.ready as u8
            ));
        }
        out
    }

    /// Stops the supervisor and the replica.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        self.set_follow_target(None);
        for t in lock(&self.threads).drain(..) {
            let _ = t.join();
        }
        self.db.gate.set(|g| {
            g.writable = false;
            g.role = "stopped";
        });
        self.db.replica().shutdown();
    }
}

fn backoff(failures: u32) -> Duration {
    Duration::from_millis((100u64 << failures.min(5)).min(2000))
}

/// The control-channel handler of a [`Node`].
#[derive(Clone)]
pub struct NodeControl(pub Arc<Node>);

impl ControlHandler for NodeControl {
    fn hello(&mut self) -> Hello {
        let n = &self.0;
        let schema = n.db.replica().schema();
        let mut schemas = BTreeMap::new();
        schemas.insert(
            SERVICE.to_string(),
            SchemaSupport {
                read: schema.reads().0,
                write: schema.writes().0,
                native: schema.version(),
            },
        );
        Hello {
            instance_id: n.cfg.instance_id.clone(),
            image_version: n.cfg.image_version.clone(),
            schemas,
            kernel_release: n.cfg.kernel_release.clone(),
            service_addr: n.cfg.service_addr.clone(),
            sync_addr: n.cfg.sync_addr.clone(),
            formats: None,
        }
    }

    fn configure(&mut self, cfg: &Configure) -> Result<(), String> {
        let n = &self.0;
        if cfg.instance_id != n.cfg.instance_id {
            return Err(format!(
                "this is instance {}, not {}",
                n.cfg.instance_id, cfg.instance_id
            ));
        }
        if cfg.sync_mode != n.sync_mode() {
            return Err(format!(
                "this instance was started with {:?} acknowledgements and cannot switch to {:?} while running",
                n.sync_mode(),
                cfg.sync_mode
            ));
        }
        match cfg.role {
            Role::Active => n.promote_inner(cfg.epoch),
            Role::Standby => n.become_standby(
                cfg.epoch,
                cfg.active_sync_addr.clone(),
                cfg.designated_ha,
                Role::Standby,
            ),
            Role::Spare => n.become_standby(cfg.epoch, None, false, Role::Spare),
        }
    }

    fn promote(&mut self, epoch: ControlEpoch) -> Result<(), String> {
        self.0.promote_inner(epoch)
    }

    fn quiesce(&mut self, epoch: ControlEpoch) -> Result<(), String> {
        let n = &self.0;
        let mut st = lock(&n.ctl);
        Node::check_epoch(&st, epoch)?;
        if st.role != Some(Role::Active) || st.fenced {
            return Err("only an active instance can be quiesced".into());
        }
        // Writes already submitted become durable while the control lock is held: no other
        // command changes the role meanwhile (the wait is bounded by the ack timeout).
        n.db.quiesce().map_err(|e| {
            format!("writes submitted before the quiesce did not become durable: {e}")
        })?;
        st.quiesced = true;
        tracing::info!(
            epoch = epoch.0,
            "quiesced: new writes wait, submitted ones are durable"
        );
        Ok(())
    }

    fn demote(
        &mut self,
        epoch: ControlEpoch,
        new_active_sync_addr: Option<&str>,
    ) -> Result<(), String> {
        let n = &self.0;
        let ha = lock(&n.ctl).designated_ha;
        n.become_standby(
            epoch,
            new_active_sync_addr.map(str::to_string),
            ha,
            Role::Standby,
        )
    }

    fn fence(&mut self, epoch: ControlEpoch) -> Result<(), String> {
        let n = &self.0;
        let mut st = lock(&n.ctl);
        Node::check_epoch(&st, epoch)?;
        n.db.gate.set(|g| {
            if g.writable && g.quiesced {
                g.moves += 1;
            }
            g.writable = false;
            g.quiesced = false;
            g.role = "fenced";
            g.epoch = epoch;
        });
        let r = n.db.replica();
        r.fence(epoch);
        if r.role() == hitless_sync::Role::Active {
            // Same epoch: the library does not fence itself, so step down to acknowledge nothing.
            r.demote().map_err(|e| format!("fencing failed: {e}"))?;
        }
        n.set_follow_target(None);
        st.fenced = true;
        st.epoch = epoch;
        tracing::warn!(epoch = epoch.0, "fenced: acknowledging nothing");
        Ok(())
    }

    fn standby_gone(&mut self, instance_id: &str) -> Result<(), String> {
        self.0.db.replica().standby_gone(instance_id);
        Ok(())
    }

    fn status(&mut self) -> InstanceStatus {
        let n = &self.0;
        let st = lock(&n.ctl);
        let s = n.db.replica().status();
        let active = s.role == hitless_sync::Role::Active;
        let svc = ServiceStatus {
            applied_seq: s.applied_seq,
            lag: if active { 0 } else { s.lag },
            bulk_done: active || s.bulk_done,
            digest_verified_at: if active {
                Some(s.applied_seq)
            } else {
                s.digest_matched.then_some(s.digest_seq)
            },
            ready: s.ready,
        };
        let ready = svc.ready && st.role.is_some() && !st.fenced;
        let mut services = BTreeMap::new();
        services.insert(SERVICE.to_string(), svc);
        InstanceStatus {
            role: st.role,
            epoch: st.epoch,
            services,
            ready,
            acked_seq: if active {
                n.db.acked_seq()
            } else {
                s.applied_seq
            },
            fenced: st.fenced || s.role == hitless_sync::Role::Fenced,
            quiesced: st.quiesced,
            memory: Some(MemoryUse {
                rss_bytes: memory::rss_bytes().unwrap_or(0),
                limit_bytes: memory::limit_bytes(),
                records: n.db.dbsize() as u64,
            }),
        }
    }

    fn shutdown(&mut self) -> Result<(), String> {
        tracing::info!("shutdown requested over the control channel");
        Ok(())
    }
}
