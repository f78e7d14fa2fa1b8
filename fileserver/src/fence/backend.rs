//! The storage backend every volume's redb file is opened on: `pread`/`pwrite` and
//! `fdatasync`, with the fence checked before each write, length change and sync.
//! Invariant: it takes no file lock; the pair lease, or `server.lock` for a single
//! server, keeps a second writer out instead.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::Fence;

/// A redb file behind the fence, with no file lock: a pair member that was stopped
/// (SIGSTOP) keeps every lock it holds, so a lock would block the partner's takeover.
#[derive(Debug)]
pub struct FencedFile {
    file: File,
    fence: Arc<Fence>,
}

impl FencedFile {
    pub fn new(file: File, fence: Arc<Fence>) -> FencedFile {
        FencedFile { file, fence }
    }
}

impl redb::StorageBackend for FencedFile {
    fn len(&self) -> Result<u64, io::Error> {
        Ok(self.file.metadata()?.len())
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.file.read_exact_at(out, offset)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        self.fence.check()?;
        self.file.set_len(len)
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        self.fence.check()?;
        self.file.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        self.fence.check()?;
        self.file.write_all_at(data, offset)
    }
}

#[cfg(test)]
mod tests {
    use redb::{Database, ReadableDatabase, TableDefinition};

    use super::*;

    const TABLE: TableDefinition<u64, u64> = TableDefinition::new("t");

    #[test]
    fn writes_after_the_deadline_fail_and_reach_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        let fence = Arc::new(Fence::open());
        let open = |fence: &Arc<Fence>| {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .unwrap();
            Database::builder()
                .create_with_backend(FencedFile::new(file, fence.clone()))
                .unwrap()
        };
        let db = open(&fence);
        let txn = db.begin_write().unwrap();
        txn.open_table(TABLE).unwrap().insert(1, 10).unwrap();
        txn.commit().unwrap();
        let before = std::fs::read(&path).unwrap();

        fence.close();
        let txn = db.begin_write().unwrap();
        txn.open_table(TABLE).unwrap().insert(2, 20).unwrap();
        let refused = txn.commit().unwrap_err().to_string();
        assert!(refused.contains(super::super::FENCED), "{refused}");
        drop(db);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            before,
            "nothing reached the file"
        );

        // No lock is left behind: a second opener (the partner) gets in at once.
        let reopened = open(&Arc::new(Fence::open()));
        let txn = reopened.begin_read().unwrap();
        let table = txn.open_table(TABLE).unwrap();
        assert_eq!(table.get(1).unwrap().unwrap().value(), 10);
        assert!(table.get(2).unwrap().is_none());
    }
}
