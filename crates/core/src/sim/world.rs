//! The simulated world: instances with an applied sequence number, a client writing one
//! mutation per tick to the instance in control, synchronous replication to `designated_ha`
//! standbys (a write is acknowledged once they applied it, or after [`HA_GRACE_TICKS`] without
//! them; with a witness, only once the agent said the standby is gone: `StandbyGone`),
//! asynchronous replication to the others, bulk-sync, start, stop and switch delays,
//! and appliance loss with recovery. It executes the engine's commands and answers with the
//! events an agent would report.

use std::collections::BTreeMap;

use crate::domain::{ApplianceId, ControlEpoch, InstanceId};
use crate::engine::{Command, Event, Step};
use crate::invariants::{check_promotion, Invariant, Violation};

pub(super) const START_DELAY_TICKS: u64 = 3;
pub(super) const STOP_DELAY_TICKS: u64 = 1;
pub(super) const BULK_DELAY_TICKS: u64 = 4;
pub(super) const SWITCH_DELAY_TICKS: u64 = 2;
pub(super) const DOWN_TICKS: u64 = 15;
pub(super) const ASYNC_RATE: u64 = 2;
/// Ticks an instance in control keeps acknowledgements back after its synchronous HA standby
/// drops out, before it acknowledges alone (degraded): longer than the control plane takes to
/// detect a lost instance and fail over, so a failover decided in that window (possibly
/// before the engine learned the standby dropped) never promotes a standby that misses an
/// acknowledged write. The replication library's `ha_grace` is the real counterpart.
pub const HA_GRACE_TICKS: u64 = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WStatus {
    Starting,
    Up,
    Dead,
    Stopped,
}

#[derive(Debug, Clone)]
pub(super) struct Feed {
    pub(super) active: InstanceId,
    pub(super) designated: bool,
    pub(super) synced: bool,
}

#[derive(Debug, Clone)]
pub(super) struct WInst {
    pub(super) appliance: ApplianceId,
    pub(super) status: WStatus,
    pub(super) applied: u64,
    pub(super) feed: Option<Feed>,
    /// Commands under an epoch below this one are refused.
    pub(super) fenced_below: ControlEpoch,
    pub(super) created_step: Option<Step>,
}

#[derive(Debug, Clone)]
pub(super) enum Action {
    Deliver(Event),
    Up(InstanceId),
    BulkDone(InstanceId),
    Switch {
        from: InstanceId,
        to: InstanceId,
        epoch: ControlEpoch,
    },
    Failover {
        to: InstanceId,
        epoch: ControlEpoch,
    },
    Stop(InstanceId),
    Recover(ApplianceId),
}

/// One acknowledgement recorded while a split runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Ack {
    /// When.
    pub(super) tick: u64,
    /// The sequence number acknowledged (and every one below it).
    pub(super) seq: u64,
    /// Acknowledged without an in-sync synchronous standby on the other appliance.
    pub(super) alone: bool,
    /// The instance in control that acknowledged it.
    pub(super) by: InstanceId,
}

#[derive(Debug, Clone)]
pub(super) struct World {
    pub(super) now_tick: u64,
    pub(super) insts: BTreeMap<InstanceId, WInst>,
    pub(super) up: [bool; 2],
    pub(super) control: Option<InstanceId>,
    pub(super) epoch: ControlEpoch,
    pub(super) acked: u64,
    pub(super) acked_lost: u64,
    /// The in-sync HA standbys of the instance in control at the last look.
    pub(super) ha_set: Vec<InstanceId>,
    /// HA standbys that dropped out, and when: acknowledgements wait for them for
    /// [`HA_GRACE_TICKS`] (they might be promoted by a failover decided meanwhile).
    pub(super) ha_dropped: BTreeMap<InstanceId, u64>,
    pub(super) queue: Vec<(u64, u64, Action)>,
    pub(super) seq: u64,
    pub(super) rng: u64,
    pub(super) hang_step: Option<Step>,
    pub(super) start_fail_step: Option<Step>,
    pub(super) start_failed: bool,
    pub(super) violations: Vec<Violation>,
    pub(super) initial_max_id: InstanceId,
    /// Agents that run no ops (paused): commands on their appliance's instances hang, while
    /// the instances themselves keep running and replicating.
    pub(super) agent_down: [bool; 2],
    /// Acknowledgements since a split began (one per tick at most, bounded by the split).
    pub(super) ack_log: Option<Vec<Ack>>,
    /// The pair decides through a witness: an instance in control whose synchronous standby
    /// dropped out holds acknowledgements until `StandbyGone` (no grace).
    pub(super) witness: bool,
}

pub(super) fn ai(a: ApplianceId) -> usize {
    match a {
        ApplianceId::Primary => 0,
        ApplianceId::Secondary => 1,
    }
}

impl World {
    /// The steady pair the simulated ISSU starts from: i1 in control on the primary at e1,
    /// i2 its in-sync synchronous standby on the secondary. `seed` seeds the delay jitter (0:
    /// none).
    pub(super) fn steady(seed: u64) -> Self {
        let mut insts = BTreeMap::new();
        insts.insert(
            InstanceId(1),
            WInst {
                appliance: ApplianceId::Primary,
                status: WStatus::Up,
                applied: 0,
                feed: None,
                fenced_below: ControlEpoch::default(),
                created_step: None,
            },
        );
        insts.insert(
            InstanceId(2),
            WInst {
                appliance: ApplianceId::Secondary,
                status: WStatus::Up,
                applied: 0,
                feed: Some(Feed {
                    active: InstanceId(1),
                    designated: true,
                    synced: true,
                }),
                fenced_below: ControlEpoch::default(),
                created_step: None,
            },
        );
        World {
            now_tick: 0,
            insts,
            up: [true, true],
            control: Some(InstanceId(1)),
            epoch: ControlEpoch(1),
            acked: 0,
            acked_lost: 0,
            // i2 is in sync from the start: a fault before the first tick finds it waited for.
            ha_set: vec![InstanceId(2)],
            ha_dropped: BTreeMap::new(),
            queue: Vec::new(),
            seq: 0,
            rng: seed,
            hang_step: None,
            start_fail_step: None,
            start_failed: false,
            violations: Vec::new(),
            initial_max_id: InstanceId(2),
            agent_down: [false; 2],
            ack_log: None,
            witness: false,
        }
    }

    /// Takes the earliest action due by now (first scheduled first), if any.
    pub(super) fn next_due(&mut self) -> Option<Action> {
        let now = self.now_tick;
        let idx = self
            .queue
            .iter()
            .enumerate()
            .filter(|(_, (due, _, _))| *due <= now)
            .min_by_key(|(_, (due, seq, _))| (*due, *seq))
            .map(|(i, _)| i)?;
        let (_, _, action) = self.queue.swap_remove(idx);
        Some(action)
    }

    /// Delay jitter: 0 to 2 ticks from the seeded generator, 0 without a seed.
    pub(super) fn jitter(&mut self) -> u64 {
        if self.rng == 0 {
            return 0;
        }
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) % 3
    }

    pub(super) fn schedule(&mut self, delay: u64, a: Action) {
        let j = if delay > 0 { self.jitter() } else { 0 };
        self.seq += 1;
        self.queue.push((self.now_tick + delay + j, self.seq, a));
    }

    pub(super) fn deliver(&mut self, delay: u64, e: Event) {
        self.schedule(delay, Action::Deliver(e));
    }

    pub(super) fn is_up(&self, a: ApplianceId) -> bool {
        self.up[ai(a)]
    }

    pub(super) fn inst_up(&self, id: InstanceId) -> bool {
        self.insts
            .get(&id)
            .is_some_and(|i| i.status == WStatus::Up && self.is_up(i.appliance))
    }

    /// The synchronous standby currently fed by the instance in control.
    pub(super) fn ha_standby(&self) -> Option<InstanceId> {
        self.ha_standbys().first().copied()
    }

    /// Every synchronous standby currently fed by the instance in control.
    pub(super) fn ha_standbys(&self) -> Vec<InstanceId> {
        let Some(c) = self.control else {
            return Vec::new();
        };
        self.insts
            .iter()
            .filter(|(_, i)| {
                i.status == WStatus::Up
                    && self.is_up(i.appliance)
                    && i.feed
                        .as_ref()
                        .is_some_and(|f| f.active == c && f.designated && f.synced)
            })
            .map(|(id, _)| *id)
            .collect()
    }

    /// Notes that the instance in control has an in-sync HA standby (from then on, it
    /// acknowledges alone only after [`HA_GRACE_TICKS`], or with a witness only once told the
    /// standby is gone).
    pub(super) fn note_ha(&mut self) {
        let now_set = self.ha_standbys();
        for id in &self.ha_set {
            if !now_set.contains(id) {
                self.ha_dropped.insert(*id, self.now_tick);
            }
        }
        for id in &now_set {
            // Back in sync: it holds every write again.
            self.ha_dropped.remove(id);
        }
        let now = self.now_tick;
        if !self.witness {
            self.ha_dropped.retain(|_, t| now < *t + HA_GRACE_TICKS);
        }
        self.ha_set = now_set;
    }

    /// One client write per tick if `client` (a client reaches this world's instance in
    /// control); replication.
    pub(super) fn advance(&mut self, client: bool) {
        let Some(c) = self.control else { return };
        let writable = client && self.inst_up(c) && self.insts[&c].fenced_below <= self.epoch;
        let head = self.insts[&c].applied + u64::from(writable);
        if writable {
            self.insts.get_mut(&c).expect("control exists").applied = head;
        }
        let up = self.up;
        for (id, i) in self.insts.iter_mut() {
            if *id == c || i.status != WStatus::Up || !up[ai(i.appliance)] {
                continue;
            }
            if let Some(f) = &i.feed {
                if f.active == c && f.synced {
                    i.applied = if f.designated {
                        head
                    } else {
                        (i.applied + ASYNC_RATE).min(head)
                    };
                }
            }
        }
        if !writable {
            return;
        }
        // Synchronous standbys applied it: acknowledged. Without one, the write is held for
        // the grace (it stays applied locally, and is acknowledged when the grace ends),
        // unless this instance never had an HA standby in control (after a failover).
        self.note_ha();
        if !self.ha_dropped.is_empty() {
            return;
        }
        if head > self.acked {
            // A standby on the same appliance shares its fate: alone means no in-sync
            // synchronous standby on the other appliance.
            let here = self.insts[&c].appliance;
            let alone = self.ha_set.iter().all(|h| self.insts[h].appliance == here);
            if let Some(log) = self.ack_log.as_mut() {
                log.push(Ack {
                    tick: self.now_tick,
                    seq: head,
                    alone,
                    by: c,
                });
            }
        }
        self.acked = self.acked.max(head);
    }

    /// The appliance a command acts on, if it names one instance or appliance.
    fn target_appliance(&self, cmd: &Command) -> Option<ApplianceId> {
        let of = |id: &InstanceId| self.insts.get(id).map(|i| i.appliance);
        match cmd {
            Command::StartInstance { appliance, .. } => Some(*appliance),
            Command::StopInstance { instance } | Command::Fence { instance, .. } => of(instance),
            Command::AttachStandby { standby, .. } | Command::VerifyStandby { standby, .. } => {
                of(standby)
            }
            Command::SwitchControl { to, .. } | Command::Failover { to, .. } => of(to),
            Command::StandbyGone { active, .. } => of(active),
            Command::Report { .. } | Command::Witness { .. } | Command::StandDown { .. } => None,
        }
    }

    pub(super) fn execute(&mut self, cmd: &Command, step: Option<Step>) {
        self.execute_inner(cmd, step);
        self.note_ha();
    }

    pub(super) fn execute_inner(&mut self, cmd: &Command, step: Option<Step>) {
        if matches!(cmd, Command::Report { .. }) {
            return;
        }
        if step.is_some() && step == self.hang_step {
            return; // The agent hangs on everything issued during this step.
        }
        if self
            .target_appliance(cmd)
            .is_some_and(|a| self.agent_down[ai(a)])
        {
            return; // That appliance's agent is paused: the op hangs.
        }
        match cmd {
            Command::StartInstance {
                instance,
                appliance,
                ..
            } => {
                if let Some(i) = self.insts.get(instance) {
                    match i.status {
                        WStatus::Up => self.deliver(
                            1,
                            Event::InstanceStarted {
                                instance: *instance,
                            },
                        ),
                        WStatus::Starting => {}
                        WStatus::Dead | WStatus::Stopped => self.deliver(
                            1,
                            Event::InstanceFailed {
                                instance: *instance,
                                reason: "instance is gone".into(),
                            },
                        ),
                    }
                    return;
                }
                let fail = !self.is_up(*appliance)
                    || (step.is_some() && step == self.start_fail_step && !self.start_failed);
                if fail && self.is_up(*appliance) {
                    self.start_failed = true;
                }
                self.insts.insert(
                    *instance,
                    WInst {
                        appliance: *appliance,
                        status: if fail {
                            WStatus::Dead
                        } else {
                            WStatus::Starting
                        },
                        applied: 0,
                        feed: None,
                        fenced_below: ControlEpoch::default(),
                        created_step: step,
                    },
                );
                if fail {
                    self.deliver(
                        START_DELAY_TICKS,
                        Event::InstanceFailed {
                            instance: *instance,
                            reason: "failed to boot".into(),
                        },
                    );
                } else {
                    self.schedule(START_DELAY_TICKS, Action::Up(*instance));
                }
            }
            Command::StopInstance { instance } => {
                self.schedule(STOP_DELAY_TICKS, Action::Stop(*instance))
            }
            Command::AttachStandby {
                standby,
                active,
                designated_ha,
            } => {
                let Some(i) = self.insts.get(standby) else {
                    return;
                };
                if i.status == WStatus::Dead {
                    self.deliver(
                        1,
                        Event::InstanceFailed {
                            instance: *standby,
                            reason: "dead".into(),
                        },
                    );
                    return;
                }
                if i.status != WStatus::Up {
                    return;
                }
                if self.control != Some(*active) || !self.inst_up(*active) {
                    self.deliver(1, Event::StandbyOutOfSync { instance: *standby });
                    return;
                }
                let already = i
                    .feed
                    .as_ref()
                    .is_some_and(|f| f.active == *active && f.synced);
                let head = self.insts[active].applied;
                let i = self.insts.get_mut(standby).expect("exists");
                if already {
                    let f = i.feed.as_mut().expect("fed");
                    if *designated_ha && !f.designated {
                        // Becoming synchronous: catch up first.
                        i.applied = head;
                    }
                    let i = self.insts.get_mut(standby).expect("exists");
                    let f = i.feed.as_mut().expect("fed");
                    f.designated = *designated_ha;
                    let seq = i.applied;
                    self.deliver(
                        1,
                        Event::SyncReady {
                            instance: *standby,
                            seq,
                            digest_ok: true,
                        },
                    );
                } else {
                    i.feed = Some(Feed {
                        active: *active,
                        designated: *designated_ha,
                        synced: false,
                    });
                    self.schedule(BULK_DELAY_TICKS, Action::BulkDone(*standby));
                }
            }
            Command::VerifyStandby { standby, active } => {
                let ok = self.insts.get(standby).is_some_and(|i| {
                    i.status == WStatus::Up
                        && i.feed
                            .as_ref()
                            .is_some_and(|f| f.active == *active && f.synced)
                });
                if ok {
                    let seq = self.insts[standby].applied;
                    self.deliver(
                        1,
                        Event::SyncReady {
                            instance: *standby,
                            seq,
                            digest_ok: true,
                        },
                    );
                } else {
                    self.deliver(1, Event::StandbyOutOfSync { instance: *standby });
                }
            }
            Command::SwitchControl { from, to, epoch } => self.schedule(
                SWITCH_DELAY_TICKS,
                Action::Switch {
                    from: *from,
                    to: *to,
                    epoch: *epoch,
                },
            ),
            Command::Failover { to, epoch } => self.schedule(
                1,
                Action::Failover {
                    to: *to,
                    epoch: *epoch,
                },
            ),
            Command::Fence { instance, epoch } => {
                if let Some(i) = self.insts.get_mut(instance) {
                    i.fenced_below = i.fenced_below.max(*epoch);
                }
            }
            Command::StandbyGone { active, standby } => self.standby_gone(*active, *standby),
            // The witness and the driver itself are modelled by the simulator (`sim::witness`,
            // `sim::split`), not by the appliances.
            Command::Witness { .. } | Command::StandDown { .. } => {}
            Command::Report { .. } => {}
        }
    }

    /// Runs one due action; returns events to deliver now.
    pub(super) fn run_action(&mut self, a: Action, out: &mut Vec<Event>) {
        match a {
            Action::Deliver(e) => out.push(e),
            Action::Up(id) => {
                let app_up = self.insts.get(&id).is_some_and(|i| self.is_up(i.appliance));
                if let Some(i) = self.insts.get_mut(&id) {
                    if i.status == WStatus::Starting && app_up {
                        i.status = WStatus::Up;
                        out.push(Event::InstanceStarted { instance: id });
                    }
                }
            }
            Action::BulkDone(id) => {
                let Some(c) = self.control.filter(|c| self.inst_up(*c)) else {
                    if self.inst_up(id) {
                        out.push(Event::StandbyOutOfSync { instance: id });
                    }
                    return;
                };
                let head = self.insts[&c].applied;
                if !self.inst_up(id) {
                    return;
                }
                let i = self.insts.get_mut(&id).expect("exists");
                let Some(f) = i.feed.as_mut() else { return };
                if f.active != c {
                    out.push(Event::StandbyOutOfSync { instance: id });
                    return;
                }
                if f.synced {
                    return;
                }
                f.synced = true;
                i.applied = if f.designated {
                    head
                } else {
                    head.saturating_sub(1)
                };
                let seq = i.applied;
                out.push(Event::SyncProgress {
                    instance: id,
                    applied_seq: seq,
                    lag: head - seq,
                });
                out.push(Event::SyncReady {
                    instance: id,
                    seq,
                    digest_ok: true,
                });
            }
            Action::Switch { from, to, epoch } => {
                let ok = self.control == Some(from)
                    && self.inst_up(from)
                    && self.inst_up(to)
                    && self.insts[&from].fenced_below <= self.epoch
                    && epoch > self.epoch
                    && self.insts[&to]
                        .feed
                        .as_ref()
                        .is_some_and(|f| f.active == from && f.synced);
                if !ok {
                    out.push(Event::SwitchFailed {
                        to,
                        epoch,
                        reason: "preconditions of the switchover do not hold".into(),
                    });
                    return;
                }
                // Quiesce + drain + promote.
                let head = self.insts[&from].applied;
                self.insts.get_mut(&to).expect("exists").applied = head;
                if let Some(v) = check_promotion(to, head, self.acked) {
                    self.violations.push(v);
                    self.acked_lost += self.acked - head;
                }
                for i in self.insts.values_mut() {
                    if let Some(f) = i.feed.as_mut() {
                        if f.active == from {
                            f.active = to;
                        }
                    }
                }
                let to_designated = self.insts[&to].feed.as_ref().is_some_and(|f| f.designated);
                let _ = to_designated;
                self.insts.get_mut(&to).expect("exists").feed = None;
                self.insts.get_mut(&from).expect("exists").feed = Some(Feed {
                    active: to,
                    designated: false,
                    synced: true,
                });
                self.control = Some(to);
                self.epoch = epoch;
                self.ha_set.clear();
                if self.witness {
                    // The witness keeps the sync set through a switch: the new instance in
                    // control waits for the standbys that dropped out until told they are gone.
                    self.ha_dropped.remove(&to);
                } else {
                    self.ha_dropped.clear();
                }
                out.push(Event::ControlSwitched { to, epoch });
            }
            Action::Failover { to, epoch } => {
                let ok =
                    self.inst_up(to) && epoch > self.epoch && self.insts[&to].fenced_below <= epoch;
                if !ok {
                    out.push(Event::SwitchFailed {
                        to,
                        epoch,
                        reason: "failover target unavailable or epoch stale".into(),
                    });
                    return;
                }
                let applied = self.insts[&to].applied;
                if let Some(v) = check_promotion(to, applied, self.acked) {
                    self.violations.push(v);
                    self.acked_lost += self.acked - applied;
                    self.acked = applied;
                }
                for i in self.insts.values_mut() {
                    if let Some(f) = i.feed.as_mut() {
                        f.synced = false;
                    }
                }
                self.insts.get_mut(&to).expect("exists").feed = None;
                self.control = Some(to);
                self.epoch = epoch;
                self.ha_set.clear();
                self.ha_dropped.clear();
                out.push(Event::ControlSwitched { to, epoch });
            }
            Action::Stop(id) => {
                let Some(i) = self.insts.get(&id) else {
                    out.push(Event::InstanceStopped { instance: id });
                    return;
                };
                if !self.is_up(i.appliance) {
                    return;
                }
                if self.control == Some(id) && i.status == WStatus::Up {
                    self.violations.push(Violation {
                        invariant: Invariant::LastCopyPreserved,
                        detail: format!("stopped {id} while it served clients"),
                    });
                }
                self.insts.get_mut(&id).expect("exists").status = WStatus::Stopped;
                out.push(Event::InstanceStopped { instance: id });
            }
            Action::Recover(a) => {
                self.up[ai(a)] = true;
                out.push(Event::ApplianceRecovered { appliance: a });
            }
        }
    }

    /// The agent tells `active` to stop waiting for `standby` (the witness dropped it from the
    /// sync set): it acknowledges without it, and keeps feeding it asynchronously until it is
    /// attached as synchronous again.
    fn standby_gone(&mut self, active: InstanceId, standby: InstanceId) {
        if self.control != Some(active) {
            return; // Stale: another instance took control since.
        }
        if let Some(f) = self.insts.get_mut(&standby).and_then(|i| i.feed.as_mut()) {
            if f.active == active {
                f.designated = false;
            }
        }
        self.ha_set.retain(|s| *s != standby);
        self.ha_dropped.remove(&standby);
    }

    pub(super) fn crash(&mut self, id: InstanceId) {
        if let Some(i) = self.insts.get_mut(&id) {
            i.status = WStatus::Dead;
        }
        self.deliver(
            1,
            Event::InstanceFailed {
                instance: id,
                reason: "crashed".into(),
            },
        );
    }

    pub(super) fn newest_issu_instance(&self, created_in: Option<Step>) -> Option<InstanceId> {
        self.insts
            .iter()
            .rev()
            .find(|(id, i)| {
                **id > self.initial_max_id
                    && matches!(i.status, WStatus::Starting | WStatus::Up)
                    && self.is_up(i.appliance)
                    && (created_in.is_none() || i.created_step == created_in)
            })
            .map(|(id, _)| *id)
    }
}
