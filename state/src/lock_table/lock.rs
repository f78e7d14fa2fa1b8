//! One advisory byte-range lock as the server holds it: which client's owner, which
//! bytes, shared or exclusive, and the rule for when two locks conflict.
//! Invariant: the range of a lock in a table is never empty (`ByteRange::checked`).

use proto::{ByteRange, LockKind, LockOwnerId};
use serde::{Deserialize, Serialize};

use crate::client_table::ClientKey;

/// Who holds a lock: a client and the lock owner it names (a process for POSIX `fcntl`
/// locks, an open file description for `flock`). Locks of one owner never conflict with
/// each other; they replace one another as POSIX requires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LockOwner {
    pub client: ClientKey,
    pub owner: LockOwnerId,
}

/// A granted (or requested) lock. 40 bytes: the table holds many of them. Encoded as
/// its fields in order, as the journal's lock records and the snapshot hold it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
                owner: LockOwnerId(owner),
            },
            range: ByteRange::new(start, end).unwrap(),
            kind,
        }
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
