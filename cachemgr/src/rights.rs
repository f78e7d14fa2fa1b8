//! Rights cached per (user, vnode): what `FetchRights` answered for the directory that
//! governs the vnode, kept while that directory's callback holds.
//! Invariant: an entry is dropped when its directory's callback is broken or reset, so
//! a changed access list is never judged by rights cached before it; bounded by
//! `RIGHTS_ENTRIES_MAX`.

use std::collections::HashMap;

use parking_lot::Mutex;
use proto::{Fid, PrincipalId, Rights};

/// Most (user, vnode) entries kept; beyond it the table starts over.
pub const RIGHTS_ENTRIES_MAX: usize = 65_536;

/// One user's rights on the directory governing a vnode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cached {
    pub rights: Rights,
    /// The governing directory (the vnode itself for a directory).
    pub dir: Fid,
}

#[derive(Default)]
struct Tables {
    by_vnode: HashMap<(PrincipalId, Fid), Cached>,
    /// For each directory, the entries it governs, to drop them on its break.
    by_dir: HashMap<Fid, Vec<(PrincipalId, Fid)>>,
}

/// The rights cache of one cache manager.
#[derive(Default)]
pub struct RightsCache {
    tables: Mutex<Tables>,
}

impl RightsCache {
    pub fn get(&self, user: PrincipalId, fid: Fid) -> Option<Cached> {
        self.tables.lock().by_vnode.get(&(user, fid)).copied()
    }

    pub fn put(&self, user: PrincipalId, fid: Fid, cached: Cached) {
        let mut tables = self.tables.lock();
        if tables.by_vnode.len() >= RIGHTS_ENTRIES_MAX {
            *tables = Tables::default();
        }
        if let Some(old) = tables.by_vnode.insert((user, fid), cached)
            && old.dir == cached.dir
        {
            return;
        }
        tables
            .by_dir
            .entry(cached.dir)
            .or_default()
            .push((user, fid));
    }

    /// Drops every entry `dir` governs (its callback was broken: its list, or its
    /// entries, may have changed).
    pub fn drop_dir(&self, dir: Fid) {
        let mut tables = self.tables.lock();
        let Some(keys) = tables.by_dir.remove(&dir) else {
            return;
        };
        for key in keys {
            if tables.by_vnode.get(&key).is_some_and(|c| c.dir == dir) {
                tables.by_vnode.remove(&key);
            }
        }
    }

    /// Drops the entries of directories in `volumes` (their server reset its promises).
    pub fn drop_volumes(&self, volumes: &[proto::VolumeId]) {
        let mut tables = self.tables.lock();
        tables
            .by_vnode
            .retain(|_, c| !volumes.contains(&c.dir.volume));
        tables
            .by_dir
            .retain(|dir, _| !volumes.contains(&dir.volume));
    }

    /// Drops everything (a token given or dropped).
    pub fn clear(&self) {
        *self.tables.lock() = Tables::default();
    }

    pub fn len(&self) -> usize {
        self.tables.lock().by_vnode.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{Uniquifier, VnodeId, VolumeId};

    fn fid(vnode: u64) -> Fid {
        Fid {
            volume: VolumeId(1),
            vnode: VnodeId(vnode),
            unique: Uniquifier(1),
        }
    }

    #[test]
    fn a_break_of_the_governing_directory_drops_its_entries_for_every_user() {
        let cache = RightsCache::default();
        let (alice, bob) = (PrincipalId(1001), PrincipalId(1002));
        let rl = Rights::parse("rl").unwrap();
        cache.put(
            alice,
            fid(5),
            Cached {
                rights: rl,
                dir: fid(1),
            },
        );
        cache.put(
            bob,
            fid(5),
            Cached {
                rights: Rights::NONE,
                dir: fid(1),
            },
        );
        cache.put(
            alice,
            fid(1),
            Cached {
                rights: rl,
                dir: fid(1),
            },
        );
        cache.put(
            alice,
            fid(7),
            Cached {
                rights: rl,
                dir: fid(2),
            },
        );
        assert_eq!(cache.get(alice, fid(5)).unwrap().rights, rl);
        cache.drop_dir(fid(1));
        assert_eq!(cache.get(alice, fid(5)), None);
        assert_eq!(cache.get(bob, fid(5)), None);
        assert_eq!(cache.get(alice, fid(1)), None);
        assert!(cache.get(alice, fid(7)).is_some());
        // A file moved to another directory is dropped with its new directory only.
        cache.put(
            alice,
            fid(7),
            Cached {
                rights: rl,
                dir: fid(3),
            },
        );
        cache.drop_dir(fid(2));
        assert!(cache.get(alice, fid(7)).is_some());
        cache.drop_dir(fid(3));
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn a_reset_drops_only_the_volumes_of_its_server() {
        let cache = RightsCache::default();
        let other = Fid {
            volume: VolumeId(2),
            ..fid(1)
        };
        let all = Cached {
            rights: Rights::ALL,
            dir: fid(1),
        };
        cache.put(PrincipalId(1), fid(1), all);
        cache.put(
            PrincipalId(1),
            other,
            Cached {
                rights: Rights::ALL,
                dir: other,
            },
        );
        cache.drop_volumes(&[VolumeId(1)]);
        assert_eq!(cache.get(PrincipalId(1), fid(1)), None);
        assert!(cache.get(PrincipalId(1), other).is_some());
    }

    #[test]
    fn the_table_is_bounded() {
        let cache = RightsCache::default();
        for vnode in 0..(RIGHTS_ENTRIES_MAX as u64 + 10) {
            cache.put(
                PrincipalId(1),
                fid(vnode),
                Cached {
                    rights: Rights::ALL,
                    dir: fid(0),
                },
            );
        }
        assert!(cache.len() <= RIGHTS_ENTRIES_MAX);
    }
}
