//! hitless-witness: the third vote of a pair.
//!
//! Two appliances cannot tell a dead peer from a cut link; a witness both reach can. It holds
//! per pair one [`WitnessRecord`] (epoch, instance in control, sync set) changed only by
//! compare-and-swap on its revision, and a lease. The rules that use it are pure and live in
//! `hitless_core::witness`; this crate is the I/O:
//!
//! * [`Witness`], what a driver needs of any witness;
//! * [`change`], one [`WitnessChange`] carried out by read, decide, compare-and-swap;
//! * `builtin`: the `hitless witness` daemon and its client (the embedded default);
//! * `etcd`: the same over etcd's transactions and leases.

use std::time::Duration;

use async_trait::async_trait;
pub use hitless_core::witness::{Versioned, WitnessChange, WitnessRecord, WitnessRefusal};

pub mod builtin;
pub mod conformance;
mod error;
pub mod etcd;
pub mod memory;
pub use builtin::BuiltinWitness;
pub use error::WitnessError;
pub use etcd::EtcdWitness;
pub use memory::MemoryWitness;

/// Which witness a pair uses (the agent config's `witness = "..."`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WitnessKind {
    /// No witness: a partition can lose acknowledged writes (the HA grace decides).
    None,
    /// The `hitless witness` daemon.
    Builtin,
    /// An etcd cluster.
    Etcd,
}

impl std::fmt::Display for WitnessKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WitnessKind::None => "none",
            WitnessKind::Builtin => "builtin",
            WitnessKind::Etcd => "etcd",
        })
    }
}

/// The answer to a compare-and-swap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cas {
    /// Written; the record's new revision.
    Swapped {
        /// The new revision.
        revision: u64,
    },
    /// The revision had moved: nothing written; the current record.
    Conflict(Versioned),
}

/// The answer to a lease request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lease {
    /// Granted (or renewed) to the asker for `ttl` from when the witness answered.
    Granted {
        /// Its duration.
        ttl: Duration,
    },
    /// Refused: another holder's lease is live, or the witness restarted less than one lease
    /// period ago.
    Refused {
        /// The holder, if one is known.
        holder: Option<String>,
        /// How long before a request may succeed.
        retry_after: Duration,
    },
}

/// What a driver needs of a witness. One value serves one pair (named when it is built).
/// Every call is bounded by the implementation's request timeout and fails with
/// [`WitnessError::Unreachable`] past it.
#[async_trait]
pub trait Witness: Send + Sync + 'static {
    /// Which implementation this is.
    fn kind(&self) -> WitnessKind;
    /// Where it is (for logs and status).
    fn endpoint(&self) -> String;
    /// The pair's record and revision (revision 0 and the default record: none yet).
    async fn read(&self) -> Result<Versioned, WitnessError>;
    /// Writes `record` if the stored revision is still `expected` (0: no record yet).
    /// The witness makes the write durable before it answers.
    async fn compare_and_swap(
        &self,
        expected: u64,
        record: &WitnessRecord,
    ) -> Result<Cas, WitnessError>;
    /// Grants, or renews, the pair's lease to `holder` for `ttl`.
    async fn lease(&self, holder: &str, ttl: Duration) -> Result<Lease, WitnessError>;
    /// Gives up `holder`'s lease before it runs out (nothing if it holds none).
    async fn release(&self, holder: &str) -> Result<(), WitnessError>;
}

/// How many compare-and-swap conflicts [`change`] rides out before giving up (each conflict
/// means another writer moved the record: the change is decided again on the new record).
pub const MAX_CAS_ROUNDS: usize = 8;

/// The answer to a [`WitnessChange`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decided {
    /// Landed (or had already landed): the record now.
    Granted(Versioned),
    /// The record refuses it: someone else decided first.
    Refused(WitnessRefusal),
}

/// Carries out `change` on `w`: reads the record, decides with [`WitnessChange::apply`],
/// writes by compare-and-swap, and decides again on a conflict (at most [`MAX_CAS_ROUNDS`]).
pub async fn change(w: &dyn Witness, change: &WitnessChange) -> Result<Decided, WitnessError> {
    let mut current = w.read().await?;
    for _ in 0..MAX_CAS_ROUNDS {
        current
            .record
            .check()
            .map_err(|e| WitnessError::BadRecord(e.to_string()))?;
        if current.revision != 0 && change.already_applied(&current.record) {
            return Ok(Decided::Granted(current));
        }
        let next = match change.apply(&current) {
            Ok(n) => n,
            Err(refusal) => return Ok(Decided::Refused(refusal)),
        };
        match w.compare_and_swap(current.revision, &next).await? {
            Cas::Swapped { revision } => {
                return Ok(Decided::Granted(Versioned {
                    record: next,
                    revision,
                }))
            }
            Cas::Conflict(now) => current = now,
        }
    }
    Err(WitnessError::Contended {
        rounds: MAX_CAS_ROUNDS,
    })
}
