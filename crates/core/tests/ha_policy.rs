//! Steady-state HA policy (no ISSU running).
mod common;

use hitless_core::engine::{Command, Event, Report};
use hitless_core::{ApplianceId, ControlEpoch, InstanceId, Role};

fn failover_target(cmds: &[Command]) -> Option<(InstanceId, ControlEpoch)> {
    cmds.iter().find_map(|c| match c {
        Command::Failover { to, epoch } => Some((*to, *epoch)),
        _ => None,
    })
}

#[test]
fn active_failure_promotes_the_ha_standby_and_fences_the_old_one() {
    let mut e = common::engine();
    let cmds = e.handle(Event::InstanceFailed {
        instance: InstanceId(1),
        reason: "crash".into(),
    });
    let (to, epoch) = failover_target(&cmds).expect("failover");
    assert_eq!(to, InstanceId(2));
    assert_eq!(epoch, ControlEpoch(2));
    assert!(cmds.contains(&Command::Fence {
        instance: InstanceId(1),
        epoch
    }));
    let cmds = e.handle(Event::ControlSwitched { to, epoch });
    assert_eq!(e.state().pair.in_control, Some(InstanceId(2)));
    // Repair: a new standby on the primary appliance, started then attached synchronously.
    let start = cmds
        .iter()
        .find_map(|c| match c {
            Command::StartInstance {
                instance,
                appliance,
                ..
            } => Some((*instance, *appliance)),
            _ => None,
        })
        .expect("a replacement standby is started");
    assert_eq!(start.1, ApplianceId::Primary);
    let cmds = e.handle(Event::InstanceStarted { instance: start.0 });
    assert!(cmds.contains(&Command::AttachStandby {
        standby: start.0,
        active: InstanceId(2),
        designated_ha: true
    }));
    e.handle(Event::SyncReady {
        instance: start.0,
        seq: 10,
        digest_ok: true,
    });
    let s = e.status();
    assert_eq!(s.phase, "idle");
    assert!(s
        .instances
        .iter()
        .any(|i| i.id == start.0 && i.role == Role::HaStandby));
}

#[test]
fn appliance_loss_moves_control_to_the_other_appliance_and_waits_for_it() {
    let mut e = common::engine();
    let cmds = e.handle(Event::ApplianceLost {
        appliance: ApplianceId::Primary,
    });
    let (to, epoch) = failover_target(&cmds).expect("failover");
    assert_eq!(to, InstanceId(2));
    let cmds = e.handle(Event::ControlSwitched { to, epoch });
    // The primary is down: nothing can be started there yet.
    assert!(!cmds
        .iter()
        .any(|c| matches!(c, Command::StartInstance { .. })));
    for _ in 0..50 {
        assert!(e
            .handle(Event::Tick)
            .iter()
            .all(|c| !matches!(c, Command::StartInstance { .. })));
    }
    assert!(
        e.state().stuck.is_none(),
        "waiting for an appliance is not stuck"
    );
    let cmds = e.handle(Event::ApplianceRecovered {
        appliance: ApplianceId::Primary,
    });
    assert!(cmds.iter().any(|c| matches!(
        c,
        Command::StartInstance {
            appliance: ApplianceId::Primary,
            ..
        }
    )));
}

#[test]
fn no_failover_without_an_in_sync_standby_and_the_engine_says_so() {
    let mut e = common::engine();
    e.handle(Event::StandbyOutOfSync {
        instance: InstanceId(2),
    });
    let cmds = e.handle(Event::InstanceFailed {
        instance: InstanceId(1),
        reason: "crash".into(),
    });
    assert!(
        failover_target(&cmds).is_none(),
        "must not promote a lagging standby"
    );
    let stuck = cmds
        .iter()
        .find_map(|c| match c {
            Command::Report {
                progress: Report::Stuck(s),
            } => Some(s.clone()),
            _ => None,
        })
        .expect("stuck report");
    assert!(stuck.reason.contains("i1"), "{}", stuck.reason);
    assert!(stuck.resume_with.contains("resume"));
    assert_eq!(e.status().phase, "stuck");
}

#[test]
fn standby_out_of_sync_is_reattached_with_a_bound() {
    let mut e = common::engine();
    for round in 0..3 {
        let cmds = e.handle(Event::StandbyOutOfSync {
            instance: InstanceId(2),
        });
        assert!(
            cmds.iter().any(|c| matches!(
                c,
                Command::AttachStandby {
                    standby: InstanceId(2),
                    ..
                }
            )),
            "round {round}"
        );
    }
    // The fourth time the standby is given up and a replacement is started beside it.
    let cmds = e.handle(Event::StandbyOutOfSync {
        instance: InstanceId(2),
    });
    assert!(!cmds.iter().any(|c| matches!(
        c,
        Command::AttachStandby {
            standby: InstanceId(2),
            ..
        }
    )));
    assert!(cmds.iter().any(|c| matches!(
        c,
        Command::StartInstance {
            appliance: ApplianceId::Secondary,
            ..
        }
    )));
    assert_eq!(
        e.state().pair.get(InstanceId(2)).unwrap().state,
        hitless_core::InstanceState::Failed
    );
}
