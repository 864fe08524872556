//! Operator requests: upgrade, abort, rollback, commit, resume.

use hitless_core::{ApplianceId, Event, Report};

use super::{Driver, OperatorRequest};
use crate::appliance::{Op, OpOk};

impl Driver {
    pub(super) async fn operator(&mut self, request: OperatorRequest) -> Result<String, String> {
        if self.engine.is_none() {
            return Err(format!(
                "the {} agent does not drive the pair now; send the request to the peer agent",
                self.me
            ));
        }
        match request {
            OperatorRequest::Upgrade { image_dir } => {
                // Both appliances verify the image and add it to their catalogs.
                let (p, s) = tokio::join!(
                    self.apps.exec(
                        ApplianceId::Primary,
                        Op::AddImage {
                            dir: image_dir.clone()
                        }
                    ),
                    self.apps.exec(
                        ApplianceId::Secondary,
                        Op::AddImage {
                            dir: image_dir.clone()
                        }
                    )
                );
                let mut catalog_ref = None;
                for (app, r) in [(ApplianceId::Primary, p), (ApplianceId::Secondary, s)] {
                    match r {
                        Ok(OpOk::Added { image }) => catalog_ref = Some(image),
                        Ok(other) => return Err(format!("unexpected answer {other:?}")),
                        Err(e) => {
                            return Err(format!("the {app} appliance cannot use the image: {e}"))
                        }
                    }
                }
                let catalog_ref = catalog_ref.expect("both appliances answered");
                let engine = self.engine.as_ref().expect("driving");
                let running = engine
                    .state()
                    .pair
                    .control()
                    .map(|i| i.image.clone())
                    .ok_or("no instance is in control; nothing to upgrade")?;
                let verdict = self
                    .apps
                    .local
                    .catalog()
                    .compat(&running, &catalog_ref)
                    .map_err(|e| e.to_string())?;
                if !(verdict.upgrade_ok && verdict.downgrade_ok) {
                    return Err(format!(
                        "image {} {} is not compatible with the running {} {} in both directions: {}",
                        catalog_ref.name, catalog_ref.version, running.name, running.version, verdict.detail
                    ));
                }
                let pair = self.engine.as_ref().expect("driving").state().pair.clone();
                crate::plan::check_pair(&self.apps, &pair).await?;
                self.feed(Event::Compatibility { verdict })?;
                self.feed(Event::Start {
                    target: catalog_ref.clone(),
                })?;
                self.check_rejected("start").map(|_| {
                    format!(
                        "upgrade to {} {} started",
                        catalog_ref.name, catalog_ref.version
                    )
                })
            }
            OperatorRequest::Abort => self.simple(Event::Abort, "abort"),
            OperatorRequest::Rollback => self.simple(Event::Rollback, "rollback"),
            OperatorRequest::Commit => self.simple(Event::Commit, "commit"),
            OperatorRequest::Resume => self.simple(Event::Resume, "resume"),
        }
    }

    fn simple(&mut self, e: Event, name: &str) -> Result<String, String> {
        self.feed(e)?;
        self.check_rejected(name)
            .map(|_| format!("{name} accepted"))
    }

    /// Whether the last progress line is a rejection of `request`.
    fn check_rejected(&self, request: &str) -> Result<(), String> {
        let v = self.view.lock().expect("view lock");
        for line in v.progress.iter().rev().take(4) {
            if let Report::Rejected { request: r, reason } = &line.report {
                if r.contains(request) {
                    return Err(reason.clone());
                }
            }
        }
        Ok(())
    }
}
