//! The vocabulary of an advisory byte-range lock, one type from the kernel to the disk:
//! which bytes (`ByteRange`), and shared or exclusive (`LockKind`).
//! Invariant: a `ByteRange` made by `new` is never empty; one decoded from the wire or a
//! disk is checked (`ByteRange::checked`) where it enters a table.

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Shared (read) or exclusive (write).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum LockKind {
    Shared,
    Exclusive,
}

/// The empty range was asked for: a lock must cover at least one byte.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
#[error("empty byte range [{start}, {end})")]
pub struct EmptyRange {
    pub start: u64,
    pub end: u64,
}

/// The bytes `[start, end)`; `end == ByteRange::EOF` means "to the end of the file,
/// however far it grows". Encoded as its two ends, so it takes the bytes of the
/// `start, end` fields it replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ByteRange {
    start: u64,
    end: u64,
}

impl ByteRange {
    /// The `end` that means "to the end of the file".
    pub const EOF: u64 = u64::MAX;

    pub fn new(start: u64, end: u64) -> Result<ByteRange, EmptyRange> {
        ByteRange { start, end }.checked()
    }

    /// The whole file, as `flock` locks it.
    pub const fn whole() -> ByteRange {
        ByteRange {
            start: 0,
            end: ByteRange::EOF,
        }
    }

    /// The range itself if it is not empty: decoding does not check, since an empty
    /// range in a request is the request's error (`InvalidArgument`), not the frame's.
    pub fn checked(self) -> Result<ByteRange, EmptyRange> {
        if self.start < self.end {
            Ok(self)
        } else {
            Err(EmptyRange {
                start: self.start,
                end: self.end,
            })
        }
    }

    pub fn start(self) -> u64 {
        self.start
    }

    pub fn end(self) -> u64 {
        self.end
    }

    pub fn overlaps(self, other: ByteRange) -> bool {
        self.start < other.end && other.start < self.end
    }

    /// Whether every byte of `other` is in `self`.
    pub fn contains(self, other: ByteRange) -> bool {
        self.start <= other.start && other.end <= self.end
    }

    /// The smallest range covering both.
    pub fn cover(self, other: ByteRange) -> ByteRange {
        ByteRange {
            start: self.start.min(other.start),
            end: self.end.max(other.end),
        }
    }

    /// The bytes of `self` below `other` and above it, each `None` when empty.
    pub fn around(self, other: ByteRange) -> (Option<ByteRange>, Option<ByteRange>) {
        let below = ByteRange::new(self.start, other.start.min(self.end)).ok();
        let above = ByteRange::new(other.end.max(self.start), self.end).ok();
        (below, above)
    }
}

/// `[start, end)`, with `EOF` for a range to the end of the file.
impl fmt::Display for ByteRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.end == ByteRange::EOF {
            write!(f, "[{}, EOF)", self.start)
        } else {
            write!(f, "[{}, {})", self.start, self.end)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_ranges_are_refused() {
        assert_eq!(ByteRange::new(5, 5), Err(EmptyRange { start: 5, end: 5 }));
        assert!(ByteRange::new(6, 5).is_err());
        assert!(ByteRange::new(0, ByteRange::EOF).is_ok());
    }

    #[test]
    fn a_decoded_range_is_checked_where_it_is_used() {
        let bytes = postcard::to_allocvec(&(7u64, 7u64)).unwrap();
        let decoded: ByteRange = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(decoded.checked(), Err(EmptyRange { start: 7, end: 7 }));
    }

    #[test]
    fn display_names_the_end_of_file() {
        assert_eq!(ByteRange::new(3, 9).unwrap().to_string(), "[3, 9)");
        assert_eq!(ByteRange::whole().to_string(), "[0, EOF)");
    }

    #[test]
    fn around_cuts_what_lies_outside() {
        let r = |s, e| ByteRange::new(s, e).unwrap();
        assert_eq!(
            r(0, 100).around(r(10, 20)),
            (Some(r(0, 10)), Some(r(20, 100)))
        );
        assert_eq!(r(10, 20).around(r(0, 100)), (None, None));
        assert_eq!(r(0, 20).around(r(10, 30)), (Some(r(0, 10)), None));
        assert_eq!(r(10, 30).around(r(0, 20)), (None, Some(r(20, 30))));
        assert_eq!(
            ByteRange::whole().around(r(5, ByteRange::EOF)),
            (Some(r(0, 5)), None)
        );
    }
}
