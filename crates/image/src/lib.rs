//! hitless-image: OS image manifests, digests, signatures, compatibility, and bootable image
//! build.
//!
//! An *image* is a directory holding a [`manifest::Manifest`] (`manifest.toml`), an optional
//! ed25519 signature of it (`manifest.sig`), and the files the manifest lists with their
//! SHA-256 digests. [`Image::open`] accepts a directory only if the manifest is valid, every
//! listed file is present as a regular file with the listed digest, and (when a trusted key is
//! configured) the signature verifies.
//!
//! - [`manifest`]: the manifest format and its validation;
//! - [`sign`]: signing and verifying manifests;
//! - [`service`]: the service contract (protocol, ports, argument template);
//! - [`compat`]: whether replicated state can flow between two images, both ways;
//! - [`build`]: building process and bootable VM images;
//! - [`cpio`]: the newc cpio writer used for initramfs archives.

#![warn(missing_docs)]

pub mod build;
pub mod compat;
pub mod cpio;
pub mod manifest;
pub mod service;
pub mod sign;

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use thiserror::Error;

pub use manifest::{Kind, Manifest, ManifestError, SchemaDecl, Version};
pub use service::{Protocol, ServiceContract};

/// Name of the manifest file in an image directory.
pub const MANIFEST_FILE: &str = "manifest.toml";
/// Name of the detached manifest signature in an image directory.
pub const SIGNATURE_FILE: &str = "manifest.sig";

/// Everything that can go wrong with an image.
#[derive(Debug, Error)]
pub enum ImageError {
    /// An operating system call failed.
    #[error("image {path}: {action} failed: {source}")]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// What was being attempted.
        action: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The manifest is invalid.
    #[error("image manifest {path} is invalid: {source}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: ManifestError,
    },
    /// A listed file is absent.
    #[error("image {dir}: the file {file:?} listed in the manifest is missing")]
    MissingFile {
        /// The image directory.
        dir: PathBuf,
        /// The listed path.
        file: String,
    },
    /// A listed path is not a regular file (a directory, a symlink, a device...).
    #[error(
        "image {dir}: {file:?} is not a regular file ({what}); image files must be plain files"
    )]
    NotRegular {
        /// The image directory.
        dir: PathBuf,
        /// The listed path.
        file: String,
        /// What it is instead.
        what: &'static str,
    },
    /// A file's content does not match its listed digest.
    #[error(
        "image {dir}: the file {file:?} has SHA-256 {actual}, but the manifest lists {expected}"
    )]
    DigestMismatch {
        /// The image directory.
        dir: PathBuf,
        /// The listed path.
        file: String,
        /// Digest in the manifest.
        expected: String,
        /// Digest of the file.
        actual: String,
    },
    /// A trusted key is configured but the image has no signature.
    #[error(
        "image {dir} is not signed ({SIGNATURE_FILE} is missing), but a trusted key is configured"
    )]
    Unsigned {
        /// The image directory.
        dir: PathBuf,
    },
    /// The signature file is malformed.
    #[error("image signature {path} is malformed: {reason}")]
    BadSignatureFile {
        /// The signature file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The signature does not verify against any trusted key.
    #[error("image {dir}: the manifest signature does not verify against any of the {keys} trusted key(s); the manifest was altered or signed by another key")]
    BadSignature {
        /// The image directory.
        dir: PathBuf,
        /// How many keys were tried.
        keys: usize,
    },
    /// A key could not be parsed.
    #[error("invalid {what} key: {reason}")]
    BadKey {
        /// Public or signing.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// Building an image failed.
    #[error("building image {out}: {reason}")]
    Build {
        /// The output directory.
        out: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// Result alias for image operations.
pub type Result<T, E = ImageError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: &Path, action: &'static str) -> impl FnOnce(io::Error) -> ImageError {
    let path = path.to_path_buf();
    move |source| ImageError::Io {
        path,
        action,
        source,
    }
}

/// What is known about an image's signature after opening it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignatureStatus {
    /// No `manifest.sig` (and no trusted key was configured).
    Unsigned,
    /// A well-formed signature is present but no trusted key was configured to check it.
    NotChecked,
    /// The signature verified against the trusted key with this hex-encoded public key.
    Verified {
        /// The key that verified it.
        key: String,
    },
}

/// How strictly [`Image::open_with`] treats signatures.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Trusted public keys. When non-empty, the image must carry a signature that verifies
    /// against one of them.
    pub trusted_keys: Vec<ed25519_dalek::VerifyingKey>,
}

/// A verified image directory.
#[derive(Debug, Clone)]
pub struct Image {
    /// The image directory.
    pub dir: PathBuf,
    /// Its validated manifest.
    pub manifest: Manifest,
    /// Signature state.
    pub signature: SignatureStatus,
}

/// Lowercase hex SHA-256 of a file, streamed.
///
/// # Errors
/// The file cannot be read.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(io_err(path, "open"))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf).map_err(io_err(path, "read"))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Lowercase hex SHA-256 of bytes.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Reads the manifest file, bounded by [`manifest::MAX_MANIFEST_LEN`].
pub(crate) fn read_manifest_bytes(dir: &Path) -> Result<Vec<u8>> {
    let path = dir.join(MANIFEST_FILE);
    let f = File::open(&path).map_err(io_err(&path, "open manifest"))?;
    let mut bytes = Vec::new();
    f.take(manifest::MAX_MANIFEST_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err(&path, "read manifest"))?;
    if bytes.len() as u64 > manifest::MAX_MANIFEST_LEN {
        let len = fs::metadata(&path)
            .map(|m| m.len())
            .unwrap_or(bytes.len() as u64);
        return Err(ImageError::Manifest {
            path,
            source: ManifestError::TooLarge { len },
        });
    }
    Ok(bytes)
}

impl Image {
    /// Opens and verifies the image in `dir`, with no trusted key configured (a present
    /// signature is checked for form only).
    ///
    /// # Errors
    /// See [`ImageError`]: invalid manifest, missing or altered file, malformed signature.
    pub fn open(dir: impl AsRef<Path>) -> Result<Image> {
        Self::open_with(dir, &OpenOptions::default())
    }

    /// Opens and verifies the image in `dir` under `opts`.
    ///
    /// # Errors
    /// As [`Image::open`], plus a missing or non-verifying signature when trusted keys are set.
    pub fn open_with(dir: impl AsRef<Path>, opts: &OpenOptions) -> Result<Image> {
        let dir = dir.as_ref().to_path_buf();
        let bytes = read_manifest_bytes(&dir)?;
        let mpath = dir.join(MANIFEST_FILE);
        let text = std::str::from_utf8(&bytes).map_err(|e| ImageError::Manifest {
            path: mpath.clone(),
            source: ManifestError::Syntax(format!("it is not UTF-8 text ({e})")),
        })?;
        let manifest = Manifest::from_toml(text).map_err(|source| ImageError::Manifest {
            path: mpath.clone(),
            source,
        })?;
        // Signature first: a forged manifest should be reported as forged, not as having
        // wrong digests.
        let signature = sign::check(&dir, &bytes, &opts.trusted_keys)?;
        for (file, expected) in &manifest.files {
            verify_file(&dir, file, expected)?;
        }
        Ok(Image {
            dir,
            manifest,
            signature,
        })
    }

    /// Absolute path of a file listed in the manifest.
    pub fn path_of(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Path of the entrypoint executable.
    pub fn entrypoint_path(&self) -> PathBuf {
        self.path_of(&self.manifest.entrypoint.path)
    }

    /// Paths of the kernel and initramfs, for a VM image.
    pub fn boot_paths(&self) -> Option<(PathBuf, PathBuf)> {
        self.manifest
            .vm
            .as_ref()
            .map(|vm| (self.path_of(&vm.kernel), self.path_of(&vm.initramfs)))
    }
}

/// Checks one listed file: every component exists and is not a symlink, the file is regular,
/// and its digest matches.
fn verify_file(dir: &Path, file: &str, expected: &str) -> Result<()> {
    let mut p = dir.to_path_buf();
    let comps: Vec<&str> = file.split('/').collect();
    for (i, c) in comps.iter().enumerate() {
        p.push(c);
        let md = match fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ImageError::MissingFile {
                    dir: dir.to_path_buf(),
                    file: file.to_string(),
                })
            }
            Err(e) => return Err(io_err(&p, "stat")(e)),
        };
        let last = i + 1 == comps.len();
        let ft = md.file_type();
        let what = if ft.is_symlink() {
            Some("a symbolic link")
        } else if last && ft.is_dir() {
            Some("a directory")
        } else if last && !ft.is_file() {
            Some("a special file")
        } else if !last && !ft.is_dir() {
            Some("a path through a non-directory")
        } else {
            None
        };
        if let Some(what) = what {
            return Err(ImageError::NotRegular {
                dir: dir.to_path_buf(),
                file: file.to_string(),
                what,
            });
        }
    }
    let actual = sha256_file(&p)?;
    if actual != expected {
        return Err(ImageError::DigestMismatch {
            dir: dir.to_path_buf(),
            file: file.to_string(),
            expected: expected.to_string(),
            actual,
        });
    }
    Ok(())
}
