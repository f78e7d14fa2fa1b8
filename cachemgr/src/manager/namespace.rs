//! The namespace: lookup, attributes, listings and directory streams, and entry changes.
//! Invariant: a name is checked before any RPC, and a cached listing answers only while
//! its directory's callback holds at the listing's data version.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::Arc;
use std::time::Instant;

use proto::{Fid, FileKind, Request, Response, VolumeName, VolumeSpace, check_entry_name};
use tracing::{debug, warn};

use super::fs_error::unexpected;
use super::{AttrOut, FsError, FsResult, Manager, NodeKind, rpc_error};
use crate::inode::Ino;
use crate::listing::{DirChange, ListEntry, Listing};

/// Entries asked for per `ReadDir` page.
const READDIR_PAGE: u32 = 1024;
/// A directory larger than this is refused rather than held in memory.
const LISTING_ENTRIES_MAX: usize = 4_000_000;
/// Largest symlink target or mount point content read.
const CONTENT_BYTES_MAX: u32 = 64 * 1024;
/// Directory streams open at once.
const DIR_HANDLES_MAX: usize = 65_536;

/// A listing as fetched, and whether all its pages came from one data version.
struct FetchedListing {
    listing: Listing,
    consistent: bool,
}

/// A directory as one `opendir` stream sees it: offsets index into `entries`.
#[derive(Debug)]
pub struct DirSnapshot {
    pub entries: Vec<(String, Ino, NodeKind)>,
}

/// The open directory streams, by handle.
#[derive(Default)]
pub(super) struct DirHandles {
    open: HashMap<u64, Arc<DirSnapshot>>,
    next: u64,
}

/// Checks a name from the kernel before any RPC: 256 bytes is `ENAMETOOLONG`.
pub(super) fn entry_name(name: &OsStr) -> FsResult<String> {
    let Some(text) = name.to_str() else {
        return Err(FsError::EINVAL);
    };
    check_entry_name(text).map_err(|code| FsError::from_errno(code.errno()))?;
    Ok(text.to_owned())
}

/// A mount point's content (`#name.` or `%name.`) to the volume it shows.
fn parse_mount_point(content: &[u8]) -> Option<VolumeName> {
    let text = std::str::from_utf8(content).ok()?;
    let text = text.strip_prefix(['#', '%'])?;
    let text = text.strip_suffix('.').unwrap_or(text);
    VolumeName::parse(text).ok()
}

impl Manager {
    /// The attributes of `ino`, revalidated unless a callback holds.
    pub async fn getattr(&self, ino: Ino) -> FsResult<AttrOut> {
        if let Some(out) = self.deferred_attr(ino) {
            return Ok(out);
        }
        let fid = self.resolved_fid(ino).await?;
        self.valid_status(fid).await?;
        self.attr(fid)
    }

    /// Lists `dir` page by page. Every page is read at one data version; when all share
    /// one, the listing is that version's and is cached. When the directory changed
    /// between pages the listing is still whole for a directory stream, as POSIX allows
    /// one: the pages resume after the last name, so each entry present throughout
    /// appears once and one added or removed meanwhile may or may not. Such a listing is
    /// not cached, and nothing else needs it: lookups ask the server (`dir_entry`).
    async fn fetch_listing(&self, dir: Fid) -> FsResult<FetchedListing> {
        let mut first_version = None;
        let mut consistent = true;
        let mut entries = Vec::new();
        let mut after = None;
        let version = loop {
            let sent_at = Instant::now();
            let request = Request::ReadDir {
                dir,
                after: after.clone(),
                count_max: READDIR_PAGE,
            };
            let (status, callback, page, more) = match self.call(dir.volume, request).await? {
                Response::DirPage {
                    dir,
                    callback,
                    entries,
                    more,
                } => (dir, callback, entries, more),
                other => return Err(unexpected(&other)),
            };
            let version = status.data_version;
            if *first_version.get_or_insert(version) != version {
                consistent = false;
            }
            self.absorb(status, callback, sent_at);
            after = page.last().map(|e| e.name.clone());
            entries.extend(page);
            if entries.len() > LISTING_ENTRIES_MAX {
                warn!(%dir, "directory has more than {LISTING_ENTRIES_MAX} entries; refusing to list it");
                return Err(FsError::EFBIG);
            }
            if !more || after.is_none() {
                break version;
            }
        };
        if !consistent {
            debug!(%dir, entries = entries.len(), "directory changed while listing; the stream shows it as it went");
        }
        let listing = Listing::new(version, entries);
        if consistent {
            self.state.lock().statuses.set_listing(dir, listing.clone());
        }
        Ok(FetchedListing {
            listing,
            consistent,
        })
    }

    /// One name of a directory: from the cached listing when it is current; from a
    /// fetched listing when the directory fits in one page (so later lookups need no
    /// RPC); otherwise, or when the directory changed while being listed, asked of the
    /// server by name. A large busy directory is never listed for a lookup or a create;
    /// nor is one whose listing waits for this client's changes in flight (answered out
    /// of order, `listing::apply_own_change`): it is current again once they are in.
    pub(super) async fn dir_entry(&self, dir: Fid, name: &str) -> FsResult<Option<ListEntry>> {
        let small = {
            let state = self.state.lock();
            let entry = state.statuses.get(dir);
            let now = Instant::now();
            if let Some(listing) = entry.and_then(|e| e.fresh_listing(now)) {
                return Ok(listing.get(name));
            }
            let waiting = entry.is_some_and(|e| e.callback_valid(now) && e.listing.is_some());
            let listed_max =
                (READDIR_PAGE as u64).min(state.statuses.budget().listing_entries_max as u64 / 4);
            !waiting && entry.is_some_and(|e| e.status.size <= listed_max)
        };
        if small {
            let fetched = self.fetch_listing(dir).await?;
            if fetched.consistent {
                return Ok(fetched.listing.get(name));
            }
        }
        self.lookup_by_name(dir, name).await
    }

    /// Asks the server for one name of `dir`; `None` when there is no such entry.
    async fn lookup_by_name(&self, dir: Fid, name: &str) -> FsResult<Option<ListEntry>> {
        let sent_at = Instant::now();
        let request = Request::Lookup {
            dir,
            name: name.to_owned(),
        };
        let (status, callback, dir_status) = match self.call(dir.volume, request).await {
            Ok(Response::Entry {
                status,
                callback,
                dir,
            }) => (status, callback, dir),
            Ok(other) => return Err(unexpected(&other)),
            Err(FsError::ENOENT) => return Ok(None),
            Err(e) => return Err(e),
        };
        let entry = ListEntry {
            fid: status.fid,
            kind: status.kind,
        };
        self.absorb(dir_status, None, sent_at);
        self.absorb(status, callback, sent_at);
        Ok(Some(entry))
    }

    /// A symlink's target or a mount point's content.
    pub(super) async fn content(&self, fid: Fid) -> FsResult<Vec<u8>> {
        let status = self.valid_status(fid).await?;
        if let Some((version, content)) = self
            .state
            .lock()
            .statuses
            .get(fid)
            .and_then(|e| e.content.clone())
            && version == status.data_version
        {
            return Ok(content);
        }
        let sent_at = Instant::now();
        let request = Request::FetchData {
            fid,
            offset: 0,
            length: CONTENT_BYTES_MAX,
        };
        let fetched = self
            .call(fid.volume, request)
            .await?
            .into_fetched()
            .map_err(|other| unexpected(&other))?;
        let (status, callback, data) = (fetched.status, fetched.callback, fetched.data.to_vec());
        let version = status.data_version;
        self.absorb(status, callback, sent_at);
        if let Some(entry) = self.state.lock().statuses.get_mut(fid)
            && entry.status.data_version == version
        {
            entry.content = Some((version, data.clone()));
        }
        Ok(data)
    }

    pub(super) async fn mount_target(&self, mount_point: Fid) -> FsResult<Fid> {
        let content = self.content(mount_point).await?;
        let Some(name) = parse_mount_point(&content) else {
            warn!(fid = %mount_point, "mount point with unreadable content");
            return Err(FsError::EIO);
        };
        let location = self
            .volumes
            .by_name(&self.vldb, &name)
            .await
            .map_err(|e| rpc_error(&e))?;
        Ok(Fid::root(location.id))
    }

    pub async fn lookup(&self, parent: Ino, name: &OsStr) -> FsResult<AttrOut> {
        let name = entry_name(name)?;
        let dir = self.fid(parent)?;
        if let Some(out) = self.deferred_entry(dir, &name) {
            return Ok(out);
        }
        let entry = self.dir_entry(dir, &name).await?.ok_or(FsError::ENOENT)?;
        let fid = if entry.kind == FileKind::MountPoint {
            self.mount_target(entry.fid).await?
        } else {
            entry.fid
        };
        self.valid_status(fid).await?;
        self.entry_attr(fid)
    }

    async fn snapshot(&self, ino: Ino) -> FsResult<Arc<DirSnapshot>> {
        let dir = self.fid(ino)?;
        // A listing shows what the server holds: the files deferred here are made first.
        self.create_deferred_in(dir).await?;
        let listing = {
            let state = self.state.lock();
            state
                .statuses
                .get(dir)
                .and_then(|e| e.fresh_listing(Instant::now()))
                .cloned()
        };
        let listing = match listing {
            Some(listing) => listing,
            None => self.fetch_listing(dir).await?.listing,
        };
        let mut state = self.state.lock();
        let mut entries = Vec::with_capacity(listing.len() + 2);
        entries.push((".".to_owned(), ino, NodeKind::Directory));
        entries.push(("..".to_owned(), Ino::ROOT, NodeKind::Directory));
        for (name, entry) in listing.iter() {
            let child = state.inodes.ino_for(entry.fid);
            entries.push((name.to_owned(), child, entry.kind.into()));
        }
        Ok(Arc::new(DirSnapshot { entries }))
    }

    pub async fn opendir(&self, ino: Ino) -> FsResult<u64> {
        let snapshot = self.snapshot(ino).await?;
        let mut handles = self.dir_handles.lock();
        if handles.open.len() >= DIR_HANDLES_MAX {
            return Err(FsError::EMFILE);
        }
        handles.next += 1;
        let handle = handles.next;
        handles.open.insert(handle, snapshot);
        Ok(handle)
    }

    /// The stream's snapshot; reading from offset 0 (rewinddir) takes a fresh one.
    pub async fn readdir(&self, ino: Ino, handle: u64, offset: u64) -> FsResult<Arc<DirSnapshot>> {
        if offset != 0
            && let Some(snapshot) = self.dir_handles.lock().open.get(&handle).cloned()
        {
            return Ok(snapshot);
        }
        let snapshot = self.snapshot(ino).await?;
        let mut handles = self.dir_handles.lock();
        if let Some(slot) = handles.open.get_mut(&handle) {
            *slot = snapshot.clone();
        }
        Ok(snapshot)
    }

    pub fn releasedir(&self, handle: u64) {
        self.dir_handles.lock().open.remove(&handle);
    }

    /// Sends `request`, which makes the entry `name` in `dir`, and applies its answer.
    /// The reply hands the entry to the kernel: its lookup is counted.
    async fn make_entry(&self, dir: Fid, name: &str, request: Request) -> FsResult<AttrOut> {
        self.create_deferred_named(dir, name).await?;
        let sent_at = Instant::now();
        let response = self.call(dir.volume, request).await?;
        let fid = self.absorb_entry_status(response, name, sent_at)?;
        self.entry_attr(fid)
    }

    /// Applies the answer to a call that made the entry `name` (no lookup counted).
    pub(super) fn absorb_entry(
        &self,
        response: Response,
        name: &str,
        sent_at: Instant,
    ) -> FsResult<AttrOut> {
        let fid = self.absorb_entry_status(response, name, sent_at)?;
        self.attr(fid)
    }

    pub(super) fn absorb_entry_status(
        &self,
        response: Response,
        name: &str,
        sent_at: Instant,
    ) -> FsResult<Fid> {
        let (status, callback, dir) = match response {
            Response::Entry {
                status,
                callback,
                dir,
            } => (status, callback, dir),
            other => return Err(unexpected(&other)),
        };
        let fid = status.fid;
        let change = DirChange::Insert {
            name: name.to_owned(),
            entry: ListEntry {
                fid,
                kind: status.kind,
            },
        };
        self.state
            .lock()
            .statuses
            .apply_own_dir_change(dir, &[change]);
        self.absorb(status, callback, sent_at);
        Ok(fid)
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn create(
        &self,
        parent: Ino,
        name: &OsStr,
        mode: u32,
        uid: u32,
        gid: u32,
        exclusive: bool,
    ) -> FsResult<AttrOut> {
        let name = entry_name(name)?;
        let dir = self.fid(parent)?;
        let mode = mode & 0o7777;
        if !exclusive && let Some(out) = self.defer_create(dir, &name, mode, uid, gid) {
            return Ok(out);
        }
        if exclusive && let Some(out) = self.create_made(dir, &name, mode, uid, gid).await? {
            return Ok(out);
        }
        self.make_file(dir, &name, mode, uid, gid, exclusive).await
    }

    /// Makes the regular file `name` in `dir` on the server now, as `mknod` asks
    /// (exclusive, and no open follows: nothing to defer).
    pub async fn make_regular(
        &self,
        parent: Ino,
        name: &OsStr,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> FsResult<AttrOut> {
        let name = entry_name(name)?;
        let dir = self.fid(parent)?;
        self.make_file(dir, &name, mode & 0o7777, uid, gid, true)
            .await
    }

    async fn make_file(
        &self,
        dir: Fid,
        name: &str,
        mode: u32,
        uid: u32,
        gid: u32,
        exclusive: bool,
    ) -> FsResult<AttrOut> {
        let request = Request::Create {
            dir,
            name: name.to_owned(),
            mode,
            uid,
            gid,
            exclusive,
        };
        let out = self.make_entry(dir, name, request).await?;
        self.note_new_file(out.attr.ino);
        Ok(out)
    }

    /// The entry of `fid`, which a create just made, its lookup counted.
    pub(super) fn created_entry(&self, fid: Fid) -> FsResult<AttrOut> {
        let out = self.entry_attr(fid)?;
        self.note_new_file(out.attr.ino);
        Ok(out)
    }

    /// The kernel has no pages of a new file, so they reflect its version vacuously;
    /// saying so lets the pages its writes leave behind survive the next open.
    fn note_new_file(&self, ino: Ino) {
        let mut state = self.state.lock();
        if let Some(fid) = state.inodes.fid(ino)
            && let Some(entry) = state.statuses.get_mut(fid)
            && entry.kernel_version.is_none()
        {
            entry.kernel_version = Some(entry.status.data_version);
        }
    }

    pub async fn mkdir(
        &self,
        parent: Ino,
        name: &OsStr,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> FsResult<AttrOut> {
        let name = entry_name(name)?;
        let dir = self.fid(parent)?;
        let request = Request::MakeDir {
            dir,
            name: name.clone(),
            mode: mode & 0o7777,
            uid,
            gid,
        };
        self.make_entry(dir, &name, request).await
    }

    /// The kernel opened `ino` (an `open` or `create` it was answered).
    pub fn opened(&self, ino: Ino) {
        let mut state = self.state.lock();
        if let Some(fid) = state.inodes.fid(ino)
            && !self.deferred_opened(fid, 1)
        {
            state.statuses.opened(fid);
        }
    }

    /// The kernel released one open of `ino`.
    pub fn released(&self, ino: Ino) {
        let mut state = self.state.lock();
        if let Some(fid) = state.inodes.fid(ino)
            && !self.deferred_opened(fid, -1)
        {
            state.statuses.released(fid);
        }
    }

    /// Makes a special file (`kind` a FIFO, socket or device node).
    pub async fn mknod(
        &self,
        parent: Ino,
        name: &OsStr,
        kind: FileKind,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> FsResult<AttrOut> {
        let name = entry_name(name)?;
        let dir = self.fid(parent)?;
        let request = Request::MakeNode {
            dir,
            name: name.clone(),
            kind,
            mode: mode & 0o7777,
            uid,
            gid,
        };
        self.make_entry(dir, &name, request).await
    }

    pub async fn symlink(
        &self,
        parent: Ino,
        name: &OsStr,
        target: &std::path::Path,
        uid: u32,
        gid: u32,
    ) -> FsResult<AttrOut> {
        let name = entry_name(name)?;
        let target = target.to_str().ok_or(FsError::EINVAL)?.to_owned();
        let dir = self.fid(parent)?;
        let request = Request::Symlink {
            dir,
            name: name.clone(),
            target,
            uid,
            gid,
        };
        self.make_entry(dir, &name, request).await
    }

    pub async fn link(&self, ino: Ino, new_parent: Ino, new_name: &OsStr) -> FsResult<AttrOut> {
        let name = entry_name(new_name)?;
        let target = self.resolved_fid(ino).await?;
        let dir = self.fid(new_parent)?;
        if target.volume != dir.volume {
            return Err(FsError::EXDEV);
        }
        let request = Request::Link {
            dir,
            name: name.clone(),
            target,
        };
        self.make_entry(dir, &name, request).await
    }

    pub async fn remove(&self, parent: Ino, name: &OsStr, directory: bool) -> FsResult<()> {
        let name = entry_name(name)?;
        let dir = self.fid(parent)?;
        self.create_deferred_named(dir, &name).await?;
        let sent_at = Instant::now();
        let request = if directory {
            Request::RemoveDir {
                dir,
                name: name.clone(),
            }
        } else {
            Request::Remove {
                dir,
                name: name.clone(),
            }
        };
        let (dir_status, target) = match self.call(dir.volume, request).await? {
            Response::Removed { dir, target } => (dir, target),
            other => return Err(unexpected(&other)),
        };
        self.state
            .lock()
            .statuses
            .apply_own_dir_change(dir_status, &[DirChange::Remove { name }]);
        // A removed file's cached status and data stay, so an open descriptor keeps
        // reading what was cached.
        if let Some(target) = target {
            self.absorb(target, None, sent_at);
        }
        Ok(())
    }

    pub async fn rename(
        &self,
        parent: Ino,
        name: &OsStr,
        new_parent: Ino,
        new_name: &OsStr,
    ) -> FsResult<()> {
        let name = entry_name(name)?;
        let new_name = entry_name(new_name)?;
        let from_dir = self.fid(parent)?;
        let to_dir = self.fid(new_parent)?;
        if from_dir.volume != to_dir.volume {
            return Err(FsError::EXDEV);
        }
        self.create_deferred_named(from_dir, &name).await?;
        self.create_deferred_named(to_dir, &new_name).await?;
        let sent_at = Instant::now();
        let request = Request::Rename {
            from_dir,
            from_name: name.clone(),
            to_dir,
            to_name: new_name.clone(),
        };
        let (from_status, to_status, moved, replaced) =
            match self.call(from_dir.volume, request).await? {
                Response::Renamed {
                    from_dir,
                    to_dir,
                    moved,
                    replaced,
                } => (from_dir, to_dir, moved, replaced),
                other => return Err(unexpected(&other)),
            };
        let insert = DirChange::Insert {
            name: new_name,
            entry: ListEntry {
                fid: moved.fid,
                kind: moved.kind,
            },
        };
        let remove = DirChange::Remove { name };
        {
            let mut state = self.state.lock();
            if from_status.fid == to_status.fid {
                state
                    .statuses
                    .apply_own_dir_change(to_status, &[remove, insert]);
            } else {
                state.statuses.apply_own_dir_change(from_status, &[remove]);
                state.statuses.apply_own_dir_change(to_status, &[insert]);
            }
        }
        self.absorb(moved, None, sent_at);
        if let Some(replaced) = replaced {
            self.absorb(replaced, None, sent_at);
        }
        Ok(())
    }

    pub async fn readlink(&self, ino: Ino) -> FsResult<Vec<u8>> {
        let fid = self.resolved_fid(ino).await?;
        self.content(fid).await
    }

    pub async fn statfs(&self, ino: Ino) -> FsResult<VolumeSpace> {
        let fid = self.fid(ino)?;
        match self
            .call(fid.volume, Request::VolumeSpace { volume: fid.volume })
            .await?
        {
            Response::VolumeSpace(space) => Ok(space),
            other => Err(unexpected(&other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_point_content_names_a_volume() {
        assert_eq!(
            parse_mount_point(b"#root.cell."),
            Some(VolumeName::parse("root.cell").unwrap())
        );
        assert_eq!(
            parse_mount_point(b"%user.a."),
            Some(VolumeName::parse("user.a").unwrap())
        );
        assert_eq!(parse_mount_point(b"root.cell."), None);
        assert_eq!(parse_mount_point(b"#bad name."), None);
    }

    #[test]
    fn long_names_fail_before_any_rpc() {
        let long = "n".repeat(256);
        assert_eq!(
            entry_name(OsStr::new(&long)),
            Err(FsError::from_errno(libc::ENAMETOOLONG))
        );
        assert_eq!(entry_name(OsStr::new("ok")), Ok("ok".to_owned()));
    }
}
