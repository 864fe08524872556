//! Observations of instances: failures, sync readiness, falling out of sync.

use crate::domain::{ApplianceId, InstanceId, InstanceState, Role};

use super::{Command, Engine, Step};

impl Engine {
    pub(super) fn on_failed(&mut self, id: InstanceId, reason: &str, out: &mut Vec<Command>) {
        let Some(inst) = self.inst(id) else { return };
        if matches!(inst.state, InstanceState::Stopped | InstanceState::Failed) {
            return;
        }
        if inst.state == InstanceState::Stopping {
            // It was being stopped anyway: it is gone, as asked. (A request to it that failed
            // because it was going away, a readiness poll racing the stop, must not turn a
            // planned stop into a failure that rolls the ISSU back.)
            self.set_state(id, InstanceState::Stopped);
            return;
        }
        self.set_state(id, InstanceState::Failed);
        if let Some(i) = self.inst_mut(id) {
            if i.role != Role::InControl {
                i.role = Role::Spare;
            }
        }
        self.begin_rollback_if_forward(format!("instance {id} failed: {reason}"), out);
    }

    pub(super) fn on_sync_ready(
        &mut self,
        id: InstanceId,
        seq: u64,
        digest_ok: bool,
        out: &mut Vec<Command>,
    ) {
        let max_lag = self.st.config.max_lag;
        let max_resyncs = self.st.config.max_resyncs;
        let control = self.st.pair.in_control;
        let Some(inst) = self.inst(id).cloned() else {
            return;
        };
        let ok = digest_ok && inst.lag <= max_lag;
        match inst.state {
            InstanceState::Syncing | InstanceState::Ready if ok => {
                let i = self.inst_mut(id).expect("exists");
                i.state = InstanceState::Ready;
                i.verified_seq = Some(seq);
                i.applied_seq = i.applied_seq.max(seq);
            }
            InstanceState::Syncing | InstanceState::Ready => {
                let resyncs = inst.resyncs + 1;
                let i = self.inst_mut(id).expect("exists");
                i.resyncs = resyncs;
                i.state = InstanceState::Syncing;
                if resyncs > max_resyncs {
                    self.on_failed(id, "digest mismatch after repeated resyncs", out);
                } else if let Some(active) = control {
                    out.push(Command::AttachStandby {
                        standby: id,
                        active,
                        designated_ha: inst.role == Role::HaStandby,
                    });
                }
            }
            _ => {}
        }
        let now_ready = self
            .inst(id)
            .is_some_and(|i| i.state == InstanceState::Ready);
        if let Some(issu) = self.st.issu.as_mut() {
            if issu.step == Step::Precheck
                && issu.slots.b_orig == Some(id)
                && issu.verify_sent
                && digest_ok
                && now_ready
            {
                issu.verified = true;
            }
        }
    }

    pub(super) fn on_out_of_sync(&mut self, id: InstanceId, out: &mut Vec<Command>) {
        let Some(inst) = self.inst(id).cloned() else {
            return;
        };
        if !matches!(inst.state, InstanceState::Ready | InstanceState::Syncing) {
            return;
        }
        let resyncs = inst.resyncs + 1;
        if let Some(i) = self.inst_mut(id) {
            i.state = InstanceState::Syncing;
            i.resyncs = resyncs;
        }
        if resyncs > self.st.config.max_resyncs {
            self.on_failed(id, "fell out of sync repeatedly", out);
            return;
        }
        if let Some(active) = self.st.pair.in_control {
            out.push(Command::AttachStandby {
                standby: id,
                active,
                designated_ha: inst.role == Role::HaStandby,
            });
        }
    }

    pub(super) fn on_instance_started(&mut self, instance: InstanceId, out: &mut Vec<Command>) {
        match self.inst(instance).map(|i| i.state) {
            Some(InstanceState::Starting) => self.set_state(instance, InstanceState::Running),
            Some(InstanceState::Stopping | InstanceState::Stopped | InstanceState::Failed) => {
                // A late start of an instance we gave up on: stop it again.
                self.set_state(instance, InstanceState::Stopping);
                out.push(Command::StopInstance { instance });
            }
            _ => {}
        }
    }

    pub(super) fn on_heartbeat_lost(&mut self, instance: InstanceId, out: &mut Vec<Command>) {
        self.on_failed(instance, "heartbeat lost", out);
    }

    pub(super) fn on_instance_stopped(&mut self, instance: InstanceId, out: &mut Vec<Command>) {
        if let Some(i) = self.inst_mut(instance) {
            let was_live = i.state.is_up() || i.state == InstanceState::Starting;
            i.state = InstanceState::Stopped;
            i.role = Role::Spare;
            if was_live {
                // An unexpected stop is a failure of that instance.
                self.on_failed(instance, "exited", out);
                if let Some(i) = self.inst_mut(instance) {
                    i.state = InstanceState::Stopped;
                }
            }
        }
    }

    pub(super) fn on_sync_progress(&mut self, instance: InstanceId, applied_seq: u64, lag: u64) {
        if let Some(i) = self.inst_mut(instance) {
            i.applied_seq = i.applied_seq.max(applied_seq);
            i.lag = lag;
        }
    }

    pub(super) fn on_appliance_lost(&mut self, appliance: ApplianceId, out: &mut Vec<Command>) {
        self.st.pair.set_up(appliance, false);
        let ids: Vec<_> = self
            .st
            .pair
            .instances
            .iter()
            .filter(|i| i.appliance == appliance && i.state != InstanceState::Stopped)
            .map(|i| i.id)
            .collect();
        for id in ids {
            self.on_failed(id, &format!("{appliance} appliance lost"), out);
        }
        self.begin_rollback_if_forward(format!("{appliance} appliance lost"), out);
    }

    pub(super) fn on_appliance_recovered(&mut self, appliance: ApplianceId) {
        self.st.pair.set_up(appliance, true);
        for i in &mut self.st.pair.instances {
            if i.appliance == appliance && i.state != InstanceState::Stopped {
                i.state = InstanceState::Stopped;
                i.role = Role::Spare;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::steady;
    use super::super::{Command, Engine, Event};
    use crate::domain::{InstanceId, InstanceState};

    #[test]
    fn an_instance_that_fails_while_it_is_stopped_is_stopped_not_failed() {
        // A request to an instance being stopped (a readiness poll racing the stop) fails as
        // it goes away: the stop asked for is done, no failure to roll back for.
        let mut st = steady().snapshot();
        st.pair.get_mut(InstanceId(2)).expect("exists").state = InstanceState::Stopping;
        let mut e = Engine::restore(st).expect("restores");
        let cmds = e.handle(Event::InstanceFailed {
            instance: InstanceId(2),
            reason: "the control channel is closed".into(),
        });
        // Nothing reported (no failure, no rollback); the HA policy may replace the standby.
        assert!(
            !cmds.iter().any(|c| matches!(c, Command::Report { .. })),
            "{cmds:?}"
        );
        assert_eq!(
            e.state().pair.get(InstanceId(2)).map(|i| i.state),
            Some(InstanceState::Stopped)
        );
    }
}
