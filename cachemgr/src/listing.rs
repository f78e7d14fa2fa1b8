//! Cached directory listings, and the rule that keeps one current across this client's
//! own changes without refetching it.
//! Invariant: a change is applied to a listing only when the server's new data version is
//! exactly one more than the listing's, proving no other change came in between.

use std::collections::BTreeMap;

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
    /// The listing now reflects `new_version`.
    Applied,
    /// Another change slipped in (or there was no listing): the listing is gone.
    Dropped,
}

/// Applies this client's own change, given the directory's data version the server
/// returned after it. Any other version means another change came in between, and the
/// listing is dropped rather than patched.
pub fn apply_own_change(
    listing: &mut Option<Listing>,
    new_version: DataVersion,
    changes: &[DirChange],
) -> ListingOutcome {
    let Some(cached) = listing.as_mut() else {
        return ListingOutcome::Dropped;
    };
    if cached.data_version.next() != new_version {
        *listing = None;
        return ListingOutcome::Dropped;
    }
    for change in changes {
        match change {
            DirChange::Insert { name, entry } => {
                cached.entries.insert(name.clone(), *entry);
            }
            DirChange::Remove { name } => {
                cached.entries.remove(name);
            }
        }
    }
    cached.data_version = new_version;
    ListingOutcome::Applied
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
    fn skipped_version_drops_the_listing() {
        let mut cached = listing(4);
        let outcome = apply_own_change(
            &mut cached,
            DataVersion(6),
            &[DirChange::Remove { name: "a".into() }],
        );
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
