//! The status cache: per fid, the last `VnodeStatus` seen, its callback promise and what
//! hangs off it (listing, link content, the data version the kernel's pages hold).
//! Invariant: a status is served without an RPC only while its callback holds, counted
//! from when the request was sent (so it errs early), and never goes back a data version.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use proto::{CallbackGrant, DataVersion, Fid, VnodeStatus};

use crate::listing::{DirChange, Listing, ListingOutcome, apply_own_change};

#[derive(Clone, Debug)]
pub struct StatusEntry {
    pub status: VnodeStatus,
    /// When the callback promise ends; `None` when none is held.
    pub callback_until: Option<Instant>,
    /// The directory's listing, when cached.
    pub listing: Option<Listing>,
    /// The file's size including writes not yet stored on the server.
    pub local_size: Option<u64>,
    /// The data version the kernel's page cache holds pages of, if any.
    pub kernel_version: Option<DataVersion>,
    /// A symlink's target or a mount point's content, with the version it was read at.
    pub content: Option<(DataVersion, Vec<u8>)>,
}

impl StatusEntry {
    pub fn callback_valid(&self, now: Instant) -> bool {
        self.callback_until.is_some_and(|until| until > now)
    }

    /// How long the kernel may cache this entry's attributes: never past the callback.
    pub fn kernel_ttl(&self, now: Instant, cap: Duration) -> Duration {
        match self.callback_until {
            Some(until) if until > now => (until - now).min(cap),
            _ => Duration::ZERO,
        }
    }

    /// The size `stat` shows.
    pub fn size(&self) -> u64 {
        self.local_size.unwrap_or(self.status.size)
    }

    /// The listing, if it is current under a valid callback.
    pub fn fresh_listing(&self, now: Instant) -> Option<&Listing> {
        self.listing
            .as_ref()
            .filter(|l| self.callback_valid(now) && l.data_version == self.status.data_version)
    }
}

/// What applying a status did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Applied {
    /// The data version moved: cached data of older versions is stale.
    pub version_changed: bool,
    /// The status was older than the cached one and was ignored.
    pub ignored: bool,
}

/// What a callback break dropped, for the kernel invalidation that follows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Broken {
    /// Names of the directory listing that was dropped (their dentries go stale).
    pub names: Vec<String>,
}

/// Whether `after` is what `changes` changes from `before` give when no other client's
/// change came in between (every change moves the version by exactly one).
pub fn only_own_changes(before: DataVersion, changes: u64, after: DataVersion) -> bool {
    changes > 0 && before.0.checked_add(changes) == Some(after.0)
}

/// Every status this client has seen, by fid. Pure: a method that needs the time takes
/// it as an argument (`apply_own_dir_change` stamps a directory it has no entry for with
/// `Instant::now()`, but without a callback that time is never read).
#[derive(Debug, Default)]
pub struct StatusTable {
    entries: HashMap<Fid, StatusEntry>,
}

impl StatusTable {
    pub fn get(&self, fid: Fid) -> Option<&StatusEntry> {
        self.entries.get(&fid)
    }

    pub fn get_mut(&mut self, fid: Fid) -> Option<&mut StatusEntry> {
        self.entries.get_mut(&fid)
    }

    /// The entry when its callback holds at `now`.
    pub fn fresh(&self, fid: Fid, now: Instant) -> Option<&StatusEntry> {
        self.entries.get(&fid).filter(|e| e.callback_valid(now))
    }

    /// Records a status fetched or returned by a request sent at `sent_at`.
    pub fn apply(
        &mut self,
        status: VnodeStatus,
        callback: Option<CallbackGrant>,
        sent_at: Instant,
    ) -> Applied {
        let until = callback.map(|g| sent_at + Duration::from_millis(g.lifetime_ms));
        let fid = status.fid;
        let Some(entry) = self.entries.get_mut(&fid) else {
            self.entries.insert(
                fid,
                StatusEntry {
                    status,
                    callback_until: until,
                    listing: None,
                    local_size: None,
                    kernel_version: None,
                    content: None,
                },
            );
            return Applied {
                version_changed: false,
                ignored: false,
            };
        };
        if status.data_version < entry.status.data_version {
            // A reply overtaken by a newer one (concurrent requests): keep the newer.
            return Applied {
                version_changed: false,
                ignored: true,
            };
        }
        let version_changed = status.data_version != entry.status.data_version;
        if version_changed {
            if entry
                .listing
                .as_ref()
                .is_some_and(|l| l.data_version != status.data_version)
            {
                entry.listing = None;
            }
            if entry
                .content
                .as_ref()
                .is_some_and(|(v, _)| *v != status.data_version)
            {
                entry.content = None;
            }
        }
        entry.status = status;
        if let Some(until) = until {
            // A later grant never shortens a promise already held.
            entry.callback_until = Some(entry.callback_until.map_or(until, |u| u.max(until)));
        }
        Applied {
            version_changed,
            ignored: false,
        }
    }

    /// Records the directory status returned by this client's own change to it, keeping
    /// the cached listing when the change is provably the only one (version + 1).
    pub fn apply_own_dir_change(
        &mut self,
        dir: VnodeStatus,
        changes: &[DirChange],
    ) -> ListingOutcome {
        match self.entries.get_mut(&dir.fid) {
            Some(entry) if dir.data_version >= entry.status.data_version => {
                let outcome = apply_own_change(&mut entry.listing, dir.data_version, changes);
                entry.status = dir;
                outcome
            }
            Some(_) => ListingOutcome::Dropped,
            None => {
                self.apply(dir, None, Instant::now());
                ListingOutcome::Dropped
            }
        }
    }

    /// Records the highest file status returned by `changes` of this client's own stores
    /// or setattrs, all sent from `before`. When the version moved by exactly `changes`,
    /// nothing else changed the file, so the kernel's pages of `before` are still good.
    pub fn apply_own_data_change(
        &mut self,
        before: DataVersion,
        changes: u64,
        status: VnodeStatus,
        callback: Option<CallbackGrant>,
        sent_at: Instant,
    ) -> Applied {
        let after = status.data_version;
        let fid = status.fid;
        let applied = self.apply(status, callback, sent_at);
        if let Some(entry) = self.entries.get_mut(&fid)
            && only_own_changes(before, changes, after)
            && entry.kernel_version == Some(before)
        {
            entry.kernel_version = Some(after);
        }
        applied
    }

    pub fn set_listing(&mut self, dir: Fid, listing: Listing) {
        if let Some(entry) = self.entries.get_mut(&dir)
            && entry.status.data_version == listing.data_version
        {
            entry.listing = Some(listing);
        }
    }

    /// The server broke the callback: the status may be stale, the listing is.
    pub fn break_callback(&mut self, fid: Fid) -> Broken {
        let Some(entry) = self.entries.get_mut(&fid) else {
            return Broken::default();
        };
        entry.callback_until = None;
        let names = entry
            .listing
            .take()
            .map(|l| l.names().map(str::to_owned).collect())
            .unwrap_or_default();
        Broken { names }
    }

    /// Drops every callback whose fid matches: data stays, to be revalidated by version.
    pub fn reset_callbacks(&mut self, mut matches: impl FnMut(Fid) -> bool) -> Vec<Fid> {
        let mut reset = Vec::new();
        for (fid, entry) in &mut self.entries {
            if matches(*fid) && entry.callback_until.take().is_some() {
                reset.push(*fid);
            }
        }
        reset
    }

    pub fn remove(&mut self, fid: Fid) -> Option<StatusEntry> {
        self.entries.remove(&fid)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The fids whose callback holds at `now` (what a lost connection leaves owed for
    /// reclaim, and what keeps a connection worth keeping alive).
    pub fn with_callback(&self, now: Instant) -> impl Iterator<Item = Fid> + '_ {
        self.entries
            .iter()
            .filter(move |(_, entry)| entry.callback_valid(now))
            .map(|(fid, _)| *fid)
    }
}

#[cfg(test)]
mod tests {
    use proto::{DirEntry, FileKind, Timestamp, Uniquifier, VnodeId, VolumeId};

    use super::*;
    use crate::listing::ListEntry;

    fn fid(vnode: u64) -> Fid {
        Fid {
            volume: VolumeId(1),
            vnode: VnodeId(vnode),
            unique: Uniquifier(1),
        }
    }

    fn status(vnode: u64, kind: FileKind, dv: u64) -> VnodeStatus {
        VnodeStatus {
            fid: fid(vnode),
            kind,
            mode: 0o644,
            link_count: 1,
            size: 10,
            data_version: DataVersion(dv),
            uid: 0,
            gid: 0,
            atime: Timestamp::default(),
            mtime: Timestamp::default(),
            ctime: Timestamp::default(),
        }
    }

    const GRANT: Option<CallbackGrant> = Some(CallbackGrant { lifetime_ms: 1000 });

    #[test]
    fn callback_runs_from_send_time() {
        let mut table = StatusTable::default();
        let sent = Instant::now();
        table.apply(status(2, FileKind::File, 1), GRANT, sent);
        assert!(
            table
                .fresh(fid(2), sent + Duration::from_millis(999))
                .is_some()
        );
        assert!(
            table
                .fresh(fid(2), sent + Duration::from_millis(1000))
                .is_none()
        );
        let entry = table.get(fid(2)).unwrap();
        assert_eq!(
            entry.kernel_ttl(sent + Duration::from_millis(900), Duration::from_secs(1)),
            Duration::from_millis(100)
        );
    }

    #[test]
    fn break_drops_callback_and_listing_but_keeps_status() {
        let mut table = StatusTable::default();
        let now = Instant::now();
        table.apply(status(1, FileKind::Directory, 3), GRANT, now);
        let listing = Listing::new(
            DataVersion(3),
            [DirEntry {
                name: "x".into(),
                fid: fid(2),
                kind: FileKind::File,
            }],
        );
        table.set_listing(fid(1), listing);
        assert!(table.get(fid(1)).unwrap().fresh_listing(now).is_some());
        let broken = table.break_callback(fid(1));
        assert_eq!(broken.names, ["x"]);
        let entry = table.get(fid(1)).unwrap();
        assert!(!entry.callback_valid(now));
        assert!(entry.listing.is_none());
        assert_eq!(entry.status.data_version, DataVersion(3));
    }

    #[test]
    fn older_status_is_ignored() {
        let mut table = StatusTable::default();
        let now = Instant::now();
        table.apply(status(2, FileKind::File, 5), GRANT, now);
        let applied = table.apply(status(2, FileKind::File, 4), None, now);
        assert!(applied.ignored);
        assert_eq!(
            table.get(fid(2)).unwrap().status.data_version,
            DataVersion(5)
        );
        let applied = table.apply(status(2, FileKind::File, 6), None, now);
        assert!(applied.version_changed);
    }

    #[test]
    fn own_dir_change_keeps_listing_only_on_next_version() {
        let mut table = StatusTable::default();
        let now = Instant::now();
        table.apply(status(1, FileKind::Directory, 3), GRANT, now);
        table.set_listing(fid(1), Listing::new(DataVersion(3), []));
        let insert = DirChange::Insert {
            name: "new".into(),
            entry: ListEntry {
                fid: fid(9),
                kind: FileKind::File,
            },
        };
        let outcome = table.apply_own_dir_change(
            status(1, FileKind::Directory, 4),
            std::slice::from_ref(&insert),
        );
        assert_eq!(outcome, ListingOutcome::Applied);
        let listing = table.get(fid(1)).unwrap().fresh_listing(now).unwrap();
        assert_eq!(listing.get("new").map(|e| e.fid), Some(fid(9)));
        let outcome = table.apply_own_dir_change(status(1, FileKind::Directory, 6), &[insert]);
        assert_eq!(outcome, ListingOutcome::Dropped);
        assert!(table.get(fid(1)).unwrap().listing.is_none());
        assert_eq!(
            table.get(fid(1)).unwrap().status.data_version,
            DataVersion(6)
        );
    }

    #[test]
    fn own_data_change_carries_kernel_version_forward() {
        let mut table = StatusTable::default();
        let now = Instant::now();
        table.apply(status(2, FileKind::File, 1), GRANT, now);
        table.get_mut(fid(2)).unwrap().kernel_version = Some(DataVersion(1));
        table.apply_own_data_change(DataVersion(1), 1, status(2, FileKind::File, 2), None, now);
        assert_eq!(
            table.get(fid(2)).unwrap().kernel_version,
            Some(DataVersion(2))
        );
        // Someone else's store slipped in: the kernel's pages are stale.
        table.apply_own_data_change(DataVersion(2), 1, status(2, FileKind::File, 4), None, now);
        assert_eq!(
            table.get(fid(2)).unwrap().kernel_version,
            Some(DataVersion(2))
        );
    }

    #[test]
    fn concurrent_own_stores_keep_kernel_pages() {
        let mut table = StatusTable::default();
        let now = Instant::now();
        table.apply(status(2, FileKind::File, 1), GRANT, now);
        table.get_mut(fid(2)).unwrap().kernel_version = Some(DataVersion(1));
        // Three stores in flight from version 1; the highest reply is version 4.
        table.apply_own_data_change(DataVersion(1), 3, status(2, FileKind::File, 4), None, now);
        assert_eq!(
            table.get(fid(2)).unwrap().kernel_version,
            Some(DataVersion(4))
        );
        // Two more, but the highest reply is 7: another client's change came in between.
        table.apply_own_data_change(DataVersion(4), 2, status(2, FileKind::File, 7), None, now);
        assert_eq!(
            table.get(fid(2)).unwrap().kernel_version,
            Some(DataVersion(4))
        );
        assert!(!only_own_changes(DataVersion(1), 0, DataVersion(1)));
        assert!(!only_own_changes(DataVersion(u64::MAX), 1, DataVersion(0)));
    }

    #[test]
    fn reset_drops_matching_callbacks() {
        let mut table = StatusTable::default();
        let now = Instant::now();
        table.apply(status(2, FileKind::File, 1), GRANT, now);
        table.apply(status(3, FileKind::File, 1), GRANT, now);
        let reset = table.reset_callbacks(|f| f == fid(2));
        assert_eq!(reset, [fid(2)]);
        assert!(table.fresh(fid(2), now).is_none());
        assert!(table.fresh(fid(3), now).is_some());
    }
}
