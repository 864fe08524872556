//! The links between the two appliances (and to the witness), each direction on its own, and
//! which of them a fault cuts.
//!
//! * the **peer link** carries the agents' heartbeats, the journal mirror and the ops one agent
//!   runs on the other's appliance; a direction that is cut drops the heartbeats it carries, so
//!   the receiving agent's failure detector fires after [`PEER_DETECT_TICKS`];
//! * the **sync link** carries the replication frames of instances on one appliance to their
//!   standbys on the other; the simulator cuts it together with the peer link (both share the
//!   network between the appliances);
//! * the **witness link** of each appliance carries its driver's requests to the witness (with
//!   [`crate::engine::EngineConfig::witness`]); without a witness, cutting it changes nothing,
//!   which the simulator checks.
//!
//! A paused agent (`SIGSTOP`) is not a link fault: it neither sends heartbeats nor runs ops, but
//! its appliance's instances keep running and replicating.

use std::collections::BTreeSet;

use crate::domain::ApplianceId;

use super::faults::FaultKind;

/// Ticks without heartbeats after which an agent takes its peer for lost (the real detector:
/// `interval x misses`, 50 ms x 3, judged on the 100 ms engine tick, rounded up).
pub const PEER_DETECT_TICKS: u64 = 3;

/// How long a link fault or a pause lasts before it heals: past the failure detector and the HA
/// grace, so both drivers run and the old side may acknowledge alone before the heal.
pub const CUT_TICKS: u64 = 20;

// The interesting window (both drivers, the old side past its HA grace) fits in every cut.
const _: () = assert!(CUT_TICKS > PEER_DETECT_TICKS + super::world::HA_GRACE_TICKS);

/// One direction of one link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Link {
    /// Agent to agent, from this appliance to the other.
    Peer { from: ApplianceId },
    /// Instance replication, from this appliance's instances to the other's.
    Sync { from: ApplianceId },
    /// This appliance to the witness (and back).
    Witness { appliance: ApplianceId },
}

/// The state of the links and agents.
#[derive(Debug, Clone, Default)]
pub(super) struct Network {
    cut: BTreeSet<Link>,
    paused: Option<ApplianceId>,
}

impl Network {
    /// The links a fault cuts (or the agent it pauses): `driver` is the appliance whose agent
    /// drives at the time.
    pub(super) fn faulted(kind: FaultKind, driver: ApplianceId) -> Self {
        use ApplianceId::{Primary as P, Secondary as S};
        let both = |n: &mut Network| {
            for from in [P, S] {
                n.cut.insert(Link::Peer { from });
                n.cut.insert(Link::Sync { from });
            }
        };
        let mut n = Network::default();
        match kind {
            FaultKind::PartitionPeers => both(&mut n),
            FaultKind::IsolatePrimary | FaultKind::IsolateSecondary => {
                both(&mut n);
                let a = if kind == FaultKind::IsolatePrimary {
                    P
                } else {
                    S
                };
                n.cut.insert(Link::Witness { appliance: a });
            }
            FaultKind::OneWayPrimary => {
                n.cut.insert(Link::Peer { from: P });
                n.cut.insert(Link::Sync { from: P });
            }
            FaultKind::IsolateWitness => {
                for appliance in [P, S] {
                    n.cut.insert(Link::Witness { appliance });
                }
            }
            FaultKind::PauseAgent => n.paused = Some(driver),
            _ => {}
        }
        n
    }

    /// Whether the agent on `to` hears the agent on `from` (heartbeats and ops arrive and the
    /// sender is running).
    pub(super) fn hears(&self, to: ApplianceId, from: ApplianceId) -> bool {
        !self.cut.contains(&Link::Peer { from }) && self.paused != Some(from) && from != to
    }

    /// Whether the agent on `a` can run ops on the other appliance and get their answers.
    pub(super) fn reaches(&self, a: ApplianceId) -> bool {
        let b = a.other();
        self.hears(b, a) && self.hears(a, b)
    }

    /// Whether replication flows from the instances on `from` to those on the other appliance.
    pub(super) fn sync_flows(&self, from: ApplianceId) -> bool {
        !self.cut.contains(&Link::Sync { from })
            && !self.cut.contains(&Link::Sync { from: from.other() })
    }

    /// The agent on this appliance, if any, is paused.
    pub(super) fn paused(&self) -> Option<ApplianceId> {
        self.paused
    }

    /// Whether the appliance reaches the witness (read by the simulated witness and the
    /// report).
    pub(super) fn witness_reaches(&self, a: ApplianceId) -> bool {
        !self.cut.contains(&Link::Witness { appliance: a })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ApplianceId::{Primary as P, Secondary as S};

    #[test]
    fn a_partition_cuts_both_directions_and_keeps_the_witness() {
        let n = Network::faulted(FaultKind::PartitionPeers, P);
        assert!(!n.hears(P, S) && !n.hears(S, P));
        assert!(!n.reaches(P) && !n.reaches(S));
        assert!(!n.sync_flows(P) && !n.sync_flows(S));
        assert!(n.witness_reaches(P) && n.witness_reaches(S));
    }

    #[test]
    fn isolating_an_appliance_also_cuts_its_witness_link() {
        let n = Network::faulted(FaultKind::IsolateSecondary, P);
        assert!(!n.hears(P, S) && !n.hears(S, P));
        assert!(n.witness_reaches(P) && !n.witness_reaches(S));
    }

    #[test]
    fn one_way_drops_only_what_the_primary_sends() {
        let n = Network::faulted(FaultKind::OneWayPrimary, P);
        assert!(!n.hears(S, P), "the secondary no longer hears the primary");
        assert!(n.hears(P, S), "the primary still hears the secondary");
        assert!(
            !n.reaches(P) && !n.reaches(S),
            "requests or answers are dropped"
        );
        assert!(!n.sync_flows(P));
    }

    #[test]
    fn a_paused_agent_is_silent_but_its_instances_replicate() {
        let n = Network::faulted(FaultKind::PauseAgent, P);
        assert!(!n.hears(S, P) && n.paused() == Some(P));
        assert!(n.sync_flows(P) && n.sync_flows(S));
    }

    #[test]
    fn cutting_the_witness_leaves_the_pair_connected() {
        let n = Network::faulted(FaultKind::IsolateWitness, P);
        assert!(n.reaches(P) && n.reaches(S) && n.sync_flows(P));
        assert!(!n.witness_reaches(P) && !n.witness_reaches(S));
    }
}
