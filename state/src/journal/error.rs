//! The journal's error boundary: what opening, appending, snapshotting and recovering can
//! report.
//! Invariant: damage that stops recovery is always `Corrupt`, naming the file and the
//! offset where the damaged structure starts, never a bare I/O or decode error.

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::journal::Lsn;

/// Errors from the journal and the snapshot files.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// A file-system operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A file holds bytes that no crash of ours can explain: recovery stops here rather than
    /// silently dropping acknowledged records.
    #[error("{path} is corrupt at byte {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: Damage,
    },
    /// An earlier write or sync failed. After a failed fsync the kernel may have dropped the
    /// dirty pages, so nothing written since the last good sync can be trusted; the journal
    /// refuses further work until it is reopened (and recovered) from disk.
    #[error("journal unusable after an earlier failure: {0}")]
    Poisoned(String),
    /// A record larger than the format allows.
    #[error("record of {len} bytes exceeds the limit of {max} bytes")]
    RecordTooLarge { len: usize, max: usize },
    /// A snapshot was asked for a position not yet appended, or older than the last one.
    #[error(
        "cannot snapshot at {requested}: journal holds {last_appended}, last snapshot {last_snapshot}"
    )]
    SnapshotPosition {
        requested: Lsn,
        last_appended: Lsn,
        last_snapshot: Lsn,
    },
}

impl JournalError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        JournalError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

/// What is wrong with a header, a record frame or a snapshot chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Damage {
    /// The bytes end before the structure does.
    Incomplete,
    /// The file does not start with the expected magic.
    BadMagic,
    /// A format version this build does not read.
    UnsupportedVersion(u32),
    /// The header checksum does not match.
    HeaderChecksum,
    /// A record or chunk checksum does not match.
    Checksum,
    /// A length field larger than the format allows.
    LengthTooLarge(u64),
    /// A record or segment carries the wrong sequence number.
    Sequence { expected: Lsn, found: Lsn },
    /// A file's name disagrees with its header.
    NameMismatch,
    /// Bytes follow the last structure of the file.
    TrailingBytes,
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Damage::Incomplete => f.write_str("incomplete structure"),
            Damage::BadMagic => f.write_str("bad magic"),
            Damage::UnsupportedVersion(v) => write!(f, "unsupported format version {v}"),
            Damage::HeaderChecksum => f.write_str("header checksum mismatch"),
            Damage::Checksum => f.write_str("checksum mismatch"),
            Damage::LengthTooLarge(len) => write!(f, "length {len} exceeds the format limit"),
            Damage::Sequence { expected, found } => {
                write!(f, "sequence number {found}, expected {expected}")
            }
            Damage::NameMismatch => f.write_str("file name disagrees with the header"),
            Damage::TrailingBytes => f.write_str("trailing bytes after the last chunk"),
        }
    }
}
