//! Volume storage on one partition directory, laid out as `docs/fileserver.md` draws it:
//! per volume, a redb database of metadata and small files, and plain larger data files;
//! per partition, the metadata log every change goes through first.
//! Invariant: every metadata change is durable (in the log) before it is answered, and a
//! store is all or nothing: a failed one leaves a file's size, data version and bytes
//! as they were.

mod acl;
mod checkpoint;
mod data;
mod data_files;
pub(crate) mod disk;
mod group_commit;
#[cfg(test)]
pub(crate) mod mem_disk;
pub mod metadata_log;
mod namespace;
mod outcomes;
mod partition;
mod records;
mod redo;
mod tables;
mod transaction;
mod vnode_lock;
mod volume;

#[cfg(test)]
mod log_tests;

#[cfg(test)]
mod posix_tests;
#[cfg(test)]
mod store_tests;
#[cfg(test)]
mod tests;

pub use acl::Governed;
pub use data::StoreCondition;
pub use metadata_log::{LogConfig, LogError, LogFigures};
pub use namespace::{Ahead, Created, Removed, Renamed};
pub use outcomes::{Answer, Outcome, SEQ_WINDOW, SequenceKey};
pub use partition::{CHECKPOINT_PERIOD, Partition, PartitionConfig, server_id_of};
pub use records::{VnodeRecord, VolumeHeader};
pub use volume::Volume;

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
    /// The metadata log failed, or recovery found it damaged.
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("corrupt record in {path}: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    /// The group commit holding this request failed (the cause is in `detail`; every
    /// request of the batch gets it), so the request changed nothing.
    #[error("write batch on {path} failed: {detail}")]
    BatchFailed { path: PathBuf, detail: String },
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

    /// True when a closed fence refused the write (see `crate::fence`).
    pub fn is_fenced(&self) -> bool {
        crate::fence::refused(self)
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
