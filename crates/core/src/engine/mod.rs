//! The sans-IO ISSU engine and steady-state HA policy.
//!
//! The engine is a pure state machine: [`Engine::handle`] takes one [`Event`] and returns the
//! [`Command`]s to execute. Time is logical ([`Event::Tick`]); there is no I/O, no wall clock
//! and no randomness, so a run is reproducible from its event sequence, and the whole state
//! ([`EngineState`]) can be journalled and restored with [`Engine::restore`].
//!
//! # Engine steps and the procedure
//!
//! "A" is the appliance in control when the ISSU starts (normally the primary appliance) and is
//! what the `primary-*` step names refer to; "B" is its peer. N is the running version, N+1
//! the target.
//!
//! | Procedure step | Engine step(s) | What happens |
//! |---|---|---|
//! | 1. Pre-checks | `precheck` (plus the checks done when [`Event::Start`] arrives) | both appliances up, instance in control on A, `Ready` HA standby on B, compatibility verdict for N→N+1 and N+1→N present and positive; the HA standby's digest is re-verified ([`Command::VerifyStandby`]) |
//! | 2. Extra N instances | `start-extras`, `sync-extras` | an extra N instance on A and on B, attached as local standbys |
//! | 3. Upgrade A | `primary-start-new`, `primary-sync-new`, `primary-switch`, `primary-mixed`, `primary-upgrade-old`, `primary-sync-old` | A's extra N is replaced by N+1, synced to sufficient state, control switches to it (new epoch), soak with the old N as fallback, then the old N is replaced by N+1 and synced as local standby. B's N instance stays the in-sync HA standby throughout |
//! | 4. Failure in A's mixed window | HA policy + `rollback` | the instance in control fails → [`Command::Failover`] to B's N HA standby, B's second instance is attached as its standby, and the ISSU rolls back |
//! | 5. Upgrade B | `secondary-start-new`, `secondary-sync-new`, `secondary-switch`, `secondary-mixed`, `secondary-upgrade-old`, `secondary-sync-old` | same on B: N+1 replaces B's extra, syncs, becomes the synchronous HA standby, soak, old N replaced by N+1 |
//! | 6. Retire and commit | `retire`, `await-commit` | the two extra instances are stopped; the operator commits (or the rollback timer reverts) |
//!
//! `rollback` is a convergent reconciler: from any state it brings the pair back to an
//! instance of N in control with an in-sync N HA standby on the other appliance and nothing
//! else running. With no ISSU running the same reconciler (for the version in control) is the
//! steady-state HA repair policy.
//!
//! # Failure policy
//!
//! * Before commit, any instance failure, appliance loss, step timeout (after one idempotent
//!   retry), operator `abort` (allowed until the primary switch is issued), operator
//!   `rollback`, or the rollback timer expiring moves the ISSU to `rollback`.
//! * The instance in control failing (crash, heartbeat lost, appliance lost) is always handled
//!   first by failover to a `Ready` synchronous ([`Role::HaStandby`]) standby, preferring the
//!   other appliance; the failed instance is fenced with the new epoch.
//! * A standby falling out of sync is re-attached (bounded by `max_resyncs`); forward progress
//!   waits while the HA standby is not in sync, bounded by the step timer.
//! * When the engine cannot continue alone it reports [`Report::Stuck`] with the exact state
//!   and the operator command that resumes.
//!
//! The point of no return is `commit`: until then `rollback` reverts to N; afterwards going back
//! is a new ISSU.

mod command;
mod event;
mod forward;
mod ha;
mod observe;
mod operator;
mod reconcile;
mod state;
mod status;
mod step;
mod timer;
mod witness;

use crate::domain::{ApplianceId, ImageRef, Instance, InstanceId, InstanceState, Pair, Role};

pub use command::{Command, Outcome, Report, Stuck, RESUME_COMMANDS};
pub use event::{CompatVerdict, Event};
pub use state::{EngineConfig, EngineError, EngineState, IssuState, PendingSwitch, Slots};
pub use status::{InstanceRow, Status};
pub use step::Step;

use state::validate;

/// The ISSU engine and HA policy.
#[derive(Debug, Clone)]
pub struct Engine {
    st: EngineState,
}

/// Progress of one part of a step or of the reconciler.
enum Prog {
    /// Waiting for a command's completion (or for the operator).
    Wait,
    /// Done: the step may move on.
    Done,
    /// Cannot be done: roll back (forward) or report stuck (reconciler), with the reason.
    Fail(String),
}

/// Bound on the passes of [`Engine::drive`] for one event (each pass either changes the step,
/// emits commands, or ends the loop).
const DRIVE_BOUND: usize = 64;

/// Ticks before a failover to an instance is tried again after one to it failed or was
/// refused (see [`EngineState::failover_hold`]).
pub const FAILOVER_RETRY_TICKS: u64 = 10;

impl Engine {
    /// An engine managing `pair` (normally [`Pair::steady`]).
    pub fn new(config: EngineConfig, pair: Pair) -> Result<Self, EngineError> {
        let next_id = pair.instances.iter().map(|i| i.id.0).max().unwrap_or(0) + 1;
        let st = EngineState {
            config,
            max_epoch: pair.epoch,
            pair,
            now_tick: 0,
            next_id,
            compat: None,
            issu: None,
            pending: None,
            stuck: None,
            last_outcome: None,
            deadline_tick: None,
            retried: false,
            progress_mark: 0,
            repair_starts: 0,
            witness: Default::default(),
            failover_hold: None,
        };
        validate(&st)?;
        Ok(Self { st })
    }

    /// Rebuilds an engine from a journalled snapshot. The driver should then execute
    /// [`Engine::in_flight_commands`] (idempotent) to resume.
    pub fn restore(state: EngineState) -> Result<Self, EngineError> {
        validate(&state)?;
        let mut state = state;
        witness::forget_unconfirmed_claims(&mut state);
        // A restored engine (another agent's, or after a restart) checks with the witness
        // again rather than trusting what a deposed engine recorded: deposed, it would never
        // drive again; the change it waited for is asked again at once by the driver
        // (`witness_in_flight`) or at the next tick.
        state.witness.deposed = None;
        if state.witness.inflight.is_some() {
            state.witness.resend = true;
        }
        Ok(Self { st: state })
    }

    /// The full state (serialize it to journal).
    pub fn state(&self) -> &EngineState {
        &self.st
    }

    /// A copy of the full state.
    pub fn snapshot(&self) -> EngineState {
        self.st.clone()
    }

    /// Current step, if an ISSU runs.
    pub fn step(&self) -> Option<Step> {
        self.st.issu.as_ref().map(|i| i.step)
    }

    /// The commands whose completion the engine is waiting for, to re-execute after a restart.
    pub fn in_flight_commands(&self) -> Vec<Command> {
        let mut out = Vec::new();
        let control = self.st.pair.in_control;
        for i in &self.st.pair.instances {
            if !self.st.pair.is_up(i.appliance) {
                continue;
            }
            match i.state {
                InstanceState::Starting => out.push(Command::StartInstance {
                    instance: i.id,
                    appliance: i.appliance,
                    image: i.image.clone(),
                }),
                InstanceState::Syncing => {
                    if let Some(active) = control.filter(|c| *c != i.id) {
                        out.push(Command::AttachStandby {
                            standby: i.id,
                            active,
                            designated_ha: i.role == Role::HaStandby,
                        })
                    }
                }
                InstanceState::Stopping => out.push(Command::StopInstance { instance: i.id }),
                _ => {}
            }
        }
        // A planned switch is retried only while its target is still a ready standby (one
        // that fell out of sync meanwhile would lack acknowledged writes); a failover only
        // while its target is up.
        let pending = self.st.pending.as_ref().filter(|p| {
            self.inst(p.to).is_some_and(|t| {
                if p.planned {
                    t.is_ready_standby()
                } else {
                    t.state.is_up()
                }
            })
        });
        if let Some(change) = &self.st.witness.inflight {
            out.push(Command::Witness {
                change: change.clone(),
            });
        }
        // Through a witness, the control change itself is issued only once granted.
        let pending = pending.filter(|_| !self.st.config.witness || self.st.witness.granted);
        if let Some(p) = pending {
            match (p.planned, p.from) {
                (true, Some(from)) => out.push(Command::SwitchControl {
                    from,
                    to: p.to,
                    epoch: p.epoch,
                }),
                _ => {
                    if let Some(from) = p.from {
                        out.push(Command::Fence {
                            instance: from,
                            epoch: p.epoch,
                        });
                    }
                    out.push(Command::Failover {
                        to: p.to,
                        epoch: p.epoch,
                    })
                }
            }
        }
        if let Some(issu) = &self.st.issu {
            if issu.step == Step::Precheck && issu.verify_sent && !issu.verified {
                if let (Some(standby), Some(active)) = (issu.slots.b_orig, control) {
                    out.push(Command::VerifyStandby { standby, active });
                }
            }
        }
        out
    }

    /// Feeds one event; returns the commands to execute, in order.
    pub fn handle(&mut self, event: Event) -> Vec<Command> {
        #[cfg(debug_assertions)]
        let check = crate::invariants::Checker::for_transition(&self.st);
        let mut out = Vec::new();
        self.dispatch(event, &mut out);
        if self.st.witness.deposed.is_none() {
            self.drive(&mut out);
            self.witness_reconcile(&mut out);
        }
        self.update_timer();
        #[cfg(debug_assertions)]
        self.debug_check_invariants(check, &out);
        out
    }

    // ----------------------------------------------------------------- events

    /// Routes one event to its handler.
    fn dispatch(&mut self, event: Event, out: &mut Vec<Command>) {
        match event {
            Event::Tick => self.on_tick(out),
            Event::Compatibility { verdict } => self.on_compatibility(verdict, out),
            Event::Start { target } => self.on_start(target, out),
            Event::Abort => self.on_abort(out),
            Event::Rollback => self.on_rollback(out),
            Event::Commit => self.on_commit(out),
            Event::Resume => self.on_resume(out),
            Event::InstanceStarted { instance } => self.on_instance_started(instance, out),
            Event::InstanceFailed { instance, reason } => self.on_failed(instance, &reason, out),
            Event::HeartbeatLost { instance } => self.on_heartbeat_lost(instance, out),
            Event::InstanceStopped { instance } => self.on_instance_stopped(instance, out),
            Event::SyncProgress {
                instance,
                applied_seq,
                lag,
            } => self.on_sync_progress(instance, applied_seq, lag),
            Event::SyncReady {
                instance,
                seq,
                digest_ok,
            } => self.on_sync_ready(instance, seq, digest_ok, out),
            Event::StandbyOutOfSync { instance } => self.on_out_of_sync(instance, out),
            Event::ApplianceLost { appliance } => self.on_appliance_lost(appliance, out),
            Event::ApplianceRecovered { appliance } => self.on_appliance_recovered(appliance),
            Event::ControlSwitched { to, epoch } => self.on_switched(to, epoch, out),
            Event::SwitchFailed { to, epoch, reason } => {
                self.on_switch_failed(to, epoch, &reason, out)
            }
            Event::StepTimeout { step } => self.on_step_timeout(step, out),
            Event::WitnessGranted { change, record } => {
                self.on_witness_granted(change, record, out)
            }
            Event::WitnessRefused { change, refusal } => {
                self.on_witness_refused(change, refusal, out)
            }
            Event::WitnessUnreachable { change, .. } => self.on_witness_unreachable(change),
        }
    }

    /// Checks the invariants of [`crate::invariants`] on the transition that `check` was made
    /// for (from the state before the event) to the current state, which emitted `out`
    /// (debug builds only).
    #[cfg(debug_assertions)]
    fn debug_check_invariants(&self, check: crate::invariants::Checker, out: &[Command]) {
        let violations = check.observe_last(&self.st, out);
        debug_assert!(
            violations.is_empty(),
            "engine transition broke invariants: {violations:?}"
        );
    }

    // ------------------------------------------------------------------ drive

    /// Runs the HA policy and the current step (or the reconciler) until nothing changes,
    /// bounded by [`DRIVE_BOUND`] passes.
    fn drive(&mut self, out: &mut Vec<Command>) {
        for _ in 0..DRIVE_BOUND {
            self.ha_policy(out);
            if self.st.stuck.is_some() {
                return;
            }
            let before = (self.step(), out.len());
            match self.step() {
                None => self.steady_repair(out),
                Some(Step::Rollback) => self.drive_rollback(out),
                Some(step) => self.drive_forward(step, out),
            }
            if (self.step(), out.len()) == before {
                return;
            }
        }
    }

    // ---------------------------------------------------------------- helpers

    fn new_instance(
        &mut self,
        app: ApplianceId,
        image: ImageRef,
        out: &mut Vec<Command>,
    ) -> InstanceId {
        let id = InstanceId(self.st.next_id);
        self.st.next_id += 1;
        self.st.pair.instances.push(Instance::new(
            id,
            app,
            image.clone(),
            InstanceState::Starting,
            Role::Spare,
        ));
        out.push(Command::StartInstance {
            instance: id,
            appliance: app,
            image,
        });
        id
    }

    fn attach(
        &mut self,
        id: InstanceId,
        active: InstanceId,
        designated: bool,
        out: &mut Vec<Command>,
    ) {
        if let Some(i) = self.inst_mut(id) {
            i.state = InstanceState::Syncing;
            i.role = if designated {
                Role::HaStandby
            } else {
                Role::LocalStandby
            };
        }
        out.push(Command::AttachStandby {
            standby: id,
            active,
            designated_ha: designated,
        });
    }

    fn stop(&mut self, id: InstanceId, out: &mut Vec<Command>) {
        if let Some(i) = self.inst_mut(id) {
            i.state = InstanceState::Stopping;
            i.role = Role::Spare;
        }
        out.push(Command::StopInstance { instance: id });
    }

    /// Waits for the operator: `resume_with` is one of [`RESUME_COMMANDS`], `first` what the
    /// operator does before.
    fn set_stuck(
        &mut self,
        reason: String,
        resume_with: &str,
        first: Option<&str>,
        out: &mut Vec<Command>,
    ) {
        assert!(
            RESUME_COMMANDS.contains(&resume_with),
            "a stuck engine names an operator command, not {resume_with:?}"
        );
        let stuck = Stuck {
            reason,
            resume_with: resume_with.to_string(),
            first: first.map(str::to_string),
        };
        out.push(report(Report::Stuck(stuck.clone())));
        self.st.stuck = Some(stuck);
        self.st.deadline_tick = None;
    }

    fn issu_mut(&mut self) -> &mut IssuState {
        self.st.issu.as_mut().expect("an ISSU is running")
    }

    fn inst(&self, id: InstanceId) -> Option<&Instance> {
        self.st.pair.get(id)
    }

    fn inst_mut(&mut self, id: InstanceId) -> Option<&mut Instance> {
        self.st.pair.get_mut(id)
    }

    fn set_state(&mut self, id: InstanceId, s: InstanceState) {
        if let Some(i) = self.inst_mut(id) {
            i.state = s;
        }
    }
}

fn report(progress: Report) -> Command {
    Command::Report { progress }
}

fn both(x: Prog, y: Prog) -> Prog {
    match (x, y) {
        (Prog::Fail(r), _) | (_, Prog::Fail(r)) => Prog::Fail(r),
        (Prog::Done, Prog::Done) => Prog::Done,
        _ => Prog::Wait,
    }
}

fn then(x: Prog, f: impl FnOnce() -> Prog) -> Prog {
    match x {
        Prog::Done => f(),
        other => other,
    }
}

fn p_wait(p: Prog) -> Prog {
    match p {
        Prog::Done => Prog::Wait,
        other => other,
    }
}

/// Engines and inputs shared by the handler tests of the engine's modules.
#[cfg(test)]
pub(super) mod testing {
    use super::{CompatVerdict, Engine, EngineConfig, Event};
    use crate::domain::{ControlEpoch, ImageRef, InstanceId, Pair, Version};

    /// The running image (N).
    pub fn source() -> ImageRef {
        ImageRef::new("appliance-os", Version::new(1, 0, 0))
    }

    /// The target image (N+1).
    pub fn target() -> ImageRef {
        ImageRef::new("appliance-os", Version::new(1, 1, 0))
    }

    /// A steady pair: i1 in control on the primary at e1, i2 its ready HA standby on the
    /// secondary.
    pub fn steady() -> Engine {
        Engine::new(
            EngineConfig::default(),
            Pair::steady(source(), InstanceId(1), InstanceId(2), ControlEpoch(1)),
        )
        .expect("the steady pair is consistent")
    }

    /// The steady pair, deciding through a witness.
    pub fn steady_with_witness() -> Engine {
        Engine::new(
            EngineConfig {
                witness: true,
                ..EngineConfig::default()
            },
            Pair::steady(source(), InstanceId(1), InstanceId(2), ControlEpoch(1)),
        )
        .expect("the steady pair is consistent")
    }

    /// A positive two-way compatibility verdict for N -> N+1.
    pub fn verdict() -> Event {
        Event::Compatibility {
            verdict: CompatVerdict {
                from: source().version,
                to: target().version,
                upgrade_ok: true,
                downgrade_ok: true,
                detail: "test".into(),
            },
        }
    }

    /// A steady pair with an ISSU to N+1 started (at `precheck`, `VerifyStandby` sent).
    pub fn started() -> Engine {
        let mut e = steady();
        e.handle(verdict());
        e.handle(Event::Start { target: target() });
        e
    }
}

#[cfg(all(test, debug_assertions))]
mod tests {
    use super::testing::steady;
    use super::{Engine, Event};
    use crate::domain::{InstanceId, Role};

    #[test]
    #[should_panic(expected = "engine transition broke invariants")]
    fn a_transition_that_breaks_an_invariant_stops_a_debug_build() {
        // Recorded in control without the role: passes the restore's consistency check, and
        // any transition from it breaks single control.
        let mut st = steady().snapshot();
        st.pair.get_mut(InstanceId(1)).expect("exists").role = Role::Spare;
        let mut e = Engine::restore(st).expect("restores");
        e.handle(Event::Tick);
    }
}
