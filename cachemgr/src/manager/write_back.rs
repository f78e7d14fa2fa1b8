//! The write-back: a file's dirty chunks stored, adjacent ones together, then one `Fsync`.
//! Invariant: the caller holds the file's lock alone; no store is in flight once it returns.

use std::collections::HashSet;
use std::time::Instant;

use proto::{CallbackGrant, Fid, Request, Response, VnodeStatus};
use tokio::task::JoinSet;
use tracing::warn;

use super::fs_error::{chunk_io_error, unexpected};
use super::{FsError, FsResult, Manager, rpc_error};
use crate::chunk_index::{CHUNK_BYTES, ChunkKey};

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
    /// Stores every dirty chunk of `fid`, adjacent ones together (`store_runs`), up to
    /// `STORES_IN_FLIGHT_MAX` stores at once (they are disjoint ranges, so their order
    /// does not matter). The caller holds the file lock exclusively, so nothing else
    /// changes the file's chunks meanwhile. The stores are acknowledged, not yet
    /// durable: `sync` makes them so.
    pub(super) async fn write_back(&self, fid: Fid) -> FsResult<()> {
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
    pub(super) async fn sync(&self, fid: Fid) -> FsResult<()> {
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
}

#[cfg(test)]
mod tests {
    use proto::{DataVersion, ErrorCode, SetAttrs};

    use super::*;
    use crate::fake_cell::{FILE, FakeCell};
    use crate::manager::test_support::{pattern, start_manager};

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
}
