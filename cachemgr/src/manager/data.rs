//! The data path: open (through the mount, or passthrough to a version file), read,
//! write and truncate over the chunk cache, with chunks fetched ahead of a sequential
//! reader.
//! Invariant: a write or truncation holds the file's lock alone, a chunk has at most one
//! fetch in flight, which every reader wanting it shares, and a passthrough open is given
//! only a version file that holds every byte of the version current at the open.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proto::{
    DataVersion, Fid, FileKind, Request, Response, SetAttrs, Timestamp, VnodeStatus, VolumeId,
};
use tokio::sync::OnceCell;
use tracing::debug;

use super::fs_error::{chunk_io_error, unexpected};
use super::{AttrOut, FsError, FsResult, Manager};
use crate::chunk_index::{CHUNK_BYTES, ChunkKey};
use crate::inode::Ino;
use crate::passthrough::{BindingId, Decision};

/// Evicted fids collected before their callbacks are given up in one request.
const GIVE_UP_BATCH: usize = 64;

/// How long an open that writes waits for the passthrough opens of its file to be
/// released (the kernel gives an inode bound to a backing file no other kind of open)
/// before it fails with `ETXTBSY`.
const PASSTHROUGH_DRAIN_WAIT: Duration = Duration::from_secs(2);

/// How long a read open of a wholly cached file waits, once, for the normal opens that
/// keep it from being a passthrough open: a close's `release` reaches this process
/// asynchronously and may be just behind the next open (`cat f; cat f`).
const RELEASE_BEHIND_WAIT: Duration = Duration::from_millis(20);

/// How the kernel is to serve an open.
#[derive(Debug)]
pub enum Opened {
    /// Through the mount; `keep_cache`: the kernel's pages of the file are current.
    Normal { keep_cache: bool },
    /// Passthrough to a version file. `backing` is that file when this is the binding's
    /// first open (the kernel is to register it); later opens reuse the binding's.
    Passthrough {
        binding: BindingId,
        backing: Option<std::fs::File>,
    },
}

/// A chunk's bytes as one fetch returned them, shared by every reader that waited for it.
#[derive(Clone, Debug)]
pub(super) struct FetchedChunk {
    data: Bytes,
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
        if size.is_some() || attrs.mtime.is_some() {
            // Store what was written before cutting, so the server sees writes in order,
            // and before setting times, which a later store would move on.
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
        let after = status.data_version;
        self.absorb_own_data_change(before, 1, status, callback, sent_at);
        if let Some(size) = size {
            self.chunks.truncate(fid, size).map_err(chunk_io_error)?;
            if let Some(entry) = self.state.lock().statuses.get_mut(fid) {
                entry.local_size = None;
            }
            self.truncate_bound(ino, size, before, after)?;
        }
        self.attr(fid)
    }

    /// A truncation of a file bound for passthrough opens reaches the file they read;
    /// when nothing but this truncation came between, that file shows the new version.
    fn truncate_bound(
        &self,
        ino: Ino,
        size: u64,
        before: DataVersion,
        after: DataVersion,
    ) -> FsResult<()> {
        let Some(binding) = self.passthrough.opens.lock().binding(ino) else {
            return Ok(());
        };
        self.chunks
            .rewrite_held(binding.fid, binding.file, &[], size)
            .map_err(chunk_io_error)?;
        if binding.shows == before && crate::status::only_own_changes(before, 1, after) {
            self.passthrough
                .opens
                .lock()
                .rebound(ino, binding.id, after);
        }
        Ok(())
    }

    /// Opens a file; `true` when the kernel may keep its cached pages (the data version
    /// is the one its pages were read at).
    #[cfg(test)]
    pub async fn open(&self, ino: Ino) -> FsResult<bool> {
        let fid = self.resolved_fid(ino).await?;
        let status = self.valid_status(fid).await?;
        self.keep_kernel_pages(fid, &status)
    }

    /// Opens a file for the kernel: passthrough to its version file when the open only
    /// reads and the version current under its callback is wholly cached, else through
    /// the mount (see `KernelOpens` for the kernel's rules this keeps).
    pub async fn open_file(&self, ino: Ino, write: bool) -> FsResult<Opened> {
        let fid = self.fid(ino)?;
        let deadline = tokio::time::Instant::now() + PASSTHROUGH_DRAIN_WAIT;
        let mut waited_for_release = false;
        loop {
            let status = self.valid_status(fid).await?;
            let version = status.data_version;
            let enabled = self.passthrough.enabled();
            // Made before deciding, so a release between the two still wakes it.
            let changed = self.passthrough.changed.notified();
            let decision = self
                .passthrough
                .opens
                .lock()
                .decide(ino, write, version, enabled);
            match decision {
                Decision::Normal => {
                    return Ok(Opened::Normal {
                        keep_cache: self.keep_kernel_pages(fid, &status)?,
                    });
                }
                Decision::Reuse(binding) => {
                    self.figures.data_path().passthrough_open();
                    return Ok(Opened::Passthrough {
                        binding,
                        backing: None,
                    });
                }
                Decision::NormalLive => {
                    let wholly_cached = self
                        .clean_size(fid)
                        .is_some_and(|size| self.chunks.wholly_cached(fid, version, size));
                    if wholly_cached && !waited_for_release {
                        waited_for_release = true;
                        let _ = tokio::time::timeout(RELEASE_BEHIND_WAIT, changed).await;
                        continue;
                    }
                    self.passthrough.opens.lock().normal(ino);
                    self.figures.data_path().passthrough_fallback();
                    return Ok(Opened::Normal {
                        keep_cache: self.keep_kernel_pages(fid, &status)?,
                    });
                }
                Decision::TryBind => {
                    let held = self
                        .clean_size(fid)
                        .and_then(|size| self.chunks.hold_for_passthrough(fid, version, size));
                    let Some((file, backing)) = held else {
                        self.passthrough.opens.lock().normal(ino);
                        self.figures.data_path().passthrough_fallback();
                        return Ok(Opened::Normal {
                            keep_cache: self.keep_kernel_pages(fid, &status)?,
                        });
                    };
                    let bound = self.passthrough.opens.lock().bind(ino, fid, file, version);
                    match bound {
                        // Counted once the kernel takes the file (`passthrough_ready`).
                        Some(binding) => {
                            return Ok(Opened::Passthrough {
                                binding,
                                backing: Some(backing),
                            });
                        }
                        // Another open was answered meanwhile: decide again.
                        None => self.chunks.unhold(file),
                    }
                }
                Decision::Rebind(binding) => {
                    // One at a time; and no write-back of this file meanwhile.
                    let _file = self.file_lock(fid).write().await;
                    let current = self.passthrough.opens.lock().binding(ino);
                    if current != Some(binding) {
                        continue;
                    }
                    let Some(chunks) = self.version_bytes(fid, &status).await? else {
                        continue; // changed again meanwhile
                    };
                    debug!(%fid, from = %binding.shows, to = %version, "a passthrough-bound file brought to a new version");
                    self.chunks
                        .rewrite_held(fid, binding.file, &chunks, status.size)
                        .map_err(chunk_io_error)?;
                    self.passthrough
                        .opens
                        .lock()
                        .rebound(ino, binding.id, version);
                }
                Decision::Drain => {
                    if tokio::time::timeout_at(deadline, changed).await.is_err() {
                        debug!(%fid, "passthrough opens still live; refusing an open that writes");
                        return Err(FsError::from_errno(libc::ETXTBSY));
                    }
                }
                Decision::Wait => {
                    // Registering a backing file is one ioctl; the deadline only guards.
                    if tokio::time::timeout_at(deadline, changed).await.is_err() {
                        return Err(FsError::EIO);
                    }
                }
            }
        }
    }

    /// The file's size when it has no unstored writes (a passthrough open shows only
    /// the server's version).
    fn clean_size(&self, fid: Fid) -> Option<u64> {
        let state = self.state.lock();
        let entry = state.statuses.get(fid)?;
        (entry.local_size.is_none() && entry.status.kind == FileKind::File)
            .then_some(entry.status.size)
    }

    /// Every chunk of `status`'s version, by index, fetching the missing ones (several
    /// in flight); `None` when the file changed again meanwhile.
    async fn version_bytes(
        &self,
        fid: Fid,
        status: &VnodeStatus,
    ) -> FsResult<Option<Vec<(u64, Bytes)>>> {
        let version = status.data_version;
        let count = status.size.div_ceil(CHUNK_BYTES);
        self.fetch_ahead(fid, version, 0..count);
        let mut chunks = Vec::with_capacity(count as usize);
        for index in 0..count {
            let key = ChunkKey { fid, index };
            let cached = self
                .chunks
                .read_chunk(key, version)
                .map_err(chunk_io_error)?;
            let data = match cached {
                Some(data) => Bytes::from(data),
                None => {
                    let fetched = self.fetch_chunk(key, version).await?;
                    if fetched.version != version {
                        return Ok(None);
                    }
                    fetched.data
                }
            };
            chunks.push((index, data));
        }
        Ok(Some(chunks))
    }

    /// Whether the kernel may keep its pages of the file for a normal open (they were
    /// read at the current version); they are current from now on.
    fn keep_kernel_pages(&self, fid: Fid, status: &VnodeStatus) -> FsResult<bool> {
        let mut state = self.state.lock();
        let entry = state.statuses.get_mut(fid).ok_or(FsError::EIO)?;
        let keep = entry.kernel_version == Some(status.data_version) || entry.local_size.is_some();
        entry.kernel_version = Some(entry.status.data_version);
        Ok(keep)
    }

    /// The kernel released a normal open of `ino`.
    pub fn released_normal(&self, ino: Ino) {
        self.passthrough.opens.lock().release_normal(ino);
        self.passthrough.changed.notify_waiters();
    }

    /// The kernel released a passthrough open of `ino`; `true` when it was its binding's
    /// last, so the caller lets the kernel's backing id go.
    pub fn released_passthrough(&self, ino: Ino, binding: BindingId) -> bool {
        let ended = self
            .passthrough
            .opens
            .lock()
            .release_passthrough(ino, binding);
        if let Some(ended) = ended {
            self.chunks.unhold(ended.file);
        }
        self.passthrough.changed.notify_waiters();
        ended.is_some()
    }

    /// The binding's backing file is registered with the kernel: later opens reuse it.
    pub fn passthrough_ready(&self, ino: Ino, binding: BindingId) {
        self.figures.data_path().passthrough_open();
        self.passthrough.opens.lock().ready(ino, binding);
        self.passthrough.changed.notify_waiters();
    }

    /// The kernel would not take the backing file of a first passthrough open (`error`):
    /// the open goes through the mount instead, and when the refusal is for good (no
    /// capability, a cache directory passthrough cannot stack on), so do all later ones.
    pub fn passthrough_refused(&self, ino: Ino, binding: BindingId, error: &std::io::Error) {
        let ended = self.passthrough.opens.lock().unbind_failed(ino, binding);
        if let Some(ended) = ended {
            self.chunks.unhold(ended.file);
        }
        self.passthrough.changed.notify_waiters();
        self.figures.data_path().passthrough_fallback();
        if matches!(
            error.raw_os_error(),
            Some(libc::EPERM | libc::ELOOP | libc::EINVAL | libc::ENOTTY | libc::EOPNOTSUPP)
        ) {
            if self.passthrough.enabled() {
                tracing::warn!(%error, "the kernel refuses backing files; passthrough off for this mount");
            }
            self.passthrough.set_enabled(false);
        }
    }

    /// Turns passthrough opens on or off for this mount (the FUSE session's `init`
    /// decides).
    pub fn set_passthrough(&self, enabled: bool) {
        self.passthrough.set_enabled(enabled);
    }

    /// Counts a normal open made without `open_file` (a create).
    pub fn opened_normal(&self, ino: Ino) {
        self.passthrough.opens.lock().normal(ino);
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
                data: Bytes::from(data),
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
        let fetched = self
            .call(fid.volume, request)
            .await?
            .into_fetched()
            .map_err(|other| unexpected(&other))?;
        // The bytes are a slice of the received frame: no copy from here to the reader.
        let (status, callback, mut data) = (fetched.status, fetched.callback, fetched.data);
        data.truncate(CHUNK_BYTES as usize);
        let version = status.data_version;
        self.absorb(status, callback, sent_at);
        // Cached before it leaves the fetch table; its file is written off this path.
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
        // The FUSE reply gives it back to the pool once sent.
        let mut out = proto::buffer_pool::take((end - offset) as usize);
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
                self.figures.data_path().cache_hit();
            } else if key.offset() >= status.size {
                // Past the server's end, before later local writes: a hole.
                out.resize(out.len() + n, 0);
            } else {
                // Copy straight from the fetched bytes, not back from the cache file.
                self.figures.data_path().cache_miss();
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
                        self.fetch_chunk(key, status.data_version)
                            .await?
                            .data
                            .to_vec()
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
