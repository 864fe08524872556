//! Deterministic simulator of an appliance pair driven by the engine.
//!
//! The simulated world holds instances with an applied sequence number, a client writing one
//! mutation per tick to the instance in control, synchronous replication to `designated_ha`
//! standbys (a write is acknowledged once they applied it), asynchronous replication to the
//! others, bulk-sync delays, start/stop/switch delays, and appliance loss with recovery. The
//! engine's commands are executed against it and its observations are fed back as events.
//!
//! Faults are injected as `KIND@STEP` ([`FaultSpec`]): the fault fires on the first tick at
//! which the engine is at `STEP` and the fault's target exists. [`fault_catalog`] lists every
//! accepted combination.
//!
//! The faults of the links between the appliances and of a driving agent (a partition, an
//! isolated appliance, a one-way cut, a lost witness, a paused agent: [`FaultKind::SPLIT`])
//! fork the world in two sides, each with its own driver, until they heal; the acknowledged
//! writes of the side discarded at the heal are counted as lost and checked against the kind's
//! prediction ([`FaultKind::loss_without_witness`]), and the pair must converge afterwards.
//!
//! The simulator is cut into the world (`world`: instances, replication, delays, the
//! agent's answers), the faults (`faults`: kinds, `KIND@STEP`, injection), the links
//! (`network`: what each fault cuts), the second driver (`split`: the fork, the service
//! address and the clients, the heal, losses and convergence), the witness (`witness`: with
//! [`EngineConfig::witness`], one record both drivers ask, reachable or not by the links) and
//! the report (`report`: result, timeline, violations); this module runs them together.

mod faults;
mod network;
mod report;
mod split;
mod witness;
mod world;

use crate::domain::{ApplianceId, ControlEpoch, ImageRef, InstanceId, Pair, Version};
use crate::engine::{Command, CompatVerdict, Engine, EngineConfig, EngineState, Event, Step};
use crate::invariants::Checker;

pub use faults::{
    fault_catalog, FaultKind, FaultSpec, ScheduledFault, SimError, Trigger, WitnessLoss,
};
pub use network::{CUT_TICKS, PEER_DETECT_TICKS};
pub use report::{
    ControlChange, FinalControl, SimReport, SimResult, SimViolation, SplitReport, TimelineEntry,
};
pub use split::CONVERGE_TICKS;
pub use witness::{WITNESS_ANSWER_TICKS, WITNESS_TIMEOUT_TICKS};
pub use world::HA_GRACE_TICKS;

use faults::Faults;
use split::Split;
use witness::SimWitness;
use world::{ai, WStatus, World};

/// Simulation options (for tests and property checks).
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Faults to inject.
    pub faults: Vec<ScheduledFault>,
    /// Seed of the delay jitter; 0 means no jitter.
    pub seed: u64,
    /// At this tick, snapshot the engine, pass it through `restore_via` and continue with
    /// the restored engine (re-executing its in-flight commands).
    pub restore_at_tick: Option<u64>,
    /// Transformation of the snapshot (for example a serialization round trip).
    pub restore_via: Option<fn(&EngineState) -> EngineState>,
    /// Upper bound on simulated ticks.
    pub max_ticks: u64,
    /// Engine configuration.
    pub config: EngineConfig,
    /// Ticks without heartbeats after which an agent takes its peer for lost (see
    /// [`PEER_DETECT_TICKS`]).
    pub peer_detect_ticks: u64,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            faults: Vec::new(),
            seed: 0,
            restore_at_tick: None,
            restore_via: None,
            max_ticks: 3000,
            config: EngineConfig {
                rollback_timer_ticks: Some(150),
                ..EngineConfig::default()
            },
            peer_detect_ticks: PEER_DETECT_TICKS,
        }
    }
}

/// Runs one ISSU from N (1.0.0) to N+1 (1.1.0) with an optional fault.
pub fn run(fault: Option<&FaultSpec>) -> SimReport {
    run_fault(fault, &SimOptions::default())
}

/// Runs one ISSU with an optional fault and the other options of `base` (its faults are
/// replaced by `fault`).
pub fn run_fault(fault: Option<&FaultSpec>, base: &SimOptions) -> SimReport {
    let opts = SimOptions {
        faults: fault
            .map(|f| ScheduledFault {
                kind: f.kind,
                trigger: Trigger::AtStep(f.step),
            })
            .into_iter()
            .collect(),
        ..base.clone()
    };
    let mut r = run_with(&opts);
    r.fault = fault.map(|f| f.to_string());
    r
}

/// Source version of the simulated ISSU.
pub const SOURCE: Version = Version::new(1, 0, 0);
/// Target version of the simulated ISSU.
pub const TARGET: Version = Version::new(1, 1, 0);

/// Upper bound on the events and actions handled within one tick.
const EVENTS_PER_TICK: usize = 10_000;

/// The engine, the world it drives, and what the run records.
struct Sim {
    engine: Engine,
    world: World,
    checker: Checker,
    violations: Vec<SimViolation>,
    timeline: Vec<TimelineEntry>,
    /// The appliance whose agent drives `engine`.
    driver: ApplianceId,
    /// The agents' peer failure detector, in ticks.
    peer_detect_ticks: u64,
    /// A split fault in progress or healed.
    split: Option<Split>,
    /// Acknowledged writes of a side discarded at a heal.
    discarded_acked: u64,
    /// Of those, the ones the fault's prediction covers (lost for want of a witness).
    lost_without_witness: u64,
    /// The witness, with [`EngineConfig::witness`].
    witness: Option<SimWitness>,
    /// The engine of [`Sim`] asked its driver to stand down (handled by `split`).
    stood_down: bool,
    /// Delays are jittered (a seed was given).
    seeded: bool,
    /// Control changes carried out (on either side of a split).
    control_changes: Vec<ControlChange>,
}

impl Sim {
    fn new(opts: &SimOptions) -> Self {
        let source = ImageRef::new("appliance-os", SOURCE);
        let pair = Pair::steady(source, InstanceId(1), InstanceId(2), ControlEpoch(1));
        let engine = Engine::new(opts.config.clone(), pair).expect("the steady pair is consistent");
        let checker = Checker::new(engine.state());
        let mut world = World::steady(opts.seed);
        world.witness = opts.config.witness;
        let witness = opts
            .config
            .witness
            .then(|| SimWitness::steady(InstanceId(1), ControlEpoch(1), InstanceId(2), opts.seed));
        let mut sim = Sim {
            engine,
            world,
            checker,
            violations: Vec::new(),
            timeline: Vec::new(),
            driver: ApplianceId::Primary,
            peer_detect_ticks: opts.peer_detect_ticks,
            split: None,
            discarded_acked: 0,
            lost_without_witness: 0,
            witness,
            stood_down: false,
            seeded: opts.seed != 0,
            control_changes: Vec::new(),
        };
        sim.record("steady: N in control on the primary, HA standby on the secondary".into());
        sim
    }

    fn feed(&mut self, e: Event) {
        let cmds = self.engine.handle(e);
        self.after(&cmds);
    }

    /// Checks the transition that emitted `cmds`, executes them in the world, and records
    /// their reports in the timeline.
    fn after(&mut self, cmds: &[Command]) {
        let found = self.checker.observe(self.engine.state(), cmds);
        self.violations
            .extend(found.into_iter().map(SimViolation::from));
        let step = self.engine.step();
        for c in cmds {
            self.world.execute(c, step);
            match c {
                Command::Witness { change } => {
                    let (now, seeded) = (self.world.now_tick, self.seeded);
                    if let Some(w) = self.witness.as_mut() {
                        w.request(self.driver, change.clone(), now, seeded);
                    }
                }
                Command::StandDown { .. } => self.stood_down = true,
                _ => {}
            }
        }
        for c in cmds {
            if let Command::Report { progress } = c {
                if let Some(note) = report::note(progress) {
                    self.record(note);
                }
            }
        }
    }

    fn record(&mut self, note: String) {
        let st = self.engine.state().clone();
        self.record_state(&st, note);
    }

    /// Records a timeline row showing `st` (the engine of either driver).
    fn record_state(&mut self, st: &EngineState, note: String) {
        let step = st
            .issu
            .as_ref()
            .map(|i| i.step.name().to_string())
            .unwrap_or_else(|| "idle".into());
        let (in_control, control_version) = match st.pair.control() {
            Some(c) => (format!("{}@{}", c.id, c.appliance), c.version().to_string()),
            None => ("-".into(), "-".into()),
        };
        let list = |a: ApplianceId| -> Vec<String> {
            st.pair
                .live_on(a)
                .map(|i| format!("{}:{}:{}", i.id, i.version(), report::role_name(i)))
                .collect()
        };
        self.timeline.push(TimelineEntry {
            tick: st.now_tick,
            step,
            in_control,
            control_version,
            epoch: st.pair.epoch,
            primary: list(ApplianceId::Primary),
            secondary: list(ApplianceId::Secondary),
            note,
        });
    }

    /// The operator's compatibility verdict and `start`.
    fn start_issu(&mut self) {
        self.feed(Event::Compatibility {
            verdict: CompatVerdict {
                from: SOURCE,
                to: TARGET,
                upgrade_ok: true,
                downgrade_ok: true,
                detail: "schemas convert both ways".into(),
            },
        });
        self.feed(Event::Start {
            target: ImageRef::new("appliance-os", TARGET),
        });
    }

    /// Replaces the engine by one restored from its (transformed) snapshot, which re-executes
    /// its in-flight commands.
    fn restore(&mut self, via: Option<fn(&EngineState) -> EngineState>) {
        let snap = self.engine.snapshot();
        let snap = match via {
            Some(f) => f(&snap),
            None => snap,
        };
        match Engine::restore(snap) {
            Ok(e) => {
                self.engine = e;
                let cmds = self.engine.in_flight_commands();
                self.after(&cmds);
                self.record("engine restored from its snapshot".into());
            }
            Err(e) => self.violations.push(SimViolation::RestoreFailed {
                error: e.to_string(),
            }),
        }
    }

    /// One tick of the world: the client's write, replication, then every action due (and
    /// the events they produce), bounded.
    fn run_world(&mut self) {
        self.run_world_with(true, true);
    }

    /// One tick of the world; `client`: the clients' write reaches it; `deliver`: its events
    /// go to the engine (not once its driver stepped down).
    fn run_world_with(&mut self, client: bool, deliver: bool) {
        self.world.advance(client);
        for _ in 0..EVENTS_PER_TICK {
            let Some(action) = self.world.next_due() else {
                return;
            };
            let mut events = Vec::new();
            self.world.run_action(action, &mut events);
            self.world.note_ha();
            self.note_events(&events);
            if deliver {
                for e in events {
                    self.feed(e);
                }
            }
        }
        self.violations.push(SimViolation::EventLoopUnsettled);
    }

    /// Notes the control changes among events the world produced.
    fn note_events(&mut self, events: &[Event]) {
        for e in events {
            if let Event::ControlSwitched { to, epoch } = e {
                self.control_changes.push(ControlChange {
                    tick: self.world.now_tick,
                    to: *to,
                    epoch: *epoch,
                });
            }
        }
    }

    /// The report of the run so far.
    fn report(mut self, started: bool, fault_fired: bool) -> SimReport {
        let split = split::finish(&mut self);
        let st = self.engine.state().clone();
        let (result, reason) = report::result_of(&st, started);
        let control = st.pair.control().cloned();
        if st.pair.in_control != self.world.control {
            self.violations.push(SimViolation::ControlMismatch {
                engine: st.pair.in_control,
                world: self.world.control,
            });
        }
        let mut acked_lost = self.world.acked_lost + self.discarded_acked;
        if let Some(c) = self.world.control {
            let applied = self.world.insts[&c].applied;
            if applied < self.world.acked {
                acked_lost += self.world.acked - applied;
            }
        }
        let final_layout_ok = match &control {
            Some(c) => {
                let world_live = self
                    .world
                    .insts
                    .values()
                    .filter(|i| i.status == WStatus::Up && self.world.up[ai(i.appliance)])
                    .count();
                let ha = self.world.ha_standby();
                let engine_live: Vec<_> = st
                    .pair
                    .instances
                    .iter()
                    .filter(|i| i.state.is_live())
                    .collect();
                world_live == 2
                    && engine_live.len() == 2
                    && engine_live.iter().all(|i| i.version() == c.version())
                    && ha.is_some_and(|h| self.world.insts[&h].appliance != c.appliance)
            }
            None => false,
        };
        let mut violations = self.violations;
        violations.extend(self.world.violations.into_iter().map(SimViolation::from));
        SimReport {
            fault: None,
            fault_fired,
            result,
            reason,
            final_control: report::final_control(control.as_ref()),
            epoch: st.pair.epoch,
            invariant_violations: violations.len(),
            violations,
            steps: self.timeline,
            acked_lost,
            acked: self.world.acked + self.discarded_acked,
            lost_without_witness: self.lost_without_witness,
            split,
            final_layout_ok,
            ticks: st.now_tick,
            control_changes: self.control_changes,
            witness: self.witness.map(|w| w.record.record.to_string()),
        }
    }
}

/// Runs one simulated ISSU with the given options.
pub fn run_with(opts: &SimOptions) -> SimReport {
    let mut sim = Sim::new(opts);
    let mut faults = Faults::new(&opts.faults);
    faults.arm(&mut sim.world);
    let mut started = false;
    let mut await_commit_since: Option<u64> = None;
    let mut restored = false;

    for tick in 1..=opts.max_ticks {
        sim.world.now_tick = tick;
        if tick == 2 {
            sim.start_issu();
            started = true;
        }
        if opts.restore_at_tick == Some(tick) && !restored {
            restored = true;
            sim.restore(opts.restore_via);
        }
        faults.fire_due(&mut sim, tick);
        witness::serve(&mut sim, tick);
        if sim.split.as_ref().is_some_and(Split::active) {
            split::run_tick(&mut sim, tick);
        } else {
            sim.run_world();
            sim.feed(Event::Tick);
            split::check_convergence(&mut sim, tick);
        }
        let takes_requests = sim.split.as_ref().is_none_or(Split::driver_takes_requests);

        // The operator commits at await-commit unless the fault is the operator never
        // committing.
        if sim.engine.step() == Some(Step::AwaitCommit) {
            let since = *await_commit_since.get_or_insert(tick);
            if !faults.operator_never_commits() && tick >= since + 2 && takes_requests {
                sim.feed(Event::Commit);
            }
        } else {
            await_commit_since = None;
        }
        let settled = sim.world.queue.is_empty()
            && sim.split.as_ref().is_none_or(|s| s.settled(tick))
            && sim.witness.as_ref().is_none_or(SimWitness::idle);
        if started && sim.engine.step().is_none() && settled {
            break;
        }
        if sim.engine.state().stuck.is_some() && settled {
            break;
        }
    }
    let fired = faults.all_fired();
    sim.report(started, fired)
}
