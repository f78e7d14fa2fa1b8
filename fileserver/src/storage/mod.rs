//! Volume storage on one partition directory.
//!
//! Layout:
//!
//! ```text
//! PARTITION/
//!   server.id              the server's UUID as text; written once (temp, fsync, rename)
//!   vol.<id>/              one directory per volume, <id> in decimal
//!     meta.redb            redb database, the volume's metadata and small files (below)
//!     data/<vnode>         the data of a file larger than INLINE_BYTES_MAX, <vnode> decimal
//!   vol.<id>.creating/     a volume being built; removed at start (creation is a rename)
//!   vol.<id>.removing/     a volume being deleted; removed at start
//! ```
//!
//! `meta.redb` tables (values are postcard, each record starts with a format version):
//! - `volume`:  `"header"` -> `VolumeHeader` (format 1: id, name, type, quota, created,
//!   bytes used, vnode count, next vnode number).
//! - `vnodes`:  vnode number (u64) -> `VnodeRecord` (format 2: kind, mode, uid, gid, size,
//!   data version, link count, uniquifier, atime/mtime/ctime, parent directory, the
//!   content of a symlink or mount point, and where a file's data lives, `Inline` or
//!   `File`). Format 1 records, which lack the last field, read as `File`.
//! - `entries`: (directory vnode, name) -> (vnode, uniquifier, kind code): ordered, so a
//!   listing is a range scan that resumes after any name.
//! - `file_data`: vnode -> the bytes of an `Inline` file, exactly `size` of them; no row
//!   while the file is empty. Kept apart from `vnodes` so vnode records stay small.
//! - `outcomes`: (client uuid as u128, instance nonce, seq) -> `OutcomeRecord` (format 1:
//!   the answer of a sequenced namespace change, callback grants stripped), written in
//!   the change's transaction; see `outcomes`.
//!
//! Modules, from the top: `partition` (the volumes of a directory); `volume` (one
//! volume, and the commit every change takes: `group_commit`, and `outcomes` for a
//! sequenced change) with its operations in `namespace` and `data`; `transaction` (a
//! request's reads and changes until they are written); `tables` (the only module that
//! touches a table); `records` (what the tables hold, and its encoding). Beside them:
//! `data_files` (open data files) and `vnode_lock` (per-vnode data locks).
//!
//! Where file data lives: a new file is `Inline`. A store or size change that takes it
//! past `INLINE_BYTES_MAX` (64 KiB) moves it to `data/<vnode>`. A file in a data file
//! stays there when truncated, except truncated to zero (by `SetAttr` or a store with
//! `truncate_to: Some(0)`, as an `O_TRUNC` rewrite does), which brings it back inline
//! and removes the data file. A data file may exist beside an `Inline` record only as
//! the leftover of a crash; it is never read, the next move to a data file truncates it
//! and removing the vnode deletes it.
//!
//! Durability, the contract NFS (`WRITE` unstable + `COMMIT`) and AFS clients rely on:
//! every request's metadata change is committed with `Durability::Immediate` before its
//! answer, and so is inline data. The bytes a store writes into a data file are written
//! (visible to every later fetch) but not synced when it answers; `fsync` (the `Fsync`
//! request a cache manager sends after a file's stores, before `close()` returns)
//! fdatasyncs the data file, so one write-back pays one data sync, not one per store.
//! Concurrent writes to one volume share commits (`group_commit`): the requests queued
//! while a commit is in flight run next, in one transaction, and each is answered once
//! that transaction is durable (refusals too, since they may rest on a change of the
//! batch). A failed batch fails every request in it and changes nothing.
//!
//! Concurrency on one file (`vnode_lock`): fetches share it; stores into its data file
//! share it with each other when their ranges are disjoint (so a write-back's stores in
//! flight share group commits and may arrive in any order: each grows the size to its
//! end if needed and bumps the DV by one in its transaction, quota checked there); all
//! other data changes have the file alone. Open data files are kept per vnode
//! (`data_files`, a bounded LRU) and read and written with `pread`/`pwrite`.
//!
//! Invariants:
//! - Vnode numbers are never reused (`next_vnode` only grows), so a fid of a removed
//!   vnode is always `Stale`; uniquifiers are therefore always 1 today.
//! - A crash never leaves file data changed under an unchanged data version:
//!   - inline data, its size and the DV bump are one transaction (atomic);
//!   - moving to a data file writes the whole file and fsyncs it and `data/` first, then
//!     commits the record that points to it with the bumped DV;
//!   - changing a data file commits the DV bump durably first, then writes the file
//!     (a size change by `SetAttr` or a truncating store is synced), and replies. A crash
//!     before the data is synced leaves new DV over old, partly new or zeroed data,
//!     which a client treats as changed and refetches; a client that needs the bytes
//!     themselves durable sends `Fsync`.
//! - Every metadata change is one durable redb transaction (shared with the other
//!   requests of its batch); Create is exactly one; every request that changes a
//!   directory bumps its DV by exactly 1.
//! - A directory's `size` is its entry count; its link count is 2 + its subdirectories.

mod data;
mod data_files;
mod group_commit;
mod namespace;
mod outcomes;
mod partition;
mod records;
mod tables;
mod transaction;
mod vnode_lock;
mod volume;

#[cfg(test)]
mod tests;

pub use namespace::{Created, Removed, Renamed};
pub use outcomes::{Answer, Outcome, SEQ_WINDOW, SequenceKey};
pub use partition::{Partition, server_id_of};
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
