//! Two drivers: what a cut between the appliances (or a paused driving agent) does to the pair,
//! its service address and its clients, and how the pair converges after the heal.
//!
//! The model follows the agent (`crates/agent/src/driver/observe.rs`, `daemon.rs`):
//!
//! * **The cut.** At the fault the world forks: the driving agent's side (the engine of
//!   [`Sim`], its world) and the other side (a copy of the world taken at the cut). Each side
//!   acts only on what it reaches: across a cut, an appliance is unreachable (its instances
//!   neither take ops nor replicate); a paused agent runs no ops while its instances keep
//!   running and replicating.
//! * **Failure detection.** [`super::PEER_DETECT_TICKS`] after the cut (or
//!   [`super::SimOptions::peer_detect_ticks`]), an agent that no longer hears
//!   its peer takes it for lost: the driver feeds `ApplianceLost`; the other agent restores an
//!   engine from its mirror of the journal (as mirrored up to the cut), re-executes its
//!   in-flight commands, feeds `ApplianceLost` and drives too.
//! * **Two drivers.** Both engines run, each against its own side. An agent that hears the
//!   other driving (one direction still up) applies the daemon's rule at once: the higher
//!   epoch drives, the primary on a tie, the other steps down (its engine stops; its instances
//!   keep running until the heal). Fences cross whatever direction still carries ops.
//! * **The service address and the clients.** A side's front holds the address while that
//!   side's instance in control is on its own appliance and up; during a split both may hold
//!   it. The clients follow whichever side announced last (began to hold), and the worst case
//!   for loss that is still realistic is modelled: clients keep writing to the old side until
//!   the new side announces. A paused agent's front is paused with it: clients that still
//!   follow it get no answer, so nothing is acknowledged there.
//! * **The heal.** When the links return (or the agent resumes), the lower epoch steps down
//!   (the primary wins a tie); with the witness, the side whose instance in control and epoch
//!   the witness records drives on. The history of the discarded side is dropped: every write it
//!   acknowledged after the cut is lost, and counted. Simplification: every instance on the
//!   losing appliance is stopped at the heal (the agent stops those its engine wrote off), and
//!   the surviving engine learns that appliance is lost (if it did not already) and back, so
//!   it rebuilds an HA standby there.
//! * **The witness** (with [`crate::engine::EngineConfig::witness`], `super::witness`): one
//!   record for both sides; each driver's requests are answered if its appliance reaches it. A
//!   driver told to stand down (`StandDown`: the other appliance decided first) stops driving
//!   and its front gives up the address; its instances keep running until the heal.
//! * **Losses and convergence.** Each loss is checked against the kind's prediction
//!   ([`FaultKind::loss_without_witness`]): a predicted one is a write acknowledged alone by the
//!   discarded side after the HA grace; anything else is [`SimViolation::UnpredictedLoss`]. With
//!   the witness nothing is predicted: every loss is unpredicted, and an acknowledgement by the
//!   discarded side once the survivor acknowledged is [`SimViolation::Overlap`].
//!   After the heal the pair must converge within [`CONVERGE_TICKS`] (one instance in control,
//!   the address on its appliance only, an in-sync HA standby on the other), else
//!   [`SimViolation::NotConverged`].

use crate::domain::{ApplianceId, InstanceId};
use crate::engine::{Command, Engine, EngineState, Event};
use crate::invariants::Checker;

use super::faults::{FaultKind, WitnessLoss};
use super::network::{Network, CUT_TICKS};
use super::report::{SimViolation, SplitReport};
use super::world::{ai, Action, WStatus, World, HA_GRACE_TICKS};
use super::{Sim, EVENTS_PER_TICK};

/// Ticks after the heal within which the pair must have converged.
pub const CONVERGE_TICKS: u64 = 300;

/// The engine restored by the agent that stopped hearing the driver.
struct Rival {
    engine: Engine,
    checker: Checker,
}

/// A split in progress (or healed, while convergence is checked).
pub(super) struct Split {
    kind: FaultKind,
    net: Network,
    /// The appliance whose agent drove when the fault fired (the engine of [`Sim`]).
    driver: ApplianceId,
    cut_tick: u64,
    heal_tick: u64,
    /// The journal as mirrored up to the cut.
    mirror: EngineState,
    /// The invariant checker as of the cut, for the restored engine.
    checker: Checker,
    /// The other appliance's side of the world, from the cut to the heal (none when the fault
    /// leaves the appliances connected).
    other: Option<World>,
    rival: Option<Rival>,
    /// The engine of [`Sim`] still drives.
    driver_drives: bool,
    /// Acknowledged sequence at the cut.
    fork_acked: u64,
    /// The instance in control at the cut.
    fork_control: Option<InstanceId>,
    /// The appliance the clients write to.
    clients_at: ApplianceId,
    /// Which appliances' fronts hold the service address.
    holding: [bool; 2],
    /// Which appliances' drivers stood down (told by the witness): their fronts give up the
    /// address until the heal.
    gave_up: [bool; 2],
    healed: bool,
    report: SplitReport,
}

impl Split {
    /// The report so far.
    pub(super) fn report(&self) -> SplitReport {
        self.report.clone()
    }

    /// Still cut (not healed yet).
    pub(super) fn active(&self) -> bool {
        !self.healed
    }

    /// Whether the appliance reaches the witness while the fault lasts.
    pub(super) fn witness_reaches(&self, a: ApplianceId) -> bool {
        self.net.witness_reaches(a)
    }

    /// The appliance whose agent is paused, if any.
    pub(super) fn paused(&self) -> Option<ApplianceId> {
        self.net.paused()
    }

    /// The engine of [`Sim`] takes operator requests (it drives and is not paused).
    pub(super) fn driver_takes_requests(&self) -> bool {
        self.healed || (self.driver_drives && self.net.paused() != Some(self.driver))
    }

    /// Healed and converged, or healed long enough ago that waiting longer proves nothing.
    pub(super) fn settled(&self, tick: u64) -> bool {
        self.healed
            && (self.report.converged_after_ticks.is_some()
                || tick > self.heal_tick + CONVERGE_TICKS)
    }
}

/// Fires a split fault: cuts the links (or pauses the driving agent) and forks the world.
pub(super) fn begin(sim: &mut Sim, kind: FaultKind) -> Option<String> {
    if sim.split.is_some() {
        return None; // One split per run.
    }
    let d = sim.driver;
    let o = d.other();
    let net = Network::faulted(kind, d);
    let tick = sim.world.now_tick;
    let paused = net.paused() == Some(d);
    let other = if paused || !net.reaches(d) {
        let mut w = sim.world.clone();
        // The driver's ops in flight and the events it was about to see stay on its side.
        w.queue.retain(|(_, _, a)| {
            !matches!(
                a,
                Action::Deliver(_) | Action::Switch { .. } | Action::Failover { .. }
            )
        });
        if net.sync_flows(d) {
            // Only an agent is silent: the instances still replicate both ways.
            w.agent_down[ai(d)] = true;
        } else {
            w.up[ai(d)] = false;
            sim.world.up[ai(o)] = false;
        }
        w.ack_log = Some(Vec::new());
        sim.world.ack_log = Some(Vec::new());
        Some(w)
    } else {
        None
    };
    let holding = holders(&sim.world, other.as_ref(), d);
    let clients_at = sim
        .world
        .control
        .and_then(|c| sim.world.insts.get(&c))
        .map(|i| i.appliance)
        .unwrap_or(d);
    let note = match kind {
        FaultKind::PartitionPeers => format!("{d} and {o} cut from each other"),
        FaultKind::IsolatePrimary => "primary cut from its peer and the witness".to_string(),
        FaultKind::IsolateSecondary => "secondary cut from its peer and the witness".to_string(),
        FaultKind::OneWayPrimary => "traffic from the primary to the secondary dropped".to_string(),
        FaultKind::IsolateWitness => "both appliances cut from the witness".to_string(),
        _ => format!("the driving agent on the {d} paused"),
    };
    let witness = |a: ApplianceId| {
        if net.witness_reaches(a) {
            "reaches"
        } else {
            "is cut from"
        }
    };
    let note = format!(
        "{note} until tick {}; the primary {} the witness, the secondary {} it",
        tick + CUT_TICKS,
        witness(ApplianceId::Primary),
        witness(ApplianceId::Secondary)
    );
    sim.split = Some(Split {
        kind,
        net,
        driver: d,
        cut_tick: tick,
        heal_tick: tick + CUT_TICKS,
        mirror: sim.engine.snapshot(),
        checker: sim.checker.clone(),
        other,
        rival: None,
        driver_drives: true,
        fork_acked: sim.world.acked,
        fork_control: sim.world.control,
        clients_at,
        holding,
        gave_up: [false; 2],
        healed: false,
        report: SplitReport {
            cut_tick: tick,
            heal_tick: tick + CUT_TICKS,
            address_holders_max: holding.iter().filter(|h| **h).count(),
            ..SplitReport::default()
        },
    });
    Some(note)
}

/// Which fronts hold the address: on each side, the front of the side's own appliance while
/// the side's instance in control is there and up.
fn holders(main: &World, other: Option<&World>, d: ApplianceId) -> [bool; 2] {
    let holds = |w: &World, a: ApplianceId| {
        w.control
            .is_some_and(|c| w.inst_up(c) && w.insts[&c].appliance == a)
    };
    let mut h = [false; 2];
    match other {
        Some(ow) => {
            h[ai(d)] = holds(main, d);
            h[ai(d.other())] = holds(ow, d.other());
        }
        None => {
            for a in ApplianceId::ALL {
                h[ai(a)] = holds(main, a);
            }
        }
    }
    h
}

/// One tick while the split lasts (instead of the single driver's world tick and `Tick`).
pub(super) fn run_tick(sim: &mut Sim, tick: u64) {
    let Some(mut sp) = sim.split.take() else {
        return;
    };
    let d = sp.driver;
    let o = d.other();
    let paused = sp.net.paused() == Some(d);
    if tick == sp.cut_tick + sim.peer_detect_ticks {
        if sp.driver_drives && !paused && !sp.net.hears(d, o) {
            sim.record(format!("the {d} agent stops hearing its peer"));
            sim.feed(Event::ApplianceLost { appliance: o });
        }
        if sp.other.is_some() && !sp.net.hears(o, d) {
            restore_rival(sim, &mut sp);
        }
    }
    if tick >= sp.heal_tick {
        heal(sim, sp, tick);
        return;
    }
    step_down_on_hearing(sim, &mut sp);
    if let Some(w) = sp.other.as_mut() {
        w.now_tick = tick;
    }
    if !paused {
        let client = sp.clients_at == d || sp.other.is_none();
        sim.run_world_with(client, sp.driver_drives);
        if sp.driver_drives {
            sim.feed(Event::Tick);
        }
    }
    run_other(sim, &mut sp);
    if sp.rival.is_some() {
        feed_rival(sim, &mut sp, Event::Tick);
        if sp.driver_drives && !paused {
            sp.report.split_ticks += 1;
        }
    }
    follow_address(&mut sp, &sim.world, tick);
    sim.split = Some(sp);
}

/// The other agent restores the engine from its mirror and drives.
fn restore_rival(sim: &mut Sim, sp: &mut Split) {
    let d = sp.driver;
    match Engine::restore(sp.mirror.clone()) {
        Ok(engine) => {
            let cmds = engine.in_flight_commands();
            sp.rival = Some(Rival {
                engine,
                checker: sp.checker.clone(),
            });
            after_rival(sim, sp, &cmds);
            record_rival(sim, sp, format!(
                "the {} agent stops hearing the driver: restores the engine from its mirror and drives",
                d.other()
            ));
            feed_rival(sim, sp, Event::ApplianceLost { appliance: d });
        }
        Err(e) => sim.violations.push(SimViolation::RestoreFailed {
            error: e.to_string(),
        }),
    }
}

fn record_rival(sim: &mut Sim, sp: &Split, note: String) {
    if let Some(r) = &sp.rival {
        sim.record_state(
            r.engine.state(),
            format!("[{} driver] {note}", sp.driver.other()),
        );
    }
}

fn feed_rival(sim: &mut Sim, sp: &mut Split, e: Event) {
    let Some(r) = sp.rival.as_mut() else { return };
    let cmds = r.engine.handle(e);
    after_rival(sim, sp, &cmds);
}

/// Checks the rival's transition, executes its commands on its side (fences also on the
/// driver's side when ops still cross that way), and records its reports.
fn after_rival(sim: &mut Sim, sp: &mut Split, cmds: &[Command]) {
    let d = sp.driver;
    let Some(r) = sp.rival.as_mut() else { return };
    let found = r.checker.observe(r.engine.state(), cmds);
    sim.violations
        .extend(found.into_iter().map(SimViolation::from));
    let step = r.engine.step();
    let crosses = sp.net.hears(d, d.other()) && sp.net.paused() != Some(d);
    let now = sim.world.now_tick;
    let seeded = sim.seeded;
    if let Some(w) = sim.witness.as_mut() {
        for c in cmds {
            if let Command::Witness { change } = c {
                w.request(d.other(), change.clone(), now, seeded);
            }
        }
    }
    if let Some(w) = sp.other.as_mut() {
        for c in cmds {
            w.execute(c, step);
            if let Command::Fence { instance, epoch } = c {
                if crosses {
                    if let Some(i) = sim.world.insts.get_mut(instance) {
                        if i.appliance == d {
                            i.fenced_below = i.fenced_below.max(*epoch);
                        }
                    }
                }
            }
        }
    }
    for c in cmds {
        if let Command::Report { progress } = c {
            if let Some(note) = super::report::note(progress) {
                record_rival(sim, sp, note);
            }
        }
    }
    if cmds.iter().any(|c| matches!(c, Command::StandDown { .. })) {
        record_rival(
            sim,
            sp,
            "the witness records the other appliance's decision: stands down and gives up the address".into(),
        );
        sp.rival = None;
        sp.gave_up[ai(d.other())] = true;
    }
}

/// Delivers a witness answer to the engine driving on `a` (none: it is dropped).
pub(super) fn deliver_on(sim: &mut Sim, sp: &mut Split, a: ApplianceId, e: Event) {
    if a == sp.driver {
        if sp.driver_drives {
            sim.feed(e);
            take_stand_down(sim, sp);
        }
    } else {
        feed_rival(sim, sp, e);
    }
}

/// The driver of [`Sim`] was told to stand down: it stops driving and its front gives up the
/// address (its instances keep running until the heal).
pub(super) fn take_stand_down(sim: &mut Sim, sp: &mut Split) {
    if !std::mem::take(&mut sim.stood_down) {
        return;
    }
    let d = sp.driver;
    if sp.active() && sp.driver_drives {
        sp.driver_drives = false;
        sp.gave_up[ai(d)] = true;
        sim.record(format!(
            "the {d} agent: the witness records the other appliance's decision: stands down and gives up the address"
        ));
    } else {
        sim.record(format!(
            "the {d} agent was told to stand down with no other driver"
        ));
    }
}

/// The other side's world tick: the clients' write if they follow it, replication, the due
/// actions (their events go to the rival engine once it exists).
fn run_other(sim: &mut Sim, sp: &mut Split) {
    let o = sp.driver.other();
    let Some(w) = sp.other.as_mut() else { return };
    w.advance(sp.clients_at == o);
    for _ in 0..EVENTS_PER_TICK {
        let Some(w) = sp.other.as_mut() else { return };
        let Some(action) = w.next_due() else { return };
        let mut events = Vec::new();
        w.run_action(action, &mut events);
        w.note_ha();
        for e in &events {
            if let Event::ControlSwitched { to, epoch } = e {
                sim.control_changes.push(super::ControlChange {
                    tick: w.now_tick,
                    to: *to,
                    epoch: *epoch,
                });
            }
        }
        for e in events {
            feed_rival(sim, sp, e);
        }
    }
    sim.violations.push(SimViolation::EventLoopUnsettled);
}

/// Whether the rival (on `o`) wins against the driver: with the witness, the side whose
/// appliance runs the instance the witness records in control, and has it in control, else the side whose engine has
/// it in control at the recorded epoch (if only one does); otherwise the higher epoch, the
/// primary on a tie.
fn rival_wins(sim: &Sim, sp: &Split) -> bool {
    let Some(r) = &sp.rival else { return false };
    if let Some(w) = &sim.witness {
        let rec = &w.record.record;
        let o = sp.driver.other();
        // The side's own appliance runs the recorded instance, in control.
        let runs = |w: &World, a: ApplianceId| {
            rec.in_control
                .is_some_and(|c| w.control == Some(c) && w.inst_up(c) && w.insts[&c].appliance == a)
        };
        let theirs = sp.other.as_ref().is_some_and(|w| runs(w, o));
        if theirs != runs(&sim.world, sp.driver) {
            return theirs;
        }
        // The engine has the recorded instance in control, up, at the recorded epoch.
        let recorded = |st: &EngineState| {
            rec.in_control.is_some()
                && st.pair.control().map(|c| c.id) == rec.in_control
                && st.pair.epoch == rec.epoch
        };
        let theirs = recorded(r.engine.state());
        if theirs != recorded(sim.engine.state()) {
            return theirs;
        }
    }
    let (mine, theirs) = (sim.engine.state().pair.epoch, r.engine.state().pair.epoch);
    theirs > mine || (theirs == mine && sp.driver.other() == ApplianceId::Primary)
}

/// An agent that hears the other one driving applies the daemon's rule at once.
fn step_down_on_hearing(sim: &mut Sim, sp: &mut Split) {
    if sp.rival.is_none() || !sp.driver_drives {
        return;
    }
    let d = sp.driver;
    let o = d.other();
    let paused = sp.net.paused() == Some(d);
    if !paused && sp.net.hears(d, o) && rival_wins(sim, sp) {
        sp.driver_drives = false;
        sim.record(format!(
            "the {d} agent hears the {o} agent drive at a higher epoch: steps down"
        ));
    } else if sp.net.hears(o, d) && !rival_wins(sim, sp) {
        record_rival(sim, sp, format!("hears the {d} agent drive: steps down"));
        sp.rival = None;
    }
}

/// Announcements: a side that begins to hold the address announces it and the clients follow
/// it; clients whose side stops holding go to the other holder, if any.
fn follow_address(sp: &mut Split, main: &World, tick: u64) {
    let mut now = holders(main, sp.other.as_ref(), sp.driver);
    for a in ApplianceId::ALL {
        if sp.gave_up[ai(a)] {
            now[ai(a)] = false;
        }
    }
    for a in ApplianceId::ALL {
        if now[ai(a)] && !sp.holding[ai(a)] && sp.clients_at != a {
            sp.clients_at = a;
            sp.report.clients_moved_tick.get_or_insert(tick);
        }
    }
    let c = sp.clients_at;
    if !now[ai(c)] && now[ai(c.other())] {
        sp.clients_at = c.other();
        sp.report.clients_moved_tick.get_or_insert(tick);
    }
    sp.holding = now;
    let n = now.iter().filter(|h| **h).count();
    sp.report.address_holders_max = sp.report.address_holders_max.max(n);
}

/// The heal: the lower epoch steps down, the discarded side's acknowledged writes are counted
/// (and checked against the prediction), and the survivor drives on alone.
fn heal(sim: &mut Sim, mut sp: Split, tick: u64) {
    let d = sp.driver;
    let o = d.other();
    let survivor = match (sp.driver_drives, sp.rival.is_some()) {
        (true, true) if rival_wins(sim, &sp) => o,
        (false, true) => o,
        _ => d,
    };
    let loser = survivor.other();
    sp.report.survivor = survivor.name().to_string();
    let paused = sp.net.paused() == Some(d);
    let Some(other) = sp.other.take() else {
        // The appliances stayed connected: nothing to merge.
        sim.world.ack_log = None;
        sp.healed = true;
        sim.record(format!("fault {} healed", sp.kind.name()));
        sim.split = Some(sp);
        return;
    };
    let main = std::mem::replace(&mut sim.world, World::steady(0));
    // A pause leaves one history, the other side's (the paused side acknowledged nothing); a
    // cut leaves the survivor's.
    let (mut world, discarded) = if paused || survivor == o {
        (other, main)
    } else {
        (main, other)
    };
    count_losses(sim, &mut sp, &discarded);
    if sim.witness.is_some() {
        check_overlap(sim, &sp, &world, &discarded);
    }

    if let Some(r) = sp.rival.take() {
        if survivor == o {
            sim.engine = r.engine;
            sim.checker = r.checker;
            sim.driver = o;
        }
    }
    world.now_tick = tick;
    world.agent_down = [false; 2];
    world.ack_log = None;
    world.up[ai(loser)] = false;
    for i in world.insts.values_mut() {
        if i.appliance == loser && i.status != WStatus::Stopped {
            i.status = WStatus::Dead;
        }
    }
    world.schedule(1, Action::Recover(loser));
    sim.world = world;
    sp.healed = true;
    sp.holding = [false; 2];
    sim.record(format!(
        "fault {} healed: the {survivor} agent drives on (epoch {}), the {loser} side steps down; \
         its instances are stopped; {} acknowledged write(s) of the discarded side lost",
        sp.kind.name(),
        sim.engine.state().pair.epoch.0,
        sp.report.discarded_acks
    ));
    if sim.engine.state().pair.is_up(loser) {
        sim.feed(Event::ApplianceLost { appliance: loser });
    }
    sim.split = Some(sp);
}

/// Counts the writes the discarded side acknowledged after the cut; the ones the kind's
/// prediction covers are lost without a witness, any other is a violation.
fn count_losses(sim: &mut Sim, sp: &mut Split, discarded: &World) {
    let mut prev = sp.fork_acked;
    let (mut predicted, mut other) = (0, 0);
    for a in discarded.ack_log.iter().flatten() {
        let n = a.seq.saturating_sub(prev);
        prev = prev.max(a.seq);
        // Alone: the instance in control at the cut only once the HA grace ran out; an
        // instance promoted during the split never had a standby to wait for.
        let covered = sim.witness.is_none()
            && sp.kind.loss_without_witness() == WitnessLoss::AckedAloneByDiscardedSide
            && a.alone
            && (Some(a.by) != sp.fork_control || a.tick >= sp.cut_tick + HA_GRACE_TICKS);
        if covered {
            predicted += n;
        } else {
            other += n;
        }
    }
    sp.report.discarded_acks = predicted + other;
    sim.lost_without_witness += predicted;
    sim.discarded_acked += predicted + other;
    if other > 0 {
        sim.violations.push(SimViolation::UnpredictedLoss {
            fault: sp.kind,
            lost: other,
        });
    }
}

/// With the witness, two instances never acknowledge in the same window: every
/// acknowledgement of the discarded side at or after the survivor's first one is a violation.
fn check_overlap(sim: &mut Sim, sp: &Split, survivor: &World, discarded: &World) {
    let Some(first) = survivor.ack_log.iter().flatten().map(|a| a.tick).min() else {
        return;
    };
    let acks = discarded
        .ack_log
        .iter()
        .flatten()
        .filter(|a| a.tick >= first)
        .count() as u64;
    if acks > 0 {
        sim.violations.push(SimViolation::Overlap {
            fault: sp.kind,
            from_tick: first,
            acks,
        });
    }
}

/// After the heal: records when the pair converged (one instance in control and serving, the
/// address on its appliance only, an in-sync HA standby on the other appliance).
pub(super) fn check_convergence(sim: &mut Sim, tick: u64) {
    let Some(sp) = sim.split.as_mut() else { return };
    if !sp.healed || sp.report.converged_after_ticks.is_some() {
        return;
    }
    let (control, address, ha) = convergence(sim.engine.state(), &sim.world);
    if control && address && ha {
        sp.report.converged_after_ticks = Some(tick - sp.heal_tick);
    }
}

/// The three conditions of convergence: control, address, HA standby.
fn convergence(st: &EngineState, w: &World) -> (bool, bool, bool) {
    let c = w
        .control
        .filter(|c| w.inst_up(*c) && st.pair.in_control == Some(*c));
    let control = c.is_some();
    // After the heal the survivor re-asserts its route: the address is where control is.
    let address = control;
    let ha = c.is_some_and(|c| {
        w.ha_standby()
            .is_some_and(|h| w.insts[&h].appliance != w.insts[&c].appliance)
    });
    (control, address, ha)
}

/// At the end of the run: a split that healed but never converged is a violation.
pub(super) fn finish(sim: &mut Sim) -> Option<SplitReport> {
    let sp = sim.split.as_ref()?;
    let report = sp.report();
    if sp.healed && report.converged_after_ticks.is_none() {
        let (control, address, ha_standby) = convergence(sim.engine.state(), &sim.world);
        sim.violations.push(SimViolation::NotConverged {
            after_ticks: sim.world.now_tick.saturating_sub(sp.heal_tick),
            control,
            address,
            ha_standby,
        });
    }
    if !sp.healed {
        sim.violations.push(SimViolation::NotConverged {
            after_ticks: 0,
            control: false,
            address: false,
            ha_standby: false,
        });
    }
    Some(report)
}
