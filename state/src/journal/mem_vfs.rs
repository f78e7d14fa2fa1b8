//! An in-memory [`Vfs`] that tracks what was written and what was made durable, so that
//! tests can cut power after any operation and recover from what the disk would hold.
//! Invariant: a crash image holds, for each name a directory sync made durable, the bytes
//! a file sync made durable, plus at most a prefix of the bytes written after them.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use parking_lot::Mutex;

use crate::journal::vfs::{DirLock, Vfs, VfsFile};

/// A crash-simulating in-memory file system. Clones share the same files.
///
/// The model is deliberately pessimistic: a created, renamed or removed name only
/// survives a crash after `sync_dir`, and file contents only after `sync_data`;
/// `truncate` is durable at once (the OS implementation syncs it).
#[derive(Clone, Debug, Default)]
pub struct MemVfs {
    state: Arc<Mutex<MemState>>,
}

#[derive(Debug, Default)]
struct MemState {
    names: BTreeMap<PathBuf, u64>,
    durable_names: BTreeMap<PathBuf, u64>,
    inodes: HashMap<u64, Inode>,
    inode_next: u64,
    mutations: u64,
    crash_after: Option<u64>,
    syncs: u64,
    sync_delay: Duration,
}

#[derive(Debug, Default, Clone)]
struct Inode {
    written: Vec<u8>,
    synced: Vec<u8>,
}

impl MemState {
    /// Counts one mutating operation, or fails it if the simulated power is already cut.
    fn mutate(&mut self) -> io::Result<()> {
        if self
            .crash_after
            .is_some_and(|limit| self.mutations >= limit)
        {
            return Err(io::Error::other("simulated power loss"));
        }
        self.mutations += 1;
        Ok(())
    }

    fn inode_of(&self, path: &Path) -> io::Result<u64> {
        self.names
            .get(path)
            .copied()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, path.display().to_string()))
    }
}

struct MemFile {
    state: Arc<Mutex<MemState>>,
    inode: u64,
}

impl VfsFile for MemFile {
    fn write_all(&self, bytes: &[u8]) -> io::Result<()> {
        let mut state = self.state.lock();
        state.mutate()?;
        if let Some(inode) = state.inodes.get_mut(&self.inode) {
            inode.written.extend_from_slice(bytes);
        }
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let delay = self.state.lock().sync_delay;
        if !delay.is_zero() {
            // A slow disk: lets concurrent appenders queue up behind one sync, as on hardware.
            thread::sleep(delay);
        }
        let mut state = self.state.lock();
        state.mutate()?;
        state.syncs += 1;
        if let Some(inode) = state.inodes.get_mut(&self.inode) {
            inode.synced = inode.written.clone();
        }
        Ok(())
    }
}

impl MemVfs {
    pub fn new() -> MemVfs {
        MemVfs::default()
    }

    /// Cuts the power after `mutations` more mutating operations (writes, syncs, creations,
    /// renames, removals, truncations): every later one fails.
    pub fn crash_after(&self, mutations: u64) {
        let mut state = self.state.lock();
        state.crash_after = Some(state.mutations + mutations);
    }

    /// Makes every file sync take `delay`, as a real disk does.
    pub fn set_sync_delay(&self, delay: Duration) {
        self.state.lock().sync_delay = delay;
    }

    /// Mutating operations performed so far.
    pub fn mutations(&self) -> u64 {
        self.state.lock().mutations
    }

    /// File syncs performed so far.
    pub fn syncs(&self) -> u64 {
        self.state.lock().syncs
    }

    /// What the disk holds after a power loss now: durable names with their synced bytes,
    /// plus, for each file, the prefix of its unsynced bytes that `keep(path, unsynced)`
    /// chooses (its result is capped at the unsynced length).
    pub fn crash_image(&self, keep: &mut dyn FnMut(&Path, usize) -> usize) -> MemVfs {
        let state = self.state.lock();
        let mut image = MemState::default();
        for (path, id) in &state.durable_names {
            let Some(inode) = state.inodes.get(id) else {
                continue;
            };
            let mut bytes = inode.synced.clone();
            if let Some(unsynced) = inode.written.strip_prefix(inode.synced.as_slice()) {
                let kept = keep(path, unsynced.len()).min(unsynced.len());
                bytes.extend_from_slice(&unsynced[..kept]);
            }
            let id = image.inode_next;
            image.inode_next += 1;
            image.inodes.insert(
                id,
                Inode {
                    written: bytes.clone(),
                    synced: bytes,
                },
            );
            image.names.insert(path.clone(), id);
            image.durable_names.insert(path.clone(), id);
        }
        MemVfs {
            state: Arc::new(Mutex::new(image)),
        }
    }

    /// Replaces the contents of `path` (durably), for tests that damage files.
    pub fn overwrite(&self, path: &Path, bytes: Vec<u8>) -> io::Result<()> {
        let mut state = self.state.lock();
        let id = state.inode_of(path)?;
        if let Some(inode) = state.inodes.get_mut(&id) {
            inode.written = bytes.clone();
            inode.synced = bytes;
        }
        Ok(())
    }
}

impl Vfs for MemVfs {
    fn create_dir_all(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }

    fn lock_dir(&self, _dir: &Path) -> io::Result<DirLock> {
        Ok(Box::new(()))
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let state = self.state.lock();
        Ok(state
            .names
            .keys()
            .filter(|path| path.parent() == Some(dir))
            .filter_map(|path| path.file_name()?.to_str().map(str::to_owned))
            .collect())
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let state = self.state.lock();
        let id = state.inode_of(path)?;
        Ok(state
            .inodes
            .get(&id)
            .map(|inode| inode.written.clone())
            .unwrap_or_default())
    }

    fn create(&self, path: &Path) -> io::Result<Arc<dyn VfsFile>> {
        let mut state = self.state.lock();
        state.mutate()?;
        let id = state.inode_next;
        state.inode_next += 1;
        state.inodes.insert(id, Inode::default());
        state.names.insert(path.to_path_buf(), id);
        Ok(Arc::new(MemFile {
            state: self.state.clone(),
            inode: id,
        }))
    }

    fn truncate(&self, path: &Path, len: u64) -> io::Result<()> {
        let mut state = self.state.lock();
        state.mutate()?;
        let id = state.inode_of(path)?;
        if let Some(inode) = state.inodes.get_mut(&id) {
            inode.written.truncate(len as usize);
            inode.synced = inode.written.clone();
        }
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.state.lock();
        state.mutate()?;
        let id = state.inode_of(from)?;
        state.names.remove(from);
        state.names.insert(to.to_path_buf(), id);
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut state = self.state.lock();
        state.mutate()?;
        state.inode_of(path)?;
        state.names.remove(path);
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.state.lock();
        state.mutate()?;
        let in_dir = |path: &PathBuf| path.parent() == Some(dir);
        state.durable_names.retain(|path, _| !in_dir(path));
        let current: Vec<(PathBuf, u64)> = state
            .names
            .iter()
            .filter(|(path, _)| in_dir(path))
            .map(|(path, id)| (path.clone(), *id))
            .collect();
        state.durable_names.extend(current);
        Ok(())
    }
}
