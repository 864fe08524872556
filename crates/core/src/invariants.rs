//! Safety invariants of the pair, checked after every engine transition.
//!
//! * [`Invariant::SingleControlPerEpoch`]: at most one instance is in control, and an epoch
//!   is only ever given to one instance.
//! * [`Invariant::EpochsIncrease`]: the epoch never goes back, and every control change is
//!   issued with an epoch above all earlier ones.
//! * [`Invariant::ControlHoldsAcked`]: control only moves to an instance holding every
//!   acknowledged mutation: a failover only targets a `Ready` synchronous standby, a planned
//!   switch only a `Ready` standby (it drains first); the simulated world checks the sequence
//!   numbers themselves with [`check_promotion`].
//! * [`Invariant::MixedWindowProtected`]: while the ISSU moves forward, whenever an
//!   appliance's instances run different versions, the other appliance holds an in-sync
//!   standby able to take over.
//! * [`Invariant::LastCopyPreserved`]: no command stops the instance in control, the target of
//!   a control change, or the last in-sync synchronous standby.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::domain::{ControlEpoch, InstanceId, InstanceState, Role};
use crate::engine::{Command, EngineState, Step};

/// The invariants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Invariant {
    /// At most one instance in control per epoch.
    SingleControlPerEpoch,
    /// Epochs strictly increase.
    EpochsIncrease,
    /// Control only moves to an instance holding every acknowledged mutation.
    ControlHoldsAcked,
    /// Every mixed-version window is covered by an in-sync standby on the other appliance.
    MixedWindowProtected,
    /// No command destroys the last in-sync copy of state.
    LastCopyPreserved,
}

/// A broken invariant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    /// Which one.
    pub invariant: Invariant,
    /// What happened.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.invariant, self.detail)
    }
}

fn v(invariant: Invariant, detail: String) -> Violation {
    Violation { invariant, detail }
}

/// Checks transitions one after the other; remembers epoch owners and the in-sync
/// synchronous standbys of the previous state.
#[derive(Debug, Clone)]
pub struct Checker {
    epoch_owner: BTreeMap<ControlEpoch, InstanceId>,
    last_epoch: ControlEpoch,
    last_cmd_epoch: ControlEpoch,
    prev_ready_ha: Vec<InstanceId>,
}

/// The `Ready` synchronous standbys of `state`.
fn ready_ha(state: &EngineState) -> Vec<InstanceId> {
    state
        .pair
        .instances
        .iter()
        .filter(|i| i.role == Role::HaStandby && i.state == InstanceState::Ready)
        .map(|i| i.id)
        .collect()
}

impl Checker {
    /// Starts checking from `initial`.
    pub fn new(initial: &EngineState) -> Self {
        let mut epoch_owner = BTreeMap::new();
        if let Some(c) = initial.pair.in_control {
            epoch_owner.insert(initial.pair.epoch, c);
        }
        Self {
            epoch_owner,
            last_epoch: initial.pair.epoch,
            last_cmd_epoch: initial.max_epoch,
            prev_ready_ha: ready_ha(initial),
        }
    }

    /// Checks the one transition that starts at `prev` (the engine's own check in debug
    /// builds): besides what [`Checker::new`] knows, the control change in flight at `prev`
    /// owns its epoch, so re-issuing it (after a timeout or a restart) is a replay, not a new
    /// control change at a stale epoch.
    pub fn for_transition(prev: &EngineState) -> Self {
        let mut epoch_owner = BTreeMap::new();
        if let Some(c) = prev.pair.in_control {
            epoch_owner.insert(prev.pair.epoch, c);
        }
        if let Some(p) = &prev.pending {
            epoch_owner.entry(p.epoch).or_insert(p.to);
        }
        Self {
            epoch_owner,
            last_epoch: prev.pair.epoch,
            last_cmd_epoch: prev.max_epoch,
            prev_ready_ha: ready_ha(prev),
        }
    }

    /// Checks the transition from the previous state to `state`, which emitted `commands`.
    pub fn observe(&mut self, state: &EngineState, commands: &[Command]) -> Vec<Violation> {
        let out = self.check(state, commands);
        self.prev_ready_ha = ready_ha(state);
        out
    }

    /// Checks the one transition to `state` and drops the checker.
    pub fn observe_last(mut self, state: &EngineState, commands: &[Command]) -> Vec<Violation> {
        self.check(state, commands)
    }

    fn check(&mut self, state: &EngineState, commands: &[Command]) -> Vec<Violation> {
        let mut out = check_state(state);
        let pair = &state.pair;

        // Single control per epoch.
        if let Some(c) = pair.in_control {
            match self.epoch_owner.get(&pair.epoch) {
                Some(o) if *o != c => out.push(v(
                    Invariant::SingleControlPerEpoch,
                    format!("epoch {} held by {o} and then by {c}", pair.epoch),
                )),
                _ => {
                    self.epoch_owner.insert(pair.epoch, c);
                }
            }
        }
        // Epochs never go back.
        if pair.epoch < self.last_epoch {
            out.push(v(
                Invariant::EpochsIncrease,
                format!("epoch went back from {} to {}", self.last_epoch, pair.epoch),
            ));
        }
        self.last_epoch = self.last_epoch.max(pair.epoch);

        let mut stopped_ha: Vec<InstanceId> = Vec::new();
        for cmd in commands {
            match cmd {
                Command::SwitchControl { to, epoch, .. } | Command::Failover { to, epoch } => {
                    let replay =
                        self.epoch_owner.get(epoch) == Some(to) && *epoch <= self.last_cmd_epoch;
                    if let Some(o) = self.epoch_owner.get(epoch) {
                        if o != to {
                            out.push(v(
                                Invariant::SingleControlPerEpoch,
                                format!("{epoch} given to {to} but already held by {o}"),
                            ));
                        }
                    }
                    if !replay && *epoch <= self.last_cmd_epoch {
                        out.push(v(
                            Invariant::EpochsIncrease,
                            format!(
                                "control change to {to} issued at {epoch}, not above {}",
                                self.last_cmd_epoch
                            ),
                        ));
                    }
                    self.last_cmd_epoch = self.last_cmd_epoch.max(*epoch);
                    self.epoch_owner.insert(*epoch, *to);
                    let target = pair.get(*to);
                    let ok = match cmd {
                        // Re-asserting the instance in control at a higher epoch moves nothing.
                        Command::Failover { .. } if pair.in_control == Some(*to) => true,
                        Command::Failover { .. } => target.is_some_and(|t| {
                            t.role == Role::HaStandby && t.state == InstanceState::Ready
                        }),
                        _ => target.is_some_and(|t| t.is_ready_standby()),
                    };
                    if !ok {
                        out.push(v(
                            Invariant::ControlHoldsAcked,
                            format!(
                                "control moved to {to} which is {:?}",
                                target.map(|t| (t.state, t.role))
                            ),
                        ));
                    }
                }
                Command::StopInstance { instance } => {
                    if pair.in_control == Some(*instance) {
                        out.push(v(
                            Invariant::LastCopyPreserved,
                            format!("stopped {instance}, the instance in control"),
                        ));
                    }
                    if state.pending.as_ref().is_some_and(|p| p.to == *instance) {
                        out.push(v(
                            Invariant::LastCopyPreserved,
                            format!("stopped {instance}, the target of a control change"),
                        ));
                    }
                    if self.prev_ready_ha.contains(instance) {
                        stopped_ha.push(*instance);
                    }
                }
                _ => {}
            }
        }
        if !stopped_ha.is_empty() {
            let remaining = pair
                .instances
                .iter()
                .filter(|i| {
                    i.role == Role::HaStandby
                        && i.state == InstanceState::Ready
                        && !stopped_ha.contains(&i.id)
                })
                .count();
            if remaining == 0 {
                out.push(v(
                    Invariant::LastCopyPreserved,
                    format!("stopped {stopped_ha:?}, the last in-sync synchronous standby"),
                ));
            }
        }
        out
    }
}

/// Invariants that hold on a single state.
pub fn check_state(state: &EngineState) -> Vec<Violation> {
    let mut out = Vec::new();
    let pair = &state.pair;
    let controllers: Vec<InstanceId> = pair
        .instances
        .iter()
        .filter(|i| i.role == Role::InControl && i.state.is_up())
        .map(|i| i.id)
        .collect();
    if controllers.len() > 1 {
        out.push(v(
            Invariant::SingleControlPerEpoch,
            format!("{controllers:?} are all in control"),
        ));
    }
    if let Some(c) = pair.control() {
        if c.role != Role::InControl {
            out.push(v(
                Invariant::SingleControlPerEpoch,
                format!("{} is recorded in control but has role {:?}", c.id, c.role),
            ));
        }
    }
    if state.max_epoch < pair.epoch {
        out.push(v(
            Invariant::EpochsIncrease,
            format!("allocated {} below current {}", state.max_epoch, pair.epoch),
        ));
    }
    let forward = state
        .issu
        .as_ref()
        .is_some_and(|i| i.step != Step::Rollback);
    if forward && state.stuck.is_none() {
        for a in crate::domain::ApplianceId::ALL {
            if pair.is_mixed(a) {
                let covered = pair.live_on(a.other()).any(|i| i.is_ready_standby());
                if !covered {
                    out.push(v(
                        Invariant::MixedWindowProtected,
                        format!(
                            "the {a} appliance runs mixed versions and the {} appliance has no in-sync standby",
                            a.other()
                        ),
                    ));
                }
            }
        }
    }
    out
}

/// World-side check made when an instance is promoted: it must hold every acknowledged
/// mutation.
pub fn check_promotion(to: InstanceId, applied_seq: u64, acked_seq: u64) -> Option<Violation> {
    (applied_seq < acked_seq).then(|| {
        v(
            Invariant::ControlHoldsAcked,
            format!("{to} promoted at seq {applied_seq} but seq {acked_seq} was acknowledged"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::{Checker, Invariant};
    use crate::domain::{ControlEpoch, ImageRef, InstanceId, Pair, Version};
    use crate::engine::{Command, Engine, EngineConfig, PendingSwitch};

    fn failing_over() -> crate::engine::EngineState {
        let image = ImageRef::new("appliance-os", Version::new(1, 0, 0));
        let pair = Pair::steady(image, InstanceId(1), InstanceId(2), ControlEpoch(1));
        let mut st = Engine::new(EngineConfig::default(), pair)
            .expect("consistent")
            .snapshot();
        st.max_epoch = ControlEpoch(2);
        st.pending = Some(PendingSwitch {
            from: Some(InstanceId(1)),
            to: InstanceId(2),
            epoch: ControlEpoch(2),
            planned: false,
        });
        st
    }

    #[test]
    fn a_transition_check_takes_a_reissued_control_change_for_a_replay() {
        let st = failing_over();
        let replay = [Command::Failover {
            to: InstanceId(2),
            epoch: ControlEpoch(2),
        }];
        assert_eq!(
            Checker::for_transition(&st).observe_last(&st, &replay),
            vec![]
        );
    }

    #[test]
    fn a_transition_check_flags_a_control_change_at_a_burned_epoch() {
        let st = failing_over();
        let stale = [Command::Failover {
            to: InstanceId(2),
            epoch: ControlEpoch(1),
        }];
        let v = Checker::for_transition(&st).observe_last(&st, &stale);
        assert!(
            v.iter().any(|v| v.invariant == Invariant::EpochsIncrease),
            "{v:?}"
        );
    }
}
