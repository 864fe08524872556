//! Memory planning: an upgrade that would not fit is refused before it starts.
//!
//! Every instance an upgrade starts (the extras, the new version, the old version's
//! replacement) receives a whole copy of the state, and the instance in control keeps serving
//! while it sends it. So before it starts anything, the driver asks the instance in control
//! and its HA standby what they use ([`MemoryUse`]: resident memory, records, limit) and checks
//! that an instance of the same state fits its limit with [`HEADROOM_PERCENT`] to spare: room
//! for the live stream and the bulk transfer's buffers while it attaches, and for the target
//! version's representation of the same records (which may differ from the running one's). A
//! service that reports no memory use is not planned for (the driver logs it).

use hitless_control::MemoryUse;
use hitless_core::{ApplianceId, InstanceId, Pair, Role};
use tracing::info;

use crate::appliance::{as_status, Op};
use crate::driver::Appliances;

/// How much more than the instance in control's resident memory a new instance may need.
pub const HEADROOM_PERCENT: u64 = 50;

const MIB: u64 = 1024 * 1024;

/// Checks that an instance holding the same state as `id` (on `app`, using `m`) fits its
/// limit with headroom; the error is a sentence naming the instance, the need and the limit.
pub fn check_fits(app: ApplianceId, id: InstanceId, m: &MemoryUse) -> Result<(), String> {
    let Some(limit) = m.limit_bytes else {
        return Ok(());
    };
    let need = m.rss_bytes.saturating_mul(100 + HEADROOM_PERCENT) / 100;
    if need <= limit {
        return Ok(());
    }
    Err(format!(
        "the upgrade would not fit in memory: instance {id} on the {app} appliance holds {} \
         records in {} MiB, and each instance the upgrade starts holds the same state, which \
         needs about {} MiB with {HEADROOM_PERCENT}% headroom, over the instance memory limit \
         of {} MiB; raise [instances] memory_mib to at least {} on both appliances (or reduce \
         the state) and try again; nothing was started",
        m.records,
        m.rss_bytes.div_ceil(MIB),
        need.div_ceil(MIB),
        limit / MIB,
        need.div_ceil(MIB),
    ))
}

/// Asks the instance in control and the HA standby of `pair` for their memory use and checks
/// that the instances an upgrade starts would fit ([`check_fits`]).
pub async fn check_pair(apps: &Appliances, pair: &Pair) -> Result<(), String> {
    let ids: Vec<(ApplianceId, InstanceId)> = pair
        .instances
        .iter()
        .filter(|i| i.state.is_up() && matches!(i.role, Role::InControl | Role::HaStandby))
        .map(|i| (i.appliance, i.id))
        .collect();
    for (app, id) in ids {
        let status = as_status(apps.exec(app, Op::Status { instance: id }).await)
            .map_err(|e| format!("cannot plan the upgrade's memory: {e}"))?;
        match status.memory {
            Some(m) => check_fits(app, id, &m)?,
            None => info!(instance = %id, "the instance reports no memory use: not planned for"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn use_of(rss_mib: u64, limit_mib: Option<u64>) -> MemoryUse {
        MemoryUse {
            rss_bytes: rss_mib * MIB,
            limit_bytes: limit_mib.map(|l| l * MIB),
            records: 1_000_000,
        }
    }

    #[test]
    fn an_instance_that_fits_with_headroom_passes() {
        assert!(check_fits(ApplianceId::Primary, InstanceId(1), &use_of(300, Some(512))).is_ok());
        assert!(check_fits(ApplianceId::Primary, InstanceId(1), &use_of(400, None)).is_ok());
    }

    #[test]
    fn an_instance_without_headroom_is_refused_with_the_need_and_the_limit() {
        let e = check_fits(
            ApplianceId::Secondary,
            InstanceId(2),
            &use_of(403, Some(512)),
        )
        .unwrap_err();
        assert!(e.contains("instance i2 on the secondary appliance"), "{e}");
        assert!(e.contains("1000000 records in 403 MiB"), "{e}");
        assert!(e.contains("about 605 MiB"), "{e}");
        assert!(e.contains("limit of 512 MiB"), "{e}");
        assert!(e.contains("memory_mib to at least 605"), "{e}");
    }
}
