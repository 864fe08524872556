//! The witness as the driver sees it: the engine's `Witness` changes carried out against the
//! configured witness (bounded, answered as events), the standbys it gives up told to the
//! instance in control, and standing down when the other appliance's agent decided first.

use std::sync::Arc;
use std::time::Duration;

use hitless_control::AgentCommand;
use hitless_core::{ControlEpoch, Event, InstanceId, WitnessChange};
use hitless_witness::{Decided, Witness};
use tracing::{debug, info, warn};

use super::{Appliances, Driver};
use crate::appliance::Op;

/// Bound of one change at the witness (a read and at most a few compare-and-swaps, each
/// bounded by the client's own request timeout): past it the engine is told the witness is
/// unreachable and asks again at its next tick.
pub const CHANGE_BOUND: Duration = Duration::from_secs(2);

/// Carries out `change` at `witness`; the engine's answer event.
pub(super) async fn decide(witness: Option<&Arc<dyn Witness>>, change: WitnessChange) -> Event {
    let Some(w) = witness else {
        return Event::WitnessUnreachable {
            change,
            detail: "this agent has no witness configured, but its engine decides through one"
                .into(),
        };
    };
    let started = std::time::Instant::now();
    let r = tokio::time::timeout(CHANGE_BOUND, hitless_witness::change(w.as_ref(), &change)).await;
    let took_ms = started.elapsed().as_millis() as u64;
    match r {
        Ok(Ok(Decided::Granted(v))) => {
            info!(change = change.name(), record = %v.record, took_ms, "witness granted");
            Event::WitnessGranted {
                change,
                record: v.record,
            }
        }
        Ok(Ok(Decided::Refused(refusal))) => {
            warn!(change = change.name(), %refusal, took_ms, "witness refused");
            Event::WitnessRefused { change, refusal }
        }
        Ok(Err(e)) => {
            warn!(change = change.name(), took_ms, "witness unreachable: {e}");
            Event::WitnessUnreachable {
                change,
                detail: e.to_string(),
            }
        }
        Err(_) => {
            warn!(
                change = change.name(),
                "witness did not answer within {CHANGE_BOUND:?}"
            );
            Event::WitnessUnreachable {
                change,
                detail: format!("no answer within {CHANGE_BOUND:?}"),
            }
        }
    }
}

/// Tells `active` it may acknowledge without `standby` (the witness dropped it), in the
/// background.
pub(super) fn tell_standby_gone(
    apps: &Appliances,
    app: hitless_core::ApplianceId,
    active: InstanceId,
    standby: InstanceId,
) {
    let apps = apps.clone();
    tokio::spawn(async move {
        let r = apps
            .exec(
                app,
                Op::Control {
                    instance: active,
                    command: AgentCommand::StandbyGone {
                        instance_id: standby.to_string(),
                    },
                },
            )
            .await;
        match r {
            Ok(_) => info!(%active, %standby, "instance in control told its standby is given up"),
            Err(e) => {
                debug!(%active, %standby, "could not tell the instance in control a standby is given up: {e}")
            }
        }
    });
}

impl Driver {
    /// The witness decided for the other appliance: stop driving and give up the service
    /// address (the engine fenced this side's instance in control).
    pub(super) fn stand_down(&mut self, epoch: ControlEpoch) {
        let mine = self.epoch();
        warn!(
            witness_epoch = epoch.0,
            my_epoch = mine.0,
            "the witness records the other appliance in control: this agent stops driving"
        );
        self.engine = None;
        self.apps.local.stand_down_front(mine);
        self.publish();
    }

    /// Acts on the address when a drop of the lost standbys gets its answer: cut off from
    /// both the peer and the witness, this side gives the address up (its instance can
    /// acknowledge nothing the lost standby would gate, and clients that reach it would only
    /// wait); granted later (the peer was really lost), it takes it back.
    pub(super) fn witness_answered(&mut self, e: &Event) {
        match e {
            Event::WitnessUnreachable {
                change: WitnessChange::DropStandbys { active, .. },
                ..
            } if !self.peer_up
                && self.instances.get(active).map(|s| s.appliance) == Some(self.me)
                && self.apps.local.holds_address() =>
            {
                warn!("cut off from both the peer and the witness: giving up the service address until the witness answers");
                self.apps
                    .local
                    .release_address("cut off from the peer and the witness");
                self.released_cut_off = true;
            }
            Event::WitnessGranted {
                change: WitnessChange::DropStandbys { .. },
                ..
            } if self.released_cut_off => {
                self.released_cut_off = false;
                let local = self.apps.local.clone();
                tokio::spawn(async move {
                    match local.reclaim_address().await {
                        Ok(()) => info!("the witness answered: service address taken back"),
                        Err(e) => warn!("cannot take the service address back: {e}"),
                    }
                });
            }
            _ => {}
        }
    }
}
