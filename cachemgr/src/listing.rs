//! Cached directory listings, and the rule that keeps one current across this client's
//! own changes without refetching it.
//! Invariant: a change is applied to a listing only when the server's new data version is
//! exactly one more than the listing's, proving no other change came in between; one
//! answered ahead of that waits beside the listing until the versions between are its own.

use std::collections::BTreeMap;

/// Own changes answered ahead of a listing's version (its creates and removes in flight
/// side by side, answered out of order) kept waiting at most; beyond, the listing goes.
const AHEAD_MAX: usize = 256;

use proto::{DataVersion, DirEntry, Fid, FileKind};

/// What a directory maps one name to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListEntry {
    pub fid: Fid,
    pub kind: FileKind,
}

/// A whole directory, in name order, as of one data version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listing {
    pub data_version: DataVersion,
    entries: BTreeMap<String, ListEntry>,
    /// This client's changes answered at versions past `data_version + 1`, by version:
    /// applied once every version before theirs is applied.
    ahead: BTreeMap<DataVersion, Vec<DirChange>>,
}

impl Listing {
    pub fn new(data_version: DataVersion, entries: impl IntoIterator<Item = DirEntry>) -> Listing {
        Listing {
            data_version,
            entries: entries
                .into_iter()
                .map(|e| {
                    (
                        e.name,
                        ListEntry {
                            fid: e.fid,
                            kind: e.kind,
                        },
                    )
                })
                .collect(),
            ahead: BTreeMap::new(),
        }
    }

    pub fn get(&self, name: &str) -> Option<ListEntry> {
        self.entries.get(name).copied()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, ListEntry)> {
        self.entries
            .iter()
            .map(|(name, entry)| (name.as_str(), *entry))
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }
}

/// One change this client made to a directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DirChange {
    Insert { name: String, entry: ListEntry },
    Remove { name: String },
}

/// What happened to the cached listing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListingOutcome {
    /// The listing now reflects `new_version` (or a later one).
    Applied,
    /// Answered ahead of versions not yet applied: the change waits beside the listing,
    /// which is not current until they come.
    Waiting,
    /// Another change slipped in (or there was no listing): the listing is gone.
    Dropped,
}

/// Applies this client's own change, given the directory's data version the server
/// returned after it. A change answered at the next version is applied, with those
/// that waited for it; one answered further ahead waits (the versions between are this
/// client's changes still in flight, or another's, whose break ends the listing's use:
/// it stays behind its directory's status, never current, until fetched again). One at
/// or before the listing's version is in it already (the listing was fetched after).
pub fn apply_own_change(
    listing: &mut Option<Listing>,
    new_version: DataVersion,
    changes: &[DirChange],
) -> ListingOutcome {
    let Some(cached) = listing.as_mut() else {
        return ListingOutcome::Dropped;
    };
    if new_version <= cached.data_version {
        return ListingOutcome::Applied;
    }
    if cached.data_version.next() != new_version {
        if cached.ahead.len() >= AHEAD_MAX {
            *listing = None;
            return ListingOutcome::Dropped;
        }
        cached.ahead.insert(new_version, changes.to_vec());
        return ListingOutcome::Waiting;
    }
    cached.apply(changes);
    cached.data_version = new_version;
    while let Some(waiting) = cached.ahead.remove(&cached.data_version.next()) {
        cached.apply(&waiting);
        cached.data_version = cached.data_version.next();
    }
    ListingOutcome::Applied
}

impl Listing {
    fn apply(&mut self, changes: &[DirChange]) {
        for change in changes {
            match change {
                DirChange::Insert { name, entry } => {
                    self.entries.insert(name.clone(), *entry);
                }
                DirChange::Remove { name } => {
                    self.entries.remove(name);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proto::{Uniquifier, VnodeId, VolumeId};

    use super::*;

    fn entry(vnode: u64) -> ListEntry {
        ListEntry {
            fid: Fid {
                volume: VolumeId(1),
                vnode: VnodeId(vnode),
                unique: Uniquifier(1),
            },
            kind: FileKind::File,
        }
    }

    fn listing(dv: u64) -> Option<Listing> {
        let a = entry(2);
        Some(Listing::new(
            DataVersion(dv),
            [DirEntry {
                name: "a".into(),
                fid: a.fid,
                kind: a.kind,
            }],
        ))
    }

    #[test]
    fn change_with_next_version_is_applied() {
        let mut cached = listing(4);
        let outcome = apply_own_change(
            &mut cached,
            DataVersion(5),
            &[DirChange::Insert {
                name: "b".into(),
                entry: entry(3),
            }],
        );
        assert_eq!(outcome, ListingOutcome::Applied);
        let cached = cached.unwrap();
        assert_eq!(cached.data_version, DataVersion(5));
        assert_eq!(cached.get("b"), Some(entry(3)));
        assert_eq!(cached.names().collect::<Vec<_>>(), ["a", "b"]);
    }

    #[test]
    fn rename_in_one_directory_is_one_version_step() {
        let mut cached = listing(4);
        let outcome = apply_own_change(
            &mut cached,
            DataVersion(5),
            &[
                DirChange::Remove { name: "a".into() },
                DirChange::Insert {
                    name: "z".into(),
                    entry: entry(2),
                },
            ],
        );
        assert_eq!(outcome, ListingOutcome::Applied);
        let cached = cached.unwrap();
        assert_eq!(cached.get("a"), None);
        assert_eq!(cached.get("z"), Some(entry(2)));
    }

    #[test]
    fn a_change_answered_ahead_waits_for_the_one_before_it() {
        let mut cached = listing(4);
        let c = DirChange::Insert {
            name: "c".into(),
            entry: entry(4),
        };
        let outcome = apply_own_change(&mut cached, DataVersion(6), &[c]);
        assert_eq!(outcome, ListingOutcome::Waiting);
        assert_eq!(cached.as_ref().unwrap().data_version, DataVersion(4));
        assert_eq!(cached.as_ref().unwrap().get("c"), None, "not before 5");
        let b = DirChange::Insert {
            name: "b".into(),
            entry: entry(3),
        };
        let outcome = apply_own_change(&mut cached, DataVersion(5), &[b]);
        assert_eq!(outcome, ListingOutcome::Applied);
        let cached = cached.unwrap();
        assert_eq!(cached.data_version, DataVersion(6));
        assert_eq!(cached.names().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert!(cached.ahead.is_empty());
    }

    #[test]
    fn a_change_the_listing_holds_already_changes_nothing() {
        let mut cached = listing(4);
        let outcome = apply_own_change(
            &mut cached,
            DataVersion(4),
            &[DirChange::Remove { name: "a".into() }],
        );
        assert_eq!(outcome, ListingOutcome::Applied);
        assert_eq!(cached, listing(4));
    }

    #[test]
    fn too_many_changes_ahead_drop_the_listing() {
        let mut cached = listing(4);
        for ahead in 0..AHEAD_MAX as u64 {
            let outcome = apply_own_change(&mut cached, DataVersion(6 + ahead), &[]);
            assert_eq!(outcome, ListingOutcome::Waiting);
        }
        let outcome = apply_own_change(&mut cached, DataVersion(1000), &[]);
        assert_eq!(outcome, ListingOutcome::Dropped);
        assert_eq!(cached, None);
    }

    #[test]
    fn no_listing_stays_none() {
        let mut cached = None;
        let outcome = apply_own_change(&mut cached, DataVersion(1), &[]);
        assert_eq!(outcome, ListingOutcome::Dropped);
        assert_eq!(cached, None);
    }
}
