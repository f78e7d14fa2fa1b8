//! One advisory byte-range lock: who owns it, which bytes, shared or exclusive, and the
//! rule for when two locks conflict.
//! Invariant: a `ByteRange` is never empty (`start < end`); `end == ByteRange::EOF` means
//! "to the end of the file, however far it grows".

use thiserror::Error;

use crate::client_table::ClientKey;

/// Who holds a lock: a client and the lock owner it names (a process for POSIX `fcntl`
/// locks, an open file description for `flock`). Locks of one owner never conflict with
/// each other; they replace one another as POSIX requires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LockOwner {
    pub client: ClientKey,
    /// Chosen by the client; only compared for equality.
    pub owner: u64,
}

/// Shared (read) or exclusive (write).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
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

/// The bytes `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ByteRange {
    start: u64,
    end: u64,
}

impl ByteRange {
    /// The `end` that means "to the end of the file".
    pub const EOF: u64 = u64::MAX;

    pub fn new(start: u64, end: u64) -> Result<ByteRange, EmptyRange> {
        if start < end {
            Ok(ByteRange { start, end })
        } else {
            Err(EmptyRange { start, end })
        }
    }

    /// The whole file, as `flock` locks it.
    pub fn whole() -> ByteRange {
        ByteRange {
            start: 0,
            end: ByteRange::EOF,
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

    /// The smallest range covering both; never empty since `self` is not.
    pub fn cover(self, other: ByteRange) -> ByteRange {
        ByteRange {
            start: self.start.min(other.start),
            end: self.end.max(other.end),
        }
    }
}

/// A granted (or requested) lock. 40 bytes: the table holds many of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Lock {
    pub owner: LockOwner,
    pub range: ByteRange,
    pub kind: LockKind,
}

impl Lock {
    /// Two locks conflict when different owners hold overlapping bytes and at least one
    /// of them is exclusive.
    pub fn conflicts(&self, other: &Lock) -> bool {
        self.owner != other.owner
            && self.range.overlaps(other.range)
            && (self.kind == LockKind::Exclusive || other.kind == LockKind::Exclusive)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock(owner: u64, start: u64, end: u64, kind: LockKind) -> Lock {
        Lock {
            owner: LockOwner {
                client: ClientKey(0),
                owner,
            },
            range: ByteRange::new(start, end).unwrap(),
            kind,
        }
    }

    #[test]
    fn empty_ranges_are_refused() {
        assert_eq!(ByteRange::new(5, 5), Err(EmptyRange { start: 5, end: 5 }));
        assert!(ByteRange::new(6, 5).is_err());
        assert!(ByteRange::new(0, ByteRange::EOF).is_ok());
    }

    #[test]
    fn conflict_rule() {
        use LockKind::*;
        assert!(!lock(1, 0, 10, Shared).conflicts(&lock(2, 5, 15, Shared)));
        assert!(lock(1, 0, 10, Shared).conflicts(&lock(2, 5, 15, Exclusive)));
        assert!(lock(1, 0, 10, Exclusive).conflicts(&lock(2, 9, 10, Shared)));
        // Half-open: [0, 10) and [10, 20) share no byte.
        assert!(!lock(1, 0, 10, Exclusive).conflicts(&lock(2, 10, 20, Exclusive)));
        // One owner never conflicts with itself.
        assert!(!lock(1, 0, 10, Exclusive).conflicts(&lock(1, 0, 10, Exclusive)));
    }

    #[test]
    fn a_lock_is_compact() {
        assert!(std::mem::size_of::<Lock>() <= 40);
    }
}
