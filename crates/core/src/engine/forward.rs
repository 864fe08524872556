//! Forward progress of the ISSU steps.

use crate::domain::{ApplianceId, ImageRef, InstanceId, InstanceState, Role};

use super::step::step_detail;
use super::{both, report, then, Command, Engine, Prog, Report, Slots, Step};

impl Engine {
    pub(super) fn drive_forward(&mut self, step: Step, out: &mut Vec<Command>) {
        let Some(issu) = self.st.issu.clone() else {
            return;
        };
        let a = issu.first;
        let b = a.other();
        let src = issu.source.clone();
        let tgt = issu.target.clone();
        let s = issu.slots.clone();
        let prog = match step {
            Step::Precheck => {
                if issu.verified {
                    Prog::Done
                } else if !issu.verify_sent {
                    match (s.b_orig, self.st.pair.in_control) {
                        (Some(standby), Some(active)) => {
                            out.push(Command::VerifyStandby { standby, active });
                            self.issu_mut().verify_sent = true;
                            Prog::Wait
                        }
                        _ => Prog::Fail("pre-check lost the HA standby".into()),
                    }
                } else {
                    Prog::Wait
                }
            }
            Step::StartExtras => both(
                self.ensure_started(|s| &mut s.a_extra, a, &src, out),
                self.ensure_started(|s| &mut s.b_extra, b, &src, out),
            ),
            Step::SyncExtras => both(
                self.ensure_synced(s.a_extra, false, out),
                self.ensure_synced(s.b_extra, false, out),
            ),
            Step::PrimaryStartNew => then(self.ensure_stopped(s.a_extra, out), || {
                self.ensure_started(|s| &mut s.a_new, a, &tgt, out)
            }),
            Step::PrimarySyncNew => self.ensure_synced(s.a_new, false, out),
            Step::PrimarySwitch => self.ensure_switched(s.a_new, out),
            Step::PrimaryMixed | Step::SecondaryMixed => {
                if self.st.now_tick >= issu.step_entered_tick + self.st.config.soak_ticks {
                    Prog::Done
                } else {
                    Prog::Wait
                }
            }
            Step::PrimaryUpgradeOld => then(self.ensure_stopped(s.a_orig, out), || {
                self.ensure_started(|s| &mut s.a_upgraded, a, &tgt, out)
            }),
            Step::PrimarySyncOld => self.ensure_synced(s.a_upgraded, false, out),
            Step::SecondaryStartNew => then(self.ensure_stopped(s.b_extra, out), || {
                self.ensure_started(|s| &mut s.b_new, b, &tgt, out)
            }),
            Step::SecondarySyncNew => self.ensure_synced(s.b_new, false, out),
            Step::SecondarySwitch => then(self.ensure_synced(s.b_new, true, out), || {
                self.ensure_synced(s.b_orig, false, out)
            }),
            Step::SecondaryUpgradeOld => then(self.ensure_stopped(s.b_orig, out), || {
                self.ensure_started(|s| &mut s.b_upgraded, b, &tgt, out)
            }),
            Step::SecondarySyncOld => self.ensure_synced(s.b_upgraded, false, out),
            Step::Retire => both(
                self.ensure_stopped(s.a_upgraded, out),
                self.ensure_stopped(s.b_upgraded, out),
            ),
            Step::AwaitCommit => Prog::Wait,
            Step::Rollback => return,
        };
        match prog {
            Prog::Wait => {}
            Prog::Fail(reason) => self.begin_rollback(reason, out),
            Prog::Done => {
                // Forward progress only while an in-sync HA standby protects the pair.
                if !self.ha_protected() || self.st.pending.is_some() {
                    return;
                }
                if let Some(next) = step.next() {
                    let now = self.st.now_tick;
                    let issu = self.issu_mut();
                    issu.step = next;
                    issu.step_entered_tick = now;
                    out.push(report(Report::Step {
                        step: next,
                        detail: step_detail(next).into(),
                    }));
                }
            }
        }
    }

    pub(super) fn ensure_started(
        &mut self,
        slot: fn(&mut Slots) -> &mut Option<InstanceId>,
        app: ApplianceId,
        image: &ImageRef,
        out: &mut Vec<Command>,
    ) -> Prog {
        let existing = *slot(&mut self.issu_mut().slots);
        match existing {
            None => {
                if !self.st.pair.is_up(app) {
                    return Prog::Fail(format!("the {app} appliance is down"));
                }
                let id = self.new_instance(app, image.clone(), out);
                *slot(&mut self.issu_mut().slots) = Some(id);
                Prog::Wait
            }
            Some(id) => match self.inst(id).map(|i| i.state) {
                Some(InstanceState::Starting) => Prog::Wait,
                Some(s) if s.is_up() => Prog::Done,
                _ => Prog::Fail(format!("new instance {id} did not start")),
            },
        }
    }

    pub(super) fn ensure_synced(
        &mut self,
        id: Option<InstanceId>,
        designated: bool,
        out: &mut Vec<Command>,
    ) -> Prog {
        let Some(id) = id else {
            return Prog::Fail("missing instance".into());
        };
        let Some(active) = self.st.pair.control().map(|c| c.id) else {
            return Prog::Wait;
        };
        let Some(inst) = self.inst(id).cloned() else {
            return Prog::Fail(format!("unknown instance {id}"));
        };
        let want_role = if designated {
            Role::HaStandby
        } else {
            Role::LocalStandby
        };
        match inst.state {
            InstanceState::Starting => Prog::Wait,
            InstanceState::Running => {
                self.attach(id, active, designated, out);
                Prog::Wait
            }
            InstanceState::Syncing => Prog::Wait,
            InstanceState::Ready if inst.role == want_role => Prog::Done,
            InstanceState::Ready => {
                self.attach(id, active, designated, out);
                Prog::Wait
            }
            _ => Prog::Fail(format!("instance {id} is {:?}", inst.state)),
        }
    }

    pub(super) fn ensure_stopped(
        &mut self,
        id: Option<InstanceId>,
        out: &mut Vec<Command>,
    ) -> Prog {
        let Some(id) = id else {
            return Prog::Fail("missing instance".into());
        };
        match self.inst(id).map(|i| i.state) {
            Some(InstanceState::Stopped) | None => Prog::Done,
            Some(InstanceState::Stopping) => Prog::Wait,
            Some(InstanceState::Failed) => Prog::Fail(format!("instance {id} failed")),
            Some(_) => {
                if Some(id) == self.st.pair.in_control {
                    return Prog::Fail(format!("refusing to stop {id}: it is in control"));
                }
                self.stop(id, out);
                Prog::Wait
            }
        }
    }

    pub(super) fn ensure_switched(
        &mut self,
        to: Option<InstanceId>,
        out: &mut Vec<Command>,
    ) -> Prog {
        let Some(to) = to else {
            return Prog::Fail("missing instance".into());
        };
        if self.st.pair.in_control == Some(to) {
            return Prog::Done;
        }
        if self.st.pending.is_some() || self.witness_busy() || self.witness_drop_due() {
            return Prog::Wait;
        }
        let Some(from) = self.st.pair.control().map(|c| c.id) else {
            return Prog::Wait;
        };
        match self.inst(to).map(|i| i.state) {
            Some(InstanceState::Ready) => {}
            Some(InstanceState::Syncing) => return Prog::Wait,
            _ => return Prog::Fail(format!("switch target {to} is not in sync")),
        }
        if !self.ha_protected() {
            return Prog::Wait;
        }
        self.begin_planned_switch(from, to, out);
        Prog::Wait
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{source, started};
    use super::super::{step::step_detail, Command, Event, Report, Step};
    use crate::domain::{ApplianceId, InstanceId};

    #[test]
    fn a_verified_ha_standby_completes_precheck_and_starts_the_extras() {
        let mut e = started();
        let cmds = e.handle(Event::SyncReady {
            instance: InstanceId(2),
            seq: 7,
            digest_ok: true,
        });
        assert_eq!(
            cmds,
            vec![
                Command::Report {
                    progress: Report::Step {
                        step: Step::StartExtras,
                        detail: step_detail(Step::StartExtras).into()
                    }
                },
                Command::StartInstance {
                    instance: InstanceId(3),
                    appliance: ApplianceId::Primary,
                    image: source()
                },
                Command::StartInstance {
                    instance: InstanceId(4),
                    appliance: ApplianceId::Secondary,
                    image: source()
                },
            ]
        );
        assert_eq!(e.step(), Some(Step::StartExtras));
    }

    #[test]
    fn a_digest_mismatch_keeps_precheck_and_reattaches_the_standby() {
        let mut e = started();
        let cmds = e.handle(Event::SyncReady {
            instance: InstanceId(2),
            seq: 7,
            digest_ok: false,
        });
        assert_eq!(
            cmds,
            vec![Command::AttachStandby {
                standby: InstanceId(2),
                active: InstanceId(1),
                designated_ha: true
            }]
        );
        assert_eq!(e.step(), Some(Step::Precheck));
    }
}
