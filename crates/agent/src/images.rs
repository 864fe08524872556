//! The images an appliance can run, verified on registration.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hitless_core::{CompatVerdict, ImageRef, Version};
use hitless_image::Image;
use thiserror::Error;

/// Errors of the catalog.
#[derive(Debug, Error)]
pub enum CatalogError {
    #[error("{0}")]
    Image(#[from] hitless_image::ImageError),
    #[error("image {name} {version} is not registered on this appliance")]
    Unknown { name: String, version: Version },
    #[error(
        "image {name} has version {version:?}, which is not MAJOR.MINOR.PATCH with small numbers"
    )]
    BadVersion { name: String, version: String },
    #[error("a different image {name} {version} is already registered from {existing}")]
    Conflict {
        name: String,
        version: Version,
        existing: PathBuf,
    },
}

/// What kind of instance an image makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageKind {
    /// A service binary run in the process sandbox.
    Process,
    /// A bootable VM: kernel and initramfs.
    Vm {
        kernel: PathBuf,
        initramfs: PathBuf,
        cmdline: String,
    },
}

/// A registered image.
#[derive(Clone, Debug)]
pub struct ImageSpec {
    pub image: ImageRef,
    pub dir: PathBuf,
    pub kind: ImageKind,
    /// The service binary (inside the image directory).
    pub binary: PathBuf,
    pub manifest: hitless_image::manifest::Manifest,
}

/// Images by name and version.
#[derive(Clone, Debug, Default)]
pub struct ImageCatalog {
    images: BTreeMap<(String, Version), ImageSpec>,
}

fn core_version(name: &str, v: &hitless_image::manifest::Version) -> Result<Version, CatalogError> {
    let bad = || CatalogError::BadVersion {
        name: name.to_owned(),
        version: format!("{v:?}"),
    };
    Ok(Version {
        major: u32::try_from(v.major).map_err(|_| bad())?,
        minor: u32::try_from(v.minor).map_err(|_| bad())?,
        patch: u32::try_from(v.patch).map_err(|_| bad())?,
    })
}

impl ImageCatalog {
    /// Verifies the image in `dir` (manifest, digests, signature) and registers it.
    pub fn add(&mut self, dir: &Path) -> Result<ImageRef, CatalogError> {
        let img = Image::open(dir)?;
        let m = &img.manifest;
        let version = core_version(&m.name, &m.version)?;
        let image = ImageRef::new(m.name.clone(), version);
        let kind = match (img.boot_paths(), &m.vm) {
            (Some((kernel, initramfs)), Some(vm)) => ImageKind::Vm {
                kernel,
                initramfs,
                cmdline: vm.cmdline.clone(),
            },
            _ => ImageKind::Process,
        };
        let spec = ImageSpec {
            image: image.clone(),
            dir: img.dir.clone(),
            kind,
            binary: img.entrypoint_path(),
            manifest: img.manifest.clone(),
        };
        let key = (image.name.clone(), image.version);
        if let Some(existing) = self.images.get(&key) {
            if existing.manifest != spec.manifest {
                return Err(CatalogError::Conflict {
                    name: image.name,
                    version: image.version,
                    existing: existing.dir.clone(),
                });
            }
        }
        self.images.insert(key, spec);
        Ok(image)
    }

    /// A registered image.
    pub fn get(&self, image: &ImageRef) -> Result<ImageSpec, CatalogError> {
        self.images
            .get(&(image.name.clone(), image.version))
            .cloned()
            .ok_or_else(|| CatalogError::Unknown {
                name: image.name.clone(),
                version: image.version,
            })
    }

    /// Whether state flows both ways between two registered images.
    pub fn compat(
        &self,
        running: &ImageRef,
        target: &ImageRef,
    ) -> Result<CompatVerdict, CatalogError> {
        let r = self.get(running)?;
        let t = self.get(target)?;
        let report = hitless_image::compat::check(&r.manifest, &t.manifest);
        let blockers = report.blockers();
        Ok(CompatVerdict {
            from: running.version,
            to: target.version,
            upgrade_ok: report.forward_ok(),
            downgrade_ok: report.backward_ok(),
            detail: if blockers.is_empty() {
                "state converts in both directions for every replicated service".into()
            } else {
                blockers.join("; ")
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hitless_image::service::{Protocol, ServiceContract};

    fn image(dir: &Path, version: &str, protocol: Protocol) -> PathBuf {
        let bin = dir.join(format!("svc-{version}"));
        std::fs::write(&bin, b"\x7fELF pretend service").unwrap();
        let args = vec!["--listen".to_string(), "{service_listen}".to_string()];
        let contract = ServiceContract::from_parts(protocol, 9000, 9001, &args).unwrap();
        let schemas = hitless_image::manifest::parse_schema_spec("svc=1:1").unwrap();
        let out = dir.join(format!("img-{version}"));
        hitless_image::build::process_image(&out, "svc", version, &bin, &contract, &schemas)
            .unwrap();
        out
    }

    #[test]
    fn the_verdict_refuses_a_change_of_protocol_with_its_reason() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cat = ImageCatalog::default();
        let v1 = cat
            .add(&image(tmp.path(), "1.0.0", Protocol::LengthPrefixed))
            .unwrap();
        let same = cat
            .add(&image(tmp.path(), "1.1.0", Protocol::LengthPrefixed))
            .unwrap();
        let other = cat
            .add(&image(tmp.path(), "2.0.0", Protocol::Opaque))
            .unwrap();
        // The registered image carries its contract.
        assert_eq!(
            cat.get(&v1).unwrap().manifest.service.protocol,
            Protocol::LengthPrefixed
        );
        let ok = cat.compat(&v1, &same).unwrap();
        assert!(ok.upgrade_ok && ok.downgrade_ok, "{}", ok.detail);
        let refused = cat.compat(&v1, &other).unwrap();
        assert!(!refused.upgrade_ok && !refused.downgrade_ok);
        assert!(
            refused.detail.contains(
                "client protocol changes from length-prefixed (svc 1.0.0) to opaque (svc 2.0.0)"
            ),
            "{}",
            refused.detail
        );
    }
}

/// The file in an agent's data directory listing the image directories added at run time.
pub const ADDED_IMAGES_FILE: &str = "images.json";

/// Most image directories remembered (the oldest are forgotten first).
pub const MAX_REMEMBERED_IMAGES: usize = 32;

/// Records `dir` as an image added at run time (an agent that restarts adds it again).
pub fn remember(data_dir: &std::path::Path, dir: &std::path::Path) -> std::io::Result<()> {
    let mut dirs = remembered(data_dir);
    dirs.retain(|d| d != dir);
    dirs.push(dir.to_path_buf());
    if dirs.len() > MAX_REMEMBERED_IMAGES {
        dirs.drain(..dirs.len() - MAX_REMEMBERED_IMAGES);
    }
    let path = data_dir.join(ADDED_IMAGES_FILE);
    let tmp = data_dir.join(format!("{ADDED_IMAGES_FILE}.tmp"));
    std::fs::write(
        &tmp,
        serde_json::to_vec(&dirs).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(tmp, path)
}

/// The image directories added at run time, as recorded (none if the record is missing or
/// unreadable: the pair's own images are then added again by the operator).
pub fn remembered(data_dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let path = data_dir.join(ADDED_IMAGES_FILE);
    match std::fs::read(&path) {
        Ok(b) if b.len() <= 1 << 20 => serde_json::from_slice(&b).unwrap_or_default(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod remember_tests {
    use super::*;

    #[test]
    fn added_images_are_remembered_once_and_bounded() {
        let d = tempfile::tempdir().unwrap();
        assert!(remembered(d.path()).is_empty());
        remember(d.path(), std::path::Path::new("/a")).unwrap();
        remember(d.path(), std::path::Path::new("/b")).unwrap();
        remember(d.path(), std::path::Path::new("/a")).unwrap();
        assert_eq!(
            remembered(d.path()),
            vec![
                std::path::PathBuf::from("/b"),
                std::path::PathBuf::from("/a")
            ]
        );
        for i in 0..40 {
            remember(d.path(), std::path::Path::new(&format!("/x{i}"))).unwrap();
        }
        assert_eq!(remembered(d.path()).len(), MAX_REMEMBERED_IMAGES);
        std::fs::write(d.path().join(ADDED_IMAGES_FILE), b"not json").unwrap();
        assert!(remembered(d.path()).is_empty());
    }
}
