//! The witness on etcd: a pair's record and lease kept in an etcd cluster.
//!
//! Supported: the etcd v3 API, etcd 3.4 and later (tested with etcd 3.4.23 as packaged by
//! Debian). Clients speak plain `http://` gRPC; TLS and etcd's user authentication are not
//! configurable yet.
//!
//! Per pair (`pair`, 1 to 64 letters, digits, `-` or `_`) it uses two keys:
//!
//! * `/hitless/<pair>/record`: the [`WitnessRecord`] as JSON. Its revision is the key's
//!   `mod_revision` (0 while the key is absent). A compare-and-swap is one etcd transaction
//!   (`mod_revision == expected`, or `create_revision == 0` for 0, then put; else get), which
//!   etcd commits through raft and fsyncs before it answers.
//! * `/hitless/<pair>/lease`: the lease holder's name, attached to an etcd lease, so that etcd
//!   deletes the key when the lease runs out (the steps are in `lease.rs`). etcd leases count
//!   whole seconds: a lease's TTL is rounded **up** to whole seconds, at least 1 s, and the
//!   server raises it further to its own minimum (1.5 election timeouts, rounded up: 2 s with
//!   etcd's default timings). [`Lease::Granted`] reports the TTL asked, which is what the
//!   holder may count on; a refusal's `retry_after` is the time the holder's etcd lease has
//!   left, capped at the asker's own TTL.
//!
//! The client needs read and write access to the keys under `/hitless/<pair>/` and the right
//! to grant, renew, inspect and revoke leases. Every call is bounded by the timeout given to
//! [`EtcdWitness::connect`] and fails with [`WitnessError::Unreachable`] past it.

mod errors;
mod lease;

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, KeyValue, Txn, TxnOp, TxnOpResponse,
};

use crate::{Cas, Lease, Versioned, Witness, WitnessError, WitnessKind, WitnessRecord};

/// Most endpoints a client is given.
pub const MAX_ENDPOINTS: usize = 16;
/// Longest pair name.
pub const MAX_PAIR_LEN: usize = 64;
/// Largest record value read (a record of [`hitless_core::witness::MAX_SYNC_SET`] instances
/// is a few hundred bytes).
pub const MAX_RECORD_BYTES: usize = 64 * 1024;

/// A client of one pair's record in an etcd cluster.
#[derive(Clone)]
pub struct EtcdWitness {
    client: Client,
    endpoints: Vec<String>,
    pair: String,
    record_key: String,
    lease_key: String,
    timeout: Duration,
}

impl std::fmt::Debug for EtcdWitness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdWitness")
            .field("endpoints", &self.endpoints)
            .field("pair", &self.pair)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl EtcdWitness {
    /// A client of `pair`'s record at the etcd cluster reached at `endpoints` (client URLs,
    /// `http://host:2379`). Each request, and the connection itself, is bounded by `timeout`.
    pub async fn connect(
        endpoints: Vec<String>,
        pair: String,
        timeout: Duration,
    ) -> Result<Self, WitnessError> {
        check_endpoints(&endpoints)?;
        check_pair(&pair)?;
        if timeout.is_zero() {
            return Err(WitnessError::Config(
                "the etcd request timeout must be above zero".into(),
            ));
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout);
        let joined = endpoints.join(",");
        let client =
            match tokio::time::timeout(timeout, Client::connect(endpoints.clone(), Some(options)))
                .await
            {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return Err(errors::connect_error(&joined, e)),
                Err(_) => {
                    return Err(WitnessError::Unreachable {
                        endpoint: joined,
                        detail: format!("no connection within {} ms", timeout.as_millis()),
                    })
                }
            };
        Ok(Self {
            client,
            record_key: format!("/hitless/{pair}/record"),
            lease_key: format!("/hitless/{pair}/lease"),
            endpoints,
            pair,
            timeout,
        })
    }

    /// The key holding the pair's record.
    pub fn record_key(&self) -> &str {
        &self.record_key
    }

    /// The key holding the pair's lease holder.
    pub fn lease_key(&self) -> &str {
        &self.lease_key
    }

    /// Runs one whole request (however many etcd calls it takes) within the timeout.
    async fn within<T>(
        &self,
        what: &str,
        fut: impl Future<Output = Result<T, WitnessError>>,
    ) -> Result<T, WitnessError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(WitnessError::Unreachable {
                endpoint: self.endpoint(),
                detail: format!("no answer to {what} within {} ms", self.timeout.as_millis()),
            }),
        }
    }

    /// Maps an etcd client error of `what` to a witness error.
    fn fail(&self, what: &str) -> impl Fn(etcd_client::Error) -> WitnessError + '_ {
        let what = what.to_string();
        move |e| errors::rpc_error(&self.endpoint(), &what, e)
    }
}

#[async_trait]
impl Witness for EtcdWitness {
    fn kind(&self) -> WitnessKind {
        WitnessKind::Etcd
    }

    fn endpoint(&self) -> String {
        self.endpoints.join(",")
    }

    async fn read(&self) -> Result<Versioned, WitnessError> {
        self.within("a read of the record", async {
            let resp = self
                .client
                .clone()
                .get(self.record_key.as_str(), None)
                .await
                .map_err(self.fail("reading the record"))?;
            match resp.kvs().first() {
                Some(kv) => decode_record(&self.record_key, kv),
                None => Ok(Versioned::default()),
            }
        })
        .await
    }

    async fn compare_and_swap(
        &self,
        expected: u64,
        record: &WitnessRecord,
    ) -> Result<Cas, WitnessError> {
        let value = serde_json::to_vec(record)
            .map_err(|e| WitnessError::Protocol(format!("the record cannot be encoded: {e}")))?;
        let cmp = if expected == 0 {
            Compare::create_revision(self.record_key.as_str(), CompareOp::Equal, 0)
        } else {
            let rev = i64::try_from(expected).map_err(|_| {
                WitnessError::Config(format!("revision {expected} is beyond any etcd revision"))
            })?;
            Compare::mod_revision(self.record_key.as_str(), CompareOp::Equal, rev)
        };
        let txn = Txn::new()
            .when([cmp])
            .and_then([TxnOp::put(self.record_key.as_str(), value, None)])
            .or_else([TxnOp::get(self.record_key.as_str(), None)]);
        self.within("a compare-and-swap of the record", async {
            let resp = self
                .client
                .clone()
                .txn(txn)
                .await
                .map_err(self.fail("writing the record"))?;
            if resp.succeeded() {
                let revision = resp
                    .header()
                    .map(|h| h.revision())
                    .and_then(|r| u64::try_from(r).ok())
                    .filter(|r| *r > expected)
                    .ok_or_else(|| {
                        WitnessError::Protocol(
                            "etcd answered a write without a revision above the expected one"
                                .into(),
                        )
                    })?;
                return Ok(Cas::Swapped { revision });
            }
            match resp.op_responses().first() {
                Some(TxnOpResponse::Get(g)) => match g.kvs().first() {
                    Some(kv) => Ok(Cas::Conflict(decode_record(&self.record_key, kv)?)),
                    None => Ok(Cas::Conflict(Versioned::default())),
                },
                _ => Err(WitnessError::Protocol(
                    "etcd answered a refused compare-and-swap without the current record".into(),
                )),
            }
        })
        .await
    }

    async fn lease(&self, holder: &str, ttl: Duration) -> Result<Lease, WitnessError> {
        lease::check_holder(holder)?;
        let secs = lease::lease_seconds(ttl)?;
        self.within("a lease request", self.grant_lease(holder, ttl, secs))
            .await
    }

    async fn release(&self, holder: &str) -> Result<(), WitnessError> {
        lease::check_holder(holder)?;
        self.within("a lease release", self.release_lease(holder))
            .await
    }
}

/// The record stored in `kv` (the value at `key`), checked.
fn decode_record(key: &str, kv: &KeyValue) -> Result<Versioned, WitnessError> {
    let revision = u64::try_from(kv.mod_revision())
        .ok()
        .filter(|r| *r > 0)
        .ok_or_else(|| {
            WitnessError::Protocol(format!(
                "etcd answered {key} with revision {}, not above 0",
                kv.mod_revision()
            ))
        })?;
    let record = parse_record(key, kv.value())?;
    Ok(Versioned { record, revision })
}

/// The record in `value`: JSON within [`MAX_RECORD_BYTES`] that passes
/// [`WitnessRecord::check`].
fn parse_record(key: &str, value: &[u8]) -> Result<WitnessRecord, WitnessError> {
    if value.len() > MAX_RECORD_BYTES {
        return Err(WitnessError::BadRecord(format!(
            "{key} holds {} bytes, more than {MAX_RECORD_BYTES}",
            value.len()
        )));
    }
    let record: WitnessRecord = serde_json::from_slice(value).map_err(|e| {
        WitnessError::BadRecord(format!("{key} does not hold a record's JSON: {e}"))
    })?;
    record
        .check()
        .map_err(|e| WitnessError::BadRecord(format!("{key}: {e}")))?;
    Ok(record)
}

fn check_endpoints(endpoints: &[String]) -> Result<(), WitnessError> {
    if endpoints.is_empty() || endpoints.len() > MAX_ENDPOINTS {
        return Err(WitnessError::Config(format!(
            "{} etcd endpoints given; 1 to {MAX_ENDPOINTS} are needed",
            endpoints.len()
        )));
    }
    for e in endpoints {
        if e.starts_with("https://") {
            return Err(WitnessError::Config(format!(
                "{e:?} needs TLS, which is not configurable for etcd yet (use http://)"
            )));
        }
        let rest = e.strip_prefix("http://").unwrap_or_default();
        let host = rest.strip_suffix('/').unwrap_or(rest);
        if host.is_empty() || host.contains(|c: char| c == '/' || c.is_whitespace()) {
            return Err(WitnessError::Config(format!(
                "{e:?} is not an etcd client URL (http://host:2379)"
            )));
        }
    }
    Ok(())
}

fn check_pair(pair: &str) -> Result<(), WitnessError> {
    if pair.is_empty()
        || pair.len() > MAX_PAIR_LEN
        || !pair
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(WitnessError::Config(format!(
            "{pair:?} is not a pair name of 1 to {MAX_PAIR_LEN} letters, digits, '-' or '_'"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_that_is_not_json_is_a_bad_record() {
        let e = parse_record("/hitless/p/record", b"not json{").unwrap_err();
        assert!(matches!(e, WitnessError::BadRecord(_)), "{e}");
    }

    #[test]
    fn a_record_breaking_its_limits_is_a_bad_record() {
        let json = br#"{"epoch":3,"in_control":1,"sync_set":[1]}"#;
        let e = parse_record("/hitless/p/record", json).unwrap_err();
        assert!(matches!(e, WitnessError::BadRecord(_)), "{e}");
    }

    #[test]
    fn an_oversized_value_is_refused_before_it_is_parsed() {
        let big = vec![b' '; MAX_RECORD_BYTES + 1];
        let e = parse_record("/hitless/p/record", &big).unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
    }

    #[test]
    fn a_record_written_here_reads_back() {
        let r = WitnessRecord {
            epoch: hitless_core::ControlEpoch(4),
            in_control: Some(hitless_core::InstanceId(2)),
            sync_set: [hitless_core::InstanceId(3)].into(),
        };
        let json = serde_json::to_vec(&r).unwrap();
        assert_eq!(parse_record("/hitless/p/record", &json).unwrap(), r);
    }

    #[test]
    fn endpoints_must_be_plain_http_client_urls() {
        assert!(check_endpoints(&["http://10.0.0.3:2379".into()]).is_ok());
        assert!(check_endpoints(&["http://etcd.example:2379/".into()]).is_ok());
        for bad in [
            "https://10.0.0.3:2379",
            "10.0.0.3:2379",
            "http://",
            "http://a b",
        ] {
            assert!(
                matches!(
                    check_endpoints(&[bad.to_string()]),
                    Err(WitnessError::Config(_))
                ),
                "{bad}"
            );
        }
        assert!(check_endpoints(&[]).is_err());
        let many = vec!["http://h:2379".to_string(); MAX_ENDPOINTS + 1];
        assert!(check_endpoints(&many).is_err());
    }

    #[test]
    fn pair_names_cannot_leave_their_prefix() {
        assert!(check_pair("edge-1_a").is_ok());
        for bad in ["", "a/b", "../x", "a b", &"x".repeat(MAX_PAIR_LEN + 1)] {
            assert!(check_pair(bad).is_err(), "{bad:?}");
        }
    }
}
