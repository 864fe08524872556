//! Moving control: unplanned failover and planned switchover, and routing the fronts.

use std::collections::BTreeMap;
use std::time::Duration;

use hitless_control::AgentCommand;
use hitless_core::{ApplianceId, ControlEpoch, InstanceId};
use thiserror::Error;
use tracing::{info, warn};

use super::{Appliances, Driver, DriverTiming};
use crate::appliance::{active_config, as_status, control_role, standby_config, Op, OpOk, Started};
use crate::epoch::previous;
use crate::front::Route;
use crate::remote::OpError;

/// Why control could not move (the engine is told, as the reason of a failed switch).
#[derive(Debug, Error)]
pub enum SwitchError {
    /// The engine's state names an instance this driver has no appliance for.
    #[error("instance {instance} is unknown")]
    UnknownInstance { instance: InstanceId },
    /// The instance never reported its endpoints to this driver.
    #[error("instance {instance} has no known endpoints")]
    NoEndpoints { instance: InstanceId },
    /// The front of a reachable appliance could not be held.
    #[error("the {appliance} front was not held: {source}")]
    FrontNotHeld {
        appliance: ApplianceId,
        source: OpError,
    },
    /// The target did not apply the old active's last mutation in time; the old active keeps
    /// control.
    #[error("instance {to} did not catch up with {from} within {bound:?}")]
    NoCatchUp {
        to: InstanceId,
        from: InstanceId,
        bound: Duration,
    },
    /// An op of the switch failed.
    #[error(transparent)]
    Op(#[from] OpError),
}

impl Driver {
    /// What ordered commands need to know about the pair, captured now.
    pub(super) fn switch_context(&self) -> SwitchContext {
        let mut ctx = SwitchContext {
            instances: self.instances.clone(),
            standbys: Vec::new(),
            appliance_of: BTreeMap::new(),
        };
        if let Some(e) = &self.engine {
            for i in &e.state().pair.instances {
                ctx.appliance_of.insert(i.id, i.appliance);
                if !i.state.is_live() {
                    continue;
                }
                // Standbys are re-pointed as they were configured (see `control_role`).
                if let (hitless_control::Role::Standby, designated_ha) = control_role(i.role) {
                    ctx.standbys.push((i.id, designated_ha));
                }
            }
        }
        ctx
    }

    /// Points both fronts at the instance in control again, as this driver's state has it,
    /// when nothing is in flight (best effort, in the background). Used after another agent
    /// drove for a while and yielded to this one: it may have moved the service address.
    pub fn reassert_routes(&self) {
        let Some(engine) = self.engine.as_ref() else {
            return;
        };
        if !engine.in_flight_commands().is_empty() {
            return;
        }
        let pair = &engine.state().pair;
        let Some(to) = pair
            .in_control
            .and_then(|id| self.instances.get(&id))
            .cloned()
        else {
            return;
        };
        let (apps, epoch) = (self.apps.clone(), pair.epoch);
        tokio::spawn(async move {
            // Right after a split heals the peer link may carry heartbeats before it carries
            // ops: retry (bounded) until both fronts took the route, or the service address
            // stays with the side that stepped down.
            let mut last = None;
            for attempt in 0..REASSERT_ATTEMPTS {
                if attempt > 0 {
                    tokio::time::sleep(REASSERT_PAUSE).await;
                }
                match route_both(&apps, epoch, &to).await {
                    Ok(()) => {
                        info!(%epoch, instance = %to.instance, "service routes re-asserted");
                        return;
                    }
                    Err(e) => last = Some(e),
                }
            }
            if let Some(e) = last {
                warn!("re-asserting the service routes failed {REASSERT_ATTEMPTS} times: {e}");
            }
        });
    }
}

/// Attempts to re-assert the routes after another driver yielded, and the pause between them
/// (5 s in all).
const REASSERT_ATTEMPTS: u32 = 50;
const REASSERT_PAUSE: Duration = Duration::from_millis(100);

/// Routes both fronts to `to`; fails if either appliance did not take the route.
async fn route_both(apps: &Appliances, epoch: ControlEpoch, to: &Started) -> Result<(), OpError> {
    let route = Route {
        epoch,
        backend: Some(to.service_addr),
        hold: false,
    };
    for (app, listen) in [(to.appliance, true), (to.appliance.other(), false)] {
        apps.exec(
            app,
            Op::FrontRoute {
                route: route.clone(),
                listen,
                protocol: Some(to.protocol),
            },
        )
        .await?;
    }
    Ok(())
}

/// What ordered commands need to know about the pair.
#[derive(Clone, Debug)]
pub(super) struct SwitchContext {
    instances: BTreeMap<InstanceId, Started>,
    /// Live standbys and whether each is the designated HA standby.
    standbys: Vec<(InstanceId, bool)>,
    appliance_of: BTreeMap<InstanceId, ApplianceId>,
}

impl SwitchContext {
    pub(super) fn app(&self, id: InstanceId) -> Result<ApplianceId, SwitchError> {
        self.appliance_of
            .get(&id)
            .copied()
            .ok_or(SwitchError::UnknownInstance { instance: id })
    }
    pub(super) fn started(&self, id: InstanceId) -> Result<&Started, SwitchError> {
        self.instances
            .get(&id)
            .ok_or(SwitchError::NoEndpoints { instance: id })
    }
}

/// Points both fronts at `to`; the appliance of `to` owns the service address.
pub(super) async fn route_to(
    apps: &Appliances,
    epoch: ControlEpoch,
    to: &Started,
) -> Result<(), OpError> {
    let route = Route {
        epoch,
        backend: Some(to.service_addr),
        hold: false,
    };
    // Bind on the new owner first, then release on the other: no window without a listener.
    apps.exec(
        to.appliance,
        Op::FrontRoute {
            route: route.clone(),
            listen: true,
            protocol: Some(to.protocol),
        },
    )
    .await?;
    let other = to.appliance.other();
    if let Err(e) = apps
        .exec(
            other,
            Op::FrontRoute {
                route,
                listen: false,
                protocol: Some(to.protocol),
            },
        )
        .await
    {
        warn!(appliance = %other, "front route update failed: {e}");
    }
    Ok(())
}

/// Makes `to` the instance in control at `epoch`.
async fn promote(
    apps: &Appliances,
    app: ApplianceId,
    to: InstanceId,
    epoch: ControlEpoch,
) -> Result<OpOk, OpError> {
    apps.exec(
        app,
        Op::Control {
            instance: to,
            command: AgentCommand::Promote { epoch },
        },
    )
    .await
}

/// Unplanned: promote `to` at `epoch`, re-point the other standbys, move the front.
pub(super) async fn failover(
    apps: &Appliances,
    ctx: &SwitchContext,
    to: InstanceId,
    epoch: ControlEpoch,
) -> Result<(), SwitchError> {
    let to_app = ctx.app(to)?;
    let target = ctx.started(to)?.clone();
    promote(apps, to_app, to, epoch).await?;
    repoint_standbys(apps, ctx, to, &target, epoch, None).await;
    Ok(route_to(apps, epoch, &target).await?)
}

async fn repoint_standbys(
    apps: &Appliances,
    ctx: &SwitchContext,
    to: InstanceId,
    target: &Started,
    epoch: ControlEpoch,
    skip: Option<InstanceId>,
) {
    let mut set = tokio::task::JoinSet::new();
    for (s, ha) in &ctx.standbys {
        if *s == to || Some(*s) == skip {
            continue;
        }
        let Ok(app) = ctx.app(*s) else { continue };
        let (apps, s, ha, addr) = (apps.clone(), *s, *ha, target.sync_addr.clone());
        set.spawn(async move {
            let r = apps
                .exec(
                    app,
                    Op::Control {
                        instance: s,
                        command: standby_config(s, epoch, &addr, ha),
                    },
                )
                .await;
            if let Err(e) = r {
                warn!(standby = %s, "cannot re-point the standby at the new instance in control: {e}");
            }
        });
    }
    while set.join_next().await.is_some() {}
}

/// What the convergence before a planned switchover achieved.
struct Converged {
    /// Sequence numbers the target lacked when the hold began (`u64::MAX`: unknown).
    lag: u64,
    /// Time spent converging.
    waited: Duration,
}

/// How many sequence numbers `target` lacks of `want` (per service, the largest; a service it
/// does not report counts as applied up to 0).
fn lag_behind<'a>(
    want: impl Iterator<Item = (&'a String, u64)>,
    target: &hitless_control::InstanceStatus,
) -> u64 {
    want.map(|(svc, seq)| {
        let have = target.services.get(svc).map(|x| x.applied_seq).unwrap_or(0);
        seq.saturating_sub(have)
    })
    .max()
    .unwrap_or(0)
}

/// Polls the old active and the target until the target lags at most
/// [`DriverTiming::converged_lag`] sequence numbers behind it, at most
/// [`DriverTiming::converge_bound`]. Never fails: past the bound the switchover goes on
/// (its catch-up is bounded on its own).
async fn converge(
    apps: &Appliances,
    from_app: ApplianceId,
    from: InstanceId,
    to_app: ApplianceId,
    to: InstanceId,
    timing: &DriverTiming,
) -> Converged {
    let t0 = tokio::time::Instant::now();
    let mut lag = u64::MAX;
    loop {
        let (a, t) = tokio::join!(
            apps.exec(from_app, Op::Status { instance: from }),
            apps.exec(to_app, Op::Status { instance: to })
        );
        if let (Ok(a), Ok(t)) = (as_status(a), as_status(t)) {
            lag = lag_behind(a.services.iter().map(|(k, v)| (k, v.applied_seq)), &t);
        }
        if lag <= timing.converged_lag || t0.elapsed() >= timing.converge_bound {
            return Converged {
                lag,
                waited: t0.elapsed(),
            };
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

/// Judges the hold of the `appliance` front: the front of an unreachable appliance serves
/// nobody, so its hold may fail; any other failure fails the switchover.
fn judge_hold(appliance: ApplianceId, r: Result<OpOk, OpError>) -> Result<(), SwitchError> {
    match r {
        Ok(_) => Ok(()),
        Err(e) if e.peer_unreachable() => {
            warn!("the {appliance} front was not held: its appliance is unreachable ({e})");
            Ok(())
        }
        Err(source) => Err(SwitchError::FrontNotHeld { appliance, source }),
    }
}

/// Planned: hold the fronts, quiesce the old active, wait until the target has
/// every mutation, promote it, demote the old one to its standby, re-point the others, route.
pub(super) async fn switchover(
    apps: &Appliances,
    ctx: &SwitchContext,
    timing: &DriverTiming,
    from: InstanceId,
    to: InstanceId,
    epoch: ControlEpoch,
) -> Result<(), SwitchError> {
    let from_app = ctx.app(from)?;
    let to_app = ctx.app(to)?;
    let target = ctx.started(to)?.clone();
    let bound_ms = timing.drain_bound.as_millis() as u64;
    // 0. Converge first, with clients still served: the hold below lasts as long as the
    //    target takes to apply what it still lacks, so wait (bounded) for a moment when it
    //    lacks little, as live migration pre-copies before it stops the guest.
    let converged = converge(apps, from_app, from, to_app, to, timing).await;
    let t0 = tokio::time::Instant::now();
    // 1. Hold both fronts: new requests wait there. Requests in flight are not waited for (a
    //    long pipeline or a client that never reads must not decide whether the pair can
    //    switch): the quiesce below lets those the old active executed become durable, and
    //    the old active hands back, by closing their connections once control moved, those it
    //    did not execute; the fronts send them on to the new instance in control. A front must
    //    be held if its appliance is reachable; the front of a lost appliance serves nobody.
    let (a, b) = tokio::join!(
        apps.exec(ApplianceId::Primary, Op::FrontHold { bound_ms }),
        apps.exec(ApplianceId::Secondary, Op::FrontHold { bound_ms })
    );
    judge_hold(ApplianceId::Primary, a)?;
    judge_hold(ApplianceId::Secondary, b)?;
    let t_held = t0.elapsed();
    // 2. Quiesce the old active: nothing new is applied, and what it applied is durable.
    apps.exec(
        from_app,
        Op::Control {
            instance: from,
            command: AgentCommand::Quiesce {
                epoch: previous(epoch),
            },
        },
    )
    .await?;
    // 3. Wait until the target applied the old active's last sequence.
    let last = as_status(apps.exec(from_app, Op::Status { instance: from }).await)?;
    let want: BTreeMap<String, u64> = last
        .services
        .iter()
        .map(|(k, v)| (k.clone(), v.applied_seq))
        .collect();
    let deadline = tokio::time::Instant::now() + timing.drain_bound;
    let t_quiesced = t0.elapsed();
    let mut polls = 0u32;
    let mut first_lag = None;
    loop {
        let s = as_status(apps.exec(to_app, Op::Status { instance: to }).await)?;
        polls += 1;
        if first_lag.is_none() {
            first_lag = Some(lag_behind(want.iter().map(|(k, v)| (k, *v)), &s));
        }
        let caught_up = want.iter().all(|(svc, seq)| {
            s.services
                .get(svc)
                .map(|x| x.applied_seq >= *seq)
                .unwrap_or(false)
        });
        if caught_up {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            // Undo the quiesce: the old active keeps control.
            let _ = apps
                .exec(
                    from_app,
                    Op::Control {
                        instance: from,
                        command: active_config(from, previous(epoch)),
                    },
                )
                .await;
            return Err(SwitchError::NoCatchUp {
                to,
                from,
                bound: timing.drain_bound,
            });
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    let t_caught_up = t0.elapsed();
    // 4. Promote the target at the new epoch.
    promote(apps, to_app, to, epoch).await?;
    // 5. The old active becomes the target's standby and 6. every other standby follows the
    //    target, all at once (the HA standby's re-attach gates the clients).
    let demote = async {
        if let Err(e) = apps
            .exec(
                from_app,
                Op::Control {
                    instance: from,
                    command: AgentCommand::Demote {
                        epoch,
                        new_active_sync_addr: Some(target.sync_addr.clone()),
                    },
                },
            )
            .await
        {
            warn!(%from, "demotion failed (it is fenced by the new epoch regardless): {e}");
        }
    };
    tokio::join!(
        demote,
        repoint_standbys(apps, ctx, to, &target, epoch, Some(from))
    );
    let t_promoted = t0.elapsed();
    // 7. The target acknowledges nothing a failover could lose: clients wait until the
    //    designated HA standby is attached to it and in sync (bounded; past the bound the
    //    pair runs degraded and says so).
    for (s, ha) in &ctx.standbys {
        if !*ha || *s == to || *s == from {
            continue;
        }
        let Ok(app) = ctx.app(*s) else { continue };
        let deadline = tokio::time::Instant::now() + timing.drain_bound;
        loop {
            match as_status(apps.exec(app, Op::Status { instance: *s }).await) {
                Ok(st) if st.ready && st.epoch >= epoch => break,
                Ok(_) => {}
                Err(e) => {
                    warn!(standby = %s, "HA standby unreachable after the switchover: {e}");
                    break;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                warn!(standby = %s, "HA standby not in sync with {to} within {:?}; continuing degraded", timing.drain_bound);
                break;
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }
    let t_ha = t0.elapsed();
    // 8. Clients go to the target.
    route_to(apps, epoch, &target).await?;
    info!(
        %from, %to, epoch = epoch.0,
        converge_ms = converged.waited.as_secs_f64() * 1e3,
        converge_lag = converged.lag,
        held_ms = t_held.as_secs_f64() * 1e3,
        quiesced_ms = t_quiesced.as_secs_f64() * 1e3,
        catch_up_polls = polls,
        catch_up_first_lag = first_lag.unwrap_or(0),
        caught_up_ms = t_caught_up.as_secs_f64() * 1e3,
        promoted_ms = t_promoted.as_secs_f64() * 1e3,
        ha_in_sync_ms = t_ha.as_secs_f64() * 1e3,
        released_ms = t0.elapsed().as_secs_f64() * 1e3,
        "planned switchover done"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::Unreachable;

    #[test]
    fn a_hold_that_fails_because_the_peer_is_unreachable_does_not_fail_the_switch() {
        for how in [
            Unreachable::LinkDown,
            Unreachable::Lost,
            Unreachable::Closed,
        ] {
            let r = Err(OpError::PeerUnreachable {
                appliance: ApplianceId::Secondary,
                how,
            });
            assert!(judge_hold(ApplianceId::Secondary, r).is_ok(), "{how:?}");
        }
        assert!(judge_hold(ApplianceId::Primary, Ok(OpOk::Done)).is_ok());
    }

    #[test]
    fn a_hold_refused_or_unanswered_fails_the_switch_naming_the_front() {
        let refused = Err(OpError::Refused {
            appliance: ApplianceId::Primary,
            reason: "the front is stopping".into(),
        });
        let e = judge_hold(ApplianceId::Primary, refused).unwrap_err();
        assert!(
            matches!(&e, SwitchError::FrontNotHeld { appliance: ApplianceId::Primary, source: OpError::Refused { reason, .. } } if reason == "the front is stopping"),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "the primary front was not held: the front is stopping"
        );
        let late = Err(OpError::Timeout {
            appliance: ApplianceId::Secondary,
            bound: Duration::from_secs(4),
        });
        let e = judge_hold(ApplianceId::Secondary, late).unwrap_err();
        assert!(
            matches!(
                e,
                SwitchError::FrontNotHeld {
                    appliance: ApplianceId::Secondary,
                    source: OpError::Timeout { .. }
                }
            ),
            "{e:?}"
        );
    }
}
