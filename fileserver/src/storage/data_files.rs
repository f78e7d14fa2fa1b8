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
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use parking_lot::{Condvar, Mutex};
use proto::VnodeId;
use tracing::debug;

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

/// Reads and writes of at least this many bytes on `DIRECT_ALIGN` boundaries that the
/// page cache does not hold go to the disk directly (`O_DIRECT`); smaller ones are not
/// worth a second descriptor's system call and a copy.
const DIRECT_BYTES_MIN: usize = 256 << 10;
/// The alignment direct I/O asks of offsets, lengths and memory: a page covers every
/// logical block size in use.
const DIRECT_ALIGN: usize = 4096;

/// An open data file, the same file open for direct I/O, and its syncs.
///
/// Why direct I/O: this server's bytes are cached by the clients, which read each file
/// once per version, so copying them through the server's page cache buys little and
/// costs a copy of every byte into pages allocated for it. On a virtual machine whose
/// host reclaims the guest's free memory it costs much more: a store of 2 MiB into
/// fresh page-cache pages measured 6 ms here, the same bytes written directly 1.2 ms.
pub(super) struct DataFile {
    file: File,
    /// Opened at the first large read or write; `None` in it where the filesystem
    /// refuses direct I/O (tmpfs), and then everything goes through the page cache.
    direct: OnceLock<Option<File>>,
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
            direct: OnceLock::new(),
            syncs: SharedSync::default(),
        }
    }

    /// This file opened again with `O_DIRECT` (through `/proc/self/fd`, so that it is
    /// the same inode whatever happened to its path), if the filesystem allows it.
    fn direct(&self) -> Option<&File> {
        self.direct
            .get_or_init(|| {
                let path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
                let opened = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&path);
                match opened {
                    Ok(file) => Some(file),
                    Err(e) => {
                        debug!(error = %e, "no direct I/O for a data file; its bytes go through the page cache");
                        None
                    }
                }
            })
            .as_ref()
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

    /// Writes some of `data` at `offset` of `file`, as `write_at`: a run of at least
    /// `DIRECT_BYTES_MIN` bytes on `DIRECT_ALIGN` boundaries goes to the disk directly,
    /// the bytes before and after it through the page cache (a caller writing all of
    /// `data` calls again for the rest). Durable only after a sync, as any write.
    pub(super) fn write_data(
        &self,
        file: &DataFile,
        data: &[u8],
        offset: u64,
    ) -> io::Result<usize> {
        let head = (offset.next_multiple_of(DIRECT_ALIGN as u64) - offset) as usize;
        let head = head.min(data.len());
        let run = (data.len() - head) / DIRECT_ALIGN * DIRECT_ALIGN;
        // An armed fault fires in `write_at`.
        #[cfg(test)]
        if faults::armed() {
            return self.write_at(file, data, offset);
        }
        if run < DIRECT_BYTES_MIN {
            return self.write_at(file, data, offset);
        }
        if head > 0 {
            return self.write_at(file, &data[..head], offset);
        }
        let Some(direct) = file.direct() else {
            return self.write_at(file, data, offset);
        };
        let written = with_aligned(run, |aligned| {
            aligned.copy_from_slice(&data[..run]);
            direct.write_at(aligned, offset)
        });
        match written {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                debug!(error = %e, "a direct write was refused; writing through the page cache");
                self.write_at(file, data, offset)
            }
            other => other,
        }
    }

    /// Reads some bytes at `offset` of `file` into `buffer`, as `read_at` (0 at the end
    /// of the file): what the page cache holds is copied from it; a run of at least
    /// `DIRECT_BYTES_MIN` bytes from a `DIRECT_ALIGN` boundary that it does not hold is
    /// read from the disk directly, without filling the page cache.
    pub(super) fn read_data(
        &self,
        file: &DataFile,
        buffer: &mut [u8],
        offset: u64,
    ) -> io::Result<usize> {
        match read_cached(file, buffer, offset) {
            Ok(n) => return Ok(n),
            Err(e) if is_not_cached(&e) => {}
            Err(e) => return Err(e),
        }
        let run = buffer.len() / DIRECT_ALIGN * DIRECT_ALIGN;
        let aligned_start = offset.is_multiple_of(DIRECT_ALIGN as u64);
        if let Some(direct) = file
            .direct()
            .filter(|_| aligned_start && run >= DIRECT_BYTES_MIN)
        {
            let read = with_aligned(run, |aligned| {
                let n = direct.read_at(aligned, offset)?;
                buffer[..n].copy_from_slice(&aligned[..n]);
                Ok(n)
            });
            match read {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    debug!(error = %e, "a direct read was refused; reading through the page cache");
                }
                other => return other,
            }
        }
        file.read_at(buffer, offset)
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

/// Runs `io` on `length` bytes of memory aligned for direct I/O, taken from the data
/// path's buffer pool (memory already faulted in) and given back after.
fn with_aligned<T>(length: usize, io: impl FnOnce(&mut [u8]) -> io::Result<T>) -> io::Result<T> {
    let mut buffer = proto::buffer_pool::take(length + DIRECT_ALIGN);
    let pad = buffer.as_ptr().align_offset(DIRECT_ALIGN);
    buffer.resize(pad + length, 0);
    let result = io(&mut buffer[pad..]);
    proto::buffer_pool::give_back(buffer);
    result
}

/// Reads what the page cache holds at `offset` (`preadv2` with `RWF_NOWAIT`): an error
/// `is_not_cached` names when it holds none of it.
fn read_cached(file: &File, buffer: &mut [u8], offset: u64) -> io::Result<usize> {
    let offset = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let iov = libc::iovec {
        iov_base: buffer.as_mut_ptr().cast(),
        iov_len: buffer.len(),
    };
    // SAFETY: `iov` describes `buffer`, which lives and is borrowed mutably for the call.
    let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, offset, libc::RWF_NOWAIT) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// The page cache does not hold the bytes (`EAGAIN`), or the kernel cannot say
/// (`EOPNOTSUPP`, `EINVAL` before Linux 4.14).
fn is_not_cached(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAGAIN | libc::EOPNOTSUPP | libc::EINVAL)
    )
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

    /// Whether a write fault is armed on this thread (writes then go through
    /// `write_at`, where it fires).
    pub(super) fn armed() -> bool {
        WRITE_BYTES_LEFT.get().is_some()
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

    #[test]
    fn large_aligned_runs_bypass_the_page_cache_and_every_byte_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let files = DataFiles::new(dir.path().to_owned(), Arc::new(Fence::open()));
        let file = files.get(VnodeId(1), true).unwrap().unwrap();
        let data: Vec<u8> = (0..3usize << 20)
            .map(|i| (i * 7 + i / 4099) as u8)
            .collect();
        // Off a page boundary: a head through the page cache, a direct run, a tail.
        let start = 1000u64;
        let mut done = 0;
        while done < data.len() {
            done += files
                .write_data(&file, &data[done..], start + done as u64)
                .unwrap();
        }
        if file.direct().is_some() {
            let mut probe = [0u8; DIRECT_ALIGN];
            let e = read_cached(&file, &mut probe, 2 * DIRECT_ALIGN as u64).unwrap_err();
            assert!(
                is_not_cached(&e),
                "the direct run is in the page cache: {e}"
            );
        }
        // Read back from the disk and from the page cache, aligned or not.
        for (at, length) in [(8192, 1 << 20), (start, data.len()), (start + 5, 300_000)] {
            let mut read = vec![0; length];
            let mut n = 0;
            while n < length {
                match files
                    .read_data(&file, &mut read[n..], at + n as u64)
                    .unwrap()
                {
                    0 => break,
                    got => n += got,
                }
            }
            let from = (at - start) as usize;
            assert_eq!(n, length, "read {length} bytes at {at}");
            assert!(read == data[from..from + length], "bytes at {at} differ");
        }
    }
}
