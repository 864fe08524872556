//! The pair's lease on etcd.
//!
//! The key `/hitless/<pair>/lease` holds the holder's name and is attached to an etcd lease,
//! so etcd deletes it when the lease runs out. A request:
//!
//! * finds the key absent: grants a fresh etcd lease and puts the key with it, in a
//!   transaction that requires the key still absent;
//! * finds it held by the asker: renews the etcd lease once (keep-alive), or attaches a fresh
//!   one if the old one is gone or shorter than asked;
//! * finds it held by another: refuses, with the holder and the time its etcd lease has left.
//!
//! etcd leases count whole seconds: a TTL is rounded up to whole seconds (at least 1 s) and
//! the server may raise it to its minimum. The lease is held at etcd for at least the TTL
//! asked; [`Lease::Granted`] still reports the TTL asked, which is what the holder may count
//! on.

use std::time::Duration;

use etcd_client::{Compare, CompareOp, DeleteOptions, PutOptions, Txn, TxnOp, TxnOpResponse};

use super::EtcdWitness;
use crate::{Lease, WitnessError};

/// Longest holder name.
pub const MAX_HOLDER_LEN: usize = 64;
/// Longest TTL asked of etcd (a lease outliving a lost holder by more than this is a
/// configuration mistake).
pub const MAX_LEASE_SECS: u64 = 3_600;
/// How many times a request starts over when the key changed under it.
const LEASE_ROUNDS: usize = 4;

/// The whole seconds of an etcd lease covering `ttl`: rounded up, at least 1.
pub(super) fn lease_seconds(ttl: Duration) -> Result<i64, WitnessError> {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    if secs > MAX_LEASE_SECS {
        return Err(WitnessError::Config(format!(
            "a lease of {} ms is longer than {MAX_LEASE_SECS} s",
            ttl.as_millis()
        )));
    }
    Ok(secs.max(1) as i64)
}

pub(super) fn check_holder(holder: &str) -> Result<(), WitnessError> {
    if holder.is_empty() || holder.len() > MAX_HOLDER_LEN || holder.chars().any(char::is_control) {
        return Err(WitnessError::Config(format!(
            "{holder:?} is not a lease holder name of 1 to {MAX_HOLDER_LEN} printable characters"
        )));
    }
    Ok(())
}

/// Another holder's name as read from etcd, fit for a message.
fn holder_name(value: &[u8]) -> String {
    let s = String::from_utf8_lossy(&value[..value.len().min(MAX_HOLDER_LEN)]);
    s.chars().filter(|c| !c.is_control()).collect()
}

impl EtcdWitness {
    /// [`Witness::lease`](crate::Witness::lease), without its timeout.
    pub(super) async fn grant_lease(
        &self,
        holder: &str,
        ttl: Duration,
        secs: i64,
    ) -> Result<Lease, WitnessError> {
        let mut client = self.client.clone();
        let key = self.lease_key.as_str();
        for _ in 0..LEASE_ROUNDS {
            let got = client
                .get(key, None)
                .await
                .map_err(self.fail("reading the lease"))?;
            let Some(kv) = got.kvs().first() else {
                if self.attach_fresh(holder, secs, 0, 0).await? {
                    return Ok(Lease::Granted { ttl });
                }
                continue;
            };
            if kv.value() == holder.as_bytes() {
                if kv.lease() != 0 && self.renew(kv.lease(), secs).await? {
                    return Ok(Lease::Granted { ttl });
                }
                if self
                    .attach_fresh(holder, secs, kv.mod_revision(), kv.lease())
                    .await?
                {
                    return Ok(Lease::Granted { ttl });
                }
                continue;
            }
            let other = holder_name(kv.value());
            if kv.lease() == 0 {
                return Err(WitnessError::Protocol(format!(
                    "{key} names {other:?} without an etcd lease: it would never run out"
                )));
            }
            let left = client
                .lease_time_to_live(kv.lease(), None)
                .await
                .map_err(self.fail("reading the holder's lease"))?;
            if left.ttl() < 0 {
                // Revoked since the read: etcd deleted the key with it.
                continue;
            }
            // etcd reports whole seconds, truncated: the lease ends within ttl + 1 s. The
            // hint is capped at the asker's own TTL, so that a waiting appliance asks again
            // at least once per lease period.
            let upper = Duration::from_secs(left.ttl() as u64 + 1);
            return Ok(Lease::Refused {
                holder: Some(other),
                retry_after: upper.min(ttl),
            });
        }
        Err(WitnessError::Contended {
            rounds: LEASE_ROUNDS,
        })
    }

    /// Renews etcd lease `id` once if it is live and at least `secs` long.
    async fn renew(&self, id: i64, secs: i64) -> Result<bool, WitnessError> {
        let mut client = self.client.clone();
        let now = client
            .lease_time_to_live(id, None)
            .await
            .map_err(self.fail("reading the lease"))?;
        if now.ttl() < 0 || now.granted_ttl() < secs {
            return Ok(false);
        }
        match client.lease_keep_alive(id).await {
            Ok(_) => Ok(true),
            // The client's answer when etcd no longer knows the lease.
            Err(etcd_client::Error::LeaseKeepAliveError(_)) => Ok(false),
            Err(e) => Err(self.fail("renewing the lease")(e)),
        }
    }

    /// Grants a fresh etcd lease of `secs` and puts the key with it if the key is still at
    /// `seen` (0: absent). Revokes whichever lease ends up unused.
    async fn attach_fresh(
        &self,
        holder: &str,
        secs: i64,
        seen: i64,
        old: i64,
    ) -> Result<bool, WitnessError> {
        let mut client = self.client.clone();
        let key = self.lease_key.as_str();
        let granted = client
            .lease_grant(secs, None)
            .await
            .map_err(self.fail("granting a lease"))?;
        if !granted.error().is_empty() {
            return Err(WitnessError::Rejected(format!(
                "etcd refused a lease of {secs} s: {}",
                granted.error()
            )));
        }
        let cmp = if seen == 0 {
            Compare::create_revision(key, CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(key, CompareOp::Equal, seen)
        };
        let txn = Txn::new().when([cmp]).and_then([TxnOp::put(
            key,
            holder,
            Some(PutOptions::new().with_lease(granted.id())),
        )]);
        let put = client
            .txn(txn)
            .await
            .map_err(self.fail("taking the lease"))?;
        let unused = if put.succeeded() { old } else { granted.id() };
        if unused != 0 {
            if let Err(e) = client.lease_revoke(unused).await {
                // It runs out by itself; nothing is attached to it any more.
                tracing::debug!(lease = unused, error = %e, "an unused etcd lease was not revoked");
            }
        }
        Ok(put.succeeded())
    }

    /// [`Witness::release`](crate::Witness::release), without its timeout.
    pub(super) async fn release_lease(&self, holder: &str) -> Result<(), WitnessError> {
        let mut client = self.client.clone();
        let key = self.lease_key.as_str();
        let txn = Txn::new()
            .when([Compare::value(key, CompareOp::Equal, holder)])
            .and_then([TxnOp::delete(
                key,
                Some(DeleteOptions::new().with_prev_key()),
            )]);
        let resp = client
            .txn(txn)
            .await
            .map_err(self.fail("releasing the lease"))?;
        if !resp.succeeded() {
            return Ok(());
        }
        let lease = match resp.op_responses().first() {
            Some(TxnOpResponse::Delete(d)) => d.prev_kvs().first().map_or(0, |kv| kv.lease()),
            _ => 0,
        };
        if lease != 0 {
            if let Err(e) = client.lease_revoke(lease).await {
                // The key is gone already; the lease runs out by itself.
                tracing::debug!(lease, error = %e, "a released etcd lease was not revoked");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_ttls_round_up_to_whole_seconds_and_at_least_one() {
        let s = |ms| lease_seconds(Duration::from_millis(ms)).unwrap();
        assert_eq!(s(0), 1);
        assert_eq!(s(400), 1);
        assert_eq!(s(1_000), 1);
        assert_eq!(s(1_001), 2);
        assert_eq!(s(2_000), 2);
        assert!(lease_seconds(Duration::from_secs(MAX_LEASE_SECS + 1)).is_err());
    }

    #[test]
    fn holder_names_are_short_and_printable() {
        assert!(check_holder("primary").is_ok());
        assert!(check_holder("").is_err());
        assert!(check_holder("a\nb").is_err());
        assert!(check_holder(&"x".repeat(MAX_HOLDER_LEN + 1)).is_err());
        assert_eq!(holder_name(b"sec\x07ondary"), "secondary");
        assert_eq!(holder_name(&[b'y'; 500]).len(), MAX_HOLDER_LEN);
    }
}
