//! `Attr`: what the core tells the adapter of a file; `AttrOut`: for how long it holds.
//! Invariant: built from a cached status, with a TTL that never outlives its callback.

use std::time::{Duration, SystemTime};

use proto::{FileKind, VnodeStatus};

use crate::inode::Ino;

/// A vnode as the kernel sees it: a mount point shows as the directory it leads to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeKind {
    File,
    Directory,
    Symlink,
}

impl From<FileKind> for NodeKind {
    fn from(kind: FileKind) -> NodeKind {
        match kind {
            FileKind::File => NodeKind::File,
            FileKind::Directory | FileKind::MountPoint => NodeKind::Directory,
            FileKind::Symlink => NodeKind::Symlink,
        }
    }
}

/// A file's attributes under its inode number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    pub kind: NodeKind,
    /// The size this client sees: the server's, or further when writes are unstored.
    pub size: u64,
    /// Permission bits (`0o7777` at most).
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

impl Attr {
    pub fn new(ino: Ino, status: &VnodeStatus, size: u64) -> Attr {
        Attr {
            ino,
            kind: status.kind.into(),
            size,
            perm: (status.mode & 0o7777) as u16,
            nlink: status.link_count,
            uid: status.uid,
            gid: status.gid,
            atime: status.atime.into(),
            mtime: status.mtime.into(),
            ctime: status.ctime.into(),
        }
    }
}

/// What an entry or attribute reply needs: the attributes and how long they hold.
#[derive(Clone, Copy, Debug)]
pub struct AttrOut {
    pub attr: Attr,
    pub ttl: Duration,
}
