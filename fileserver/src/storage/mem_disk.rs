//! An in-memory `Disk` that keeps apart what was written and what was made durable, so
//! that tests cut power after any write and reopen the partition from what would be left.
//! Invariant: a crash image holds each durable name with its file's synced bytes, plus
//! the prefix of the later writes (in their order) that the test chooses to keep.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use super::disk::{DatabaseBackend, Disk, DiskFile};

/// A crash-simulating in-memory disk; clones share the same files.
///
/// Pessimistic like the state journal's `MemVfs`: a file's bytes survive a crash only
/// once synced, a created, renamed or removed file name only once its directory is
/// synced. Directories are simpler: made and renamed durably at once (the partition
/// syncs its root after each), and a removed one is gone at once.
#[derive(Clone, Debug, Default)]
pub struct MemDisk {
    state: Arc<Mutex<State>>,
    /// Signalled when syncs are let through again (`stall_syncs`).
    resumed: Arc<Condvar>,
}

#[derive(Debug, Default)]
struct State {
    dirs: BTreeSet<PathBuf>,
    names: BTreeMap<PathBuf, u64>,
    durable_names: BTreeMap<PathBuf, u64>,
    inodes: HashMap<u64, Inode>,
    inode_next: u64,
    mutations: u64,
    crash_after: Option<u64>,
    syncs: u64,
    /// Syncs wait while set: a disk that fell behind.
    stalled: bool,
}

/// One unsynced change to a file's bytes, kept in order for crash images.
#[derive(Clone, Debug)]
enum Pending {
    Write { offset: u64, bytes: Vec<u8> },
    SetLen(u64),
}

#[derive(Clone, Debug, Default)]
struct Inode {
    current: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<Pending>,
}

fn apply(bytes: &mut Vec<u8>, change: &Pending) {
    match change {
        Pending::Write {
            offset,
            bytes: data,
        } => {
            let start = *offset as usize;
            let end = start + data.len();
            if bytes.len() < end {
                bytes.resize(end, 0);
            }
            bytes[start..end].copy_from_slice(data);
        }
        Pending::SetLen(len) => bytes.resize(*len as usize, 0),
    }
}

impl State {
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

    fn change(&mut self, inode: u64, change: Pending) -> io::Result<()> {
        self.mutate()?;
        let inode = self
            .inodes
            .get_mut(&inode)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "removed file"))?;
        apply(&mut inode.current, &change);
        inode.pending.push(change);
        Ok(())
    }
}

/// How much of a file's unsynced changes a crash image keeps: the first `changes`
/// whole, then `torn_bytes` of the next one if it is a write.
#[derive(Clone, Copy, Debug, Default)]
pub struct Kept {
    pub changes: usize,
    pub torn_bytes: usize,
}

#[derive(Debug)]
struct MemFile {
    state: Arc<Mutex<State>>,
    resumed: Arc<Condvar>,
    inode: u64,
}

impl DiskFile for MemFile {
    fn len(&self) -> io::Result<u64> {
        let state = self.state.lock();
        Ok(state
            .inodes
            .get(&self.inode)
            .map_or(0, |inode| inode.current.len() as u64))
    }

    fn read_at(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let state = self.state.lock();
        let bytes = state
            .inodes
            .get(&self.inode)
            .map(|inode| &inode.current[..])
            .unwrap_or_default();
        let start = offset as usize;
        let slice = bytes
            .get(start..start + out.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end"))?;
        out.copy_from_slice(slice);
        Ok(())
    }

    fn write_at(&self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.state.lock().change(
            self.inode,
            Pending::Write {
                offset,
                bytes: bytes.to_vec(),
            },
        )
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.state.lock().change(self.inode, Pending::SetLen(len))
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut state = self.state.lock();
        while state.stalled {
            self.resumed.wait(&mut state);
        }
        state.mutate()?;
        state.syncs += 1;
        if let Some(inode) = state.inodes.get_mut(&self.inode) {
            inode.durable = inode.current.clone();
            inode.pending.clear();
        }
        Ok(())
    }
}

impl redb::StorageBackend for MemFile {
    fn len(&self) -> io::Result<u64> {
        DiskFile::len(self)
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.read_at(offset, out)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        DiskFile::set_len(self, len)
    }
    fn sync_data(&self) -> io::Result<()> {
        DiskFile::sync_data(self)
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.write_at(offset, data)
    }
}

impl MemDisk {
    pub fn new() -> MemDisk {
        MemDisk::default()
    }

    /// Cuts the power after `mutations` more writes, length changes, syncs, creations,
    /// renames or removals: every later one fails.
    pub fn crash_after(&self, mutations: u64) {
        let mut state = self.state.lock();
        state.crash_after = Some(state.mutations + mutations);
    }

    /// Makes every file sync wait (`true`) until let through again (`false`).
    pub fn stall_syncs(&self, stalled: bool) {
        self.state.lock().stalled = stalled;
        self.resumed.notify_all();
    }

    /// Mutating operations so far.
    pub fn mutations(&self) -> u64 {
        self.state.lock().mutations
    }

    /// File syncs so far.
    pub fn syncs(&self) -> u64 {
        self.state.lock().syncs
    }

    /// What the disk holds after a power loss now: the durable names, each with its
    /// synced bytes and the part of its later changes that `keep(path, changes)` keeps
    /// (`changes`: how many there are).
    pub fn crash_image(&self, keep: &mut dyn FnMut(&Path, usize) -> Kept) -> MemDisk {
        let state = self.state.lock();
        let mut image = State {
            dirs: state.dirs.clone(),
            ..State::default()
        };
        for (path, id) in &state.durable_names {
            let Some(inode) = state.inodes.get(id) else {
                continue;
            };
            let mut bytes = inode.durable.clone();
            let kept = keep(path, inode.pending.len());
            for change in inode.pending.iter().take(kept.changes) {
                apply(&mut bytes, change);
            }
            if let Some(Pending::Write {
                offset,
                bytes: data,
            }) = inode.pending.get(kept.changes)
            {
                let torn = Pending::Write {
                    offset: *offset,
                    bytes: data[..kept.torn_bytes.min(data.len())].to_vec(),
                };
                apply(&mut bytes, &torn);
            }
            let id = image.inode_next;
            image.inode_next += 1;
            image.inodes.insert(
                id,
                Inode {
                    current: bytes.clone(),
                    durable: bytes,
                    pending: Vec::new(),
                },
            );
            image.names.insert(path.clone(), id);
            image.durable_names.insert(path.clone(), id);
        }
        MemDisk {
            state: Arc::new(Mutex::new(image)),
            resumed: Arc::default(),
        }
    }

    /// The current bytes of `path`, for tests that damage files.
    pub fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let state = self.state.lock();
        let id = state.inode_of(path)?;
        Ok(state.inodes[&id].current.clone())
    }

    /// Replaces the bytes of `path` durably, for tests that damage files.
    pub fn overwrite(&self, path: &Path, bytes: Vec<u8>) -> io::Result<()> {
        let mut state = self.state.lock();
        let id = state.inode_of(path)?;
        let inode = state.inodes.get_mut(&id).expect("named inode exists");
        inode.current = bytes.clone();
        inode.durable = bytes;
        inode.pending.clear();
        Ok(())
    }

    fn open_inode(&self, path: &Path, create: bool) -> io::Result<u64> {
        let mut state = self.state.lock();
        if let Ok(id) = state.inode_of(path) {
            return Ok(id);
        }
        if !create {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                path.display().to_string(),
            ));
        }
        state.mutate()?;
        let id = state.inode_next;
        state.inode_next += 1;
        state.inodes.insert(id, Inode::default());
        state.names.insert(path.to_path_buf(), id);
        Ok(id)
    }
}

/// The path `path` has once `from` is renamed to `to`, if `from` is it or holds it.
fn renamed(path: &Path, from: &Path, to: &Path) -> Option<PathBuf> {
    path.strip_prefix(from).ok().map(|rest| to.join(rest))
}

fn rename_keys<V: Copy>(map: &mut BTreeMap<PathBuf, V>, from: &Path, to: &Path) {
    let moved: Vec<(PathBuf, V)> = map
        .iter()
        .filter_map(|(path, v)| renamed(path, from, to).map(|new| (new, *v)))
        .collect();
    map.retain(|path, _| renamed(path, from, to).is_none());
    map.extend(moved);
}

impl Disk for MemDisk {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.state.lock();
        for ancestor in dir.ancestors() {
            state.dirs.insert(ancestor.to_path_buf());
        }
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let state = self.state.lock();
        let mut names: BTreeSet<String> = BTreeSet::new();
        let paths = state.names.keys().chain(state.dirs.iter());
        for path in paths {
            if path.parent() == Some(dir)
                && let Some(name) = path.file_name().and_then(|n| n.to_str())
            {
                names.insert(name.to_owned());
            }
        }
        Ok(names.into_iter().collect())
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn DiskFile>> {
        let inode = self.open_inode(path, create)?;
        Ok(Arc::new(MemFile {
            state: self.state.clone(),
            resumed: self.resumed.clone(),
            inode,
        }))
    }

    fn database(&self, path: &Path, create: bool) -> io::Result<DatabaseBackend> {
        let inode = self.open_inode(path, create)?;
        Ok(DatabaseBackend::new(MemFile {
            state: self.state.clone(),
            resumed: self.resumed.clone(),
            inode,
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.state.lock();
        state.mutate()?;
        if state.dirs.contains(from) {
            let dirs: Vec<PathBuf> = state
                .dirs
                .iter()
                .filter_map(|d| renamed(d, from, to))
                .collect();
            state.dirs.retain(|d| renamed(d, from, to).is_none());
            state.dirs.extend(dirs);
            rename_keys(&mut state.names, from, to);
            rename_keys(&mut state.durable_names, from, to);
            return Ok(());
        }
        let id = state.inode_of(from)?;
        state.names.remove(from);
        state.names.insert(to.to_path_buf(), id);
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut state = self.state.lock();
        state.mutate()?;
        state.inode_of(path)?;
        state.names.remove(path);
        Ok(())
    }

    fn remove_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.state.lock();
        state.mutate()?;
        state.dirs.retain(|d| !d.starts_with(dir));
        state.names.retain(|p, _| !p.starts_with(dir));
        state.durable_names.retain(|p, _| !p.starts_with(dir));
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
