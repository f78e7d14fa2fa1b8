//! Open handles of one volume's data files, so that a stream of stores and fetches of one
//! file does not open and close it per call, and so that concurrent syncs of one file
//! share one `fdatasync`.
//! Invariant: at most `DATA_FILES_OPEN_MAX` handles, and a live vnode's cached handle is
//! its file at `data/<vnode>` now: forgotten before an unlink, replaced on a rewrite; a
//! sync returns only after an `fdatasync` that started after the call.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind};
use std::ops::Deref;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};
use proto::VnodeId;

use super::{StorageError, io_error};
use crate::fence::Fence;

/// Most open data files one volume keeps. Each costs one descriptor; a write-back
/// touches one file at a time, so a few dozen cover the files in use.
pub(super) const DATA_FILES_OPEN_MAX: usize = 32;

/// A volume's `data/` directory and its open files.
///
/// Callers use handles under the vnode's data lock, which orders every replacement and
/// removal of a live vnode's file against its users. The one exception, removing the
/// vnode itself, commits the removal first, so a store racing it (opened before the
/// unlink) writes to an unlinked file, or leaves a handle or an orphan file of a vnode
/// nobody reads again (vnode numbers are never reused).
pub(super) struct DataFiles {
    dir: PathBuf,
    open: Mutex<OpenFiles>,
    /// Checked before every write, sync, truncation and removal of a data file.
    fence: Arc<Fence>,
}

struct OpenFiles {
    /// vnode -> (handle, last use), `last use` from `clock`.
    files: HashMap<u64, (Arc<DataFile>, u64)>,
    clock: u64,
}

/// An open data file and its syncs.
pub(super) struct DataFile {
    file: File,
    syncs: SharedSync,
}

impl Deref for DataFile {
    type Target = File;

    fn deref(&self) -> &File {
        &self.file
    }
}

impl DataFile {
    fn new(file: File) -> DataFile {
        DataFile {
            file,
            syncs: SharedSync::default(),
        }
    }
}

/// The `fdatasync`s of one open file, shared: a caller waits for the first sync that
/// starts after its call (so it covers every write answered before), and callers that
/// arrive while one runs share the next, so any number of concurrent callers cost at
/// most two syncs.
#[derive(Default)]
struct SharedSync {
    state: Mutex<SyncState>,
    finished: Condvar,
}

#[derive(Default)]
struct SyncState {
    /// Syncs started and finished so far; at most one runs at a time.
    started: u64,
    finished: u64,
    running: bool,
    /// Callers waiting for a sync to end.
    waiting: usize,
    /// The last sync that failed, and its error.
    failed: Option<(u64, ErrorKind, Option<i32>)>,
}

impl SharedSync {
    /// Returns once a sync by `run` that started after this call has ended: its
    /// outcome, shared by every caller it covered.
    fn sync(&self, run: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        let mut state = self.state.lock();
        let needed = state.started + 1;
        loop {
            if state.finished >= needed {
                return match state.failed {
                    // The sync that covered this caller failed, or a later one: the
                    // kernel may have dropped the pages either left unwritten.
                    Some((at, kind, raw)) if at >= needed => Err(match raw {
                        Some(raw) => io::Error::from_raw_os_error(raw),
                        None => io::Error::from(kind),
                    }),
                    _ => Ok(()),
                };
            }
            if !state.running {
                state.running = true;
                state.started += 1;
                let this = state.started;
                drop(state);
                let result = run();
                let mut state = self.state.lock();
                state.running = false;
                state.finished = this;
                if let Err(e) = &result {
                    state.failed = Some((this, e.kind(), e.raw_os_error()));
                }
                self.finished.notify_all();
                return result;
            }
            state.waiting += 1;
            self.finished.wait(&mut state);
            state.waiting -= 1;
        }
    }
}

impl DataFiles {
    pub(super) fn new(dir: PathBuf, fence: Arc<Fence>) -> DataFiles {
        DataFiles {
            dir,
            fence,
            open: Mutex::new(OpenFiles {
                files: HashMap::new(),
                clock: 0,
            }),
        }
    }

    /// Refuses a write to `path` once the fence closed.
    pub(super) fn check_fence(&self, path: &Path) -> Result<(), StorageError> {
        self.fence.check().map_err(io_error(path))
    }

    pub(super) fn path(&self, vnode: VnodeId) -> PathBuf {
        self.dir.join(vnode.0.to_string())
    }

    /// The vnode's data file, opened for reading and writing; `None` if there is none
    /// and `create` is false. A created file's directory entry is made durable at once,
    /// or a crash could lose data acknowledged under its DV.
    pub(super) fn get(
        &self,
        vnode: VnodeId,
        create: bool,
    ) -> Result<Option<Arc<DataFile>>, StorageError> {
        if let Some(file) = self.cached(vnode) {
            return Ok(Some(file));
        }
        let path = self.path(vnode);
        // Opened outside the table's lock: an open is a system call or two, and a
        // second opener of the same file only finds its handle cached already.
        let file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == ErrorKind::NotFound && create => {
                self.check_fence(&path)?;
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)
                    .map_err(io_error(&path))?;
                file.sync_all().map_err(io_error(&path))?;
                sync_dir(&self.dir)?;
                file
            }
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error(&path)(e)),
        };
        let mut open = self.open.lock();
        if let Some((cached, _)) = open.files.get(&vnode.0) {
            return Ok(Some(Arc::clone(cached)));
        }
        let file = Arc::new(DataFile::new(file));
        open.insert(vnode, Arc::clone(&file));
        Ok(Some(file))
    }

    /// Makes every write to `file` answered before this call durable (`fdatasync`),
    /// sharing the sync with concurrent callers (`SharedSync`).
    pub(super) fn sync_data(&self, vnode: VnodeId, file: &DataFile) -> Result<(), StorageError> {
        let path = self.path(vnode);
        self.check_fence(&path)?;
        file.syncs
            .sync(|| file.sync_data())
            .map_err(io_error(&path))
    }

    /// Asks the kernel to start writing `length` bytes at `offset` of `file` to disk now
    /// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), so that a write-back's data flows to
    /// the disk while the rest of it arrives and its one `fdatasync` at close finds
    /// little left to write. A hint: it makes nothing durable, and a failure is left
    /// to that sync to report.
    pub(super) fn start_writeback(&self, file: &DataFile, offset: u64, length: u64) {
        let (Ok(offset), Ok(length)) = (i64::try_from(offset), i64::try_from(length)) else {
            return;
        };
        // SAFETY: a plain system call on a descriptor `file` keeps open; no memory is
        // passed.
        unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                offset,
                length,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }

    /// Writes the vnode's whole new data file (`content`, then `data` at `offset`,
    /// `size` bytes in all) and makes it and its directory entry durable; the new file
    /// replaces any cached handle.
    pub(super) fn write_new(
        &self,
        vnode: VnodeId,
        content: &[u8],
        offset: u64,
        data: &[u8],
        size: u64,
    ) -> Result<(), StorageError> {
        let path = self.path(vnode);
        self.check_fence(&path)?;
        // Forgotten first: a handle of the file this one replaces must not be used.
        self.open.lock().files.remove(&vnode.0);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io_error(&path))?;
        let written = (|| {
            self.write_all_at(&file, content, 0)?;
            self.write_all_at(&file, data, offset)?;
            file.set_len(size)?;
            self.sync(&file)
        })()
        .map_err(io_error(&path));
        if let Err(e) = written {
            // Nothing points to the file yet: free its space for the next try.
            drop(file);
            self.remove(vnode);
            return Err(e);
        }
        sync_dir(&self.dir)?;
        self.open
            .lock()
            .insert(vnode, Arc::new(DataFile::new(file)));
        Ok(())
    }

    /// `FileExt::write_at`, where tests can make a write fail part way (`faults`).
    pub(super) fn write_at(&self, file: &File, data: &[u8], offset: u64) -> io::Result<usize> {
        #[cfg(test)]
        if let Some(allowed) = faults::take_write(data.len()) {
            return match allowed {
                0 => Err(io::Error::from_raw_os_error(libc::ENOSPC)),
                n => file.write_at(&data[..n], offset),
            };
        }
        file.write_at(data, offset)
    }

    fn write_all_at(&self, file: &File, mut data: &[u8], mut offset: u64) -> io::Result<()> {
        while !data.is_empty() {
            match self.write_at(file, data, offset) {
                Ok(0) => return Err(io::Error::from(ErrorKind::WriteZero)),
                Ok(n) => {
                    data = &data[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// `File::sync_all`, where tests can make it fail (`faults`).
    fn sync(&self, file: &File) -> io::Result<()> {
        #[cfg(test)]
        if faults::take_sync() {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        file.sync_all()
    }

    /// Forgets the vnode's handle and unlinks its data file, if any.
    pub(super) fn remove(&self, vnode: VnodeId) {
        self.open.lock().files.remove(&vnode.0);
        let path = self.path(vnode);
        if self.fence.check().is_err() {
            // A fenced member leaves the file: an orphan, never lost data.
            return;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "could not remove an unused data file")
            }
        }
    }

    fn cached(&self, vnode: VnodeId) -> Option<Arc<DataFile>> {
        let mut open = self.open.lock();
        open.clock += 1;
        let now = open.clock;
        open.files.get_mut(&vnode.0).map(|(file, used)| {
            *used = now;
            Arc::clone(file)
        })
    }
}

impl OpenFiles {
    /// Caches `file` for `vnode`, closing the least recently used handle beyond the
    /// limit (a caller still using it keeps its own reference).
    fn insert(&mut self, vnode: VnodeId, file: Arc<DataFile>) {
        self.clock += 1;
        self.files.insert(vnode.0, (file, self.clock));
        if self.files.len() > DATA_FILES_OPEN_MAX
            && let Some(oldest) = self
                .files
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(vnode, _)| *vnode)
        {
            self.files.remove(&oldest);
        }
    }
}

fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))
}

/// Failures a test arms on its own thread for the next data-file writes and syncs.
#[cfg(test)]
pub(super) mod faults {
    use std::cell::Cell;

    thread_local! {
        /// Bytes the next writes may still write before one fails with `ENOSPC`.
        static WRITE_BYTES_LEFT: Cell<Option<u64>> = const { Cell::new(None) };
        static SYNC_FAILS: Cell<bool> = const { Cell::new(false) };
    }

    /// Writes on this thread fail with `ENOSPC` once `bytes` more were written.
    pub(in crate::storage) fn fail_writes_after(bytes: u64) {
        WRITE_BYTES_LEFT.set(Some(bytes));
    }

    /// The next sync of a new data file on this thread fails with `EIO`.
    pub(in crate::storage) fn fail_next_sync() {
        SYNC_FAILS.set(true);
    }

    /// Disarms every fault of this thread.
    pub(in crate::storage) fn clear() {
        WRITE_BYTES_LEFT.set(None);
        SYNC_FAILS.set(false);
    }

    /// How much of a write of `wanted` bytes may go through, if a fault is armed.
    pub(super) fn take_write(wanted: usize) -> Option<usize> {
        let left = WRITE_BYTES_LEFT.get()?;
        let allowed = left.min(wanted as u64);
        WRITE_BYTES_LEFT.set(Some(left - allowed));
        Some(allowed as usize)
    }

    pub(super) fn take_sync() -> bool {
        SYNC_FAILS.replace(false)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use super::*;

    #[test]
    fn concurrent_syncs_share_one_and_each_waits_for_one_started_after_its_call() {
        let shared = Arc::new(SharedSync::default());
        let runs = Arc::new(AtomicU64::new(0));
        // A sync is running (held open by `release`) when eight callers arrive.
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let (began, started) = std::sync::mpsc::channel::<()>();
        let first = {
            let (shared, runs) = (shared.clone(), runs.clone());
            std::thread::spawn(move || {
                shared.sync(|| {
                    runs.fetch_add(1, Ordering::SeqCst);
                    began.send(()).unwrap();
                    hold.recv().unwrap();
                    Ok(())
                })
            })
        };
        started.recv().unwrap();
        let waiters: Vec<_> = (0..8)
            .map(|_| {
                let (shared, runs) = (shared.clone(), runs.clone());
                std::thread::spawn(move || {
                    // Each needs a sync that starts after now, not the running one.
                    let needed = shared.state.lock().started + 1;
                    shared
                        .sync(|| {
                            runs.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(5));
                            Ok(())
                        })
                        .unwrap();
                    assert!(shared.state.lock().finished >= needed);
                })
            })
            .collect();
        // Every waiter queues behind the running sync; then it ends.
        while shared.state.lock().waiting < 8 {
            std::thread::yield_now();
        }
        release.send(()).unwrap();
        first.join().unwrap().unwrap();
        for waiter in waiters {
            waiter.join().unwrap();
        }
        assert_eq!(
            runs.load(Ordering::SeqCst),
            2,
            "the running sync and one shared"
        );
    }

    #[test]
    fn a_failed_sync_fails_every_caller_it_covered() {
        let shared = SharedSync::default();
        let failed = shared.sync(|| Err(io::Error::from_raw_os_error(libc::EIO)));
        assert_eq!(failed.unwrap_err().raw_os_error(), Some(libc::EIO));
        // A caller arriving afterwards needs a sync of its own, which succeeds.
        shared.sync(|| Ok(())).unwrap();
    }

    #[test]
    fn handles_are_bounded_least_recently_used_first_and_replaced_when_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let files = DataFiles::new(dir.path().to_owned(), Arc::new(Fence::open()));
        assert!(files.get(VnodeId(1), false).unwrap().is_none());
        let first = files.get(VnodeId(1), true).unwrap().unwrap();
        for vnode in 2..=DATA_FILES_OPEN_MAX as u64 + 1 {
            // Vnode 1 stays the most recently used one.
            files.get(VnodeId(1), false).unwrap();
            files.get(VnodeId(vnode), true).unwrap();
        }
        let cached: Vec<u64> = files.open.lock().files.keys().copied().collect();
        assert_eq!(cached.len(), DATA_FILES_OPEN_MAX);
        assert!(cached.contains(&1) && !cached.contains(&2));
        let again = files.get(VnodeId(1), false).unwrap().unwrap();
        assert!(Arc::ptr_eq(&first, &again));

        files.write_new(VnodeId(1), b"abc", 3, b"def", 6).unwrap();
        let rewritten = files.get(VnodeId(1), false).unwrap().unwrap();
        assert!(!Arc::ptr_eq(&first, &rewritten));
        let mut read = [0u8; 6];
        rewritten.read_exact_at(&mut read, 0).unwrap();
        assert_eq!(&read, b"abcdef");

        files.remove(VnodeId(1));
        assert!(!files.open.lock().files.contains_key(&1));
        assert!(files.get(VnodeId(1), false).unwrap().is_none());
    }
}
