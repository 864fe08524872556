//! hitless-journal: a crash-safe write-ahead journal of ISSU engine transitions.
//!
//! A [`Journal`] is a single redb file holding:
//! - an ordered table of records, keyed by a strictly increasing index, each record a
//!   serde_json body wrapped in a versioned, checksummed [`envelope`];
//! - a small user metadata area ([`Journal::set_meta`] / [`Journal::meta`]), values also
//!   enveloped;
//! - a system metadata table holding the journal magic, the journal format version and the
//!   next index to assign.
//!
//! Every write commits with [`redb::Durability::Immediate`]: when [`Journal::append`] returns,
//! the record is on stable storage.
//!
//! Opening refuses, with a sentence naming the file and the defect, anything that is not an
//! intact journal of a supported format: a file that is not a database, a database that is not a
//! journal, a newer-format journal, a truncated file, or a record that fails its checksum.
//! Before trusting an existing file, [`Journal::open`] checks a private copy of it, so a refused
//! file is never modified (not even by the database engine's crash recovery).

#![warn(missing_docs)]

pub mod envelope;

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::marker::PhantomData;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

pub use envelope::EnvelopeError;

/// Journal format version written by this build (stored in the file's system metadata).
pub const FORMAT_VERSION: u32 = 1;
/// Oldest journal format version this build reads.
pub const MIN_FORMAT_VERSION: u32 = 1;
/// Value of the magic entry in the system metadata.
pub const JOURNAL_MAGIC: &[u8] = b"hitless-journal";
/// Longest user metadata key, in bytes.
pub const MAX_META_KEY_LEN: usize = 256;
/// Largest user metadata value, in bytes.
pub const MAX_META_VALUE_LEN: usize = 64 * 1024;

const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("hitless.records");
const SYSTEM: TableDefinition<&str, &[u8]> = TableDefinition::new("hitless.system");
const USER_META: TableDefinition<&str, &[u8]> = TableDefinition::new("hitless.meta");

const KEY_MAGIC: &str = "magic";
const KEY_FORMAT: &str = "format_version";
const KEY_NEXT_INDEX: &str = "next_index";

/// Index given to the first record of a new journal.
pub const FIRST_INDEX: u64 = 1;

/// The redb file magic; anything else at offset 0 is not a database at all.
const REDB_MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];
/// redb writes at least one 4 KiB page of headers.
const REDB_MIN_LEN: u64 = 4096;

/// Everything that can go wrong with a journal.
#[derive(Debug, Error)]
pub enum JournalError {
    /// An operating system call on the file failed.
    #[error("journal file {path}: {action} failed: {source}")]
    Io {
        /// The journal file.
        path: PathBuf,
        /// What was being attempted.
        action: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The file is not a journal at all.
    #[error("journal file {path} is not a hitless journal: {reason}")]
    NotAJournal {
        /// The file.
        path: PathBuf,
        /// What gave it away.
        reason: String,
    },
    /// The file is shorter than its own header says it should be.
    #[error("journal file {path} is truncated: {reason}")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Details.
        reason: String,
    },
    /// The file was written by a newer journal format.
    #[error("journal file {path} has format version {found}, newer than the newest version {FORMAT_VERSION} this build reads; upgrade the software before opening it")]
    NewerFormat {
        /// The file.
        path: PathBuf,
        /// Format version found.
        found: u32,
    },
    /// The file was written by a journal format too old to read.
    #[error("journal file {path} has format version {found}, older than the oldest version {MIN_FORMAT_VERSION} this build reads")]
    OlderFormat {
        /// The file.
        path: PathBuf,
        /// Format version found.
        found: u32,
    },
    /// A record or metadata value failed verification.
    #[error("journal file {path} is corrupt: {location}: {source}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Which record or entry.
        location: String,
        /// What is wrong with it.
        #[source]
        source: EnvelopeError,
    },
    /// The database engine reported damage.
    #[error("journal file {path} is damaged: {reason}")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// The engine's description.
        reason: String,
    },
    /// Another process (or another handle in this one) has the journal open.
    #[error("journal file {path} is already open by another journal handle")]
    AlreadyOpen {
        /// The file.
        path: PathBuf,
    },
    /// The database engine failed an operation.
    #[error("journal file {path}: database operation {action} failed: {message}")]
    Database {
        /// The file.
        path: PathBuf,
        /// What was being attempted.
        action: &'static str,
        /// The engine's message.
        message: String,
    },
    /// A record could not be serialized.
    #[error("journal file {path}: the record cannot be serialized: {source}")]
    Serialize {
        /// The file.
        path: PathBuf,
        /// The serializer's error.
        #[source]
        source: serde_json::Error,
    },
    /// A verified record body does not deserialize into the record type.
    #[error(
        "journal file {path}: record {index} does not decode as the expected record type: {source}"
    )]
    Deserialize {
        /// The file.
        path: PathBuf,
        /// The record index.
        index: u64,
        /// The deserializer's error.
        #[source]
        source: serde_json::Error,
    },
    /// A record body exceeds the envelope limit.
    #[error(
        "journal file {path}: the record is {len} bytes, more than the {} byte limit",
        envelope::MAX_BODY_LEN
    )]
    RecordTooLarge {
        /// The file.
        path: PathBuf,
        /// Serialized length.
        len: usize,
    },
    /// A metadata key or value is out of bounds.
    #[error("journal file {path}: metadata entry {key:?} refused: {reason}")]
    BadMeta {
        /// The file.
        path: PathBuf,
        /// The key (possibly shortened).
        key: String,
        /// Why.
        reason: String,
    },
    /// A mirrored record does not fit after the journal's current end.
    #[error("journal file {path}: cannot import record {index}: {reason}")]
    ImportRefused {
        /// The file.
        path: PathBuf,
        /// Index offered.
        index: u64,
        /// Why it was refused.
        reason: String,
    },
    /// A mirrored envelope failed verification.
    #[error("journal file {path}: cannot import record {index}: {source}")]
    ImportCorrupt {
        /// The file.
        path: PathBuf,
        /// Index offered.
        index: u64,
        /// What is wrong with it.
        #[source]
        source: EnvelopeError,
    },
}

/// Result alias for journal operations.
pub type Result<T, E = JournalError> = std::result::Result<T, E>;

/// A crash-safe, append-only journal of records of type `T`.
pub struct Journal<T> {
    db: Database,
    path: PathBuf,
    next_index: u64,
    _record: PhantomData<fn() -> T>,
}

impl<T> fmt::Debug for Journal<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.path)
            .field("next_index", &self.next_index)
            .finish()
    }
}

fn db_err(path: &Path, action: &'static str, e: impl fmt::Display) -> JournalError {
    JournalError::Database {
        path: path.to_path_buf(),
        action,
        message: e.to_string(),
    }
}

fn io_err<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(io::Error) -> JournalError + 'a {
    move |source| JournalError::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
}

fn map_open_error(path: &Path, e: redb::DatabaseError) -> JournalError {
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen => JournalError::AlreadyOpen {
            path: path.to_path_buf(),
        },
        redb::DatabaseError::UpgradeRequired(v) => JournalError::NotAJournal {
            path: path.to_path_buf(),
            reason: format!(
                "it is a database in storage format {v}, which this build does not open"
            ),
        },
        redb::DatabaseError::Storage(redb::StorageError::Corrupted(msg)) => JournalError::Damaged {
            path: path.to_path_buf(),
            reason: msg,
        },
        redb::DatabaseError::Storage(redb::StorageError::Io(source))
            if source.kind() == io::ErrorKind::InvalidData =>
        {
            JournalError::NotAJournal {
                path: path.to_path_buf(),
                reason: "the database engine rejected its header".into(),
            }
        }
        redb::DatabaseError::Storage(redb::StorageError::Io(source)) => JournalError::Io {
            path: path.to_path_buf(),
            action: "open",
            source,
        },
        other => db_err(path, "open", other),
    }
}

fn immediate_write(db: &Database, path: &Path) -> Result<redb::WriteTransaction> {
    let mut txn = db
        .begin_write()
        .map_err(|e| db_err(path, "begin write", e))?;
    txn.set_durability(Durability::Immediate);
    Ok(txn)
}

/// Reads a little-endian u32/u64 system value, rejecting the wrong length.
fn read_u64_value(bytes: &[u8]) -> Option<u64> {
    match bytes.len() {
        4 => Some(u64::from(u32::from_le_bytes(bytes.try_into().ok()?))),
        8 => Some(u64::from_le_bytes(bytes.try_into().ok()?)),
        _ => None,
    }
}

static CHECK_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Removes the private verification copy however the check ends.
struct TempCopy(PathBuf);

impl Drop for TempCopy {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Cheap checks on the raw bytes that need no database engine: the file must start with the
/// database magic and be at least one header page long.
fn precheck_file(path: &Path, len: u64) -> Result<()> {
    let mut head = [0u8; 32];
    let mut f = File::open(path).map_err(io_err(path, "open for reading"))?;
    let n = read_up_to(&mut f, &mut head).map_err(io_err(path, "read header"))?;
    if n < REDB_MAGIC.len() || head[..REDB_MAGIC.len()] != REDB_MAGIC {
        return Err(JournalError::NotAJournal {
            path: path.to_path_buf(),
            reason: format!(
                "it does not start with the journal database magic (first bytes {:02x?})",
                &head[..n.min(REDB_MAGIC.len())]
            ),
        });
    }
    if n == head.len() {
        let field = |at: usize| {
            u64::from(u32::from_le_bytes([
                head[at],
                head[at + 1],
                head[at + 2],
                head[at + 3],
            ]))
        };
        let page_size = field(12);
        if page_size != REDB_MIN_LEN {
            return Err(JournalError::Damaged {
                path: path.to_path_buf(),
                reason: format!(
                    "its header declares a page size of {page_size} bytes, expected {REDB_MIN_LEN}"
                ),
            });
        }
        if let Some(expected) = header_described_len(&head) {
            if len < expected {
                return Err(JournalError::Truncated {
                    path: path.to_path_buf(),
                    reason: format!(
                        "its header describes {expected} bytes but only {len} are present"
                    ),
                });
            }
        }
    }
    if len < REDB_MIN_LEN {
        return Err(JournalError::Truncated {
            path: path.to_path_buf(),
            reason: format!("it is {len} bytes long, shorter than its {REDB_MIN_LEN}-byte header"),
        });
    }
    if !len.is_multiple_of(REDB_MIN_LEN) {
        return Err(JournalError::Truncated {
            path: path.to_path_buf(),
            reason: format!(
                "it is {len} bytes long, not a whole number of {REDB_MIN_LEN}-byte pages"
            ),
        });
    }
    Ok(())
}

/// The file length the database header describes (one header page, then the full regions,
/// then an optional partial trailing region, each region led by its own header pages), or
/// `None` if the fields overflow.
fn header_described_len(head: &[u8; 32]) -> Option<u64> {
    let field = |at: usize| {
        u64::from(u32::from_le_bytes([
            head[at],
            head[at + 1],
            head[at + 2],
            head[at + 3],
        ]))
    };
    let (page, region_header, region_data, full, trailing) =
        (field(12), field(16), field(20), field(24), field(28));
    let full_region = region_header.checked_add(region_data)?.checked_mul(page)?;
    let mut total = page.checked_add(full.checked_mul(full_region)?)?;
    if trailing > 0 {
        total = total.checked_add(region_header.checked_add(trailing)?.checked_mul(page)?)?;
    }
    Some(total)
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Describes a panic payload from the database engine.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "the engine stopped on an internal consistency check".to_string()
    }
}

/// Verifies the structure of an opened database: journal magic, supported format, and every
/// record and metadata envelope. Returns the next index to assign. `path` is the name used in
/// errors (the user's file, even when `db` is a private copy).
fn verify(db: &Database, path: &Path) -> Result<u64> {
    let txn = db.begin_read().map_err(|e| db_err(path, "begin read", e))?;
    let system = match txn.open_table(SYSTEM) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => {
            return Err(JournalError::NotAJournal {
                path: path.to_path_buf(),
                reason: "it is a database without the journal's system table".into(),
            })
        }
        Err(e) => return Err(db_err(path, "open system table", e)),
    };
    let get = |key: &str| -> Result<Option<Vec<u8>>> {
        Ok(system
            .get(key)
            .map_err(|e| db_err(path, "read system table", e))?
            .map(|v| v.value().to_vec()))
    };
    match get(KEY_MAGIC)? {
        Some(m) if m == JOURNAL_MAGIC => {}
        Some(m) => {
            return Err(JournalError::NotAJournal {
                path: path.to_path_buf(),
                reason: format!(
                    "its magic entry is {:?}, expected {:?}",
                    String::from_utf8_lossy(&m),
                    String::from_utf8_lossy(JOURNAL_MAGIC)
                ),
            })
        }
        None => {
            return Err(JournalError::NotAJournal {
                path: path.to_path_buf(),
                reason: "its system table has no magic entry".into(),
            })
        }
    }
    let format = get(KEY_FORMAT)?
        .as_deref()
        .and_then(read_u64_value)
        .ok_or_else(|| JournalError::NotAJournal {
            path: path.to_path_buf(),
            reason: "its system table has no valid format version entry".into(),
        })?;
    let format = u32::try_from(format).unwrap_or(u32::MAX);
    if format > FORMAT_VERSION {
        return Err(JournalError::NewerFormat {
            path: path.to_path_buf(),
            found: format,
        });
    }
    if format < MIN_FORMAT_VERSION {
        return Err(JournalError::OlderFormat {
            path: path.to_path_buf(),
            found: format,
        });
    }
    let next_index = get(KEY_NEXT_INDEX)?
        .as_deref()
        .and_then(read_u64_value)
        .ok_or_else(|| JournalError::NotAJournal {
            path: path.to_path_buf(),
            reason: "its system table has no valid next-index entry".into(),
        })?;

    let records = txn
        .open_table(RECORDS)
        .map_err(|e| db_err(path, "open record table", e))?;
    for item in records
        .iter()
        .map_err(|e| db_err(path, "scan records", e))?
    {
        let (k, v) = item.map_err(|e| db_err(path, "scan records", e))?;
        let index = k.value();
        envelope::decode(v.value()).map_err(|source| JournalError::Corrupt {
            path: path.to_path_buf(),
            location: format!("record {index}"),
            source,
        })?;
        if index >= next_index {
            return Err(JournalError::Damaged {
                path: path.to_path_buf(),
                reason: format!("record {index} lies beyond the recorded next index {next_index}"),
            });
        }
    }
    let meta = txn
        .open_table(USER_META)
        .map_err(|e| db_err(path, "open metadata table", e))?;
    for item in meta.iter().map_err(|e| db_err(path, "scan metadata", e))? {
        let (k, v) = item.map_err(|e| db_err(path, "scan metadata", e))?;
        envelope::decode(v.value()).map_err(|source| JournalError::Corrupt {
            path: path.to_path_buf(),
            location: format!("metadata entry {:?}", k.value()),
            source,
        })?;
    }
    Ok(next_index)
}

/// Opens a private copy of `path` with the engine and verifies it, so the original is not
/// touched unless it is a sound journal.
fn verify_copy(path: &Path) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    let dir = dir.unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "journal".into());
    let copy = TempCopy(dir.join(format!(
        ".{name}.verify-{}-{}",
        std::process::id(),
        CHECK_COUNTER.fetch_add(1, Ordering::Relaxed)
    )));
    fs::copy(path, &copy.0).map_err(io_err(path, "copy for verification"))?;
    let copy_path = copy.0.clone();
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| -> Result<()> {
        let db = Database::open(&copy_path).map_err(|e| map_open_error(path, e))?;
        verify(&db, path)?;
        Ok(())
    }));
    match outcome {
        Ok(r) => r,
        Err(payload) => Err(JournalError::Damaged {
            path: path.to_path_buf(),
            reason: format!(
                "the database engine could not read it ({}); the file is probably truncated or overwritten",
                panic_message(payload.as_ref())
            ),
        }),
    }
}

/// Creates a fresh journal at `path` atomically: built under a temporary name, synced, then
/// renamed into place, so a crash never leaves a half-initialised journal behind.
fn create_new(path: &Path) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    let dir = dir.unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "journal".into());
    let tmp = TempCopy(dir.join(format!(".{name}.create-{}", std::process::id())));
    let _ = fs::remove_file(&tmp.0);
    {
        let db = Database::create(&tmp.0).map_err(|e| map_open_error(path, e))?;
        let txn = immediate_write(&db, path)?;
        {
            let mut system = txn
                .open_table(SYSTEM)
                .map_err(|e| db_err(path, "create system table", e))?;
            let put = |t: &mut redb::Table<&str, &[u8]>, k: &str, v: &[u8]| {
                t.insert(k, v)
                    .map(|_| ())
                    .map_err(|e| db_err(path, "initialise", e))
            };
            put(&mut system, KEY_MAGIC, JOURNAL_MAGIC)?;
            put(&mut system, KEY_FORMAT, &FORMAT_VERSION.to_le_bytes())?;
            put(&mut system, KEY_NEXT_INDEX, &FIRST_INDEX.to_le_bytes())?;
            txn.open_table(RECORDS)
                .map_err(|e| db_err(path, "create record table", e))?;
            txn.open_table(USER_META)
                .map_err(|e| db_err(path, "create metadata table", e))?;
        }
        txn.commit().map_err(|e| db_err(path, "commit", e))?;
    }
    fs::rename(&tmp.0, path).map_err(io_err(path, "rename new journal into place"))?;
    if let Ok(d) = File::open(dir) {
        d.sync_all().map_err(io_err(path, "sync directory"))?;
    }
    Ok(())
}

impl<T: Serialize + DeserializeOwned> Journal<T> {
    /// Opens the journal at `path`, creating it if it does not exist (or is an empty file).
    ///
    /// # Errors
    /// Refuses files that are not sound journals of a supported format (see the crate docs);
    /// a refused file is left exactly as it was.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let len = match fs::metadata(path) {
            Ok(m) if m.is_file() => Some(m.len()),
            Ok(_) => {
                return Err(JournalError::NotAJournal {
                    path: path.to_path_buf(),
                    reason: "it is not a regular file".into(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(path, "stat")(e)),
        };
        match len {
            None | Some(0) => {
                tracing::info!(path = %path.display(), "creating journal");
                create_new(path)?;
            }
            Some(len) => {
                precheck_file(path, len)?;
                verify_copy(path)?;
            }
        }
        let db = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err(path, "open for writing"))
            .and_then(|_| Database::open(path).map_err(|e| map_open_error(path, e)))?;
        let next_index = verify(&db, path)?;
        tracing::debug!(path = %path.display(), next_index, "journal open");
        Ok(Self {
            db,
            path: path.to_path_buf(),
            next_index,
            _record: PhantomData,
        })
    }

    /// The journal's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The index the next appended record will get.
    pub fn next_index(&self) -> u64 {
        self.next_index
    }

    /// Appends a record; when this returns `Ok`, the record is durable. Returns its index.
    ///
    /// # Errors
    /// Serialization failure, a record over the size limit, or a storage failure (in which
    /// case the record is not in the journal).
    pub fn append(&mut self, record: &T) -> Result<u64> {
        let body = serde_json::to_vec(record).map_err(|source| JournalError::Serialize {
            path: self.path.clone(),
            source,
        })?;
        let env = envelope::encode(&body).map_err(|_| JournalError::RecordTooLarge {
            path: self.path.clone(),
            len: body.len(),
        })?;
        let index = self.next_index;
        self.commit_record(index, &env)?;
        Ok(index)
    }

    /// Writes one enveloped record at `index` and advances the next index past it, durably.
    fn commit_record(&mut self, index: u64, env: &[u8]) -> Result<()> {
        self.commit_record_replacing(index, env, false).map(|_| ())
    }

    /// Writes `env` at `index` and makes `index + 1` the next index, in one durable
    /// transaction; with `replace`, first removes every record from `index` on. Returns how
    /// many records were removed.
    fn commit_record_replacing(&mut self, index: u64, env: &[u8], replace: bool) -> Result<u64> {
        let path = &self.path;
        let next = index
            .checked_add(1)
            .ok_or_else(|| JournalError::ImportRefused {
                path: path.clone(),
                index,
                reason: "the index space is exhausted".into(),
            })?;
        let txn = immediate_write(&self.db, path)?;
        let mut removed = 0;
        {
            let mut records = txn
                .open_table(RECORDS)
                .map_err(|e| db_err(path, "open record table", e))?;
            if replace {
                removed = remove_records(&mut records, index.., path)?;
            }
            records
                .insert(index, env)
                .map_err(|e| db_err(path, "insert record", e))?;
            let mut system = txn
                .open_table(SYSTEM)
                .map_err(|e| db_err(path, "open system table", e))?;
            system
                .insert(KEY_NEXT_INDEX, next.to_le_bytes().as_slice())
                .map_err(|e| db_err(path, "advance next index", e))?;
        }
        txn.commit().map_err(|e| db_err(path, "commit record", e))?;
        self.next_index = next;
        Ok(removed)
    }

    fn decode_record(&self, index: u64, env: &[u8]) -> Result<T> {
        let body = envelope::decode(env).map_err(|source| JournalError::Corrupt {
            path: self.path.clone(),
            location: format!("record {index}"),
            source,
        })?;
        serde_json::from_slice(body).map_err(|source| JournalError::Deserialize {
            path: self.path.clone(),
            index,
            source,
        })
    }

    /// Raw envelopes with index `>= from`, at most `limit` of them, in index order.
    fn raw_range(&self, from: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>> {
        let path = &self.path;
        let txn = self
            .db
            .begin_read()
            .map_err(|e| db_err(path, "begin read", e))?;
        let records = txn
            .open_table(RECORDS)
            .map_err(|e| db_err(path, "open record table", e))?;
        let mut out = Vec::new();
        for item in records
            .range(from..)
            .map_err(|e| db_err(path, "scan records", e))?
            .take(limit)
        {
            let (k, v) = item.map_err(|e| db_err(path, "scan records", e))?;
            out.push((k.value(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// All records, in index order.
    ///
    /// # Errors
    /// A record that fails verification or does not decode as `T`.
    pub fn entries(&self) -> Result<Vec<(u64, T)>> {
        self.entries_from(0, usize::MAX)
    }

    /// Up to `limit` records with index `>= from`, in index order.
    ///
    /// # Errors
    /// As [`Journal::entries`].
    pub fn entries_from(&self, from: u64, limit: usize) -> Result<Vec<(u64, T)>> {
        self.raw_range(from, limit)?
            .into_iter()
            .map(|(i, env)| Ok((i, self.decode_record(i, &env)?)))
            .collect()
    }

    /// The newest record, if any.
    ///
    /// # Errors
    /// As [`Journal::entries`].
    pub fn last(&self) -> Result<Option<(u64, T)>> {
        let path = &self.path;
        let txn = self
            .db
            .begin_read()
            .map_err(|e| db_err(path, "begin read", e))?;
        let records = txn
            .open_table(RECORDS)
            .map_err(|e| db_err(path, "open record table", e))?;
        let last = records
            .last()
            .map_err(|e| db_err(path, "read last record", e))?;
        match last {
            None => Ok(None),
            Some((k, v)) => {
                let i = k.value();
                Ok(Some((i, self.decode_record(i, v.value())?)))
            }
        }
    }

    /// Number of records held.
    ///
    /// # Errors
    /// A storage failure.
    pub fn len(&self) -> Result<u64> {
        let path = &self.path;
        let txn = self
            .db
            .begin_read()
            .map_err(|e| db_err(path, "begin read", e))?;
        let records = txn
            .open_table(RECORDS)
            .map_err(|e| db_err(path, "open record table", e))?;
        records.len().map_err(|e| db_err(path, "count records", e))
    }

    /// Whether the journal holds no records.
    ///
    /// # Errors
    /// A storage failure.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Removes every record with index `< keep_from`, durably. Indexes of the remaining and
    /// future records do not change. Returns how many records were removed.
    ///
    /// # Errors
    /// A storage failure (nothing is removed then).
    pub fn compact(&mut self, keep_from: u64) -> Result<u64> {
        let path = &self.path;
        let txn = immediate_write(&self.db, path)?;
        let removed;
        {
            let mut records = txn
                .open_table(RECORDS)
                .map_err(|e| db_err(path, "open record table", e))?;
            removed = remove_records(&mut records, ..keep_from, path)?;
        }
        txn.commit()
            .map_err(|e| db_err(path, "commit compaction", e))?;
        tracing::debug!(path = %path.display(), keep_from, removed, "journal compacted");
        Ok(removed)
    }

    fn check_meta_key(&self, key: &str) -> Result<()> {
        if key.is_empty() || key.len() > MAX_META_KEY_LEN {
            return Err(JournalError::BadMeta {
                path: self.path.clone(),
                key: key.chars().take(64).collect(),
                reason: format!("keys must be 1 to {MAX_META_KEY_LEN} bytes long"),
            });
        }
        Ok(())
    }

    /// Stores `value` under `key` in the user metadata area, durably.
    ///
    /// # Errors
    /// A key that is empty or over [`MAX_META_KEY_LEN`] bytes, a value over
    /// [`MAX_META_VALUE_LEN`] bytes, or a storage failure.
    pub fn set_meta(&mut self, key: &str, value: &[u8]) -> Result<()> {
        self.check_meta_key(key)?;
        if value.len() > MAX_META_VALUE_LEN {
            return Err(JournalError::BadMeta {
                path: self.path.clone(),
                key: key.into(),
                reason: format!(
                    "the value is {} bytes, more than the {MAX_META_VALUE_LEN}-byte limit",
                    value.len()
                ),
            });
        }
        let env = envelope::encode(value).map_err(|e| JournalError::BadMeta {
            path: self.path.clone(),
            key: key.into(),
            reason: e.to_string(),
        })?;
        let path = &self.path;
        let txn = immediate_write(&self.db, path)?;
        {
            let mut meta = txn
                .open_table(USER_META)
                .map_err(|e| db_err(path, "open metadata table", e))?;
            meta.insert(key, env.as_slice())
                .map_err(|e| db_err(path, "write metadata", e))?;
        }
        txn.commit()
            .map_err(|e| db_err(path, "commit metadata", e))?;
        Ok(())
    }

    /// The value stored under `key` in the user metadata area.
    ///
    /// # Errors
    /// A stored value that fails verification, or a storage failure.
    pub fn meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let path = &self.path;
        let txn = self
            .db
            .begin_read()
            .map_err(|e| db_err(path, "begin read", e))?;
        let meta = txn
            .open_table(USER_META)
            .map_err(|e| db_err(path, "open metadata table", e))?;
        let Some(v) = meta
            .get(key)
            .map_err(|e| db_err(path, "read metadata", e))?
        else {
            return Ok(None);
        };
        let body = envelope::decode(v.value()).map_err(|source| JournalError::Corrupt {
            path: path.clone(),
            location: format!("metadata entry {key:?}"),
            source,
        })?;
        Ok(Some(body.to_vec()))
    }

    /// Every raw record envelope with index `>= from`, in order, for mirroring to a peer.
    ///
    /// # Errors
    /// A storage failure.
    pub fn export_since(&self, from: u64) -> Result<Vec<(u64, Vec<u8>)>> {
        self.raw_range(from, usize::MAX)
    }

    /// At most `limit` raw record envelopes with index `>= from` (a bounded
    /// [`Journal::export_since`] for streaming a long journal in batches).
    ///
    /// # Errors
    /// A storage failure.
    pub fn export_batch(&self, from: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>> {
        self.raw_range(from, limit)
    }

    /// Adds a record received from a peer's [`Journal::export_since`], durably, keeping this
    /// journal identical to the peer's.
    ///
    /// The envelope must verify and its body must decode as `T`. `index` must be at or past
    /// [`Journal::next_index`] (a gap is allowed: the peer may have compacted). Re-importing a
    /// record this journal already holds with identical bytes is accepted and changes nothing,
    /// so retransmissions are harmless.
    ///
    /// # Errors
    /// A bad envelope, a body that is not a `T`, an index before the end that conflicts with
    /// (or is missing from) this journal, or a storage failure.
    pub fn import(&mut self, index: u64, envelope_bytes: &[u8]) -> Result<()> {
        let body =
            envelope::decode(envelope_bytes).map_err(|source| JournalError::ImportCorrupt {
                path: self.path.clone(),
                index,
                source,
            })?;
        if let Err(e) = serde_json::from_slice::<T>(body) {
            return Err(JournalError::ImportRefused {
                path: self.path.clone(),
                index,
                reason: format!("its body does not decode as the expected record type: {e}"),
            });
        }
        if index < self.next_index {
            let existing = self.raw_range(index, 1)?;
            return match existing.first() {
                Some((i, bytes)) if *i == index && bytes == envelope_bytes => Ok(()),
                Some((i, _)) if *i == index => Err(JournalError::ImportRefused {
                    path: self.path.clone(),
                    index,
                    reason: "this journal already holds a different record at that index".into(),
                }),
                _ => Err(JournalError::ImportRefused {
                    path: self.path.clone(),
                    index,
                    reason: format!(
                        "it lies before this journal's next index {} and is not held here",
                        self.next_index
                    ),
                }),
            };
        }
        self.commit_record(index, envelope_bytes)
    }
    /// Like [`Journal::import`], for a record from the peer whose history wins (the agent
    /// that drives the pair): a record this journal holds at `index` with *different* bytes,
    /// and every record after it, are replaced by the peer's record, in one durable
    /// transaction. This is how an agent that wrote a record and died before mirroring it
    /// rejoins: the peer drove on from the record before and its history is the pair's.
    /// Returns how many records of this journal were dropped (0 when it was an ordinary
    /// import).
    ///
    /// # Errors
    /// A bad envelope, a body that is not a `T`, an index this journal compacted away, or a
    /// storage failure; nothing changes then.
    pub fn adopt(&mut self, index: u64, envelope_bytes: &[u8]) -> Result<u64> {
        match self.import(index, envelope_bytes) {
            Ok(()) => return Ok(0),
            Err(JournalError::ImportRefused { reason, .. })
                if reason.starts_with("this journal already holds a different record") => {}
            Err(e) => return Err(e),
        }
        let dropped = self.commit_record_replacing(index, envelope_bytes, true)?;
        tracing::debug!(path = %self.path.display(), index, dropped, "journal: adopted the peer's record");
        Ok(dropped)
    }
}

/// Removes the records with indexes in `range`; returns how many there were.
fn remove_records(
    records: &mut redb::Table<'_, u64, &'static [u8]>,
    range: impl std::ops::RangeBounds<u64>,
    path: &Path,
) -> Result<u64> {
    let before = records
        .len()
        .map_err(|e| db_err(path, "count records", e))?;
    records
        .retain_in(range, |_, _| false)
        .map_err(|e| db_err(path, "remove records", e))?;
    let after = records
        .len()
        .map_err(|e| db_err(path, "count records", e))?;
    Ok(before - after)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Rec {
        step: u32,
        note: String,
    }

    fn rec(i: u32) -> Rec {
        Rec {
            step: i,
            note: format!("transition {i}"),
        }
    }

    #[test]
    fn append_read_last_len() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j.redb");
        let mut j = Journal::<Rec>::open(&p).unwrap();
        assert!(j.is_empty().unwrap());
        assert_eq!(j.last().unwrap(), None);
        for i in 0..5 {
            assert_eq!(j.append(&rec(i)).unwrap(), FIRST_INDEX + u64::from(i));
        }
        assert_eq!(j.len().unwrap(), 5);
        assert_eq!(j.last().unwrap(), Some((5, rec(4))));
        let all = j.entries().unwrap();
        assert_eq!(all.len(), 5);
        assert!(all
            .iter()
            .enumerate()
            .all(|(k, (i, r))| *i == k as u64 + 1 && r.step == k as u32));
        assert_eq!(
            j.entries_from(3, 2).unwrap(),
            vec![(3, rec(2)), (4, rec(3))]
        );
    }

    #[test]
    fn compact_keeps_indexes_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j.redb");
        {
            let mut j = Journal::<Rec>::open(&p).unwrap();
            for i in 0..10 {
                j.append(&rec(i)).unwrap();
            }
            assert_eq!(j.compact(7).unwrap(), 6);
            assert_eq!(j.compact(7).unwrap(), 0);
            assert_eq!(j.compact(100).unwrap(), 4);
            assert!(j.is_empty().unwrap());
        }
        let mut j = Journal::<Rec>::open(&p).unwrap();
        assert_eq!(j.next_index(), 11);
        assert_eq!(j.append(&rec(99)).unwrap(), 11);
        assert_eq!(j.entries().unwrap(), vec![(11, rec(99))]);
    }

    #[test]
    fn meta_round_trips_and_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j.redb");
        {
            let mut j = Journal::<Rec>::open(&p).unwrap();
            assert_eq!(j.meta("identity").unwrap(), None);
            j.set_meta("identity", b"appliance-a").unwrap();
            j.set_meta("identity", b"appliance-b").unwrap();
            assert!(matches!(
                j.set_meta("", b"x"),
                Err(JournalError::BadMeta { .. })
            ));
            let big = vec![0u8; MAX_META_VALUE_LEN + 1];
            let err = j.set_meta("big", &big).unwrap_err().to_string();
            assert!(err.contains("more than the"), "{err}");
            assert_eq!(j.meta("big").unwrap(), None);
        }
        let j = Journal::<Rec>::open(&p).unwrap();
        assert_eq!(
            j.meta("identity").unwrap().as_deref(),
            Some(&b"appliance-b"[..])
        );
    }

    #[test]
    fn second_handle_is_refused_while_open() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j.redb");
        let _j = Journal::<Rec>::open(&p).unwrap();
        let err = Journal::<Rec>::open(&p).unwrap_err();
        assert!(matches!(err, JournalError::AlreadyOpen { .. }), "{err}");
        assert!(err.to_string().contains("already open"));
    }

    #[test]
    fn export_import_mirrors_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Journal::<Rec>::open(dir.path().join("a")).unwrap();
        let mut b = Journal::<Rec>::open(dir.path().join("b")).unwrap();
        for i in 0..4 {
            a.append(&rec(i)).unwrap();
        }
        a.compact(2).unwrap();
        for (i, env) in a.export_since(0).unwrap() {
            b.import(i, &env).unwrap();
        }
        // Retransmission of the same batch is harmless.
        for (i, env) in a.export_batch(0, 2).unwrap() {
            b.import(i, &env).unwrap();
        }
        for i in 4..6 {
            a.append(&rec(i)).unwrap();
        }
        let since = b.next_index();
        for (i, env) in a.export_since(since).unwrap() {
            b.import(i, &env).unwrap();
        }
        assert_eq!(a.export_since(0).unwrap(), b.export_since(0).unwrap());
        assert_eq!(a.next_index(), b.next_index());
        assert_eq!(b.entries().unwrap(), a.entries().unwrap());
    }

    #[test]
    fn import_refuses_bad_envelopes_conflicts_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Journal::<Rec>::open(dir.path().join("a")).unwrap();
        let mut b = Journal::<Rec>::open(dir.path().join("b")).unwrap();
        a.append(&rec(0)).unwrap();
        a.append(&rec(1)).unwrap();
        let exported = a.export_since(0).unwrap();
        let (i1, e1) = &exported[0];
        let (i2, e2) = &exported[1];

        let mut bad = e1.clone();
        *bad.last_mut().unwrap() ^= 0x20;
        let err = b.import(*i1, &bad).unwrap_err();
        assert!(
            matches!(
                err,
                JournalError::ImportCorrupt {
                    source: EnvelopeError::BadChecksum { .. },
                    ..
                }
            ),
            "{err}"
        );
        let not_rec = envelope::encode(b"[1,2,3]").unwrap();
        let err = b.import(*i1, &not_rec).unwrap_err();
        assert!(err.to_string().contains("does not decode"), "{err}");
        assert_eq!(b.next_index(), FIRST_INDEX);

        b.import(*i2, e2).unwrap();
        // Index 1 now lies before b's end and b never held it.
        let err = b.import(*i1, e1).unwrap_err();
        assert!(err.to_string().contains("is not held here"), "{err}");
        // A different record at an index b already holds.
        let err = b.import(*i2, e1).unwrap_err();
        assert!(err.to_string().contains("different record"), "{err}");
        assert_eq!(b.entries().unwrap(), vec![(2, rec(1))]);
    }

    #[test]
    fn adopt_replaces_a_divergent_suffix_with_the_peers_history() {
        let dir = tempfile::tempdir().unwrap();
        // a wrote records 1..=3 and died having mirrored only 1..=2 to b, which drove on.
        let mut a = Journal::<Rec>::open(dir.path().join("a")).unwrap();
        let mut b = Journal::<Rec>::open(dir.path().join("b")).unwrap();
        for i in 0..3 {
            a.append(&rec(i)).unwrap();
        }
        for (i, env) in a.export_batch(0, 2).unwrap() {
            b.import(i, &env).unwrap();
        }
        b.append(&rec(30)).unwrap();
        b.append(&rec(40)).unwrap();
        let theirs = b.export_since(3).unwrap();
        // An ordinary import refuses the conflict and changes nothing.
        assert!(a.import(theirs[0].0, &theirs[0].1).is_err());
        assert_eq!(a.next_index(), 4);
        // Adopting replaces a's record 3 with b's, then goes on as imports.
        assert_eq!(a.adopt(theirs[0].0, &theirs[0].1).unwrap(), 1);
        assert_eq!(a.adopt(theirs[1].0, &theirs[1].1).unwrap(), 0);
        assert_eq!(a.entries().unwrap(), b.entries().unwrap());
        assert_eq!(a.next_index(), b.next_index());
        // Identical records are no-ops; bad envelopes are still refused, changing nothing.
        assert_eq!(a.adopt(theirs[1].0, &theirs[1].1).unwrap(), 0);
        let mut bad = theirs[1].1.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(a.adopt(3, &bad).is_err());
        assert_eq!(a.entries().unwrap(), b.entries().unwrap());
        // The replacement survives reopening.
        drop(a);
        let a = Journal::<Rec>::open(dir.path().join("a")).unwrap();
        assert_eq!(a.entries().unwrap(), b.entries().unwrap());
    }
}
