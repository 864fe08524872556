//! Operator requests: start, abort, rollback, commit.

use crate::domain::{ApplianceId, ImageRef, InstanceState, Role};

use super::step::step_detail;
use super::{report, Command, CompatVerdict, Engine, IssuState, Outcome, Report, Slots, Step};

impl Engine {
    pub(super) fn on_start(&mut self, target: ImageRef, out: &mut Vec<Command>) {
        let reject = |out: &mut Vec<Command>, reason: String| {
            out.push(report(Report::Rejected {
                request: format!("start {target}"),
                reason,
            }))
        };
        if let Some(i) = &self.st.issu {
            return reject(out, format!("an ISSU is already running (step {})", i.step));
        }
        if let Some(s) = &self.st.stuck {
            return reject(out, format!("the engine is stuck: {}", s.reason));
        }
        if self.st.pending.is_some() {
            return reject(out, "a control change is in flight".into());
        }
        let Some(c) = self.st.pair.control().cloned() else {
            return reject(out, "no instance is in control".into());
        };
        let source = c.image.clone();
        if target.version == source.version {
            return reject(out, format!("{} already runs {}", c.id, source.version));
        }
        match &self.st.compat {
            None => {
                return reject(
                    out,
                    "no compatibility verdict; run the image compatibility check first".into(),
                )
            }
            Some(v) if v.from != source.version || v.to != target.version => {
                return reject(
                    out,
                    format!(
                        "the compatibility verdict is for {} -> {}, not {} -> {}",
                        v.from, v.to, source.version, target.version
                    ),
                )
            }
            Some(v) if !(v.upgrade_ok && v.downgrade_ok) => {
                return reject(
                    out,
                    format!(
                        "image not compatible both ways (upgrade {}, downgrade {}): {}",
                        v.upgrade_ok, v.downgrade_ok, v.detail
                    ),
                )
            }
            Some(_) => {}
        }
        for a in ApplianceId::ALL {
            if !self.st.pair.is_up(a) {
                return reject(out, format!("the {a} appliance is not healthy"));
            }
        }
        let b = c.appliance.other();
        let ha = self.st.pair.live_on(b).find(|i| {
            i.role == Role::HaStandby && i.state == InstanceState::Ready && i.image == source
        });
        let Some(ha) = ha.map(|i| i.id) else {
            return reject(
                out,
                format!(
                    "no in-sync HA standby of {} on the {b} appliance",
                    source.version
                ),
            );
        };
        let live = self
            .st
            .pair
            .instances
            .iter()
            .filter(|i| i.state.is_live())
            .count();
        if live != 2 {
            return reject(
                out,
                format!("expected one instance per appliance, found {live} live instances"),
            );
        }
        out.push(report(Report::Accepted {
            request: format!("start {target}"),
        }));
        self.st.repair_starts = 0;
        self.st.issu = Some(IssuState {
            source,
            target,
            first: c.appliance,
            step: Step::Precheck,
            step_entered_tick: self.st.now_tick,
            slots: Slots {
                a_orig: Some(c.id),
                b_orig: Some(ha),
                ..Slots::default()
            },
            verify_sent: false,
            verified: false,
            rollback_deadline_tick: None,
            rollback_reason: None,
            repair_starts: 0,
        });
        out.push(report(Report::Step {
            step: Step::Precheck,
            detail: step_detail(Step::Precheck).into(),
        }));
    }

    pub(super) fn on_abort(&mut self, out: &mut Vec<Command>) {
        match self.step() {
            None => out.push(report(Report::Rejected {
                request: "abort".into(),
                reason: "no ISSU is running".into(),
            })),
            Some(Step::Rollback) => out.push(report(Report::Rejected {
                request: "abort".into(),
                reason: "the ISSU is already rolling back".into(),
            })),
            Some(s) if s.abortable() => {
                out.push(report(Report::Accepted {
                    request: "abort".into(),
                }));
                self.begin_rollback("operator abort".into(), out);
            }
            Some(s) => out.push(report(Report::Rejected {
                request: "abort".into(),
                reason: format!(
                    "control has moved (or is moving) to the target version at step {s}; use rollback to revert by reverse switchover, or commit"
                ),
            })),
        }
    }

    pub(super) fn on_rollback(&mut self, out: &mut Vec<Command>) {
        match self.step() {
            None => out.push(report(Report::Rejected {
                request: "rollback".into(),
                reason: match &self.st.last_outcome {
                    Some(Outcome::Committed { version }) => format!(
                        "{version} is committed (point of no return passed); going back needs a new ISSU"
                    ),
                    _ => "no ISSU is running".into(),
                },
            })),
            Some(Step::Rollback) => {
                if self.st.stuck.take().is_some() {
                    self.st.retried = false;
                    if let Some(i) = self.st.issu.as_mut() {
                        i.repair_starts = 0;
                    }
                    out.push(report(Report::Accepted {
                        request: "rollback (resume)".into(),
                    }));
                    out.extend(self.in_flight_commands());
                } else {
                    out.push(report(Report::Rejected {
                        request: "rollback".into(),
                        reason: "the ISSU is already rolling back".into(),
                    }))
                }
            }
            Some(_) => {
                out.push(report(Report::Accepted {
                    request: "rollback".into(),
                }));
                self.begin_rollback("operator rollback".into(), out);
            }
        }
    }

    pub(super) fn on_commit(&mut self, out: &mut Vec<Command>) {
        match self.step() {
            Some(Step::AwaitCommit) if self.ha_protected() && self.st.pending.is_none() => {
                let issu = self.st.issu.take().expect("step implies issu");
                out.push(report(Report::Accepted {
                    request: "commit".into(),
                }));
                let outcome = Outcome::Committed {
                    version: issu.target.version,
                };
                out.push(report(Report::Finished(outcome.clone())));
                self.st.last_outcome = Some(outcome);
            }
            Some(Step::AwaitCommit) => out.push(report(Report::Rejected {
                request: "commit".into(),
                reason: "the HA standby is not in sync yet; commit once it is".into(),
            })),
            Some(s) => out.push(report(Report::Rejected {
                request: "commit".into(),
                reason: format!(
                    "commit is accepted at step await-commit, once every instance runs the target; the ISSU is at step {s}"
                ),
            })),
            None => out.push(report(Report::Rejected {
                request: "commit".into(),
                reason: "no ISSU is running".into(),
            })),
        }
    }

    pub(super) fn on_compatibility(&mut self, verdict: CompatVerdict, out: &mut Vec<Command>) {
        out.push(report(Report::Accepted {
            request: format!("compatibility verdict {} -> {}", verdict.from, verdict.to),
        }));
        self.st.compat = Some(verdict);
    }

    pub(super) fn on_resume(&mut self, out: &mut Vec<Command>) {
        if let Some(r) = &self.st.witness.deposed {
            // Resuming would clear the report and drive nothing: the other appliance drives.
            out.push(report(Report::Rejected {
                request: "resume".into(),
                reason: format!(
                    "this engine stood down: the witness records {r}, decided by the other appliance, whose agent drives the pair"
                ),
            }));
            return;
        }
        if self.st.stuck.take().is_some() {
            self.st.retried = false;
            self.st.repair_starts = 0;
            if let Some(i) = self.st.issu.as_mut() {
                i.repair_starts = 0;
            }
            for inst in &mut self.st.pair.instances {
                inst.resyncs = 0;
            }
            out.push(report(Report::Accepted {
                request: "resume".into(),
            }));
            out.extend(self.in_flight_commands());
        } else {
            out.push(report(Report::Rejected {
                request: "resume".into(),
                reason: "the engine is not stuck".into(),
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{started, steady, target, verdict};
    use super::super::{step::step_detail, Command, Event, Report, Step};
    use crate::domain::InstanceId;

    #[test]
    fn start_on_a_ready_pair_enters_precheck_and_verifies_the_ha_standby() {
        let mut e = steady();
        e.handle(verdict());
        let cmds = e.handle(Event::Start { target: target() });
        assert_eq!(
            cmds,
            vec![
                Command::Report {
                    progress: Report::Accepted {
                        request: "start appliance-os:1.1.0".into()
                    }
                },
                Command::Report {
                    progress: Report::Step {
                        step: Step::Precheck,
                        detail: step_detail(Step::Precheck).into()
                    }
                },
                Command::VerifyStandby {
                    standby: InstanceId(2),
                    active: InstanceId(1)
                },
            ]
        );
        assert_eq!(e.step(), Some(Step::Precheck));
    }

    #[test]
    fn a_second_start_is_rejected_and_changes_nothing() {
        let mut e = started();
        let before = e.snapshot();
        let cmds = e.handle(Event::Start { target: target() });
        assert_eq!(
            cmds,
            vec![Command::Report {
                progress: Report::Rejected {
                    request: "start appliance-os:1.1.0".into(),
                    reason: "an ISSU is already running (step precheck)".into()
                }
            }]
        );
        assert_eq!(e.snapshot(), before);
    }
}
