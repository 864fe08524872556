//! Opening refuses anything that is not an intact journal of a supported format, with an error
//! naming the file and the defect, and leaves the refused file byte-for-byte unchanged.

use std::path::{Path, PathBuf};

use hitless_journal::{EnvelopeError, Journal, JournalError, FIRST_INDEX, FORMAT_VERSION};
use redb::{Database, TableDefinition};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Rec {
    marker: String,
}

fn marker(i: u32) -> Rec {
    Rec {
        marker: format!("UNIQUE-MARKER-{i:04}-PAYLOAD"),
    }
}

/// Tables as documented in the crate: the on-disk schema of format version 1.
const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("hitless.records");
const SYSTEM: TableDefinition<&str, &[u8]> = TableDefinition::new("hitless.system");
const USER_META: TableDefinition<&str, &[u8]> = TableDefinition::new("hitless.meta");

fn build_journal(dir: &Path, n: u32) -> PathBuf {
    let path = dir.join("j.redb");
    let mut j = Journal::<Rec>::open(&path).unwrap();
    for i in 0..n {
        j.append(&marker(i)).unwrap();
    }
    path
}

/// Opens `path`, expects a refusal, and checks the file is unchanged and the message names it.
fn refuse(path: &Path) -> JournalError {
    let before = std::fs::read(path).unwrap();
    let err = Journal::<Rec>::open(path).expect_err("open must refuse");
    let after = std::fs::read(path).unwrap();
    assert!(before == after, "a refused file must not be modified");
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string()),
        "error must name the file: {msg}"
    );
    // No verification copies are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".verify-"))
        .collect();
    assert!(leftovers.is_empty(), "verification copy left behind");
    err
}

/// Replaces every occurrence of `needle` in the file (old copies of a page may survive
/// copy-on-write) by the result of `edit`.
fn patch_all(path: &Path, needle: &[u8], edit: impl Fn(&mut [u8])) -> usize {
    let mut bytes = std::fs::read(path).unwrap();
    let mut hits = 0;
    let mut i = 0;
    while i + needle.len() <= bytes.len() {
        if &bytes[i..i + needle.len()] == needle {
            edit(&mut bytes[i..i + needle.len()]);
            hits += 1;
            i += needle.len();
        } else {
            i += 1;
        }
    }
    std::fs::write(path, bytes).unwrap();
    hits
}

#[test]
fn random_bytes_file_is_not_a_journal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("random.bin");
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let bytes: Vec<u8> = (0..20_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&path, bytes).unwrap();
    let err = refuse(&path);
    assert!(matches!(err, JournalError::NotAJournal { .. }), "{err}");
    assert!(
        err.to_string().contains("is not a hitless journal"),
        "{err}"
    );
}

#[test]
fn short_text_file_is_not_a_journal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, "hello\n").unwrap();
    let err = refuse(&path);
    assert!(matches!(err, JournalError::NotAJournal { .. }), "{err}");
}

#[test]
fn other_database_is_not_a_journal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.redb");
    {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let t: TableDefinition<&str, u64> = TableDefinition::new("counters");
            txn.open_table(t).unwrap().insert("x", 1).unwrap();
        }
        txn.commit().unwrap();
    }
    let err = refuse(&path);
    assert!(matches!(err, JournalError::NotAJournal { .. }), "{err}");
    assert!(err.to_string().contains("system table"), "{err}");
}

#[test]
fn truncated_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = build_journal(dir.path(), 30);
    let full = std::fs::read(&path).unwrap();
    for cut in [full.len() / 2, full.len() - 4096, 4096 + 100, 100] {
        let p = dir.path().join(format!("cut-{cut}.redb"));
        std::fs::write(&p, &full[..cut]).unwrap();
        let err = refuse(&p);
        assert!(
            matches!(err, JournalError::Truncated { .. }),
            "cut at {cut}: {err}"
        );
        assert!(err.to_string().contains("is truncated"), "{err}");
    }
}

#[test]
fn record_with_bad_checksum_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = build_journal(dir.path(), 10);
    let hits = patch_all(&path, b"UNIQUE-MARKER-0004-PAYLOAD", |s| s[0] = b'X');
    assert!(hits >= 1);
    let err = refuse(&path);
    match &err {
        JournalError::Corrupt {
            location,
            source: EnvelopeError::BadChecksum { .. },
            ..
        } => assert_eq!(location, "record 5"),
        other => panic!("expected a checksum failure on record 5, got {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("is corrupt: record 5") && msg.contains("checksum"),
        "{msg}"
    );
}

#[test]
fn record_with_bad_magic_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = build_journal(dir.path(), 3);
    // Break the magic of every envelope in the file.
    let hits = patch_all(&path, b"HJRE", |s| s.copy_from_slice(b"XXXX"));
    assert!(hits >= 3);
    let err = refuse(&path);
    assert!(
        matches!(
            err,
            JournalError::Corrupt {
                source: EnvelopeError::BadMagic { .. },
                ..
            }
        ),
        "{err}"
    );
}

fn rewrite_system(path: &Path, key: &str, value: &[u8]) {
    let db = Database::open(path).unwrap();
    let txn = db.begin_write().unwrap();
    txn.open_table(SYSTEM).unwrap().insert(key, value).unwrap();
    txn.commit().unwrap();
}

#[test]
fn newer_format_journal_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = build_journal(dir.path(), 3);
    rewrite_system(&path, "format_version", &(FORMAT_VERSION + 1).to_le_bytes());
    let err = refuse(&path);
    assert!(
        matches!(err, JournalError::NewerFormat { found, .. } if found == FORMAT_VERSION + 1),
        "{err}"
    );
    assert!(
        err.to_string().contains("newer than the newest version"),
        "{err}"
    );
}

#[test]
fn wrong_journal_magic_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = build_journal(dir.path(), 1);
    rewrite_system(&path, "magic", b"some-other-thing");
    let err = refuse(&path);
    assert!(err.to_string().contains("magic entry"), "{err}");
}

#[test]
fn corrupt_metadata_value_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.redb");
    {
        let mut j = Journal::<Rec>::open(&path).unwrap();
        j.set_meta("identity", b"APPLIANCE-IDENTITY-VALUE").unwrap();
    }
    patch_all(&path, b"APPLIANCE-IDENTITY-VALUE", |s| s[0] = b'B');
    let err = refuse(&path);
    assert!(
        err.to_string().contains("metadata entry \"identity\""),
        "{err}"
    );
}

/// A format-1 journal written independently of `Journal`, following the documented schema
/// (envelope layout, table names, system entries), opens and reads; and a journal written by
/// `Journal` has exactly that schema. Old files stay readable; new files stay old-compatible.
#[test]
fn format_v1_round_trip_with_independent_writer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.redb");
    let envelope = |body: &[u8]| {
        let mut e = Vec::new();
        e.extend_from_slice(b"HJRE");
        e.extend_from_slice(&1u16.to_le_bytes());
        e.extend_from_slice(&0u16.to_le_bytes());
        e.extend_from_slice(&(body.len() as u32).to_le_bytes());
        e.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
        e.extend_from_slice(body);
        e
    };
    {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut sys = txn.open_table(SYSTEM).unwrap();
            sys.insert("magic", b"hitless-journal".as_slice()).unwrap();
            sys.insert("format_version", 1u32.to_le_bytes().as_slice())
                .unwrap();
            sys.insert("next_index", 3u64.to_le_bytes().as_slice())
                .unwrap();
            let mut rec = txn.open_table(RECORDS).unwrap();
            for i in 1..3u64 {
                let body = serde_json::to_vec(&marker(i as u32)).unwrap();
                rec.insert(i, envelope(&body).as_slice()).unwrap();
            }
            txn.open_table(USER_META)
                .unwrap()
                .insert("identity", envelope(b"a1").as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
    }
    {
        let mut j = Journal::<Rec>::open(&path).unwrap();
        assert_eq!(j.entries().unwrap(), vec![(1, marker(1)), (2, marker(2))]);
        assert_eq!(j.meta("identity").unwrap().unwrap(), b"a1");
        assert_eq!(j.append(&marker(3)).unwrap(), 3);
    }
    // Read back what the journal wrote with the independent reader.
    let db = Database::open(&path).unwrap();
    let txn = db.begin_read().unwrap();
    let rec = txn.open_table(RECORDS).unwrap();
    let got = rec.get(3).unwrap().unwrap().value().to_vec();
    assert_eq!(got, envelope(&serde_json::to_vec(&marker(3)).unwrap()));
    let sys = txn.open_table(SYSTEM).unwrap();
    assert_eq!(
        sys.get("next_index").unwrap().unwrap().value(),
        4u64.to_le_bytes()
    );
    assert_eq!(
        sys.get("format_version").unwrap().unwrap().value(),
        FORMAT_VERSION.to_le_bytes()
    );
    assert_eq!(FIRST_INDEX, 1);
}

#[test]
fn directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let err = Journal::<Rec>::open(dir.path()).unwrap_err();
    assert!(matches!(err, JournalError::NotAJournal { .. }), "{err}");
    assert!(err.to_string().contains("not a regular file"), "{err}");
}
