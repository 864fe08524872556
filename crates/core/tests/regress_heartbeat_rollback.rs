//! A fault sequence proptest found: operator rollback, then the instance in control loses its
//! heartbeat, then the HA standby falls out of sync. Control must only move to an instance
//! that holds every acknowledged write.

use hitless_core::sim::{self, FaultKind, ScheduledFault, SimOptions, Trigger};

/// The instance in control used to go on acknowledging alone as soon as its HA standby fell
/// out of sync, while a failover to that standby (after the heartbeat loss) was already under
/// way, so the promoted standby missed the last acknowledged write. An instance in control now
/// keeps acknowledgements back for a grace (`sim::HA_GRACE_TICKS`, `ha_grace` in the replication
/// library) after an HA standby drops out.
#[test]
fn rollback_then_heartbeat_loss_then_out_of_sync_loses_nothing() {
    let opts = SimOptions {
        seed: 12410733721220776452,
        faults: vec![
            ScheduledFault {
                kind: FaultKind::StandbyOutOfSync,
                trigger: Trigger::AtTick(84),
            },
            ScheduledFault {
                kind: FaultKind::HeartbeatLost,
                trigger: Trigger::AtTick(81),
            },
            ScheduledFault {
                kind: FaultKind::Rollback,
                trigger: Trigger::AtTick(76),
            },
        ],
        ..SimOptions::default()
    };
    let r = sim::run_with(&opts);
    assert_eq!(r.invariant_violations, 0, "{:?}", r.violations);
    assert_eq!(r.acked_lost, 0);
}
