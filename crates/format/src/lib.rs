//! Format version ranges and their negotiation.
//!
//! Each link between two builds (the state-sync link, the instance control channel, the
//! agents' peer link) reads and writes an inclusive range of format versions, a
//! [`FormatRange`]. On connecting, the two ends exchange their ranges and both use the
//! highest format in both ([`negotiate`]); with none, the link is refused naming both ranges.
//!
//! This crate holds only the range and the arithmetic. Each link keeps its own constants
//! (the range its build speaks, the range of a build from before negotiation, the formats it
//! has codecs for) and its own errors, whose messages name the link.

use serde::{Deserialize, Serialize};

/// An inclusive range of format versions `min..=max` (what an end reads and writes).
///
/// Serialized as `{"min": .., "max": ..}`. A range announced by a peer is not checked and
/// may be empty or name formats this build does not know; a range an end configures for
/// itself is checked with [`FormatRange::new`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FormatRange {
    /// Oldest format of the range.
    pub min: u8,
    /// Newest format of the range.
    pub max: u8,
}

impl std::fmt::Display for FormatRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}..={}", self.min, self.max)
    }
}

/// Why a range was refused by [`FormatRange::new`] or [`FormatRange::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// The range is empty (its oldest format is newer than its newest).
    #[error("format range {min}..={max} is empty")]
    Empty {
        /// Oldest format.
        min: u8,
        /// Newest format.
        max: u8,
    },
    /// The range names a format outside the known ones.
    #[error("format {version} of the range {range} is not known (known: {known})")]
    Unknown {
        /// The first unknown format of the range (its oldest if both ends are unknown).
        version: u8,
        /// The refused range.
        range: FormatRange,
        /// The known formats.
        known: FormatRange,
    },
}

/// Two ranges without a format in common (see [`negotiate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no common format: this end reads and writes formats {ours}, the other end {theirs}")]
pub struct NoCommonFormat {
    /// This end's range.
    pub ours: FormatRange,
    /// The other end's range.
    pub theirs: FormatRange,
}

impl FormatRange {
    /// The range `min..=max`; fails if it is empty or names a format outside `known`.
    pub fn new(min: u8, max: u8, known: FormatRange) -> Result<FormatRange, RangeError> {
        let r = FormatRange { min, max };
        r.check(known)?;
        Ok(r)
    }

    /// Checks the range is non-empty and within `known`.
    pub fn check(&self, known: FormatRange) -> Result<(), RangeError> {
        if self.min > self.max {
            return Err(RangeError::Empty {
                min: self.min,
                max: self.max,
            });
        }
        for version in [self.min, self.max] {
            if !known.contains(version) {
                return Err(RangeError::Unknown {
                    version,
                    range: *self,
                    known,
                });
            }
        }
        Ok(())
    }

    /// Oldest format of the range.
    pub fn min(&self) -> u8 {
        self.min
    }

    /// Newest format of the range.
    pub fn max(&self) -> u8 {
        self.max
    }

    /// True if `version` is in the range.
    pub fn contains(&self, version: u8) -> bool {
        self.min <= version && version <= self.max
    }

    /// The highest format in both ranges, if any.
    pub fn highest_common(&self, other: &FormatRange) -> Option<u8> {
        let lo = self.min.max(other.min);
        let hi = self.max.min(other.max);
        (lo <= hi).then_some(hi)
    }
}

/// The format a link uses: the highest in both `ours` and `theirs`, or an error naming both.
pub fn negotiate(ours: FormatRange, theirs: FormatRange) -> Result<u8, NoCommonFormat> {
    ours.highest_common(&theirs)
        .ok_or(NoCommonFormat { ours, theirs })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(min: u8, max: u8) -> FormatRange {
        FormatRange { min, max }
    }

    #[test]
    fn displays_and_serializes_as_min_and_max() {
        assert_eq!(r(2, 3).to_string(), "2..=3");
        assert_eq!(
            serde_json::to_string(&r(2, 3)).unwrap(),
            r#"{"min":2,"max":3}"#
        );
        let back: FormatRange = serde_json::from_str(r#"{"min":1,"max":4}"#).unwrap();
        assert_eq!(back, r(1, 4));
    }

    #[test]
    fn new_refuses_empty_and_unknown_ranges() {
        let known = r(1, 3);
        assert_eq!(FormatRange::new(1, 3, known), Ok(r(1, 3)));
        assert_eq!(FormatRange::new(2, 2, known), Ok(r(2, 2)));
        assert_eq!(
            FormatRange::new(3, 2, known),
            Err(RangeError::Empty { min: 3, max: 2 })
        );
        assert_eq!(
            FormatRange::new(2, 9, known),
            Err(RangeError::Unknown {
                version: 9,
                range: r(2, 9),
                known
            })
        );
        assert_eq!(
            FormatRange::new(0, 9, known),
            Err(RangeError::Unknown {
                version: 0,
                range: r(0, 9),
                known
            })
        );
        let msg = FormatRange::new(2, 9, known).unwrap_err().to_string();
        assert!(msg.contains("2..=9") && msg.contains("1..=3"), "{msg}");
    }

    #[test]
    fn contains_is_inclusive_at_both_ends() {
        let range = r(2, 4);
        assert!(!range.contains(1));
        assert!(range.contains(2) && range.contains(3) && range.contains(4));
        assert!(!range.contains(5));
        assert!(!r(3, 2).contains(2) && !r(3, 2).contains(3));
    }

    #[test]
    fn negotiate_picks_the_highest_common_format_or_names_both_ranges() {
        assert_eq!(negotiate(r(2, 3), r(2, 2)), Ok(2));
        assert_eq!(negotiate(r(2, 2), r(2, 3)), Ok(2));
        assert_eq!(negotiate(r(2, 3), r(1, 9)), Ok(3));
        let err = negotiate(r(3, 3), r(2, 2)).unwrap_err();
        assert_eq!(
            err,
            NoCommonFormat {
                ours: r(3, 3),
                theirs: r(2, 2)
            }
        );
        let msg = err.to_string();
        assert!(msg.contains("3..=3") && msg.contains("2..=2"), "{msg}");
        // An empty announced range has nothing in common with anything.
        assert!(negotiate(r(1, 9), r(5, 4)).is_err());
    }

    proptest! {
        #[test]
        fn negotiate_returns_the_highest_common_version_or_none_exactly_when_disjoint(
            a in 0u8..12, b in 0u8..12, c in 0u8..12, d in 0u8..12,
        ) {
            let (ours, theirs) = (r(a, b), r(c, d));
            let common: Vec<u8> = (0u8..=u8::MAX)
                .filter(|v| ours.contains(*v) && theirs.contains(*v))
                .collect();
            match negotiate(ours, theirs) {
                Ok(v) => prop_assert_eq!(Some(&v), common.last()),
                Err(e) => {
                    prop_assert!(common.is_empty());
                    prop_assert_eq!(e, NoCommonFormat { ours, theirs });
                }
            }
            prop_assert_eq!(negotiate(ours, theirs).ok(), negotiate(theirs, ours).ok());
        }
    }
}
