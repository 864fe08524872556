//! A writer for uncompressed cpio archives in the "newc" (SVR4, no CRC) format: the format the
//! Linux kernel unpacks as an initramfs.
//!
//! Each entry is a 110-byte ASCII header (`070701` then thirteen 8-digit hexadecimal fields:
//! inode, mode, uid, gid, nlink, mtime, file size, device major/minor, rdev major/minor, name
//! size including its NUL, check), the NUL-terminated name, padding to a multiple of four
//! bytes, the data, and padding again. The archive ends with an entry named `TRAILER!!!`.
//!
//! Names are stored relative (`bin/sh`, not `/bin/sh`); a leading `/` or `./` is removed.
//! Every entry is owned by root and has modification time 0 unless set otherwise, so the same
//! inputs always give the same bytes.
//!
//! ```
//! use hitless_image::cpio::CpioWriter;
//! let mut w = CpioWriter::new(Vec::new());
//! w.add_dir("bin", 0o755).unwrap();
//! w.add_file("bin/hello", 0o755, b"#!/bin/sh\necho hi\n").unwrap();
//! w.add_symlink("bin/hi", "hello").unwrap();
//! let bytes = w.finish().unwrap();
//! assert!(bytes.starts_with(b"070701"));
//! assert_eq!(bytes.len() % 512, 0);
//! ```

use std::collections::HashSet;
use std::io::{self, Write};

use thiserror::Error;

/// Magic of a newc header.
pub const NEWC_MAGIC: &[u8; 6] = b"070701";
/// Length of a newc header.
pub const HEADER_LEN: usize = 110;
/// Name of the final entry.
pub const TRAILER: &str = "TRAILER!!!";
/// Longest entry name accepted (the kernel's `PATH_MAX`, including the NUL).
pub const MAX_NAME_LEN: usize = 4095;

/// File type bits of `st_mode`.
pub mod mode {
    /// Regular file.
    pub const S_IFREG: u32 = 0o100_000;
    /// Directory.
    pub const S_IFDIR: u32 = 0o040_000;
    /// Symbolic link.
    pub const S_IFLNK: u32 = 0o120_000;
    /// Character device.
    pub const S_IFCHR: u32 = 0o020_000;
    /// Block device.
    pub const S_IFBLK: u32 = 0o060_000;
    /// Mask of the type bits.
    pub const S_IFMT: u32 = 0o170_000;
}

/// Why an entry could not be written.
#[derive(Debug, Error)]
pub enum CpioError {
    /// The name is empty, contains NUL or a `..` component, or is too long.
    #[error("cpio entry name {name:?} is invalid: {reason}")]
    BadName {
        /// The name as given.
        name: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The same name was added twice.
    #[error("cpio entry {name:?} was already added to the archive")]
    Duplicate {
        /// The normalised name.
        name: String,
    },
    /// The data does not fit the 32-bit size field.
    #[error("cpio entry {name:?} is {len} bytes, more than the 4 GiB the newc format can hold")]
    TooLarge {
        /// The normalised name.
        name: String,
        /// Its size.
        len: u64,
    },
    /// Permission bits outside `0o7777`.
    #[error("cpio entry {name:?} has invalid permission bits {perm:#o}")]
    BadMode {
        /// The normalised name.
        name: String,
        /// The bits given.
        perm: u32,
    },
    /// More entries than inode numbers.
    #[error("cpio archive has too many entries")]
    TooManyEntries,
    /// The archive was already finished.
    #[error("cpio archive was already finished")]
    Finished,
    /// Writing to the underlying sink failed.
    #[error("writing the cpio archive failed: {0}")]
    Io(#[from] io::Error),
}

/// Streams a newc cpio archive into `W`.
#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    written: u64,
    names: HashSet<String>,
    mtime: u32,
    finished: bool,
}

/// Strips a leading `/` or `./` and trailing `/`, and rejects names the kernel would refuse or
/// that would escape the archive root.
pub fn normalize_name(name: &str) -> Result<String, CpioError> {
    let bad = |reason| CpioError::BadName {
        name: name.to_string(),
        reason,
    };
    let mut n = name;
    while let Some(rest) = n.strip_prefix("./").or_else(|| n.strip_prefix('/')) {
        n = rest;
    }
    let n = n.trim_end_matches('/');
    if n.is_empty() {
        return Err(bad("it is empty"));
    }
    if n.contains('\0') {
        return Err(bad("it contains a NUL byte"));
    }
    if n.len() > MAX_NAME_LEN {
        return Err(bad("it is longer than 4095 bytes"));
    }
    if n.split('/').any(|c| c == ".." || c.is_empty() || c == ".") {
        return Err(bad("it has an empty, `.` or `..` component"));
    }
    if n == TRAILER {
        return Err(bad("it is the reserved trailer name"));
    }
    Ok(n.to_string())
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive written to `out`.
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            next_ino: 1,
            written: 0,
            names: HashSet::new(),
            mtime: 0,
            finished: false,
        }
    }

    /// Sets the modification time stored for the entries added after this call.
    pub fn set_mtime(&mut self, mtime: u32) {
        self.mtime = mtime;
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Whether an entry with this name (after normalisation) was added.
    pub fn contains(&self, name: &str) -> bool {
        normalize_name(name).is_ok_and(|n| self.names.contains(&n))
    }

    fn write_raw(&mut self, bytes: &[u8]) -> Result<(), CpioError> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad4(&mut self) -> Result<(), CpioError> {
        let pad = (4 - (self.written % 4) as usize) % 4;
        self.write_raw(&[0u8; 3][..pad])
    }

    #[allow(clippy::too_many_arguments)]
    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
        ino: u32,
    ) -> Result<(), CpioError> {
        let size = u32::try_from(data.len()).map_err(|_| CpioError::TooLarge {
            name: name.to_string(),
            len: data.len() as u64,
        })?;
        let namesize = name.len() as u32 + 1;
        let header = format!(
            "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}{maj:08x}{min:08x}{rmaj:08x}{rmin:08x}{namesize:08x}{check:08x}",
            uid = 0,
            gid = 0,
            mtime = if name == TRAILER { 0 } else { self.mtime },
            maj = 0,
            min = 0,
            rmaj = rdev.0,
            rmin = rdev.1,
            check = 0,
        );
        debug_assert_eq!(header.len(), HEADER_LEN);
        self.write_raw(header.as_bytes())?;
        self.write_raw(name.as_bytes())?;
        self.write_raw(&[0])?;
        self.pad4()?;
        self.write_raw(data)?;
        self.pad4()
    }

    fn add(
        &mut self,
        name: &str,
        kind: u32,
        perm: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> Result<(), CpioError> {
        if self.finished {
            return Err(CpioError::Finished);
        }
        let name = normalize_name(name)?;
        if perm > 0o7777 {
            return Err(CpioError::BadMode { perm, name });
        }
        if self.names.contains(&name) {
            return Err(CpioError::Duplicate { name });
        }
        if u32::try_from(data.len()).is_err() {
            return Err(CpioError::TooLarge {
                name,
                len: data.len() as u64,
            });
        }
        let ino = self.next_ino;
        self.next_ino = ino.checked_add(1).ok_or(CpioError::TooManyEntries)?;
        self.entry(&name, kind | perm, nlink, rdev, data, ino)?;
        self.names.insert(name);
        Ok(())
    }

    /// Adds a directory with permission bits `perm` (e.g. `0o755`).
    ///
    /// # Errors
    /// A bad or duplicate name, bad permission bits, or a write failure.
    pub fn add_dir(&mut self, name: &str, perm: u32) -> Result<(), CpioError> {
        self.add(name, mode::S_IFDIR, perm, 2, (0, 0), &[])
    }

    /// Adds a regular file with permission bits `perm` and contents `data`.
    ///
    /// # Errors
    /// A bad or duplicate name, bad permission bits, data over 4 GiB, or a write failure.
    pub fn add_file(&mut self, name: &str, perm: u32, data: &[u8]) -> Result<(), CpioError> {
        self.add(name, mode::S_IFREG, perm, 1, (0, 0), data)
    }

    /// Adds a symbolic link `name` pointing at `target`.
    ///
    /// # Errors
    /// A bad or duplicate name, an empty target, or a write failure.
    pub fn add_symlink(&mut self, name: &str, target: &str) -> Result<(), CpioError> {
        if target.is_empty() || target.contains('\0') {
            return Err(CpioError::BadName {
                name: target.to_string(),
                reason: "a symlink target must be non-empty and contain no NUL",
            });
        }
        self.add(name, mode::S_IFLNK, 0o777, 1, (0, 0), target.as_bytes())
    }

    /// Adds a character device node.
    ///
    /// # Errors
    /// A bad or duplicate name, bad permission bits, or a write failure.
    pub fn add_char_device(
        &mut self,
        name: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        self.add(name, mode::S_IFCHR, perm, 1, (major, minor), &[])
    }

    /// Adds every missing parent directory of `name` (mode `0o755`), outermost first.
    ///
    /// # Errors
    /// A bad name or a write failure.
    pub fn add_parents(&mut self, name: &str) -> Result<(), CpioError> {
        let name = normalize_name(name)?;
        let mut prefix = String::new();
        let comps: Vec<&str> = name.split('/').collect();
        for c in &comps[..comps.len() - 1] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(c);
            if !self.names.contains(&prefix) {
                self.add_dir(&prefix.clone(), 0o755)?;
            }
        }
        Ok(())
    }

    /// Writes the trailer, pads the archive to a multiple of 512 bytes, flushes, and returns
    /// the sink.
    ///
    /// # Errors
    /// A write failure, or the archive was already finished.
    pub fn finish(mut self) -> Result<W, CpioError> {
        if self.finished {
            return Err(CpioError::Finished);
        }
        self.entry(TRAILER, 0, 1, (0, 0), &[], 0)?;
        let pad = ((512 - (self.written % 512)) % 512) as usize;
        self.write_raw(&vec![0u8; pad])?;
        self.out.flush()?;
        self.finished = true;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// One parsed entry: (name, mode, nlink, rdev major, rdev minor, data).
    type Parsed = (String, u32, u32, u32, u32, Vec<u8>);

    /// A minimal newc reader, written from the format description, independent of the writer.
    fn parse(bytes: &[u8]) -> Vec<Parsed> {
        let hex = |s: &[u8]| u32::from_str_radix(std::str::from_utf8(s).unwrap(), 16).unwrap();
        let align = |x: usize| (x + 3) & !3;
        let mut out = Vec::new();
        let mut pos = 0;
        loop {
            let h = &bytes[pos..pos + HEADER_LEN];
            assert_eq!(&h[..6], b"070701", "magic at offset {pos}");
            let field = |i: usize| hex(&h[6 + i * 8..6 + (i + 1) * 8]);
            let (mode, nlink, size, rmaj, rmin, namesize, check) = (
                field(1),
                field(4),
                field(6),
                field(9),
                field(10),
                field(11),
                field(12),
            );
            assert_eq!((field(2), field(3)), (0, 0), "owned by root");
            assert_eq!(check, 0);
            let name_start = pos + HEADER_LEN;
            let name = &bytes[name_start..name_start + namesize as usize];
            assert_eq!(*name.last().unwrap(), 0, "name NUL-terminated");
            let name = String::from_utf8(name[..name.len() - 1].to_vec()).unwrap();
            let data_start = align(name_start + namesize as usize);
            let data = bytes[data_start..data_start + size as usize].to_vec();
            pos = align(data_start + size as usize);
            if name == TRAILER {
                assert!(
                    bytes[pos..].iter().all(|b| *b == 0),
                    "only padding after trailer"
                );
                assert_eq!(bytes.len() % 512, 0);
                return out;
            }
            out.push((name, mode, nlink, rmaj, rmin, data));
        }
    }

    #[test]
    fn entries_parse_back_with_modes_names_and_contents() {
        let mut w = CpioWriter::new(Vec::new());
        w.add_dir("/bin", 0o755).unwrap();
        w.add_file("./bin/tool", 0o755, b"\x7fELF....").unwrap();
        w.add_file("etc/motd", 0o644, b"odd-length!").unwrap();
        w.add_symlink("bin/sh", "busybox").unwrap();
        w.add_char_device("dev/console", 0o600, 5, 1).unwrap();
        w.add_file("empty", 0o600, b"").unwrap();
        let bytes = w.finish().unwrap();
        let got = parse(&bytes);
        let want: Vec<Parsed> = vec![
            ("bin".into(), 0o040_755, 2, 0, 0, vec![]),
            (
                "bin/tool".into(),
                0o100_755,
                1,
                0,
                0,
                b"\x7fELF....".to_vec(),
            ),
            (
                "etc/motd".into(),
                0o100_644,
                1,
                0,
                0,
                b"odd-length!".to_vec(),
            ),
            ("bin/sh".into(), 0o120_777, 1, 0, 0, b"busybox".to_vec()),
            ("dev/console".into(), 0o020_600, 1, 5, 1, vec![]),
            ("empty".into(), 0o100_600, 1, 0, 0, vec![]),
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn parents_are_added_once_outermost_first() {
        let mut w = CpioWriter::new(Vec::new());
        w.add_parents("lib/modules/6.1/kernel/a.ko").unwrap();
        w.add_parents("lib/modules/6.1/extra/b.ko").unwrap();
        let names: Vec<String> = parse(&w.finish().unwrap())
            .into_iter()
            .map(|e| e.0)
            .collect();
        assert_eq!(
            names,
            [
                "lib",
                "lib/modules",
                "lib/modules/6.1",
                "lib/modules/6.1/kernel",
                "lib/modules/6.1/extra"
            ]
        );
    }

    #[test]
    fn bad_names_duplicates_and_modes_are_refused() {
        let mut w = CpioWriter::new(Vec::new());
        for bad in ["", "/", "a/../b", "..", "a//b", "a\0b", TRAILER] {
            assert!(
                matches!(w.add_file(bad, 0o644, b""), Err(CpioError::BadName { .. })),
                "{bad:?} accepted"
            );
        }
        w.add_file("x", 0o644, b"1").unwrap();
        let err = w.add_file("/x", 0o644, b"2").unwrap_err();
        assert!(matches!(err, CpioError::Duplicate { .. }), "{err}");
        assert!(err.to_string().contains("already added"));
        assert!(matches!(
            w.add_file("y", 0o10000, b""),
            Err(CpioError::BadMode { .. })
        ));
        assert!(w.contains("./x"));
        // Refused entries wrote nothing: the archive holds exactly one entry.
        assert_eq!(parse(&w.finish().unwrap()).len(), 1);
    }

    #[test]
    fn output_is_deterministic() {
        let build = || {
            let mut w = CpioWriter::new(Vec::new());
            w.add_file("a", 0o644, b"abc").unwrap();
            w.add_symlink("b", "a").unwrap();
            w.finish().unwrap()
        };
        assert_eq!(build(), build());
    }

    proptest! {
        #[test]
        fn arbitrary_files_round_trip(
            files in proptest::collection::btree_map("[a-z]{1,12}(/[a-z0-9_][a-z0-9._-]{0,11}){0,2}", proptest::collection::vec(any::<u8>(), 0..300), 1..12),
            perm in 0u32..0o7777,
        ) {
            let mut w = CpioWriter::new(Vec::new());
            let mut want = Vec::new();
            for (name, data) in &files {
                // A name that is a parent of an earlier one collides only if equal; skip those.
                if w.contains(name) { continue; }
                w.add_file(name, perm, data).unwrap();
                want.push((name.clone(), mode::S_IFREG | perm, 1, 0, 0, data.clone()));
            }
            let bytes = w.finish().unwrap();
            prop_assert_eq!(parse(&bytes), want);
        }
    }
}
