//! Why the fileserver could not run: the one error its `run` returns, with a message
//! that says what to do.
//! Invariant: a journal failure says that the server stopped so that nothing goes
//! unjournaled, and what to fix.

use std::path::PathBuf;

use thiserror::Error;

use crate::state_journal::StateJournalError;
use crate::storage::StorageError;

/// Why the fileserver could not run.
#[derive(Debug, Error)]
pub enum FileServerError {
    #[error("open partition: {0}")]
    Partition(#[from] StorageError),
    #[error("open partition: the opening task failed: {0}")]
    Task(String),
    #[error(transparent)]
    Journal(#[from] StateJournalError),
    #[error(
        "the recovered callback and lock state could not be snapshotted; the log says why (a full or failing disk?)"
    )]
    RestoreSnapshot,
    #[error(
        "{0}; the fileserver stopped so that no lock or callback promise goes unjournaled: fix the disk (full or failing?) and start it again, and clients reclaim their locks and callbacks"
    )]
    JournalFailed(String),
    #[error(
        "partition {path} is in use by another fileserver ({lock} is locked); stop it or use another partition"
    )]
    PartitionInUse { path: PathBuf, lock: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The failure of a journal whose stop nobody was waiting for any more.
pub const JOURNAL_FAILED_LATE: &str =
    "the state journal failed while the term ended (the log says why)";
