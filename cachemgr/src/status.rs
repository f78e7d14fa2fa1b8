//! The status cache: per fid, the last `VnodeStatus` seen, its callback promise and what
//! hangs off it (listing, link content, the data version the kernel's pages hold).
//! Invariant: a status is served without an RPC only while its callback holds, counted
//! from when the request was sent (so it errs early), or once its vnode is gone (no link
//! left, which nothing can undo), and never goes back a data version;
//! the table holds at most its budget of entries the kernel does not hold (pinned ones are
//! never evicted, nor ones with unstored writes) and of listed names.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use proto::{CallbackGrant, DataVersion, Fid, Timestamp, VnodeStatus};

use crate::listing::{DirChange, Listing, ListingOutcome, apply_own_change};

/// Tables smaller than this are never shrunk: reallocating them would cost more than
/// they hold.
const SHRINK_CAPACITY_MIN: usize = 1024;

/// The room to shrink a hash table to once it holds `len` entries in room for
/// `capacity`, if it is less than half full; `None` while it is fuller. A table never
/// gives its room back by itself, so one that once held every file the kernel held would
/// keep that memory after the kernel forgot them. The room left (a quarter more than
/// `len`) keeps the next few inserts from growing it again at once.
pub(crate) fn room_when_sparse(len: usize, capacity: usize) -> Option<usize> {
    (capacity > SHRINK_CAPACITY_MIN && len < capacity / 2).then(|| len + len / 4)
}

/// Default number of status entries (AFS's `afsd -stat`): beyond it, the least recently
/// used entries the kernel no longer holds are evicted.
pub const STATUS_ENTRIES_MAX_DEFAULT: usize = 32_768;
/// Evicted fids whose callbacks wait to be given up; beyond this they are left to expire.
const EVICTED_PENDING_MAX: usize = 4096;

/// What the status table, its listings and the idle inode numbers may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableBudget {
    /// Status entries the kernel does not hold, kept as a cache.
    pub status_entries_max: usize,
    /// Names over all cached listings.
    pub listing_entries_max: usize,
    /// Inode numbers given out (as a listing's `d_ino`) but never looked up.
    pub idle_inodes_max: usize,
}

impl TableBudget {
    /// The budget that follows from a number of status entries: four listed names and
    /// half an idle inode number per entry.
    pub fn from_status_entries(entries: usize) -> TableBudget {
        let entries = entries.max(1);
        TableBudget {
            status_entries_max: entries,
            listing_entries_max: entries.saturating_mul(4),
            idle_inodes_max: (entries / 2).max(1),
        }
    }
}

impl Default for TableBudget {
    fn default() -> TableBudget {
        TableBudget::from_status_entries(STATUS_ENTRIES_MAX_DEFAULT)
    }
}

#[derive(Clone, Debug)]
pub struct StatusEntry {
    pub status: VnodeStatus,
    /// When the callback promise ends; `None` when none is held.
    pub callback_until: Option<Instant>,
    /// The directory's listing, when cached. Changed only by the table, which counts it.
    pub listing: Option<Listing>,
    /// The file's size including writes not yet stored on the server.
    pub local_size: Option<u64>,
    /// The data version the kernel's page cache holds pages of, if any.
    pub kernel_version: Option<DataVersion>,
    /// A symlink's target or a mount point's content, with the version it was read at.
    pub content: Option<(DataVersion, Vec<u8>)>,
    /// When the entry was last used (its key in the table's LRU order when unpinned).
    last_use: u64,
    /// When the listing was cached (its key in the table's listing order).
    listed_at: u64,
}

impl StatusEntry {
    pub fn callback_valid(&self, now: Instant) -> bool {
        self.callback_until.is_some_and(|until| until > now)
    }

    /// How long the kernel may cache this entry's attributes: never past the callback,
    /// and not at all while writes are unstored, whose times (`note_local_write`) the
    /// store's status replaces.
    pub fn kernel_ttl(&self, now: Instant, cap: Duration) -> Duration {
        match self.callback_until {
            Some(until) if until > now && self.local_size.is_none() => (until - now).min(cap),
            _ => Duration::ZERO,
        }
    }

    /// Records a write ending at `end` not yet stored: `stat` shows the size it makes
    /// and, as POSIX marks them at the write, a new mtime and ctime (`now`, this
    /// machine's clock) until the store's status brings the server's.
    pub fn note_local_write(&mut self, end: u64, now: Timestamp) {
        self.local_size = Some(self.size().max(end));
        self.status.mtime = now;
        self.status.ctime = now;
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

/// Every status this client has seen, within its budget, by fid. Pure: a method that
/// needs the time takes it as an argument (`apply_own_dir_change` stamps a directory it
/// has no entry for with `Instant::now()`, but without a callback that time is never
/// read). "Use" is a tick of the table's own clock, not time.
#[derive(Debug, Default)]
pub struct StatusTable {
    entries: HashMap<Fid, StatusEntry>,
    /// Fids whose inode the kernel holds: never evicted. Kept apart from `entries` so a
    /// status dropped and fetched again is still pinned.
    pinned: HashSet<Fid>,
    /// Open file descriptions the kernel holds, by fid (bounded by the kernel's open
    /// files): a vnode gone from the server keeps its status only while open.
    opens: HashMap<Fid, u32>,
    /// Unpinned entries by last use, least recent first.
    lru: BTreeMap<u64, Fid>,
    /// Cached listings by when they were cached, oldest first.
    listings: BTreeMap<u64, Fid>,
    /// Names over all cached listings.
    listing_entries: usize,
    clock: u64,
    budget: TableBudget,
    /// Evicted fids that held a callback, to be given up.
    evicted: Vec<Fid>,
}

impl StatusTable {
    pub fn with_budget(budget: TableBudget) -> StatusTable {
        StatusTable {
            budget,
            ..StatusTable::default()
        }
    }

    pub fn budget(&self) -> TableBudget {
        self.budget
    }

    pub fn get(&self, fid: Fid) -> Option<&StatusEntry> {
        self.entries.get(&fid)
    }

    /// The entry, counted as a use. Its listing must not be changed through it.
    pub fn get_mut(&mut self, fid: Fid) -> Option<&mut StatusEntry> {
        self.touch(fid);
        self.entries.get_mut(&fid)
    }

    /// The entry when its callback holds at `now`, or when its vnode is gone (no link
    /// left): nothing can change that one any more.
    pub fn fresh(&self, fid: Fid, now: Instant) -> Option<&StatusEntry> {
        self.entries
            .get(&fid)
            .filter(|e| e.callback_valid(now) || e.status.link_count == 0)
    }

    /// The kernel opened `fid` (an `open` or a `create` answered).
    pub fn opened(&mut self, fid: Fid) {
        *self.opens.entry(fid).or_default() += 1;
    }

    /// The kernel released one open of `fid`.
    pub fn released(&mut self, fid: Fid) {
        if let Some(count) = self.opens.get_mut(&fid) {
            *count -= 1;
            if *count == 0 {
                self.opens.remove(&fid);
            }
        }
    }

    /// The server no longer has `fid` (`Stale`): another client removed its last name.
    /// While the kernel holds it open, its cached status stays, with no link and no
    /// callback, for those descriptors (`fstat` shows `st_nlink` 0). `None` when it is not
    /// open or nothing was cached: the caller answers `ESTALE`, which makes a path lookup
    /// the kernel still had cached look the name up again (and find it gone).
    pub fn mark_gone(&mut self, fid: Fid) -> Option<VnodeStatus> {
        if !self.opens.contains_key(&fid) {
            return None;
        }
        let entry = self.entries.get_mut(&fid)?;
        entry.status.link_count = 0;
        entry.callback_until = None;
        let status = entry.status.clone();
        self.drop_listing(fid);
        Some(status)
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
                    last_use: 0,
                    listed_at: 0,
                },
            );
            self.touch(fid);
            self.evict_over_budget();
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
        let mut listing_stale = false;
        if version_changed {
            listing_stale = entry
                .listing
                .as_ref()
                .is_some_and(|l| l.data_version != status.data_version);
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
        if listing_stale {
            self.drop_listing(fid);
        }
        self.touch(fid);
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
        let fid = dir.fid;
        match self.entries.get_mut(&fid) {
            // An answer overtaken by a later one still brings its change to the listing.
            Some(entry) => {
                let before = entry.listing.as_ref().map_or(0, Listing::len);
                let (had_listing, listed_at) = (entry.listing.is_some(), entry.listed_at);
                let outcome = apply_own_change(&mut entry.listing, dir.data_version, changes);
                if dir.data_version >= entry.status.data_version {
                    entry.status = dir;
                }
                match outcome {
                    ListingOutcome::Applied => {
                        let after = entry.listing.as_ref().map_or(0, Listing::len);
                        self.listing_entries = self.listing_entries - before + after;
                        self.trim_listings(Some(fid));
                    }
                    ListingOutcome::Waiting => {}
                    ListingOutcome::Dropped => {
                        // `apply_own_change` took the listing away.
                        self.listing_entries -= before;
                        if had_listing {
                            self.listings.remove(&listed_at);
                        }
                    }
                }
                self.touch(fid);
                outcome
            }
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

    /// Caches `listing` of `dir` if it is of the directory's current version and fits
    /// the budget, dropping the oldest other listings to make room. True when cached.
    pub fn set_listing(&mut self, dir: Fid, listing: Listing) -> bool {
        if listing.len() > self.budget.listing_entries_max {
            return false;
        }
        let current = self
            .entries
            .get(&dir)
            .is_some_and(|e| e.status.data_version == listing.data_version);
        if !current {
            return false;
        }
        self.drop_listing(dir);
        self.clock += 1;
        let stamp = self.clock;
        self.listing_entries += listing.len();
        if let Some(entry) = self.entries.get_mut(&dir) {
            entry.listing = Some(listing);
            entry.listed_at = stamp;
        }
        self.listings.insert(stamp, dir);
        self.trim_listings(Some(dir));
        true
    }

    /// The server broke the callback: the status may be stale, the listing is.
    pub fn break_callback(&mut self, fid: Fid) -> Broken {
        let Some(entry) = self.entries.get_mut(&fid) else {
            return Broken::default();
        };
        entry.callback_until = None;
        let names = entry
            .listing
            .as_ref()
            .map(|l| l.names().map(str::to_owned).collect())
            .unwrap_or_default();
        self.drop_listing(fid);
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
        self.drop_listing(fid);
        let entry = self.entries.remove(&fid)?;
        self.lru.remove(&entry.last_use);
        Some(entry)
    }

    /// The kernel holds `fid`'s inode: its entry is never evicted.
    pub fn pin(&mut self, fid: Fid) {
        if self.pinned.insert(fid)
            && let Some(entry) = self.entries.get(&fid)
        {
            self.lru.remove(&entry.last_use);
        }
    }

    /// The kernel forgot `fid`'s inode: its entry becomes the most recently used of
    /// those that may be evicted, and the table is brought back within its budget.
    pub fn unpin(&mut self, fid: Fid) {
        if self.pinned.remove(&fid) {
            self.touch(fid);
            self.evict_over_budget();
        }
    }

    /// The fids evicted with a callback since the last call, to give those up.
    pub fn take_evicted(&mut self) -> Vec<Fid> {
        std::mem::take(&mut self.evicted)
    }

    /// As `take_evicted`, once at least `count` are waiting (none before).
    pub fn take_evicted_batch(&mut self, count: usize) -> Vec<Fid> {
        if self.evicted.len() < count {
            return Vec::new();
        }
        self.take_evicted()
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

    /// Names over all cached listings.
    pub fn listing_entries(&self) -> usize {
        self.listing_entries
    }

    /// Entries the kernel holds.
    pub fn pinned(&self) -> usize {
        self.pinned.len()
    }

    /// Counts a use of `fid`'s entry: an unpinned one moves to the back of the LRU order.
    fn touch(&mut self, fid: Fid) {
        let Some(entry) = self.entries.get_mut(&fid) else {
            return;
        };
        self.clock += 1;
        let old = std::mem::replace(&mut entry.last_use, self.clock);
        if self.pinned.contains(&fid) {
            return;
        }
        self.lru.remove(&old);
        self.lru.insert(self.clock, fid);
    }

    /// Evicts the least recently used unpinned entries while more than the budget's
    /// entries are unpinned. One with unstored writes (`local_size`) is skipped and not
    /// counted: it holds the size `stat` must show until they are stored.
    fn evict_over_budget(&mut self) {
        let mut skipped = Vec::new();
        let mut evicted_any = false;
        while self.lru.len() > self.budget.status_entries_max {
            let Some((stamp, fid)) = self.lru.pop_first() else {
                break;
            };
            let dirty = self
                .entries
                .get(&fid)
                .is_some_and(|e| e.local_size.is_some());
            if dirty {
                skipped.push((stamp, fid));
                continue;
            }
            self.drop_listing(fid);
            if let Some(entry) = self.entries.remove(&fid) {
                evicted_any = true;
                if entry.callback_until.is_some() && self.evicted.len() < EVICTED_PENDING_MAX {
                    self.evicted.push(fid);
                }
            }
        }
        self.lru.extend(skipped);
        if evicted_any {
            if let Some(room) = room_when_sparse(self.entries.len(), self.entries.capacity()) {
                self.entries.shrink_to(room);
            }
            if let Some(room) = room_when_sparse(self.pinned.len(), self.pinned.capacity()) {
                self.pinned.shrink_to(room);
            }
        }
    }

    /// Drops `fid`'s listing, if cached, and its accounting.
    fn drop_listing(&mut self, fid: Fid) {
        let Some(entry) = self.entries.get_mut(&fid) else {
            return;
        };
        if let Some(listing) = entry.listing.take() {
            self.listing_entries -= listing.len();
            self.listings.remove(&entry.listed_at);
        }
    }

    /// Drops the oldest listings (but `keep`'s) while over the budget's names.
    fn trim_listings(&mut self, keep: Option<Fid>) {
        let mut kept = None;
        while self.listing_entries > self.budget.listing_entries_max {
            let Some((stamp, fid)) = self.listings.pop_first() else {
                break;
            };
            if Some(fid) == keep {
                kept = Some((stamp, fid));
                continue;
            }
            if let Some(entry) = self.entries.get_mut(&fid)
                && let Some(listing) = entry.listing.take()
            {
                self.listing_entries -= listing.len();
            }
        }
        if let Some((stamp, fid)) = kept {
            if self.listing_entries > self.budget.listing_entries_max {
                // Alone over the budget (it grew by this client's creates): dropped too.
                if let Some(entry) = self.entries.get_mut(&fid)
                    && let Some(listing) = entry.listing.take()
                {
                    self.listing_entries -= listing.len();
                }
            } else {
                self.listings.insert(stamp, fid);
            }
        }
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
    fn a_local_write_shows_new_times_the_kernel_does_not_keep() {
        let mut table = StatusTable::default();
        let sent = Instant::now();
        table.apply(status(2, FileKind::File, 1), GRANT, sent);
        let cap = Duration::from_secs(1);
        assert!(table.get(fid(2)).unwrap().kernel_ttl(sent, cap) > Duration::ZERO);
        let written = Timestamp { secs: 9, nanos: 1 };
        let entry = table.get_mut(fid(2)).unwrap();
        entry.note_local_write(25, written);
        assert_eq!(entry.size(), 25);
        assert_eq!((entry.status.mtime, entry.status.ctime), (written, written));
        assert_eq!(entry.kernel_ttl(sent, cap), Duration::ZERO);
        // The store's status brings the server's times.
        let stored = VnodeStatus {
            size: 25,
            mtime: Timestamp { secs: 10, nanos: 0 },
            ctime: Timestamp { secs: 10, nanos: 0 },
            ..status(2, FileKind::File, 2)
        };
        table.apply(stored.clone(), GRANT, sent);
        assert_eq!(table.get(fid(2)).unwrap().status, stored);
    }

    #[test]
    fn a_vnode_gone_from_the_server_stays_fresh_with_no_link() {
        let mut table = StatusTable::default();
        let sent = Instant::now();
        let later = sent + Duration::from_secs(5);
        table.apply(status(2, FileKind::File, 1), GRANT, sent);
        assert!(table.fresh(fid(2), later).is_none());
        // Not open: nothing to keep it for.
        assert_eq!(table.mark_gone(fid(2)), None);
        table.opened(fid(2));
        table.opened(fid(2));
        table.released(fid(2));
        let gone = table.mark_gone(fid(2)).unwrap();
        assert_eq!(gone.link_count, 0);
        assert_eq!(gone.data_version, DataVersion(1));
        // Nothing can change it any more: served without asking, however late.
        assert_eq!(table.fresh(fid(2), later).unwrap().status, gone);
        assert_eq!(table.mark_gone(fid(3)), None);
        table.released(fid(2));
        table.released(fid(2));
        assert!(table.opens.is_empty());
        // The same holds for a removal this client made (the server's last status).
        let removed = VnodeStatus {
            link_count: 0,
            ..status(4, FileKind::Fifo, 1)
        };
        table.apply(removed.clone(), None, sent);
        assert_eq!(table.fresh(fid(4), later).unwrap().status, removed);
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
        // Answered ahead of version 5: not current until 5's answer, which comes late.
        let late = DirChange::Insert {
            name: "late".into(),
            entry: ListEntry {
                fid: fid(10),
                kind: FileKind::File,
            },
        };
        let outcome = table.apply_own_dir_change(status(1, FileKind::Directory, 6), &[insert]);
        assert_eq!(outcome, ListingOutcome::Waiting);
        assert!(table.get(fid(1)).unwrap().fresh_listing(now).is_none());
        assert_eq!(
            table.get(fid(1)).unwrap().status.data_version,
            DataVersion(6)
        );
        let outcome = table.apply_own_dir_change(status(1, FileKind::Directory, 5), &[late]);
        assert_eq!(outcome, ListingOutcome::Applied);
        let entry = table.get(fid(1)).unwrap();
        assert_eq!(entry.status.data_version, DataVersion(6), "never back");
        let listing = entry.fresh_listing(now).unwrap();
        assert_eq!(listing.get("late").map(|e| e.fid), Some(fid(10)));
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

    fn small_budget(entries: usize, listed: usize) -> TableBudget {
        TableBudget {
            status_entries_max: entries,
            listing_entries_max: listed,
            idle_inodes_max: entries,
        }
    }

    fn listing_of(dv: u64, names: &[&str]) -> Listing {
        Listing::new(
            DataVersion(dv),
            names.iter().enumerate().map(|(i, name)| DirEntry {
                name: (*name).to_owned(),
                fid: fid(100 + i as u64),
                kind: FileKind::File,
            }),
        )
    }

    #[test]
    fn unpinned_entries_beyond_the_budget_go_least_recently_used_first() {
        let mut table = StatusTable::with_budget(small_budget(2, 100));
        let now = Instant::now();
        table.apply(status(2, FileKind::File, 1), GRANT, now);
        table.apply(status(3, FileKind::File, 1), None, now);
        // A use moves 2 behind 3.
        table.get_mut(fid(2));
        table.apply(status(4, FileKind::File, 1), None, now);
        assert!(table.get(fid(3)).is_none(), "least recently used");
        assert!(table.get(fid(2)).is_some() && table.get(fid(4)).is_some());
        table.apply(status(5, FileKind::File, 1), None, now);
        assert!(table.get(fid(2)).is_none());
        // 2 held a callback: it is to be given up; 3 held none.
        assert_eq!(table.take_evicted(), [fid(2)]);
        assert!(table.take_evicted().is_empty());
        assert_eq!(table.len(), 2);
    }

    #[test]
    fn tables_give_their_room_back_once_the_kernel_forgets_a_burst() {
        let budget = 1_000;
        let mut table = StatusTable::with_budget(small_budget(budget, 100));
        let now = Instant::now();
        let vnodes = 2..100_002;
        for vnode in vnodes.clone() {
            table.apply(status(vnode, FileKind::File, 1), GRANT, now);
            table.pin(fid(vnode));
        }
        let held = table.entries.capacity();
        for vnode in vnodes {
            table.unpin(fid(vnode));
        }
        assert_eq!(table.len(), budget);
        assert!(
            table.entries.capacity() < 2 * budget,
            "{} of room for {budget} statuses (it held {held})",
            table.entries.capacity()
        );
        assert!(table.pinned.capacity() < 2 * SHRINK_CAPACITY_MIN);
    }

    #[test]
    fn pinned_entries_are_never_evicted_and_stay_pinned_when_fetched_again() {
        let mut table = StatusTable::with_budget(small_budget(1, 100));
        let now = Instant::now();
        table.pin(fid(2));
        table.apply(status(2, FileKind::File, 1), GRANT, now);
        table.pin(fid(3));
        table.apply(status(3, FileKind::File, 1), GRANT, now);
        for vnode in 10..20 {
            table.apply(status(vnode, FileKind::File, 1), None, now);
        }
        assert!(table.get(fid(2)).is_some() && table.get(fid(3)).is_some());
        assert_eq!(table.len(), 3, "two pinned and one unpinned");
        assert_eq!(table.pinned(), 2);
        // Dropped (`fs flush`) and fetched again, a pinned status is still pinned.
        table.remove(fid(2));
        table.apply(status(2, FileKind::File, 2), GRANT, now);
        table.apply(status(21, FileKind::File, 1), None, now);
        assert!(table.get(fid(2)).is_some());
        // Unpinned, it is the most recent of the evictable ones: the others go first.
        table.unpin(fid(3));
        assert!(table.get(fid(3)).is_some());
        assert!(table.get(fid(21)).is_none());
        table.apply(status(22, FileKind::File, 1), None, now);
        assert!(table.get(fid(3)).is_none());
        assert!(table.get(fid(2)).is_some());
    }

    #[test]
    fn an_entry_with_unstored_writes_is_skipped_by_eviction() {
        let mut table = StatusTable::with_budget(small_budget(1, 100));
        let now = Instant::now();
        table.apply(status(2, FileKind::File, 1), None, now);
        table.get_mut(fid(2)).unwrap().local_size = Some(4096);
        table.apply(status(3, FileKind::File, 1), None, now);
        table.apply(status(4, FileKind::File, 1), None, now);
        assert_eq!(table.get(fid(2)).unwrap().size(), 4096);
        assert!(table.get(fid(3)).is_none());
        assert!(
            table.get(fid(4)).is_some(),
            "the unstored one is not counted"
        );
        assert_eq!(table.len(), 2);
        // Once stored, it is an ordinary entry again.
        table.get_mut(fid(2)).unwrap().local_size = None;
        table.apply(status(5, FileKind::File, 1), None, now);
        assert!(table.get(fid(2)).is_none() && table.get(fid(4)).is_none());
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn listings_are_bounded_in_names_oldest_dropped_first() {
        let mut table = StatusTable::with_budget(small_budget(100, 4));
        let now = Instant::now();
        for dir in [1, 2, 3] {
            table.pin(fid(dir));
            table.apply(status(dir, FileKind::Directory, 7), GRANT, now);
        }
        assert!(!table.set_listing(fid(1), listing_of(7, &["a", "b", "c", "d", "e"])));
        assert_eq!(table.listing_entries(), 0, "larger than the whole budget");
        assert!(table.set_listing(fid(1), listing_of(7, &["a", "b"])));
        assert!(table.set_listing(fid(2), listing_of(7, &["a", "b"])));
        assert_eq!(table.listing_entries(), 4);
        assert!(table.set_listing(fid(3), listing_of(7, &["a"])));
        assert!(
            table.get(fid(1)).unwrap().listing.is_none(),
            "oldest dropped"
        );
        assert!(table.get(fid(2)).unwrap().listing.is_some());
        assert_eq!(table.listing_entries(), 3);
        // Every way a listing goes is counted.
        table.break_callback(fid(3));
        assert_eq!(table.listing_entries(), 2);
        table.apply(status(2, FileKind::Directory, 9), None, now);
        assert_eq!(table.listing_entries(), 0);
        assert!(table.set_listing(fid(2), listing_of(9, &["a"])));
        let insert = DirChange::Insert {
            name: "z".into(),
            entry: ListEntry {
                fid: fid(50),
                kind: FileKind::File,
            },
        };
        table.apply_own_dir_change(
            status(2, FileKind::Directory, 10),
            std::slice::from_ref(&insert),
        );
        assert_eq!(table.listing_entries(), 2);
        // Answered ahead: the listing waits, still counted, until its break.
        table.apply_own_dir_change(status(2, FileKind::Directory, 12), &[insert]);
        assert_eq!(table.listing_entries(), 2);
        table.break_callback(fid(2));
        assert_eq!(table.listing_entries(), 0);
        assert!(table.set_listing(fid(2), listing_of(12, &["a", "b", "c"])));
        table.remove(fid(2));
        assert_eq!(table.listing_entries(), 0);
    }

    #[test]
    fn an_evicted_directory_takes_its_listing_with_it() {
        let mut table = StatusTable::with_budget(small_budget(1, 100));
        let now = Instant::now();
        table.apply(status(1, FileKind::Directory, 3), GRANT, now);
        assert!(table.set_listing(fid(1), listing_of(3, &["a", "b"])));
        table.apply(status(2, FileKind::File, 1), None, now);
        assert!(table.get(fid(1)).is_none());
        assert_eq!(table.listing_entries(), 0);
    }
}
