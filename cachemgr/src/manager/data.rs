//! The data path: open, read, write and truncate over the chunk cache, with chunks
//! fetched ahead of a sequential reader.
//! Invariant: a write or truncation holds the file's lock alone, and a chunk has at most
//! one fetch in flight, which every reader wanting it shares.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use proto::{DataVersion, Fid, FileKind, Request, Response, SetAttrs, Timestamp, VolumeId};
use tokio::sync::OnceCell;
use tracing::debug;

use super::fs_error::{chunk_io_error, unexpected};
use super::{AttrOut, FsError, FsResult, Manager};
use crate::chunk_index::{CHUNK_BYTES, ChunkKey};
use crate::inode::Ino;

/// Evicted fids collected before their callbacks are given up in one request.
const GIVE_UP_BATCH: usize = 64;

/// A chunk's bytes as one fetch returned them, shared by every reader that waited for it.
#[derive(Clone, Debug)]
pub(super) struct FetchedChunk {
    data: Arc<Vec<u8>>,
    version: DataVersion,
}

/// The one fetch of a chunk in flight; latecomers wait on it rather than fetch again,
/// and share its failure too: readers queued on a dead server fail together, at the
/// first one's timeout, rather than each try in turn.
pub(super) type ChunkFetch = Arc<OnceCell<FsResult<FetchedChunk>>>;

impl Manager {
    pub async fn setattr(&self, ino: Ino, attrs: SetAttrs) -> FsResult<AttrOut> {
        let fid = self.resolved_fid(ino).await?;
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
        let fid = self.resolved_fid(ino).await?;
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
        // Leaves the table below whatever its outcome: the next reader fetches anew.
        let result = fetch
            .get_or_init(|| self.fetch_chunk_once(key, version))
            .await
            .clone();
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
            // The fetch ahead reads with the token of the reader it runs ahead of.
            let caller = crate::tokens::current_caller();
            self.runtime.spawn(crate::tokens::acting_as(caller, async move {
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
            }));
        }
    }

    pub async fn read(&self, ino: Ino, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        if let Some(data) = self.read_deferred(ino, offset, size) {
            return Ok(data);
        }
        let fid = self.resolved_fid(ino).await?;
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
        if let Some(written) = self.write_deferred(ino, offset, data).await? {
            return Ok(written);
        }
        let fid = self.resolved_fid(ino).await?;
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
            entry.note_local_write(offset + data.len() as u64, Timestamp::now());
        }
        // Cache filling with unstored writes: store this file's now, so clean chunks can
        // be evicted and a file larger than the cache streams through it.
        if self.chunks.dirty_bytes() > self.chunks.bytes_max() / 2 {
            self.write_back(fid).await?;
        }
        Ok(data.len() as u32)
    }

    /// AFS close semantics: returns once the server holds every write durably.
    pub async fn flush(&self, ino: Ino) -> FsResult<()> {
        // A file whose create was deferred to this close is created with its bytes here.
        let fid = self.resolved_fid(ino).await?;
        if !self.chunks.has_dirty(fid) && !self.unsynced.lock().contains(&fid) {
            return Ok(());
        }
        let _file = self.file_lock(fid).write().await;
        self.write_back_durably(fid).await
    }

    /// Batches fids whose last cached data was evicted and gives their callbacks up.
    pub(super) fn note_evicted(&self, fids: Vec<Fid>) {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_cell::{FILE, FakeCell};
    use crate::manager::READ_AHEAD_CHUNKS;
    use crate::manager::test_support::{WAIT_MAX, pattern, start_manager};

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
}
