//! Whether replicated state can flow between a running image and an upgrade target, in both
//! directions.
//!
//! For each replicated service, state flows from a *sender* (the instance in control) to a
//! *receiver* (its standby). A stream version `v` is usable when the sender can write `v` and
//! the receiver can both read and write `v` (the receiver computes state digests in the stream
//! version). Among usable versions the receiver's native version is preferred, then the
//! sender's, then the highest the sender writes — the same rule the state-sync layer applies
//! when it negotiates a connection.
//!
//! An upgrade keeps a stateful fallback only if every service flows both ways: running -> target
//! (the new version follows the old) and target -> running (the old version follows the new,
//! so control can move back).
//!
//! Neither direction is possible when the two images speak different client protocols
//! ([`crate::service::Protocol`]): the front carries clients from one instance to the other
//! by the protocol's message boundaries, so an upgrade must keep the protocol.

use std::collections::BTreeSet;
use std::fmt;

use serde::Serialize;

use crate::manifest::{fmt_set, Manifest, SchemaDecl};
use crate::service::Protocol;

/// The client protocols of two images that differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ProtocolChange {
    /// The running image's protocol.
    pub running: Protocol,
    /// The target image's protocol.
    pub target: Protocol,
}

/// Why state of one service cannot flow in one direction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Blocker {
    /// The sending image does not declare the service.
    MissingOnSender,
    /// The receiving image does not declare the service.
    MissingOnReceiver,
    /// No version is written by the sender and read and written by the receiver.
    NoCommonVersion {
        /// Versions the sender writes.
        sender_writes: BTreeSet<u32>,
        /// Versions the receiver reads.
        receiver_reads: BTreeSet<u32>,
        /// Versions the receiver writes.
        receiver_writes: BTreeSet<u32>,
    },
}

impl fmt::Display for Blocker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Blocker::MissingOnSender => {
                f.write_str("the sending image does not declare this service")
            }
            Blocker::MissingOnReceiver => {
                f.write_str("the receiving image does not declare this service")
            }
            Blocker::NoCommonVersion {
                sender_writes,
                receiver_reads,
                receiver_writes,
            } => write!(
                f,
                "no common version: the sender writes {}, the receiver reads {} and writes {}",
                fmt_set(sender_writes),
                fmt_set(receiver_reads),
                fmt_set(receiver_writes)
            ),
        }
    }
}

/// The verdict for one service in one direction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Flow {
    /// State flows, in this stream version.
    Negotiated {
        /// The negotiated stream version.
        version: u32,
    },
    /// State cannot flow.
    Blocked {
        /// Why.
        #[serde(flatten)]
        blocker: Blocker,
    },
}

impl Flow {
    /// The negotiated version, if state flows.
    pub fn version(&self) -> Option<u32> {
        match self {
            Flow::Negotiated { version } => Some(*version),
            Flow::Blocked { .. } => None,
        }
    }
}

impl fmt::Display for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Flow::Negotiated { version } => write!(f, "ok (schema version {version})"),
            Flow::Blocked { blocker } => write!(f, "blocked: {blocker}"),
        }
    }
}

/// Both directions for one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceCompat {
    /// The service.
    pub service: String,
    /// Running image (sender) to target image (receiver).
    pub forward: Flow,
    /// Target image (sender) back to running image (receiver).
    pub backward: Flow,
}

/// The result of [`check`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CompatReport {
    /// `name version` of the running image.
    pub running: String,
    /// `name version` of the target image.
    pub target: String,
    /// One entry per service declared by either image, sorted by name.
    pub services: Vec<ServiceCompat>,
    /// Set when the images speak different client protocols: nothing flows either way.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol_change: Option<ProtocolChange>,
}

impl CompatReport {
    /// Every service's state flows from the running image to the target.
    pub fn forward_ok(&self) -> bool {
        self.protocol_change.is_none()
            && self.services.iter().all(|s| s.forward.version().is_some())
    }

    /// Every service's state flows from the target back to the running image.
    pub fn backward_ok(&self) -> bool {
        self.protocol_change.is_none()
            && self.services.iter().all(|s| s.backward.version().is_some())
    }

    /// State flows both ways: the upgrade keeps a stateful fallback.
    pub fn both_ways(&self) -> bool {
        self.forward_ok() && self.backward_ok()
    }

    /// One sentence per blocked service and direction.
    pub fn blockers(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(c) = &self.protocol_change {
            out.push(protocol_blocker(c, &self.running, &self.target));
        }
        for s in &self.services {
            for (dir, flow, from, to) in [
                ("forward", &s.forward, &self.running, &self.target),
                ("backward", &s.backward, &self.target, &self.running),
            ] {
                if let Flow::Blocked { blocker } = flow {
                    out.push(format!(
                        "service {} cannot flow {dir} ({from} -> {to}): {blocker}",
                        s.service
                    ));
                }
            }
        }
        out
    }
}

impl fmt::Display for CompatReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = match (self.forward_ok(), self.backward_ok()) {
            (true, true) => "compatible both ways",
            (true, false) => "compatible forward only (no stateful fallback)",
            (false, true) => "compatible backward only (cannot upgrade statefully)",
            (false, false) => "incompatible",
        };
        writeln!(f, "{} -> {}: {verdict}", self.running, self.target)?;
        if let Some(c) = &self.protocol_change {
            writeln!(f, "  {}", protocol_blocker(c, &self.running, &self.target))?;
        }
        for s in &self.services {
            writeln!(
                f,
                "  {}: forward {}; backward {}",
                s.service, s.forward, s.backward
            )?;
        }
        Ok(())
    }
}

fn protocol_blocker(c: &ProtocolChange, running: &str, target: &str) -> String {
    format!(
        "the client protocol changes from {} ({running}) to {} ({target}): the front cannot carry clients across a change of protocol, so neither image can take over from the other",
        c.running, c.target
    )
}

/// Negotiates the stream version from `sender` to `receiver` (see the module docs).
pub fn negotiate(sender: &SchemaDecl, receiver: &SchemaDecl) -> Flow {
    let ok = |v: u32| {
        sender.writes.contains(&v) && receiver.reads.contains(&v) && receiver.writes.contains(&v)
    };
    let pick = [receiver.native, sender.native]
        .into_iter()
        .find(|v| ok(*v))
        .or_else(|| sender.writes.iter().rev().copied().find(|v| ok(*v)));
    match pick {
        Some(version) => Flow::Negotiated { version },
        None => Flow::Blocked {
            blocker: Blocker::NoCommonVersion {
                sender_writes: sender.writes.clone(),
                receiver_reads: receiver.reads.clone(),
                receiver_writes: receiver.writes.clone(),
            },
        },
    }
}

fn flow(sender: Option<&SchemaDecl>, receiver: Option<&SchemaDecl>) -> Flow {
    match (sender, receiver) {
        (Some(s), Some(r)) => negotiate(s, r),
        (None, _) => Flow::Blocked {
            blocker: Blocker::MissingOnSender,
        },
        (_, None) => Flow::Blocked {
            blocker: Blocker::MissingOnReceiver,
        },
    }
}

/// Checks whether every replicated service's state can flow from `running` to `target` and
/// back.
pub fn check(running: &Manifest, target: &Manifest) -> CompatReport {
    let names: BTreeSet<&String> = running
        .schemas
        .keys()
        .chain(target.schemas.keys())
        .collect();
    let services = names
        .into_iter()
        .map(|svc| {
            let r = running.schemas.get(svc);
            let t = target.schemas.get(svc);
            ServiceCompat {
                service: svc.clone(),
                forward: flow(r, t),
                backward: flow(t, r),
            }
        })
        .collect();
    CompatReport {
        running: format!("{} {}", running.name, running.version),
        target: format!("{} {}", target.name, target.version),
        services,
        protocol_change: (running.service.protocol != target.service.protocol).then_some(
            ProtocolChange {
                running: running.service.protocol,
                target: target.service.protocol,
            },
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Entrypoint, Kind};
    use crate::service::ServiceContract;
    use std::collections::BTreeMap;

    fn decl(writes: &[u32], reads: &[u32], native: u32) -> SchemaDecl {
        SchemaDecl {
            reads: reads.iter().copied().collect(),
            writes: writes.iter().copied().collect(),
            native,
        }
    }

    fn manifest(version: &str, schemas: &[(&str, SchemaDecl)]) -> Manifest {
        Manifest {
            format: 1,
            name: "kvd".into(),
            version: version.parse().unwrap(),
            kind: Kind::Process,
            entrypoint: Entrypoint {
                path: "bin/kvd".into(),
                args: vec![],
            },
            service: ServiceContract::legacy(Kind::Process, &[]),
            schemas: schemas
                .iter()
                .map(|(k, d)| (k.to_string(), d.clone()))
                .collect::<BTreeMap<_, _>>(),
            vm: None,
            files: [("bin/kvd".to_string(), "0".repeat(64))].into(),
        }
    }

    #[test]
    fn compatible_both_ways_with_negotiated_versions() {
        // v1 knows only schema 1; v2 stores 2 natively, reads 1 and 2, and can downgrade to 1.
        let old = manifest("1.0.0", &[("kv", decl(&[1], &[1], 1))]);
        let new = manifest("2.0.0", &[("kv", decl(&[1, 2], &[1, 2], 2))]);
        let r = check(&old, &new);
        assert!(r.both_ways(), "{r}");
        assert_eq!(r.services[0].forward, Flow::Negotiated { version: 1 });
        assert_eq!(r.services[0].backward, Flow::Negotiated { version: 1 });
        assert!(r.blockers().is_empty());
        // Same version on both sides negotiates the native version.
        let r = check(&new, &new);
        assert_eq!(r.services[0].forward, Flow::Negotiated { version: 2 });
        assert!(r.to_string().contains("compatible both ways"));
    }

    #[test]
    fn service_new_in_target_blocks_both_directions() {
        let running = manifest("1.0.0", &[("kv", decl(&[1], &[1], 1))]);
        let target = manifest(
            "2.0.0",
            &[
                ("kv", decl(&[1, 2], &[1, 2], 2)),
                ("audit", decl(&[1], &[1], 1)),
            ],
        );
        let r = check(&running, &target);
        // kv flows both ways; audit is new in the target: nothing to send forward, and the old
        // image cannot hold it on the way back.
        let audit = r.services.iter().find(|s| s.service == "audit").unwrap();
        assert_eq!(
            audit.forward,
            Flow::Blocked {
                blocker: Blocker::MissingOnSender
            }
        );
        assert_eq!(
            audit.backward,
            Flow::Blocked {
                blocker: Blocker::MissingOnReceiver
            }
        );
        assert!(!r.both_ways());
        let b = r.blockers();
        assert_eq!(b.len(), 2);
        assert!(
            b[1].contains("service audit cannot flow backward (kvd 2.0.0 -> kvd 1.0.0)"),
            "{b:?}"
        );
    }

    #[test]
    fn one_way_verdict() {
        // Running writes 1 and 2; target reads and writes 2 only. Forward negotiates 2.
        // Target writes only 2; running reads only 1 -> backward blocked.
        let running = manifest("1.0.0", &[("kv", decl(&[1, 2], &[1], 1))]);
        let target = manifest("2.0.0", &[("kv", decl(&[2], &[2], 2))]);
        let r = check(&running, &target);
        assert!(r.forward_ok());
        assert!(!r.backward_ok());
        assert_eq!(r.services[0].forward, Flow::Negotiated { version: 2 });
        match &r.services[0].backward {
            Flow::Blocked {
                blocker:
                    Blocker::NoCommonVersion {
                        sender_writes,
                        receiver_reads,
                        ..
                    },
            } => {
                assert_eq!(sender_writes, &BTreeSet::from([2]));
                assert_eq!(receiver_reads, &BTreeSet::from([1]));
            }
            other => panic!("expected no common version, got {other}"),
        }
        assert!(r.to_string().contains("forward only"), "{r}");
        assert!(
            r.blockers()[0].contains("sender writes {2}, the receiver reads {1}"),
            "{:?}",
            r.blockers()
        );
    }

    #[test]
    fn none_either_way() {
        let running = manifest("1.0.0", &[("kv", decl(&[1], &[1], 1))]);
        let target = manifest("2.0.0", &[("kv", decl(&[2], &[2], 2))]);
        let r = check(&running, &target);
        assert!(!r.forward_ok() && !r.backward_ok());
        assert!(r.to_string().contains("incompatible"));
        assert_eq!(r.blockers().len(), 2);
    }

    #[test]
    fn preference_receiver_native_then_sender_native_then_highest() {
        let s = decl(&[1, 2, 3], &[1, 2, 3], 3);
        let r = decl(&[1, 2, 3], &[1, 2, 3], 2);
        assert_eq!(negotiate(&s, &r).version(), Some(2));
        let r = decl(&[1, 3], &[1, 3], 1);
        let s2 = decl(&[1, 3], &[1, 3], 3);
        assert_eq!(negotiate(&s2, &r).version(), Some(1));
        let r = decl(&[1, 2, 5], &[1, 2, 5], 5);
        let s = decl(&[1, 2, 3], &[1, 2, 3], 3);
        assert_eq!(negotiate(&s, &r).version(), Some(2));
    }

    #[test]
    fn a_change_of_protocol_blocks_both_directions_with_a_reason() {
        let running = manifest("1.0.0", &[("kv", decl(&[1], &[1], 1))]);
        let mut target = manifest("1.1.0", &[("kv", decl(&[1], &[1], 1))]);
        // Same schemas, same protocol: compatible.
        assert!(check(&running, &target).both_ways());
        target.service.protocol = Protocol::LengthPrefixed;
        let r = check(&running, &target);
        assert!(!r.forward_ok() && !r.backward_ok(), "{r}");
        assert_eq!(
            r.protocol_change,
            Some(ProtocolChange {
                running: Protocol::Resp,
                target: Protocol::LengthPrefixed
            })
        );
        let b = r.blockers();
        assert_eq!(b.len(), 1, "{b:?}");
        assert!(
            b[0].contains(
                "client protocol changes from resp (kvd 1.0.0) to length-prefixed (kvd 1.1.0)"
            ),
            "{b:?}"
        );
        assert!(r.to_string().contains("incompatible"), "{r}");
        // The schemas alone still negotiate: only the protocol blocks.
        assert_eq!(r.services[0].forward, Flow::Negotiated { version: 1 });
    }
}
