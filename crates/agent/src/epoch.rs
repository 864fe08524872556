//! Control-epoch arithmetic the agent needs beyond [`ControlEpoch`] itself.
//!
//! Every control epoch in the agent, the CLI, the control channel (`hitless-control`) and the
//! sync library (`hitless_sync::Epoch`) is the same [`ControlEpoch`] type (from the
//! `hitless-epoch` crate), so no conversion happens at the agent's boundary with the SDK
//! crates. On every wire the epoch is its plain number (`ControlEpoch` is
//! `#[serde(transparent)]`).

use hitless_core::ControlEpoch;

/// The epoch before `epoch`: the one a planned switchover to `epoch` moves control from
/// (the first epoch has none before it and stays itself).
pub fn previous(epoch: ControlEpoch) -> ControlEpoch {
    ControlEpoch(epoch.0.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previous_is_one_before_and_never_wraps() {
        assert_eq!(previous(ControlEpoch(5)), ControlEpoch(4));
        assert_eq!(previous(ControlEpoch(5)).next(), ControlEpoch(5));
        assert_eq!(previous(ControlEpoch(0)), ControlEpoch(0));
    }
}
