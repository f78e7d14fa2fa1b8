//! The state journal's file system: the real one behind the fence, without the directory
//! lock that a stopped pair member would keep (see `FencedFile`).
//! Invariant: no journal write, sync, creation, truncation, rename or removal gets past a
//! closed fence.

use std::io;
use std::path::Path;
use std::sync::Arc;

use state::journal::{DirLock, OsVfs, Vfs, VfsFile};

use super::Fence;

/// `OsVfs` behind the fence.
#[derive(Debug)]
pub struct FencedVfs {
    fence: Arc<Fence>,
}

impl FencedVfs {
    pub fn new(fence: Arc<Fence>) -> FencedVfs {
        FencedVfs { fence }
    }
}

struct FencedJournalFile {
    file: Arc<dyn VfsFile>,
    fence: Arc<Fence>,
}

impl VfsFile for FencedJournalFile {
    fn write_all(&self, bytes: &[u8]) -> io::Result<()> {
        self.fence.check()?;
        self.file.write_all(bytes)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.fence.check()?;
        self.file.sync_data()
    }
}

impl Vfs for FencedVfs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.fence.check()?;
        OsVfs.create_dir_all(dir)
    }

    /// No lock, for the reason `FencedFile` gives; a single server holds `server.lock`.
    fn lock_dir(&self, _dir: &Path) -> io::Result<DirLock> {
        Ok(Box::new(()))
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        OsVfs.list(dir)
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        OsVfs.read(path)
    }

    fn create(&self, path: &Path) -> io::Result<Arc<dyn VfsFile>> {
        self.fence.check()?;
        Ok(Arc::new(FencedJournalFile {
            file: OsVfs.create(path)?,
            fence: self.fence.clone(),
        }))
    }

    fn truncate(&self, path: &Path, len: u64) -> io::Result<()> {
        self.fence.check()?;
        OsVfs.truncate(path, len)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.fence.check()?;
        OsVfs.rename(from, to)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        self.fence.check()?;
        OsVfs.remove(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.fence.check()?;
        OsVfs.sync_dir(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_writes_after_the_deadline_fail_and_reach_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let fence = Arc::new(Fence::open());
        let vfs = FencedVfs::new(fence.clone());
        let path = dir.path().join("segment");
        let file = vfs.create(&path).unwrap();
        file.write_all(b"before").unwrap();
        fence.close();
        assert!(file.write_all(b"after").is_err());
        assert!(file.sync_data().is_err());
        assert!(vfs.remove(&path).is_err());
        assert!(vfs.create(&dir.path().join("other")).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"before");
    }
}
