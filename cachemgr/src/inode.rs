//! The map between the kernel's FUSE inode numbers and fids.
//! Invariant: the map is a bijection, inode 1 is the root volume's root, and a number is
//! never reused within a mount, so the kernel never sees one number name two files.

use std::collections::HashMap;
use std::fmt;

use proto::Fid;
use serde::{Deserialize, Serialize};

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

#[derive(Debug)]
pub struct InodeTable {
    by_ino: HashMap<Ino, Fid>,
    by_fid: HashMap<Fid, Ino>,
    next: u64,
}

impl InodeTable {
    pub fn new(root: Fid) -> InodeTable {
        let mut table = InodeTable {
            by_ino: HashMap::new(),
            by_fid: HashMap::new(),
            next: Ino::ROOT.0 + 1,
        };
        table.by_ino.insert(Ino::ROOT, root);
        table.by_fid.insert(root, Ino::ROOT);
        table
    }

    pub fn fid(&self, ino: Ino) -> Option<Fid> {
        self.by_ino.get(&ino).copied()
    }

    pub fn ino(&self, fid: Fid) -> Option<Ino> {
        self.by_fid.get(&fid).copied()
    }

    /// The inode number of `fid`, allocating one on first sight.
    pub fn ino_for(&mut self, fid: Fid) -> Ino {
        if let Some(ino) = self.by_fid.get(&fid) {
            return *ino;
        }
        let ino = Ino(self.next);
        self.next += 1;
        self.by_ino.insert(ino, fid);
        self.by_fid.insert(fid, ino);
        ino
    }

    pub fn len(&self) -> usize {
        self.by_ino.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_ino.is_empty()
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
}
