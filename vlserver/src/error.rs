//! `VldbError`: everything that can go wrong inside the VLDB, and the wire `ErrorCode`
//! each becomes.
//! Invariant: only `Refused` carries a code a peer may act on; every other error crosses
//! as a bare `Internal`.

use std::path::PathBuf;

use proto::ErrorCode;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum VldbError {
    #[error("cannot create the VLDB data directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the VLDB database {path}: {source}")]
    Open {
        path: PathBuf,
        source: redb::DatabaseError,
    },
    #[error("VLDB database {path} has format version {found}; this build reads version {expected}")]
    FormatVersion {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("VLDB storage error: {0}")]
    Storage(#[from] redb::Error),
    #[error("corrupt VLDB record in table {table} at key {key}: {reason}")]
    Corrupt {
        table: &'static str,
        key: String,
        reason: String,
    },
    #[error("cannot encode a VLDB record: {0}")]
    Encode(postcard::Error),
    #[error("volume ids are exhausted: the id counter stands at {next}")]
    IdsExhausted { next: u64 },
    #[error("a VLDB storage task failed: {0}")]
    Task(String),
    /// A request the VLDB refuses for a reason the peer is told.
    #[error("{0}")]
    Refused(ErrorCode),
    #[error(
        "VLDB file {path} is corrupt ({reason}): move it aside and start this replica with \
         an empty --data; it receives the group's state as a snapshot"
    )]
    CorruptFile { path: PathBuf, reason: String },
    #[error("{0}")]
    Config(String),
    #[error("the VLDB replica stopped: {0}")]
    Stopped(String),
    #[error("the VLDB replica could not start Raft: {0}")]
    Raft(String),
    #[error(
        "{path} holds the VLDB of cell {found}, not of {expected}: a replica joins only its own \
         cell; point --data at an empty directory or at this cell's"
    )]
    OtherCell {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error(
        "{path} was bootstrapped with --peers {found}, not {given}: start it with the same \
         --peers, and change the membership with `holdfast vldb add` / `remove`"
    )]
    OtherPeers {
        path: PathBuf,
        found: String,
        given: String,
    },
}

impl VldbError {
    /// The code a peer receives for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            VldbError::Refused(code) => code.clone(),
            _ => ErrorCode::Internal("VLDB storage error; see the vlserver log".into()),
        }
    }
}

/// redb splits its errors by operation; they all mean "storage failed" here.
macro_rules! storage_error_from {
    ($($source:ty),*) => {
        $(impl From<$source> for VldbError {
            fn from(e: $source) -> VldbError {
                VldbError::Storage(redb::Error::from(e))
            }
        })*
    };
}

storage_error_from!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);
