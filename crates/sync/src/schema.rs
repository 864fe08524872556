//! Schemas, transforms between adjacent schema versions and version negotiation.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use crate::{Record, SchemaVersion, SyncError, TransformError};

/// A transform between adjacent schema versions, over one record.
///
/// It returns the record in the target version, or `Ok(None)` if the record
/// has no representation there (for example a table the target version does
/// not have). A transform may change the value only: it must keep the table
/// and key, so that deletes replicate unchanged; the library checks this.
/// Transforms must be deterministic so digests are comparable across versions.
pub type TransformFn = Arc<dyn Fn(&Record) -> Result<Option<Record>, String> + Send + Sync>;

/// A set of schema versions, as announced on connect.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VersionSet(pub Vec<SchemaVersion>);

impl VersionSet {
    /// True if `v` is in the set.
    pub fn contains(&self, v: SchemaVersion) -> bool {
        self.0.contains(&v)
    }
}

impl fmt::Display for VersionSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{")?;
        for (i, v) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{v}")?;
        }
        write!(f, "}}")
    }
}

/// The replicated state a service declares: name, native schema version, its
/// tables, and the transforms between adjacent versions.
///
/// ```
/// use hitless_sync::{Record, Schema};
/// let schema = Schema::new("kv", 2)
///     .table("strings")
///     .table_in(1, "strings")
///     .upgrade(1, |r: &Record| Ok(Some(Record { value: [b"v2:".as_slice(), &r.value].concat(), ..r.clone() })))
///     .downgrade(2, |r: &Record| {
///         r.value.strip_prefix(b"v2:").map(|v| Some(Record { value: v.to_vec(), ..r.clone() }))
///             .ok_or_else(|| "value lacks the v2 prefix".to_string())
///     });
/// assert_eq!(schema.reads().0, vec![1, 2]);
/// ```
#[derive(Clone)]
pub struct Schema {
    service: String,
    version: SchemaVersion,
    tables: BTreeMap<SchemaVersion, Vec<String>>,
    upgrades: BTreeMap<SchemaVersion, TransformFn>,
    downgrades: BTreeMap<SchemaVersion, TransformFn>,
}

impl fmt::Debug for Schema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Schema")
            .field("service", &self.service)
            .field("version", &self.version)
            .field("tables", &self.tables)
            .field("upgrades_from", &self.upgrades.keys().collect::<Vec<_>>())
            .field(
                "downgrades_from",
                &self.downgrades.keys().collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Schema {
    /// A schema for `service` whose native (in-memory) version is `version`.
    pub fn new(service: impl Into<String>, version: SchemaVersion) -> Self {
        Schema {
            service: service.into(),
            version,
            tables: BTreeMap::new(),
            upgrades: BTreeMap::new(),
            downgrades: BTreeMap::new(),
        }
    }

    /// Declares a table of the native version.
    pub fn table(self, name: impl Into<String>) -> Self {
        let v = self.version;
        self.table_in(v, name)
    }

    /// Declares a table of another version this build converts to or from.
    /// A version with no declared tables has the native version's tables.
    pub fn table_in(mut self, version: SchemaVersion, name: impl Into<String>) -> Self {
        let name = name.into();
        assert!(
            name.len() <= crate::wire::MAX_TABLE_NAME,
            "table name too long"
        );
        let t = self.tables.entry(version).or_default();
        if !t.contains(&name) {
            t.push(name);
        }
        self
    }

    /// Registers the upgrade transform from `from` to `from + 1`.
    pub fn upgrade<F>(mut self, from: SchemaVersion, f: F) -> Self
    where
        F: Fn(&Record) -> Result<Option<Record>, String> + Send + Sync + 'static,
    {
        self.upgrades.insert(from, Arc::new(f));
        self
    }

    /// Registers the downgrade transform from `from` to `from - 1`.
    pub fn downgrade<F>(mut self, from: SchemaVersion, f: F) -> Self
    where
        F: Fn(&Record) -> Result<Option<Record>, String> + Send + Sync + 'static,
    {
        assert!(from > 0, "cannot downgrade below version 0");
        self.downgrades.insert(from, Arc::new(f));
        self
    }

    /// Service name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Native schema version.
    pub fn version(&self) -> SchemaVersion {
        self.version
    }

    /// Tables of `version` (the native version's tables if none were declared for it).
    pub fn tables_of(&self, version: SchemaVersion) -> &[String] {
        self.tables
            .get(&version)
            .or_else(|| self.tables.get(&self.version))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Tables of the native version.
    pub fn tables(&self) -> &[String] {
        self.tables_of(self.version)
    }

    /// Registered upgrades, as their source versions.
    pub fn upgrade_sources(&self) -> Vec<SchemaVersion> {
        self.upgrades.keys().copied().collect()
    }

    /// Registered downgrades, as their source versions.
    pub fn downgrade_sources(&self) -> Vec<SchemaVersion> {
        self.downgrades.keys().copied().collect()
    }

    /// Versions this build can read: those with a transform chain to the native version.
    pub fn reads(&self) -> VersionSet {
        let mut v = vec![self.version];
        let mut x = self.version;
        while x > 0 && self.upgrades.contains_key(&(x - 1)) {
            x -= 1;
            v.push(x);
        }
        let mut x = self.version;
        while self.downgrades.contains_key(&(x + 1)) {
            x += 1;
            v.push(x);
        }
        v.sort_unstable();
        VersionSet(v)
    }

    /// Versions this build can write: those the native version has a transform chain to.
    pub fn writes(&self) -> VersionSet {
        let mut v = vec![self.version];
        let mut x = self.version;
        while x > 0 && self.downgrades.contains_key(&x) {
            x -= 1;
            v.push(x);
        }
        let mut x = self.version;
        while self.upgrades.contains_key(&x) {
            x += 1;
            v.push(x);
        }
        v.sort_unstable();
        VersionSet(v)
    }

    fn step(
        &self,
        rec: &Record,
        from: SchemaVersion,
        to: SchemaVersion,
    ) -> Result<Option<Record>, TransformError> {
        let f = if to == from + 1 {
            self.upgrades.get(&from)
        } else {
            self.downgrades.get(&from)
        };
        let err = |message: String| TransformError {
            table: rec.table.clone(),
            key_hex: hex_key(&rec.key),
            from,
            to,
            message,
        };
        let f = f.ok_or_else(|| err("no transform is registered for this step".into()))?;
        match f(rec) {
            Ok(Some(out)) => {
                if out.table != rec.table || out.key != rec.key {
                    return Err(err("the transform changed the table or key".into()));
                }
                Ok(Some(out))
            }
            Ok(None) => Ok(None),
            Err(m) => Err(err(m)),
        }
    }

    /// Converts a record from version `from` to version `to` through the
    /// adjacent-version transforms. `Ok(None)`: the record has no
    /// representation in `to`.
    pub fn convert(
        &self,
        rec: &Record,
        from: SchemaVersion,
        to: SchemaVersion,
    ) -> Result<Option<Record>, TransformError> {
        if from == to {
            return Ok(Some(rec.clone()));
        }
        let mut cur = rec.clone();
        let mut v = from;
        while v != to {
            let next = if to > v { v + 1 } else { v - 1 };
            match self.step(&cur, v, next)? {
                Some(r) => cur = r,
                None => return Ok(None),
            }
            v = next;
        }
        Ok(Some(cur))
    }

    /// True if `table` is declared in `version`.
    pub fn has_table(&self, version: SchemaVersion, table: &str) -> bool {
        self.tables_of(version).iter().any(|t| t == table)
    }

    /// Runs the transforms from the native version to `target` and back over
    /// `records` (a copy of live state), reporting success or the first
    /// failing record. A record that converts but does not come back
    /// unchanged is a failure too.
    pub fn preflight<'a>(
        &self,
        target: SchemaVersion,
        records: impl IntoIterator<Item = &'a Record>,
    ) -> Result<PreflightReport, PreflightFailure> {
        let mut report = PreflightReport {
            from: self.version,
            to: target,
            records: 0,
            converted: 0,
            dropped: 0,
        };
        for rec in records {
            report.records += 1;
            let fail = |message: String| PreflightFailure {
                record: rec.clone(),
                from: self.version,
                to: target,
                message,
            };
            match self.convert(rec, self.version, target) {
                Err(e) => return Err(fail(e.to_string())),
                Ok(None) => report.dropped += 1,
                Ok(Some(out)) => {
                    if !self.has_table(target, &out.table) {
                        return Err(fail(format!(
                            "table {} is not declared in version {target}",
                            out.table
                        )));
                    }
                    match self.convert(&out, target, self.version) {
                        Err(e) => return Err(fail(format!("converting back failed: {e}"))),
                        // Old -> new -> old must be the identity; new -> old may lose data.
                        Ok(back) if target > self.version && back.as_ref() != Some(rec) => {
                            return Err(fail(format!(
                                "round trip through version {target} did not give the record back"
                            )))
                        }
                        Ok(_) => report.converted += 1,
                    }
                }
            }
        }
        Ok(report)
    }
}

/// Outcome of a successful pre-flight conversion.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PreflightReport {
    /// Source (native) version.
    pub from: SchemaVersion,
    /// Target version.
    pub to: SchemaVersion,
    /// Records examined.
    pub records: u64,
    /// Records converted.
    pub converted: u64,
    /// Records with no representation in the target version.
    pub dropped: u64,
}

/// The first record a pre-flight conversion failed on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("pre-flight conversion from version {from} to {to} failed on table {} key {}: {message}", record.table, hex_key(&record.key))]
pub struct PreflightFailure {
    /// The failing record, in the source version.
    pub record: Record,
    /// Source version.
    pub from: SchemaVersion,
    /// Target version.
    pub to: SchemaVersion,
    /// What went wrong.
    pub message: String,
}

pub(crate) fn hex_key(k: &[u8]) -> String {
    let mut s = String::with_capacity(k.len().min(32) * 2 + 3);
    for b in k.iter().take(32) {
        s.push_str(&format!("{b:02x}"));
    }
    if k.len() > 32 {
        s.push_str("...");
    }
    s
}

/// Chooses the stream version between an active and a standby.
///
/// The stream version must be writable by the active, and readable and
/// writable by the standby (so it can compute digests in that version).
/// Preference: the standby's native version, then the active's, then the
/// highest common one. An incompatible pair is an error naming both versions.
pub fn negotiate(
    service: &str,
    active_native: SchemaVersion,
    active_writes: &VersionSet,
    standby_native: SchemaVersion,
    standby_reads: &VersionSet,
    standby_writes: &VersionSet,
) -> Result<SchemaVersion, SyncError> {
    let ok = |v: SchemaVersion| {
        active_writes.contains(v) && standby_reads.contains(v) && standby_writes.contains(v)
    };
    if ok(standby_native) {
        return Ok(standby_native);
    }
    if ok(active_native) {
        return Ok(active_native);
    }
    if let Some(v) = active_writes.0.iter().rev().copied().find(|v| ok(*v)) {
        return Ok(v);
    }
    Err(SyncError::IncompatibleVersions {
        service: service.to_string(),
        active: active_native,
        standby: standby_native,
        active_writes: active_writes.clone(),
        standby_reads: standby_reads.clone(),
        standby_writes: standby_writes.clone(),
    })
}
