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
    /// Special files: the kernel serves their opens itself, never this client.
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

impl From<FileKind> for NodeKind {
    fn from(kind: FileKind) -> NodeKind {
        match kind {
            FileKind::File => NodeKind::File,
            FileKind::Directory | FileKind::MountPoint => NodeKind::Directory,
            FileKind::Symlink => NodeKind::Symlink,
            FileKind::Fifo => NodeKind::Fifo,
            FileKind::Socket => NodeKind::Socket,
            FileKind::CharDevice { .. } => NodeKind::CharDevice,
            FileKind::BlockDevice { .. } => NodeKind::BlockDevice,
        }
    }
}

/// A device node's number as the kernel's FUSE attributes carry it (32 bits, the
/// encoding of glibc's `makedev` for majors below 4096 and minors below 2^20, which is
/// all a FUSE `mknod` can make); 0 for any other kind, or a number too wide to tell.
fn device_number(kind: FileKind) -> u32 {
    match kind {
        FileKind::CharDevice { rdev } | FileKind::BlockDevice { rdev } => {
            u32::try_from(rdev).unwrap_or(0)
        }
        _ => 0,
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
    /// A device node's number; 0 for other kinds.
    pub rdev: u32,
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
            rdev: device_number(status.kind),
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
