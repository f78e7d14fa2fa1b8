//! The partition's file system as the metadata log and the volume databases see it: the
//! real one behind the fence, or (in tests) `MemDisk`, which can cut power at any write.
//! Invariant: the log and every `meta.redb` change durable state only through `Disk`,
//! so whatever a crash can leave behind is whatever a `Disk` can leave behind.

use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use crate::fence::{Fence, FencedFile};

/// A file read and written at offsets (a log segment or a redb file).
pub trait DiskFile: Send + Sync + Debug {
    fn len(&self) -> io::Result<u64>;
    /// Fills `out` from `offset`; fails if the file ends first.
    fn read_at(&self, offset: u64, out: &mut [u8]) -> io::Result<()>;
    fn write_at(&self, offset: u64, bytes: &[u8]) -> io::Result<()>;
    /// Cuts or extends (with zeros) the file to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes every byte written so far, and the length, durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;
}

/// The directory and file operations of a partition.
pub trait Disk: Send + Sync + Debug {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Names of the entries (files and directories) directly in `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Opens `path` for reading and writing, creating it (empty) with `create`.
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn DiskFile>>;
    /// The redb backend of the database file at `path` (created with `create`).
    fn database(&self, path: &Path, create: bool) -> io::Result<DatabaseBackend>;
    /// Renames a file or a whole directory.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    fn remove_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Makes creations, renames and removals in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// A redb backend from any `Disk`: redb takes one concrete type.
#[derive(Debug)]
pub struct DatabaseBackend(Box<dyn redb::StorageBackend>);

impl DatabaseBackend {
    pub fn new(backend: impl redb::StorageBackend) -> DatabaseBackend {
        DatabaseBackend(Box::new(backend))
    }
}

impl redb::StorageBackend for DatabaseBackend {
    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.0.read(offset, out)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write(offset, data)
    }
    fn close(&self) -> io::Result<()> {
        self.0.close()
    }
}

/// The real file system, every change behind the fence (and no file locks: see
/// `FencedFile`).
#[derive(Debug)]
pub struct OsDisk {
    fence: Arc<Fence>,
}

impl OsDisk {
    pub fn new(fence: Arc<Fence>) -> OsDisk {
        OsDisk { fence }
    }
}

#[derive(Debug)]
struct OsFile {
    file: File,
    fence: Arc<Fence>,
}

impl DiskFile for OsFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn read_at(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(out, offset)
    }

    fn write_at(&self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.fence.check()?;
        self.file.write_all_at(bytes, offset)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.fence.check()?;
        self.file.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.fence.check()?;
        self.file.sync_data()
    }
}

fn open_file(path: &Path, create: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(path)
}

impl Disk for OsDisk {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.fence.check()?;
        std::fs::create_dir_all(dir)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            if let Ok(name) = entry?.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn DiskFile>> {
        if create {
            self.fence.check()?;
        }
        Ok(Arc::new(OsFile {
            file: open_file(path, create)?,
            fence: self.fence.clone(),
        }))
    }

    fn database(&self, path: &Path, create: bool) -> io::Result<DatabaseBackend> {
        let file = open_file(path, create)?;
        Ok(DatabaseBackend::new(FencedFile::new(
            file,
            self.fence.clone(),
        )))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.fence.check()?;
        std::fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.fence.check()?;
        std::fs::remove_file(path)
    }

    fn remove_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.fence.check()?;
        std::fs::remove_dir_all(dir)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.fence.check()?;
        File::open(dir)?.sync_all()
    }
}
