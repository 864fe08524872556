//! The digest of the state as converted to one foreign version, kept per
//! mutation, and built without a pause.
//!
//! Each entry remembers where its converted record went and that record's
//! hash ([`Conv`]), so an overwrite or delete subtracts it without converting
//! the old record again. A `Conv` belongs to one track (its `tag`): starting
//! to track a version never touches the entries; a *build* walks them in
//! bounded steps ([`Cursor`]) and converts those whose `Conv` is of another
//! tag, while every mutation converts its own record at once. The digest is
//! complete (and reported) once the build has walked every entry.

use crate::{Digest, SchemaVersion, TableDigest};

use super::table::{Conv, Cursor};

#[derive(Debug)]
pub(crate) struct Track {
    pub(crate) version: SchemaVersion,
    /// The tag of this track's [`Conv`]s (never 0).
    pub(crate) tag: u32,
    /// Tables of the converted records, by first appearance.
    names: Vec<String>,
    /// Digest of each table in `names`.
    sums: Vec<TableDigest>,
    /// Where the build stands; `None` once every entry is counted.
    pub(crate) build: Option<Cursor>,
}

impl Track {
    pub(crate) fn new(version: SchemaVersion, tag: u32, complete: bool) -> Track {
        assert!(tag != 0, "tag 0 marks untracked entries");
        Track {
            version,
            tag,
            names: Vec::new(),
            sums: Vec::new(),
            build: (!complete).then(Cursor::default),
        }
    }

    /// True once the digest counts every entry.
    pub(crate) fn complete(&self) -> bool {
        self.build.is_none()
    }

    /// Counts `c` if it is of this track and not dropped.
    pub(crate) fn add(&mut self, c: Conv) {
        if c.tag != self.tag {
            return;
        }
        if let Some(d) = self.sums.get_mut(c.table as usize) {
            d.count += 1;
            d.sum = d.sum.wrapping_add(c.hash);
        }
    }

    /// Uncounts `c` if it is of this track and not dropped.
    pub(crate) fn remove(&mut self, c: Conv) {
        if c.tag != self.tag {
            return;
        }
        if let Some(d) = self.sums.get_mut(c.table as usize) {
            debug_assert!(d.count > 0, "a counted entry is uncounted once");
            d.count -= 1;
            d.sum = d.sum.wrapping_sub(c.hash);
        }
    }

    pub(crate) fn intern(&mut self, table: &str) -> u32 {
        match self.names.iter().position(|n| n == table) {
            Some(i) => i as u32,
            None => {
                self.names.push(table.to_string());
                self.sums.push(TableDigest::default());
                (self.names.len() - 1) as u32
            }
        }
    }

    /// Forgets every count (the store was cleared).
    pub(crate) fn reset(&mut self) {
        self.names.clear();
        self.sums.clear();
        self.build = None;
    }

    pub(crate) fn digest(&self) -> Digest {
        let mut d = Digest::default();
        for (n, s) in self.names.iter().zip(&self.sums) {
            if s.count > 0 {
                d.tables.insert(n.clone(), *s);
            }
        }
        d
    }
}
