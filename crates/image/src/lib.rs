//! hitless-image: OS image manifests, digests, signatures, compatibility, and bootable image
//! build.

#![warn(missing_docs)]

pub mod cpio;
