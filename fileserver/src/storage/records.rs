//! The records kept in a volume's `meta.redb`, and their encoding.
//! Invariant: every record starts with its format version; decoding upgrades the older
//! versions it knows and reports any other as corruption rather than guessing.

use proto::{
    AccessList, ClientId, DataVersion, ErrorCode, Fid, FileKind, InstanceNonce, Response,
    Timestamp, Uniquifier, VnodeId, VnodeStatus, VolumeId, VolumeName, VolumeType, WriteBackId,
};
use serde::{Deserialize, Serialize};

/// Format version of `VolumeHeader`.
pub const HEADER_FORMAT: u16 = 1;
/// Format version of `VnodeRecord`. Version 1 had no `data` field: every file's data
/// lived in a data file; version 2 had no `last_store`.
pub const VNODE_FORMAT: u16 = 3;
const VNODE_FORMAT_V1: u16 = 1;
const VNODE_FORMAT_V2: u16 = 2;
/// Format version of `OutcomeRecord`.
pub const OUTCOME_FORMAT: u16 = 1;
/// Format version of `AclRecord`.
pub const ACL_FORMAT: u16 = 1;

/// Where a file's bytes live. A new file is `Inline`; a store or size change past
/// `INLINE_BYTES_MAX` moves it to `File`, and only a truncation to zero whose data then
/// fits inline brings it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataLocation {
    /// In the `file_data` table, one value of exactly `size` bytes (no row while empty).
    /// A data file beside it is a crash's leftover: never read, truncated by the next
    /// move to a data file and deleted with the vnode.
    Inline,
    /// In `data/<vnode>`; a missing file reads as zeros.
    File,
}

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
    /// The next vnode number to hand out; never decreases, so vnode numbers are never
    /// reused and the fid of a removed vnode is always `Stale` (hence uniquifiers are
    /// always 1 today).
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
    /// A directory's is 2 + its subdirectories.
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
    /// Where a file's data lives; `Inline` (and unused) for other kinds.
    pub data: DataLocation,
    /// The conditional store (`StoreDataIf`) that made the file's current version, if
    /// the last data change was one: the precondition of the writer's next stores.
    pub last_store: Option<StoreMark>,
}

/// A directory's access list, kept in the `acls` table apart from its vnode record (so
/// the vnode format is unchanged and a file's record stays small). A directory without
/// a row has `AccessList::for_new_volume()`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AclRecord {
    pub format: u16,
    pub acl: AccessList,
}

impl AclRecord {
    pub fn encode(acl: &AccessList) -> Result<Vec<u8>, String> {
        postcard::to_allocvec(&AclRecord {
            format: ACL_FORMAT,
            acl: acl.clone(),
        })
        .map_err(|e| e.to_string())
    }

    /// Decodes a stored list; `Err` names what is wrong.
    pub fn decode(bytes: &[u8]) -> Result<AccessList, String> {
        let record: AclRecord = postcard::from_bytes(bytes).map_err(|e| e.to_string())?;
        if record.format != ACL_FORMAT {
            return Err(format!("unknown access list format {}", record.format));
        }
        if record.acl.len() > proto::identity::ACL_ENTRIES_MAX {
            return Err(format!("{} access list entries", record.acl.len()));
        }
        Ok(record.acl)
    }
}

/// Who made a file's data version by a conditional store: the client instance, its
/// write-back, and the version the store left. It speaks for the file only while
/// `version` is the file's data version: any other change moves the version past it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreMark {
    pub client: ClientId,
    pub instance: InstanceNonce,
    pub write_back: WriteBackId,
    pub version: DataVersion,
}

/// `VnodeRecord` as format 2 wrote it.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct VnodeRecordV2 {
    format: u16,
    kind: FileKind,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    data_version: DataVersion,
    link_count: u32,
    unique: Uniquifier,
    atime: Timestamp,
    mtime: Timestamp,
    ctime: Timestamp,
    parent: VnodeId,
    content: Option<String>,
    data: DataLocation,
}

impl VnodeRecordV2 {
    fn upgrade(self) -> VnodeRecord {
        VnodeRecord {
            format: VNODE_FORMAT,
            kind: self.kind,
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            size: self.size,
            data_version: self.data_version,
            link_count: self.link_count,
            unique: self.unique,
            atime: self.atime,
            mtime: self.mtime,
            ctime: self.ctime,
            parent: self.parent,
            content: self.content,
            data: self.data,
            last_store: None,
        }
    }
}

/// `VnodeRecord` as format 1 wrote it.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct VnodeRecordV1 {
    format: u16,
    kind: FileKind,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    data_version: DataVersion,
    link_count: u32,
    unique: Uniquifier,
    atime: Timestamp,
    mtime: Timestamp,
    ctime: Timestamp,
    parent: VnodeId,
    content: Option<String>,
}

impl VnodeRecordV1 {
    fn upgrade(self) -> VnodeRecord {
        VnodeRecord {
            format: VNODE_FORMAT,
            kind: self.kind,
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            size: self.size,
            data_version: self.data_version,
            link_count: self.link_count,
            unique: self.unique,
            atime: self.atime,
            mtime: self.mtime,
            ctime: self.ctime,
            parent: self.parent,
            content: self.content,
            data: DataLocation::File,
            last_store: None,
        }
    }
}

impl VnodeRecord {
    /// Sets the attributes `attrs` names, but its `size` (a change of the data, which
    /// the caller makes).
    pub fn apply_attrs(&mut self, attrs: &proto::SetAttrs) {
        if let Some(mode) = attrs.mode {
            self.mode = mode & 0o7777;
        }
        if let Some(uid) = attrs.uid {
            self.uid = uid;
        }
        if let Some(gid) = attrs.gid {
            self.gid = gid;
        }
        if let Some(atime) = attrs.atime {
            self.atime = atime;
        }
        if let Some(mtime) = attrs.mtime {
            self.mtime = mtime;
        }
    }

    pub fn new(kind: FileKind, mode: u32, uid: u32, gid: u32, parent: VnodeId) -> VnodeRecord {
        let now = Timestamp::now();
        VnodeRecord {
            format: VNODE_FORMAT,
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
            data: DataLocation::Inline,
            last_store: None,
        }
    }

    /// Decodes a stored record of any known format; `Err` names what is wrong.
    pub fn decode(bytes: &[u8]) -> Result<VnodeRecord, String> {
        let (format, _) = postcard::take_from_bytes::<u16>(bytes).map_err(|e| e.to_string())?;
        match format {
            VNODE_FORMAT => postcard::from_bytes(bytes).map_err(|e| e.to_string()),
            VNODE_FORMAT_V2 => postcard::from_bytes::<VnodeRecordV2>(bytes)
                .map(|old| {
                    debug_assert_eq!(old.format, VNODE_FORMAT_V2);
                    old.upgrade()
                })
                .map_err(|e| e.to_string()),
            VNODE_FORMAT_V1 => postcard::from_bytes::<VnodeRecordV1>(bytes)
                .map(|old| {
                    debug_assert_eq!(old.format, VNODE_FORMAT_V1);
                    old.upgrade()
                })
                .map_err(|e| e.to_string()),
            other => Err(format!("unknown format {other}")),
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

/// The recorded answer of a sequenced namespace change (see `outcomes`), every callback
/// grant stripped.
#[derive(Serialize, Deserialize)]
pub struct OutcomeRecord {
    pub format: u16,
    pub answer: Result<Response, ErrorCode>,
}

/// The kind code stored in a directory entry. A device's number is not in it: only in
/// its vnode record (see `EntryKind`).
pub fn kind_code(kind: FileKind) -> u8 {
    match kind {
        FileKind::File => 0,
        FileKind::Directory => 1,
        FileKind::Symlink => 2,
        FileKind::MountPoint => 3,
        FileKind::Fifo => 4,
        FileKind::Socket => 5,
        FileKind::CharDevice { .. } => 6,
        FileKind::BlockDevice { .. } => 7,
    }
}

/// What a directory entry's kind code says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// The whole kind.
    Known(FileKind),
    /// A device node: its number is in its vnode record.
    Device,
}

pub fn kind_from_code(code: u8) -> Option<EntryKind> {
    match code {
        0 => Some(EntryKind::Known(FileKind::File)),
        1 => Some(EntryKind::Known(FileKind::Directory)),
        2 => Some(EntryKind::Known(FileKind::Symlink)),
        3 => Some(EntryKind::Known(FileKind::MountPoint)),
        4 => Some(EntryKind::Known(FileKind::Fifo)),
        5 => Some(EntryKind::Known(FileKind::Socket)),
        6 | 7 => Some(EntryKind::Device),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use proto::VolumeName;

    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn at(secs: i64, nanos: u32) -> Timestamp {
        Timestamp { secs, nanos }
    }

    /// The bytes stored in `meta.redb` for each record kind: a change here is a change
    /// of the on-disk format, which needs a new format version and an upgrade.
    #[test]
    fn golden_bytes() {
        let header = VolumeHeader {
            format: HEADER_FORMAT,
            id: VolumeId(536_870_913),
            name: VolumeName::parse("root.cell").unwrap(),
            kind: VolumeType::ReadWrite,
            quota_bytes: 1 << 20,
            created: at(1_700_000_000, 5),
            bytes_used: 70_000,
            vnode_count: 3,
            next_vnode: 4,
        };
        let file = VnodeRecord {
            format: VNODE_FORMAT,
            kind: FileKind::File,
            mode: 0o644,
            uid: 1000,
            gid: 100,
            size: 70_000,
            data_version: DataVersion(7),
            link_count: 2,
            unique: Uniquifier(1),
            atime: at(1_700_000_001, 0),
            mtime: at(1_700_000_002, 999_999_999),
            ctime: at(-1, 3),
            parent: VnodeId::ROOT,
            content: None,
            data: DataLocation::File,
            last_store: Some(StoreMark {
                client: ClientId(uuid::Uuid::from_u128(0x0102)),
                instance: InstanceNonce(9),
                write_back: WriteBackId(4),
                version: DataVersion(7),
            }),
        };
        let symlink = VnodeRecord {
            kind: FileKind::Symlink,
            mode: 0o777,
            size: 4,
            link_count: 1,
            parent: VnodeId(3),
            content: Some("../t".into()),
            data: DataLocation::Inline,
            last_store: None,
            ..file.clone()
        };
        let cases = [
            (
                postcard::to_allocvec(&header).unwrap(),
                "01818080800209726f6f742e63656c6c0080804080c49fd50c05f0a2040304",
            ),
            (
                postcard::to_allocvec(&file).unwrap(),
                concat!(
                    "0300a403e80764f0a20407020182c49fd50c0084c49fd50cff93ebdc030103010001",
                    // last_store: Some, the client's 16 bytes, instance, write-back, DV.
                    "01",
                    "1000000000000000000000000000000102",
                    "09",
                    "04",
                    "07"
                ),
            ),
            (
                postcard::to_allocvec(&symlink).unwrap(),
                "0302ff03e807640407010182c49fd50c0084c49fd50cff93ebdc0301030301042e2e2f740000",
            ),
        ];
        for (bytes, golden) in cases {
            assert_eq!(hex(&bytes), golden);
        }
        let mut acl = AccessList::for_new_volume();
        acl.set(
            proto::PrincipalId::ANYUSER,
            proto::Rights::parse("rl").unwrap(),
            false,
        );
        acl.set(
            proto::PrincipalId(1001),
            proto::Rights::parse("d").unwrap(),
            true,
        );
        let bytes = AclRecord::encode(&acl).unwrap();
        // Format 1; positive: 2 entries, each a zigzag varint id (-204, -101) and its rights;
        // negative: 1 entry (1001, d).
        assert_eq!(hex(&bytes), "010297037fc9010301d20f08");
        assert_eq!(AclRecord::decode(&bytes).unwrap(), acl);
        assert!(AclRecord::decode(&[2, 0, 0]).is_err());
        let outcome = |answer| {
            hex(&postcard::to_allocvec(&OutcomeRecord {
                format: OUTCOME_FORMAT,
                answer,
            })
            .unwrap())
        };
        assert_eq!(outcome(Ok(Response::Ok)), "010000");
        assert_eq!(outcome(Err(ErrorCode::Exists)), "010102");
        assert_eq!(
            VnodeRecord::decode(&postcard::to_allocvec(&file).unwrap()).unwrap(),
            file
        );
        let codes: Vec<u8> = [
            FileKind::File,
            FileKind::Directory,
            FileKind::Symlink,
            FileKind::MountPoint,
            FileKind::Fifo,
            FileKind::Socket,
            FileKind::CharDevice { rdev: 1 },
            FileKind::BlockDevice { rdev: 2 },
        ]
        .into_iter()
        .map(kind_code)
        .collect();
        assert_eq!(codes, [0, 1, 2, 3, 4, 5, 6, 7]);
    }

    /// Special files are format 3 records whose kind is one of the variants appended
    /// to `FileKind`: a build without them refuses such a record as corrupt rather than
    /// misreading it, and every other record stays readable by it.
    #[test]
    fn golden_bytes_of_special_files() {
        let fifo = VnodeRecord {
            format: VNODE_FORMAT,
            kind: FileKind::Fifo,
            mode: 0o644,
            uid: 0,
            gid: 5,
            size: 0,
            data_version: DataVersion(1),
            link_count: 1,
            unique: Uniquifier(1),
            atime: at(1, 0),
            mtime: at(2, 0),
            ctime: at(3, 0),
            parent: VnodeId::ROOT,
            content: None,
            data: DataLocation::Inline,
            last_store: None,
        };
        let cases = [
            (FileKind::Fifo, "0304a40300050001010102000400060001000000"),
            (FileKind::Socket, "0305a40300050001010102000400060001000000"),
            (
                FileKind::CharDevice { rdev: 0x0501 },
                "0306810aa40300050001010102000400060001000000",
            ),
            (
                FileKind::BlockDevice { rdev: 0x0803 },
                "03078310a40300050001010102000400060001000000",
            ),
        ];
        for (kind, golden) in cases {
            let record = VnodeRecord {
                kind,
                ..fifo.clone()
            };
            let bytes = postcard::to_allocvec(&record).unwrap();
            assert_eq!(hex(&bytes), golden, "{kind:?}");
            assert_eq!(VnodeRecord::decode(&bytes).unwrap(), record);
            assert_eq!(
                kind_from_code(kind_code(kind)),
                Some(
                    if matches!(
                        kind,
                        FileKind::CharDevice { .. } | FileKind::BlockDevice { .. }
                    ) {
                        EntryKind::Device
                    } else {
                        EntryKind::Known(kind)
                    }
                )
            );
        }
        assert_eq!(kind_from_code(8), None);
    }

    #[test]
    fn format_2_records_decode_with_no_store_mark() {
        let mut current = VnodeRecord::new(FileKind::File, 0o644, 1, 2, VnodeId::ROOT);
        current.size = 70_000;
        current.data = DataLocation::File;
        let old = VnodeRecordV2 {
            format: VNODE_FORMAT_V2,
            kind: current.kind,
            mode: current.mode,
            uid: current.uid,
            gid: current.gid,
            size: current.size,
            data_version: current.data_version,
            link_count: current.link_count,
            unique: current.unique,
            atime: current.atime,
            mtime: current.mtime,
            ctime: current.ctime,
            parent: current.parent,
            content: None,
            data: current.data,
        };
        let bytes = postcard::to_allocvec(&old).unwrap();
        assert_eq!(VnodeRecord::decode(&bytes).unwrap(), current);
        // Format 2's golden bytes of `golden_bytes`' file, as disks hold them.
        let golden = "0200a403e80764f0a20407020182c49fd50c0084c49fd50cff93ebdc030103010001";
        let golden: Vec<u8> = (0..golden.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&golden[i..i + 2], 16).unwrap())
            .collect();
        let decoded = VnodeRecord::decode(&golden).unwrap();
        assert_eq!(decoded.format, VNODE_FORMAT);
        assert_eq!(decoded.size, 70_000);
        assert_eq!(decoded.data_version, DataVersion(7));
        assert_eq!(decoded.data, DataLocation::File);
        assert_eq!(decoded.last_store, None);
    }

    #[test]
    fn format_1_records_decode_as_file_data_and_unknown_formats_are_refused() {
        let mut current = VnodeRecord::new(FileKind::File, 0o644, 1, 2, VnodeId::ROOT);
        current.size = 5;
        let old = VnodeRecordV1 {
            format: VNODE_FORMAT_V1,
            kind: current.kind,
            mode: current.mode,
            uid: current.uid,
            gid: current.gid,
            size: current.size,
            data_version: current.data_version,
            link_count: current.link_count,
            unique: current.unique,
            atime: current.atime,
            mtime: current.mtime,
            ctime: current.ctime,
            parent: current.parent,
            content: None,
        };
        let decoded = VnodeRecord::decode(&postcard::to_allocvec(&old).unwrap()).unwrap();
        assert_eq!(decoded.data, DataLocation::File);
        assert_eq!(
            VnodeRecord {
                data: DataLocation::Inline,
                ..decoded
            },
            current
        );
        let bytes = postcard::to_allocvec(&current).unwrap();
        assert_eq!(VnodeRecord::decode(&bytes).unwrap(), current);
        let mut future = bytes.clone();
        future[0] = 4;
        assert!(VnodeRecord::decode(&future).is_err());
        assert!(VnodeRecord::decode(&[]).is_err());
    }
}
