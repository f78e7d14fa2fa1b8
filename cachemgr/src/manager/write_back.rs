//! The write-back: a file's dirty chunks streamed to the server as its `StorePlan` says (a
//! window of stores in flight, their bytes raw after each message), then synced with
//! one `Fsync` when a close or fsync asks for it.
//! Invariant: the caller holds the file's lock alone, and no store of the file is in
//! flight once the write-back returns.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use proto::{
    Bulk, CallbackGrant, DataVersion, ErrorCode, Fid, ProtoError, Request, Response, VnodeStatus,
    WriteBackId,
};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use super::fs_error::{chunk_io_error, unexpected};
use super::store_plan::{Effect, Store, StorePlan, Then};
use super::{FsError, FsResult, Manager, rpc_error};
use crate::volume::VolumeLocation;

/// A store's answer: the file's status after it, and the callback it renewed.
type StoreReply = (VnodeStatus, Option<CallbackGrant>);

/// Write-backs a close or fsync runs while its stores are refused as outdated: each
/// refusal means another change reached the file meanwhile, so this bounds a livelock
/// between writers, not a normal wait.
const OUTDATED_ATTEMPTS_MAX: u32 = 3;

/// Numbers the write-backs of this process, hence of each cache manager instance in it:
/// a server lets a write-back's store follow only its own or an older one's.
static NEXT_WRITE_BACK: AtomicU64 = AtomicU64::new(1);

/// How one write-back ended when it did not succeed.
enum Attempt {
    /// A store was refused as outdated (the others awaited); nothing else failed.
    Outdated,
    Failed(FsError),
}

impl From<FsError> for Attempt {
    fn from(e: FsError) -> Attempt {
        Attempt::Failed(e)
    }
}

/// What the stores of one write-back share: the version they start from, where they
/// go, and when the first was sent (the callbacks of their answers count from there,
/// which errs early).
struct Stores {
    before: DataVersion,
    location: Arc<VolumeLocation>,
    sent_at: Instant,
    /// Names this write-back in the precondition of its stores.
    write_back: WriteBackId,
}

impl Manager {
    /// Stores every dirty chunk of `fid`; the stores are acknowledged, not yet durable.
    /// The caller holds the file lock exclusively.
    pub(super) async fn write_back(&self, fid: Fid) -> FsResult<()> {
        self.run_write_back(fid, Then::Return).await
    }

    /// AFS close semantics: stores every dirty chunk of `fid`, then makes every store
    /// acknowledged so far durable with one `Fsync`. The caller holds the file lock
    /// exclusively.
    pub(super) async fn write_back_durably(&self, fid: Fid) -> FsResult<()> {
        let unsynced = self.unsynced.lock().contains(&fid);
        self.run_write_back(fid, Then::Sync { unsynced }).await
    }

    /// Runs write-backs of `fid` until one ends without a store refused as outdated, at
    /// most `OUTDATED_ATTEMPTS_MAX`. A refused store changed nothing and its chunks stay
    /// dirty: someone changed the file since the version the write-back started from,
    /// so the next attempt starts from the file's version as the server has it now (the
    /// last writer wins, as in AFS), while a store of this one still travelling can no
    /// longer land after it.
    async fn run_write_back(&self, fid: Fid, then: Then) -> FsResult<()> {
        let mut attempt = 1;
        loop {
            let then = match then {
                Then::Return => Then::Return,
                Then::Sync { .. } => Then::Sync {
                    unsynced: self.unsynced.lock().contains(&fid),
                },
            };
            match self.write_back_once(fid, then).await {
                Err(Attempt::Outdated) if attempt < OUTDATED_ATTEMPTS_MAX => {
                    debug!(%fid, attempt, "a store was refused as outdated; storing again from the current version");
                    self.fetch_status(fid).await?;
                    attempt += 1;
                }
                Err(Attempt::Outdated) => {
                    warn!(%fid, "the file kept changing on the server while its writes were stored; they stay unstored");
                    return Err(FsError::EAGAIN);
                }
                Err(Attempt::Failed(e)) => return Err(e),
                Ok(()) => return Ok(()),
            }
        }
    }

    /// Does what the plan of `fid`'s dirty chunks says. Holding the file lock alone, it
    /// is the only one changing the file's chunks meanwhile.
    async fn write_back_once(&self, fid: Fid, then: Then) -> Result<(), Attempt> {
        let dirty = self.chunks.dirty_chunks(fid);
        let extents: Vec<(u64, u64)> = dirty.iter().map(|(k, m)| (k.index, m.len)).collect();
        let mut plan = StorePlan::<StoreReply>::new(&extents, then);
        let stores = if plan.is_empty() {
            None
        } else {
            Some(Stores {
                before: self.valid_status(fid).await?.data_version,
                location: self.location(fid.volume).await?,
                sent_at: Instant::now(),
                write_back: WriteBackId(NEXT_WRITE_BACK.fetch_add(1, Ordering::Relaxed)),
            })
        };
        let mut outdated = false;
        let mut effects = VecDeque::from(plan.start());
        let mut in_flight = JoinSet::new();
        // Each task's store, to hand back to the plan also if the task itself fails.
        let mut stores_of: HashMap<tokio::task::Id, Store> = HashMap::new();
        loop {
            while let Some(effect) = effects.pop_front() {
                match effect {
                    Effect::Store(store) => {
                        let Some(stores) = &stores else {
                            unreachable!("a plan with nothing to store asks for no store");
                        };
                        let chunks = &dirty[store.chunks.clone()];
                        let mut data = proto::buffer_pool::take(store.bytes as usize);
                        if let Some(e) = chunks.iter().find_map(|(key, meta)| {
                            self.chunks.append_whole(*key, meta, &mut data).err()
                        }) {
                            effects.extend(plan.not_sent(&store, chunk_io_error(e)));
                            continue;
                        }
                        self.unsynced.lock().insert(fid);
                        // The bytes go raw after the message, from this buffer (as a
                        // `StoreDataIf` to a server older than version 4), and a retry
                        // on the pair's other member sends the same buffer again.
                        let request = Request::StoreDataBulk {
                            fid,
                            offset: store.offset,
                            base: stores.before,
                            write_back: stores.write_back,
                            // Back to the pool once the store is answered.
                            data: Bulk::new(proto::buffer_pool::into_bytes(data)),
                        };
                        let (pool, location) = (self.pool.clone(), stores.location.clone());
                        // Stored with the token of the process that closes or syncs.
                        let caller = crate::tokens::current_caller();
                        let task = in_flight.spawn(crate::tokens::acting_as(caller, async move {
                            pool.call(&location, request).await
                        }));
                        stores_of.insert(task.id(), store);
                        effects.extend(plan.sent());
                    }
                    Effect::MarkClean { chunks, version } => {
                        for (key, _) in &dirty[chunks] {
                            let emptied = self.chunks.mark_clean(*key, version);
                            self.note_evicted(emptied);
                        }
                    }
                    Effect::Absorb {
                        changes,
                        reply: (status, callback),
                    } => {
                        if let Some(stores) = &stores {
                            let (before, sent_at) = (stores.before, stores.sent_at);
                            self.absorb_own_data_change(before, changes, status, callback, sent_at);
                        }
                    }
                    Effect::AllStored => {
                        if !self.chunks.has_dirty(fid)
                            && let Some(entry) = self.state.lock().statuses.get_mut(fid)
                        {
                            entry.local_size = None;
                        }
                    }
                    Effect::Fsync => return Ok(self.fsync(fid).await?),
                    Effect::Done(Err(_)) if outdated => return Err(Attempt::Outdated),
                    Effect::Done(result) => return Ok(result?),
                }
            }
            let Some(joined) = in_flight.join_next_with_id().await else {
                unreachable!("a plan ends with Fsync or Done once no store is in flight");
            };
            let task = match &joined {
                Ok((task, _)) => *task,
                Err(e) => e.id(),
            };
            let Some(store) = stores_of.remove(&task) else {
                unreachable!("every store task is recorded when spawned");
            };
            effects.extend(match joined {
                Ok((_, Ok(Response::Status { status, callback }))) => {
                    let version = status.data_version;
                    plan.stored(&store, version, (status, callback))
                }
                Ok((_, Ok(other))) => plan.failed(&store, unexpected(&other)),
                Ok((_, Err(ProtoError::Remote(ErrorCode::StoreOutdated { current })))) => {
                    debug!(%fid, %current, "a store was refused as outdated");
                    outdated = true;
                    plan.failed(&store, FsError::EAGAIN)
                }
                Ok((_, Err(e))) => plan.failed(&store, rpc_error(&e)),
                Err(e) => {
                    warn!(%fid, error = %e, "a store task failed");
                    plan.failed(&store, FsError::EIO)
                }
            });
        }
    }

    /// Makes every acknowledged store of `fid` durable on the server.
    async fn fsync(&self, fid: Fid) -> FsResult<()> {
        let sent_at = Instant::now();
        match self.call(fid.volume, Request::Fsync { fid }).await? {
            Response::Status { status, callback } => self.absorb(status, callback, sent_at),
            other => return Err(unexpected(&other)),
        }
        self.unsynced.lock().remove(&fid);
        Ok(())
    }

    /// Stores every file's unstored writes durably (at unmount).
    pub async fn write_back_all(&self) {
        self.create_all_deferred().await;
        let mut fids: HashSet<Fid> = self.chunks.dirty_fids().into_iter().collect();
        fids.extend(self.unsynced.lock().iter().copied());
        for fid in fids {
            let _file = self.file_lock(fid).write().await;
            if let Err(e) = self.write_back_durably(fid).await {
                warn!(%fid, error = %e, "could not store a file's writes before unmounting; they are lost");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proto::{DataVersion, ErrorCode, SetAttrs};

    use super::*;
    use crate::chunk_index::{CHUNK_BYTES, ChunkKey};
    use crate::fake_cell::{FILE, FakeCell};
    use crate::manager::store_plan::{STORE_BYTES_MAX, STORE_WINDOW_BYTES, STORES_IN_FLIGHT_MAX};
    use crate::manager::test_support::{pattern, start_manager};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn write_back_streams_a_window_of_stores_and_syncs_once_after_them() {
        // Adjacent chunks go together, as many as fit in one store.
        let chunks_per_store = (STORE_BYTES_MAX / CHUNK_BYTES) as usize;
        let window = (STORE_WINDOW_BYTES / STORE_BYTES_MAX) as usize;
        let stores = window + 2;
        let chunks = stores * chunks_per_store;
        // The fake holds every store until a window's worth are in flight together: a
        // client storing fewer at a time would time out here.
        let (cell, _stop) = FakeCell::start(Vec::new(), window, stores).await;
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
            assert_eq!(record.stores_in_flight_peak, window);
            assert_eq!(
                record.store_bytes_in_flight_peak as u64, STORE_WINDOW_BYTES,
                "the window is full, never more"
            );
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
        let window = (STORE_WINDOW_BYTES / STORE_BYTES_MAX) as usize;
        let stores = window + 2;
        let data = pattern(stores as u64 * STORE_BYTES_MAX, 239);
        for (i, piece) in data.chunks(CHUNK_BYTES as usize).enumerate() {
            let offset = i as u64 * CHUNK_BYTES;
            manager.write(ino, offset, piece).await.unwrap();
        }
        let range = |n: usize| ((n * store_bytes) as u64, store_bytes);
        // The first store of the window is refused: the others, sent with it, are
        // awaited and kept; the two after the window never start, and nothing is synced.
        *cell.refuse_store.lock() = Some((0, ErrorCode::NoSpace));
        let refused = manager.flush(ino).await;
        assert_eq!(refused, Err(FsError::from_errno(libc::ENOSPC)));
        {
            let record = cell.record.lock();
            let mut stored = record.store_ranges.clone();
            stored.sort_unstable();
            assert_eq!(stored, (1..window).map(range).collect::<Vec<_>>());
            assert!(record.fsyncs_after_stores.is_empty());
        }
        assert!(manager.chunks.has_dirty(FILE));
        // The next close stores what is left, then syncs once.
        manager.flush(ino).await.unwrap();
        let record = cell.record.lock();
        let mut stored = record.store_ranges.clone();
        stored.sort_unstable();
        assert_eq!(stored, (0..stores).map(range).collect::<Vec<_>>());
        assert_eq!(record.fsyncs_after_stores, [stores]);
        drop(record);
        assert!(
            cell.content().0 == data,
            "the server holds what was written"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_refused_as_outdated_is_stored_again_from_the_current_version() {
        let (cell, _stop) = FakeCell::start(Vec::new(), 0, 0).await;
        let dir = tempfile::tempdir().unwrap();
        let manager = start_manager(&cell, dir.path()).await;
        let ino = manager.state.lock().inodes.ino_for(FILE);
        manager.open(ino).await.unwrap();
        let data = pattern(2 * STORE_BYTES_MAX, 227);
        for (i, piece) in data.chunks(CHUNK_BYTES as usize).enumerate() {
            manager
                .write(ino, i as u64 * CHUNK_BYTES, piece)
                .await
                .unwrap();
        }
        *cell.refuse_store.lock() = Some((
            0,
            ErrorCode::StoreOutdated {
                current: DataVersion(1),
            },
        ));
        manager.flush(ino).await.unwrap();
        let record = cell.record.lock();
        let kinds: Vec<&str> = record.requests.iter().map(|(_, kind)| *kind).collect();
        let refused_at = kinds.iter().position(|kind| *kind == "StoreData").unwrap();
        assert!(
            kinds[refused_at..].contains(&"FetchStatus"),
            "the status is fetched again before storing again: {kinds:?}"
        );
        let mut stores = record.store_ranges.clone();
        stores.sort_unstable();
        let bytes = STORE_BYTES_MAX as usize;
        assert_eq!(stores, [(0, bytes), (bytes as u64, bytes)]);
        assert_eq!(record.fsyncs_after_stores, [2], "one sync, after both");
        drop(record);
        assert!(
            cell.content().0 == data,
            "the server holds what was written"
        );
        assert!(!manager.chunks.has_dirty(FILE));
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
}
