//! The cache manager's core: answers filesystem operations from the status and chunk
//! caches under callback promises and goes to the fileserver only on a miss, a broken
//! callback or a change. FUSE threads and the control socket both call in here.
//! Invariant: the `state` lock is short and never held across an `.await`, and it is
//! taken before the chunk index lock, never after. Each file has a (striped) read-write
//! lock, which may be held across RPCs: reads and fetches ahead share it; writes,
//! write-backs and truncations hold it alone, so a truncation never races with a store
//! and no chunk is fetched while a write-back's stores are in flight. One chunk is
//! fetched by one request at a time, however many readers want it.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use proto::{
    CallbackGrant, DataVersion, ErrorCode, Fid, FileKind, ProtoError, Request, Response, ServerId,
    SetAttrs, VldbClient, VnodeStatus, VolumeId, VolumeName, VolumeSpace, WaitId, check_entry_name,
};
use tokio::sync::{OnceCell, RwLock, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

mod advisory;
mod attr;
mod fs_error;
#[cfg(test)]
mod pair_tests;
mod reclaim;

pub use advisory::LockRequest;
pub use attr::{Attr, AttrOut, NodeKind};
pub use fs_error::{FsError, FsResult, rpc_error};
use fs_error::{chunk_io_error, unexpected};

use crate::chunk_index::{CHUNK_BYTES, ChunkKey};
use crate::chunk_store::ChunkStore;
use crate::control::{ExamineInfo, ServerState};
use crate::held_locks::HeldLocks;
use crate::inode::{Ino, InodeTable};
use crate::invalidate::{Invalidation, Invalidator};
use crate::listing::{DirChange, ListEntry, Listing};
use crate::lock_waits::LockWaits;
use crate::readahead::ReadAhead;
use crate::server_pool::{CallbackSink, ReclaimFuture, RelocateFuture, ServerPool};
use crate::status::StatusTable;
use crate::volume::VolumeTable;

/// Longest the kernel may cache attributes and entries before asking again; breaks
/// invalidate sooner, this bounds the harm of a lost invalidation.
const KERNEL_TTL_MAX: Duration = Duration::from_secs(1);
/// Entries asked for per `ReadDir` page.
const READDIR_PAGE: u32 = 1024;
/// A directory larger than this is refused rather than held in memory.
const LISTING_ENTRIES_MAX: usize = 4_000_000;
/// Attempts to list a directory that keeps changing between pages.
const LISTING_ATTEMPTS: usize = 3;
/// Largest symlink target or mount point content read.
const CONTENT_BYTES_MAX: u32 = 64 * 1024;
/// Stripes of the per-file data lock.
const FILE_LOCK_STRIPES: usize = 64;
/// Directory streams open at once.
const DIR_HANDLES_MAX: usize = 65_536;
/// Evicted fids collected before their callbacks are given up in one request.
const GIVE_UP_BATCH: usize = 64;
/// How long `fs checkservers` waits for a ping.
const PING_TIMEOUT_MAX: Duration = Duration::from_secs(2);
/// `StoreData` requests of one write-back in flight at once: enough that the next
/// store is on the wire while the server writes one. More buys nothing: the server's
/// writes into one file take that file's inode lock in turn (profiled: with 8 stores of
/// one chunk, its writers spent 8% of the CPU spinning on it).
const STORES_IN_FLIGHT_MAX: usize = 2;
/// Most bytes one `StoreData` carries: whole chunks. The server commits every store's
/// metadata durably on its own (or shares a commit with the stores queued behind it),
/// so fewer, larger stores mean fewer commits: profiled on a 256 MiB write-back, stores
/// of one chunk cost ~160 commits of `meta.redb`, most of the write-back's time. Two
/// chunks, with two stores in flight, keep the bytes on one connection at once at
/// 4 MiB: the `--timeout` of the last store counts the sending of those ahead of it,
/// and callback breaks and lock pushes wait behind them. It must fit in a frame.
const STORE_BYTES_MAX: u64 = 2 * CHUNK_BYTES;
const _: () = assert!(
    STORE_BYTES_MAX >= CHUNK_BYTES
        && STORE_BYTES_MAX + 64 * 1024 <= proto::frame::FRAME_BYTES_MAX_DEFAULT as u64
);
/// Chunks fetched ahead of a sequential reader (4 MiB).
const READ_AHEAD_CHUNKS: u64 = 4;
/// Fetches ahead in flight at once over all files; each holds a chunk in memory.
const PREFETCHES_MAX: usize = 8;

/// A directory as one `opendir` stream sees it: offsets index into `entries`.
#[derive(Debug)]
pub struct DirSnapshot {
    pub entries: Vec<(String, Ino, NodeKind)>,
}

struct CacheState {
    inodes: InodeTable,
    statuses: StatusTable,
}

#[derive(Default)]
struct DirHandles {
    open: HashMap<u64, Arc<DirSnapshot>>,
    next: u64,
}

/// Settings the manager needs from `Config`.
pub struct ManagerSettings {
    pub root_volume: VolumeName,
    pub chunk_dir: std::path::PathBuf,
    pub cache_bytes_max: u64,
    /// How often the lease is renewed on servers where a lock is held or awaited.
    pub lease_renew_interval: Duration,
}

/// A chunk's bytes as one fetch returned them, shared by every reader that waited for it.
#[derive(Clone, Debug)]
struct FetchedChunk {
    data: Arc<Vec<u8>>,
    version: DataVersion,
}

/// The one fetch of a chunk in flight; latecomers wait on it rather than fetch again.
type ChunkFetch = Arc<OnceCell<FetchedChunk>>;

pub struct Manager {
    /// Lets `&self` methods start tasks (fetches ahead) that outlive the call.
    this: Weak<Manager>,
    vldb: VldbClient,
    volumes: VolumeTable,
    pool: Arc<ServerPool>,
    state: Mutex<CacheState>,
    chunks: ChunkStore,
    file_locks: Vec<RwLock<()>>,
    /// Fetches in flight by chunk. Bounded: an entry lives only while a FUSE thread or a
    /// fetch ahead (at most `PREFETCHES_MAX`) is fetching it.
    fetches: Mutex<HashMap<ChunkKey, ChunkFetch>>,
    read_ahead: Mutex<ReadAhead>,
    prefetch_slots: Arc<Semaphore>,
    /// Files with stores acknowledged but not yet made durable by `Fsync`. Bounded by
    /// the files written since their last close.
    unsynced: Mutex<HashSet<Fid>>,
    invalidator: Invalidator,
    dir_handles: Mutex<DirHandles>,
    evicted: Mutex<Vec<Fid>>,
    /// Advisory locks granted to this client's lock owners.
    held_locks: Mutex<HeldLocks>,
    lock_waits: LockWaits,
    /// Per server, the fids whose callbacks were held when its connection ended, to be
    /// reclaimed on the next one. Bounded by the status table.
    reclaim_owed: Mutex<HashMap<ServerId, HashSet<Fid>>>,
    runtime: tokio::runtime::Handle,
}

/// Checks a name from the kernel before any RPC: 256 bytes is `ENAMETOOLONG`.
pub fn entry_name(name: &OsStr) -> FsResult<String> {
    let Some(text) = name.to_str() else {
        return Err(FsError::EINVAL);
    };
    check_entry_name(text).map_err(|code| FsError::from_errno(code.errno()))?;
    Ok(text.to_owned())
}

/// A mount point's content (`#name.` or `%name.`) to the volume it shows.
pub fn parse_mount_point(content: &[u8]) -> Option<VolumeName> {
    let text = std::str::from_utf8(content).ok()?;
    let text = text.strip_prefix(['#', '%'])?;
    let text = text.strip_suffix('.').unwrap_or(text);
    VolumeName::parse(text).ok()
}

/// Splits a file's dirty chunks, given as `(index, len)` in index order, into the runs
/// one `StoreData` each carries: adjacent chunks of which all but the last are full (so
/// the run is one contiguous range of the file), at most `STORE_BYTES_MAX` in all.
fn store_runs(chunks: &[(u64, u64)]) -> Vec<std::ops::Range<usize>> {
    let mut runs = Vec::new();
    let mut start = 0;
    for i in 1..=chunks.len() {
        let ends_run = match chunks.get(i) {
            None => true,
            Some(&(index, _)) => {
                let (previous_index, previous_len) = chunks[i - 1];
                index != previous_index + 1
                    || previous_len != CHUNK_BYTES
                    || (i + 1 - start) as u64 * CHUNK_BYTES > STORE_BYTES_MAX
            }
        };
        if ends_run {
            runs.push(start..i);
            start = i;
        }
    }
    runs
}

impl Manager {
    /// Finds the root volume, opens the caches and warms the root's status.
    pub async fn start(
        settings: ManagerSettings,
        vldb: VldbClient,
        pool: Arc<ServerPool>,
        invalidator: Invalidator,
    ) -> Result<Arc<Manager>, crate::CacheError> {
        let volumes = VolumeTable::default();
        let root = volumes
            .by_name(&vldb, &settings.root_volume)
            .await
            .map_err(|source| match source {
                ProtoError::Remote(ErrorCode::NoSuchVolume) => crate::CacheError::NoSuchVolume {
                    volume: settings.root_volume.to_string(),
                },
                e if e.is_transport() => crate::CacheError::VldbUnreachable {
                    cell: vldb.cell().name.clone(),
                    addresses: vldb.cell().vlservers.join(", "),
                    source: e,
                },
                e => crate::CacheError::Vldb {
                    volume: settings.root_volume.to_string(),
                    source: e,
                },
            })?;
        let chunks = ChunkStore::open(settings.chunk_dir.clone(), settings.cache_bytes_max)
            .map_err(|source| crate::CacheError::CacheDir {
                path: settings.chunk_dir.clone(),
                source,
            })?;
        let root_fid = Fid::root(root.id);
        let manager = Arc::new_cyclic(|this| Manager {
            this: this.clone(),
            vldb,
            volumes,
            pool,
            state: Mutex::new(CacheState {
                inodes: InodeTable::new(root_fid),
                statuses: StatusTable::default(),
            }),
            chunks,
            file_locks: (0..FILE_LOCK_STRIPES).map(|_| RwLock::new(())).collect(),
            fetches: Mutex::new(HashMap::new()),
            read_ahead: Mutex::new(ReadAhead::new(READ_AHEAD_CHUNKS)),
            prefetch_slots: Arc::new(Semaphore::new(PREFETCHES_MAX)),
            unsynced: Mutex::new(HashSet::new()),
            invalidator,
            dir_handles: Mutex::new(DirHandles::default()),
            evicted: Mutex::new(Vec::new()),
            held_locks: Mutex::new(HeldLocks::default()),
            lock_waits: LockWaits::default(),
            reclaim_owed: Mutex::new(HashMap::new()),
            runtime: tokio::runtime::Handle::current(),
        });
        manager.spawn_lease_renewal(settings.lease_renew_interval);
        let sink: Arc<dyn CallbackSink> = manager.clone();
        manager.pool.set_sink(Arc::downgrade(&sink));
        info!(volume = %settings.root_volume, id = %root.id, servers = ?root.addresses, "root volume located");
        if let Err(e) = manager.fetch_status(root_fid).await {
            // Not fatal: the mount retries on every access and recovers by itself.
            warn!(
                "root volume's fileserver is not answering yet ({}); mounting anyway",
                e
            );
        }
        Ok(manager)
    }

    /// Runs an operation from a FUSE thread (which is not a runtime thread).
    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    fn fid(&self, ino: Ino) -> FsResult<Fid> {
        self.state.lock().inodes.fid(ino).ok_or(FsError::ESTALE)
    }

    fn file_lock(&self, fid: Fid) -> &RwLock<()> {
        let hash = fid
            .vnode
            .0
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(fid.volume.0 ^ u64::from(fid.unique.0));
        &self.file_locks[(hash as usize) % FILE_LOCK_STRIPES]
    }

    async fn call(&self, volume: VolumeId, request: Request) -> FsResult<Response> {
        let location = self.location(volume).await?;
        self.pool
            .call(&location, request)
            .await
            .map_err(|e| rpc_error(&e))
    }

    async fn location(&self, volume: VolumeId) -> FsResult<Arc<crate::volume::VolumeLocation>> {
        self.volumes
            .by_id(&self.vldb, volume)
            .await
            .map_err(|e| rpc_error(&e))
    }

    /// Records a status from any reply.
    fn absorb(&self, status: VnodeStatus, callback: Option<CallbackGrant>, sent_at: Instant) {
        let fid = status.fid;
        let version = status.data_version;
        let applied = self.state.lock().statuses.apply(status, callback, sent_at);
        if applied.version_changed {
            self.chunks.drop_stale(fid, version);
        }
    }

    /// Records the highest status returned by `changes` of this client's own stores or
    /// setattrs, all sent from `before`.
    fn absorb_own_data_change(
        &self,
        before: DataVersion,
        changes: u64,
        status: VnodeStatus,
        callback: Option<CallbackGrant>,
        sent_at: Instant,
    ) {
        let fid = status.fid;
        let after = status.data_version;
        if crate::status::only_own_changes(before, changes, after) {
            self.chunks.retag(fid, before, after);
        }
        let applied = self
            .state
            .lock()
            .statuses
            .apply_own_data_change(before, changes, status, callback, sent_at);
        if applied.version_changed {
            self.chunks.drop_stale(fid, after);
        }
    }

    async fn fetch_status(&self, fid: Fid) -> FsResult<VnodeStatus> {
        let sent_at = Instant::now();
        match self.call(fid.volume, Request::FetchStatus { fid }).await? {
            Response::Status { status, callback } => {
                self.absorb(status.clone(), callback, sent_at);
                Ok(status)
            }
            other => Err(unexpected(&other)),
        }
    }

    /// The status under a valid callback, revalidating when none is held.
    async fn valid_status(&self, fid: Fid) -> FsResult<VnodeStatus> {
        if let Some(entry) = self.state.lock().statuses.fresh(fid, Instant::now()) {
            return Ok(entry.status.clone());
        }
        self.fetch_status(fid).await
    }

    fn attr(&self, fid: Fid) -> FsResult<AttrOut> {
        let mut state = self.state.lock();
        let ino = state.inodes.ino_for(fid);
        let entry = state.statuses.get(fid).ok_or(FsError::EIO)?;
        Ok(AttrOut {
            attr: Attr::new(ino, &entry.status, entry.size()),
            ttl: entry.kernel_ttl(Instant::now(), KERNEL_TTL_MAX),
        })
    }

    pub async fn getattr(&self, ino: Ino) -> FsResult<AttrOut> {
        let fid = self.fid(ino)?;
        self.valid_status(fid).await?;
        self.attr(fid)
    }

    // ---- directories ----

    async fn fetch_listing(&self, dir: Fid) -> FsResult<Listing> {
        for _ in 0..LISTING_ATTEMPTS {
            let sent_at = Instant::now();
            let mut first: Option<(VnodeStatus, Option<CallbackGrant>)> = None;
            let mut entries = Vec::new();
            let mut after = None;
            let mut consistent = true;
            loop {
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
                match &first {
                    Some((s, _)) if s.data_version != status.data_version => {
                        consistent = false;
                        break;
                    }
                    Some(_) => {}
                    None => first = Some((status, callback)),
                }
                after = page.last().map(|e| e.name.clone());
                entries.extend(page);
                if entries.len() > LISTING_ENTRIES_MAX {
                    warn!(%dir, "directory has more than {LISTING_ENTRIES_MAX} entries; refusing to list it");
                    return Err(FsError::EFBIG);
                }
                if !more || after.is_none() {
                    break;
                }
            }
            if !consistent {
                debug!(%dir, "directory changed while listing; starting over");
                continue;
            }
            let Some((status, callback)) = first else {
                return Err(FsError::EIO);
            };
            let listing = Listing::new(status.data_version, entries);
            self.absorb(status, callback, sent_at);
            self.state.lock().statuses.set_listing(dir, listing.clone());
            return Ok(listing);
        }
        Err(FsError::EAGAIN)
    }

    /// One name of a directory, from the cached listing when it is current.
    async fn dir_entry(&self, dir: Fid, name: &str) -> FsResult<Option<ListEntry>> {
        {
            let state = self.state.lock();
            if let Some(listing) = state
                .statuses
                .get(dir)
                .and_then(|e| e.fresh_listing(Instant::now()))
            {
                return Ok(listing.get(name));
            }
        }
        Ok(self.fetch_listing(dir).await?.get(name))
    }

    /// A symlink's target or a mount point's content.
    async fn content(&self, fid: Fid) -> FsResult<Vec<u8>> {
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
        let (status, callback, data) = match self.call(fid.volume, request).await? {
            Response::Data {
                status,
                callback,
                data,
            } => (status, callback, data),
            other => return Err(unexpected(&other)),
        };
        let version = status.data_version;
        self.absorb(status, callback, sent_at);
        if let Some(entry) = self.state.lock().statuses.get_mut(fid)
            && entry.status.data_version == version
        {
            entry.content = Some((version, data.clone()));
        }
        Ok(data)
    }

    async fn mount_target(&self, mount_point: Fid) -> FsResult<Fid> {
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
        let entry = self.dir_entry(dir, &name).await?.ok_or(FsError::ENOENT)?;
        let fid = if entry.kind == FileKind::MountPoint {
            self.mount_target(entry.fid).await?
        } else {
            entry.fid
        };
        self.valid_status(fid).await?;
        self.attr(fid)
    }

    async fn snapshot(&self, ino: Ino) -> FsResult<Arc<DirSnapshot>> {
        let dir = self.fid(ino)?;
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
            None => self.fetch_listing(dir).await?,
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

    // ---- changes to directories ----

    /// Sends `request`, which makes the entry `name` in `dir`, and applies its answer.
    async fn make_entry(&self, dir: Fid, name: &str, request: Request) -> FsResult<AttrOut> {
        let sent_at = Instant::now();
        let response = self.call(dir.volume, request).await?;
        self.absorb_entry(response, name, sent_at)
    }

    fn absorb_entry(&self, response: Response, name: &str, sent_at: Instant) -> FsResult<AttrOut> {
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
        self.attr(fid)
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
        let request = Request::Create {
            dir,
            name: name.clone(),
            mode: mode & 0o7777,
            uid,
            gid,
            exclusive,
        };
        let out = self.make_entry(dir, &name, request).await?;
        // The kernel has no pages of a new file, so they reflect its version vacuously;
        // saying so lets the pages its writes leave behind survive the next open.
        let mut state = self.state.lock();
        if let Some(fid) = state.inodes.fid(out.attr.ino)
            && let Some(entry) = state.statuses.get_mut(fid)
            && entry.kernel_version.is_none()
        {
            entry.kernel_version = Some(entry.status.data_version);
        }
        drop(state);
        Ok(out)
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
        let target = self.fid(ino)?;
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
        let fid = self.fid(ino)?;
        self.content(fid).await
    }

    // ---- file data ----

    pub async fn setattr(&self, ino: Ino, attrs: SetAttrs) -> FsResult<AttrOut> {
        let fid = self.fid(ino)?;
        let _file = self.file_lock(fid).write().await;
        let size = attrs.size;
        if size.is_some() {
            // Store what was written before cutting, so the server sees writes in order.
            self.write_back(fid).await?;
        }
        let before = self.valid_status(fid).await?.data_version;
        let sent_at = Instant::now();
        let (status, callback) = match self
            .call(fid.volume, Request::SetAttr { fid, attrs })
            .await?
        {
            Response::Status { status, callback } => (status, callback),
            other => return Err(unexpected(&other)),
        };
        self.absorb_own_data_change(before, 1, status, callback, sent_at);
        if let Some(size) = size {
            self.chunks.truncate(fid, size).map_err(chunk_io_error)?;
            if let Some(entry) = self.state.lock().statuses.get_mut(fid) {
                entry.local_size = None;
            }
        }
        self.attr(fid)
    }

    /// Opens a file; `true` when the kernel may keep its cached pages (the data version
    /// is the one its pages were read at).
    pub async fn open(&self, ino: Ino) -> FsResult<bool> {
        let fid = self.fid(ino)?;
        let status = self.valid_status(fid).await?;
        let mut state = self.state.lock();
        let entry = state.statuses.get_mut(fid).ok_or(FsError::EIO)?;
        let keep = entry.kernel_version == Some(status.data_version) || entry.local_size.is_some();
        entry.kernel_version = Some(entry.status.data_version);
        Ok(keep)
    }

    /// Fetches a chunk from the server and caches it, joining the fetch already in
    /// flight for it if there is one. `version` is the one the caller found missing.
    async fn fetch_chunk(&self, key: ChunkKey, version: DataVersion) -> FsResult<FetchedChunk> {
        let fetch = self.fetches.lock().entry(key).or_default().clone();
        // A failed fetch leaves the cell empty: the next waiter tries again itself.
        let result = fetch
            .get_or_try_init(|| self.fetch_chunk_once(key, version))
            .await
            .cloned();
        let mut fetches = self.fetches.lock();
        if fetches.get(&key).is_some_and(|f| Arc::ptr_eq(f, &fetch)) {
            fetches.remove(&key);
        }
        result
    }

    async fn fetch_chunk_once(
        &self,
        key: ChunkKey,
        version: DataVersion,
    ) -> FsResult<FetchedChunk> {
        // A fetch that finished between the caller's miss and its joining is no longer
        // in flight, but its chunk is cached (it is cached before it leaves the table).
        if let Some(data) = self
            .chunks
            .read_chunk(key, version)
            .map_err(chunk_io_error)?
        {
            return Ok(FetchedChunk {
                data: Arc::new(data),
                version,
            });
        }
        let fid = key.fid;
        let sent_at = Instant::now();
        let request = Request::FetchData {
            fid,
            offset: key.offset(),
            length: CHUNK_BYTES as u32,
        };
        let (status, callback, mut data) = match self.call(fid.volume, request).await? {
            Response::Data {
                status,
                callback,
                data,
            } => (status, callback, data),
            other => return Err(unexpected(&other)),
        };
        data.truncate(CHUNK_BYTES as usize);
        let version = status.data_version;
        self.absorb(status, callback, sent_at);
        // Cached before it leaves the fetch table; its file is written off this path.
        let data = Arc::new(data);
        let emptied = self.chunks.insert_fetched(key, version, data.clone());
        self.note_evicted(emptied);
        Ok(FetchedChunk { data, version })
    }

    /// Starts fetches of the chunks `indexes` of a file being read sequentially, so
    /// they arrive while the reader consumes the earlier ones. Chunks cached at
    /// `version` or already in flight are skipped; when every slot is taken the rest
    /// are left to the reader.
    fn fetch_ahead(&self, fid: Fid, version: DataVersion, indexes: std::ops::Range<u64>) {
        let Some(this) = self.this.upgrade() else {
            return;
        };
        for index in indexes {
            let key = ChunkKey { fid, index };
            if self.chunks.holds(key, version) || self.fetches.lock().contains_key(&key) {
                continue;
            }
            let Ok(slot) = self.prefetch_slots.clone().try_acquire_owned() else {
                return;
            };
            let this = this.clone();
            self.runtime.spawn(async move {
                let _slot = slot;
                // Never wait for the file lock: a writer queued for it must not wait
                // behind a fetch ahead, and a reader may be waiting on this fetch.
                let Ok(_file) = this.file_lock(fid).try_read() else {
                    return;
                };
                if this.chunks.holds(key, version) {
                    return;
                }
                if let Err(e) = this.fetch_chunk(key, version).await {
                    debug!(%fid, index, error = %e, "fetch ahead failed; the reader will fetch");
                }
            });
        }
    }

    pub async fn read(&self, ino: Ino, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let fid = self.fid(ino)?;
        let _file = self.file_lock(fid).read().await;
        let status = self.valid_status(fid).await?;
        let file_size = self
            .state
            .lock()
            .statuses
            .get(fid)
            .map_or(status.size, |e| e.size());
        if offset >= file_size {
            return Ok(Vec::new());
        }
        let end = file_size.min(offset + u64::from(size));
        let ahead = self
            .read_ahead
            .lock()
            .on_read(fid, offset, end - offset, status.size);
        if !ahead.is_empty() {
            self.fetch_ahead(fid, status.data_version, ahead);
        }
        let mut out = Vec::with_capacity((end - offset) as usize);
        let mut version = status.data_version;
        let mut pos = offset;
        while pos < end {
            let key = ChunkKey {
                fid,
                index: pos / CHUNK_BYTES,
            };
            let within = pos - key.offset();
            let n = (CHUNK_BYTES - within).min(end - pos) as usize;
            if self
                .chunks
                .read_into(key, version, within, n, &mut out)
                .map_err(chunk_io_error)?
            {
                // Served from the cache.
            } else if key.offset() >= status.size {
                // Past the server's end, before later local writes: a hole.
                out.resize(out.len() + n, 0);
            } else {
                // Copy straight from the fetched bytes, not back from the cache file.
                let fetched = self.fetch_chunk(key, version).await?;
                version = fetched.version;
                let data = &fetched.data;
                let start = (within as usize).min(data.len());
                let available = (data.len() - start).min(n);
                out.extend_from_slice(&data[start..start + available]);
                out.resize(out.len() + (n - available), 0);
            }
            pos += n as u64;
        }
        Ok(out)
    }

    pub async fn write(&self, ino: Ino, offset: u64, data: &[u8]) -> FsResult<u32> {
        let fid = self.fid(ino)?;
        let _file = self.file_lock(fid).write().await;
        let status = self.valid_status(fid).await?;
        let mut pos = 0usize;
        while pos < data.len() {
            let at = offset + pos as u64;
            let key = ChunkKey {
                fid,
                index: at / CHUNK_BYTES,
            };
            let within = at - key.offset();
            let n = (CHUNK_BYTES - within).min((data.len() - pos) as u64) as usize;
            let piece = &data[pos..pos + n];
            if !self
                .chunks
                .write(key, status.data_version, within, piece)
                .map_err(chunk_io_error)?
            {
                // Not cached: start from the server's bytes unless the write replaces
                // every byte the chunk holds there.
                let existing = status.size.saturating_sub(key.offset()).min(CHUNK_BYTES);
                let replaces_all = within == 0 && n as u64 >= existing;
                let assembled;
                let chunk: &[u8] = if replaces_all {
                    // The piece is the whole chunk: cache it as it is, with no copy.
                    piece
                } else {
                    let mut chunk = if existing == 0 {
                        Vec::new()
                    } else {
                        Arc::unwrap_or_clone(self.fetch_chunk(key, status.data_version).await?.data)
                    };
                    let end = within as usize + n;
                    if chunk.len() < end {
                        chunk.resize(end, 0);
                    }
                    chunk[within as usize..end].copy_from_slice(piece);
                    assembled = chunk;
                    &assembled
                };
                let version = self
                    .state
                    .lock()
                    .statuses
                    .get(fid)
                    .map_or(status.data_version, |e| e.status.data_version);
                let emptied = self
                    .chunks
                    .insert(key, version, chunk, true)
                    .map_err(chunk_io_error)?;
                self.note_evicted(emptied);
            }
            pos += n;
        }
        if let Some(entry) = self.state.lock().statuses.get_mut(fid) {
            let end = offset + data.len() as u64;
            entry.local_size = Some(entry.size().max(end));
        }
        // Cache filling with unstored writes: store this file's now, so clean chunks can
        // be evicted and a file larger than the cache streams through it.
        if self.chunks.dirty_bytes() > self.chunks.bytes_max() / 2 {
            self.write_back(fid).await?;
        }
        Ok(data.len() as u32)
    }

    /// Stores every dirty chunk of `fid`, adjacent ones together (`store_runs`), up to
    /// `STORES_IN_FLIGHT_MAX` stores at once (they are disjoint ranges, so their order
    /// does not matter). The caller holds the file lock exclusively, so nothing else
    /// changes the file's chunks meanwhile. The stores are acknowledged, not yet
    /// durable: `sync` makes them so.
    async fn write_back(&self, fid: Fid) -> FsResult<()> {
        let dirty = self.chunks.dirty_chunks(fid);
        if dirty.is_empty() {
            return Ok(());
        }
        let extents: Vec<(u64, u64)> = dirty.iter().map(|(k, m)| (k.index, m.len)).collect();
        let before = self.valid_status(fid).await?.data_version;
        let location = self.location(fid.volume).await?;
        // The callbacks of every reply are counted from here, which errs early.
        let sent_at = Instant::now();
        let mut pending = store_runs(&extents).into_iter();
        let mut in_flight = JoinSet::new();
        let mut stored = 0u64;
        let mut highest: Option<(VnodeStatus, Option<CallbackGrant>)> = None;
        let mut failure = None;
        loop {
            while failure.is_none() && in_flight.len() < STORES_IN_FLIGHT_MAX {
                let Some(run) = pending.next() else {
                    break;
                };
                let run = &dirty[run];
                let mut data = Vec::with_capacity(run.iter().map(|(_, m)| m.len as usize).sum());
                if let Some(e) = run
                    .iter()
                    .find_map(|(key, meta)| self.chunks.append_whole(*key, meta, &mut data).err())
                {
                    failure = Some(chunk_io_error(e));
                    break;
                }
                self.unsynced.lock().insert(fid);
                let request = Request::StoreData {
                    fid,
                    offset: run[0].0.offset(),
                    data,
                    truncate_to: None,
                };
                let keys: Vec<ChunkKey> = run.iter().map(|(key, _)| *key).collect();
                let (pool, location) = (self.pool.clone(), location.clone());
                in_flight.spawn(async move { (keys, pool.call(&location, request).await) });
            }
            // After a failure no store starts, but those in flight are awaited: none
            // may still be travelling when the caller goes on to truncate.
            let Some(joined) = in_flight.join_next().await else {
                break;
            };
            let (keys, result) = match joined {
                Ok(done) => done,
                Err(e) => {
                    warn!(%fid, error = %e, "a store task failed");
                    failure.get_or_insert(FsError::EIO);
                    continue;
                }
            };
            match result {
                Ok(Response::Status { status, callback }) => {
                    for key in keys {
                        let emptied = self.chunks.mark_clean(key, status.data_version);
                        self.note_evicted(emptied);
                    }
                    // Each store moves the version by one, whatever it carried.
                    stored += 1;
                    if highest
                        .as_ref()
                        .is_none_or(|(h, _)| h.data_version < status.data_version)
                    {
                        highest = Some((status, callback));
                    }
                }
                Ok(other) => {
                    failure.get_or_insert(unexpected(&other));
                }
                Err(e) => {
                    failure.get_or_insert(rpc_error(&e));
                }
            }
        }
        if let Some((status, callback)) = highest {
            self.absorb_own_data_change(before, stored, status, callback, sent_at);
        }
        if let Some(e) = failure {
            return Err(e);
        }
        if !self.chunks.has_dirty(fid)
            && let Some(entry) = self.state.lock().statuses.get_mut(fid)
        {
            entry.local_size = None;
        }
        Ok(())
    }

    /// Makes every acknowledged store of `fid` durable on the server with one `Fsync`.
    /// The caller holds the file lock exclusively.
    async fn sync(&self, fid: Fid) -> FsResult<()> {
        if !self.unsynced.lock().contains(&fid) {
            return Ok(());
        }
        let sent_at = Instant::now();
        match self.call(fid.volume, Request::Fsync { fid }).await? {
            Response::Status { status, callback } => self.absorb(status, callback, sent_at),
            other => return Err(unexpected(&other)),
        }
        self.unsynced.lock().remove(&fid);
        Ok(())
    }

    /// AFS close semantics: returns once the server holds every write durably.
    pub async fn flush(&self, ino: Ino) -> FsResult<()> {
        let fid = self.fid(ino)?;
        if !self.chunks.has_dirty(fid) && !self.unsynced.lock().contains(&fid) {
            return Ok(());
        }
        let _file = self.file_lock(fid).write().await;
        self.write_back(fid).await?;
        self.sync(fid).await
    }

    /// Stores every file's unstored writes durably (at unmount).
    pub async fn write_back_all(&self) {
        let mut fids: HashSet<Fid> = self.chunks.dirty_fids().into_iter().collect();
        fids.extend(self.unsynced.lock().iter().copied());
        for fid in fids {
            let _file = self.file_lock(fid).write().await;
            let result = match self.write_back(fid).await {
                Ok(()) => self.sync(fid).await,
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                warn!(%fid, error = %e, "could not store a file's writes before unmounting; they are lost");
            }
        }
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

    /// Batches fids whose last cached data was evicted and gives their callbacks up.
    fn note_evicted(&self, fids: Vec<Fid>) {
        if fids.is_empty() {
            return;
        }
        let batch = {
            let mut pending = self.evicted.lock();
            pending.extend(fids);
            if pending.len() < GIVE_UP_BATCH {
                return;
            }
            std::mem::take(&mut *pending)
        };
        let mut by_volume: HashMap<VolumeId, Vec<Fid>> = HashMap::new();
        {
            let mut state = self.state.lock();
            for fid in batch {
                // Only plain files with nothing unstored: directories keep their promises.
                let Some(entry) = state.statuses.get_mut(fid) else {
                    continue;
                };
                if entry.status.kind != FileKind::File || entry.local_size.is_some() {
                    continue;
                }
                entry.callback_until = None;
                by_volume.entry(fid.volume).or_default().push(fid);
            }
        }
        for (volume, fids) in by_volume {
            let Some(location) = self.volumes.cached(volume) else {
                continue;
            };
            let pool = self.pool.clone();
            // Detached: nobody waits for a courtesy message.
            self.runtime.spawn(async move {
                let request = Request::GiveUpCallbacks { fids };
                if let Err(e) = pool.call(&location, request).await {
                    debug!(error = %e, "giving up callbacks failed");
                }
            });
        }
    }

    // ---- control socket ----

    /// What this cache manager holds for `ino`; fetches the status only when none is
    /// cached, so a broken callback is reported as such rather than renewed.
    pub async fn examine(&self, ino: Ino) -> FsResult<ExamineInfo> {
        let fid = self.fid(ino)?;
        self.examine_fid(fid).await
    }

    /// `examine` for the entry `name` of directory `dir`, resolved through the cached
    /// listing (a mount point shows the volume root it leads to).
    pub async fn examine_entry(&self, dir: Ino, name: &str) -> FsResult<ExamineInfo> {
        let name = entry_name(OsStr::new(name))?;
        let dir = self.fid(dir)?;
        let entry = self.dir_entry(dir, &name).await?.ok_or(FsError::ENOENT)?;
        let fid = if entry.kind == FileKind::MountPoint {
            self.mount_target(entry.fid).await?
        } else {
            entry.fid
        };
        self.examine_fid(fid).await
    }

    async fn examine_fid(&self, fid: Fid) -> FsResult<ExamineInfo> {
        if self.state.lock().statuses.get(fid).is_none() {
            self.fetch_status(fid).await?;
        }
        let volume = self
            .volumes
            .by_id(&self.vldb, fid.volume)
            .await
            .map_err(|e| rpc_error(&e))?;
        let state = self.state.lock();
        let entry = state.statuses.get(fid).ok_or(FsError::EIO)?;
        let now = Instant::now();
        let callback_until = entry
            .callback_until
            .filter(|until| *until > now)
            .map(|until| (SystemTime::now() + (until - now)).into());
        Ok(ExamineInfo {
            fid,
            volume: volume.name.to_string(),
            kind: entry.status.kind,
            size: entry.size(),
            data_version: entry.status.data_version,
            callback_until,
            data_cached: self.chunks.has_fid(fid),
        })
    }

    pub async fn whereis(&self, ino: Ino) -> FsResult<(String, Vec<String>)> {
        let fid = self.fid(ino)?;
        let volume = self
            .volumes
            .by_id(&self.vldb, fid.volume)
            .await
            .map_err(|e| rpc_error(&e))?;
        Ok((volume.name.to_string(), volume.addresses.clone()))
    }

    /// Drops the cached data and status of one file (after storing its writes).
    pub async fn flush_cached(&self, ino: Ino) -> FsResult<()> {
        let fid = self.fid(ino)?;
        let _file = self.file_lock(fid).write().await;
        self.write_back(fid).await?;
        self.sync(fid).await?;
        self.chunks.drop_fid(fid);
        self.read_ahead.lock().forget(fid);
        let removed = self.state.lock().statuses.remove(fid);
        if removed.is_some() {
            self.invalidator.push(Invalidation::Inode(ino));
        }
        Ok(())
    }

    pub async fn check_servers(&self) -> Vec<ServerState> {
        let timeout = self.pool.rpc_timeout().min(PING_TIMEOUT_MAX);
        let mut states = Vec::new();
        for (server, addresses) in self.volumes.servers() {
            let up = self.pool.probe(server, &addresses, timeout).await;
            states.push(ServerState { addresses, up });
        }
        states
    }

    pub async fn make_mount(&self, dir_ino: Ino, name: &str, volume: &str) -> Result<(), String> {
        let errno_text = |e: FsError| e.to_string();
        let name = entry_name(OsStr::new(name)).map_err(errno_text)?;
        let volume = VolumeName::parse(volume).map_err(|e| e.to_string())?;
        match self.volumes.by_name(&self.vldb, &volume).await {
            Ok(_) => {}
            Err(ProtoError::Remote(ErrorCode::NoSuchVolume)) => {
                return Err(format!("volume {volume} does not exist in the VLDB"));
            }
            Err(e) => return Err(format!("cannot look volume {volume} up in the VLDB: {e}")),
        }
        let dir = self.fid(dir_ino).map_err(errno_text)?;
        let sent_at = Instant::now();
        let request = Request::MakeMountPoint {
            dir,
            name: name.clone(),
            volume,
        };
        let response = self.call(dir.volume, request).await.map_err(errno_text)?;
        match response {
            Response::Entry { .. } => {
                self.absorb_entry(response, &name, sent_at)
                    .map_err(errno_text)?;
            }
            _ => {
                // Unknown shape: forget what we knew of the directory.
                self.break_callbacks(&[dir]);
            }
        }
        Ok(())
    }

    /// `Some(content)` when `name` in the directory is a mount point.
    pub async fn list_mount(&self, dir_ino: Ino, name: &str) -> FsResult<Option<String>> {
        let name = entry_name(OsStr::new(name))?;
        let dir = self.fid(dir_ino)?;
        let entry = self.dir_entry(dir, &name).await?.ok_or(FsError::ENOENT)?;
        if entry.kind != FileKind::MountPoint {
            return Ok(None);
        }
        let content = self.content(entry.fid).await?;
        Ok(Some(String::from_utf8_lossy(&content).into_owned()))
    }
}

impl CallbackSink for Manager {
    fn break_callbacks(&self, fids: &[Fid]) {
        let mut work = Vec::new();
        {
            let mut state = self.state.lock();
            for fid in fids {
                let broken = state.statuses.break_callback(*fid);
                if let Some(ino) = state.inodes.ino(*fid) {
                    work.push(Invalidation::Inode(ino));
                    work.extend(
                        broken
                            .names
                            .into_iter()
                            .map(|name| Invalidation::Entry { parent: ino, name }),
                    );
                }
            }
        }
        for invalidation in work {
            self.invalidator.push(invalidation);
        }
    }

    fn lock_granted(&self, server: ServerId, wait: WaitId, fid: Fid) -> bool {
        debug!(%server, %wait, %fid, "queued lock granted");
        self.lock_waits.granted(server, wait)
    }

    fn connection_lost(&self, server: ServerId) {
        self.on_connection_lost(server);
    }

    fn reclaim<'a>(
        &'a self,
        server: ServerId,
        connection: &'a proto::rpc::Connection,
        timeout: Duration,
    ) -> ReclaimFuture<'a> {
        Box::pin(self.reclaim_on(server, connection, timeout))
    }

    fn relocate(&self, server: ServerId) -> RelocateFuture<'_> {
        Box::pin(async move {
            let servers = self.vldb.list_servers().await?;
            let entry = servers
                .into_iter()
                .find(|s| s.server == server && !s.addresses.is_empty())
                .ok_or(ProtoError::Remote(ErrorCode::NoSuchServer))?;
            self.volumes.relocate(server, &entry.addresses);
            Ok(entry.addresses)
        })
    }

    fn reset_callbacks(&self, server: ServerId) {
        let volumes: HashSet<VolumeId> = self.volumes.volumes_on(server).into_iter().collect();
        let reset = self
            .state
            .lock()
            .statuses
            .reset_callbacks(|fid| volumes.contains(&fid.volume));
        debug!(%server, count = reset.len(), "callbacks reset; cached data will be revalidated");
    }
}

#[cfg(test)]
mod tests {
    use proto::{
        CellConfig, ClientId, Hello, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN, PeerKind,
    };

    use super::*;
    use crate::fake_cell::{CELL, FILE, FakeCell};

    pub(super) const WAIT_MAX: Duration = Duration::from_secs(10);

    pub(super) async fn start_manager(cell: &FakeCell, dir: &std::path::Path) -> Arc<Manager> {
        start_manager_renewing(cell, dir, Duration::from_secs(10)).await
    }

    pub(super) async fn start_manager_renewing(
        cell: &FakeCell,
        dir: &std::path::Path,
        lease_renew_interval: Duration,
    ) -> Arc<Manager> {
        start_manager_with(cell, dir, lease_renew_interval, WAIT_MAX, WAIT_MAX).await
    }

    pub(super) async fn start_manager_with(
        cell: &FakeCell,
        dir: &std::path::Path,
        lease_renew_interval: Duration,
        rpc_timeout: Duration,
        failover_timeout: Duration,
    ) -> Arc<Manager> {
        let peer = PeerKind::CacheManager {
            client: ClientId::random(),
            instance: crate::identity::new_instance_nonce(),
        };
        let hello = Hello {
            version_min: PROTOCOL_VERSION_MIN,
            version_max: PROTOCOL_VERSION_MAX,
            cell: CELL.to_owned(),
            peer: peer.clone(),
        };
        let config = CellConfig {
            name: CELL.to_owned(),
            vlservers: vec![cell.address()],
        };
        let vldb = VldbClient::new(config, peer, WAIT_MAX);
        let pool = ServerPool::new(hello, rpc_timeout, failover_timeout);
        let settings = ManagerSettings {
            root_volume: VolumeName::parse("root.cell").unwrap(),
            chunk_dir: dir.join("chunks"),
            cache_bytes_max: 1 << 30,
            lease_renew_interval,
        };
        Manager::start(settings, vldb, pool, Invalidator::start().unwrap())
            .await
            .unwrap()
    }

    fn pattern(len: u64, modulus: u64) -> Vec<u8> {
        (0..len).map(|i| (i % modulus) as u8).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn write_back_overlaps_stores_and_syncs_once_after_them() {
        // Adjacent chunks go together, as many as fit in one store.
        let chunks_per_store = (STORE_BYTES_MAX / CHUNK_BYTES) as usize;
        let stores = STORES_IN_FLIGHT_MAX + 2;
        let chunks = stores * chunks_per_store;
        // The fake holds every store until STORES_IN_FLIGHT_MAX are in flight together:
        // a client storing one run at a time would time out here.
        let (cell, _stop) = FakeCell::start(Vec::new(), STORES_IN_FLIGHT_MAX, stores).await;
        let dir = tempfile::tempdir().unwrap();
        let manager = start_manager(&cell, dir.path()).await;
        let ino = manager.state.lock().inodes.ino_for(FILE);
        manager.open(ino).await.unwrap();
        let data = pattern(chunks as u64 * CHUNK_BYTES, 251);
        for (i, piece) in data.chunks(CHUNK_BYTES as usize / 2).enumerate() {
            let offset = i as u64 * CHUNK_BYTES / 2;
            manager.write(ino, offset, piece).await.unwrap();
        }
        manager.flush(ino).await.unwrap();
        {
            let record = cell.record.lock();
            assert_eq!(record.stores, stores);
            assert_eq!(record.store_bytes_peak as u64, STORE_BYTES_MAX);
            assert_eq!(record.stores_in_flight_peak, STORES_IN_FLIGHT_MAX);
            assert_eq!(
                record.fsyncs_after_stores,
                [stores],
                "one sync, after every store"
            );
        }
        let (content, version) = cell.content();
        assert!(content == data, "the server holds what was written");
        assert_eq!(version, DataVersion(1 + stores as u64));
        {
            // The highest reply wins, and since every version in between was this
            // client's own, the kernel's pages and the cached chunks are current.
            let state = manager.state.lock();
            let entry = state.statuses.get(FILE).unwrap();
            assert_eq!(entry.status.data_version, version);
            assert_eq!(entry.kernel_version, Some(version));
            assert_eq!(entry.local_size, None);
        }
        for index in 0..chunks as u64 {
            let key = ChunkKey { fid: FILE, index };
            assert!(
                manager.chunks.holds(key, version),
                "chunk {index} is current"
            );
        }
        assert!(!manager.chunks.has_dirty(FILE));
        // A second close has nothing to store and nothing to sync.
        manager.flush(ino).await.unwrap();
        assert_eq!(cell.record.lock().fsyncs_after_stores.len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_back_stores_each_run_of_whole_chunks_in_one_store() {
        let (cell, _stop) = FakeCell::start(Vec::new(), 0, 0).await;
        let dir = tempfile::tempdir().unwrap();
        let manager = start_manager(&cell, dir.path()).await;
        let ino = manager.state.lock().inodes.ino_for(FILE);
        manager.open(ino).await.unwrap();
        let mib = CHUNK_BYTES;
        // Chunks 0-2 whole and 3 short; a gap; 5 short; 6-8 whole.
        let written = [(0, 3 * mib + 100), (5 * mib, 100), (6 * mib, 3 * mib)];
        let mut expected = vec![0u8; 9 * mib as usize];
        for (start, len) in written {
            let data = pattern(len, 241);
            expected[start as usize..(start + len) as usize].copy_from_slice(&data);
            for (i, piece) in data.chunks(mib as usize / 2).enumerate() {
                let offset = start + i as u64 * mib / 2;
                manager.write(ino, offset, piece).await.unwrap();
            }
        }
        manager.flush(ino).await.unwrap();
        let record = cell.record.lock();
        let mut stores = record.store_ranges.clone();
        stores.sort_unstable();
        let mib = mib as usize;
        assert_eq!(
            stores,
            [
                (0, 2 * mib),
                (2 * mib as u64, mib + 100),
                (5 * mib as u64, 100),
                (6 * mib as u64, 2 * mib),
                (8 * mib as u64, mib),
            ]
        );
        assert!(record.stores_in_flight_peak <= STORES_IN_FLIGHT_MAX);
        assert_eq!(
            record.fsyncs_after_stores,
            [5],
            "one sync, after every store"
        );
        drop(record);
        assert!(
            cell.content().0 == expected,
            "the server holds what was written"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_store_ends_the_write_back_after_those_in_flight_and_skips_the_sync() {
        let (cell, _stop) = FakeCell::start(Vec::new(), 0, 0).await;
        let dir = tempfile::tempdir().unwrap();
        let manager = start_manager(&cell, dir.path()).await;
        let ino = manager.state.lock().inodes.ino_for(FILE);
        manager.open(ino).await.unwrap();
        let store_bytes = STORE_BYTES_MAX as usize;
        let data = pattern(3 * STORE_BYTES_MAX, 239);
        for (i, piece) in data.chunks(CHUNK_BYTES as usize).enumerate() {
            let offset = i as u64 * CHUNK_BYTES;
            manager.write(ino, offset, piece).await.unwrap();
        }
        // The first of three stores is refused: the second, sent with it, is awaited
        // and kept; the third never starts, and nothing is synced.
        *cell.refuse_store.lock() = Some((0, ErrorCode::NoSpace));
        let refused = manager.flush(ino).await;
        assert_eq!(refused, Err(FsError::from_errno(libc::ENOSPC)));
        {
            let record = cell.record.lock();
            assert_eq!(record.store_ranges, [(store_bytes as u64, store_bytes)]);
            assert!(record.fsyncs_after_stores.is_empty());
        }
        assert!(manager.chunks.has_dirty(FILE));
        // The next close stores what is left, then syncs once.
        manager.flush(ino).await.unwrap();
        let record = cell.record.lock();
        let mut stores = record.store_ranges.clone();
        stores.sort_unstable();
        assert_eq!(
            stores,
            [
                (0, store_bytes),
                (store_bytes as u64, store_bytes),
                (2 * store_bytes as u64, store_bytes)
            ]
        );
        assert_eq!(record.fsyncs_after_stores, [3]);
        drop(record);
        assert!(
            cell.content().0 == data,
            "the server holds what was written"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_truncation_stores_first_and_the_next_close_syncs_it() {
        let (cell, _stop) = FakeCell::start(Vec::new(), 0, 0).await;
        let dir = tempfile::tempdir().unwrap();
        let manager = start_manager(&cell, dir.path()).await;
        let ino = manager.state.lock().inodes.ino_for(FILE);
        manager.open(ino).await.unwrap();
        let data = pattern(CHUNK_BYTES + 10, 233);
        manager.write(ino, 0, &data).await.unwrap();
        let truncate = SetAttrs {
            size: Some(100),
            ..SetAttrs::default()
        };
        let out = manager.setattr(ino, truncate).await.unwrap();
        assert_eq!(out.attr.size, 100);
        {
            let record = cell.record.lock();
            let changes: Vec<&str> = record
                .requests
                .iter()
                .map(|(_, kind)| *kind)
                .filter(|kind| *kind != "FetchStatus")
                .collect();
            assert_eq!(
                changes,
                ["StoreData", "SetAttr"],
                "stored first, not synced"
            );
            assert_eq!(record.store_ranges, [(0, CHUNK_BYTES as usize + 10)]);
        }
        // Nothing is left to store, but the store is not durable yet.
        manager.flush(ino).await.unwrap();
        manager.flush(ino).await.unwrap();
        let record = cell.record.lock();
        assert_eq!(record.fsyncs_after_stores, [1]);
        assert_eq!(record.stores, 1);
        drop(record);
        assert!(
            cell.content().0 == data[..100],
            "the server holds the cut file"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sequential_reader_gets_chunks_fetched_ahead_and_each_once() {
        let size = 8 * CHUNK_BYTES + 100;
        let content = pattern(size, 253);
        let (cell, _stop) = FakeCell::start(content.clone(), 0, 0).await;
        let dir = tempfile::tempdir().unwrap();
        let manager = start_manager(&cell, dir.path()).await;
        let ino = manager.state.lock().inodes.ino_for(FILE);
        let request = 128 * 1024;
        let mut out = manager.read(ino, 0, request).await.unwrap();
        // Reading the start of chunk 0 sends the next chunks for by themselves.
        cell.wait_for(WAIT_MAX, |record| {
            (1..=READ_AHEAD_CHUNKS).all(|index| record.fetches.contains_key(&index))
        })
        .await;
        loop {
            let part = manager.read(ino, out.len() as u64, request).await.unwrap();
            if part.is_empty() {
                break;
            }
            out.extend_from_slice(&part);
        }
        assert!(out == content, "the reader sees the file's bytes");
        let record = cell.record.lock();
        assert_eq!(record.fetches.len(), 9, "{:?}", record.fetches);
        assert!(
            record.fetches.values().all(|&count| count == 1),
            "no chunk fetched twice: {:?}",
            record.fetches
        );
    }

    #[test]
    fn stores_carry_adjacent_whole_chunks_up_to_the_limit() {
        let full = CHUNK_BYTES;
        let per_store = (STORE_BYTES_MAX / CHUNK_BYTES) as usize;
        // A long run of full chunks is cut at the limit; its last store may end short.
        let long: Vec<(u64, u64)> = (0..per_store as u64 * 2 + 1)
            .map(|i| (i, if i == per_store as u64 * 2 { 10 } else { full }))
            .collect();
        assert_eq!(
            store_runs(&long),
            [
                0..per_store,
                per_store..2 * per_store,
                2 * per_store..2 * per_store + 1
            ]
        );
        // A gap between chunks, or a short chunk before the next one, ends a run.
        assert_eq!(
            store_runs(&[(0, full), (1, 100), (2, full), (4, full), (5, full)]),
            [0..2, 2..3, 3..5]
        );
        assert_eq!(
            store_runs(&[(7, 5)]),
            vec![std::ops::Range { start: 0, end: 1 }]
        );
        assert!(store_runs(&[]).is_empty());
    }

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
