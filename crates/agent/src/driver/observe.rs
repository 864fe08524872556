//! Observations of the appliances and of the peer link: instances starting, exiting or
//! hanging, the peer appliance lost and back.

use hitless_core::{Event, InstanceId, Role};
use tracing::warn;

use super::{Driver, JournalError};
use crate::appliance::{Observation, Op, OpOk, Started};

impl Driver {
    /// An instance started: its endpoints are known.
    pub(super) fn instance_started(&mut self, s: Started) -> Result<(), JournalError> {
        let id = s.instance;
        self.instances.insert(id, s);
        self.publish();
        self.feed(Event::InstanceStarted { instance: id })
    }

    /// Something happened on an appliance.
    pub(super) fn observed(&mut self, observation: Observation) -> Result<(), JournalError> {
        match observation {
            Observation::Exited {
                instance,
                reason,
                expected,
            } => {
                if expected || self.stopping.remove(&instance).is_some() {
                    self.feed(Event::InstanceStopped { instance })
                } else {
                    // Its process is gone: it can never be promoted, so the instance in
                    // control need not hold acknowledgements for it (the HA grace). With a
                    // witness, the engine tells it once the witness dropped it.
                    if self.witness.is_none() {
                        self.tell_control_standby_gone(instance);
                    }
                    self.feed(Event::InstanceFailed { instance, reason })
                }
            }
            Observation::Unresponsive { instance, detail } => {
                warn!(%instance, %detail, "instance unresponsive: its heartbeat is lost");
                self.feed(Event::HeartbeatLost { instance })?;
                // Written off (and fenced) by the engine: a hung process must not linger, holding
                // its clients' connections and its resources. Killing it closes them; the front
                // replays what it never answered.
                self.kill_written_off(instance);
                Ok(())
            }
        }
    }

    /// The peer link is down.
    pub(super) fn peer_lost(&mut self) -> Result<(), JournalError> {
        self.peer_up = false;
        let peer = self.me.other();
        if self.engine.is_none() {
            // The driver's appliance is gone: take over from the mirrored journal.
            if self.restore()? {
                warn!(%peer, "driving appliance lost; this agent drives now");
            } else {
                return Ok(());
            }
        }
        self.feed(Event::ApplianceLost { appliance: peer })
    }

    /// The peer link is up (again).
    pub(super) async fn peer_returned(&mut self) -> Result<(), JournalError> {
        let was_down = !self.peer_up;
        self.peer_up = true;
        if self.engine.is_some() {
            // A returning agent may hold an older history (it was restarted, or cut
            // off): the latest record, which holds the whole engine state, brings its
            // journal up to date even if nothing else happens.
            self.mirror_latest();
        }
        if self.engine.is_some() && was_down {
            let peer = self.me.other();
            let lost = !self
                .engine
                .as_ref()
                .map(|e| e.state().pair.is_up(peer))
                .unwrap_or(true);
            if lost {
                // Its instances were written off: make sure none is left running.
                let _ = self.apps.remote.exec(Op::Describe).await.map(|d| {
                    if let OpOk::Described(d) = d {
                        for s in d.instances {
                            let r = self.apps.remote.clone();
                            tokio::spawn(async move {
                                let _ = r
                                    .exec(Op::Kill {
                                        instance: s.instance,
                                    })
                                    .await;
                            });
                        }
                    }
                });
                return self.feed(Event::ApplianceRecovered { appliance: peer });
            }
        }
        Ok(())
    }

    /// Kills `instance` in the background if the engine no longer counts on it.
    fn kill_written_off(&self, instance: InstanceId) {
        let Some(st) = self.engine.as_ref().map(|e| e.state()) else {
            return;
        };
        let Some(i) = st.pair.get(instance) else {
            return;
        };
        if i.state.is_live() && i.role != Role::Spare {
            return;
        }
        let (apps, app) = (self.apps.clone(), i.appliance);
        tokio::spawn(async move {
            if let Err(e) = apps.exec(app, Op::Kill { instance }).await {
                warn!(%instance, "cannot kill the unresponsive instance: {e}");
            }
        });
    }

    /// Tells the instance in control that the standby `gone` exited (best effort, in the
    /// background).
    fn tell_control_standby_gone(&self, gone: InstanceId) {
        let Some(st) = self.engine.as_ref().map(|e| e.state()) else {
            return;
        };
        let Some(active) = st.pair.in_control.filter(|a| *a != gone) else {
            return;
        };
        let Some(app) = st.pair.get(active).map(|i| i.appliance) else {
            return;
        };
        super::witness::tell_standby_gone(&self.apps, app, active, gone);
    }
}
