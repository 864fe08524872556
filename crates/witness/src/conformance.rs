//! The behaviour every [`Witness`] implementation must have, as one suite each
//! implementation's tests run against a fresh pair record.
//!
//! `a` and `b` are two clients of the same, empty record (the two appliances of a pair).
//! Lease checks use short leases (a few hundred milliseconds) and real time.

use std::collections::BTreeSet;
use std::time::Duration;

use hitless_core::{ControlEpoch, InstanceId};

use crate::{change, Cas, Decided, Lease, Versioned, Witness, WitnessChange, WitnessRecord};

/// Runs every check below in order on a fresh record.
pub async fn run_all(a: &dyn Witness, b: &dyn Witness) {
    an_empty_witness_reads_revision_zero(a).await;
    compare_and_swap_is_refused_on_a_stale_revision(a, b).await;
    of_two_racing_changes_exactly_one_lands(a, b).await;
    leases_exclude_other_holders_until_released_or_expired(a, b).await;
}

fn rec(epoch: u64, c: u64, set: &[u64]) -> WitnessRecord {
    WitnessRecord {
        epoch: ControlEpoch(epoch),
        in_control: Some(InstanceId(c)),
        sync_set: set.iter().map(|i| InstanceId(*i)).collect(),
    }
}

/// A witness that never held the pair answers revision 0 and the default record.
pub async fn an_empty_witness_reads_revision_zero(a: &dyn Witness) {
    let v = a.read().await.expect("read");
    assert_eq!(v, Versioned::default(), "{}: a fresh record", a.endpoint());
}

/// Creation and updates name the revision they expect; a stale one changes nothing.
pub async fn compare_and_swap_is_refused_on_a_stale_revision(a: &dyn Witness, b: &dyn Witness) {
    let first = rec(1, 1, &[]);
    let r1 = match a.compare_and_swap(0, &first).await.expect("create") {
        Cas::Swapped { revision } => revision,
        Cas::Conflict(v) => panic!("creating the record conflicted with {v:?}"),
    };
    assert!(r1 > 0, "a written record has a revision above 0");
    match b
        .compare_and_swap(0, &rec(9, 9, &[]))
        .await
        .expect("second create")
    {
        Cas::Conflict(v) => assert_eq!(v.record, first, "the conflict carries the record"),
        Cas::Swapped { .. } => panic!("a second creation overwrote the record"),
    }
    let second = rec(1, 1, &[2]);
    let r2 = match b.compare_and_swap(r1, &second).await.expect("update") {
        Cas::Swapped { revision } => revision,
        Cas::Conflict(v) => panic!("an update at the current revision conflicted with {v:?}"),
    };
    assert!(r2 > r1, "revisions grow");
    match a
        .compare_and_swap(r1, &rec(5, 5, &[]))
        .await
        .expect("stale update")
    {
        Cas::Conflict(v) => assert_eq!(
            v,
            Versioned {
                record: second.clone(),
                revision: r2
            }
        ),
        Cas::Swapped { .. } => panic!("an update at a stale revision was written"),
    }
    let seen = a.read().await.expect("read");
    assert_eq!(
        seen,
        Versioned {
            record: second,
            revision: r2
        },
        "both clients see one record"
    );
}

/// A drop of the standby by the instance in control and its promotion by the other
/// appliance, sent at the same time: exactly one is granted.
pub async fn of_two_racing_changes_exactly_one_lands(a: &dyn Witness, b: &dyn Witness) {
    let v = a.read().await.expect("read");
    let (active, standby) = (InstanceId(1), InstanceId(2));
    assert!(
        v.record.sync_set.contains(&standby),
        "set up by the previous check"
    );
    let drop = WitnessChange::DropStandbys {
        active,
        epoch: v.record.epoch,
        standbys: BTreeSet::from([standby]),
    };
    let promote = WitnessChange::Promote {
        to: standby,
        at_least: v.record.epoch.next(),
    };
    let (d, p) = tokio::join!(change(a, &drop), change(b, &promote));
    let (d, p) = (d.expect("drop answered"), p.expect("promote answered"));
    let granted = [&d, &p]
        .iter()
        .filter(|x| matches!(x, Decided::Granted(_)))
        .count();
    assert_eq!(granted, 1, "drop {d:?}, promote {p:?}");
    let now = a.read().await.expect("read").record;
    if matches!(p, Decided::Granted(_)) {
        assert_eq!(now.in_control, Some(standby));
        assert!(now.epoch > v.record.epoch);
    } else {
        assert_eq!(now.in_control, Some(active));
        assert!(!now.sync_set.contains(&standby));
    }
}

/// One holder at a time; a renewal keeps it; a release or the expiry frees it.
pub async fn leases_exclude_other_holders_until_released_or_expired(
    a: &dyn Witness,
    b: &dyn Witness,
) {
    let ttl = Duration::from_millis(400);
    assert!(matches!(
        a.lease("primary", ttl).await.expect("lease"),
        Lease::Granted { .. }
    ));
    match b.lease("secondary", ttl).await.expect("lease") {
        Lease::Refused { retry_after, .. } => {
            assert!(
                retry_after <= ttl,
                "retry after {retry_after:?} exceeds the ttl"
            )
        }
        Lease::Granted { .. } => panic!("two holders of one lease"),
    }
    assert!(
        matches!(
            a.lease("primary", ttl).await.expect("renew"),
            Lease::Granted { .. }
        ),
        "the holder renews its own lease"
    );
    a.release("primary").await.expect("release");
    assert!(
        matches!(
            b.lease("secondary", ttl).await.expect("lease"),
            Lease::Granted { .. }
        ),
        "a released lease is free at once"
    );
    match a.lease("primary", ttl).await.expect("lease") {
        Lease::Refused { .. } => {}
        Lease::Granted { .. } => panic!("two holders of one lease"),
    }
    // etcd rounds TTLs up to whole seconds: wait out the longest.
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    assert!(
        matches!(
            a.lease("primary", ttl).await.expect("lease"),
            Lease::Granted { .. }
        ),
        "an expired lease is free"
    );
    a.release("primary").await.expect("release");
}
