//! The convergent reconciler: rollback to the source version, and steady-state HA repair.

use crate::domain::{ApplianceId, ImageRef, Instance, InstanceState, Role};

use super::{p_wait, report, Command, Engine, Outcome, Prog, Report, Step};

impl Engine {
    /// Rollback reconciler to the source version.
    pub(super) fn drive_rollback(&mut self, out: &mut Vec<Command>) {
        let Some(issu) = self.st.issu.clone() else {
            return;
        };
        match self.reconcile(&issu.source, true, out) {
            Prog::Done => {
                self.st.issu = None;
                let outcome = Outcome::RolledBack {
                    version: issu.source.version,
                    reason: issu.rollback_reason.unwrap_or_default(),
                };
                out.push(report(Report::Finished(outcome.clone())));
                self.st.last_outcome = Some(outcome);
            }
            Prog::Wait => {}
            Prog::Fail(reason) => {
                self.set_stuck(reason, "rollback", None, out);
            }
        }
    }

    /// Steady-state HA repair: keep an in-sync HA standby of the version in control.
    pub(super) fn steady_repair(&mut self, out: &mut Vec<Command>) {
        let Some(image) = self.st.pair.control().map(|c| c.image.clone()) else {
            return;
        };
        match self.reconcile(&image, false, out) {
            Prog::Fail(reason) => self.set_stuck(reason, "resume", None, out),
            Prog::Done => self.st.repair_starts = 0,
            Prog::Wait => {}
        }
    }

    /// Converges to: `image` in control, a `Ready` synchronous standby of `image` on the other
    /// appliance, every other instance stopped.
    pub(super) fn reconcile(
        &mut self,
        image: &ImageRef,
        in_issu: bool,
        out: &mut Vec<Command>,
    ) -> Prog {
        if self.st.pending.is_some() {
            return Prog::Wait;
        }
        let Some(c) = self.st.pair.control().cloned() else {
            return Prog::Wait;
        };
        let cap = self.st.config.max_instances_per_appliance;
        if c.image != *image {
            // Move control back to `image` by a planned (draining) switchover.
            let mut ready: Vec<&Instance> = self
                .st
                .pair
                .instances
                .iter()
                .filter(|i| i.image == *image && i.is_ready_standby())
                .collect();
            ready.sort_by_key(|i| (i.appliance != c.appliance, i.id));
            if let Some(to) = ready.first().map(|i| i.id) {
                if self.witness_busy() || self.witness_drop_due() {
                    // One witness change at a time, and a standby given up is dropped first.
                    return Prog::Wait;
                }
                let attempts = if in_issu {
                    self.st.issu.as_ref().map_or(0, |i| i.repair_starts)
                } else {
                    self.st.repair_starts
                };
                if attempts > self.st.config.max_repair_starts {
                    return Prog::Fail(format!(
                        "control could not be moved back to {} after {attempts} attempts; {}",
                        image.version,
                        self.describe()
                    ));
                }
                self.begin_planned_switch(c.id, to, out);
                return Prog::Wait;
            }
            let in_progress = self
                .st
                .pair
                .instances
                .iter()
                .filter(|i| {
                    i.image == *image
                        && i.id != c.id
                        && matches!(
                            i.state,
                            InstanceState::Starting
                                | InstanceState::Running
                                | InstanceState::Syncing
                        )
                })
                .map(|i| i.id)
                .min();
            if let Some(id) = in_progress {
                return match self.ensure_synced(Some(id), false, out) {
                    Prog::Fail(_) => Prog::Wait,
                    p => p_wait(p),
                };
            }
            let target_app = [c.appliance.other(), c.appliance]
                .into_iter()
                .find(|a| self.st.pair.is_up(*a));
            let Some(app) = target_app else {
                return Prog::Wait;
            };
            return self.start_repair_instance(app, image, false, cap, in_issu, out);
        }
        let b = c.appliance.other();
        let ha = self
            .st
            .pair
            .live_on(b)
            .filter(|i| i.image == *image && i.state.is_up())
            .min_by_key(|i| {
                (
                    i.state != InstanceState::Ready,
                    i.role != Role::HaStandby,
                    i.id,
                )
            })
            .cloned();
        let ha_id = match ha {
            Some(h) if h.state == InstanceState::Ready && h.role == Role::HaStandby => h.id,
            Some(h) => {
                return p_wait(self.ensure_synced(Some(h.id), true, out));
            }
            None => {
                if let Some(starting) = self
                    .st
                    .pair
                    .live_on(b)
                    .find(|i| i.image == *image && i.state == InstanceState::Starting)
                {
                    let _ = starting;
                    return Prog::Wait;
                }
                if !self.st.pair.is_up(b) {
                    return Prog::Wait;
                }
                return self.start_repair_instance(b, image, true, cap, in_issu, out);
            }
        };
        // Retire everything else.
        let others: Vec<Instance> = self
            .st
            .pair
            .instances
            .iter()
            .filter(|i| {
                i.id != c.id
                    && i.id != ha_id
                    && i.state != InstanceState::Stopped
                    && self.st.pair.is_up(i.appliance)
            })
            .cloned()
            .collect();
        let mut all_done = true;
        for o in others {
            all_done = false;
            if o.state != InstanceState::Stopping {
                self.stop(o.id, out);
            }
        }
        let down_leftovers = self
            .st
            .pair
            .instances
            .iter()
            .any(|i| i.state != InstanceState::Stopped && !self.st.pair.is_up(i.appliance));
        if all_done && !down_leftovers {
            Prog::Done
        } else {
            Prog::Wait
        }
    }

    pub(super) fn start_repair_instance(
        &mut self,
        app: ApplianceId,
        image: &ImageRef,
        designated: bool,
        cap: usize,
        in_issu: bool,
        out: &mut Vec<Command>,
    ) -> Prog {
        let live: Vec<Instance> = self.st.pair.live_on(app).cloned().collect();
        if live.len() >= cap {
            if live.iter().any(|i| i.state == InstanceState::Stopping) {
                return Prog::Wait;
            }
            // Free a slot without touching control or the last in-sync synchronous copy.
            let ready_ha = self
                .st
                .pair
                .instances
                .iter()
                .filter(|i| i.role == Role::HaStandby && i.state == InstanceState::Ready)
                .count();
            let control = self.st.pair.in_control;
            let victim = live
                .iter()
                .filter(|i| Some(i.id) != control)
                .filter(|i| {
                    !(i.role == Role::HaStandby && i.state == InstanceState::Ready && ready_ha <= 1)
                })
                .min_by_key(|i| {
                    (
                        i.image == *image,
                        i.state == InstanceState::Ready,
                        i.role == Role::HaStandby,
                        std::cmp::Reverse(i.id),
                    )
                })
                .map(|i| i.id);
            return match victim {
                Some(v) => {
                    self.stop(v, out);
                    Prog::Wait
                }
                None => Prog::Fail(format!(
                    "no free instance slot on the {app} appliance without stopping the instance in control or the last in-sync copy; {}",
                    self.describe()
                )),
            };
        }
        let starts = if in_issu {
            &mut self.issu_mut().repair_starts
        } else {
            &mut self.st.repair_starts
        };
        *starts += 1;
        if *starts > self.st.config.max_repair_starts {
            return Prog::Fail(format!(
                "started {} instances of {} without getting one in sync; {}",
                self.st.config.max_repair_starts,
                image.version,
                self.describe()
            ));
        }
        let id = self.new_instance(app, image.clone(), out);
        if designated {
            if let Some(i) = self.inst_mut(id) {
                i.role = Role::HaStandby;
            }
        }
        Prog::Wait
    }

    pub(super) fn begin_rollback_if_forward(&mut self, reason: String, out: &mut Vec<Command>) {
        if matches!(self.step(), Some(s) if s != Step::Rollback) {
            self.begin_rollback(reason, out);
        }
    }

    pub(super) fn begin_rollback(&mut self, reason: String, out: &mut Vec<Command>) {
        let now = self.st.now_tick;
        let Some(issu) = self.st.issu.as_mut() else {
            return;
        };
        if issu.step == Step::Rollback {
            return;
        }
        issu.step = Step::Rollback;
        issu.step_entered_tick = now;
        issu.rollback_deadline_tick = None;
        issu.rollback_reason = Some(reason.clone());
        issu.verify_sent = false;
        out.push(report(Report::Step {
            step: Step::Rollback,
            detail: reason,
        }));
        self.st.retried = false;
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{source, started};
    use super::super::{Command, Event, Outcome, Report, Step};
    use crate::domain::InstanceId;

    #[test]
    fn operator_rollback_after_the_extras_started_stops_them() {
        let mut e = started();
        e.handle(Event::SyncReady {
            instance: InstanceId(2),
            seq: 7,
            digest_ok: true,
        });
        assert_eq!(e.step(), Some(Step::StartExtras));
        let cmds = e.handle(Event::Rollback);
        assert_eq!(
            cmds,
            vec![
                Command::Report {
                    progress: Report::Accepted {
                        request: "rollback".into()
                    }
                },
                Command::Report {
                    progress: Report::Step {
                        step: Step::Rollback,
                        detail: "operator rollback".into()
                    }
                },
                Command::StopInstance {
                    instance: InstanceId(3)
                },
                Command::StopInstance {
                    instance: InstanceId(4)
                },
            ]
        );
    }

    #[test]
    fn rollback_finishes_once_only_control_and_its_ha_standby_are_left() {
        let mut e = started();
        let cmds = e.handle(Event::Rollback);
        assert_eq!(
            cmds,
            vec![
                Command::Report {
                    progress: Report::Accepted {
                        request: "rollback".into()
                    }
                },
                Command::Report {
                    progress: Report::Step {
                        step: Step::Rollback,
                        detail: "operator rollback".into()
                    }
                },
                Command::Report {
                    progress: Report::Finished(Outcome::RolledBack {
                        version: source().version,
                        reason: "operator rollback".into()
                    })
                },
            ]
        );
        assert_eq!(e.step(), None);
    }
}
