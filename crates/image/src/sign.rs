//! Ed25519 signatures over image manifests.
//!
//! The signed message is the domain-separation prefix [`SIGNING_CONTEXT`] followed by the exact
//! bytes of `manifest.toml`; since the manifest lists the SHA-256 of every file, the signature
//! covers the whole image. `manifest.sig` holds one line: `ed25519:` and the 64-byte signature in
//! lowercase hex. Keys are exchanged as 64 hex digits (32 bytes).

use std::fs;
use std::io;
use std::path::Path;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

use crate::{io_err, read_manifest_bytes, ImageError, Result, SignatureStatus, SIGNATURE_FILE};

/// Prefix of every signed message, so a manifest signature can never be mistaken for a
/// signature of anything else.
pub const SIGNING_CONTEXT: &[u8] = b"hitless-image-manifest-v1\n";
/// Largest signature file accepted.
pub const MAX_SIGNATURE_FILE_LEN: u64 = 1024;

/// The message signed for a manifest with these bytes.
pub fn signing_message(manifest_bytes: &[u8]) -> Vec<u8> {
    [SIGNING_CONTEXT, manifest_bytes].concat()
}

/// Parses a 64-hex-digit public key.
///
/// # Errors
/// [`ImageError::BadKey`] if it is not 32 hex-encoded bytes of a valid point.
pub fn verifying_key_from_hex(s: &str) -> Result<VerifyingKey> {
    let bytes: [u8; 32] = hex::decode(s.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| ImageError::BadKey {
            what: "public",
            reason: "expected 64 hex digits".into(),
        })?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| ImageError::BadKey {
        what: "public",
        reason: e.to_string(),
    })
}

/// Parses a 64-hex-digit signing key (the 32-byte secret seed).
///
/// # Errors
/// [`ImageError::BadKey`] if it is not 32 hex-encoded bytes.
pub fn signing_key_from_hex(s: &str) -> Result<SigningKey> {
    let bytes: [u8; 32] = hex::decode(s.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| ImageError::BadKey {
            what: "signing",
            reason: "expected 64 hex digits".into(),
        })?;
    Ok(SigningKey::from_bytes(&bytes))
}

/// Hex form of a public key.
pub fn verifying_key_to_hex(k: &VerifyingKey) -> String {
    hex::encode(k.as_bytes())
}

/// Signs the manifest of the image in `dir`, writing `manifest.sig`.
///
/// # Errors
/// The manifest cannot be read or the signature cannot be written.
pub fn sign_image(dir: &Path, key: &SigningKey) -> Result<()> {
    let bytes = read_manifest_bytes(dir)?;
    let sig = key.sign(&signing_message(&bytes));
    let path = dir.join(SIGNATURE_FILE);
    fs::write(&path, format!("ed25519:{}\n", hex::encode(sig.to_bytes())))
        .map_err(io_err(&path, "write signature"))
}

fn read_signature(dir: &Path) -> Result<Option<Signature>> {
    let path = dir.join(SIGNATURE_FILE);
    let md = match fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&path, "stat signature")(e)),
    };
    let bad = |reason: String| ImageError::BadSignatureFile {
        path: path.clone(),
        reason,
    };
    if md.len() > MAX_SIGNATURE_FILE_LEN {
        return Err(bad(format!(
            "it is {} bytes, more than {MAX_SIGNATURE_FILE_LEN}",
            md.len()
        )));
    }
    let text =
        fs::read_to_string(&path).map_err(|e| bad(format!("it is not readable text ({e})")))?;
    let hexsig = text
        .trim()
        .strip_prefix("ed25519:")
        .ok_or_else(|| bad("it does not start with \"ed25519:\"".into()))?;
    let bytes: [u8; 64] = hex::decode(hexsig)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| bad("the signature is not 128 hex digits".into()))?;
    Ok(Some(Signature::from_bytes(&bytes)))
}

/// Checks the signature of the image in `dir` whose manifest has `manifest_bytes`.
///
/// # Errors
/// A malformed signature file; or, when `trusted` is non-empty, a missing signature or one that
/// verifies against none of the keys.
pub fn check(
    dir: &Path,
    manifest_bytes: &[u8],
    trusted: &[VerifyingKey],
) -> Result<SignatureStatus> {
    let sig = read_signature(dir)?;
    match (sig, trusted.is_empty()) {
        (None, true) => Ok(SignatureStatus::Unsigned),
        (None, false) => Err(ImageError::Unsigned {
            dir: dir.to_path_buf(),
        }),
        (Some(_), true) => Ok(SignatureStatus::NotChecked),
        (Some(sig), false) => {
            let msg = signing_message(manifest_bytes);
            trusted
                .iter()
                .find(|k| k.verify(&msg, &sig).is_ok())
                .map(|k| SignatureStatus::Verified {
                    key: verifying_key_to_hex(k),
                })
                .ok_or(ImageError::BadSignature {
                    dir: dir.to_path_buf(),
                    keys: trusted.len(),
                })
        }
    }
}
