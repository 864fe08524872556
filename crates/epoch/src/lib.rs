//! The control epoch: the fencing token every part of hitless agrees on.
//!
//! It lives in its own dependency-free crate so that the SDK crates a service links (the sync
//! library and the control channel) carry the same type as the engine, the agent and the CLI
//! without depending on the core crate.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Fencing token. It strictly increases on every change of control; an instance acting for an
/// older epoch is rejected.
///
/// On every wire it is the plain number (`#[serde(transparent)]`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct ControlEpoch(pub u64);

impl ControlEpoch {
    /// The next epoch.
    pub fn next(self) -> Self {
        ControlEpoch(self.0 + 1)
    }
}

impl fmt::Display for ControlEpoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "e{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_as_the_plain_number() {
        assert_eq!(serde_json::to_string(&ControlEpoch(7)).unwrap(), "7");
        let e: ControlEpoch = serde_json::from_str("42").unwrap();
        assert_eq!(e, ControlEpoch(42));
    }

    #[test]
    fn displays_with_an_e_prefix_and_next_adds_one() {
        assert_eq!(ControlEpoch(5).to_string(), "e5");
        assert_eq!(ControlEpoch(5).next(), ControlEpoch(6));
        assert!(ControlEpoch(5) < ControlEpoch(5).next());
    }
}
