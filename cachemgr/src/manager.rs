//! The cache manager's core, free of FUSE: the `Manager`, its caches and the helpers its
//! parts share.
//! Invariant: `state` is locked briefly, never across an `.await`, and before the chunk
//! index's lock, never after it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use proto::{
    CallbackGrant, DataVersion, ErrorCode, Fid, ProtoError, Request, Response, ServerId,
    VldbClient, VnodeStatus, VolumeId, VolumeName,
};
use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock, Semaphore, TryLockError};
use tracing::{info, warn};

mod access;
mod admin;
mod advisory;
mod attr;
mod callback_sink;
mod data;
mod deferred;
mod deferred_attrs;
mod fs_error;
mod kernel_refs;
mod namespace;
#[cfg(test)]
mod pair_tests;
mod reclaim;
mod store_plan;
#[cfg(test)]
mod test_support;
mod write_back;

pub use advisory::LockRequest;
pub use attr::{Attr, AttrOut, NodeKind};
use data::ChunkFetch;
pub use data::Opened;
use fs_error::unexpected;
pub use fs_error::{FsError, FsResult, rpc_error};
use namespace::DirHandles;

use crate::chunk_index::ChunkKey;
use crate::chunk_store::ChunkStore;
use crate::held_locks::HeldLocks;
use crate::inode::{Ino, InodeTable};
use crate::invalidate::Invalidator;
use crate::lock_waits::LockWaits;
use crate::readahead::ReadAhead;
use crate::server_pool::{CallbackSink, KEEPALIVE_IDLE, ServerPool};
use crate::status::{StatusTable, TableBudget};
use crate::volume::{VolumeLocation, VolumeTable};

/// Longest the kernel may cache attributes and entries before asking again; breaks
/// invalidate sooner, this bounds the harm of a lost invalidation.
const KERNEL_TTL_MAX: Duration = Duration::from_secs(1);
/// Chunks fetched ahead of a sequential reader (8 MiB): the window of fetches in flight
/// ahead of it, so the server has the next chunks to send while it sends one.
const READ_AHEAD_CHUNKS: u64 = 8;
/// Fetches ahead in flight at once over all files; each holds a chunk in memory (16 MiB
/// in all, besides the writer's queue).
const PREFETCHES_MAX: usize = 16;

/// What the kernel's inode numbers name, and what is known of each file.
struct CacheState {
    inodes: InodeTable,
    statuses: StatusTable,
}

/// The per-file locks of files in use. Bounded: an entry whose lock nobody holds or
/// awaits is swept once the table has doubled since the last sweep.
#[derive(Default)]
struct FileLocks {
    locks: HashMap<Fid, Weak<RwLock<()>>>,
    sweep_at: usize,
}

impl FileLocks {
    /// Locks swept no more often than this many entries.
    const SWEEP_MIN: usize = 64;

    fn get(&mut self, fid: Fid) -> Arc<RwLock<()>> {
        if let Some(lock) = self.locks.get(&fid).and_then(Weak::upgrade) {
            return lock;
        }
        if self.locks.len() >= self.sweep_at.max(Self::SWEEP_MIN) {
            self.locks.retain(|_, lock| lock.strong_count() > 0);
            self.sweep_at = self.locks.len() * 2;
        }
        let lock = Arc::new(RwLock::new(()));
        self.locks.insert(fid, Arc::downgrade(&lock));
        lock
    }
}

/// One file's lock, held by whoever holds one of its guards.
struct FileLock(Arc<RwLock<()>>);

impl FileLock {
    async fn read(&self) -> OwnedRwLockReadGuard<()> {
        self.0.clone().read_owned().await
    }

    async fn write(&self) -> OwnedRwLockWriteGuard<()> {
        self.0.clone().write_owned().await
    }

    fn try_read(&self) -> Result<OwnedRwLockReadGuard<()>, TryLockError> {
        self.0.clone().try_read_owned()
    }
}

/// Settings the manager needs from `Config`.
pub struct ManagerSettings {
    pub root_volume: VolumeName,
    pub chunk_dir: std::path::PathBuf,
    pub cache_bytes_max: u64,
    /// How often the lease is renewed on servers where a lock is held or awaited.
    pub lease_renew_interval: Duration,
    /// What the inode and status tables may hold beyond what the kernel references.
    pub table_budget: TableBudget,
}

/// Answers filesystem operations from the status and chunk caches under callback
/// promises, and goes to the fileserver only on a miss, a broken callback or a change.
/// FUSE threads and the control socket both call in. Its methods live by concern:
/// `namespace`, `data`, `write_back` (driving a `StorePlan`), `admin` (the `fs` commands), `advisory` (locks),
/// `callback_sink` and `reclaim` (what the fileserver connections report).
pub struct Manager {
    /// Lets `&self` methods start tasks (fetches ahead) that outlive the call.
    this: Weak<Manager>,
    vldb: VldbClient,
    volumes: VolumeTable,
    pool: Arc<ServerPool>,
    /// Inodes and statuses. Short sections, never held across an `.await`, taken
    /// before the chunk index's lock, never after.
    state: Mutex<CacheState>,
    chunks: ChunkStore,
    /// A read-write lock per file, which may be held across RPCs: reads and fetches
    /// ahead share it; writes, write-backs and truncations hold it alone, so a
    /// truncation never races with a store and no chunk is fetched while a write-back's
    /// stores are in flight. One per file, not striped: a write-back waiting on a dead
    /// server must not hold up cached reads of other files.
    file_locks: Mutex<FileLocks>,
    /// Fetches in flight by chunk: one per chunk, however many readers want it. Bounded:
    /// an entry lives only while a FUSE thread or a fetch ahead (at most
    /// `PREFETCHES_MAX`) is fetching it.
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
    /// Servers a reconnect task is trying; at most one task per server.
    reconnecting: Mutex<HashSet<ServerId>>,
    runtime: tokio::runtime::Handle,
    /// Hands freed memory back to the system after the tables dropped many entries.
    memory_return: kernel_refs::MemoryReturn,
    /// The tokens this workstation's users hold, by local uid; the pool's calls carry
    /// their callers' tokens from here.
    tokens: Arc<crate::tokens::TokenStore>,
    /// The callers' rights, per (user, vnode), under their directories' callbacks.
    rights: crate::rights::RightsCache,
    /// Where time goes: FUSE operations' latency and the data path's counters.
    figures: Arc<crate::figures::MountFigures>,
    /// Which kernel opens are passthrough opens, and whether they are on.
    passthrough: crate::passthrough::Passthrough,
    /// Files created here whose create waits for their close (`deferred`). Locked
    /// after `state` when both are held, never before.
    deferred: Mutex<deferred::DeferredCreates>,
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
                inodes: InodeTable::with_idle_max(root_fid, settings.table_budget.idle_inodes_max),
                statuses: StatusTable::with_budget(settings.table_budget),
            }),
            chunks,
            file_locks: Mutex::new(FileLocks::default()),
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
            reconnecting: Mutex::new(HashSet::new()),
            runtime: tokio::runtime::Handle::current(),
            memory_return: kernel_refs::MemoryReturn::default(),
            tokens: Arc::new(crate::tokens::TokenStore::default()),
            rights: crate::rights::RightsCache::default(),
            figures: Arc::default(),
            passthrough: crate::passthrough::Passthrough::default(),
            deferred: Mutex::new(deferred::DeferredCreates::default()),
        });
        manager.pool.set_tokens(manager.tokens.clone());
        manager.spawn_lease_renewal(settings.lease_renew_interval);
        let sink: Arc<dyn CallbackSink> = manager.clone();
        manager.pool.set_sink(Arc::downgrade(&sink));
        manager.pool.start_keepalive(KEEPALIVE_IDLE);
        info!(volume = %settings.root_volume, id = %root.id, servers = ?root.addresses, "root volume located");
        // Without a token yet (a user hands theirs in after the mount), the root may
        // be closed to this request: that is no trouble of the server's.
        if let Err(e) = manager.fetch_status(root_fid).await
            && e != FsError::EACCES
        {
            // Not fatal: the mount retries on every access and recovers by itself.
            warn!(
                "root volume's fileserver is not answering yet ({}); mounting anyway",
                e
            );
        }
        Ok(manager)
    }

    /// The name of the cell this mount shows.
    pub fn cell_name(&self) -> &str {
        &self.vldb.cell().name
    }

    /// Asks the VLDB for `user`'s token (`holdfast login` through the control socket);
    /// the refusal as a line for the user.
    pub async fn login(
        &self,
        user: &str,
        password: proto::Password,
        lifetime_secs: Option<u64>,
    ) -> Result<proto::SealedToken, String> {
        let request = proto::Request::Login {
            user: user.to_owned(),
            password,
            lifetime_secs,
        };
        match self.vldb.call(request).await {
            Ok(proto::Response::Token(token)) => Ok(token),
            Ok(other) => Err(format!(
                "the VLDB answered {} to a login",
                other.kind_name()
            )),
            Err(proto::ProtoError::Remote(proto::ErrorCode::PermissionDenied)) => {
                Err("unknown user or wrong password".to_owned())
            }
            Err(e) => Err(format!("cannot reach the VLDB: {e}")),
        }
    }

    /// The tokens this workstation's users hold.
    pub fn tokens(&self) -> &crate::tokens::TokenStore {
        &self.tokens
    }

    /// The mount's figures (`holdfast fs counters`): operations' latency, and the data
    /// path's counters for the reading, opening and caching code to fill in.
    pub fn figures(&self) -> &Arc<crate::figures::MountFigures> {
        &self.figures
    }

    /// The kernel dropped `nlookup` of its references to `ino` (`forget`).
    pub fn forget(&self, ino: Ino, nlookup: u64) {
        self.forget_lookups(ino, nlookup);
    }

    fn fid(&self, ino: Ino) -> FsResult<Fid> {
        self.state.lock().inodes.fid(ino).ok_or(FsError::ESTALE)
    }

    fn file_lock(&self, fid: Fid) -> FileLock {
        FileLock(self.file_locks.lock().get(fid))
    }

    async fn call(&self, volume: VolumeId, request: Request) -> FsResult<Response> {
        let location = self.location(volume).await?;
        self.pool
            .call(&location, request)
            .await
            .map_err(|e| rpc_error(&e))
    }

    async fn location(&self, volume: VolumeId) -> FsResult<Arc<VolumeLocation>> {
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
        match self.call(fid.volume, Request::FetchStatus { fid }).await {
            Ok(Response::Status { status, callback }) => {
                self.absorb(status.clone(), callback, sent_at);
                Ok(status)
            }
            Ok(other) => Err(unexpected(&other)),
            // Its last name was removed elsewhere: what is cached is all there will be.
            Err(FsError::ESTALE) => self
                .state
                .lock()
                .statuses
                .mark_gone(fid)
                .ok_or(FsError::ESTALE),
            Err(e) => Err(e),
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
}
