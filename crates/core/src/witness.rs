//! The witness record of a pair and the rules that change it.
//!
//! A witness is a third party both appliances reach (the builtin `hitless witness` daemon, or
//! etcd) that holds, per pair, one [`WitnessRecord`]: the control epoch, the instance in
//! control and the *sync set*, the instances whose acknowledgement the instance in control
//! waits for. The record changes only by compare-and-swap on its revision, so of two drivers
//! racing after a partition exactly one change lands.
//!
//! Two rules keep every acknowledged write:
//!
//! * a standby is promoted only by a [`WitnessChange::Promote`] that lands while it is in the
//!   sync set, and that moves the epoch forward;
//! * the instance in control acknowledges without a synchronous standby only after a
//!   [`WitnessChange::DropStandbys`] removed that standby from the sync set.
//!
//! A promoted standby held every acknowledged write when it was last in the sync set, and it
//! left the sync set only through its own promotion: the instance it replaces could not have
//! acknowledged a write it lacks. [`WitnessChange::apply`] is the pure decision both the
//! agent's drivers and the simulator's witness make; the I/O is elsewhere (`hitless-witness`).

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::domain::{ControlEpoch, InstanceId};

/// Most instances a sync set may hold (a pair runs at most a handful).
pub const MAX_SYNC_SET: usize = 16;

/// The record a witness holds for one pair.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct WitnessRecord {
    /// The highest control epoch granted. Every control change moves it forward.
    pub epoch: ControlEpoch,
    /// The instance in control at `epoch` (none before the pair first reports).
    pub in_control: Option<InstanceId>,
    /// Instances whose acknowledgement the instance in control waits for: the only ones a
    /// promotion may pick.
    pub sync_set: BTreeSet<InstanceId>,
}

impl WitnessRecord {
    /// Checks the record's own limits (a record read from a witness is checked before use).
    pub fn check(&self) -> Result<(), WitnessRefusal> {
        if self.sync_set.len() > MAX_SYNC_SET {
            return Err(WitnessRefusal::Invalid(format!(
                "the sync set holds {} instances, more than {MAX_SYNC_SET}",
                self.sync_set.len()
            )));
        }
        if let Some(c) = self.in_control {
            if self.sync_set.contains(&c) {
                return Err(WitnessRefusal::Invalid(format!(
                    "the instance in control {c} is listed in its own sync set"
                )));
            }
        }
        Ok(())
    }
}

impl fmt::Display for WitnessRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set: Vec<String> = self.sync_set.iter().map(|i| i.to_string()).collect();
        match self.in_control {
            Some(c) => write!(f, "{c} in control at {}", self.epoch)?,
            None => write!(f, "nobody in control at {}", self.epoch)?,
        }
        write!(f, ", sync set [{}]", set.join(", "))
    }
}

/// A record and the revision it was read at (revision 0: the witness holds no record yet).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Versioned {
    /// The record (the default record when `revision` is 0).
    pub record: WitnessRecord,
    /// The witness's revision of the record; a compare-and-swap names it.
    pub revision: u64,
}

/// A change a driver asks of the witness. Each is decided against the current record by
/// [`WitnessChange::apply`] and written by compare-and-swap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "kebab-case")]
pub enum WitnessChange {
    /// First record of a pair, or the record of a pair that had none: `in_control` at
    /// `epoch`, nothing in the sync set. Refused if the witness already holds a record
    /// (it is never overwritten by a pair that starts).
    Init {
        /// The instance in control.
        in_control: InstanceId,
        /// Its epoch.
        epoch: ControlEpoch,
    },
    /// Failover: `to` takes control at an epoch above both the record's and `at_least`.
    /// Refused unless `to` is in the sync set.
    Promote {
        /// The standby promoted.
        to: InstanceId,
        /// The epoch the driver allocated (the granted one may be higher).
        at_least: ControlEpoch,
    },
    /// Planned switch of control from `from` (in control at `epoch_from`) to `to` at `epoch`.
    /// Refused unless the record still names `from` at `epoch_from` and `epoch` is above it.
    Switch {
        /// The instance in control.
        from: InstanceId,
        /// Its epoch.
        epoch_from: ControlEpoch,
        /// The new instance in control.
        to: InstanceId,
        /// The new epoch (the granted one may be higher).
        epoch: ControlEpoch,
    },
    /// `active` (in control at `epoch`) may acknowledge without `standbys` once this lands.
    /// Refused unless the record still names `active` at `epoch`.
    DropStandbys {
        /// The instance in control.
        active: InstanceId,
        /// Its epoch.
        epoch: ControlEpoch,
        /// The standbys it gives up waiting for.
        standbys: BTreeSet<InstanceId>,
    },
    /// `standby` acknowledges every write of `active` (in control at `epoch`) from now on: a
    /// promotion may pick it. Refused unless the record still names `active` at `epoch`.
    AddStandby {
        /// The instance in control.
        active: InstanceId,
        /// Its epoch.
        epoch: ControlEpoch,
        /// The standby.
        standby: InstanceId,
    },
}

/// Why the witness refused a change: the record says someone else decided first.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum WitnessRefusal {
    /// The record names another instance in control, or a later epoch.
    #[error("the witness records {record}: {why}")]
    Superseded {
        /// The record that decided.
        record: WitnessRecord,
        /// What the change needed that the record does not say.
        why: String,
    },
    /// The change itself is not valid.
    #[error("invalid witness change: {0}")]
    Invalid(String),
}

impl WitnessChange {
    /// The record after this change, or why the current record refuses it.
    pub fn apply(&self, current: &Versioned) -> Result<WitnessRecord, WitnessRefusal> {
        let r = &current.record;
        let superseded = |why: String| WitnessRefusal::Superseded {
            record: r.clone(),
            why,
        };
        let mut next = r.clone();
        match self {
            WitnessChange::Init { in_control, epoch } => {
                if current.revision != 0 {
                    return Err(superseded("the pair already has a record".into()));
                }
                next = WitnessRecord {
                    epoch: *epoch,
                    in_control: Some(*in_control),
                    sync_set: BTreeSet::new(),
                };
            }
            WitnessChange::Promote { to, at_least } => {
                if current.revision == 0 {
                    return Err(superseded(format!(
                        "{to} cannot be promoted: the witness has no record of the pair"
                    )));
                }
                if !r.sync_set.contains(to) {
                    return Err(superseded(format!(
                        "{to} is not in the sync set: it may lack acknowledged writes"
                    )));
                }
                next.epoch = ControlEpoch(r.epoch.0.max(at_least.0.saturating_sub(1)) + 1);
                next.in_control = Some(*to);
                // The new instance in control waits for nobody yet: its standbys join the
                // set as they come in sync.
                next.sync_set.clear();
            }
            WitnessChange::Switch {
                from,
                epoch_from,
                to,
                epoch,
            } => {
                if r.in_control != Some(*from) || r.epoch != *epoch_from {
                    return Err(superseded(format!(
                        "a switch from {from} at {epoch_from} needs {from} in control at {epoch_from}"
                    )));
                }
                if epoch <= epoch_from {
                    return Err(WitnessRefusal::Invalid(format!(
                        "a switch must move the epoch forward ({epoch} is not above {epoch_from})"
                    )));
                }
                next.epoch = *epoch;
                next.in_control = Some(*to);
                // The switchover drains `from` into `to` and moves every standby's feed to
                // `to`: the synchronous standbys stay synchronous (`to` leaves the set).
                next.sync_set.remove(to);
            }
            WitnessChange::DropStandbys {
                active,
                epoch,
                standbys,
            } => {
                if r.in_control != Some(*active) || r.epoch != *epoch {
                    return Err(superseded(format!(
                        "{active} may drop standbys only while in control at {epoch}"
                    )));
                }
                next.sync_set.retain(|s| !standbys.contains(s));
            }
            WitnessChange::AddStandby {
                active,
                epoch,
                standby,
            } => {
                if r.in_control != Some(*active) || r.epoch != *epoch {
                    return Err(superseded(format!(
                        "{active} may add standbys only while in control at {epoch}"
                    )));
                }
                if standby == active {
                    return Err(WitnessRefusal::Invalid(format!(
                        "{active} cannot be its own standby"
                    )));
                }
                next.sync_set.insert(*standby);
            }
        }
        next.check()?;
        debug_assert!(
            next.epoch >= r.epoch,
            "a witness change never moves the epoch back"
        );
        Ok(next)
    }

    /// Short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            WitnessChange::Init { .. } => "init",
            WitnessChange::Promote { .. } => "promote",
            WitnessChange::Switch { .. } => "switch",
            WitnessChange::DropStandbys { .. } => "drop-standbys",
            WitnessChange::AddStandby { .. } => "add-standby",
        }
    }

    /// Whether a record already reflects this change (a change re-sent after its answer was
    /// lost is then granted again, not refused).
    pub fn already_applied(&self, r: &WitnessRecord) -> bool {
        match self {
            WitnessChange::Init { in_control, epoch } => {
                r.in_control == Some(*in_control) && r.epoch == *epoch
            }
            WitnessChange::Promote { to, at_least } => {
                r.in_control == Some(*to) && r.epoch >= *at_least
            }
            WitnessChange::Switch { to, epoch, .. } => {
                r.in_control == Some(*to) && r.epoch == *epoch
            }
            WitnessChange::DropStandbys {
                active,
                epoch,
                standbys,
            } => {
                r.in_control == Some(*active)
                    && r.epoch == *epoch
                    && standbys.iter().all(|s| !r.sync_set.contains(s))
            }
            WitnessChange::AddStandby {
                active,
                epoch,
                standby,
            } => r.in_control == Some(*active) && r.epoch == *epoch && r.sync_set.contains(standby),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(epoch: u64, c: u64, set: &[u64]) -> Versioned {
        Versioned {
            record: WitnessRecord {
                epoch: ControlEpoch(epoch),
                in_control: Some(InstanceId(c)),
                sync_set: set.iter().map(|i| InstanceId(*i)).collect(),
            },
            revision: 7,
        }
    }

    #[test]
    fn a_standby_outside_the_sync_set_is_never_promoted() {
        let r = rec(3, 1, &[]);
        let c = WitnessChange::Promote {
            to: InstanceId(2),
            at_least: ControlEpoch(4),
        };
        assert!(matches!(
            c.apply(&r),
            Err(WitnessRefusal::Superseded { .. })
        ));
    }

    #[test]
    fn promotion_moves_the_epoch_past_both_the_record_and_the_driver() {
        let r = rec(3, 1, &[2]);
        let next = WitnessChange::Promote {
            to: InstanceId(2),
            at_least: ControlEpoch(2),
        }
        .apply(&r)
        .unwrap();
        assert_eq!(next.epoch, ControlEpoch(4));
        assert_eq!(next.in_control, Some(InstanceId(2)));
        assert!(next.sync_set.is_empty());
        let next = WitnessChange::Promote {
            to: InstanceId(2),
            at_least: ControlEpoch(9),
        }
        .apply(&r)
        .unwrap();
        assert_eq!(next.epoch, ControlEpoch(9));
    }

    #[test]
    fn of_a_drop_and_a_promotion_racing_only_the_first_lands() {
        let r = rec(3, 1, &[2]);
        let drop = WitnessChange::DropStandbys {
            active: InstanceId(1),
            epoch: ControlEpoch(3),
            standbys: [InstanceId(2)].into(),
        };
        let promote = WitnessChange::Promote {
            to: InstanceId(2),
            at_least: ControlEpoch(4),
        };
        let after_drop = Versioned {
            record: drop.apply(&r).unwrap(),
            revision: 8,
        };
        assert!(promote.apply(&after_drop).is_err());
        let after_promote = Versioned {
            record: promote.apply(&r).unwrap(),
            revision: 8,
        };
        assert!(drop.apply(&after_promote).is_err());
    }

    #[test]
    fn a_switch_needs_the_record_to_name_its_source() {
        let r = rec(3, 1, &[2]);
        let ok = WitnessChange::Switch {
            from: InstanceId(1),
            epoch_from: ControlEpoch(3),
            to: InstanceId(3),
            epoch: ControlEpoch(4),
        };
        assert_eq!(ok.apply(&r).unwrap().in_control, Some(InstanceId(3)));
        let stale = WitnessChange::Switch {
            from: InstanceId(1),
            epoch_from: ControlEpoch(2),
            to: InstanceId(3),
            epoch: ControlEpoch(3),
        };
        assert!(stale.apply(&r).is_err());
    }

    #[test]
    fn init_never_overwrites_a_record() {
        let c = WitnessChange::Init {
            in_control: InstanceId(1),
            epoch: ControlEpoch(1),
        };
        assert!(c.apply(&Versioned::default()).is_ok());
        assert!(c.apply(&rec(1, 1, &[])).is_err());
    }

    #[test]
    fn a_record_listing_its_instance_in_control_as_standby_is_invalid() {
        let r = rec(3, 1, &[1]);
        assert!(matches!(r.record.check(), Err(WitnessRefusal::Invalid(_))));
    }

    #[test]
    fn a_change_whose_answer_was_lost_is_recognised_as_applied() {
        let r = rec(3, 1, &[2]);
        let add = WitnessChange::AddStandby {
            active: InstanceId(1),
            epoch: ControlEpoch(3),
            standby: InstanceId(2),
        };
        assert!(add.already_applied(&r.record));
        let promote = WitnessChange::Promote {
            to: InstanceId(2),
            at_least: ControlEpoch(4),
        };
        let next = promote.apply(&r).unwrap();
        assert!(promote.already_applied(&next));
    }
}
