//! The records kept in a volume's `meta.redb`, and their encoding.
//! Invariant: every record starts with its format version; decoding checks it and
//! reports anything else as corruption rather than guessing.

use proto::{
    DataVersion, Fid, FileKind, Timestamp, Uniquifier, VnodeId, VnodeStatus, VolumeId, VolumeName,
    VolumeType,
};
use serde::{Deserialize, Serialize};

/// Format version of `VolumeHeader` and `VnodeRecord`.
pub const RECORD_FORMAT: u16 = 1;

/// A volume's header: identity, accounting and the vnode number allocator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeHeader {
    pub format: u16,
    pub id: VolumeId,
    pub name: VolumeName,
    pub kind: VolumeType,
    /// 0 means no quota.
    pub quota_bytes: u64,
    pub created: Timestamp,
    /// Sum of the sizes of the volume's files.
    pub bytes_used: u64,
    pub vnode_count: u64,
    /// The next vnode number to hand out; never decreases.
    pub next_vnode: u64,
}

/// One vnode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VnodeRecord {
    pub format: u16,
    pub kind: FileKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// File length; entry count for a directory; content length for a symlink or mount point.
    pub size: u64,
    pub data_version: DataVersion,
    pub link_count: u32,
    pub unique: Uniquifier,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    /// The directory holding a directory (itself for the root); unused for other kinds,
    /// which may have several.
    pub parent: VnodeId,
    /// A symlink's target or a mount point's `#volume.`.
    pub content: Option<String>,
}

impl VnodeRecord {
    pub fn new(kind: FileKind, mode: u32, uid: u32, gid: u32, parent: VnodeId) -> VnodeRecord {
        let now = Timestamp::now();
        VnodeRecord {
            format: RECORD_FORMAT,
            kind,
            mode: mode & 0o7777,
            uid,
            gid,
            size: 0,
            data_version: DataVersion(1),
            link_count: if kind == FileKind::Directory { 2 } else { 1 },
            unique: Uniquifier(1),
            atime: now,
            mtime: now,
            ctime: now,
            parent,
            content: None,
        }
    }

    pub fn status(&self, volume: VolumeId, vnode: VnodeId) -> VnodeStatus {
        VnodeStatus {
            fid: Fid {
                volume,
                vnode,
                unique: self.unique,
            },
            kind: self.kind,
            mode: self.mode,
            link_count: self.link_count,
            size: self.size,
            data_version: self.data_version,
            uid: self.uid,
            gid: self.gid,
            atime: self.atime,
            mtime: self.mtime,
            ctime: self.ctime,
        }
    }

    /// Records a change to data or directory contents: DV +1, mtime and ctime now.
    pub fn touch_data(&mut self, now: Timestamp) {
        self.data_version = self.data_version.next();
        self.mtime = now;
        self.ctime = now;
    }
}

/// The kind code stored in a directory entry.
pub fn kind_code(kind: FileKind) -> u8 {
    match kind {
        FileKind::File => 0,
        FileKind::Directory => 1,
        FileKind::Symlink => 2,
        FileKind::MountPoint => 3,
    }
}

pub fn kind_from_code(code: u8) -> Option<FileKind> {
    match code {
        0 => Some(FileKind::File),
        1 => Some(FileKind::Directory),
        2 => Some(FileKind::Symlink),
        3 => Some(FileKind::MountPoint),
        _ => None,
    }
}
