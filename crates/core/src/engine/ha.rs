//! HA policy: control changes completing, failover when the instance in control is lost.

use crate::domain::{ControlEpoch, Instance, InstanceId, InstanceState, Role};

use super::{report, Command, Engine, Report, Step};

impl Engine {
    pub(super) fn on_switched(
        &mut self,
        to: InstanceId,
        epoch: ControlEpoch,
        out: &mut Vec<Command>,
    ) {
        let Some(p) = self.st.pending.clone() else {
            return;
        };
        if p.to != to || p.epoch != epoch {
            if epoch > self.st.pair.epoch && epoch < p.epoch && self.inst(to).is_some() {
                // A superseded control change that completed anyway (its cancellation could
                // not reach the appliance): control did move. Record the fact; the pending
                // change at the higher epoch fences it when it completes.
                let old = self.st.pair.in_control;
                self.st.pair.epoch = epoch;
                self.st.pair.in_control = Some(to);
                if let Some(i) = self.inst_mut(to) {
                    i.role = Role::InControl;
                    if i.state.is_up() {
                        i.state = InstanceState::Running;
                    }
                }
                if let Some(i) = old.filter(|o| *o != to).and_then(|o| self.inst_mut(o)) {
                    if i.role == Role::InControl {
                        i.role = Role::Spare;
                    }
                }
                let version = self.inst(to).map(|i| i.version()).expect("exists");
                out.push(report(Report::ControlMoved { to, epoch, version }));
            }
            return;
        }
        self.st.pending = None;
        let old = self.st.pair.in_control;
        self.st.pair.epoch = epoch;
        self.st.pair.in_control = Some(to);
        {
            let i = self.inst_mut(to).expect("switch target exists");
            i.role = Role::InControl;
            if i.state.is_up() {
                i.state = InstanceState::Running;
            }
            // Otherwise it failed meanwhile: the HA policy fails over at the next drive.
        }
        let version = self.inst(to).map(|i| i.version()).expect("exists");
        out.push(report(Report::ControlMoved { to, epoch, version }));
        if self.st.pair.control().is_some() && self.st.stuck.take().is_some() {
            // A late confirmation restored control: the engine can go on by itself.
            self.st.retried = false;
        }
        if let Some(old) = old.filter(|o| *o != to) {
            if let Some(i) = self.inst_mut(old) {
                if p.planned && i.state.is_up() {
                    // Drained by the switchover: holds everything, now a local standby.
                    i.role = Role::LocalStandby;
                    i.state = InstanceState::Ready;
                } else if i.role == Role::InControl {
                    i.role = Role::Spare;
                }
            }
        }
        let standbys: Vec<Instance> = self
            .st
            .pair
            .instances
            .iter()
            .filter(|i| i.id != to && i.state.is_up())
            .cloned()
            .collect();
        for s in standbys {
            if p.planned {
                let designated = s.role == Role::HaStandby;
                if s.role == Role::Spare {
                    continue;
                }
                out.push(Command::AttachStandby {
                    standby: s.id,
                    active: to,
                    designated_ha: designated,
                });
            } else {
                // After a failover every survivor resyncs from the new active, synchronously:
                // the reconciler trims the set afterwards.
                let i = self.inst_mut(s.id).expect("exists");
                i.role = Role::HaStandby;
                i.state = InstanceState::Syncing;
                out.push(Command::AttachStandby {
                    standby: s.id,
                    active: to,
                    designated_ha: true,
                });
            }
        }
        if let Some(issu) = self.st.issu.as_mut() {
            if issu.step != Step::Rollback
                && issu.rollback_deadline_tick.is_none()
                && version == issu.target.version
            {
                issu.rollback_deadline_tick = self
                    .st
                    .config
                    .rollback_timer_ticks
                    .map(|t| self.st.now_tick + t);
            }
        }
    }

    /// No failover to `to` starts again for [`super::FAILOVER_RETRY_TICKS`] (one to it failed
    /// or was refused).
    pub(super) fn hold_failovers_to(&mut self, to: InstanceId) {
        self.st.failover_hold = Some((to, self.st.now_tick + super::FAILOVER_RETRY_TICKS));
    }

    /// Failover when the instance in control is gone.
    pub(super) fn ha_policy(&mut self, out: &mut Vec<Command>) {
        if let Some(p) = &self.st.pending {
            let up = |id: InstanceId| self.inst(id).is_some_and(|i| i.state.is_up());
            // A planned switch whose target died is refused by the agent (`SwitchFailed`) or
            // times out; one whose source died, or a failover whose target died, can never
            // complete: supersede it with a failover at a higher epoch.
            let supersede = if p.planned {
                !p.from.is_some_and(up)
            } else {
                !up(p.to)
            };
            if !supersede {
                return;
            }
        } else if self.st.pair.control().is_some() {
            return;
        }
        if self.st.witness.inflight.is_some() {
            // One witness change at a time: decide on its answer.
            return;
        }
        // Keep a superseded control change recorded until a failover replaces it: if no
        // standby can take over, a late confirmation of it must still be applied.
        let pending = self.st.pending.clone();
        let failed = self.st.pair.in_control;
        // A target whose failover just failed or was refused waits for a later tick.
        let now = self.st.now_tick;
        let held = self
            .st
            .failover_hold
            .filter(|(_, until)| now < *until)
            .map(|(i, _)| i);
        let exclude = [failed, pending.as_ref().map(|p| p.to)];
        let candidate = self.failover_candidate(&[exclude[0], exclude[1], held]);
        match candidate {
            Some(to) => {
                self.st.pending = None;
                let fence: Vec<InstanceId> =
                    exclude.into_iter().flatten().filter(|f| *f != to).collect();
                self.begin_failover(failed, to, &fence, out);
                self.begin_rollback_if_forward(
                    format!(
                        "instance in control {} failed; failing over to {to}",
                        failed.map(|f| f.to_string()).unwrap_or_default()
                    ),
                    out,
                );
            }
            // The held target may serve once its hold ends.
            None if held.is_some() => {}
            None => {
                if self.st.stuck.is_none() {
                    self.begin_rollback_if_forward("instance in control failed".into(), out);
                    self.set_stuck(
                        format!(
                            "the instance in control {} failed and no in-sync synchronous standby holds every acknowledged write; {}",
                            failed.map(|f| f.to_string()).unwrap_or_default(),
                            self.describe()
                        ),
                        "resume",
                        Some("restoring an instance that holds every acknowledged write"),
                        out,
                    );
                }
            }
        }
    }

    /// A `Ready` synchronous standby, preferring the other appliance.
    pub(super) fn failover_candidate(&self, exclude: &[Option<InstanceId>]) -> Option<InstanceId> {
        let failed_app = self
            .st
            .pair
            .in_control
            .and_then(|c| self.inst(c))
            .map(|i| i.appliance);
        let mut cands: Vec<&Instance> = self
            .st
            .pair
            .instances
            .iter()
            .filter(|i| {
                i.role == Role::HaStandby
                    && i.state == InstanceState::Ready
                    && self.st.pair.is_up(i.appliance)
                    && !exclude.contains(&Some(i.id))
            })
            .collect();
        cands.sort_by_key(|i| (Some(i.appliance) == failed_app, i.id));
        cands.first().map(|i| i.id)
    }

    /// A `Ready` synchronous standby exists on the appliance not holding control.
    pub(super) fn ha_protected(&self) -> bool {
        let Some(c) = self.st.pair.control() else {
            return false;
        };
        self.st
            .pair
            .live_on(c.appliance.other())
            .any(|i| i.role == Role::HaStandby && i.state == InstanceState::Ready)
    }

    pub(super) fn alloc_epoch(&mut self) -> ControlEpoch {
        self.st.max_epoch = self.st.max_epoch.max(self.st.pair.epoch).next();
        self.st.max_epoch
    }

    pub(super) fn on_switch_failed(
        &mut self,
        to: InstanceId,
        epoch: ControlEpoch,
        reason: &str,
        out: &mut Vec<Command>,
    ) {
        let matches = self
            .st
            .pending
            .as_ref()
            .is_some_and(|p| p.to == to && p.epoch == epoch);
        if matches {
            let failover = self.st.pending.as_ref().is_some_and(|p| !p.planned);
            self.st.pending = None;
            if failover {
                self.hold_failovers_to(to);
            }
            self.st.repair_starts += 1;
            if let Some(i) = self.st.issu.as_mut() {
                i.repair_starts += 1;
            }
            self.begin_rollback_if_forward(
                format!("switch of control to {to} at {epoch} failed: {reason}"),
                out,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::steady;
    use super::super::{Command, Event};
    use crate::domain::{ControlEpoch, InstanceId};

    #[test]
    fn losing_the_instance_in_control_fences_it_and_fails_over_to_the_ha_standby() {
        let mut e = steady();
        let cmds = e.handle(Event::InstanceFailed {
            instance: InstanceId(1),
            reason: "crashed".into(),
        });
        assert_eq!(
            cmds,
            vec![
                Command::Fence {
                    instance: InstanceId(1),
                    epoch: ControlEpoch(2)
                },
                Command::Failover {
                    to: InstanceId(2),
                    epoch: ControlEpoch(2)
                },
            ]
        );
    }

    #[test]
    fn a_failover_that_is_already_in_flight_is_not_issued_again() {
        let mut e = steady();
        e.handle(Event::HeartbeatLost {
            instance: InstanceId(1),
        });
        let cmds = e.handle(Event::HeartbeatLost {
            instance: InstanceId(1),
        });
        assert_eq!(cmds, vec![]);
        assert_eq!(
            e.state().pending.as_ref().map(|p| (p.to, p.epoch)),
            Some((InstanceId(2), ControlEpoch(2)))
        );
    }
}
