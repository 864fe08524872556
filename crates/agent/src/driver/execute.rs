//! Executing the engine's commands: each becomes appliance ops, on this appliance directly
//! and on the peer through the peer link; completions come back as driver inputs.

use std::time::Duration;

use hitless_control::AgentCommand;
use hitless_core::{ApplianceId, Command, Event, InstanceId, Report};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use super::switch::{failover, switchover, SwitchContext};
use super::{Appliances, Driver, DriverTiming, Input};
use crate::appliance::{as_status, standby_config, Op, OpOk, Started};
use crate::epoch::previous;
use crate::front::Route;
use crate::remote::OpError;

impl Driver {
    fn instance_appliance(&self, id: InstanceId) -> Option<ApplianceId> {
        self.engine
            .as_ref()?
            .state()
            .pair
            .get(id)
            .map(|i| i.appliance)
    }

    /// Executes a batch of commands. Commands that change control or stop instances run in
    /// order, in one task; starts and attaches (which wait for boots and syncs) run beside it.
    pub(super) fn execute(&mut self, commands: Vec<Command>) {
        let mut ordered = Vec::new();
        for c in commands {
            if c.must_run_in_order() {
                ordered.push(c);
                continue;
            }
            match c {
                Command::Report { progress } => {
                    match &progress {
                        Report::Stuck(s) => {
                            warn!(reason = %s.reason, resume = %s.resume_with, "ISSU needs the operator")
                        }
                        Report::Finished(o) => info!(?o, "ISSU finished"),
                        Report::Rejected { request, reason } => {
                            warn!(%request, %reason, "request rejected")
                        }
                        other => info!(report = ?other, "progress"),
                    }
                    self.progress(progress);
                }
                Command::StartInstance {
                    instance,
                    appliance,
                    image,
                } => {
                    let apps = self.apps.clone();
                    let tx = self.inputs.clone();
                    tokio::spawn(async move {
                        let r = apps.exec(appliance, Op::Start { instance, image }).await;
                        let input = match r.and_then(started) {
                            Ok(s) => Input::Started(Box::new(s)),
                            Err(e) => Input::Event(Event::InstanceFailed {
                                instance,
                                reason: e.to_string(),
                            }),
                        };
                        let _ = tx.send(input).await;
                    });
                }
                Command::AttachStandby {
                    standby,
                    active,
                    designated_ha,
                } => {
                    let (Some(s_app), Some(a)) = (
                        self.instance_appliance(standby),
                        self.instances.get(&active).cloned(),
                    ) else {
                        self.fail_async(
                            standby,
                            format!("cannot attach {standby} to {active}: unknown instance"),
                        );
                        continue;
                    };
                    let epoch = self.epoch();
                    let apps = self.apps.clone();
                    let tx = self.inputs.clone();
                    let poll = self.timing.poll;
                    tokio::spawn(async move {
                        let r = apps
                            .exec(
                                s_app,
                                Op::Control {
                                    instance: standby,
                                    command: standby_config(
                                        standby,
                                        epoch,
                                        &a.sync_addr,
                                        designated_ha,
                                    ),
                                },
                            )
                            .await;
                        let ev = match r {
                            Err(reason) => {
                                warn!(%standby, %reason, "standby attach failed");
                                Event::StandbyOutOfSync { instance: standby }
                            }
                            Ok(_) => ready_event(&apps, s_app, standby, poll, &tx).await,
                        };
                        let _ = tx.send(Input::Event(ev)).await;
                    });
                }
                Command::VerifyStandby { standby, .. } => {
                    let Some(s_app) = self.instance_appliance(standby) else {
                        continue;
                    };
                    let apps = self.apps.clone();
                    let tx = self.inputs.clone();
                    let poll = self.timing.poll;
                    tokio::spawn(async move {
                        let ev = ready_event(&apps, s_app, standby, poll, &tx).await;
                        let _ = tx.send(Input::Event(ev)).await;
                    });
                }
                Command::StandbyGone { active, standby } => {
                    if let Some(app) = self.instance_appliance(active) {
                        super::witness::tell_standby_gone(&self.apps, app, active, standby);
                    }
                }
                // Taken above; anything else runs in order too, the safe default.
                other => ordered.push(other),
            }
        }
        if ordered.is_empty() {
            return;
        }
        // Context the ordered commands need, captured now.
        let ctx = self.switch_context();
        for c in &ordered {
            if let Command::StopInstance { instance } = c {
                self.stopping.insert(*instance, ());
            }
        }
        let apps = self.apps.clone();
        let tx = self.inputs.clone();
        let timing = self.timing.clone();
        let witness = self.witness.clone();
        tokio::spawn(async move {
            for c in ordered {
                if let Command::Witness { change } = c {
                    let ev = super::witness::decide(witness.as_ref(), change).await;
                    let _ = tx.send(Input::Event(ev)).await;
                    continue;
                }
                let inputs = run_ordered(&apps, &ctx, &timing, c).await;
                for i in inputs {
                    let _ = tx.send(i).await;
                }
            }
        });
    }

    fn fail_async(&self, instance: InstanceId, reason: String) {
        let tx = self.inputs.clone();
        tokio::spawn(async move {
            let _ = tx
                .send(Input::Event(Event::InstanceFailed { instance, reason }))
                .await;
        });
    }
}

pub(super) fn started(r: OpOk) -> Result<Started, OpError> {
    match r {
        OpOk::Started(s) => Ok(*s),
        other => Err(OpError::unexpected("a started instance", &other)),
    }
}

/// Polls a standby until it reports sufficient state; reports progress on the way.
async fn ready_event(
    apps: &Appliances,
    app: ApplianceId,
    standby: InstanceId,
    poll: Duration,
    tx: &mpsc::Sender<Input>,
) -> Event {
    // Bounded: the engine's own step timer also bounds the wait; this loop gives up after
    // ten minutes regardless.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    let mut last_report = tokio::time::Instant::now();
    while tokio::time::Instant::now() < deadline {
        match as_status(apps.exec(app, Op::Status { instance: standby }).await) {
            Ok(s) => {
                let applied = s
                    .services
                    .values()
                    .map(|x| x.applied_seq)
                    .min()
                    .unwrap_or(0);
                let lag = s.services.values().map(|x| x.lag).max().unwrap_or(0);
                if s.ready {
                    // The engine judges sufficient state on the latest lag it was told:
                    // report the lag at the moment of readiness first.
                    let _ = tx
                        .send(Input::Event(Event::SyncProgress {
                            instance: standby,
                            applied_seq: applied,
                            lag,
                        }))
                        .await;
                    let seq = s
                        .services
                        .values()
                        .filter_map(|x| x.digest_verified_at)
                        .min()
                        .unwrap_or(s.acked_seq);
                    return Event::SyncReady {
                        instance: standby,
                        seq,
                        digest_ok: true,
                    };
                }
                if last_report.elapsed() >= Duration::from_millis(250) {
                    last_report = tokio::time::Instant::now();
                    let _ = tx
                        .send(Input::Event(Event::SyncProgress {
                            instance: standby,
                            applied_seq: applied,
                            lag,
                        }))
                        .await;
                }
            }
            Err(e) => {
                return Event::InstanceFailed {
                    instance: standby,
                    reason: e.to_string(),
                }
            }
        }
        tokio::time::sleep(poll).await;
    }
    Event::StandbyOutOfSync { instance: standby }
}

/// Runs one ordered command; returns the inputs it produces.
async fn run_ordered(
    apps: &Appliances,
    ctx: &SwitchContext,
    timing: &DriverTiming,
    c: Command,
) -> Vec<Input> {
    match c {
        Command::StopInstance { instance } => {
            let app = match ctx.app(instance) {
                Ok(a) => a,
                Err(_) => return vec![Input::Event(Event::InstanceStopped { instance })],
            };
            match apps.exec(app, Op::Stop { instance }).await {
                Ok(_) => vec![Input::Event(Event::InstanceStopped { instance })],
                Err(e) => {
                    error!(%instance, "stop failed: {e}");
                    // The exit watcher still reports the end; a failed stop is reported as
                    // stopped only once the instance is really gone.
                    vec![]
                }
            }
        }
        Command::Fence { instance, epoch } => {
            if let Ok(app) = ctx.app(instance) {
                let r = apps
                    .exec(
                        app,
                        Op::Control {
                            instance,
                            command: AgentCommand::Fence { epoch },
                        },
                    )
                    .await;
                if let Err(e) = r {
                    debug!(%instance, "fence not delivered (instance unreachable): {e}");
                }
            }
            vec![]
        }
        Command::Failover { to, epoch } => match failover(apps, ctx, to, epoch).await {
            Ok(()) => vec![Input::Event(Event::ControlSwitched { to, epoch })],
            Err(e) => vec![Input::Event(Event::SwitchFailed {
                to,
                epoch,
                reason: e.to_string(),
            })],
        },
        Command::SwitchControl { from, to, epoch } => {
            match switchover(apps, ctx, timing, from, to, epoch).await {
                Ok(()) => vec![Input::Event(Event::ControlSwitched { to, epoch })],
                Err(reason) => {
                    warn!(%from, %to, epoch = epoch.0, %reason, "planned switchover failed");
                    // Release the hold on both fronts: control stays where it was.
                    for app in ApplianceId::ALL {
                        if let Ok(s) = ctx.started(from) {
                            let _ = apps
                                .exec(
                                    app,
                                    Op::FrontRoute {
                                        route: Route {
                                            epoch: previous(epoch),
                                            backend: Some(s.service_addr),
                                            hold: false,
                                        },
                                        listen: app == s.appliance,
                                        protocol: Some(s.protocol),
                                    },
                                )
                                .await;
                        }
                    }
                    vec![Input::Event(Event::SwitchFailed {
                        to,
                        epoch,
                        reason: reason.to_string(),
                    })]
                }
            }
        }
        Command::StandDown { epoch, .. } => vec![Input::StandDown(epoch)],
        other => {
            warn!(?other, "command not executable in order");
            vec![]
        }
    }
}
