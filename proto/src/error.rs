//! Errors: the append-only `ErrorCode` that crosses the wire, and `ProtoError` for the
//! framing and connection layer.
//! Invariant: `ErrorCode` variants are only appended, since postcard encodes the variant
//! index and reordering would change the meaning of bytes already in flight.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ids::{DataVersion, Epoch};

/// An error a peer reports in a response. Internal errors never cross the wire as such:
/// they are mapped to one of these at the handler boundary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Error)]
pub enum ErrorCode {
    #[error("no such volume")]
    NoSuchVolume,
    #[error("no such file or directory")]
    NoSuchEntry,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDirectory,
    #[error("is a directory")]
    IsDirectory,
    #[error("directory not empty")]
    NotEmpty,
    #[error("file name too long (at most 255 bytes)")]
    NameTooLong,
    #[error("invalid argument")]
    InvalidArgument,
    #[error("stale file handle: the file was removed")]
    Stale,
    #[error("server busy, try again")]
    Busy,
    #[error("permission denied")]
    PermissionDenied,
    #[error("volume quota exceeded")]
    QuotaExceeded,
    #[error("no space left on the server's partition")]
    NoSpace,
    #[error("not a symbolic link")]
    NotSymlink,
    #[error("cross-volume link or rename")]
    CrossVolume,
    #[error("volume name already exists")]
    VolumeExists,
    #[error("bad volume name: use 1 to 64 characters of A-Z a-z 0-9 . _ -")]
    BadVolumeName,
    #[error("no such server")]
    NoSuchServer,
    #[error("wrong cell: this server belongs to cell {expected}")]
    WrongCell { expected: String },
    #[error("protocol version mismatch: server speaks {min}..={max}")]
    VersionMismatch { min: u16, max: u16 },
    #[error("request not supported by this server")]
    Unsupported,
    #[error("message too large")]
    TooLarge,
    #[error("server is not active for this volume (epoch {epoch}), try {hint:?}")]
    NotActive { epoch: Epoch, hint: Option<String> },
    #[error("server is in its grace period, retry in {retry_ms} ms")]
    Grace { retry_ms: u64 },
    #[error("internal server error: {0}")]
    Internal(String),
    #[error("the server needs the client to reset its callbacks")]
    ResetCallbacks,
    #[error("the server requires a placement: pass --server")]
    ServerRequired,
    #[error("volume is busy with another operation")]
    VolumeBusy,
    #[error("too many links")]
    TooManyLinks,
    #[error("file too large")]
    FileTooLarge,
    #[error("the lock is held by another owner")]
    WouldBlock,
    #[error("too many locks")]
    TooManyLocks,
    #[error("no such lock to reclaim: it was not held before the restart, or grace is over")]
    NotReclaimable,
    #[error("bad pair name: use 1 to 64 characters of A-Z a-z 0-9 . _ -")]
    BadPairName,
    #[error("no such fileserver pair")]
    NoSuchPair,
    #[error("the pair already has two members: {members:?}")]
    PairFull { members: Vec<String> },
    #[error(
        "the pair's lease is held by {active:?} at epoch {epoch} for another {lease_left_ms} ms"
    )]
    LeaseHeld {
        epoch: Epoch,
        active: Option<String>,
        lease_left_ms: u64,
    },
    #[error("the pair's lease was lost: it expired or the epoch moved on to {epoch}")]
    LeaseLost { epoch: Epoch },
    /// A VLDB replica that cannot decide this: it is not the leader (or is behind).
    /// `leader` is the leader's address when the replica knows it.
    #[error("{}", not_leader_text(leader.as_deref()))]
    NotLeader { leader: Option<String> },
    /// A VLDB membership change refused, with why and what to do.
    #[error("{reason}")]
    BadMembership { reason: String },
    /// A `StoreDataIf` refused: the file changed since the version the store was based
    /// on, by someone else or by a newer write-back; it is at `current` now.
    #[error(
        "the file changed on the server (now at data version {current}) since this store was made"
    )]
    StoreOutdated { current: DataVersion },
    /// The request's token was refused: forged, tampered with, expired, or of another
    /// cell (EACCES).
    #[error("token refused: {reason}")]
    BadToken { reason: String },
    /// POSIX forbids the caller this change (chmod or chown by a non-owner, say: EPERM).
    #[error("operation not permitted")]
    NotPermitted,
    /// The request changes the cell and needs `system:administrators`.
    #[error(
        "this needs a member of system:administrators: run `holdfast login admin`, or run it \
         as root on a server host with --localauth"
    )]
    AdministratorRequired,
    /// A protection database request refused: a bad name or id, a full table, a group
    /// that is not one; `reason` says what to do.
    #[error("{reason}")]
    PtsRefused { reason: String },
    /// No user or group of that name.
    #[error("no user or group named {name:?}: see `holdfast pts listentries`")]
    NoSuchPrincipal { name: String },
    /// The name, or the id asked for, is taken.
    #[error("{name} already exists")]
    PrincipalExists { name: String },
}

fn not_leader_text(leader: Option<&str>) -> String {
    match leader {
        Some(leader) => format!("this VLDB replica is not the leader; the leader is {leader}"),
        None => "the VLDB has no leader that this replica knows of: an election is under way, \
                 or it is cut off from a majority of the replicas"
            .to_owned(),
    }
}

impl ErrorCode {
    /// The POSIX errno a mount returns for this error.
    pub fn errno(&self) -> i32 {
        match self {
            ErrorCode::NoSuchVolume | ErrorCode::NoSuchEntry => libc_errno::ENOENT,
            ErrorCode::Exists | ErrorCode::VolumeExists => libc_errno::EEXIST,
            ErrorCode::NotDirectory => libc_errno::ENOTDIR,
            ErrorCode::IsDirectory => libc_errno::EISDIR,
            ErrorCode::NotEmpty => libc_errno::ENOTEMPTY,
            ErrorCode::NameTooLong => libc_errno::ENAMETOOLONG,
            ErrorCode::Stale => libc_errno::ESTALE,
            ErrorCode::Busy | ErrorCode::Grace { .. } | ErrorCode::VolumeBusy => libc_errno::EAGAIN,
            ErrorCode::PermissionDenied
            | ErrorCode::BadToken { .. }
            | ErrorCode::AdministratorRequired => libc_errno::EACCES,
            ErrorCode::NotPermitted => libc_errno::EPERM,
            ErrorCode::QuotaExceeded => libc_errno::EDQUOT,
            ErrorCode::NoSpace => libc_errno::ENOSPC,
            ErrorCode::CrossVolume => libc_errno::EXDEV,
            ErrorCode::TooManyLinks => libc_errno::EMLINK,
            ErrorCode::FileTooLarge => libc_errno::EFBIG,
            ErrorCode::WouldBlock => libc_errno::EAGAIN,
            ErrorCode::TooManyLocks | ErrorCode::NotReclaimable => libc_errno::ENOLCK,
            ErrorCode::LeaseHeld { .. } | ErrorCode::LeaseLost { .. } => libc_errno::EAGAIN,
            ErrorCode::NoSuchPair | ErrorCode::NoSuchPrincipal { .. } => libc_errno::ENOENT,
            ErrorCode::PrincipalExists { .. } => libc_errno::EEXIST,
            ErrorCode::PtsRefused { .. } => libc_errno::EINVAL,
            ErrorCode::NotActive { .. }
            | ErrorCode::ResetCallbacks
            | ErrorCode::NotLeader { .. }
            | ErrorCode::StoreOutdated { .. } => libc_errno::EAGAIN,
            ErrorCode::Unsupported => libc_errno::ENOSYS,
            ErrorCode::TooLarge => libc_errno::E2BIG,
            ErrorCode::InvalidArgument
            | ErrorCode::NotSymlink
            | ErrorCode::BadVolumeName
            | ErrorCode::BadPairName
            | ErrorCode::PairFull { .. }
            | ErrorCode::NoSuchServer
            | ErrorCode::BadMembership { .. }
            | ErrorCode::ServerRequired
            | ErrorCode::WrongCell { .. }
            | ErrorCode::VersionMismatch { .. } => libc_errno::EINVAL,
            ErrorCode::Internal(_) => libc_errno::EIO,
        }
    }
}

/// Linux errno values, kept here so `proto` needs no libc dependency.
pub mod libc_errno {
    pub const EPERM: i32 = 1;
    pub const ENOENT: i32 = 2;
    pub const EIO: i32 = 5;
    pub const E2BIG: i32 = 7;
    pub const EAGAIN: i32 = 11;
    pub const EACCES: i32 = 13;
    pub const EEXIST: i32 = 17;
    pub const EXDEV: i32 = 18;
    pub const ENOTDIR: i32 = 20;
    pub const EISDIR: i32 = 21;
    pub const EINVAL: i32 = 22;
    pub const EFBIG: i32 = 27;
    pub const ENOSPC: i32 = 28;
    pub const EMLINK: i32 = 31;
    pub const ENAMETOOLONG: i32 = 36;
    pub const ENOSYS: i32 = 38;
    pub const ENOTEMPTY: i32 = 39;
    pub const ETIMEDOUT: i32 = 110;
    pub const ESTALE: i32 = 116;
    pub const ENOLCK: i32 = 37;
    pub const EDQUOT: i32 = 122;
}

/// Errors of the framing and connection layer.
#[derive(Debug, Error)]
pub enum ProtoError {
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {length} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge { length: usize, limit: usize },
    #[error("frame checksum mismatch (expected {expected:#010x}, got {actual:#010x})")]
    Checksum { expected: u32, actual: u32 },
    #[error("undecodable message: {0}")]
    Decode(#[from] postcard::Error),
    #[error("handshake failed: {0}")]
    Handshake(String),
    #[error("request timed out after {0:?}")]
    Timeout(std::time::Duration),
    #[error("connection closed")]
    Closed,
    #[error("{0}")]
    Remote(ErrorCode),
    #[error(
        "the peer speaks protocol version {peer}, and this request needs version {needed}: \
         upgrade the peer"
    )]
    PeerTooOld { peer: u16, needed: u16 },
    /// The TLS handshake failed: what the peer presented or refused.
    #[error("TLS: the peer {0}")]
    Tls(String),
}

impl ProtoError {
    /// The error a peer answered with, if this is one.
    pub fn remote(&self) -> Option<&ErrorCode> {
        match self {
            ProtoError::Remote(code) => Some(code),
            _ => None,
        }
    }

    /// True when the peer could not be reached or stopped answering, as opposed to a
    /// definite answer: the caller may retry elsewhere or later.
    pub fn is_transport(&self) -> bool {
        matches!(
            self,
            ProtoError::Io(_) | ProtoError::Timeout(_) | ProtoError::Closed
        )
    }
}
