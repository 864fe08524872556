//! Logical time: the step timer, its bounds, and what happens when a step times out.

use crate::domain::InstanceState;

use super::{Command, Engine, Step};

impl Engine {
    pub(super) fn on_tick(&mut self, out: &mut Vec<Command>) {
        self.st.now_tick += 1;
        let now = self.st.now_tick;
        if let Some(issu) = &self.st.issu {
            if issu.step != Step::Rollback && issu.rollback_deadline_tick.is_some_and(|d| now >= d)
            {
                self.begin_rollback("rollback timer expired before commit".into(), out);
                return;
            }
        }
        if self.st.witness.resend {
            self.resend_witness(out);
        }
        if self.st.stuck.is_none() && self.st.deadline_tick.is_some_and(|d| now >= d) {
            self.on_timeout(out);
        }
    }

    pub(super) fn on_timeout(&mut self, out: &mut Vec<Command>) {
        if self.st.witness.inflight.is_some() {
            // Nothing moves without the witness: ask again and keep waiting.
            self.resend_witness(out);
            self.st.deadline_tick = Some(self.st.now_tick + self.bound());
            return;
        }
        let what = self.waiting_on();
        if !self.st.retried {
            // Commands are idempotent: re-issue once before giving up on the step.
            self.st.retried = true;
            out.extend(self.in_flight_commands());
            self.st.deadline_tick = Some(self.st.now_tick + self.bound());
            return;
        }
        let step = self.step();
        if let Some(p) = self.st.pending.clone() {
            // Outcome of the control change is unknown: move control, with a fresh epoch, to a
            // synchronous standby, which holds every acknowledged write whichever side won.
            self.st.pending = None;
            // Without one, a planned switch whose target is gone is resolved by re-asserting
            // the source at a higher epoch: the target cannot serve, and whatever only it held
            // has no other copy.
            let candidate = self.failover_candidate(&[Some(p.to), p.from]).or_else(|| {
                p.from.filter(|f| {
                    p.planned
                        && self.st.pair.in_control == Some(*f)
                        && self.inst(*f).is_some_and(|i| i.state.is_up())
                        && self.inst(p.to).is_none_or(|t| !t.state.is_up())
                })
            });
            match candidate {
                Some(to) => {
                    let fence: Vec<_> = [Some(p.to), p.from]
                        .into_iter()
                        .flatten()
                        .filter(|f| *f != to)
                        .collect();
                    for f in &fence {
                        self.set_state(*f, InstanceState::Failed);
                    }
                    let failed = self.st.pair.in_control;
                    self.begin_failover(failed, to, &fence, out);
                    self.begin_rollback_if_forward(
                        format!(
                            "control change to {} at {} was not confirmed",
                            p.to, p.epoch
                        ),
                        out,
                    );
                    return;
                }
                None => {
                    self.set_stuck(
                        format!(
                            "control change to {} at {} was not confirmed and no synchronous standby can take over; control is on {} or {}",
                            p.to,
                            p.epoch,
                            p.to,
                            p.from.map(|f| f.to_string()).unwrap_or_else(|| "nobody".into())
                        ),
                        "resume",
                        Some("confirming which instance serves clients"),
                        out,
                    );
                    return;
                }
            }
        }
        match step {
            Some(s) if s != Step::Rollback => {
                self.begin_rollback(format!("step {s} timed out waiting for {what}"), out);
            }
            _ => {
                self.set_stuck(
                    format!("timed out twice waiting for {what}; {}", self.describe()),
                    if step == Some(Step::Rollback) {
                        "rollback"
                    } else {
                        "resume"
                    },
                    None,
                    out,
                );
            }
        }
    }

    /// Timer bound for what is in flight; `None` when nothing is awaited.
    pub(super) fn bound_opt(&self) -> Option<u64> {
        let c = &self.st.config;
        let mut b: Option<u64> = None;
        let mut add = |x: u64| b = Some(b.map_or(x, |y: u64| y.max(x)));
        if self.st.pending.is_some() {
            add(c.switch_timeout_ticks);
        }
        for i in &self.st.pair.instances {
            if !self.st.pair.is_up(i.appliance) {
                continue;
            }
            match i.state {
                InstanceState::Starting => add(c.start_timeout_ticks),
                InstanceState::Syncing => add(c.sync_timeout_ticks),
                InstanceState::Stopping => add(c.stop_timeout_ticks),
                _ => {}
            }
        }
        if let Some(issu) = &self.st.issu {
            if issu.step == Step::Precheck && !issu.verified {
                add(c.verify_timeout_ticks);
            }
        }
        b
    }

    pub(super) fn bound(&self) -> u64 {
        self.bound_opt()
            .unwrap_or(self.st.config.switch_timeout_ticks)
    }

    /// Resets the step timer when progress was made; clears it when nothing is awaited.
    pub(super) fn update_timer(&mut self) {
        let mark = self.progress_fingerprint();
        let bound = self.bound_opt();
        if self.st.stuck.is_some() {
            self.st.deadline_tick = None;
        } else if mark != self.st.progress_mark || self.st.deadline_tick.is_none() {
            self.st.progress_mark = mark;
            self.st.retried = false;
            self.st.deadline_tick = bound.map(|b| self.st.now_tick + b);
        }
        if bound.is_none() {
            self.st.deadline_tick = None;
        }
    }

    pub(super) fn progress_fingerprint(&self) -> u64 {
        // FNV-1a over the observable progress.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut mix = |x: u64| {
            for b in x.to_le_bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        };
        mix(self.step().map_or(99, |s| s as u64));
        mix(self.st.pair.in_control.map_or(0, |i| i.0));
        mix(self.st.pending.as_ref().map_or(0, |p| p.epoch.0));
        for i in &self.st.pair.instances {
            mix(i.id.0);
            mix(i.state as u64);
            mix(i.role as u64);
        }
        h
    }

    pub(super) fn on_step_timeout(&mut self, step: Step, out: &mut Vec<Command>) {
        if self.step() == Some(step) || (self.st.issu.is_none() && step == Step::Rollback) {
            self.on_timeout(out);
        }
    }
}
