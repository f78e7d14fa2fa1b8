//! `CacheError`: everything that can stop the cache manager from starting, mounting or
//! answering an `fs` command.
//! Invariant: each message says what failed and, where a person can act, what to do.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum CacheError {
    #[error("mount point {} does not exist; create it first", path.display())]
    MountPointMissing { path: PathBuf },
    #[error("mount point {} is not a directory", path.display())]
    MountPointNotDirectory { path: PathBuf },
    /// `names`: the first few entries, `count`: how many there are in all, so that a
    /// person sees at once what is in the way (often a file an application wrote while
    /// nothing was mounted there).
    #[error(
        "mount point {} is not empty: it holds {count} {} ({names}); move {} out of the way and try again",
        path.display(),
        if *count == 1 { "entry" } else { "entries" },
        if *count == 1 { "it" } else { "them" }
    )]
    MountPointNotEmpty {
        path: PathBuf,
        count: usize,
        names: String,
    },
    #[error("mount point {} is already mounted; unmount it first (umount {})", path.display(), path.display())]
    MountPointBusy { path: PathBuf },
    #[error("cannot use cache directory {}: {source}", path.display())]
    CacheDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("client id file {} is corrupt; remove it to get a new client id", path.display())]
    ClientIdCorrupt { path: PathBuf },
    #[error(
        "cannot reach the VLDB of cell {cell} at {addresses}: {source}; is a vlserver running?"
    )]
    VldbUnreachable {
        cell: String,
        addresses: String,
        source: proto::ProtoError,
    },
    #[error("the VLDB has no volume {volume}; create it with `holdfast vos create {volume}`")]
    NoSuchVolume { volume: String },
    #[error("VLDB lookup of volume {volume} failed: {source}")]
    Vldb {
        volume: String,
        source: proto::ProtoError,
    },
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot mount on {}: {source}", path.display())]
    Mount {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot unmount {}: {source}", path.display())]
    Unmount {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the control socket {}: {source}", path.display())]
    ControlSocket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("path {} is not inside a holdfast mount", path.display())]
    NotInMount { path: PathBuf },
    #[error("cannot examine {}: {source}", path.display())]
    Path {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no holdfast mount found on this machine; start one with `holdfast mount`")]
    NoMount,
    #[error("cannot talk to the cache manager at {}: {message}; is `holdfast mount` running?", socket.display())]
    Control { socket: PathBuf, message: String },
    #[error("{0}")]
    Refused(String),
    /// `--over-guard` was asked for, but what is mounted at the mount point is not an
    /// empty read-only tmpfs (the guard `holdfast up` puts there).
    #[error("mount point {} has no guard under it (an empty read-only tmpfs): {what}; let `holdfast up` mount it, or mount without --over-guard", path.display())]
    MountPointUnguarded { path: PathBuf, what: String },
}
