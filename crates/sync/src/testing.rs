//! Round-trip checks for a service's registered transforms (feature `testing`).
//!
//! A service calls [`check_round_trips`] from its own tests with a proptest
//! strategy producing records of a given schema version. For every adjacent
//! pair `v -> v + 1` with both an upgrade and a downgrade registered, each
//! generated version-`v` record must survive old -> new -> old unchanged.

use proptest::strategy::{BoxedStrategy, Strategy};
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use crate::{Record, Schema, SchemaVersion};

/// Checks old -> new -> old round trips for every registered transform pair,
/// with `cases` records per pair drawn from `records(v)` (records of version
/// `v`). Returns the pairs checked, or the first failure (minimised by proptest).
pub fn check_round_trips(
    schema: &Schema,
    records: impl Fn(SchemaVersion) -> BoxedStrategy<Record>,
    cases: u32,
) -> Result<Vec<(SchemaVersion, SchemaVersion)>, String> {
    let downs = schema.downgrade_sources();
    let mut checked = Vec::new();
    for from in schema.upgrade_sources() {
        let to = from + 1;
        if !downs.contains(&to) {
            continue;
        }
        let mut runner = TestRunner::new(Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        });
        runner
            .run(&records(from).boxed(), |rec| {
                let up = schema
                    .convert(&rec, from, to)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let Some(up) = up else { return Ok(()) };
                let back = schema
                    .convert(&up, to, from)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                if back.as_ref() != Some(&rec) {
                    return Err(TestCaseError::fail(format!(
                        "round trip {from} -> {to} -> {from} changed {rec:?} into {back:?}"
                    )));
                }
                Ok(())
            })
            .map_err(|e| format!("transforms {from} <-> {to}: {e}"))?;
        checked.push((from, to));
    }
    Ok(checked)
}

/// Like [`check_round_trips`] but panics on failure (for use in `#[test]`s),
/// and also panics if no transform pair is registered.
pub fn assert_round_trips(
    schema: &Schema,
    records: impl Fn(SchemaVersion) -> BoxedStrategy<Record>,
    cases: u32,
) {
    match check_round_trips(schema, records, cases) {
        Ok(pairs) if pairs.is_empty() => panic!(
            "schema {} registers no upgrade/downgrade pair",
            schema.service()
        ),
        Ok(_) => {}
        Err(e) => panic!("{e}"),
    }
}
