//! The advisory byte-range locks this client holds on fileservers, per file and owner:
//! what a close must release, what a reconnect reclaims, where leases need renewing.
//! Invariant: one owner's ranges on one file never overlap, and a grant or release
//! replaces or cuts them as the server's table does, so both hold the same bytes.

use std::collections::HashMap;

use proto::{ByteRange, Fid, LockKind, LockOwnerId};

/// One lock held: its owner, range, kind and the process that took it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldLock {
    pub owner: LockOwnerId,
    pub range: ByteRange,
    pub kind: LockKind,
    pub pid: u32,
}

/// The locks the servers granted this client, as they granted them (POSIX semantics).
/// Unlike the server's table it does not merge adjacent ranges of one kind, so it may
/// hold in pieces what the server holds as one lock, over the same bytes. Pure: no I/O,
/// no clock.
#[derive(Debug, Default)]
pub struct HeldLocks {
    by_fid: HashMap<Fid, Vec<HeldLock>>,
}

impl HeldLocks {
    /// Records a lock the server granted, replacing what `owner` held in its range.
    pub fn grant(&mut self, fid: Fid, lock: HeldLock) {
        let locks = self.by_fid.entry(fid).or_default();
        cut(locks, lock.owner, lock.range);
        locks.push(lock);
    }

    /// Records that `owner` released `range` of `fid`; returns whether it held any of it.
    pub fn release(&mut self, fid: Fid, owner: LockOwnerId, range: ByteRange) -> bool {
        let Some(locks) = self.by_fid.get_mut(&fid) else {
            return false;
        };
        let held = cut(locks, owner, range);
        if locks.is_empty() {
            self.by_fid.remove(&fid);
        }
        held
    }

    /// Whether `owner` holds any lock on `fid`: a close sends a release only then.
    pub fn holds(&self, fid: Fid, owner: LockOwnerId) -> bool {
        self.by_fid
            .get(&fid)
            .is_some_and(|locks| locks.iter().any(|l| l.owner == owner))
    }

    /// Every lock held, for reclaim and lease renewal.
    pub fn all(&self) -> Vec<(Fid, HeldLock)> {
        self.by_fid
            .iter()
            .flat_map(|(fid, locks)| locks.iter().map(move |l| (*fid, *l)))
            .collect()
    }

    /// The files on which some lock is held.
    pub fn fids(&self) -> impl Iterator<Item = Fid> + '_ {
        self.by_fid.keys().copied()
    }

    pub fn is_empty(&self) -> bool {
        self.by_fid.is_empty()
    }
}

/// Removes `range` from `owner`'s locks, splitting those that straddle its edges;
/// returns whether any byte was removed.
fn cut(locks: &mut Vec<HeldLock>, owner: LockOwnerId, range: ByteRange) -> bool {
    let mut removed = false;
    let mut kept = Vec::with_capacity(locks.len() + 1);
    for lock in locks.drain(..) {
        if lock.owner != owner || !lock.range.overlaps(range) {
            kept.push(lock);
            continue;
        }
        removed = true;
        let (below, above) = lock.range.around(range);
        for piece in [below, above].into_iter().flatten() {
            kept.push(HeldLock {
                range: piece,
                ..lock
            });
        }
    }
    *locks = kept;
    removed
}

#[cfg(test)]
mod tests {
    use proto::{Uniquifier, VnodeId, VolumeId};

    use super::*;

    const FID: Fid = Fid {
        volume: VolumeId(1),
        vnode: VnodeId(2),
        unique: Uniquifier(1),
    };
    const A: LockOwnerId = LockOwnerId(10);
    const B: LockOwnerId = LockOwnerId(11);

    fn lock(owner: LockOwnerId, start: u64, end: u64, kind: LockKind) -> HeldLock {
        HeldLock {
            owner,
            range: ByteRange::new(start, end).unwrap(),
            kind,
            pid: 1,
        }
    }

    fn ranges(table: &HeldLocks) -> Vec<(u64, u64, u64, LockKind)> {
        let mut all: Vec<_> = table
            .all()
            .into_iter()
            .map(|(_, l)| (l.owner.0, l.range.start(), l.range.end(), l.kind))
            .collect();
        all.sort_by_key(|&(owner, start, ..)| (owner, start));
        all
    }

    #[test]
    fn a_grant_replaces_the_owners_overlapping_range_only() {
        let mut table = HeldLocks::default();
        table.grant(FID, lock(A, 0, 100, LockKind::Shared));
        table.grant(FID, lock(B, 0, 100, LockKind::Shared));
        table.grant(FID, lock(A, 40, 60, LockKind::Exclusive));
        assert_eq!(
            ranges(&table),
            [
                (10, 0, 40, LockKind::Shared),
                (10, 40, 60, LockKind::Exclusive),
                (10, 60, 100, LockKind::Shared),
                (11, 0, 100, LockKind::Shared),
            ]
        );
    }

    #[test]
    fn release_cuts_and_reports_whether_anything_was_held() {
        let mut table = HeldLocks::default();
        assert!(!table.release(FID, A, ByteRange::whole()));
        table.grant(FID, lock(A, 10, u64::MAX, LockKind::Exclusive));
        assert!(!table.release(FID, A, ByteRange::new(0, 10).unwrap()));
        assert!(table.release(FID, A, ByteRange::new(20, 30).unwrap()));
        assert_eq!(
            ranges(&table),
            [
                (10, 10, 20, LockKind::Exclusive),
                (10, 30, u64::MAX, LockKind::Exclusive)
            ]
        );
        assert!(table.holds(FID, A));
        assert!(!table.holds(FID, B));
        assert!(table.release(FID, A, ByteRange::whole()));
        assert!(table.is_empty());
        assert!(!table.holds(FID, A));
    }
}
