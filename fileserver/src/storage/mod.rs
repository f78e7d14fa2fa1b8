//! Volume storage on one partition directory.
//!
//! Layout:
//!
//! ```text
//! PARTITION/
//!   server.id              the server's UUID as text; written once (temp, fsync, rename)
//!   vol.<id>/              one directory per volume, <id> in decimal
//!     meta.redb            redb database, the volume's metadata (tables below)
//!     data/<vnode>         one plain file per file vnode that ever got data, <vnode> decimal
//!   vol.<id>.creating/     a volume being built; removed at start (creation is a rename)
//!   vol.<id>.removing/     a volume being deleted; removed at start
//! ```
//!
//! `meta.redb` tables (values are postcard, each record starts with a format version):
//! - `volume`:  `"header"` -> `VolumeHeader` (id, name, type, quota, created, bytes used,
//!   vnode count, next vnode number).
//! - `vnodes`:  vnode number (u64) -> `VnodeRecord` (kind, mode, uid, gid, size, data
//!   version, link count, uniquifier, atime/mtime/ctime, parent directory, and the content
//!   of a symlink or mount point).
//! - `entries`: (directory vnode, name) -> (vnode, uniquifier, kind code): ordered, so a
//!   listing is a range scan that resumes after any name.
//!
//! Invariants:
//! - Vnode numbers are never reused (`next_vnode` only grows), so a fid of a removed
//!   vnode is always `Stale`; uniquifiers are therefore always 1 today.
//! - A crash never leaves file data changed under an unchanged data version: a store
//!   commits the DV bump durably first, then writes and fdatasyncs the data file, and only
//!   then replies. A crash in between leaves new DV over old (or partly new) data, which a
//!   client treats as changed and refetches.
//! - Every metadata change is one durable redb transaction; every request that changes a
//!   directory bumps its DV by exactly 1.
//! - A directory's `size` is its entry count; its link count is 2 + its subdirectories.

mod partition;
mod records;
mod volume;

#[cfg(test)]
mod tests;

pub use partition::Partition;
pub use records::{VnodeRecord, VolumeHeader};
pub use volume::{Created, Removed, Renamed, Volume};

use std::path::PathBuf;

use proto::ErrorCode;
use thiserror::Error;

/// Errors of the storage boundary.
#[derive(Debug, Error)]
pub enum StorageError {
    /// A definite answer for the client (no such entry, exists, quota...).
    #[error("{0}")]
    Refused(ErrorCode),
    #[error("database {path}: {source}")]
    Database {
        path: PathBuf,
        #[source]
        source: redb::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt record in {path}: {detail}")]
    Corrupt { path: PathBuf, detail: String },
}

impl From<ErrorCode> for StorageError {
    fn from(code: ErrorCode) -> Self {
        StorageError::Refused(code)
    }
}

impl StorageError {
    /// The code the client gets. Internal failures become `Internal` (or `NoSpace`).
    pub fn code(&self) -> ErrorCode {
        match self {
            StorageError::Refused(code) => code.clone(),
            StorageError::Io { source, .. }
                if source.raw_os_error() == Some(libc::ENOSPC)
                    || source.raw_os_error() == Some(libc::EDQUOT) =>
            {
                ErrorCode::NoSpace
            }
            other => ErrorCode::Internal(other.to_string()),
        }
    }

    /// True for answers that are normal protocol outcomes, not server trouble.
    pub fn is_refusal(&self) -> bool {
        matches!(self, StorageError::Refused(_))
    }
}

pub(crate) fn io_error(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> StorageError {
    let path = path.into();
    move |source| StorageError::Io { path, source }
}
