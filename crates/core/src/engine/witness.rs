//! The witness rules (with [`EngineConfig::witness`](super::EngineConfig::witness)): every
//! control change and every standby given up is first decided at the witness, by one
//! [`WitnessChange`] at a time.
//!
//! * A failover asks [`WitnessChange::Promote`]; `Fence` and `Failover` are issued only once
//!   it is granted, at the epoch the witness granted.
//! * A planned switch asks [`WitnessChange::Switch`]; `SwitchControl` follows the grant.
//! * After every transition, [`Engine::witness_reconcile`] brings the record's sync set to the
//!   standbys the instance in control waits for: a standby that became ready is added; one the
//!   engine wrote off is removed, and only then is the instance in control told
//!   ([`Command::StandbyGone`]) that it may acknowledge without it.
//! * A refusal that shows the other appliance decided (a later epoch, or the instance this
//!   engine meant to replace still in control) deposes the engine: it fences its own instance
//!   in control and asks the driver to stand down ([`Command::StandDown`]).
//! * A change that gets no answer is asked again, as it is, at the next tick: the engine makes
//!   no control change while the witness is unreachable.

use std::collections::BTreeSet;

use crate::domain::{InstanceId, InstanceState, Role};
use crate::witness::{WitnessChange, WitnessRecord, WitnessRefusal};

use super::{report, Command, Engine, EngineState, PendingSwitch, Report};

/// A restored engine does not re-send an unanswered [`WitnessChange::AddStandby`]: it claims
/// the standby holds every write of the instance in control *from now on*, which only the
/// engine that saw it in sync may claim, and only then. Re-sent later by another agent (one
/// that restored the journal's mirror after a cut), it could land after the instance in
/// control dropped that standby and acknowledged writes without it, and make it promotable.
/// The engine asks again once it sees the standby in sync itself.
pub(super) fn forget_unconfirmed_claims(st: &mut EngineState) {
    if matches!(st.witness.inflight, Some(WitnessChange::AddStandby { .. })) {
        st.witness.inflight = None;
        st.witness.resend = false;
    }
}

impl Engine {
    /// Whether the engine decides through a witness.
    pub(super) fn witnessed(&self) -> bool {
        self.st.config.witness
    }

    /// A witness change is asked and not answered yet: no other may start (one at a time).
    pub(super) fn witness_busy(&self) -> bool {
        self.witnessed() && self.st.witness.inflight.is_some()
    }

    /// Asks the witness for `change` (the engine waits for the answer).
    pub(super) fn ask_witness(&mut self, change: WitnessChange, out: &mut Vec<Command>) {
        debug_assert!(
            self.st.witness.inflight.is_none(),
            "one witness change at a time"
        );
        self.st.witness.inflight = Some(change.clone());
        self.st.witness.resend = false;
        out.push(Command::Witness { change });
    }

    /// Re-sends an unanswered change (at a tick, or when the step timer fires).
    pub(super) fn resend_witness(&mut self, out: &mut Vec<Command>) {
        if let Some(change) = self.st.witness.inflight.clone() {
            self.st.witness.resend = false;
            out.push(Command::Witness { change });
        }
    }

    /// The witness change the engine waits for, as a command to (re-)execute.
    pub fn witness_in_flight(&self) -> Option<Command> {
        self.st
            .witness
            .inflight
            .clone()
            .map(|change| Command::Witness { change })
    }

    /// Starts a planned switch of control: directly, or through the witness.
    pub(super) fn begin_planned_switch(
        &mut self,
        from: InstanceId,
        to: InstanceId,
        out: &mut Vec<Command>,
    ) {
        let epoch = self.alloc_epoch();
        self.st.pending = Some(PendingSwitch {
            from: Some(from),
            to,
            epoch,
            planned: true,
        });
        if self.witnessed() {
            self.st.witness.granted = false;
            let change = WitnessChange::Switch {
                from,
                epoch_from: self.st.pair.epoch,
                to,
                epoch,
            };
            self.ask_witness(change, out);
        } else {
            out.push(Command::SwitchControl { from, to, epoch });
        }
    }

    /// Starts a failover to `to` replacing `failed` (fencing `fence`): directly, or through
    /// the witness.
    pub(super) fn begin_failover(
        &mut self,
        failed: Option<InstanceId>,
        to: InstanceId,
        fence: &[InstanceId],
        out: &mut Vec<Command>,
    ) {
        let epoch = self.alloc_epoch();
        for f in fence {
            if let Some(i) = self.inst_mut(*f) {
                if i.state.is_up() {
                    i.state = InstanceState::Failed;
                }
            }
        }
        self.st.pending = Some(PendingSwitch {
            from: failed,
            to,
            epoch,
            planned: false,
        });
        if self.witnessed() {
            self.st.witness.granted = false;
            self.ask_witness(
                WitnessChange::Promote {
                    to,
                    at_least: epoch,
                },
                out,
            );
        } else {
            for f in fence {
                out.push(Command::Fence {
                    instance: *f,
                    epoch,
                });
            }
            out.push(Command::Failover { to, epoch });
        }
    }

    pub(super) fn on_witness_granted(
        &mut self,
        change: WitnessChange,
        record: WitnessRecord,
        out: &mut Vec<Command>,
    ) {
        if self.st.witness.inflight.as_ref() != Some(&change) {
            return; // An answer to a change re-sent and already answered.
        }
        self.st.witness.inflight = None;
        self.st.witness.resend = false;
        if record.epoch > self.st.max_epoch {
            self.st.max_epoch = record.epoch;
        }
        self.st.witness.known = Some(record.clone());
        match change {
            WitnessChange::Promote { to, .. } => {
                let Some(_) = self
                    .st
                    .pending
                    .as_mut()
                    .filter(|p| p.to == to && !p.planned)
                else {
                    return;
                };
                if !self.inst(to).is_some_and(|i| i.state.is_up()) {
                    // Granted, but the standby was lost meanwhile: promote nobody now (the
                    // record names it; a later change is decided against that).
                    self.st.pending = None;
                    self.st.witness.granted = false;
                    return;
                }
                let p = self.st.pending.as_mut().expect("checked above");
                p.epoch = record.epoch;
                let p = p.clone();
                self.st.witness.granted = true;
                // The instance replaced is fenced first (best effort, bounded by the driver);
                // anything else of an older epoch is fenced by the sync frames' epoch.
                if let Some(f) = p.from.filter(|f| *f != to) {
                    out.push(Command::Fence {
                        instance: f,
                        epoch: p.epoch,
                    });
                }
                out.push(Command::Failover { to, epoch: p.epoch });
            }
            WitnessChange::Switch { from, to, .. } => {
                if self
                    .st
                    .pending
                    .as_ref()
                    .is_none_or(|p| p.to != to || !p.planned)
                {
                    return;
                }
                let up = |id: InstanceId| self.inst(id).is_some_and(|i| i.state.is_up());
                if !up(from) || !up(to) {
                    // The switch landed at the witness but can no longer be carried out (its
                    // source or target was lost meanwhile): the record names `to`, so what
                    // this engine holds in control is fenced, and a failover through the
                    // witness replaces it.
                    self.st.pending = None;
                    self.st.witness.granted = false;
                    if let Some(i) = self.inst_mut(from).filter(|i| i.state.is_up()) {
                        i.state = InstanceState::Failed;
                        out.push(Command::Fence {
                            instance: from,
                            epoch: record.epoch,
                        });
                    }
                    return;
                }
                let p = self.st.pending.as_mut().expect("checked above");
                p.epoch = record.epoch;
                let epoch = p.epoch;
                self.st.witness.granted = true;
                out.push(Command::SwitchControl { from, to, epoch });
            }
            WitnessChange::DropStandbys {
                active, standbys, ..
            } => {
                for standby in standbys {
                    out.push(Command::StandbyGone { active, standby });
                    // A standby attached as synchronous again while the drop was asked (it
                    // syncs, or is ready, as HA standby) is attached again after being given
                    // up: the instance in control waits for it once it is in sync, before the
                    // witness lists it again.
                    let reattach = self.inst(standby).is_some_and(|i| {
                        i.role == Role::HaStandby
                            && matches!(i.state, InstanceState::Syncing | InstanceState::Ready)
                            && self.st.pair.is_up(i.appliance)
                    });
                    if reattach {
                        out.push(Command::AttachStandby {
                            standby,
                            active,
                            designated_ha: true,
                        });
                    }
                }
            }
            WitnessChange::Init { .. } | WitnessChange::AddStandby { .. } => {}
        }
    }

    pub(super) fn on_witness_refused(
        &mut self,
        change: WitnessChange,
        refusal: WitnessRefusal,
        out: &mut Vec<Command>,
    ) {
        if self.st.witness.inflight.as_ref() != Some(&change) {
            return;
        }
        self.st.witness.inflight = None;
        self.st.witness.resend = false;
        let record = match &refusal {
            WitnessRefusal::Superseded { record, .. } => Some(record.clone()),
            WitnessRefusal::Invalid(_) => None,
        };
        let ours = self
            .st
            .witness
            .known
            .as_ref()
            .map_or(self.st.pair.epoch, |k| k.epoch.max(self.st.pair.epoch));
        let deposed = record.as_ref().is_some_and(|r| {
            r.epoch > ours
                || (matches!(change, WitnessChange::Promote { .. })
                    && r.in_control.is_some()
                    && r.in_control == self.st.pair.in_control)
        });
        // The control change asked for does not happen.
        if matches!(
            change,
            WitnessChange::Promote { .. } | WitnessChange::Switch { .. }
        ) {
            self.st.pending = None;
            self.st.witness.granted = false;
        }
        if let WitnessChange::Promote { to, .. } = &change {
            // Asked again at once, it would be refused again, in a loop at the witness's
            // round trip.
            self.hold_failovers_to(*to);
        }
        if let (true, Some(r)) = (deposed, record.clone()) {
            self.stand_down(r, out);
            return;
        }
        if let Some(r) = record {
            self.st.witness.known = Some(r);
        }
        if self.st.stuck.is_none() {
            self.set_stuck(
                format!(
                    "the witness refused {} ({refusal}); the engine makes no control change the witness has not granted",
                    change.name()
                ),
                "resume",
                Some("checking the witness's record of the pair (`hitless status`)"),
                out,
            );
        }
    }

    pub(super) fn on_witness_unreachable(&mut self, change: WitnessChange) {
        if self.st.witness.inflight.as_ref() == Some(&change) {
            self.st.witness.resend = true;
        }
    }

    /// Another appliance decided: fence what this engine has in control and stop driving.
    fn stand_down(&mut self, record: WitnessRecord, out: &mut Vec<Command>) {
        if let Some(c) = self
            .st
            .pair
            .in_control
            .filter(|c| record.in_control != Some(*c))
        {
            if self.inst(c).is_some_and(|i| i.state.is_up()) {
                out.push(Command::Fence {
                    instance: c,
                    epoch: record.epoch,
                });
            }
        }
        out.push(report(Report::Step {
            step: self.step().unwrap_or(super::Step::Rollback),
            detail: format!(
                "standing down: the witness records {record}, decided by the other appliance"
            ),
        }));
        out.push(Command::StandDown {
            epoch: record.epoch,
            in_control: record.in_control,
        });
        self.st.witness.known = Some(record.clone());
        self.st.witness.deposed = Some(record.clone());
        // Nothing moves here any more: say why, in case the other appliance cannot drive
        // either (its promotion granted but never carried out, say).
        if self.st.stuck.is_none() {
            self.set_stuck(
                format!(
                    "standing down: the witness records {record}, decided by the other appliance; this engine no longer drives"
                ),
                "resume",
                Some("checking that the other appliance's agent drives (`hitless status` there)"),
                out,
            );
        }
    }

    /// The standbys the instance in control waits for, as the engine counts them.
    fn synchronous_standbys(&self) -> BTreeSet<InstanceId> {
        let control = self.st.pair.in_control;
        self.st
            .pair
            .instances
            .iter()
            .filter(|i| {
                Some(i.id) != control
                    && i.role == Role::HaStandby
                    && i.state == InstanceState::Ready
                    && self.st.pair.is_up(i.appliance)
            })
            .map(|i| i.id)
            .collect()
    }

    /// Brings the witness's record in line with the pair (one change at a time): the first
    /// record, standbys to drop (before their instance in control stops waiting for them),
    /// standbys to add.
    pub(super) fn witness_reconcile(&mut self, out: &mut Vec<Command>) {
        if !self.witnessed()
            || self.st.witness.inflight.is_some()
            || self.st.witness.deposed.is_some()
            || self.st.pending.is_some()
        {
            return;
        }
        let Some(c) = self.st.pair.control().map(|c| c.id) else {
            return;
        };
        let epoch = self.st.pair.epoch;
        let Some(known) = self.st.witness.known.clone() else {
            self.ask_witness(
                WitnessChange::Init {
                    in_control: c,
                    epoch,
                },
                out,
            );
            return;
        };
        if known.in_control != Some(c) || known.epoch != epoch {
            return; // Settled by the answer to the control change, or stuck on a refusal.
        }
        let waits_for = self.synchronous_standbys();
        let gone: BTreeSet<InstanceId> = known
            .sync_set
            .iter()
            .filter(|s| !waits_for.contains(s))
            .copied()
            .collect();
        if !gone.is_empty() {
            self.ask_witness(
                WitnessChange::DropStandbys {
                    active: c,
                    epoch,
                    standbys: gone,
                },
                out,
            );
            return;
        }
        if let Some(s) = waits_for.iter().find(|s| !known.sync_set.contains(s)) {
            self.ask_witness(
                WitnessChange::AddStandby {
                    active: c,
                    epoch,
                    standby: *s,
                },
                out,
            );
        }
    }

    /// The witness still lists a standby the instance in control no longer waits for: it
    /// must be dropped (and the instance in control told) before a planned switch starts.
    /// The switch's quiesce waits for every write to be durable, which a write waiting for
    /// that standby never is until the drop: asked first, the switch would time out, and the
    /// drop would wait for the switch (one witness change at a time).
    pub(super) fn witness_drop_due(&self) -> bool {
        if !self.witnessed() || self.st.witness.deposed.is_some() {
            return false;
        }
        let (Some(c), Some(known)) = (
            self.st.pair.control().map(|c| c.id),
            self.st.witness.known.as_ref(),
        ) else {
            return false;
        };
        if known.in_control != Some(c) || known.epoch != self.st.pair.epoch {
            return false;
        }
        let waits_for = self.synchronous_standbys();
        known.sync_set.iter().any(|s| !waits_for.contains(s))
    }

    /// What the engine waits for at the witness, for status and stuck reports.
    pub(super) fn witness_waiting_on(&self) -> Option<String> {
        let change = self.st.witness.inflight.as_ref()?;
        Some(format!(
            "the witness to answer {}{}",
            change.name(),
            if self.st.witness.resend {
                " (unreachable; asking again)"
            } else {
                ""
            }
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::steady_with_witness;
    use super::super::{Command, Event};
    use crate::domain::{ControlEpoch, InstanceId};
    use crate::witness::{Versioned, WitnessChange, WitnessRecord};

    /// Answers every `Witness` command from `witness`, as a driver would, until quiet.
    fn serve(
        e: &mut super::Engine,
        witness: &mut Versioned,
        mut cmds: Vec<Command>,
    ) -> Vec<Command> {
        let mut seen = Vec::new();
        for _ in 0..16 {
            let mut next = Vec::new();
            for c in cmds {
                if let Command::Witness { change } = &c {
                    let ev = if change.already_applied(&witness.record) && witness.revision > 0 {
                        Event::WitnessGranted {
                            change: change.clone(),
                            record: witness.record.clone(),
                        }
                    } else {
                        match change.apply(witness) {
                            Ok(r) => {
                                *witness = Versioned {
                                    record: r.clone(),
                                    revision: witness.revision + 1,
                                };
                                Event::WitnessGranted {
                                    change: change.clone(),
                                    record: r,
                                }
                            }
                            Err(refusal) => Event::WitnessRefused {
                                change: change.clone(),
                                refusal,
                            },
                        }
                    };
                    next.extend(e.handle(ev));
                }
                seen.push(c);
            }
            if next.is_empty() {
                break;
            }
            cmds = next;
        }
        seen
    }

    fn settled() -> (super::Engine, Versioned) {
        let mut e = steady_with_witness();
        let mut w = Versioned::default();
        let cmds = e.handle(Event::Tick);
        serve(&mut e, &mut w, cmds);
        assert_eq!(w.record.in_control, Some(InstanceId(1)));
        assert!(
            w.record.sync_set.contains(&InstanceId(2)),
            "the ready HA standby joins the sync set: {}",
            w.record
        );
        (e, w)
    }

    #[test]
    fn a_failover_waits_for_the_witness_before_promoting() {
        let (mut e, mut w) = settled();
        let cmds = e.handle(Event::InstanceFailed {
            instance: InstanceId(1),
            reason: "crashed".into(),
        });
        assert!(
            !cmds.iter().any(|c| matches!(c, Command::Failover { .. })),
            "no failover before the witness grants it: {cmds:?}"
        );
        let all = serve(&mut e, &mut w, cmds);
        assert!(all.iter().any(|c| matches!(
            c,
            Command::Failover {
                to: InstanceId(2),
                ..
            }
        )));
        assert_eq!(w.record.in_control, Some(InstanceId(2)));
        assert!(w.record.epoch > ControlEpoch(1));
    }

    #[test]
    fn a_standby_the_witness_still_lists_is_a_drop_due_and_the_reconciler_asks_it() {
        let (mut e, _w) = settled();
        assert!(!e.witness_drop_due());
        // The HA standby died: the witness still lists it.
        let i2 =
            e.st.pair
                .instances
                .iter_mut()
                .find(|i| i.id == InstanceId(2))
                .unwrap();
        i2.state = crate::domain::InstanceState::Failed;
        assert!(e.witness_drop_due());
        let mut out = Vec::new();
        e.witness_reconcile(&mut out);
        assert!(out.iter().any(|c| matches!(
            c,
            Command::Witness {
                change: WitnessChange::DropStandbys { .. }
            }
        )));
    }

    fn promotes_asked(cmds: &[Command]) -> usize {
        cmds.iter()
            .filter(|c| {
                matches!(
                    c,
                    Command::Witness {
                        change: WitnessChange::Promote { .. }
                    }
                )
            })
            .count()
    }

    #[test]
    fn a_granted_failover_that_fails_is_not_asked_again_in_a_loop() {
        let (mut e, mut w) = settled();
        let cmds = e.handle(Event::InstanceFailed {
            instance: InstanceId(1),
            reason: "crashed".into(),
        });
        let all = serve(&mut e, &mut w, cmds);
        let epoch = all
            .iter()
            .find_map(|c| match c {
                Command::Failover {
                    to: InstanceId(2),
                    epoch,
                } => Some(*epoch),
                _ => None,
            })
            .expect("failover granted");
        // The failover cannot be carried out (the standby's appliance is unreachable): the
        // witness names it in control, so promoting it again is refused, every time.
        let cmds = e.handle(Event::SwitchFailed {
            to: InstanceId(2),
            epoch,
            reason: "the secondary appliance is unreachable".into(),
        });
        let all = serve(&mut e, &mut w, cmds);
        assert_eq!(promotes_asked(&all), 0, "asked again at once: {all:?}");
        // Asked again once per FAILOVER_RETRY_TICKS, refused, and held again.
        let mut asked = Vec::new();
        for _ in 0..3 * super::super::FAILOVER_RETRY_TICKS {
            let cmds = e.handle(Event::Tick);
            asked.push(promotes_asked(&serve(&mut e, &mut w, cmds)));
        }
        let total: usize = asked.iter().sum();
        assert!((1..=3).contains(&total), "{asked:?}");
        assert!(asked.iter().all(|n| *n <= 1), "{asked:?}");
    }

    #[test]
    fn the_instance_in_control_gives_up_a_standby_only_after_the_witness_dropped_it() {
        let (mut e, mut w) = settled();
        let cmds = e.handle(Event::ApplianceLost {
            appliance: crate::domain::ApplianceId::Secondary,
        });
        assert!(
            !cmds
                .iter()
                .any(|c| matches!(c, Command::StandbyGone { .. })),
            "{cmds:?}"
        );
        let all = serve(&mut e, &mut w, cmds);
        let drop_at = all
            .iter()
            .position(|c| {
                matches!(
                    c,
                    Command::Witness {
                        change: WitnessChange::DropStandbys { .. }
                    }
                )
            })
            .expect("drop asked");
        let gone_at = all
            .iter()
            .position(|c| {
                matches!(
                    c,
                    Command::StandbyGone {
                        standby: InstanceId(2),
                        ..
                    }
                )
            })
            .expect("standby given up");
        assert!(drop_at < gone_at);
        assert!(w.record.sync_set.is_empty());
    }

    #[test]
    fn losing_the_race_to_the_witness_deposes_the_engine() {
        let (mut e, mut w) = settled();
        // The other appliance's agent promoted the standby first.
        w.record = WitnessChange::Promote {
            to: InstanceId(2),
            at_least: ControlEpoch(2),
        }
        .apply(&w)
        .unwrap();
        w.revision += 1;
        let cmds = e.handle(Event::ApplianceLost {
            appliance: crate::domain::ApplianceId::Secondary,
        });
        let all = serve(&mut e, &mut w, cmds);
        assert!(all.iter().any(|c| matches!(
            c,
            Command::Fence {
                instance: InstanceId(1),
                ..
            }
        )));
        assert!(all.iter().any(|c| matches!(c, Command::StandDown { .. })));
        assert!(
            !all.iter().any(|c| matches!(c, Command::StandbyGone { .. })),
            "a deposed instance in control never acknowledges alone"
        );
        let stuck = e.state().stuck.as_ref().expect("a deposed engine says so");
        assert!(stuck.reason.contains("standing down"), "{}", stuck.reason);
        // Resuming it would clear the report and drive nothing: refused, the report stays.
        let cmds = e.handle(Event::Resume);
        assert!(
            cmds.iter().any(|c| matches!(
                c,
                Command::Report {
                    progress: super::super::Report::Rejected { .. }
                }
            )),
            "{cmds:?}"
        );
        assert!(e.state().stuck.is_some());
    }

    #[test]
    fn a_promotion_refused_because_the_old_instance_in_control_kept_it_stands_down() {
        let (mut e, mut w) = settled();
        // The instance in control dropped the standby first (its appliance saw ours lost).
        w.record.sync_set.clear();
        w.revision += 1;
        let cmds = e.handle(Event::ApplianceLost {
            appliance: crate::domain::ApplianceId::Primary,
        });
        let all = serve(&mut e, &mut w, cmds);
        assert!(!all.iter().any(|c| matches!(c, Command::Failover { .. })));
        assert!(all.iter().any(|c| matches!(c, Command::StandDown { .. })));
        assert_eq!(w.record.in_control, Some(InstanceId(1)));
    }

    #[test]
    fn an_unreachable_witness_is_asked_again_and_nothing_moves_meanwhile() {
        let (mut e, _w) = settled();
        let cmds = e.handle(Event::InstanceFailed {
            instance: InstanceId(1),
            reason: "crashed".into(),
        });
        let change = cmds
            .iter()
            .find_map(|c| match c {
                Command::Witness { change } => Some(change.clone()),
                _ => None,
            })
            .expect("promotion asked");
        let cmds = e.handle(Event::WitnessUnreachable {
            change: change.clone(),
            detail: "timed out".into(),
        });
        assert!(cmds.is_empty(), "{cmds:?}");
        for _ in 0..50 {
            let cmds = e.handle(Event::Tick);
            assert!(!cmds.iter().any(|c| matches!(c, Command::Failover { .. })));
            if cmds
                .iter()
                .any(|c| matches!(c, Command::Witness { change: x } if *x == change))
            {
                return;
            }
        }
        panic!("the unanswered change was never asked again");
    }

    /// Marks `id` failed in the engine's view (lost between a request and its answer).
    fn lose(e: &mut super::Engine, id: InstanceId) {
        e.st.pair
            .instances
            .iter_mut()
            .find(|i| i.id == id)
            .expect("known instance")
            .state = crate::domain::InstanceState::Failed;
    }

    fn grant(w: &mut Versioned, change: &WitnessChange) -> Event {
        let record = change.apply(w).expect("granted");
        *w = Versioned {
            record: record.clone(),
            revision: w.revision + 1,
        };
        Event::WitnessGranted {
            change: change.clone(),
            record,
        }
    }

    #[test]
    fn a_switch_granted_after_its_target_was_lost_is_not_carried_out() {
        let (mut e, mut w) = settled();
        let mut out = Vec::new();
        e.begin_planned_switch(InstanceId(1), InstanceId(2), &mut out);
        let Some(Command::Witness { change }) = out.first().cloned() else {
            panic!("the switch is asked first: {out:?}");
        };
        lose(&mut e, InstanceId(2));
        let cmds = e.handle(grant(&mut w, &change));
        assert!(
            !cmds
                .iter()
                .any(|c| matches!(c, Command::SwitchControl { .. })),
            "control sent to a lost instance: {cmds:?}"
        );
        assert!(
            cmds.iter().any(|c| matches!(
                c,
                Command::Fence {
                    instance: InstanceId(1),
                    ..
                }
            )),
            "the record no longer names the instance in control: it is fenced: {cmds:?}"
        );
    }

    #[test]
    fn a_promotion_granted_after_its_target_was_lost_is_not_carried_out() {
        let (mut e, mut w) = settled();
        let cmds = e.handle(Event::InstanceFailed {
            instance: InstanceId(1),
            reason: "crashed".into(),
        });
        let Some(change) = cmds.iter().find_map(|c| match c {
            Command::Witness { change } => Some(change.clone()),
            _ => None,
        }) else {
            panic!("promotion asked: {cmds:?}");
        };
        lose(&mut e, InstanceId(2));
        let cmds = e.handle(grant(&mut w, &change));
        assert!(
            !cmds.iter().any(|c| matches!(c, Command::Failover { .. })),
            "{cmds:?}"
        );
    }

    #[test]
    fn no_planned_switch_starts_while_another_witness_change_is_asked() {
        let (mut e, _w) = settled();
        // A standby change is in flight (its answer not back yet).
        let mut out = Vec::new();
        e.ask_witness(
            WitnessChange::DropStandbys {
                active: InstanceId(1),
                epoch: ControlEpoch(1),
                standbys: [InstanceId(9)].into(),
            },
            &mut out,
        );
        assert!(e.witness_busy());
        let prog = e.ensure_switched(Some(InstanceId(2)), &mut out);
        assert!(matches!(prog, super::super::Prog::Wait));
        assert!(e.st.pending.is_none(), "a switch began: {:?}", e.st.pending);
    }

    #[test]
    fn a_restored_engine_does_not_resend_an_unanswered_add_standby() {
        let (mut e, mut w) = settled();
        // The instance in control dropped its standby at the witness...
        let drop = WitnessChange::DropStandbys {
            active: InstanceId(1),
            epoch: ControlEpoch(1),
            standbys: [InstanceId(2)].into(),
        };
        grant(&mut w, &drop);
        // ...after a journal was mirrored with an add of that standby still unanswered.
        e.st.witness.inflight = None;
        let mut out = Vec::new();
        e.ask_witness(
            WitnessChange::AddStandby {
                active: InstanceId(1),
                epoch: ControlEpoch(1),
                standby: InstanceId(2),
            },
            &mut out,
        );
        let restored = super::Engine::restore(e.snapshot()).expect("restores");
        let cmds = restored.in_flight_commands();
        assert!(
            !cmds.iter().any(|c| matches!(
                c,
                Command::Witness {
                    change: WitnessChange::AddStandby { .. }
                }
            )),
            "{cmds:?}"
        );
        assert!(restored.state().witness.inflight.is_none());
        assert!(!w.record.sync_set.contains(&InstanceId(2)));
    }

    #[test]
    fn a_standby_in_sync_again_when_its_drop_is_granted_is_still_waited_for() {
        let (mut e, mut w) = settled();
        // The standby fell out of sync and its drop was asked...
        let drop = WitnessChange::DropStandbys {
            active: InstanceId(1),
            epoch: ControlEpoch(1),
            standbys: [InstanceId(2)].into(),
        };
        e.st.witness.inflight = None;
        let mut out = Vec::new();
        e.ask_witness(drop.clone(), &mut out);
        // ...but it is a ready synchronous standby again when the grant arrives.
        assert!(e.synchronous_standbys().contains(&InstanceId(2)));
        let cmds = e.handle(grant(&mut w, &drop));
        let gone = cmds.iter().rposition(|c| {
            matches!(
                c,
                Command::StandbyGone {
                    standby: InstanceId(2),
                    ..
                }
            )
        });
        let attached = cmds.iter().rposition(|c| {
            matches!(
                c,
                Command::AttachStandby {
                    standby: InstanceId(2),
                    designated_ha: true,
                    ..
                }
            )
        });
        assert!(
            gone.is_none_or(|g| attached.is_some_and(|a| a > g)),
            "the instance in control was told to stop waiting for an in-sync standby: {cmds:?}"
        );
        // It is listed again at the witness.
        let all = serve(&mut e, &mut w, cmds);
        assert!(w.record.sync_set.contains(&InstanceId(2)), "{all:?}");
    }

    #[test]
    fn without_a_record_nobody_is_promoted() {
        let mut e = steady_with_witness();
        let mut w = Versioned {
            record: WitnessRecord::default(),
            revision: 0,
        };
        // The instance in control fails before the first record was written.
        let mut cmds = e.handle(Event::InstanceFailed {
            instance: InstanceId(1),
            reason: "crashed".into(),
        });
        cmds.extend(e.handle(Event::Tick));
        let all = serve(&mut e, &mut w, cmds);
        assert!(
            !all.iter().any(|c| matches!(c, Command::Failover { .. })),
            "{all:?}"
        );
    }
}
