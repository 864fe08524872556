//! The control epoch at the agent's boundary with the SDK crates.
//!
//! Inside the agent (driver, front, peer link, API) and the CLI every control epoch is a
//! [`ControlEpoch`]. The control channel (`hitless-control`: the epochs of
//! `AgentCommand` and `InstanceStatus`) and the sync library (`hitless_sync::Epoch`) do not
//! depend on the core crate and carry the same number as a plain `u64`; these functions are
//! the only conversions between the two, so the agent crosses that boundary in one place.
//! On every wire the epoch is the same plain number either way (`ControlEpoch` is
//! `#[serde(transparent)]`).

use hitless_core::ControlEpoch;

/// The number the control channel and the sync library carry for `epoch`.
pub fn to_wire(epoch: ControlEpoch) -> u64 {
    epoch.0
}

/// The epoch a number read from the control channel or the sync library stands for.
pub fn from_wire(epoch: u64) -> ControlEpoch {
    ControlEpoch(epoch)
}

/// The epoch before `epoch`: the one a planned switchover to `epoch` moves control from
/// (the first epoch has none before it and stays itself).
pub fn previous(epoch: ControlEpoch) -> ControlEpoch {
    ControlEpoch(epoch.0.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_number_is_the_epoch_both_ways() {
        for n in [0, 1, 7, u64::MAX] {
            assert_eq!(to_wire(from_wire(n)), n);
            assert_eq!(from_wire(n), ControlEpoch(n));
        }
    }

    #[test]
    fn previous_is_one_before_and_never_wraps() {
        assert_eq!(previous(ControlEpoch(5)), ControlEpoch(4));
        assert_eq!(previous(ControlEpoch(5)).next(), ControlEpoch(5));
        assert_eq!(previous(ControlEpoch(0)), ControlEpoch(0));
    }
}
