//! The chunk cache on local disk: a write's chunks each in a file of their own; fetched
//! chunks at their offsets in one sparse version file per (fid, data version), which a
//! passthrough open hands to the kernel; all written and released as `ChunkIndex` decides,
//! a fetched chunk readable from memory until its bytes are down.
//! Invariant: every indexed chunk has its complete bytes in its home, or in `pending`
//! under the same generation until they are; a version file is written only by the one
//! writer thread, in the order its jobs were queued, and never rewritten in place.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, SyncSender};
use std::thread::JoinHandle;

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};
use proto::{DataVersion, Fid};
use tracing::{debug, warn};

use crate::chunk_index::{
    CHUNK_BYTES, ChunkIndex, ChunkKey, ChunkMeta, Evicted, Generation, Home, Release,
};
use crate::spare_files::SpareFiles;

/// Fetched chunks queued for the writer thread. Bounds the memory their bytes hold; when
/// the queue is full a fetcher waits for room, which slows fetches to the disk's pace
/// rather than letting memory grow.
const WRITES_QUEUED_MAX: usize = 16;

/// A fetched chunk's bytes, held until they are in its version file.
struct PendingChunk {
    generation: Generation,
    data: Bytes,
}

/// Work for the writer thread, done in queue order: so a punch or a deletion queued
/// after a write always lands after it, and a write after it.
enum Job {
    /// A fetched chunk's bytes into its version file, at its offset.
    Write {
        key: ChunkKey,
        generation: Generation,
        file: Generation,
        data: Bytes,
    },
    /// A chunk evicted from a version file still in use: its slot's bytes go.
    Punch {
        fid: Fid,
        file: Generation,
        offset: u64,
    },
    /// A version file with no chunk and no open left.
    DeleteVersion {
        fid: Fid,
        file: Generation,
    },
    /// Answered once every job queued before it is done.
    Barrier(SyncSender<()>),
    Stop,
}

/// What the store's callers and its writer thread share.
struct Shared {
    dir: PathBuf,
    index: Mutex<ChunkIndex>,
    /// Indexed chunks whose bytes are not in their version file yet: a reader that misses
    /// its chunk here finds them there. They count against the index's byte limit like
    /// any other chunk. Never locked together with `index`. Bounded by the write queue.
    pending: Mutex<HashMap<ChunkKey, PendingChunk>>,
    /// Signalled whenever a chunk leaves `pending`.
    written: Condvar,
    /// The writer's queue. Unbounded, since punches and deletions are queued from the
    /// writer itself; the fetched bytes it holds are bounded by `ChunkStore::room`.
    jobs: Mutex<Sender<Job>>,
}

pub struct ChunkStore {
    shared: Arc<Shared>,
    /// One token per write queued and not yet done: at most `WRITES_QUEUED_MAX`.
    room: SyncSender<()>,
    writer: Option<JoinHandle<()>>,
    spares: SpareFiles,
}

impl ChunkStore {
    /// Opens the store at `dir`, discarding whatever an earlier run left there: there is
    /// no warm restart yet (a file's name carries no data version; only the index in
    /// memory knows it).
    pub fn open(dir: PathBuf, bytes_max: u64) -> io::Result<ChunkStore> {
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::create_dir_all(&dir)?;
        let spares = SpareFiles::start(dir.clone())?;
        let (jobs, queue) = std::sync::mpsc::channel();
        let shared = Arc::new(Shared {
            dir,
            index: Mutex::new(ChunkIndex::new(bytes_max)),
            pending: Mutex::new(HashMap::new()),
            written: Condvar::new(),
            jobs: Mutex::new(jobs),
        });
        let (room, freed) = std::sync::mpsc::sync_channel(WRITES_QUEUED_MAX);
        let writer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("holdfast-chunkw".into())
                .spawn(move || shared.write_queued(queue, freed))?
        };
        Ok(ChunkStore {
            shared,
            room,
            writer: Some(writer),
            spares,
        })
    }

    pub fn bytes_max(&self) -> u64 {
        self.shared.index.lock().bytes_max()
    }

    pub fn bytes_used(&self) -> u64 {
        self.shared.index.lock().bytes_used()
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
    /// `None` on a miss, including a chunk evicted between lookup and read.
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
        match self
            .shared
            .read_at(key, &meta, offset, &mut out[start..start + available])
        {
            Ok(true) => Ok(true),
            Ok(false) => {
                out.truncate(start);
                Ok(false)
            }
            Err(e) => {
                out.truncate(start);
                Err(e)
            }
        }
    }

    /// Whether the chunk is cached at `data_version` (or holds unstored writes).
    pub fn holds(&self, key: ChunkKey, data_version: DataVersion) -> bool {
        self.shared.index.lock().lookup(key, data_version).is_some()
    }

    /// Caches a chunk's bytes in a file of its own, written before this returns (the
    /// path of a write's chunks). Returns the fids whose last cached data was evicted.
    pub fn insert(
        &self,
        key: ChunkKey,
        data_version: DataVersion,
        data: &[u8],
        dirty: bool,
    ) -> io::Result<Vec<Fid>> {
        let generation = self.shared.index.lock().reserve_generation();
        self.write_new_file(&self.shared.chunk_path(key, generation), data)?;
        let (_, evicted) = self.shared.index.lock().insert(
            key,
            data_version,
            data.len() as u64,
            dirty,
            generation,
            Home::Own,
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
    /// from `data`, put into its version file by the writer thread, so the disk write is
    /// not on a reader's path. Waits only while the writer's queue is full. Returns the
    /// fids whose last cached data was evicted.
    pub fn insert_fetched(
        &self,
        key: ChunkKey,
        data_version: DataVersion,
        data: Bytes,
    ) -> Vec<Fid> {
        let len = data.len() as u64;
        let (generation, file) = {
            let mut index = self.shared.index.lock();
            let (file, _) = index.version_file_for(key.fid, data_version);
            (index.reserve_generation(), file)
        };
        // Pending before indexed: whoever finds the chunk in the index finds its bytes.
        self.shared.pending.lock().insert(
            key,
            PendingChunk {
                generation,
                data: data.clone(),
            },
        );
        let (inserted, evicted) = self.shared.index.lock().insert(
            key,
            data_version,
            len,
            false,
            generation,
            Home::Version(file),
        );
        // Releases first: a punch of this slot queued after the write would undo it.
        let emptied = self.shared.delete(evicted);
        if inserted {
            if self.room.send(()).is_err() {
                // The writer is gone (only while dropping): nobody will write it.
                self.shared.unpend(key, generation);
                return emptied;
            }
            self.shared.queue(Job::Write {
                key,
                generation,
                file,
                data,
            });
        } else {
            self.shared.unpend(key, generation);
        }
        emptied
    }

    /// Writes into a cached chunk of `data_version` (or already dirty), pinning it dirty.
    /// A chunk in a version file is first moved to a file of its own. `Ok(false)` when no
    /// such chunk is cached: the caller must provide its bytes first.
    pub fn write(
        &self,
        key: ChunkKey,
        data_version: DataVersion,
        offset: u64,
        data: &[u8],
    ) -> io::Result<bool> {
        let Some(meta) = self.shared.index.lock().lookup(key, data_version) else {
            return Ok(false);
        };
        if meta.home != Home::Own && !self.move_to_own_file(key, &meta)? {
            return Ok(false);
        }
        let Some(generation) = self.shared.index.lock().begin_write(key) else {
            return Ok(false);
        };
        let file = match OpenOptions::new()
            .write(true)
            .open(self.shared.chunk_path(key, generation))
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

    /// Copies a chunk out of its version file into a file of its own, so a write never
    /// lands in a version file. `false` when it left the cache meanwhile.
    fn move_to_own_file(&self, key: ChunkKey, meta: &ChunkMeta) -> io::Result<bool> {
        let mut data = vec![0; meta.len as usize];
        if !self.shared.read_at(key, meta, 0, &mut data)? {
            return Ok(false);
        }
        let own = self.shared.index.lock().reserve_generation();
        let path = self.shared.chunk_path(key, own);
        self.write_new_file(&path, &data)?;
        let moved = self.shared.index.lock().rehome(key, meta.generation, own);
        match moved {
            Some(old_slot) => {
                self.shared.delete(vec![old_slot]);
                Ok(true)
            }
            None => {
                remove_quietly(&path);
                Ok(false)
            }
        }
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
    /// a buffer of its own; on an error `out` is unchanged. A chunk gone meanwhile is
    /// `NotFound`.
    pub fn append_whole(
        &self,
        key: ChunkKey,
        meta: &ChunkMeta,
        out: &mut Vec<u8>,
    ) -> io::Result<()> {
        let start = out.len();
        out.resize(start + meta.len as usize, 0);
        match self.shared.read_at(key, meta, 0, &mut out[start..]) {
            Ok(true) => Ok(()),
            Ok(false) => {
                out.truncate(start);
                Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    "chunk left the cache",
                ))
            }
            Err(e) => {
                out.truncate(start);
                Err(e)
            }
        }
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
            // Only a chunk in a file of its own is cut; it is never pending.
            let file = match OpenOptions::new()
                .write(true)
                .open(self.shared.chunk_path(key, meta.generation))
            {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            };
            file.set_len(meta.len)?;
        }
        Ok(())
    }

    /// Whether one version file holds every byte of `fid` at `data_version` (`size`
    /// bytes), clean: a passthrough open could be given it.
    pub fn wholly_cached(&self, fid: Fid, data_version: DataVersion, size: u64) -> bool {
        self.shared
            .index
            .lock()
            .passthrough_file(fid, data_version, size)
            .is_some()
    }

    /// Holds the version file that has every byte of `fid` at `data_version` (`size`
    /// bytes) for a passthrough open, once those bytes are all down, and returns it open
    /// with its length set to `size`. `None` when no version file holds them all (or one
    /// could not be opened); then nothing is held.
    pub fn hold_for_passthrough(
        &self,
        fid: Fid,
        data_version: DataVersion,
        size: u64,
    ) -> Option<(Generation, File)> {
        let (file, chunks) = {
            let mut index = self.shared.index.lock();
            let file = index.passthrough_file(fid, data_version, size)?;
            if !index.hold(file) {
                return None;
            }
            (file, index.chunks_in(file))
        };
        // Held, so none of them is punched any more; wait for the ones still queued.
        for (key, meta) in chunks {
            self.shared.wait_written(key, meta.generation);
        }
        let path = self.shared.version_path(fid, file);
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .and_then(|f| {
                // Sparse slots past the last chunk (a longer file of the same version
                // cut by this client) must not show.
                if f.metadata()?.len() != size {
                    f.set_len(size)?;
                }
                Ok(f)
            });
        match opened {
            Ok(f) => Some((file, f)),
            Err(e) => {
                debug!(path = %path.display(), error = %e, "cannot open a version file for passthrough");
                self.unhold(file);
                None
            }
        }
    }

    /// A passthrough open of `file` ended.
    pub fn unhold(&self, file: Generation) {
        let evicted = self.shared.index.lock().unhold(file);
        self.shared.delete(evicted);
    }

    /// Brings a held version file of `fid` to show a newer version, for opens the kernel
    /// can only give this file (it binds one backing file to an inode): `chunks` are the
    /// new version's bytes by index and `size` its length. The one exception to "never
    /// rewritten in place", made only while the file is held.
    pub fn rewrite_held(
        &self,
        fid: Fid,
        file: Generation,
        chunks: &[(u64, Bytes)],
        size: u64,
    ) -> io::Result<()> {
        // No write of its old version still queued may land after these.
        self.barrier();
        let f = OpenOptions::new()
            .write(true)
            .open(self.shared.version_path(fid, file))?;
        for (index, data) in chunks {
            f.write_all_at(data, index * CHUNK_BYTES)?;
        }
        f.set_len(size)?;
        let evicted = self.shared.index.lock().count_held_bytes(file, size);
        self.shared.delete(evicted);
        Ok(())
    }

    /// Waits until every job queued so far is done.
    pub fn barrier(&self) {
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        self.shared.queue(Job::Barrier(done));
        // An error means the writer is gone: nothing is left to wait for.
        let _ = wait.recv();
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Waits until every fetched chunk queued so far has its bytes down (or was dropped).
    #[cfg(test)]
    fn wait_idle(&self) {
        self.barrier();
        let mut pending = self.shared.pending.lock();
        while !pending.is_empty() {
            self.shared.written.wait(&mut pending);
        }
    }
}

impl Drop for ChunkStore {
    /// Lets the writer finish the queued jobs, so none is done after the store is gone
    /// (in a directory that may be reused).
    fn drop(&mut self) {
        self.shared.queue(Job::Stop);
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            warn!("chunk file writer panicked");
        }
    }
}

impl Shared {
    /// A chunk's own file: `VOLUME.VNODE.UNIQUE.INDEX.GENERATION` in the store's directory.
    fn chunk_path(&self, key: ChunkKey, generation: Generation) -> PathBuf {
        let fid = key.fid;
        self.dir.join(format!(
            "{}.{}.{}.{}.{}",
            fid.volume, fid.vnode, fid.unique, key.index, generation.0
        ))
    }

    /// A version file: `VOLUME.VNODE.UNIQUE.vGENERATION` in the store's directory.
    fn version_path(&self, fid: Fid, file: Generation) -> PathBuf {
        self.dir.join(format!(
            "{}.{}.{}.v{}",
            fid.volume, fid.vnode, fid.unique, file.0
        ))
    }

    fn queue(&self, job: Job) {
        // Fails only once the writer stopped, while the store is dropped.
        let _ = self.jobs.lock().send(job);
    }

    /// Reads `out.len()` bytes at `offset` within an indexed chunk from wherever they
    /// are. `false` when the chunk left the cache (a version file's slot is checked
    /// after the read, since an eviction punches it rather than delete a file).
    fn read_at(
        &self,
        key: ChunkKey,
        meta: &ChunkMeta,
        offset: u64,
        out: &mut [u8],
    ) -> io::Result<bool> {
        if out.is_empty() {
            return Ok(true);
        }
        if let Some(data) = self.pending_data(key, meta.generation) {
            // `meta.len` never exceeds the fetched bytes (a pending chunk is clean, so
            // only a truncation changes its length); `get` keeps a slip from panicking.
            let from = offset as usize;
            let Some(bytes) = data.get(from..from + out.len()) else {
                return Ok(false);
            };
            out.copy_from_slice(bytes);
            return Ok(true);
        }
        let (path, at) = match meta.home {
            Home::Own => (self.chunk_path(key, meta.generation), offset),
            Home::Version(file) => (self.version_path(key.fid, file), key.offset() + offset),
        };
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        match file.read_exact_at(out, at) {
            Ok(()) => {}
            // A version file cut short by an eviction or a deletion racing this read.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && meta.home != Home::Own => {
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
        if meta.home == Home::Own {
            return Ok(true);
        }
        Ok(self.index.lock().still_cached(key, meta.generation))
    }

    /// The bytes of the chunk cached under `generation` while they are not down yet.
    fn pending_data(&self, key: ChunkKey, generation: Generation) -> Option<Bytes> {
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

    /// Forgets the pending bytes of the chunk cached under `generation`.
    fn unpend(&self, key: ChunkKey, generation: Generation) {
        let mut pending = self.pending.lock();
        if Shared::is_pending(&pending, key, generation) {
            pending.remove(&key);
            drop(pending);
            self.written.notify_all();
        }
    }

    /// Blocks until the chunk cached under `generation` has its bytes down (or was
    /// dropped). Short: the writer takes queued jobs in order.
    fn wait_written(&self, key: ChunkKey, generation: Generation) {
        let mut pending = self.pending.lock();
        while Shared::is_pending(&pending, key, generation) {
            self.written.wait(&mut pending);
        }
    }

    /// The writer's loop; ends at `Stop`. `freed` gives back one unit of room per write.
    fn write_queued(&self, queue: Receiver<Job>, freed: Receiver<()>) {
        for job in queue {
            match job {
                Job::Write {
                    key,
                    generation,
                    file,
                    data,
                } => {
                    let emptied = self.write_chunk(key, generation, file, &data);
                    let _ = freed.try_recv();
                    // Only a courtesy is lost (giving those callbacks up early): the fids
                    // are dropped from the cache all the same.
                    if !emptied.is_empty() {
                        debug!(
                            count = emptied.len(),
                            "fids emptied by a failed chunk write"
                        );
                    }
                }
                Job::Punch { fid, file, offset } => self.punch(fid, file, offset),
                Job::DeleteVersion { fid, file } => remove_quietly(&self.version_path(fid, file)),
                Job::Barrier(done) => {
                    let _ = done.send(());
                }
                Job::Stop => return,
            }
        }
    }

    /// Puts a fetched chunk's bytes into its version file, then hands readers over to
    /// them. A chunk dropped before the write gets none; one dropped during it had its
    /// punch or deletion queued after this job, which undoes the write. On failure the
    /// chunk leaves the cache; returns the fids that left with it.
    fn write_chunk(
        &self,
        key: ChunkKey,
        generation: Generation,
        file: Generation,
        data: &[u8],
    ) -> Vec<Fid> {
        if !Shared::is_pending(&self.pending.lock(), key, generation) {
            return Vec::new();
        }
        let path = self.version_path(key.fid, file);
        let written = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .and_then(|f| f.write_all_at(data, key.offset()));
        match written {
            Ok(()) => {
                self.unpend(key, generation);
                Vec::new()
            }
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot write a fetched chunk; dropping it");
                let dropped = self.index.lock().drop_generation(key, generation);
                self.unpend(key, generation);
                let emptied = dropped.filter(|e| e.last_of_fid).map(|e| e.key.fid);
                self.delete(dropped.into_iter().collect());
                emptied.into_iter().collect()
            }
        }
    }

    /// Punches a chunk's slot out of a version file, giving its disk space back.
    fn punch(&self, fid: Fid, file: Generation, offset: u64) {
        let path = self.version_path(fid, file);
        let Ok(f) = OpenOptions::new().write(true).open(&path) else {
            return; // deleted already
        };
        // SAFETY: a valid open descriptor and plain integer arguments.
        let rc = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                CHUNK_BYTES as libc::off_t,
            )
        };
        if rc != 0 {
            debug!(path = %path.display(), error = %io::Error::last_os_error(), "cannot punch an evicted chunk's slot");
        }
    }

    /// Releases evicted chunks' bytes (and those still pending); returns the fids left
    /// with no cached data. A chunk file goes by generation, so an old eviction never
    /// deletes a newer file of the same chunk; a version file's slot is punched, and the
    /// file deleted, by the writer, after any write queued before.
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
            let fid = e.key.fid;
            match e.release {
                Release::DeleteChunkFile => remove_quietly(&self.chunk_path(e.key, e.generation)),
                Release::PunchSlot(file) => self.queue(Job::Punch {
                    fid,
                    file,
                    offset: e.key.offset(),
                }),
                Release::DeleteVersionFile(file) => self.queue(Job::DeleteVersion { fid, file }),
                Release::Keep => {}
            }
            if e.last_of_fid {
                emptied.push(fid);
            }
        }
        emptied
    }
}

fn remove_quietly(path: &Path) {
    if let Err(err) = std::fs::remove_file(path)
        && err.kind() != io::ErrorKind::NotFound
    {
        debug!(error = %err, "cannot delete an evicted cache file");
    }
}

#[cfg(test)]
mod tests {
    use proto::{Uniquifier, VnodeId, VolumeId};

    use super::*;
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
        let emptied = store.insert_fetched(key(0), v, Bytes::from_static(b"hello"));
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
    fn more_fetched_chunks_than_the_queue_all_get_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path().join("chunks"), 1 << 30).unwrap();
        let count = 3 * WRITES_QUEUED_MAX as u64;
        for index in 0..count {
            store.insert_fetched(
                key(index),
                DataVersion(1),
                Bytes::from(vec![index as u8; 4096]),
            );
        }
        store.wait_idle();
        assert_eq!(files(&store), 1, "one version file holds them all");
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
            store.insert_fetched(key(index), v, Bytes::from_static(b"12345"));
        }
        assert!(!store.holds(key(0), v), "evicted, pending or not");
        // A new data version drops the rest, pending or not.
        store.drop_stale(key(0).fid, DataVersion(2));
        assert!(store.read(key(1), v, 0, 1).unwrap().is_none());
        assert!(store.read(key(2), DataVersion(2), 0, 1).unwrap().is_none());
        store.wait_idle();
        assert_eq!(files(&store), 0, "no file outlives its chunk");
        // Refetched at the new version, and replaced before its file may be written.
        store.insert_fetched(key(1), DataVersion(2), Bytes::from_static(b"old"));
        store.insert_fetched(key(1), DataVersion(2), Bytes::from_static(b"new"));
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
        store.insert_fetched(key(0), v, Bytes::from_static(b"hello"));
        assert!(store.write(key(0), v, 5, b"!!").unwrap());
        assert_eq!(store.read(key(0), v, 0, 7).unwrap().unwrap(), b"hello!!");
        let dirty = store.dirty_chunks(key(0).fid);
        assert_eq!(
            store.read_whole(dirty[0].0, &dirty[0].1).unwrap(),
            b"hello!!"
        );
        store.insert_fetched(key(1), v, Bytes::from_static(b"world"));
        store.truncate(key(0).fid, CHUNK_BYTES + 2).unwrap();
        assert!(
            store.read(key(1), v, 0, 4).unwrap().is_none(),
            "a version file is never cut in place: its chunk goes"
        );
        store.truncate(key(0).fid, 3).unwrap();
        assert_eq!(store.read(key(0), v, 0, 4).unwrap().unwrap(), b"hel\0");
        store.wait_idle();
        assert_eq!(files(&store), 1, "the written chunk's own file alone");
    }

    fn whole(file: &File) -> Vec<u8> {
        let mut data = vec![0; file.metadata().unwrap().len() as usize];
        file.read_exact_at(&mut data, 0).unwrap();
        data
    }

    #[test]
    fn a_passthrough_open_reads_its_version_until_let_go() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path().join("chunks"), 3 * CHUNK_BYTES).unwrap();
        let (v1, v2) = (DataVersion(1), DataVersion(2));
        let first = Bytes::from(vec![1u8; CHUNK_BYTES as usize]);
        store.insert_fetched(key(0), v1, first.clone());
        assert!(
            store
                .hold_for_passthrough(key(0).fid, v1, CHUNK_BYTES + 3)
                .is_none(),
            "partial"
        );
        store.insert_fetched(key(1), v1, Bytes::from_static(b"abc"));
        assert!(
            store
                .hold_for_passthrough(key(0).fid, v2, CHUNK_BYTES + 3)
                .is_none()
        );
        let (file, held) = store
            .hold_for_passthrough(key(0).fid, v1, CHUNK_BYTES + 3)
            .unwrap();
        let mut expected = first.to_vec();
        expected.extend_from_slice(b"abc");
        assert_eq!(
            whole(&held),
            expected,
            "every byte down before it is handed out"
        );
        // A new version, and other files filling the cache: the held bytes stay.
        store.drop_stale(key(0).fid, v2);
        for vnode in 3..8 {
            let other = ChunkKey {
                fid: Fid {
                    vnode: VnodeId(vnode),
                    ..key(0).fid
                },
                index: 0,
            };
            store.insert_fetched(other, v1, first.clone());
        }
        store.insert_fetched(key(0), v2, Bytes::from_static(b"new"));
        store.wait_idle();
        assert_eq!(whole(&held), expected, "the open keeps its version");
        assert!(store.bytes_used() <= 3 * CHUNK_BYTES + 3);
        // Brought to the new version for an open the kernel can only give this file.
        store
            .rewrite_held(key(0).fid, file, &[(0, Bytes::from_static(b"new"))], 3)
            .unwrap();
        assert_eq!(whole(&held), b"new");
        store.unhold(file);
        store.wait_idle();
        let version_files = std::fs::read_dir(store.dir())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains(".2.1.v")
            })
            .count();
        assert_eq!(
            version_files, 1,
            "the held file is gone, the new version's stays"
        );
        assert_eq!(store.read(key(0), v2, 0, 3).unwrap().unwrap(), b"new");
    }
}
