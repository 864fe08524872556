//! The image manifest (`manifest.toml`): what an image is, what it runs, which replicated
//! schema versions it reads and writes, and the SHA-256 of every file it holds.
//!
//! ```toml
//! format = 2
//! name = "kvd"
//! version = "1.2.0"
//! kind = "vm"                      # or "process"
//!
//! [entrypoint]
//! path = "bin/kvd"                 # relative to the image (and to the guest root for a VM)
//!
//! [service]                        # how the agent runs it: see crate::service
//! protocol = "resp"
//! service_port = 6379
//! sync_port = 7000
//! args = ["--service-listen", "{service_listen}", "--sync-listen", "{sync_listen}"]
//!
//! [schemas.kv]                     # one table per replicated service
//! reads = [1, 2]
//! writes = 2                       # one version or a list; `native` defaults to the highest
//!                                  # version both read and written
//!
//! [vm]                             # required for kind = "vm", refused otherwise
//! kernel = "boot/vmlinuz"
//! initramfs = "boot/initramfs.cpio"
//! cmdline = "console=ttyS0 panic=-1"
//! kernel_release = "6.1.0-56-amd64"
//!
//! [files]                          # every file of the image, with its SHA-256
//! "bin/kvd" = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//! ```
//!
//! Format 1 has no `[service]` table (and refuses one); its images get the legacy contract
//! ([`ServiceContract::legacy`]), and `entrypoint.args` are literal arguments. In format 2 the
//! arguments are the template `service.args`, and `entrypoint.args` must be absent or empty.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::service::{Protocol, ServiceContract};

/// Manifest format version written by this build.
pub const MANIFEST_FORMAT: u32 = 2;
/// The first manifest format with a `[service]` table.
pub const SERVICE_FORMAT: u32 = 2;
/// Largest manifest accepted, in bytes.
pub const MAX_MANIFEST_LEN: u64 = 1024 * 1024;
/// Most files an image may list.
pub const MAX_FILES: usize = 10_000;
/// Most replicated services an image may declare.
pub const MAX_SERVICES: usize = 64;
/// Most schema versions one service may list.
pub const MAX_VERSIONS: usize = 64;
/// Most entrypoint arguments.
pub const MAX_ARGS: usize = 256;
/// Longest kernel command line accepted.
pub const MAX_CMDLINE_LEN: usize = 2048;

/// Why a manifest is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ManifestError {
    /// Not parseable as TOML of the expected shape.
    #[error("it is not a valid manifest document: {0}")]
    Syntax(String),
    /// Larger than [`MAX_MANIFEST_LEN`].
    #[error("it is {len} bytes, more than the {MAX_MANIFEST_LEN}-byte limit")]
    TooLarge {
        /// Its size.
        len: u64,
    },
    /// A required field is absent.
    #[error("the required field `{field}` is missing")]
    Missing {
        /// The field.
        field: String,
    },
    /// A field has a bad value.
    #[error("the field `{field}` is invalid: {reason}")]
    Invalid {
        /// The field.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// `kind` is neither `process` nor `vm`.
    #[error("the field `kind` is {kind:?}, which is not a known image kind (expected \"process\" or \"vm\")")]
    UnknownKind {
        /// The kind found.
        kind: String,
    },
    /// Written in a newer manifest format.
    #[error("it has manifest format {found}, newer than the newest format {MANIFEST_FORMAT} this build reads")]
    NewerFormat {
        /// The format found.
        found: u32,
    },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ManifestError {
    ManifestError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// What an image runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A program run in the process sandbox.
    Process,
    /// A kernel and initramfs booted in a virtual machine.
    Vm,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Process => "process",
            Kind::Vm => "vm",
        })
    }
}

/// A semver-like version: `MAJOR.MINOR.PATCH`, optionally `-PRERELEASE` and `+BUILD`.
/// Ordered by the numbers, then a pre-release before the release; build metadata is ignored
/// for ordering.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Version {
    /// Major number.
    pub major: u64,
    /// Minor number.
    pub minor: u64,
    /// Patch number.
    pub patch: u64,
    /// Pre-release tag, if any.
    pub pre: Option<String>,
    /// Build metadata, if any.
    pub build: Option<String>,
}

impl FromStr for Version {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let err = || format!("{s:?} is not a version of the form MAJOR.MINOR.PATCH[-PRE][+BUILD]");
        let (rest, build) = match s.split_once('+') {
            Some((r, b)) => (r, Some(b)),
            None => (s, None),
        };
        let (core, pre) = match rest.split_once('-') {
            Some((c, p)) => (c, Some(p)),
            None => (rest, None),
        };
        let tag_ok = |t: &str| {
            !t.is_empty()
                && t.len() <= 64
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        };
        if pre.is_some_and(|p| !tag_ok(p)) || build.is_some_and(|b| !tag_ok(b)) {
            return Err(err());
        }
        let nums: Vec<&str> = core.split('.').collect();
        if nums.len() != 3 {
            return Err(err());
        }
        let num = |n: &str| -> Result<u64, String> {
            if n.is_empty()
                || n.len() > 1 && n.starts_with('0')
                || !n.bytes().all(|b| b.is_ascii_digit())
            {
                return Err(err());
            }
            n.parse().map_err(|_| err())
        };
        Ok(Version {
            major: num(nums[0])?,
            minor: num(nums[1])?,
            patch: num(nums[2])?,
            pre: pre.map(str::to_string),
            build: build.map(str::to_string),
        })
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)?;
        if let Some(p) = &self.pre {
            write!(f, "-{p}")?;
        }
        if let Some(b) = &self.build {
            write!(f, "+{b}")?;
        }
        Ok(())
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.major, self.minor, self.patch)
            .cmp(&(other.major, other.minor, other.patch))
            .then_with(|| match (&self.pre, &other.pre) {
                (None, None) => std::cmp::Ordering::Equal,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some(_), None) => std::cmp::Ordering::Less,
                (Some(a), Some(b)) => a.cmp(b),
            })
            .then_with(|| self.build.cmp(&other.build))
    }
}

/// The schema versions of one replicated service an image understands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaDecl {
    /// Versions it can read (receive and apply).
    pub reads: BTreeSet<u32>,
    /// Versions it can write (emit), natively or through its transforms.
    pub writes: BTreeSet<u32>,
    /// The version it stores natively.
    pub native: u32,
}

impl SchemaDecl {
    /// A declaration that writes `writes` (its native version) and reads `reads`.
    ///
    /// # Errors
    /// As [`SchemaDecl::validate`].
    pub fn new(writes: u32, reads: impl IntoIterator<Item = u32>) -> Result<Self, ManifestError> {
        let d = SchemaDecl {
            reads: reads.into_iter().collect(),
            writes: [writes].into(),
            native: writes,
        };
        d.validate("schema")?;
        Ok(d)
    }

    /// Checks the sets are non-empty, bounded, free of version 0, and that the native version
    /// is both read and written.
    ///
    /// # Errors
    /// [`ManifestError::Invalid`] naming `field`.
    pub fn validate(&self, field: &str) -> Result<(), ManifestError> {
        for (what, set) in [("reads", &self.reads), ("writes", &self.writes)] {
            if set.is_empty() {
                return Err(invalid(format!("{field}.{what}"), "it lists no version"));
            }
            if set.len() > MAX_VERSIONS {
                return Err(invalid(
                    format!("{field}.{what}"),
                    format!("it lists more than {MAX_VERSIONS} versions"),
                ));
            }
            if set.contains(&0) {
                return Err(invalid(
                    format!("{field}.{what}"),
                    "schema versions start at 1",
                ));
            }
        }
        if !self.reads.contains(&self.native) || !self.writes.contains(&self.native) {
            return Err(invalid(
                format!("{field}.native"),
                format!(
                    "the native version {} must be both read ({}) and written ({})",
                    self.native,
                    fmt_set(&self.reads),
                    fmt_set(&self.writes)
                ),
            ));
        }
        Ok(())
    }
}

pub(crate) fn fmt_set(s: &BTreeSet<u32>) -> String {
    let v: Vec<String> = s.iter().map(u32::to_string).collect();
    format!("{{{}}}", v.join(", "))
}

/// The program an image runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entrypoint {
    /// Path of the executable relative to the image directory (for a VM image, the same path
    /// relative to the guest's root).
    pub path: String,
    /// Arguments, not including the program name (format 1 only: from format 2 on the
    /// arguments are the template `service.args`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
}

/// How a VM image boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmBoot {
    /// Kernel image path within the image.
    pub kernel: String,
    /// Initramfs (uncompressed newc cpio) path within the image.
    pub initramfs: String,
    /// Kernel command line.
    pub cmdline: String,
    /// Release of the kernel (`uname -r` in the guest).
    pub kernel_release: String,
}

/// A validated manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Manifest format version.
    pub format: u32,
    /// Image name.
    pub name: String,
    /// Image version.
    pub version: Version,
    /// Process or VM.
    pub kind: Kind,
    /// What the image runs.
    pub entrypoint: Entrypoint,
    /// How the agent runs it (the legacy contract for format 1).
    pub service: ServiceContract,
    /// Replicated services, by name.
    pub schemas: BTreeMap<String, SchemaDecl>,
    /// Boot description, present exactly when `kind` is [`Kind::Vm`].
    pub vm: Option<VmBoot>,
    /// Every file of the image (relative path) and its lowercase hex SHA-256.
    pub files: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum RawWrites {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchema {
    reads: Option<Vec<u32>>,
    writes: Option<RawWrites>,
    #[serde(skip_serializing_if = "Option::is_none")]
    native: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    protocol: Option<Protocol>,
    service_port: Option<u16>,
    sync_port: Option<u16>,
    #[serde(default)]
    args: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    format: Option<u32>,
    name: Option<String>,
    version: Option<String>,
    kind: Option<String>,
    entrypoint: Option<Entrypoint>,
    #[serde(skip_serializing_if = "Option::is_none")]
    service: Option<RawService>,
    #[serde(default)]
    schemas: BTreeMap<String, RawSchema>,
    #[serde(skip_serializing_if = "Option::is_none")]
    vm: Option<VmBoot>,
    #[serde(default)]
    files: BTreeMap<String, String>,
}

/// Checks a name (image or service): 1 to 64 of `[A-Za-z0-9._-]`, starting alphanumeric.
pub fn validate_name(field: &str, name: &str) -> Result<(), ManifestError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{name:?} must be 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"),
        ))
    }
}

/// Checks a path within an image: relative, `/`-separated, no empty, `.` or `..` component,
/// no NUL or backslash, at most 1024 bytes, and not one of the manifest's own files.
pub fn validate_image_path(field: &str, path: &str) -> Result<(), ManifestError> {
    let reason = if path.is_empty() {
        Some("the path is empty")
    } else if path.len() > 1024 {
        Some("the path is longer than 1024 bytes")
    } else if path.starts_with('/') {
        Some("the path must be relative to the image directory")
    } else if path.contains('\0') || path.contains('\\') {
        Some("the path contains a NUL or backslash")
    } else if path
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        Some("the path has an empty, `.` or `..` component")
    } else if path == crate::MANIFEST_FILE || path == crate::SIGNATURE_FILE {
        Some("the manifest and its signature are not listed as image files")
    } else {
        None
    };
    match reason {
        Some(r) => Err(invalid(field, format!("{path:?}: {r}"))),
        None => Ok(()),
    }
}

fn validate_digest(field: &str, d: &str) -> Result<(), ManifestError> {
    if d.len() == 64
        && d.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{d:?} is not a SHA-256 digest (64 lowercase hex digits)"),
        ))
    }
}

impl Manifest {
    /// Parses and validates manifest text.
    ///
    /// # Errors
    /// A [`ManifestError`] naming the first bad field.
    pub fn from_toml(text: &str) -> Result<Manifest, ManifestError> {
        if text.len() as u64 > MAX_MANIFEST_LEN {
            return Err(ManifestError::TooLarge {
                len: text.len() as u64,
            });
        }
        let raw: RawManifest = toml::from_str(text)
            .map_err(|e| ManifestError::Syntax(e.to_string().trim().replace('\n', " ")))?;
        let format = raw.format.ok_or_else(|| ManifestError::Missing {
            field: "format".into(),
        })?;
        if format > MANIFEST_FORMAT {
            return Err(ManifestError::NewerFormat { found: format });
        }
        if format == 0 {
            return Err(invalid("format", "format versions start at 1"));
        }
        let missing = |f: &str| ManifestError::Missing { field: f.into() };
        let name = raw.name.ok_or_else(|| missing("name"))?;
        validate_name("name", &name)?;
        let version: Version = raw
            .version
            .ok_or_else(|| missing("version"))?
            .parse()
            .map_err(|r: String| invalid("version", r))?;
        let kind = match raw.kind.ok_or_else(|| missing("kind"))?.as_str() {
            "process" => Kind::Process,
            "vm" => Kind::Vm,
            other => return Err(ManifestError::UnknownKind { kind: other.into() }),
        };
        let entrypoint = raw.entrypoint.ok_or_else(|| missing("entrypoint"))?;
        if raw.schemas.len() > MAX_SERVICES {
            return Err(invalid(
                "schemas",
                format!("more than {MAX_SERVICES} services"),
            ));
        }
        let mut schemas = BTreeMap::new();
        for (svc, rs) in raw.schemas {
            let field = format!("schemas.{svc}");
            validate_name(&field, &svc)?;
            let reads: BTreeSet<u32> = rs
                .reads
                .ok_or_else(|| missing(&format!("{field}.reads")))?
                .into_iter()
                .collect();
            let writes: BTreeSet<u32> = match rs
                .writes
                .ok_or_else(|| missing(&format!("{field}.writes")))?
            {
                RawWrites::One(v) => [v].into(),
                RawWrites::Many(v) => v.into_iter().collect(),
            };
            for (what, set) in [("reads", &reads), ("writes", &writes)] {
                if set.is_empty() {
                    return Err(invalid(format!("{field}.{what}"), "it lists no version"));
                }
            }
            let native = match rs.native {
                Some(n) => n,
                None => writes.intersection(&reads).last().copied().ok_or_else(|| {
                    invalid(
                        format!("{field}.writes"),
                        format!(
                            "no version is both read ({}) and written ({})",
                            fmt_set(&reads),
                            fmt_set(&writes)
                        ),
                    )
                })?,
            };
            let d = SchemaDecl {
                reads,
                writes,
                native,
            };
            d.validate(&field)?;
            schemas.insert(svc, d);
        }
        let service = match (format >= SERVICE_FORMAT, raw.service) {
            (false, Some(_)) => {
                return Err(invalid(
                    "service",
                    format!("a [service] table needs manifest format {SERVICE_FORMAT} or newer (this one has format {format})"),
                ))
            }
            (false, None) => ServiceContract::legacy(kind, &entrypoint.args),
            (true, None) => return Err(missing("service")),
            (true, Some(rs)) => ServiceContract::from_parts(
                rs.protocol.ok_or_else(|| missing("service.protocol"))?,
                rs.service_port
                    .ok_or_else(|| missing("service.service_port"))?,
                rs.sync_port.ok_or_else(|| missing("service.sync_port"))?,
                &rs.args,
            )
?,
        };
        let m = Manifest {
            format,
            name,
            version,
            kind,
            entrypoint,
            service,
            schemas,
            vm: raw.vm,
            files: raw.files,
        };
        m.validate()?;
        Ok(m)
    }

    /// Checks the cross-field rules: files and digests well formed, entrypoint and boot files
    /// listed, `[vm]` present exactly for VM images, bounded arguments and command line.
    ///
    /// # Errors
    /// A [`ManifestError`] naming the first bad field.
    pub fn validate(&self) -> Result<(), ManifestError> {
        validate_name("name", &self.name)?;
        if self.files.len() > MAX_FILES {
            return Err(invalid("files", format!("more than {MAX_FILES} files")));
        }
        for (p, d) in &self.files {
            validate_image_path(&format!("files.{p:?}"), p)?;
            validate_digest(&format!("files.{p:?}"), d)?;
        }
        let listed = |field: &str, p: &str| -> Result<(), ManifestError> {
            validate_image_path(field, p)?;
            if !self.files.contains_key(p) {
                return Err(invalid(field, format!("{p:?} is not listed in [files]")));
            }
            Ok(())
        };
        listed("entrypoint.path", &self.entrypoint.path)?;
        if self.format >= SERVICE_FORMAT {
            if !self.entrypoint.args.is_empty() {
                return Err(invalid(
                    "entrypoint.args",
                    format!("from manifest format {SERVICE_FORMAT} on, the arguments are the template `service.args`"),
                ));
            }
            // A format-1 manifest's contract is derived, not declared: its literal arguments
            // keep format 1's own bounds (checked above).
            self.service.validate()?;
        }
        if self.entrypoint.args.len() > MAX_ARGS {
            return Err(invalid(
                "entrypoint.args",
                format!("more than {MAX_ARGS} arguments"),
            ));
        }
        if let Some(a) = self
            .entrypoint
            .args
            .iter()
            .find(|a| a.contains('\0') || a.len() > 4096)
        {
            return Err(invalid(
                "entrypoint.args",
                format!("argument {a:?} contains a NUL or is longer than 4096 bytes"),
            ));
        }
        for (svc, d) in &self.schemas {
            validate_name(&format!("schemas.{svc}"), svc)?;
            d.validate(&format!("schemas.{svc}"))?;
        }
        match (&self.kind, &self.vm) {
            (Kind::Process, Some(_)) => {
                return Err(invalid(
                    "vm",
                    "a [vm] table is only allowed when kind = \"vm\"",
                ))
            }
            (Kind::Vm, None) => return Err(ManifestError::Missing { field: "vm".into() }),
            (Kind::Vm, Some(vm)) => {
                listed("vm.kernel", &vm.kernel)?;
                listed("vm.initramfs", &vm.initramfs)?;
                if vm.cmdline.len() > MAX_CMDLINE_LEN || vm.cmdline.contains(['\n', '\r', '\0']) {
                    return Err(invalid(
                        "vm.cmdline",
                        format!("it must be one line of at most {MAX_CMDLINE_LEN} bytes"),
                    ));
                }
                let r = &vm.kernel_release;
                if r.is_empty()
                    || r.len() > 128
                    || !r.chars().all(|c| c.is_ascii_graphic() && c != '/')
                {
                    return Err(invalid(
                        "vm.kernel_release",
                        format!("{r:?} is not a kernel release string"),
                    ));
                }
            }
            (Kind::Process, None) => {}
        }
        Ok(())
    }

    /// The canonical TOML text of this manifest (what the image builder writes).
    pub fn to_toml(&self) -> String {
        let raw = RawManifest {
            format: Some(self.format),
            name: Some(self.name.clone()),
            version: Some(self.version.to_string()),
            kind: Some(self.kind.to_string()),
            entrypoint: Some(self.entrypoint.clone()),
            service: (self.format >= SERVICE_FORMAT).then(|| RawService {
                protocol: Some(self.service.protocol),
                service_port: Some(self.service.service_port),
                sync_port: Some(self.service.sync_port),
                args: self.service.args_text(),
            }),
            schemas: self
                .schemas
                .iter()
                .map(|(k, d)| {
                    let writes = if d.writes.len() == 1 {
                        RawWrites::One(d.native)
                    } else {
                        RawWrites::Many(d.writes.iter().copied().collect())
                    };
                    let default_native = d.writes.intersection(&d.reads).last().copied();
                    let raw = RawSchema {
                        reads: Some(d.reads.iter().copied().collect()),
                        writes: Some(writes),
                        native: (default_native != Some(d.native)).then_some(d.native),
                    };
                    (k.clone(), raw)
                })
                .collect(),
            vm: self.vm.clone(),
            files: self.files.clone(),
        };
        // Serializing plain strings, integers, arrays and string maps cannot fail.
        toml::to_string(&raw).expect("manifest serializes")
    }
}

/// Parses the command-line schema syntax: `SERVICE=WRITES:READS`, services separated by `;`,
/// version lists by `,`. `kvd=1:1,2` means service `kvd` writes version 1 and reads 1 and 2;
/// `kv=1,2:1,2;cfg=3:3` declares two services. The native version is the highest version both
/// read and written. An empty string declares no service.
///
/// # Errors
/// [`ManifestError::Invalid`] on the `schema` field, saying what is wrong.
pub fn parse_schema_spec(spec: &str) -> Result<BTreeMap<String, SchemaDecl>, ManifestError> {
    let mut out = BTreeMap::new();
    for part in spec.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = |why: &str| {
            invalid(
                "schema",
                format!("{part:?} {why}; expected SERVICE=WRITES:READS such as kvd=1:1,2"),
            )
        };
        let (svc, vers) = part.split_once('=').ok_or_else(|| bad("has no '='"))?;
        let (w, r) = vers
            .split_once(':')
            .ok_or_else(|| bad("has no ':' between written and read versions"))?;
        let list = |s: &str| -> Result<BTreeSet<u32>, ManifestError> {
            s.split(',')
                .map(|v| {
                    v.trim()
                        .parse::<u32>()
                        .map_err(|_| bad("has a version that is not a number"))
                })
                .collect()
        };
        let svc = svc.trim();
        validate_name("schema", svc)?;
        let (writes, reads) = (list(w)?, list(r)?);
        let native = writes
            .intersection(&reads)
            .last()
            .copied()
            .ok_or_else(|| bad("writes no version it also reads"))?;
        let d = SchemaDecl {
            reads,
            writes,
            native,
        };
        d.validate(&format!("schema {svc}"))?;
        if out.insert(svc.to_string(), d).is_some() {
            return Err(bad("names a service twice"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::ServiceContract;

    const DIGEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn good_vm() -> String {
        format!(
            r#"
format = 1
name = "kvd"
version = "1.2.0-rc.1+abc"
kind = "vm"

[entrypoint]
path = "bin/kvd"
args = ["--port", "6379"]

[schemas.kv]
reads = [1, 2]
writes = 2

[schemas.cfg]
reads = [3]
writes = [3]

[vm]
kernel = "boot/vmlinuz"
initramfs = "boot/initramfs.cpio"
cmdline = "console=ttyS0 panic=-1"
kernel_release = "6.1.0-56-amd64"

[files]
"bin/kvd" = "{DIGEST}"
"boot/vmlinuz" = "{DIGEST}"
"boot/initramfs.cpio" = "{DIGEST}"
"#
        )
    }

    #[test]
    fn parses_typed_fields_and_round_trips() {
        let m = Manifest::from_toml(&good_vm()).unwrap();
        assert_eq!(m.name, "kvd");
        assert_eq!(m.version.to_string(), "1.2.0-rc.1+abc");
        assert_eq!(m.kind, Kind::Vm);
        assert_eq!(m.entrypoint.args, ["--port", "6379"]);
        let kv = &m.schemas["kv"];
        assert_eq!((kv.native, kv.reads.len(), kv.writes.len()), (2, 2, 1));
        assert_eq!(m.vm.as_ref().unwrap().kernel_release, "6.1.0-56-amd64");
        let text = m.to_toml();
        assert_eq!(Manifest::from_toml(&text).unwrap(), m);
        // Canonical text is a fixed point.
        assert_eq!(Manifest::from_toml(&text).unwrap().to_toml(), text);
    }

    #[test]
    fn explicit_native_round_trips() {
        let mut m = Manifest::from_toml(&good_vm()).unwrap();
        m.schemas.insert(
            "x".into(),
            SchemaDecl {
                reads: [1, 2].into(),
                writes: [1, 2].into(),
                native: 1,
            },
        );
        let back = Manifest::from_toml(&m.to_toml()).unwrap();
        assert_eq!(back.schemas["x"].native, 1);
        assert_eq!(back, m);
    }

    fn refused(edit: impl Fn(String) -> String) -> String {
        let text = edit(good_vm());
        Manifest::from_toml(&text)
            .expect_err("must be refused")
            .to_string()
    }

    #[test]
    fn each_malformed_field_is_refused_clearly() {
        type Edit = Box<dyn Fn(String) -> String>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|s| s.replace("format = 1", "format = 3")),
                "newer than the newest format",
            ),
            (
                Box::new(|s| s.replace("format = 1", "")),
                "`format` is missing",
            ),
            (
                Box::new(|s| s.replace("name = \"kvd\"", "name = \"../evil\"")),
                "field `name` is invalid",
            ),
            (
                Box::new(|s| s.replace("1.2.0-rc.1+abc", "1.x")),
                "\"1.x\" is not a version",
            ),
            (
                Box::new(|s| s.replace("1.2.0-rc.1+abc", "01.2.3")),
                "is not a version",
            ),
            (
                Box::new(|s| s.replace("kind = \"vm\"", "kind = \"container\"")),
                "\"container\", which is not a known image kind",
            ),
            (
                Box::new(|s| s.replace("path = \"bin/kvd\"", "path = \"bin/other\"")),
                "`entrypoint.path` is invalid: \"bin/other\" is not listed",
            ),
            (
                Box::new(|s| s.replace("path = \"bin/kvd\"", "path = \"/bin/kvd\"")),
                "must be relative",
            ),
            (
                Box::new(|s| s.replace("reads = [1, 2]", "reads = []")),
                "`schemas.kv.reads` is invalid: it lists no version",
            ),
            (
                Box::new(|s| s.replace("reads = [1, 2]", "reads = [0, 1, 2]")),
                "schema versions start at 1",
            ),
            (
                Box::new(|s| s.replace("reads = [1, 2]", "reads = [1]")),
                "no version is both read",
            ),
            (
                Box::new(|s| s.replace("writes = 2\n", "")),
                "`schemas.kv.writes` is missing",
            ),
            (
                Box::new(|s| s.replacen(DIGEST, "abc", 1)),
                "is not a SHA-256 digest",
            ),
            (
                Box::new(|s| s.replace("\"bin/kvd\" = ", "\"../kvd\" = ")),
                "`..` component",
            ),
            (
                Box::new(|s| {
                    s.replace(
                        "kernel_release = \"6.1.0-56-amd64\"",
                        "kernel_release = \"\"",
                    )
                }),
                "not a kernel release",
            ),
            (
                Box::new(|s| {
                    s.replace(
                        "cmdline = \"console=ttyS0 panic=-1\"",
                        "cmdline = \"a\\nb\"",
                    )
                }),
                "`vm.cmdline` is invalid",
            ),
            (
                Box::new(|s| s.replace("kernel = \"boot/vmlinuz\"", "kernel = \"boot/missing\"")),
                "`vm.kernel` is invalid",
            ),
            (
                Box::new(|s| s.replace("kind = \"vm\"", "kind = \"process\"")),
                "only allowed when kind = \"vm\"",
            ),
            (Box::new(|s| s.replace("[vm]", "[vmx]")), "unknown field"),
            (
                Box::new(|s| s.replace("version = ", "version = = ")),
                "not a valid manifest document",
            ),
            (
                Box::new(|s| s.replace("format = 1", "format = \"one\"")),
                "not a valid manifest document",
            ),
        ];
        for (edit, want) in cases {
            let msg = refused(edit);
            assert!(msg.contains(want), "expected {want:?} in: {msg}");
        }
    }

    #[test]
    fn vm_kind_requires_vm_table() {
        let text = good_vm();
        let start = text.find("[vm]").unwrap();
        let end = text.find("[files]").unwrap();
        let cut = format!("{}{}", &text[..start], &text[end..]);
        let msg = Manifest::from_toml(&cut).unwrap_err().to_string();
        assert!(msg.contains("`vm` is missing"), "{msg}");
    }

    #[test]
    fn oversized_manifest_is_refused() {
        let big = format!("{}\n#{}", good_vm(), "x".repeat(MAX_MANIFEST_LEN as usize));
        assert!(matches!(
            Manifest::from_toml(&big),
            Err(ManifestError::TooLarge { .. })
        ));
    }

    #[test]
    fn versions_order_like_semver() {
        let v = |s: &str| s.parse::<Version>().unwrap();
        assert!(v("1.2.3") < v("1.10.0"));
        assert!(v("2.0.0-rc.1") < v("2.0.0"));
        assert!(v("0.9.9") < v("1.0.0-alpha"));
        for bad in [
            "1.2", "1.2.3.4", "a.b.c", "1.2.3-", "1.2.3+", "-1.2.3", "1..3",
        ] {
            assert!(bad.parse::<Version>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn schema_spec_syntax() {
        let s = parse_schema_spec("kvd=1:1,2").unwrap();
        assert_eq!(
            s["kvd"],
            SchemaDecl {
                reads: [1, 2].into(),
                writes: [1].into(),
                native: 1
            }
        );
        let s = parse_schema_spec(" kv=1,2:1,2 ; cfg=3:3 ").unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s["kv"].native, 2);
        assert!(parse_schema_spec("").unwrap().is_empty());
        for (bad, want) in [
            ("kvd", "has no '='"),
            ("kvd=1", "has no ':'"),
            ("kvd=x:1", "not a number"),
            ("kvd=2:1", "writes no version it also reads"),
            ("kvd=1:1;kvd=1:1", "twice"),
            ("=1:1", "field `schema` is invalid"),
        ] {
            let msg = parse_schema_spec(bad).unwrap_err().to_string();
            assert!(msg.contains(want), "{bad}: {msg}");
        }
    }

    fn good_v2() -> String {
        format!(
            r#"
format = 2
name = "echo"
version = "1.0.0"
kind = "process"

[entrypoint]
path = "bin/echo"

[service]
protocol = "length-prefixed"
service_port = 9000
sync_port = 9001
args = ["--listen={{service_listen}}", "--sync", "{{sync_listen}}", "--control", "{{control}}", "--id={{instance_id}}", "--grace", "{{ha_grace_ms}}", "{{{{literal}}}}"]

[files]
"bin/echo" = "{DIGEST}"
"#
        )
    }

    #[test]
    fn format_2_carries_the_service_contract_and_round_trips() {
        let m = Manifest::from_toml(&good_v2()).unwrap();
        assert_eq!(m.format, 2);
        assert_eq!(m.service.protocol, Protocol::LengthPrefixed);
        assert_eq!((m.service.service_port, m.service.sync_port), (9000, 9001));
        let v = crate::service::Values {
            instance_id: "i3".into(),
            service_listen: "127.0.0.1:5000".into(),
            sync_listen: "127.0.0.1:5001".into(),
            service_port: 5000,
            sync_port: 5001,
            control: "/run/c.sock".into(),
            ha_grace_ms: 250,
        };
        assert_eq!(
            crate::service::expand(&m.service.args, &v),
            [
                "--listen=127.0.0.1:5000",
                "--sync",
                "127.0.0.1:5001",
                "--control",
                "/run/c.sock",
                "--id=i3",
                "--grace",
                "250",
                "{literal}"
            ]
        );
        let text = m.to_toml();
        assert!(text.contains("[service]"), "{text}");
        assert_eq!(Manifest::from_toml(&text).unwrap(), m);
        assert_eq!(Manifest::from_toml(&text).unwrap().to_toml(), text);
    }

    #[test]
    fn format_1_gets_the_legacy_contract_and_keeps_its_text() {
        let m = Manifest::from_toml(&good_vm()).unwrap();
        assert_eq!(m.format, 1);
        assert_eq!(
            m.service,
            ServiceContract::legacy(Kind::Vm, &m.entrypoint.args)
        );
        assert_eq!(m.service.protocol, Protocol::Resp);
        // Written back as format 1: no [service] table, the literal arguments kept.
        let text = m.to_toml();
        assert!(!text.contains("[service]"), "{text}");
        assert!(text.contains("format = 1"), "{text}");
        let p = good_vm()
            .replace("kind = \"vm\"", "kind = \"process\"")
            .split("[vm]")
            .next()
            .unwrap()
            .to_string()
            + &format!("[files]\n\"bin/kvd\" = \"{DIGEST}\"\n");
        let m = Manifest::from_toml(&p).unwrap();
        assert_eq!(m.service, ServiceContract::legacy(Kind::Process, &[]));
    }

    #[test]
    fn format_1_arguments_keep_format_1_bounds() {
        // Longer than a template argument may be, with braces: literal in format 1.
        let arg = format!("--x={}", "{y}".repeat(1000));
        let text = good_vm().replace(
            "args = [\"--port\", \"6379\"]",
            &format!("args = [\"{arg}\"]"),
        );
        let m = Manifest::from_toml(&text).unwrap();
        assert_eq!(m.service.args_text().len(), 1);
        assert_eq!(m.entrypoint.args, [arg]);
    }

    #[test]
    fn each_malformed_service_field_is_refused_clearly() {
        type Edit = Box<dyn Fn(String) -> String>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|s| s.replace("{instance_id}", "{instance}")),
                "`service.args[5]` is invalid: argument \"--id={instance}\": {instance} is not a known placeholder",
            ),
            (
                Box::new(|s| s.replace("\"--sync\"", "\"--sync={sync_listen\"")),
                "`service.args[1]` is invalid: argument \"--sync={sync_listen\": the '{' at byte 7 is never closed",
            ),
            (
                Box::new(|s| s.replace("\"--sync\"", "\"--sync}x\"")),
                "`service.args[1]` is invalid",
            ),
            (
                Box::new(|s| s.replace("length-prefixed", "http")),
                "not a valid manifest document",
            ),
            (
                Box::new(|s| s.replace("protocol = \"length-prefixed\"\n", "")),
                "`service.protocol` is missing",
            ),
            (
                Box::new(|s| s.replace("service_port = 9000\n", "")),
                "`service.service_port` is missing",
            ),
            (
                Box::new(|s| s.replace("sync_port = 9001", "sync_port = 9000")),
                "`service.sync_port` is invalid",
            ),
            (
                Box::new(|s| s.replace("service_port = 9000", "service_port = 0")),
                "`service.service_port` is invalid",
            ),
            (
                Box::new(|s| s.replace("service_port = 9000", "service_port = 70000")),
                "not a valid manifest document",
            ),
            (
                Box::new(|s| s.replace("sync_port = 9001", "sync_port = 9001\nport = 1")),
                "unknown field",
            ),
            (
                Box::new(|s| {
                    let start = s.find("[service]").unwrap();
                    let end = s.find("[files]").unwrap();
                    format!("{}{}", &s[..start], &s[end..])
                }),
                "`service` is missing",
            ),
            (
                Box::new(|s| s.replace("path = \"bin/echo\"", "path = \"bin/echo\"\nargs = [\"-x\"]")),
                "`entrypoint.args` is invalid: from manifest format 2 on",
            ),
            (
                Box::new(|s| s.replace("format = 2", "format = 1")),
                "a [service] table needs manifest format 2",
            ),
        ];
        for (edit, want) in cases {
            let text = edit(good_v2());
            let msg = Manifest::from_toml(&text)
                .expect_err("must be refused")
                .to_string();
            assert!(msg.contains(want), "expected {want:?} in: {msg}");
        }
        // The template is bounded in count.
        let many: Vec<String> = (0..=crate::service::MAX_TEMPLATE_ARGS)
            .map(|i| format!("\"a{i}\""))
            .collect();
        let text = good_v2().replace(
            "args = [\"--listen",
            &format!("args = [{}]\nxargs = [\"--listen", many.join(", ")),
        );
        let text = text.replace("xargs", "# ");
        let msg = Manifest::from_toml(&text).unwrap_err().to_string();
        assert!(msg.contains("`service.args` is invalid"), "{msg}");
    }
}
