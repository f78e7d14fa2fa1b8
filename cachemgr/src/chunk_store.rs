//! The chunk cache on local disk: one file per cached chunk, written and deleted as
//! `ChunkIndex` decides, a fetched chunk readable from memory until its file is down.
//! Invariant: every indexed chunk has its complete file, or its bytes in `pending` under
//! the same generation until that file is complete.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};
use proto::{DataVersion, Fid};
use tracing::{debug, warn};

use crate::chunk_index::{ChunkIndex, ChunkKey, ChunkMeta, Evicted, Generation};
use crate::spare_files::SpareFiles;

/// Fetched chunks queued for the background writer. Bounds the memory their bytes hold;
/// when the queue is full the fetching caller writes its chunk's file itself, which
/// slows fetches to the disk's pace rather than letting memory grow.
const WRITES_QUEUED_MAX: usize = 16;

/// A fetched chunk's bytes, held until its file is complete.
struct PendingChunk {
    generation: Generation,
    data: Arc<Vec<u8>>,
}

/// A file for the background writer to put down.
struct WriteJob {
    key: ChunkKey,
    generation: Generation,
    data: Arc<Vec<u8>>,
}

/// What the store's callers and its background writer share.
struct Shared {
    dir: PathBuf,
    index: Mutex<ChunkIndex>,
    /// Indexed chunks whose file is not complete yet: a reader that misses its chunk
    /// here finds the whole file, or no file and so a miss, never a partial one. They
    /// count against the index's byte limit like any other chunk. Never locked together
    /// with `index`. Bounded by the write queue plus the files being written (by the
    /// writer, and inline by fetchers that found the queue full).
    pending: Mutex<HashMap<ChunkKey, PendingChunk>>,
    /// Signalled whenever a chunk leaves `pending`.
    written: Condvar,
}

pub struct ChunkStore {
    shared: Arc<Shared>,
    /// `None` only while dropping: closing it ends the writer.
    jobs: Option<SyncSender<WriteJob>>,
    writer: Option<JoinHandle<()>>,
    spares: SpareFiles,
}

impl ChunkStore {
    /// Opens the store at `dir`, discarding whatever an earlier run left there: there is
    /// no warm restart yet (a chunk file's name carries no data version; only the index
    /// in memory knows it).
    pub fn open(dir: PathBuf, bytes_max: u64) -> io::Result<ChunkStore> {
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::create_dir_all(&dir)?;
        let spares = SpareFiles::start(dir.clone())?;
        let shared = Arc::new(Shared {
            dir,
            index: Mutex::new(ChunkIndex::new(bytes_max)),
            pending: Mutex::new(HashMap::new()),
            written: Condvar::new(),
        });
        let (jobs, queue) = std::sync::mpsc::sync_channel(WRITES_QUEUED_MAX);
        let writer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("holdfast-chunkw".into())
                .spawn(move || shared.write_queued(queue))?
        };
        Ok(ChunkStore {
            shared,
            jobs: Some(jobs),
            writer: Some(writer),
            spares,
        })
    }

    pub fn bytes_max(&self) -> u64 {
        self.shared.index.lock().bytes_max()
    }

    pub fn dirty_bytes(&self) -> u64 {
        self.shared.index.lock().dirty_bytes()
    }

    pub fn has_fid(&self, fid: Fid) -> bool {
        self.shared.index.lock().has_fid(fid)
    }

    pub fn has_dirty(&self, fid: Fid) -> bool {
        self.shared.index.lock().has_dirty(fid)
    }

    /// Reads `len` bytes at `offset` within the chunk, when it holds `data_version`.
    /// Bytes past the chunk's end read as zeros (a hole before later writes).
    /// `None` on a miss, including a file evicted between lookup and read.
    pub fn read(
        &self,
        key: ChunkKey,
        data_version: DataVersion,
        offset: u64,
        len: usize,
    ) -> io::Result<Option<Vec<u8>>> {
        let mut buf = Vec::with_capacity(len);
        Ok(self
            .read_into(key, data_version, offset, len, &mut buf)?
            .then_some(buf))
    }

    /// `read`, appending to `out` (the reply buffer) rather than to a buffer of its own;
    /// `false` on a miss, with `out` unchanged.
    pub fn read_into(
        &self,
        key: ChunkKey,
        data_version: DataVersion,
        offset: u64,
        len: usize,
        out: &mut Vec<u8>,
    ) -> io::Result<bool> {
        let Some(meta) = self.shared.index.lock().lookup(key, data_version) else {
            return Ok(false);
        };
        let start = out.len();
        out.resize(start + len, 0);
        let available = meta.len.saturating_sub(offset).min(len as u64) as usize;
        if let Some(data) = self.shared.pending_data(key, meta.generation) {
            // `meta.len` never exceeds the fetched bytes (a pending chunk is clean, so
            // only a truncation changes its length); `get` keeps a slip from panicking.
            if available > 0 {
                let from = offset as usize;
                let Some(bytes) = data.get(from..from + available) else {
                    out.truncate(start);
                    return Ok(false);
                };
                out[start..start + available].copy_from_slice(bytes);
            }
            return Ok(true);
        }
        let file = match File::open(self.shared.path(key, meta.generation)) {
            Ok(file) => file,
            Err(e) => {
                out.truncate(start);
                return if e.kind() == io::ErrorKind::NotFound {
                    Ok(false)
                } else {
                    Err(e)
                };
            }
        };
        if let Err(e) = file.read_exact_at(&mut out[start..start + available], offset) {
            out.truncate(start);
            return Err(e);
        }
        Ok(true)
    }

    /// Whether the chunk is cached at `data_version` (or holds unstored writes).
    pub fn holds(&self, key: ChunkKey, data_version: DataVersion) -> bool {
        self.shared.index.lock().lookup(key, data_version).is_some()
    }

    /// Caches a chunk's bytes, its file written before this returns. Returns the fids
    /// whose last cached data was evicted.
    pub fn insert(
        &self,
        key: ChunkKey,
        data_version: DataVersion,
        data: &[u8],
        dirty: bool,
    ) -> io::Result<Vec<Fid>> {
        let generation = self.shared.index.lock().reserve_generation();
        self.write_new_file(&self.shared.path(key, generation), data)?;
        let (_, evicted) = self.shared.index.lock().insert(
            key,
            data_version,
            data.len() as u64,
            dirty,
            generation,
        );
        Ok(self.shared.delete(evicted))
    }

    /// Puts a new chunk file down at `path`: a spare renamed into place when one is
    /// ready, else a file created here. This is the path of a write's dirty chunk, so
    /// it renames rather than creates (see `SpareFiles`). On failure no file is left at
    /// `path`.
    fn write_new_file(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        if let Some(spare) = self.spares.take() {
            match std::fs::rename(&spare, path) {
                Ok(()) => {
                    // The spare is empty, so writing it whole leaves exactly `data`.
                    let written = OpenOptions::new()
                        .write(true)
                        .open(path)
                        .and_then(|mut file| file.write_all(data));
                    if written.is_err() {
                        remove_quietly(path);
                    }
                    return written;
                }
                Err(e) => {
                    debug!(spare = %spare.display(), error = %e, "cannot rename a spare chunk file; creating one");
                    remove_quietly(&spare);
                }
            }
        }
        let written = std::fs::write(path, data);
        if written.is_err() {
            remove_quietly(path);
        }
        written
    }

    /// Caches a clean chunk just fetched at `data_version`: indexed and readable at once
    /// from `data`, its file written by the background writer, so the disk write is not
    /// on a reader's path. Returns the fids whose last cached data was evicted.
    pub fn insert_fetched(
        &self,
        key: ChunkKey,
        data_version: DataVersion,
        data: Arc<Vec<u8>>,
    ) -> Vec<Fid> {
        let len = data.len() as u64;
        let generation = self.shared.index.lock().reserve_generation();
        // Pending before indexed: whoever finds the chunk in the index finds its bytes.
        self.shared.pending.lock().insert(
            key,
            PendingChunk {
                generation,
                data: data.clone(),
            },
        );
        let (inserted, evicted) =
            self.shared
                .index
                .lock()
                .insert(key, data_version, len, false, generation);
        let mut emptied = self.shared.delete(evicted);
        if inserted {
            let job = WriteJob {
                key,
                generation,
                data,
            };
            let refused = match &self.jobs {
                Some(jobs) => match jobs.try_send(job) {
                    Ok(()) => None,
                    Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => Some(job),
                },
                None => Some(job),
            };
            if let Some(job) = refused {
                emptied.extend(self.shared.write_file(job));
            }
        }
        emptied
    }

    /// Writes into a cached chunk of `data_version` (or already dirty), pinning it dirty.
    /// `Ok(false)` when no such chunk is cached: the caller must provide its bytes first.
    pub fn write(
        &self,
        key: ChunkKey,
        data_version: DataVersion,
        offset: u64,
        data: &[u8],
    ) -> io::Result<bool> {
        let generation = {
            let mut index = self.shared.index.lock();
            if index.lookup(key, data_version).is_none() {
                return Ok(false);
            }
            index.begin_write(key)
        };
        let Some(generation) = generation else {
            return Ok(false);
        };
        // The write lands in the file, so the file must hold the fetched bytes first.
        self.shared.wait_written(key, generation);
        let file = match OpenOptions::new()
            .write(true)
            .open(self.shared.path(key, generation))
        {
            Ok(file) => file,
            // Evicted meanwhile (or its file could not be written): not cached.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        file.write_all_at(data, offset)?;
        let evicted = self
            .shared
            .index
            .lock()
            .grow(key, offset + data.len() as u64);
        self.shared.delete(evicted);
        Ok(true)
    }

    /// Files with writes not yet stored.
    pub fn dirty_fids(&self) -> Vec<Fid> {
        self.shared.index.lock().dirty_fids()
    }

    pub fn dirty_chunks(&self, fid: Fid) -> Vec<(ChunkKey, ChunkMeta)> {
        self.shared.index.lock().dirty_chunks(fid)
    }

    /// The whole content of a chunk listed by the index (a dirty one is pinned).
    pub fn read_whole(&self, key: ChunkKey, meta: &ChunkMeta) -> io::Result<Vec<u8>> {
        let mut buf = Vec::with_capacity(meta.len as usize);
        self.append_whole(key, meta, &mut buf)?;
        Ok(buf)
    }

    /// `read_whole`, appending to `out` (a store carrying several chunks) rather than to
    /// a buffer of its own; on an error `out` is unchanged.
    pub fn append_whole(
        &self,
        key: ChunkKey,
        meta: &ChunkMeta,
        out: &mut Vec<u8>,
    ) -> io::Result<()> {
        let len = meta.len as usize;
        if let Some(data) = self.shared.pending_data(key, meta.generation) {
            let bytes = data.get(..len).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "pending chunk shorter than indexed",
                )
            })?;
            out.extend_from_slice(bytes);
            return Ok(());
        }
        let file = File::open(self.shared.path(key, meta.generation))?;
        let start = out.len();
        out.resize(start + len, 0);
        if let Err(e) = file.read_exact_at(&mut out[start..], 0) {
            out.truncate(start);
            return Err(e);
        }
        Ok(())
    }

    /// The whole chunk when it is cached at `data_version` (or holds unstored writes).
    pub fn read_chunk(
        &self,
        key: ChunkKey,
        data_version: DataVersion,
    ) -> io::Result<Option<Vec<u8>>> {
        let Some(meta) = self.shared.index.lock().lookup(key, data_version) else {
            return Ok(None);
        };
        match self.read_whole(key, &meta) {
            Ok(data) => Ok(Some(data)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn mark_clean(&self, key: ChunkKey, data_version: DataVersion) -> Vec<Fid> {
        let evicted = self.shared.index.lock().mark_clean(key, data_version);
        self.shared.delete(evicted)
    }

    pub fn retag(&self, fid: Fid, from: DataVersion, to: DataVersion) {
        self.shared.index.lock().retag(fid, from, to);
    }

    pub fn drop_stale(&self, fid: Fid, current: DataVersion) {
        let evicted = self.shared.index.lock().drop_stale(fid, current);
        self.shared.delete(evicted);
    }

    pub fn drop_fid(&self, fid: Fid) {
        let evicted = self.shared.index.lock().drop_fid(fid);
        self.shared.delete(evicted);
    }

    pub fn truncate(&self, fid: Fid, size: u64) -> io::Result<()> {
        let (evicted, cut) = self.shared.index.lock().truncate(fid, size);
        self.shared.delete(evicted);
        if let Some((key, meta)) = cut {
            // Cut the complete file, not one the background writer is still filling.
            self.shared.wait_written(key, meta.generation);
            let file = match OpenOptions::new()
                .write(true)
                .open(self.shared.path(key, meta.generation))
            {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            };
            file.set_len(meta.len)?;
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Waits until every fetched chunk queued so far has its file (or was dropped).
    #[cfg(test)]
    fn wait_idle(&self) {
        let mut pending = self.shared.pending.lock();
        while !pending.is_empty() {
            self.shared.written.wait(&mut pending);
        }
    }
}

impl Drop for ChunkStore {
    /// Lets the writer finish the queued files, so none is written after the store is
    /// gone (into a directory that may be reused).
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            warn!("chunk file writer panicked");
        }
    }
}

impl Shared {
    /// A chunk's file: `VOLUME.VNODE.UNIQUE.INDEX.GENERATION` in the store's directory.
    fn path(&self, key: ChunkKey, generation: Generation) -> PathBuf {
        let fid = key.fid;
        self.dir.join(format!(
            "{}.{}.{}.{}.{}",
            fid.volume, fid.vnode, fid.unique, key.index, generation.0
        ))
    }

    /// The bytes of the chunk written under `generation` while its file is not complete.
    fn pending_data(&self, key: ChunkKey, generation: Generation) -> Option<Arc<Vec<u8>>> {
        self.pending
            .lock()
            .get(&key)
            .filter(|p| p.generation == generation)
            .map(|p| p.data.clone())
    }

    fn is_pending(
        pending: &HashMap<ChunkKey, PendingChunk>,
        key: ChunkKey,
        generation: Generation,
    ) -> bool {
        pending
            .get(&key)
            .is_some_and(|p| p.generation == generation)
    }

    /// Blocks until the chunk written under `generation` has its complete file (or was
    /// dropped). Short: the writer takes queued files in order.
    fn wait_written(&self, key: ChunkKey, generation: Generation) {
        let mut pending = self.pending.lock();
        while Shared::is_pending(&pending, key, generation) {
            self.written.wait(&mut pending);
        }
    }

    /// The background writer's loop; ends when the store closes the queue.
    fn write_queued(&self, queue: Receiver<WriteJob>) {
        for job in queue {
            let emptied = self.write_file(job);
            // Only a courtesy is lost (giving those callbacks up early): the fids are
            // dropped from the cache all the same.
            if !emptied.is_empty() {
                debug!(
                    count = emptied.len(),
                    "fids emptied by a failed chunk write"
                );
            }
        }
    }

    /// Writes a fetched chunk's file, then hands readers over to it. A chunk dropped
    /// before the write gets no file; one dropped during it has its file deleted here,
    /// since whoever dropped it may have looked for the file too early. On failure the
    /// chunk leaves the cache (its file first, so a reader never finds a partial one);
    /// returns the fids that left with it.
    fn write_file(&self, job: WriteJob) -> Vec<Fid> {
        let WriteJob {
            key,
            generation,
            data,
        } = job;
        if !Shared::is_pending(&self.pending.lock(), key, generation) {
            return Vec::new();
        }
        let path = self.path(key, generation);
        let written = std::fs::write(&path, &*data);
        let mut pending = self.pending.lock();
        let still_cached = Shared::is_pending(&pending, key, generation);
        match written {
            Ok(()) if still_cached => {
                pending.remove(&key);
                drop(pending);
                self.written.notify_all();
                Vec::new()
            }
            Ok(()) => {
                // Evicted or replaced while its file was written: whoever dropped it
                // may have looked for the file too early.
                drop(pending);
                remove_quietly(&path);
                Vec::new()
            }
            Err(e) => {
                drop(pending);
                warn!(path = %path.display(), error = %e, "cannot write chunk file; dropping the chunk");
                let dropped = self.index.lock().drop_generation(key, generation);
                remove_quietly(&path);
                let mut pending = self.pending.lock();
                if Shared::is_pending(&pending, key, generation) {
                    pending.remove(&key);
                }
                drop(pending);
                self.written.notify_all();
                dropped
                    .filter(|e| e.last_of_fid)
                    .map(|e| e.key.fid)
                    .into_iter()
                    .collect()
            }
        }
    }

    /// Deletes evicted chunks' files (and the bytes of those still pending); returns the
    /// fids left with no cached data. Files go by generation, so an old eviction never
    /// deletes a newer file of the same chunk.
    fn delete(&self, evicted: Vec<Evicted>) -> Vec<Fid> {
        if evicted.is_empty() {
            return Vec::new();
        }
        let mut emptied = Vec::new();
        let mut unpended = false;
        {
            let mut pending = self.pending.lock();
            for e in &evicted {
                if Shared::is_pending(&pending, e.key, e.generation) {
                    pending.remove(&e.key);
                    unpended = true;
                }
            }
        }
        if unpended {
            self.written.notify_all();
        }
        for e in evicted {
            remove_quietly(&self.path(e.key, e.generation));
            if e.last_of_fid {
                emptied.push(e.key.fid);
            }
        }
        emptied
    }
}

fn remove_quietly(path: &Path) {
    if let Err(err) = std::fs::remove_file(path)
        && err.kind() != io::ErrorKind::NotFound
    {
        debug!(error = %err, "cannot delete evicted chunk file");
    }
}

#[cfg(test)]
mod tests {
    use proto::{Uniquifier, VnodeId, VolumeId};

    use super::*;
    use crate::chunk_index::CHUNK_BYTES;
    use crate::spare_files::SPARE_PREFIX;

    fn key(index: u64) -> ChunkKey {
        ChunkKey {
            fid: Fid {
                volume: VolumeId(1),
                vnode: VnodeId(2),
                unique: Uniquifier(1),
            },
            index,
        }
    }

    #[test]
    fn write_read_evict_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path().join("chunks"), 8).unwrap();
        let v = DataVersion(1);
        assert!(store.insert(key(0), v, b"hello", false).unwrap().is_empty());
        assert_eq!(store.read(key(0), v, 1, 3).unwrap().unwrap(), b"ell");
        // Reading past the end of the chunk's bytes gives zeros.
        assert_eq!(store.read(key(0), v, 3, 4).unwrap().unwrap(), b"lo\0\0");
        assert!(store.read(key(0), DataVersion(2), 0, 1).unwrap().is_none());
        assert!(store.holds(key(0), v));
        assert!(!store.holds(key(0), DataVersion(2)));
        assert_eq!(store.read_chunk(key(0), v).unwrap().unwrap(), b"hello");
        assert!(store.read_chunk(key(0), DataVersion(2)).unwrap().is_none());
        let mut out = b"reply:".to_vec();
        assert!(store.read_into(key(0), v, 3, 4, &mut out).unwrap());
        assert_eq!(out, b"reply:lo\0\0");
        assert!(!store.read_into(key(1), v, 0, 4, &mut out).unwrap());
        assert_eq!(out, b"reply:lo\0\0", "a miss leaves the buffer alone");
        assert!(store.write(key(0), v, 5, b"!!").unwrap());
        assert!(!store.write(key(1), v, 0, b"x").unwrap());
        assert_eq!(store.dirty_fids(), [key(0).fid]);
        // Over the 8-byte limit: the new clean chunk is evicted, the dirty one stays.
        let emptied = store.insert(key(1), v, b"world", false).unwrap();
        assert!(emptied.is_empty());
        assert_eq!(store.read(key(0), v, 0, 7).unwrap().unwrap(), b"hello!!");
        assert!(store.read(key(1), v, 0, 1).unwrap().is_none());
        let dirty = store.dirty_chunks(key(0).fid);
        assert_eq!(
            store.read_whole(dirty[0].0, &dirty[0].1).unwrap(),
            b"hello!!"
        );
        let emptied = store.mark_clean(key(0), DataVersion(2));
        assert!(emptied.is_empty());
        store.truncate(key(0).fid, 2).unwrap();
        assert_eq!(
            store.read(key(0), DataVersion(2), 0, 3).unwrap().unwrap(),
            b"he\0"
        );
        store.drop_fid(key(0).fid);
        assert!(!store.has_fid(key(0).fid));
        assert_eq!(files(&store), 0);
    }

    /// Chunk files in the store's directory (spares aside).
    fn files(store: &ChunkStore) -> usize {
        std::fs::read_dir(store.dir())
            .unwrap()
            .filter(|entry| {
                !entry
                    .as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(SPARE_PREFIX)
            })
            .count()
    }

    #[test]
    fn fetched_chunk_reads_from_memory_then_from_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path().join("chunks"), 1 << 20).unwrap();
        let v = DataVersion(1);
        let emptied = store.insert_fetched(key(0), v, Arc::new(b"hello".to_vec()));
        assert!(emptied.is_empty());
        // Readable at once, whether or not the writer got to it yet.
        assert_eq!(store.read(key(0), v, 3, 4).unwrap().unwrap(), b"lo\0\0");
        assert_eq!(store.read(key(0), v, 9, 2).unwrap().unwrap(), b"\0\0");
        assert_eq!(store.read_chunk(key(0), v).unwrap().unwrap(), b"hello");
        assert!(store.read(key(0), DataVersion(2), 0, 1).unwrap().is_none());
        store.wait_idle();
        assert_eq!(files(&store), 1);
        assert_eq!(store.read(key(0), v, 0, 5).unwrap().unwrap(), b"hello");
    }

    #[test]
    fn more_fetched_chunks_than_the_queue_all_get_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path().join("chunks"), 1 << 30).unwrap();
        let count = 3 * WRITES_QUEUED_MAX as u64;
        for index in 0..count {
            store.insert_fetched(
                key(index),
                DataVersion(1),
                Arc::new(vec![index as u8; 4096]),
            );
        }
        store.wait_idle();
        assert_eq!(files(&store) as u64, count);
        for index in 0..count {
            let data = store
                .read_chunk(key(index), DataVersion(1))
                .unwrap()
                .unwrap();
            assert_eq!(data, vec![index as u8; 4096]);
        }
    }

    #[test]
    fn dropped_pending_chunks_leave_no_file_and_no_stale_bytes() {
        let dir = tempfile::tempdir().unwrap();
        // Room for two 5-byte chunks: the third fetch evicts the first.
        let store = ChunkStore::open(dir.path().join("chunks"), 10).unwrap();
        let v = DataVersion(1);
        for index in 0..3 {
            store.insert_fetched(key(index), v, Arc::new(b"12345".to_vec()));
        }
        assert!(!store.holds(key(0), v), "evicted, pending or not");
        // A new data version drops the rest, pending or not.
        store.drop_stale(key(0).fid, DataVersion(2));
        assert!(store.read(key(1), v, 0, 1).unwrap().is_none());
        assert!(store.read(key(2), DataVersion(2), 0, 1).unwrap().is_none());
        store.wait_idle();
        assert_eq!(files(&store), 0, "no file outlives its chunk");
        // Refetched at the new version, and replaced before its file may be written.
        store.insert_fetched(key(1), DataVersion(2), Arc::new(b"old".to_vec()));
        store.insert_fetched(key(1), DataVersion(2), Arc::new(b"new".to_vec()));
        assert_eq!(
            store.read(key(1), DataVersion(2), 0, 3).unwrap().unwrap(),
            b"new"
        );
        store.wait_idle();
        assert_eq!(files(&store), 1);
        assert_eq!(
            store.read(key(1), DataVersion(2), 0, 3).unwrap().unwrap(),
            b"new"
        );
    }

    #[test]
    fn writes_and_truncations_of_a_fetched_chunk_land_in_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path().join("chunks"), 1 << 20).unwrap();
        let v = DataVersion(1);
        store.insert_fetched(key(0), v, Arc::new(b"hello".to_vec()));
        assert!(store.write(key(0), v, 5, b"!!").unwrap());
        assert_eq!(store.read(key(0), v, 0, 7).unwrap().unwrap(), b"hello!!");
        let dirty = store.dirty_chunks(key(0).fid);
        assert_eq!(
            store.read_whole(dirty[0].0, &dirty[0].1).unwrap(),
            b"hello!!"
        );
        store.insert_fetched(key(1), v, Arc::new(b"world".to_vec()));
        store.truncate(key(0).fid, CHUNK_BYTES + 2).unwrap();
        assert_eq!(
            store.read(key(1), v, 0, 4).unwrap().unwrap(),
            b"wo\0\0",
            "cut, whether its file was written yet or not"
        );
        store.wait_idle();
        assert_eq!(store.read(key(1), v, 0, 4).unwrap().unwrap(), b"wo\0\0");
        assert_eq!(files(&store), 2);
    }
}
