//! `PARTITION/server.lock`: the flock that keeps two single fileservers off a partition.
//! Invariant: held, exclusive, for as long as a single server serves; pair members never
//! take it, their lease keeps them apart.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::Path;

use crate::error::FileServerError;

const LOCK_FILE: &str = "server.lock";

/// Takes the partition's lock, or says who holds it. Blocking. The volumes' redb files
/// and the journal take no locks of their own (a stopped pair member would keep them and
/// block its partner), so a single server takes this one instead.
pub fn take(partition: &Path) -> Result<File, FileServerError> {
    let io = |source| FileServerError::Io {
        path: partition.to_owned(),
        source,
    };
    std::fs::create_dir_all(partition).map_err(io)?;
    let path = partition.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| FileServerError::Io {
            path: path.clone(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(FileServerError::PartitionInUse {
            path: partition.to_owned(),
            lock: path,
        }),
        Err(TryLockError::Error(source)) => Err(FileServerError::Io { path, source }),
    }
}
