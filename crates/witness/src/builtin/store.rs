//! The witness's records on disk: one file per pair in the data directory, replaced whole by
//! a write to a temporary file, its fsync, a rename and the fsync of the directory, so a
//! compare-and-swap is durable before it is answered and a crash leaves the old or the new
//! record, never a mix.
//!
//! A record file is `HLWS`, the format version (u8), the body length (big-endian u32), the
//! CRC32C of the version, the length and the body (big-endian u32), then the body: JSON of the
//! pair name and its [`Versioned`] record. At start every file is read; one that fails a
//! check stops the start (serving a wrong record would break the pair's promises).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::wire::check_name;
use crate::Versioned;

/// Magic bytes opening a record file.
pub const FILE_MAGIC: [u8; 4] = *b"HLWS";
/// The record file format this build writes and reads.
pub const FILE_VERSION: u8 = 1;
/// Bytes before the body.
pub const FILE_HEADER_LEN: usize = 13;
/// Largest body of a record file.
pub const MAX_FILE_BODY: usize = 64 * 1024;
/// Most pairs one witness holds.
pub const MAX_PAIRS: usize = 1024;
/// The extension of record files.
const EXT: &str = "witness";
/// The extension of a record being written.
const TMP_EXT: &str = "witness-tmp";

/// Why the data directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file system call failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// A record file failed a check.
    #[error("the record file {path} is corrupt: {why}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// More pairs than one witness holds.
    #[error("the data directory {dir} holds more than {MAX_PAIRS} pairs")]
    TooManyPairs {
        /// The directory.
        dir: PathBuf,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBody {
    pair: String,
    current: Versioned,
}

/// The bytes of the record file of `pair`.
pub fn encode_file(pair: &str, current: &Versioned) -> Vec<u8> {
    let body = serde_json::to_vec(&FileBody {
        pair: pair.to_owned(),
        current: current.clone(),
    })
    .expect("a record always serializes");
    let mut out = Vec::with_capacity(FILE_HEADER_LEN + body.len());
    out.extend_from_slice(&FILE_MAGIC);
    out.push(FILE_VERSION);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out[4..9]), &body);
    out.extend_from_slice(&crc.to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// The pair and record a record file holds, or why it is refused.
pub fn decode_file(bytes: &[u8]) -> Result<(String, Versioned), String> {
    if bytes.len() < FILE_HEADER_LEN {
        return Err(format!(
            "{} bytes, shorter than the {FILE_HEADER_LEN}-byte header",
            bytes.len()
        ));
    }
    if bytes[..4] != FILE_MAGIC {
        return Err(format!("magic {:02x?} is not HLWS", &bytes[..4]));
    }
    if bytes[4] != FILE_VERSION {
        return Err(format!(
            "format {} is not readable by this build (it reads {FILE_VERSION})",
            bytes[4]
        ));
    }
    let len = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) as usize;
    if len > MAX_FILE_BODY {
        return Err(format!("a body of {len} bytes exceeds {MAX_FILE_BODY}"));
    }
    if bytes.len() != FILE_HEADER_LEN + len {
        return Err(format!(
            "{} bytes where the header announces {}",
            bytes.len(),
            FILE_HEADER_LEN + len
        ));
    }
    let expected = u32::from_be_bytes([bytes[9], bytes[10], bytes[11], bytes[12]]);
    let body = &bytes[FILE_HEADER_LEN..];
    let actual = crc32c::crc32c_append(crc32c::crc32c(&bytes[4..9]), body);
    if expected != actual {
        return Err(format!(
            "checksum mismatch: header says {expected:#010x}, content gives {actual:#010x}"
        ));
    }
    let b: FileBody = serde_json::from_slice(body).map_err(|e| format!("bad body: {e}"))?;
    check_name("pair", &b.pair).map_err(|e| e.to_string())?;
    b.current.record.check().map_err(|e| e.to_string())?;
    if b.current.revision == 0 {
        return Err("a stored record at revision 0".into());
    }
    Ok((b.pair, b.current))
}

/// The data directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Opens (creating it if needed) the data directory and reads every record in it.
    /// Leftovers of a write cut short (the rename never happened) are removed.
    pub fn open(dir: &Path) -> Result<(Store, BTreeMap<String, Versioned>), StoreError> {
        let io = |action, path: &Path| {
            let path = path.to_owned();
            move |source| StoreError::Io {
                action,
                path,
                source,
            }
        };
        fs::create_dir_all(dir).map_err(io("create", dir))?;
        let mut records = BTreeMap::new();
        for entry in fs::read_dir(dir).map_err(io("list", dir))? {
            let path = entry.map_err(io("list", dir))?.path();
            let ext = path.extension().and_then(|e| e.to_str());
            if ext == Some(TMP_EXT) {
                tracing::warn!(path = %path.display(), "removing an unfinished record write");
                fs::remove_file(&path).map_err(io("remove", &path))?;
                continue;
            }
            if ext != Some(EXT) {
                continue;
            }
            let corrupt = |why: String| StoreError::Corrupt {
                path: path.clone(),
                why,
            };
            let meta = fs::metadata(&path).map_err(io("read", &path))?;
            if meta.len() > (FILE_HEADER_LEN + MAX_FILE_BODY) as u64 {
                return Err(corrupt(format!("{} bytes is above the limit", meta.len())));
            }
            let bytes = fs::read(&path).map_err(io("read", &path))?;
            let (pair, current) = decode_file(&bytes).map_err(corrupt)?;
            let stem = path.file_stem().and_then(|s| s.to_str());
            if stem != Some(pair.as_str()) {
                return Err(corrupt(format!("it holds the record of pair {pair:?}")));
            }
            if records.len() == MAX_PAIRS {
                return Err(StoreError::TooManyPairs {
                    dir: dir.to_owned(),
                });
            }
            records.insert(pair, current);
        }
        Ok((
            Store {
                dir: dir.to_owned(),
            },
            records,
        ))
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Replaces the record of `pair` durably: it is on disk when this returns.
    pub fn write(&self, pair: &str, current: &Versioned) -> Result<(), StoreError> {
        let io = |action, path: &Path| {
            let path = path.to_owned();
            move |source| StoreError::Io {
                action,
                path,
                source,
            }
        };
        let path = self.dir.join(format!("{pair}.{EXT}"));
        let tmp = self.dir.join(format!("{pair}.{TMP_EXT}"));
        let mut f = fs::File::create(&tmp).map_err(io("create", &tmp))?;
        f.write_all(&encode_file(pair, current))
            .map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("sync", &tmp))?;
        drop(f);
        fs::rename(&tmp, &path).map_err(io("rename into place", &path))?;
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io("sync", &self.dir))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hitless_core::{ControlEpoch, InstanceId};
    use proptest::prelude::*;

    fn v(revision: u64) -> Versioned {
        Versioned {
            record: crate::WitnessRecord {
                epoch: ControlEpoch(revision + 1),
                in_control: Some(InstanceId(1)),
                sync_set: [InstanceId(2)].into(),
            },
            revision,
        }
    }

    #[test]
    fn records_written_are_read_back_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let (store, none) = Store::open(dir.path()).unwrap();
        assert!(none.is_empty());
        store.write("a", &v(1)).unwrap();
        store.write("a", &v(2)).unwrap();
        store.write("b-2", &v(7)).unwrap();
        let (_, got) = Store::open(dir.path()).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got["a"], v(2));
        assert_eq!(got["b-2"], v(7));
    }

    #[test]
    fn an_unfinished_write_is_dropped_and_the_old_record_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        store.write("a", &v(1)).unwrap();
        fs::write(dir.path().join("a.witness-tmp"), b"HLWS\x01half").unwrap();
        let (_, got) = Store::open(dir.path()).unwrap();
        assert_eq!(got["a"], v(1));
        assert!(!dir.path().join("a.witness-tmp").exists());
    }

    #[test]
    fn a_corrupt_file_refuses_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        store.write("a", &v(1)).unwrap();
        let path = dir.path().join("a.witness");
        let good = fs::read(&path).unwrap();
        let mut flipped = good.clone();
        let last = flipped.len() - 2;
        flipped[last] ^= 0x04;
        fs::write(&path, &flipped).unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("checksum"), "{err}");
        // A file renamed to another pair's name is refused too.
        fs::write(&path, &good).unwrap();
        fs::rename(&path, dir.path().join("b.witness")).unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("pair \"a\""), "{err}");
    }

    #[test]
    fn headers_are_checked() {
        let good = encode_file("a", &v(1));
        assert_eq!(decode_file(&good).unwrap(), ("a".to_string(), v(1)));
        let mut m = good.clone();
        m[0] = b'X';
        assert!(decode_file(&m).unwrap_err().contains("magic"));
        let mut ver = good.clone();
        ver[4] = 2;
        assert!(decode_file(&ver).unwrap_err().contains("format 2"));
        assert!(decode_file(&good[..good.len() - 1])
            .unwrap_err()
            .contains("announces"));
        assert!(decode_file(&encode_file("a", &v(0)))
            .unwrap_err()
            .contains("revision 0"));
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_file(&bytes);
        }
    }
}
