//! The map between the kernel's FUSE inode numbers and fids, with the kernel's lookup
//! count of each number.
//! Invariant: the map is a bijection, inode 1 is the root volume's root and is never
//! dropped, a number the kernel holds (lookup count above zero) is never dropped, and a
//! number is never reused within a mount, so the kernel never sees one number name two
//! files.

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use proto::Fid;
use serde::{Deserialize, Serialize};

use crate::status::room_when_sparse;

/// A FUSE inode number as the kernel and `stat` see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Ino(pub u64);

impl Ino {
    pub const ROOT: Ino = Ino(1);
}

impl fmt::Display for Ino {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Default bound on idle numbers: given out (a listing's `d_ino`) but never looked up.
pub const IDLE_INODES_MAX_DEFAULT: usize = 16_384;

/// One number: the file it names and how many lookups of it the kernel holds.
#[derive(Clone, Copy, Debug)]
struct InodeEntry {
    fid: Fid,
    lookups: u64,
}

/// What a `forget` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forgotten {
    /// The kernel still holds the number.
    Held,
    /// The kernel's count reached zero: the number and its fid were dropped.
    Dropped(Fid),
    /// No such number, or one the kernel never held (or the root): nothing changed.
    Unknown,
}

#[derive(Debug)]
pub struct InodeTable {
    by_ino: HashMap<Ino, InodeEntry>,
    by_fid: HashMap<Fid, Ino>,
    /// Numbers with no lookup from the kernel, oldest (lowest) first. A number leaves
    /// this set on its first lookup and never comes back, so number order is age order.
    idle: BTreeSet<Ino>,
    idle_max: usize,
    next: u64,
}

impl InodeTable {
    pub fn new(root: Fid) -> InodeTable {
        InodeTable::with_idle_max(root, IDLE_INODES_MAX_DEFAULT)
    }

    /// A table keeping at most `idle_max` numbers the kernel does not hold.
    pub fn with_idle_max(root: Fid, idle_max: usize) -> InodeTable {
        let mut table = InodeTable {
            by_ino: HashMap::new(),
            by_fid: HashMap::new(),
            idle: BTreeSet::new(),
            idle_max,
            next: Ino::ROOT.0 + 1,
        };
        // The kernel holds the root from the mount on and never forgets it.
        let root_entry = InodeEntry {
            fid: root,
            lookups: 1,
        };
        table.by_ino.insert(Ino::ROOT, root_entry);
        table.by_fid.insert(root, Ino::ROOT);
        table
    }

    pub fn fid(&self, ino: Ino) -> Option<Fid> {
        self.by_ino.get(&ino).map(|e| e.fid)
    }

    pub fn ino(&self, fid: Fid) -> Option<Ino> {
        self.by_fid.get(&fid).copied()
    }

    /// The inode number of `fid`, allocating an idle one on first sight. Use `lookup` for
    /// a number handed to the kernel in an entry reply.
    pub fn ino_for(&mut self, fid: Fid) -> Ino {
        if let Some(ino) = self.by_fid.get(&fid) {
            return *ino;
        }
        let ino = self.allocate(fid);
        self.idle.insert(ino);
        self.trim_idle();
        ino
    }

    /// The number of `fid` for an entry reply: the kernel's lookup count goes up by one.
    /// `first` is true when the kernel did not hold it before.
    pub fn lookup(&mut self, fid: Fid) -> (Ino, bool) {
        let ino = match self.by_fid.get(&fid) {
            Some(ino) => *ino,
            None => self.allocate(fid),
        };
        self.idle.remove(&ino);
        let entry = self
            .by_ino
            .get_mut(&ino)
            .unwrap_or_else(|| unreachable!("by_fid and by_ino hold the same numbers"));
        entry.lookups += 1;
        (ino, entry.lookups == 1)
    }

    /// The kernel dropped `count` of its lookups of `ino`. At zero the number is dropped:
    /// the kernel will not use it again, and the fid gets a new number if seen again.
    pub fn forget(&mut self, ino: Ino, count: u64) -> Forgotten {
        if ino == Ino::ROOT {
            return Forgotten::Unknown;
        }
        let Some(entry) = self.by_ino.get_mut(&ino) else {
            return Forgotten::Unknown;
        };
        if entry.lookups == 0 {
            return Forgotten::Unknown;
        }
        // The kernel never forgets more than it was given; were it to, the number is
        // still dropped rather than kept forever.
        entry.lookups = entry.lookups.saturating_sub(count);
        if entry.lookups > 0 {
            return Forgotten::Held;
        }
        let fid = entry.fid;
        self.by_ino.remove(&ino);
        self.by_fid.remove(&fid);
        self.shrink();
        Forgotten::Dropped(fid)
    }

    /// How many lookups of `ino` the kernel holds.
    pub fn lookups(&self, ino: Ino) -> u64 {
        self.by_ino.get(&ino).map_or(0, |e| e.lookups)
    }

    /// Numbers the kernel holds, the root included.
    pub fn held(&self) -> usize {
        self.by_ino.len() - self.idle.len()
    }

    pub fn len(&self) -> usize {
        self.by_ino.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_ino.is_empty()
    }

    /// Makes `ino`, which names `from`, name `to` instead, keeping the kernel's lookups
    /// of it (a file created here under a provisional fid got its real one). False,
    /// changing nothing, when `ino` does not name `from` or `to` has a number already:
    /// the map stays a bijection.
    pub fn rebind(&mut self, ino: Ino, from: Fid, to: Fid) -> bool {
        if self.by_fid.contains_key(&to) {
            return false;
        }
        let Some(entry) = self.by_ino.get_mut(&ino).filter(|e| e.fid == from) else {
            return false;
        };
        entry.fid = to;
        self.by_fid.remove(&from);
        self.by_fid.insert(to, ino);
        true
    }

    fn allocate(&mut self, fid: Fid) -> Ino {
        let ino = Ino(self.next);
        self.next += 1;
        self.by_ino.insert(ino, InodeEntry { fid, lookups: 0 });
        self.by_fid.insert(fid, ino);
        ino
    }

    /// Drops the oldest idle numbers beyond the bound.
    fn trim_idle(&mut self) {
        let mut dropped = false;
        while self.idle.len() > self.idle_max {
            let Some(ino) = self.idle.pop_first() else {
                break;
            };
            if let Some(entry) = self.by_ino.remove(&ino) {
                self.by_fid.remove(&entry.fid);
            }
            dropped = true;
        }
        if dropped {
            self.shrink();
        }
    }

    /// Gives memory back once the maps are far emptier than their capacity.
    fn shrink(&mut self) {
        if let Some(room) = room_when_sparse(self.by_ino.len(), self.by_ino.capacity()) {
            self.by_ino.shrink_to(room);
            self.by_fid.shrink_to(room);
        }
    }
}

#[cfg(test)]
mod tests {
    use proto::{Uniquifier, VnodeId, VolumeId};

    use super::*;

    fn fid(vnode: u64, unique: u32) -> Fid {
        Fid {
            volume: VolumeId(7),
            vnode: VnodeId(vnode),
            unique: Uniquifier(unique),
        }
    }

    #[test]
    fn root_is_inode_one_and_numbers_are_stable() {
        let root = Fid::root(VolumeId(7));
        let mut table = InodeTable::new(root);
        assert_eq!(table.fid(Ino::ROOT), Some(root));
        assert_eq!(table.ino_for(root), Ino::ROOT);
        let a = table.ino_for(fid(5, 1));
        let b = table.ino_for(fid(6, 1));
        assert_eq!((a, b), (Ino(2), Ino(3)));
        assert_eq!(table.ino_for(fid(5, 1)), a);
        // A reused vnode number with a new uniquifier is a different file.
        let c = table.ino_for(fid(5, 2));
        assert_eq!(c, Ino(4));
        assert_eq!(table.fid(c), Some(fid(5, 2)));
        assert_eq!(table.ino(fid(6, 1)), Some(b));
        assert_eq!(table.len(), 4);
    }

    #[test]
    fn lookups_are_counted_and_the_last_forget_drops_the_number() {
        let mut table = InodeTable::new(Fid::root(VolumeId(7)));
        let (a, first) = table.lookup(fid(5, 1));
        assert!(first);
        assert_eq!(table.lookup(fid(5, 1)), (a, false));
        assert_eq!(table.lookups(a), 2);
        assert_eq!(table.forget(a, 1), Forgotten::Held);
        assert_eq!(table.fid(a), Some(fid(5, 1)));
        assert_eq!(table.forget(a, 1), Forgotten::Dropped(fid(5, 1)));
        assert_eq!(table.fid(a), None);
        assert_eq!(table.ino(fid(5, 1)), None);
        // Seen again, the file gets a new number: the old one is never reused.
        let (again, first) = table.lookup(fid(5, 1));
        assert!(first);
        assert_ne!(again, a);
        assert!(again > a);
        // A second forget of a dropped number changes nothing.
        assert_eq!(table.forget(a, 1), Forgotten::Unknown);
    }

    #[test]
    fn a_batch_forget_of_several_lookups_drops_at_once() {
        let mut table = InodeTable::new(Fid::root(VolumeId(7)));
        for _ in 0..3 {
            table.lookup(fid(5, 1));
        }
        let a = table.ino(fid(5, 1)).unwrap();
        assert_eq!(table.forget(a, 3), Forgotten::Dropped(fid(5, 1)));
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn the_root_is_never_forgotten() {
        let root = Fid::root(VolumeId(7));
        let mut table = InodeTable::new(root);
        assert_eq!(table.forget(Ino::ROOT, 1_000), Forgotten::Unknown);
        assert_eq!(table.fid(Ino::ROOT), Some(root));
        assert_eq!(table.lookup(root), (Ino::ROOT, false));
    }

    #[test]
    fn idle_numbers_are_bounded_oldest_first_and_held_ones_never_dropped() {
        let mut table = InodeTable::with_idle_max(Fid::root(VolumeId(7)), 2);
        let (held, _) = table.lookup(fid(2, 1));
        let a = table.ino_for(fid(3, 1));
        let b = table.ino_for(fid(4, 1));
        let c = table.ino_for(fid(5, 1));
        // Three idle numbers over a bound of two: the oldest went.
        assert_eq!(table.fid(a), None);
        assert_eq!(table.fid(b), Some(fid(4, 1)));
        assert_eq!(table.fid(c), Some(fid(5, 1)));
        assert_eq!(table.fid(held), Some(fid(2, 1)));
        assert_eq!(table.held(), 2);
        // An idle number looked up is held and leaves the idle set.
        assert_eq!(table.lookup(fid(4, 1)), (b, true));
        table.ino_for(fid(6, 1));
        table.ino_for(fid(7, 1));
        assert_eq!(table.fid(b), Some(fid(4, 1)));
        assert_eq!(table.fid(c), None);
        // Forgetting an idle number the kernel never held changes nothing.
        let d = table.ino(fid(7, 1)).unwrap();
        assert_eq!(table.forget(d, 1), Forgotten::Unknown);
        assert_eq!(table.fid(d), Some(fid(7, 1)));
    }

    #[test]
    fn a_rebound_number_keeps_its_lookups_and_never_names_two_files() {
        let mut table = InodeTable::new(Fid::root(VolumeId(7)));
        let provisional = fid(1 << 63, 1);
        let (ino, _) = table.lookup(provisional);
        assert!(table.rebind(ino, provisional, fid(5, 1)));
        assert_eq!(table.fid(ino), Some(fid(5, 1)));
        assert_eq!(table.ino(fid(5, 1)), Some(ino));
        assert_eq!(table.ino(provisional), None);
        assert_eq!(table.lookups(ino), 1);
        // A fid that has a number already, or a number that names another fid: no change.
        let other = table.ino_for(fid(6, 1));
        let (second, _) = table.lookup(fid(1 << 63 | 1, 1));
        assert!(!table.rebind(second, fid(1 << 63 | 1, 1), fid(6, 1)));
        assert!(!table.rebind(second, fid(9, 9), fid(7, 1)));
        assert_eq!(table.fid(second), Some(fid(1 << 63 | 1, 1)));
        assert_eq!(table.ino(fid(6, 1)), Some(other));
        assert_eq!(table.forget(ino, 1), Forgotten::Dropped(fid(5, 1)));
    }
}
