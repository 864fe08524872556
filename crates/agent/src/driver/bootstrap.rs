//! Bringing up the first pair.

use std::time::Duration;

use hitless_core::{ApplianceId, ControlEpoch, Engine, EngineError, ImageRef, InstanceId, Pair};
use thiserror::Error;
use tracing::info;

use super::execute::started;
use super::switch::route_to;
use super::{Appliances, Driver, JournalError};
use crate::appliance::{active_config, as_status, standby_config, Op};
use crate::remote::OpError;

/// Why the first pair could not be brought up.
#[derive(Debug, Error)]
pub enum BootstrapError {
    /// An op on one of the appliances failed.
    #[error(transparent)]
    Op(#[from] OpError),
    /// The HA standby did not become ready in time.
    #[error("instance {instance} was not ready within {bound:?}")]
    NotReady {
        instance: InstanceId,
        bound: Duration,
    },
    /// The engine refused the first pair.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The first transition could not be journaled.
    #[error(transparent)]
    Journal(#[from] JournalError),
}

impl Driver {
    /// Starts driving from scratch: brings up the first pair (active on the primary, HA
    /// standby on the secondary) on `image`.
    pub async fn bootstrap(&mut self, image: ImageRef) -> Result<(), BootstrapError> {
        let active = InstanceId(1);
        let standby = InstanceId(2);
        let epoch = ControlEpoch(1);
        info!(%image.name, version = %image.version, "bootstrapping the pair");
        let a = started(
            self.apps
                .exec(
                    ApplianceId::Primary,
                    Op::Start {
                        instance: active,
                        image: image.clone(),
                    },
                )
                .await?,
        )?;
        self.apps
            .exec(
                ApplianceId::Primary,
                Op::Control {
                    instance: active,
                    command: active_config(active, epoch),
                },
            )
            .await?;
        let b = started(
            self.apps
                .exec(
                    ApplianceId::Secondary,
                    Op::Start {
                        instance: standby,
                        image: image.clone(),
                    },
                )
                .await?,
        )?;
        self.apps
            .exec(
                ApplianceId::Secondary,
                Op::Control {
                    instance: standby,
                    command: standby_config(standby, epoch, &a.sync_addr, true),
                },
            )
            .await?;
        wait_ready(
            &self.apps,
            ApplianceId::Secondary,
            standby,
            Duration::from_secs(60),
            self.timing.poll,
        )
        .await?;
        route_to(&self.apps, epoch, &a).await?;
        self.instances.insert(active, a);
        self.instances.insert(standby, b);
        let engine = Engine::new(
            self.engine_config.clone(),
            Pair::steady(image, active, standby, epoch),
        )?;
        self.engine = Some(engine);
        self.record(None, vec![])?;
        self.publish();
        Ok(())
    }
}

async fn wait_ready(
    apps: &Appliances,
    app: ApplianceId,
    id: InstanceId,
    bound: Duration,
    poll: Duration,
) -> Result<(), BootstrapError> {
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let s = as_status(apps.exec(app, Op::Status { instance: id }).await)?;
        if s.ready {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(BootstrapError::NotReady {
                instance: id,
                bound,
            });
        }
        tokio::time::sleep(poll).await;
    }
}
