//! The simulated witness (with [`EngineConfig::witness`](crate::engine::EngineConfig::witness)):
//! one record of the pair, shared by both sides of a split, that answers each driver's
//! `Witness` command the way `hitless_witness::change` does (granted if already applied,
//! otherwise decided by [`WitnessChange::apply`] and written), after
//! [`WITNESS_ANSWER_TICKS`] plus jitter, if the asking driver's appliance reaches the witness;
//! otherwise the request times out after [`WITNESS_TIMEOUT_TICKS`] (`WitnessUnreachable`).
//!
//! The record starts as the steady pair's: the instance in control at its epoch, its in-sync
//! synchronous standby in the sync set.

use std::collections::BTreeSet;

use crate::domain::{ApplianceId, ControlEpoch, InstanceId};
use crate::engine::Event;
use crate::witness::{Versioned, WitnessChange, WitnessRecord};

use super::{split, Sim};

/// Ticks a reachable witness takes to answer (plus 0 to 2 ticks of jitter with a seed).
pub const WITNESS_ANSWER_TICKS: u64 = 1;
/// Ticks after which a driver gives up on a request the witness cannot get (its timeout).
pub const WITNESS_TIMEOUT_TICKS: u64 = 3;
/// Most requests in flight at once (both drivers); a request beyond it is dropped, as a full
/// queue of the driver would, and is asked again when its answer does not come.
const MAX_REQUESTS: usize = 32;

/// One request in flight.
#[derive(Debug, Clone)]
struct Request {
    /// When it was sent.
    sent: u64,
    /// When a reachable witness answers it.
    due: u64,
    /// The appliance of the driver that asked.
    from: ApplianceId,
    change: WitnessChange,
}

/// The witness and the requests in flight to it.
#[derive(Debug, Clone)]
pub(super) struct SimWitness {
    /// The record and its revision.
    pub(super) record: Versioned,
    requests: Vec<Request>,
    rng: u64,
    /// Requests answered (granted, refused) and timed out, for the report.
    pub(super) granted: u64,
    pub(super) refused: u64,
    pub(super) unreachable: u64,
}

impl SimWitness {
    /// The witness of the steady pair: `in_control` at `epoch` waiting for `standby`.
    pub(super) fn steady(
        in_control: InstanceId,
        epoch: ControlEpoch,
        standby: InstanceId,
        seed: u64,
    ) -> Self {
        Self {
            record: Versioned {
                record: WitnessRecord {
                    epoch,
                    in_control: Some(in_control),
                    sync_set: BTreeSet::from([standby]),
                },
                revision: 1,
            },
            requests: Vec::new(),
            rng: seed.rotate_left(17) ^ 0x5eed,
            granted: 0,
            refused: 0,
            unreachable: 0,
        }
    }

    /// 0 to 2 ticks of jitter (none without a seed).
    fn jitter(&mut self, seeded: bool) -> u64 {
        if !seeded {
            return 0;
        }
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) % 3
    }

    /// The driver on `from` sends `change` at `now`.
    pub(super) fn request(
        &mut self,
        from: ApplianceId,
        change: WitnessChange,
        now: u64,
        seeded: bool,
    ) {
        if self.requests.len() >= MAX_REQUESTS {
            return;
        }
        let due = now + WITNESS_ANSWER_TICKS + self.jitter(seeded);
        self.requests.push(Request {
            sent: now,
            due,
            from,
            change,
        });
    }

    /// Decides `change` against the record, as `hitless_witness::change` does: a change the
    /// record already reflects is granted again; otherwise [`WitnessChange::apply`] decides
    /// and a granted change is written (the revision moves on).
    pub(super) fn decide(&mut self, change: &WitnessChange) -> Event {
        let current = &self.record;
        if current.revision != 0 && change.already_applied(&current.record) {
            self.granted += 1;
            return Event::WitnessGranted {
                change: change.clone(),
                record: current.record.clone(),
            };
        }
        match change.apply(current) {
            Ok(next) => {
                self.record = Versioned {
                    record: next.clone(),
                    revision: current.revision + 1,
                };
                self.granted += 1;
                Event::WitnessGranted {
                    change: change.clone(),
                    record: next,
                }
            }
            Err(refusal) => {
                self.refused += 1;
                Event::WitnessRefused {
                    change: change.clone(),
                    refusal,
                }
            }
        }
    }

    /// Whether nothing is in flight.
    pub(super) fn idle(&self) -> bool {
        self.requests.is_empty()
    }
}

/// Answers every request due at `tick`: decided by the witness if the asking driver's
/// appliance reaches it, timed out otherwise; the answer goes to the engine that drives on
/// that appliance (none: it is dropped; a paused agent gets it when it resumes).
pub(super) fn serve(sim: &mut Sim, tick: u64) {
    let Some(w) = sim.witness.as_mut() else {
        return;
    };
    let mut sp = sim.split.take();
    let mut due = Vec::new();
    let mut keep = Vec::new();
    for mut r in std::mem::take(&mut w.requests) {
        let reaches = sp
            .as_ref()
            .is_none_or(|s| !s.active() || s.witness_reaches(r.from));
        let paused = sp
            .as_ref()
            .is_some_and(|s| s.active() && s.paused() == Some(r.from));
        if r.due > tick || paused {
            keep.push(r);
        } else if reaches {
            due.push((r, true));
        } else if tick >= r.sent + WITNESS_TIMEOUT_TICKS {
            due.push((r, false));
        } else {
            r.due = r.sent + WITNESS_TIMEOUT_TICKS;
            keep.push(r);
        }
    }
    w.requests = keep;
    for (r, reaches) in due {
        let Some(w) = sim.witness.as_mut() else {
            break;
        };
        let event = if reaches {
            let e = w.decide(&r.change);
            let verdict = match &e {
                Event::WitnessGranted { .. } => "grants",
                _ => "refuses",
            };
            let note = format!(
                "the witness {verdict} {} asked by the {} agent: {}",
                r.change.name(),
                r.from,
                w.record.record
            );
            sim.record(note);
            e
        } else {
            w.unreachable += 1;
            Event::WitnessUnreachable {
                change: r.change.clone(),
                detail: format!(
                    "the {} appliance cannot reach the witness: the request timed out",
                    r.from
                ),
            }
        };
        match sp.as_mut() {
            Some(s) if s.active() => split::deliver_on(sim, s, r.from, event),
            _ => {
                if r.from == sim.driver {
                    sim.feed(event);
                }
            }
        }
    }
    if let Some(s) = sp.as_mut() {
        split::take_stand_down(sim, s);
    }
    sim.split = sp;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w() -> SimWitness {
        SimWitness::steady(InstanceId(1), ControlEpoch(1), InstanceId(2), 0)
    }

    #[test]
    fn of_two_drivers_racing_only_the_first_change_lands() {
        let mut w = w();
        let drop = WitnessChange::DropStandbys {
            active: InstanceId(1),
            epoch: ControlEpoch(1),
            standbys: [InstanceId(2)].into(),
        };
        let promote = WitnessChange::Promote {
            to: InstanceId(2),
            at_least: ControlEpoch(2),
        };
        assert!(matches!(w.decide(&drop), Event::WitnessGranted { .. }));
        assert!(matches!(w.decide(&promote), Event::WitnessRefused { .. }));
        assert_eq!(w.record.record.in_control, Some(InstanceId(1)));
        assert_eq!(w.record.revision, 2);
    }

    #[test]
    fn a_change_asked_again_after_it_landed_is_granted_without_a_write() {
        let mut w = w();
        let promote = WitnessChange::Promote {
            to: InstanceId(2),
            at_least: ControlEpoch(2),
        };
        assert!(matches!(w.decide(&promote), Event::WitnessGranted { .. }));
        let rev = w.record.revision;
        assert!(matches!(w.decide(&promote), Event::WitnessGranted { .. }));
        assert_eq!(w.record.revision, rev);
    }

    #[test]
    fn the_request_queue_is_bounded() {
        let mut w = w();
        let c = WitnessChange::Init {
            in_control: InstanceId(1),
            epoch: ControlEpoch(1),
        };
        for t in 0..(MAX_REQUESTS as u64 + 10) {
            w.request(ApplianceId::Primary, c.clone(), t, false);
        }
        assert_eq!(w.requests.len(), MAX_REQUESTS);
    }
}
