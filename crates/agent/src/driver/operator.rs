//! Operator requests: upgrade, abort, rollback, commit, resume.

use hitless_core::{ApplianceId, Event, ImageRef, Report};
use thiserror::Error;

use super::{Driver, JournalError, OperatorRequest};
use crate::appliance::{Op, OpOk};
use crate::images::CatalogError;
use crate::remote::OpError;

/// Why an operator request was not accepted.
#[derive(Debug, Error)]
pub enum OperatorError {
    /// The other agent drives the pair.
    #[error(
        "the {appliance} agent does not drive the pair now; send the request to the peer agent"
    )]
    NotDriving { appliance: ApplianceId },
    /// An appliance could not verify or register the upgrade's image.
    #[error("the {appliance} appliance cannot use the image: {source}")]
    ImageUnusable {
        appliance: ApplianceId,
        source: OpError,
    },
    /// An appliance answered the image registration with something else than an image.
    #[error("unexpected answer {got}")]
    UnexpectedAnswer { got: String },
    /// No instance is in control, so there is no running version to upgrade from.
    #[error("no instance is in control; nothing to upgrade")]
    NothingInControl,
    /// The catalog cannot compare the running image and the target.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// State does not flow both ways between the running image and the target.
    #[error(
        "image {} {} is not compatible with the running {} {} in both directions: {detail}",
        .target.name, .target.version, .running.name, .running.version
    )]
    Incompatible {
        target: ImageRef,
        running: ImageRef,
        detail: String,
    },
    /// The upgrade's memory plan refused it (the reason says what to change).
    #[error("{reason}")]
    Plan { reason: String },
    /// The engine rejected the request.
    #[error("{reason}")]
    Rejected { request: String, reason: String },
    /// The request's transition could not be journaled.
    #[error(transparent)]
    Journal(#[from] JournalError),
}

impl Driver {
    /// Handles one operator request; the answer is a sentence for the operator.
    pub(super) async fn operator(
        &mut self,
        request: OperatorRequest,
    ) -> Result<String, OperatorError> {
        if self.engine.is_none() {
            return Err(OperatorError::NotDriving { appliance: self.me });
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
                        Ok(other) => {
                            return Err(OperatorError::UnexpectedAnswer {
                                got: format!("{other:?}"),
                            })
                        }
                        Err(source) => {
                            return Err(OperatorError::ImageUnusable {
                                appliance: app,
                                source,
                            })
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
                    .ok_or(OperatorError::NothingInControl)?;
                let verdict = self.apps.local.catalog().compat(&running, &catalog_ref)?;
                if !(verdict.upgrade_ok && verdict.downgrade_ok) {
                    return Err(OperatorError::Incompatible {
                        target: catalog_ref,
                        running,
                        detail: verdict.detail,
                    });
                }
                let pair = self.engine.as_ref().expect("driving").state().pair.clone();
                crate::plan::check_pair(&self.apps, &pair)
                    .await
                    .map_err(|reason| OperatorError::Plan { reason })?;
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

    fn simple(&mut self, e: Event, name: &str) -> Result<String, OperatorError> {
        self.feed(e)?;
        self.check_rejected(name)
            .map(|_| format!("{name} accepted"))
    }

    /// Whether the last progress line is a rejection of `request`.
    fn check_rejected(&self, request: &str) -> Result<(), OperatorError> {
        let v = self.view.lock().expect("view lock");
        for line in v.progress.iter().rev().take(4) {
            if let Report::Rejected { request: r, reason } = &line.report {
                if r.contains(request) {
                    return Err(OperatorError::Rejected {
                        request: r.clone(),
                        reason: reason.clone(),
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(version: &str) -> ImageRef {
        ImageRef::new("kvd", version.parse().unwrap())
    }

    #[test]
    fn the_operator_reads_the_same_sentences_as_before() {
        let e = OperatorError::NotDriving {
            appliance: ApplianceId::Secondary,
        };
        assert_eq!(
            e.to_string(),
            "the secondary agent does not drive the pair now; send the request to the peer agent"
        );
        let e = OperatorError::Incompatible {
            target: image("2.0.0"),
            running: image("1.0.0"),
            detail: "the state schema changed".into(),
        };
        assert_eq!(
            e.to_string(),
            "image kvd 2.0.0 is not compatible with the running kvd 1.0.0 in both directions: \
             the state schema changed"
        );
        let e = OperatorError::Rejected {
            request: "start".into(),
            reason: "an upgrade is already running".into(),
        };
        assert_eq!(e.to_string(), "an upgrade is already running");
    }

    #[test]
    fn an_image_the_peer_cannot_use_names_the_appliance_and_keeps_the_op_error() {
        let e = OperatorError::ImageUnusable {
            appliance: ApplianceId::Secondary,
            source: OpError::PeerUnreachable {
                appliance: ApplianceId::Secondary,
                how: crate::remote::Unreachable::LinkDown,
            },
        };
        assert_eq!(
            e.to_string(),
            "the secondary appliance cannot use the image: the secondary appliance is unreachable"
        );
        let source = std::error::Error::source(&e).expect("the op error is the source");
        let op = source.downcast_ref::<OpError>().expect("an op error");
        assert!(op.peer_unreachable());
    }
}
