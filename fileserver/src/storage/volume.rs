//! One volume: its metadata database and its data files, and every operation on them.
//! Invariant: see the storage module: never new file data under an old DV, every
//! metadata change durable before its answer (one redb transaction per request, shared
//! by the requests batched into one group commit), directory DV +1 per changing request,
//! file DV +1 per store.
//! Data of one vnode is guarded by a vnode lock (`vnode_lock`) so that a fetch never
//! pairs a new DV with data not yet written, overlapping stores to one file apply in DV
//! order, and a data change planned from a snapshot still holds when its transaction
//! runs. Stores into a data file of disjoint ranges share the lock: they plan nothing
//! from the snapshot, their transaction grows the size from the record it finds.

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::sync_channel;

use proto::{
    DirEntry, ErrorCode, Fid, FileKind, Response, SetAttrs, Timestamp, Uniquifier, VnodeId,
    VnodeStatus, VolumeId, VolumeInfo, VolumeName, VolumeType,
};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::fence::{Fence, FencedFile};

use super::data_files::DataFiles;
use super::group_commit::GroupCommit;
use super::outcomes::{self, Answer, Outcome, SequenceKey};
use super::records::{
    DataLocation, HEADER_FORMAT, VnodeRecord, VolumeHeader, kind_code, kind_from_code,
};
use super::vnode_lock::{Access, VnodeLocks};
use super::{StorageError, io_error};

const HEADER: TableDefinition<&str, &[u8]> = TableDefinition::new("volume");
const VNODES: TableDefinition<u64, &[u8]> = TableDefinition::new("vnodes");
const ENTRIES: TableDefinition<(u64, &str), (u64, u32, u8)> = TableDefinition::new("entries");
const FILE_DATA: TableDefinition<u64, &[u8]> = TableDefinition::new("file_data");
const HEADER_KEY: &str = "header";

/// A directory entry's value: (vnode, uniquifier, kind code).
type EntryValue = (u64, u32, u8);

/// Largest data a single `FetchData` returns.
pub const FETCH_BYTES_MAX: u32 = 1 << 20;
/// Largest file kept inline in `file_data`; a file growing past it moves to a data file.
pub const INLINE_BYTES_MAX: u64 = 64 * 1024;
/// Largest file size accepted (1 TiB).
pub const FILE_BYTES_MAX: u64 = 1 << 40;
/// Longest symlink target, as `PATH_MAX`.
pub const SYMLINK_TARGET_BYTES_MAX: usize = 4096;
/// Most links one file may have.
pub const LINK_COUNT_MAX: u32 = 65_000;

/// The outcome of `create`.
#[derive(Clone, Debug)]
pub struct Created {
    pub status: VnodeStatus,
    pub dir: VnodeStatus,
    /// False when a non-exclusive create found the file already there.
    pub created: bool,
}

/// The outcome of `remove`: the directory's and the removed vnode's new status.
#[derive(Clone, Debug)]
pub struct Removed {
    pub dir: VnodeStatus,
    /// The vnode that lost a link; `link_count` 0 means it is gone.
    pub target: VnodeStatus,
}

/// The outcome of `rename`.
#[derive(Clone, Debug)]
pub struct Renamed {
    pub from_dir: VnodeStatus,
    pub to_dir: VnodeStatus,
    pub moved: VnodeStatus,
    /// The vnode the rename replaced; `link_count` 0 means it is gone.
    pub replaced: Option<VnodeStatus>,
}

/// An open volume.
pub struct Volume {
    id: VolumeId,
    db_path: PathBuf,
    db: Database,
    locks: VnodeLocks,
    files: DataFiles,
    committer: GroupCommit<WriteJob>,
}

/// One request's change, run by whichever thread leads the batch holding it.
type WriteJob = Box<dyn FnOnce(&mut Tx<'_>) -> Applied + Send>;

/// What a job did: whether its `Tx` holds changes to write, and how to answer it once
/// the batch's commit is known.
struct Applied {
    changed: bool,
    answer: Box<dyn FnOnce(Result<(), StorageError>) + Send>,
}

/// How a request changes a file's bytes, planned under the vnode's data lock from a
/// snapshot (`data_version` is the DV it was planned from).
enum DataChange {
    /// Inline data becomes these bytes.
    Inline(Vec<u8>),
    /// The bytes moved to a data file, already written and durable.
    ToFile,
    /// The data file is changed after the commit.
    InFile,
    /// The file was emptied: its data goes back inline with these bytes and the data
    /// file is removed after the commit.
    FromFile(Vec<u8>),
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume").field("id", &self.id).finish()
    }
}

impl Volume {
    /// Makes a new volume in the empty directory `dir`, with its root directory.
    pub fn initialize(
        dir: &Path,
        id: VolumeId,
        name: VolumeName,
        quota_bytes: u64,
        fence: Arc<Fence>,
    ) -> Result<Volume, StorageError> {
        let data_dir = dir.join("data");
        fence.check().map_err(io_error(dir))?;
        std::fs::create_dir_all(&data_dir).map_err(io_error(&data_dir))?;
        let db_path = dir.join("meta.redb");
        let db = open_database(&db_path, true, &fence)?;
        // Every table exists from the start, so readers never meet a missing one.
        let txn = db.begin_write().map_err(db_error(&db_path))?;
        txn.open_table(HEADER).map_err(db_error(&db_path))?;
        txn.open_table(VNODES).map_err(db_error(&db_path))?;
        txn.open_table(ENTRIES).map_err(db_error(&db_path))?;
        txn.open_table(FILE_DATA).map_err(db_error(&db_path))?;
        txn.commit().map_err(db_error(&db_path))?;
        let volume = Volume::with_db(id, db_path, data_dir, db, fence);
        let header = VolumeHeader {
            format: HEADER_FORMAT,
            id,
            name,
            kind: VolumeType::ReadWrite,
            quota_bytes,
            created: Timestamp::now(),
            bytes_used: 0,
            vnode_count: 1,
            next_vnode: VnodeId::ROOT.0 + 1,
        };
        let root = VnodeRecord::new(FileKind::Directory, 0o755, 0, 0, VnodeId::ROOT);
        volume.write(move |tx| {
            tx.header = Some(header);
            tx.header_dirty = true;
            tx.cache.insert(VnodeId::ROOT.0, (None, Some(root)));
            Ok(())
        })?;
        Ok(volume)
    }

    /// Opens an existing volume directory, checking that it is the volume `id`.
    pub fn open(dir: &Path, id: VolumeId, fence: Arc<Fence>) -> Result<Volume, StorageError> {
        let data_dir = dir.join("data");
        let db_path = dir.join("meta.redb");
        let db = open_database(&db_path, false, &fence)?;
        // Volumes of record format 1 predate inline data and lack its table.
        let txn = db.begin_write().map_err(db_error(&db_path))?;
        txn.open_table(FILE_DATA).map_err(db_error(&db_path))?;
        txn.commit().map_err(db_error(&db_path))?;
        let volume = Volume::with_db(id, db_path, data_dir, db, fence);
        let header = volume.header()?;
        if header.id != id {
            return Err(StorageError::Corrupt {
                path: volume.db_path.clone(),
                detail: format!("header names volume {} in the directory of {id}", header.id),
            });
        }
        Ok(volume)
    }

    fn with_db(
        id: VolumeId,
        db_path: PathBuf,
        data_dir: PathBuf,
        db: Database,
        fence: Arc<Fence>,
    ) -> Volume {
        Volume {
            id,
            db_path,
            db,
            locks: VnodeLocks::new(),
            files: DataFiles::new(data_dir, fence),
            committer: GroupCommit::new(),
        }
    }

    pub fn id(&self) -> VolumeId {
        self.id
    }

    pub fn header(&self) -> Result<VolumeHeader, StorageError> {
        self.read(|r| r.header())
    }

    pub fn info(&self) -> Result<VolumeInfo, StorageError> {
        let header = self.header()?;
        Ok(VolumeInfo {
            id: header.id,
            name: header.name,
            kind: header.kind,
            bytes_used: header.bytes_used,
            quota_bytes: header.quota_bytes,
            file_count: header.vnode_count,
            created: header.created,
        })
    }

    // ---- reads ----

    pub fn fetch_status(&self, fid: Fid) -> Result<VnodeStatus, StorageError> {
        self.read(|r| Ok(r.checked(fid)?.status(self.id, fid.vnode)))
    }

    /// Reads up to `length` bytes (capped at `FETCH_BYTES_MAX`) at `offset`.
    pub fn fetch_data(
        &self,
        fid: Fid,
        offset: u64,
        length: u32,
    ) -> Result<(VnodeStatus, Vec<u8>), StorageError> {
        let _guard = self.locks.lock(fid.vnode, Access::Read);
        let (record, inline) = self.read(|r| {
            let record = r.checked(fid)?;
            let inline = if record.kind == FileKind::File && record.data == DataLocation::Inline {
                Some(r.file_data(fid.vnode)?)
            } else {
                None
            };
            Ok((record, inline))
        })?;
        let status = record.status(self.id, fid.vnode);
        let length = u64::from(length.min(FETCH_BYTES_MAX));
        let wanted = record.size.saturating_sub(offset).min(length) as usize;
        let data = match record.kind {
            FileKind::Directory => return Err(ErrorCode::IsDirectory.into()),
            FileKind::Symlink | FileKind::MountPoint => {
                let content = record.content.as_deref().unwrap_or_default().as_bytes();
                let start = (offset.min(content.len() as u64)) as usize;
                content[start..start + wanted.min(content.len() - start)].to_vec()
            }
            FileKind::File => match inline {
                Some(content) => {
                    // Bytes past the stored ones (none, unless damaged) read as zeros.
                    let start = offset.min(content.len() as u64) as usize;
                    let stop = (start + wanted).min(content.len());
                    let mut data = content[start..stop].to_vec();
                    data.resize(wanted, 0);
                    data
                }
                None => self.read_file(fid.vnode, offset, wanted)?,
            },
        };
        Ok((status, data))
    }

    pub fn lookup(&self, dir: Fid, name: &str) -> Result<(VnodeStatus, VnodeStatus), StorageError> {
        proto::check_entry_name(name)?;
        self.read(|r| {
            let dir_record = r.directory(dir)?;
            let (vnode, _, _) = r.entry(dir.vnode, name)?.ok_or(ErrorCode::NoSuchEntry)?;
            let record = r.vnode(VnodeId(vnode))?;
            Ok((
                record.status(self.id, VnodeId(vnode)),
                dir_record.status(self.id, dir.vnode),
            ))
        })
    }

    /// Lists `dir` in name order after `after`: at most `count_max` entries and about
    /// `bytes_max` bytes of names; `more` says whether entries follow.
    pub fn read_dir(
        &self,
        dir: Fid,
        after: Option<&str>,
        count_max: usize,
        bytes_max: usize,
    ) -> Result<(VnodeStatus, Vec<DirEntry>, bool), StorageError> {
        let txn = self.db.begin_read().map_err(db_error(&self.db_path))?;
        let r = Reader {
            txn: &txn,
            path: &self.db_path,
            volume: self.id,
        };
        {
            let dir_record = r.directory(dir)?;
            let table = txn.open_table(ENTRIES).map_err(db_error(&self.db_path))?;
            let lower = match after {
                Some(name) => std::ops::Bound::Excluded((dir.vnode.0, name)),
                None => std::ops::Bound::Included((dir.vnode.0, "")),
            };
            let upper = std::ops::Bound::Excluded((dir.vnode.0 + 1, ""));
            let range = table
                .range::<(u64, &str)>((lower, upper))
                .map_err(db_error(&self.db_path))?;
            let mut entries = Vec::new();
            let mut bytes = 0;
            let mut more = false;
            for item in range {
                let (key, value) = item.map_err(db_error(&self.db_path))?;
                let (_, name) = key.value();
                let (vnode, unique, kind) = value.value();
                if entries.len() >= count_max || bytes + name.len() + 32 > bytes_max {
                    more = true;
                    break;
                }
                bytes += name.len() + 32;
                entries.push(DirEntry {
                    name: name.to_owned(),
                    fid: Fid {
                        volume: self.id,
                        vnode: VnodeId(vnode),
                        unique: Uniquifier(unique),
                    },
                    kind: kind_from_code(kind).ok_or_else(|| StorageError::Corrupt {
                        path: self.db_path.clone(),
                        detail: format!("entry {name:?} has kind code {kind}"),
                    })?,
                });
            }
            Ok((dir_record.status(self.id, dir.vnode), entries, more))
        }
    }

    // ---- data changes ----

    /// Writes `data` at `offset`, after setting the length to `truncate_to` if given.
    /// DV +1. Inline data changes with its record in one transaction; a file growing
    /// past `INLINE_BYTES_MAX` gets a durable data file before the record points to it;
    /// a data file already in use changes only after the DV bump is durable, and is not
    /// synced: `fsync` makes its bytes durable.
    pub fn store_data(
        &self,
        fid: Fid,
        offset: u64,
        data: &[u8],
        truncate_to: Option<u64>,
    ) -> Result<VnodeStatus, StorageError> {
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or(ErrorCode::FileTooLarge)?;
        if end > FILE_BYTES_MAX {
            return Err(ErrorCode::FileTooLarge.into());
        }
        // The common case of a write-back, bytes written into a data file, shares the
        // vnode with stores of other ranges. Where the data lives is checked again
        // under the lock; only an exclusive holder can move it.
        if truncate_to.is_none() && !data.is_empty() && self.in_data_file(fid)? {
            let guard = self
                .locks
                .lock(fid.vnode, Access::StoreRange { start: offset, end });
            if self.in_data_file(fid)? {
                return self.store_into_data_file(fid, offset, data, end);
            }
            drop(guard);
        }
        let _guard = self.locks.lock(fid.vnode, Access::Exclusive);
        let (record, inline) = self.read_file_record(fid)?;
        let base = truncate_to.unwrap_or(record.size);
        let size = if data.is_empty() { base } else { base.max(end) };
        if size > FILE_BYTES_MAX {
            return Err(ErrorCode::FileTooLarge.into());
        }
        let change = match inline {
            Some(content) if size <= INLINE_BYTES_MAX => {
                DataChange::Inline(spliced(content, base, offset, data, size))
            }
            Some(content) => {
                let content = spliced(content, base, 0, &[], base);
                self.files
                    .write_new(fid.vnode, &content, offset, data, size)?;
                DataChange::ToFile
            }
            None if truncate_to == Some(0) && size <= INLINE_BYTES_MAX => {
                DataChange::FromFile(spliced(Vec::new(), 0, offset, data, size))
            }
            None => DataChange::InFile,
        };
        // Opened before the commit: see `DataFiles` on removal.
        let in_file = match change {
            DataChange::InFile => self.files.get(fid.vnode, true)?,
            _ => None,
        };
        let planned = record.data_version;
        let status = self.write(move |tx| {
            let mut record = tx.checked(fid)?;
            tx.change_data(fid.vnode, &mut record, planned, size, change)?;
            tx.put(fid.vnode, record.clone());
            Ok(record.status(tx.volume(), fid.vnode))
        })?;
        if let Some(file) = in_file {
            let path = self.files.path(fid.vnode);
            if let Some(length) = truncate_to
                && file.metadata().map_err(io_error(&path))?.len() != length
            {
                // Synced although the bytes written are not, as in `set_attr`: bytes
                // cut off must not come back after a crash, where a later extension
                // would expose them instead of zeros.
                self.files.check_fence(&path)?;
                file.set_len(length).map_err(io_error(&path))?;
                file.sync_data().map_err(io_error(&path))?;
            }
            self.files.check_fence(&path)?;
            file.write_all_at(data, offset).map_err(io_error(&path))?;
        }
        Ok(status)
    }

    /// Makes the file's data durable: its data file, if it has one, is fdatasynced
    /// (inline data is durable with its commit, as is every record). Returns the status.
    pub fn fsync(&self, fid: Fid) -> Result<VnodeStatus, StorageError> {
        // Shared with fetches: stores answered before this call are all written, and
        // the data file cannot be replaced or removed meanwhile.
        let _guard = self.locks.lock(fid.vnode, Access::Read);
        let record = self.read(|r| r.checked(fid))?;
        if record.kind == FileKind::File
            && record.data == DataLocation::File
            && let Some(file) = self.files.get(fid.vnode, false)?
        {
            self.files.check_fence(&self.files.path(fid.vnode))?;
            file.sync_data()
                .map_err(io_error(self.files.path(fid.vnode)))?;
        }
        Ok(record.status(self.id, fid.vnode))
    }

    /// Whether `fid` is a file whose data lives in a data file.
    fn in_data_file(&self, fid: Fid) -> Result<bool, StorageError> {
        self.read(|r| {
            let record = r.checked(fid)?;
            Ok(record.kind == FileKind::File && record.data == DataLocation::File)
        })
    }

    /// A store of `data` (not empty) at `offset` into the data file, under a
    /// `StoreRange` lock: the transaction grows the size from the record it finds
    /// (other stores of the vnode may have committed since any snapshot) and bumps the
    /// DV; the bytes are written after the commit and not synced.
    fn store_into_data_file(
        &self,
        fid: Fid,
        offset: u64,
        data: &[u8],
        end: u64,
    ) -> Result<VnodeStatus, StorageError> {
        // Opened before the commit: see `DataFiles` on removal.
        let file = self.files.get(fid.vnode, true)?;
        let status = self.write(move |tx| {
            let mut record = tx.checked(fid)?;
            tx.grow_data_file(fid.vnode, &mut record, end)?;
            tx.put(fid.vnode, record.clone());
            Ok(record.status(tx.volume(), fid.vnode))
        })?;
        if let Some(file) = file {
            self.files.check_fence(&self.files.path(fid.vnode))?;
            file.write_all_at(data, offset)
                .map_err(io_error(self.files.path(fid.vnode)))?;
        }
        Ok(status)
    }

    /// Changes attributes; a size change truncates or extends the file (DV +1).
    /// Truncating a file kept in a data file to zero brings it back inline; any other
    /// truncation leaves the data where it is.
    pub fn set_attr(&self, fid: Fid, attrs: &SetAttrs) -> Result<VnodeStatus, StorageError> {
        let _guard = self.locks.lock(fid.vnode, Access::Exclusive);
        let mut resize = None;
        if let Some(size) = attrs.size {
            if size > FILE_BYTES_MAX {
                return Err(ErrorCode::FileTooLarge.into());
            }
            let (record, inline) = self.read_file_record(fid)?;
            if size != record.size {
                let change = match inline {
                    Some(content) if size <= INLINE_BYTES_MAX => {
                        DataChange::Inline(spliced(content, size, 0, &[], size))
                    }
                    Some(content) => {
                        self.files.write_new(fid.vnode, &content, 0, &[], size)?;
                        DataChange::ToFile
                    }
                    None if size == 0 => DataChange::FromFile(Vec::new()),
                    None => DataChange::InFile,
                };
                resize = Some((size, record.data_version, change));
            }
        }
        // Opened before the commit: see `DataFiles` on removal.
        let in_file = match resize {
            Some((_, _, DataChange::InFile)) => self.files.get(fid.vnode, true)?,
            _ => None,
        };
        let attrs = attrs.clone();
        let status = self.write(move |tx| {
            let mut record = tx.checked(fid)?;
            let now = Timestamp::now();
            if let Some((size, planned, change)) = resize {
                tx.change_data(fid.vnode, &mut record, planned, size, change)?;
            } else if attrs.size.is_some() {
                require_file(record.kind)?;
            }
            if let Some(mode) = attrs.mode {
                record.mode = mode & 0o7777;
            }
            if let Some(uid) = attrs.uid {
                record.uid = uid;
            }
            if let Some(gid) = attrs.gid {
                record.gid = gid;
            }
            if let Some(atime) = attrs.atime {
                record.atime = atime;
            }
            if let Some(mtime) = attrs.mtime {
                record.mtime = mtime;
            }
            record.ctime = now;
            tx.put(fid.vnode, record.clone());
            Ok(record.status(tx.volume(), fid.vnode))
        })?;
        if let Some(file) = in_file
            && let Some(size) = attrs.size
        {
            // Synced although stores are not: bytes cut off here must not come back
            // after a crash, where a later extension would expose them instead of zeros.
            let path = self.files.path(fid.vnode);
            if file.metadata().map_err(io_error(&path))?.len() != size {
                self.files.check_fence(&path)?;
                file.set_len(size).map_err(io_error(&path))?;
                file.sync_data().map_err(io_error(&path))?;
            }
        }
        Ok(status)
    }

    // ---- directory changes ----
    // Each takes the sequence key of a `Sequenced` request, if any: with a key already
    // recorded the change is not applied again but answered from the record
    // (`Outcome::Replayed`); without a key it is always `Outcome::Applied`.

    /// Creates a file; a non-exclusive create of an existing file returns it unchanged.
    #[expect(
        clippy::too_many_arguments,
        reason = "the fields of a Create request, and its sequence key"
    )]
    pub fn create_in(
        &self,
        sequence: Option<SequenceKey>,
        dir: Fid,
        name: &str,
        mode: u32,
        uid: u32,
        gid: u32,
        exclusive: bool,
    ) -> Result<Outcome<Created>, StorageError> {
        proto::check_entry_name(name)?;
        let (id, name) = (self.id, name.to_owned());
        self.write_once(sequence, move |tx| {
            let dir_record = tx.directory(dir)?;
            if let Some((vnode, _, _)) = tx.entry(dir.vnode, &name)? {
                if exclusive {
                    return Err(ErrorCode::Exists.into());
                }
                let record = tx.vnode(VnodeId(vnode))?;
                if record.kind == FileKind::Directory {
                    return Err(ErrorCode::IsDirectory.into());
                }
                return Ok(Created {
                    status: record.status(id, VnodeId(vnode)),
                    dir: dir_record.status(id, dir.vnode),
                    created: false,
                });
            }
            let record = VnodeRecord::new(FileKind::File, mode, uid, gid, dir.vnode);
            let (status, dir) = tx.add_entry(dir, &name, record)?;
            Ok(Created {
                status,
                dir,
                created: true,
            })
        })
    }

    pub fn make_dir_in(
        &self,
        sequence: Option<SequenceKey>,
        dir: Fid,
        name: &str,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<Outcome<(VnodeStatus, VnodeStatus)>, StorageError> {
        proto::check_entry_name(name)?;
        let name = name.to_owned();
        let record = VnodeRecord::new(FileKind::Directory, mode, uid, gid, dir.vnode);
        self.write_once(sequence, move |tx| tx.add_entry(dir, &name, record))
    }

    pub fn symlink_in(
        &self,
        sequence: Option<SequenceKey>,
        dir: Fid,
        name: &str,
        target: &str,
        uid: u32,
        gid: u32,
    ) -> Result<Outcome<(VnodeStatus, VnodeStatus)>, StorageError> {
        proto::check_entry_name(name)?;
        let name = name.to_owned();
        if target.is_empty() || target.contains('\0') {
            return Err(ErrorCode::InvalidArgument.into());
        }
        if target.len() > SYMLINK_TARGET_BYTES_MAX {
            return Err(ErrorCode::NameTooLong.into());
        }
        let mut record = VnodeRecord::new(FileKind::Symlink, 0o777, uid, gid, dir.vnode);
        record.size = target.len() as u64;
        record.content = Some(target.to_owned());
        self.write_once(sequence, move |tx| tx.add_entry(dir, &name, record))
    }

    /// Makes a mount point showing `volume`: content `#volume.` as in AFS.
    pub fn make_mount_point_in(
        &self,
        sequence: Option<SequenceKey>,
        dir: Fid,
        name: &str,
        volume: &VolumeName,
    ) -> Result<Outcome<(VnodeStatus, VnodeStatus)>, StorageError> {
        proto::check_entry_name(name)?;
        let name = name.to_owned();
        let content = format!("#{volume}.");
        let mut record = VnodeRecord::new(FileKind::MountPoint, 0o644, 0, 0, dir.vnode);
        record.size = content.len() as u64;
        record.content = Some(content);
        self.write_once(sequence, move |tx| tx.add_entry(dir, &name, record))
    }

    /// A new hard link `name` in `dir` to the file `target`.
    pub fn link_in(
        &self,
        sequence: Option<SequenceKey>,
        dir: Fid,
        name: &str,
        target: Fid,
    ) -> Result<Outcome<(VnodeStatus, VnodeStatus)>, StorageError> {
        proto::check_entry_name(name)?;
        let (id, name) = (self.id, name.to_owned());
        self.write_once(sequence, move |tx| {
            let mut dir_record = tx.directory(dir)?;
            let mut record = tx.checked(target)?;
            if record.kind == FileKind::Directory {
                return Err(ErrorCode::PermissionDenied.into());
            }
            if tx.entry(dir.vnode, &name)?.is_some() {
                return Err(ErrorCode::Exists.into());
            }
            if record.link_count >= LINK_COUNT_MAX {
                return Err(ErrorCode::TooManyLinks.into());
            }
            let now = Timestamp::now();
            record.link_count += 1;
            record.ctime = now;
            tx.put_entry(dir.vnode, &name, target.vnode, &record)?;
            dir_record.size += 1;
            dir_record.touch_data(now);
            tx.put(target.vnode, record.clone());
            tx.put(dir.vnode, dir_record.clone());
            Ok((
                record.status(id, target.vnode),
                dir_record.status(id, dir.vnode),
            ))
        })
    }

    /// Removes the entry `name`: a directory only if `directory` (and then it must be
    /// empty), anything else only if not.
    pub fn remove_in(
        &self,
        sequence: Option<SequenceKey>,
        dir: Fid,
        name: &str,
        directory: bool,
    ) -> Result<Outcome<Removed>, StorageError> {
        proto::check_entry_name(name)?;
        let (id, name) = (self.id, name.to_owned());
        self.write_once(sequence, move |tx| {
            let mut dir_record = tx.directory(dir)?;
            let (vnode, _, _) = tx.entry(dir.vnode, &name)?.ok_or(ErrorCode::NoSuchEntry)?;
            let vnode = VnodeId(vnode);
            let mut record = tx.vnode(vnode)?;
            let now = Timestamp::now();
            match (directory, record.kind == FileKind::Directory) {
                (true, false) => return Err(ErrorCode::NotDirectory.into()),
                (false, true) => return Err(ErrorCode::IsDirectory.into()),
                (true, true) => {
                    if record.size != 0 {
                        return Err(ErrorCode::NotEmpty.into());
                    }
                    dir_record.link_count -= 1;
                    record.link_count = 0;
                }
                (false, false) => record.link_count = record.link_count.saturating_sub(1),
            }
            tx.remove_entry(dir.vnode, &name)?;
            dir_record.size = dir_record.size.saturating_sub(1);
            dir_record.touch_data(now);
            record.ctime = now;
            let target = record.status(id, vnode);
            tx.put_or_free(vnode, record)?;
            tx.put(dir.vnode, dir_record.clone());
            Ok(Removed {
                dir: dir_record.status(id, dir.vnode),
                target,
            })
        })
    }

    /// Renames within the volume, replacing a compatible target as POSIX `rename` does.
    pub fn rename_in(
        &self,
        sequence: Option<SequenceKey>,
        from_dir: Fid,
        from_name: &str,
        to_dir: Fid,
        to_name: &str,
    ) -> Result<Outcome<Renamed>, StorageError> {
        proto::check_entry_name(from_name)?;
        proto::check_entry_name(to_name)?;
        let (id, from_name, to_name) = (self.id, from_name.to_owned(), to_name.to_owned());
        self.write_once(sequence, move |tx| {
            tx.directory(from_dir)?;
            tx.directory(to_dir)?;
            let (moved, _, _) = tx
                .entry(from_dir.vnode, &from_name)?
                .ok_or(ErrorCode::NoSuchEntry)?;
            let moved = VnodeId(moved);
            let mut moved_record = tx.vnode(moved)?;
            let moved_is_dir = moved_record.kind == FileKind::Directory;
            let existing = tx.entry(to_dir.vnode, &to_name)?;
            if existing.map(|e| e.0) == Some(moved.0) {
                // Both names are links to one vnode (or the very same entry): POSIX
                // says do nothing.
                let from = tx.vnode(from_dir.vnode)?.status(id, from_dir.vnode);
                let to = tx.vnode(to_dir.vnode)?.status(id, to_dir.vnode);
                return Ok(Renamed {
                    from_dir: from,
                    to_dir: to,
                    moved: moved_record.status(id, moved),
                    replaced: None,
                });
            }
            if moved_is_dir && from_dir.vnode != to_dir.vnode {
                tx.refuse_move_into_own_subtree(moved, to_dir.vnode)?;
            }
            let now = Timestamp::now();
            let mut replaced = None;
            if let Some((target, _, _)) = existing {
                let target = VnodeId(target);
                let mut target_record = tx.vnode(target)?;
                let target_is_dir = target_record.kind == FileKind::Directory;
                match (moved_is_dir, target_is_dir) {
                    (true, false) => return Err(ErrorCode::NotDirectory.into()),
                    (false, true) => return Err(ErrorCode::IsDirectory.into()),
                    (true, true) => {
                        if target_record.size != 0 {
                            return Err(ErrorCode::NotEmpty.into());
                        }
                        target_record.link_count = 0;
                        let mut to = tx.vnode(to_dir.vnode)?;
                        to.link_count -= 1;
                        tx.put(to_dir.vnode, to);
                    }
                    (false, false) => {
                        target_record.link_count = target_record.link_count.saturating_sub(1)
                    }
                }
                target_record.ctime = now;
                replaced = Some(target_record.status(id, target));
                tx.put_or_free(target, target_record)?;
                tx.remove_entry(to_dir.vnode, &to_name)?;
                let mut to = tx.vnode(to_dir.vnode)?;
                to.size -= 1;
                tx.put(to_dir.vnode, to);
            }
            tx.remove_entry(from_dir.vnode, &from_name)?;
            tx.put_entry(to_dir.vnode, &to_name, moved, &moved_record)?;
            let mut from = tx.vnode(from_dir.vnode)?;
            from.size = from.size.saturating_sub(1);
            from.touch_data(now);
            if moved_is_dir && from_dir.vnode != to_dir.vnode {
                from.link_count -= 1;
                moved_record.parent = to_dir.vnode;
            }
            tx.put(from_dir.vnode, from);
            let mut to = tx.vnode(to_dir.vnode)?;
            to.size += 1;
            if from_dir.vnode != to_dir.vnode {
                to.touch_data(now);
                if moved_is_dir {
                    to.link_count += 1;
                }
            }
            tx.put(to_dir.vnode, to);
            moved_record.ctime = now;
            tx.put(moved, moved_record.clone());
            Ok(Renamed {
                from_dir: tx.vnode(from_dir.vnode)?.status(id, from_dir.vnode),
                to_dir: tx.vnode(to_dir.vnode)?.status(id, to_dir.vnode),
                moved: moved_record.status(id, moved),
                replaced,
            })
        })
    }

    // ---- plumbing ----

    /// A file's record, with its bytes if they are inline (`None` if in a data file).
    fn read_file_record(&self, fid: Fid) -> Result<(VnodeRecord, Option<Vec<u8>>), StorageError> {
        self.read(|r| {
            let record = r.checked(fid)?;
            require_file(record.kind)?;
            let inline = match record.data {
                DataLocation::Inline => Some(r.file_data(fid.vnode)?),
                DataLocation::File => None,
            };
            Ok((record, inline))
        })
    }

    /// Reads `wanted` bytes at `offset` into one buffer; bytes past the file's end read
    /// as zeros (a file never written has no data file).
    fn read_file(
        &self,
        vnode: VnodeId,
        offset: u64,
        wanted: usize,
    ) -> Result<Vec<u8>, StorageError> {
        let mut buffer = vec![0u8; wanted];
        let Some(file) = self.files.get(vnode, false)? else {
            return Ok(buffer);
        };
        let mut done = 0;
        while done < wanted {
            match file.read_at(&mut buffer[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(io_error(self.files.path(vnode))(e)),
            }
        }
        Ok(buffer)
    }

    fn read<T>(
        &self,
        op: impl FnOnce(&Reader<'_>) -> Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        let txn = self.db.begin_read().map_err(db_error(&self.db_path))?;
        op(&Reader {
            txn: &txn,
            path: &self.db_path,
            volume: self.id,
        })
    }

    /// Runs `op` in a durable write transaction and returns once it is committed. `op`
    /// runs on whichever thread leads the group commit, in one transaction with the
    /// other requests queued meanwhile, after theirs and seeing their changes; a refused
    /// `op` changes nothing. Every answer of a batch waits for its commit, refusals too,
    /// so no one is told of a change that a crash could still undo.
    fn write<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut Tx<'_>) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        let (sender, receiver) = sync_channel(1);
        let job: WriteJob = Box::new(move |tx: &mut Tx<'_>| {
            let outcome = op(tx);
            Applied {
                changed: outcome.is_ok(),
                answer: Box::new(move |committed: Result<(), StorageError>| {
                    // The submitter is waiting on the receiver; it cannot be gone.
                    let _ = sender.send(committed.and(outcome));
                }),
            }
        });
        self.committer
            .submit(job, &receiver, |jobs| self.run_batch(jobs))
            .unwrap_or_else(|| {
                Err(StorageError::BatchFailed {
                    path: self.db_path.clone(),
                    detail: "the write batch stopped before reaching this request".into(),
                })
            })
    }

    /// `write` for a namespace change that may carry a sequence key: in the same
    /// transaction, a key already recorded is answered from its record (nothing is
    /// applied), and a new one has its answer recorded with the change. Refusals are
    /// recorded too: a retry must get the answer the first attempt got.
    fn write_once<T: Answer + Send + 'static>(
        &self,
        sequence: Option<SequenceKey>,
        op: impl FnOnce(&mut Tx<'_>) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<Outcome<T>, StorageError> {
        let Some(key) = sequence else {
            return self.write(op).map(Outcome::Applied);
        };
        let path = self.db_path.clone();
        let outcome = self.write(move |tx| {
            let txn = tx.txn;
            if let Some(answer) = outcomes::find(txn, &key).map_err(outcome_error(&path))? {
                return Ok(Err(answer));
            }
            let applied = op(tx);
            let answer = match &applied {
                Ok(value) => Ok(value.answer()),
                Err(StorageError::Refused(code)) => Err(code.clone()),
                // Server trouble is not an answer: the retry runs the change again.
                Err(_) => return applied.map(Ok),
            };
            outcomes::record(txn, &key, answer).map_err(outcome_error(&path))?;
            applied.map(Ok)
        });
        match outcome {
            Ok(Ok(value)) => Ok(Outcome::Applied(value)),
            Ok(Err(answer)) => Ok(Outcome::Replayed(Box::new(answer))),
            // A refusal was recorded; it is answered as it is, like an applied one.
            Err(e) => Err(e),
        }
    }

    /// How many sequenced outcomes the volume records.
    #[cfg(test)]
    pub(super) fn outcome_count(&self) -> u64 {
        self.db
            .begin_write()
            .map(|txn| outcomes::count(&txn))
            .unwrap_or(0)
    }

    /// Applies `jobs` in order in one write transaction, commits it durably, removes the
    /// data files it freed (a crash before that leaves an orphan file, never lost data)
    /// and answers every job.
    fn run_batch(&self, jobs: Vec<WriteJob>) {
        let mut answers = Vec::with_capacity(jobs.len());
        let mut dead_files = Vec::new();
        let committed = (|| {
            let mut txn = self.db.begin_write().map_err(db_error(&self.db_path))?;
            txn.set_durability(Durability::Immediate)
                .map_err(db_error(&self.db_path))?;
            for job in jobs {
                let mut tx = Tx::new(&txn, &self.db_path, self.id);
                let applied = job(&mut tx);
                answers.push(applied.answer);
                if applied.changed {
                    dead_files.extend(tx.flush()?);
                }
            }
            txn.commit().map_err(db_error(&self.db_path))
        })();
        let committed = match committed {
            Ok(()) => {
                for vnode in dead_files {
                    self.files.remove(vnode);
                }
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        };
        for answer in answers {
            answer(
                committed
                    .clone()
                    .map_err(|detail| StorageError::BatchFailed {
                        path: self.db_path.clone(),
                        detail,
                    }),
            );
        }
    }
}

impl Answer for Created {
    fn answer(&self) -> Response {
        Response::Entry {
            status: self.status.clone(),
            callback: None,
            dir: self.dir.clone(),
        }
    }
}

/// (entry made, directory) of `make_dir`, `symlink`, `make_mount_point`, `link`.
impl Answer for (VnodeStatus, VnodeStatus) {
    fn answer(&self) -> Response {
        Response::Entry {
            status: self.0.clone(),
            callback: None,
            dir: self.1.clone(),
        }
    }
}

impl Answer for Removed {
    fn answer(&self) -> Response {
        Response::Removed {
            dir: self.dir.clone(),
            target: Some(self.target.clone()).filter(|s| s.link_count > 0),
        }
    }
}

impl Answer for Renamed {
    fn answer(&self) -> Response {
        Response::Renamed {
            from_dir: self.from_dir.clone(),
            to_dir: self.to_dir.clone(),
            moved: self.moved.clone(),
            replaced: self.replaced.clone().filter(|s| s.link_count > 0),
        }
    }
}

fn outcome_error(path: &Path) -> impl Fn(outcomes::FindError) -> StorageError + '_ {
    move |e| match e {
        outcomes::FindError::Database(source) => StorageError::Database {
            path: path.to_owned(),
            source,
        },
        outcomes::FindError::Corrupt(detail) => StorageError::Corrupt {
            path: path.to_owned(),
            detail,
        },
    }
}

/// `content` cut or zero-extended to `base` bytes, with `data` written at `offset`,
/// `size` bytes in all.
fn spliced(mut content: Vec<u8>, base: u64, offset: u64, data: &[u8], size: u64) -> Vec<u8> {
    // Callers bound every length by `INLINE_BYTES_MAX`, so these fit in memory.
    content.resize(base as usize, 0);
    if !data.is_empty() {
        let offset = offset as usize;
        let end = offset + data.len();
        if content.len() < end {
            content.resize(end, 0);
        }
        content[offset..end].copy_from_slice(data);
    }
    content.resize(size as usize, 0);
    content
}

fn require_file(kind: FileKind) -> Result<(), StorageError> {
    match kind {
        FileKind::File => Ok(()),
        FileKind::Directory => Err(ErrorCode::IsDirectory.into()),
        FileKind::Symlink | FileKind::MountPoint => Err(ErrorCode::InvalidArgument.into()),
    }
}

/// Opens (or with `create`, creates) a volume's redb file on the fenced backend.
fn open_database(path: &Path, create: bool, fence: &Arc<Fence>) -> Result<Database, StorageError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(path)
        .map_err(io_error(path))?;
    redb::Builder::new()
        .create_with_backend(FencedFile::new(file, fence.clone()))
        .map_err(db_error(path))
}

fn db_error<E: Into<redb::Error>>(path: &Path) -> impl FnOnce(E) -> StorageError + '_ {
    move |e| StorageError::Database {
        path: path.to_owned(),
        source: e.into(),
    }
}

/// Read access through either kind of transaction.
struct Reader<'a> {
    txn: &'a dyn TxnTables,
    path: &'a Path,
    volume: VolumeId,
}

/// The tables a reader needs, from a read or a write transaction.
trait TxnTables {
    fn get_header(&self) -> Result<Option<Vec<u8>>, redb::Error>;
    fn get_vnode(&self, vnode: u64) -> Result<Option<Vec<u8>>, redb::Error>;
    fn get_entry(&self, dir: u64, name: &str) -> Result<Option<(u64, u32, u8)>, redb::Error>;
    fn get_file_data(&self, vnode: u64) -> Result<Option<Vec<u8>>, redb::Error>;
}

/// The same reads for both transaction kinds: `open_table` returns a different table
/// type for each, so the bodies are written once here.
macro_rules! impl_txn_tables {
    ($transaction:ty) => {
        impl TxnTables for $transaction {
            fn get_header(&self) -> Result<Option<Vec<u8>>, redb::Error> {
                let table = self.open_table(HEADER)?;
                Ok(table.get(HEADER_KEY)?.map(|v| v.value().to_vec()))
            }
            fn get_vnode(&self, vnode: u64) -> Result<Option<Vec<u8>>, redb::Error> {
                let table = self.open_table(VNODES)?;
                Ok(table.get(vnode)?.map(|v| v.value().to_vec()))
            }
            fn get_entry(
                &self,
                dir: u64,
                name: &str,
            ) -> Result<Option<(u64, u32, u8)>, redb::Error> {
                let table = self.open_table(ENTRIES)?;
                Ok(table.get((dir, name))?.map(|v| v.value()))
            }
            fn get_file_data(&self, vnode: u64) -> Result<Option<Vec<u8>>, redb::Error> {
                let table = self.open_table(FILE_DATA)?;
                Ok(table.get(vnode)?.map(|v| v.value().to_vec()))
            }
        }
    };
}

impl_txn_tables!(redb::ReadTransaction);
impl_txn_tables!(redb::WriteTransaction);

impl Reader<'_> {
    fn corrupt(&self, detail: String) -> StorageError {
        StorageError::Corrupt {
            path: self.path.to_owned(),
            detail,
        }
    }

    fn db(&self, e: redb::Error) -> StorageError {
        StorageError::Database {
            path: self.path.to_owned(),
            source: e,
        }
    }

    fn header(&self) -> Result<VolumeHeader, StorageError> {
        let bytes = self
            .txn
            .get_header()
            .map_err(|e| self.db(e))?
            .ok_or_else(|| self.corrupt("no volume header".into()))?;
        let header: VolumeHeader = postcard::from_bytes(&bytes)
            .map_err(|e| self.corrupt(format!("volume header: {e}")))?;
        if header.format != HEADER_FORMAT {
            return Err(self.corrupt(format!("volume header format {}", header.format)));
        }
        Ok(header)
    }

    /// The vnode, or `Stale` if it does not exist (it was removed).
    fn vnode(&self, vnode: VnodeId) -> Result<VnodeRecord, StorageError> {
        let bytes = self
            .txn
            .get_vnode(vnode.0)
            .map_err(|e| self.db(e))?
            .ok_or(ErrorCode::Stale)?;
        VnodeRecord::decode(&bytes).map_err(|e| self.corrupt(format!("vnode {vnode}: {e}")))
    }

    /// An inline file's bytes (empty when it has no row).
    fn file_data(&self, vnode: VnodeId) -> Result<Vec<u8>, StorageError> {
        Ok(self
            .txn
            .get_file_data(vnode.0)
            .map_err(|e| self.db(e))?
            .unwrap_or_default())
    }

    /// The vnode a fid names, `Stale` unless the uniquifier matches.
    fn checked(&self, fid: Fid) -> Result<VnodeRecord, StorageError> {
        if fid.volume != self.volume {
            return Err(ErrorCode::NoSuchVolume.into());
        }
        let record = self.vnode(fid.vnode)?;
        if record.unique != fid.unique {
            return Err(ErrorCode::Stale.into());
        }
        Ok(record)
    }

    fn directory(&self, fid: Fid) -> Result<VnodeRecord, StorageError> {
        let record = self.checked(fid)?;
        if record.kind != FileKind::Directory {
            return Err(ErrorCode::NotDirectory.into());
        }
        Ok(record)
    }

    fn entry(&self, dir: VnodeId, name: &str) -> Result<Option<(u64, u32, u8)>, StorageError> {
        self.txn.get_entry(dir.0, name).map_err(|e| self.db(e))
    }
}

/// A write transaction in progress: records read and changed are kept here and written
/// once at the end, so one request touching a vnode twice writes it once.
struct Tx<'a> {
    txn: &'a redb::WriteTransaction,
    reader: Reader<'a>,
    header: Option<VolumeHeader>,
    header_dirty: bool,
    /// vnode -> (as read, as it should be written; `None` = delete).
    cache: BTreeMap<u64, (Option<VnodeRecord>, Option<VnodeRecord>)>,
    /// Directory entry changes in order: `Some` = insert, `None` = remove.
    entries: Vec<((u64, String), Option<EntryValue>)>,
    /// Inline data to write; empty = remove the row.
    file_data: Vec<(u64, Vec<u8>)>,
    /// Data files to remove once the transaction is committed.
    dead_files: Vec<VnodeId>,
}

impl<'a> Tx<'a> {
    fn new(txn: &'a redb::WriteTransaction, path: &'a Path, volume: VolumeId) -> Tx<'a> {
        Tx {
            txn,
            reader: Reader { txn, path, volume },
            header: None,
            header_dirty: false,
            cache: BTreeMap::new(),
            entries: Vec::new(),
            file_data: Vec::new(),
            dead_files: Vec::new(),
        }
    }

    fn volume(&self) -> VolumeId {
        self.reader.volume
    }

    /// Applies a planned data change to `record` (size, quota, location, DV +1). The
    /// plan was made under the vnode's data lock from DV `planned`; the lock keeps that
    /// DV current, so a mismatch is a bug, refused rather than applied.
    fn change_data(
        &mut self,
        vnode: VnodeId,
        record: &mut VnodeRecord,
        planned: proto::DataVersion,
        size: u64,
        change: DataChange,
    ) -> Result<(), StorageError> {
        require_file(record.kind)?;
        if record.data_version != planned {
            return Err(self.reader.corrupt(format!(
                "vnode {vnode} changed from DV {planned} to {} under its data lock",
                record.data_version
            )));
        }
        self.resize(record, size)?;
        match change {
            DataChange::Inline(content) => self.file_data.push((vnode.0, content)),
            DataChange::ToFile => {
                record.data = DataLocation::File;
                self.file_data.push((vnode.0, Vec::new()));
            }
            DataChange::InFile => {}
            DataChange::FromFile(content) => {
                record.data = DataLocation::Inline;
                self.file_data.push((vnode.0, content));
                self.dead_files.push(vnode);
            }
        }
        record.touch_data(Timestamp::now());
        Ok(())
    }

    /// A store into the data file under a `StoreRange` lock: the size grows to `end` if
    /// below it (quota checked), DV +1. The lock keeps the data in its data file, so
    /// finding it elsewhere is a bug, refused rather than applied.
    fn grow_data_file(
        &mut self,
        vnode: VnodeId,
        record: &mut VnodeRecord,
        end: u64,
    ) -> Result<(), StorageError> {
        require_file(record.kind)?;
        if record.data != DataLocation::File {
            return Err(self.reader.corrupt(format!(
                "vnode {vnode} left its data file under a store lock"
            )));
        }
        self.resize(record, record.size.max(end))?;
        record.touch_data(Timestamp::now());
        Ok(())
    }

    fn header_mut(&mut self) -> Result<&mut VolumeHeader, StorageError> {
        if self.header.is_none() {
            self.header = Some(self.reader.header()?);
        }
        self.header_dirty = true;
        self.header
            .as_mut()
            .ok_or_else(|| self.reader.corrupt("volume header vanished".into()))
    }

    fn vnode(&mut self, vnode: VnodeId) -> Result<VnodeRecord, StorageError> {
        if let Some((_, current)) = self.cache.get(&vnode.0) {
            return current.clone().ok_or_else(|| ErrorCode::Stale.into());
        }
        let record = self.reader.vnode(vnode)?;
        self.cache
            .insert(vnode.0, (Some(record.clone()), Some(record.clone())));
        Ok(record)
    }

    fn checked(&mut self, fid: Fid) -> Result<VnodeRecord, StorageError> {
        if fid.volume != self.reader.volume {
            return Err(ErrorCode::NoSuchVolume.into());
        }
        let record = self.vnode(fid.vnode)?;
        if record.unique != fid.unique {
            return Err(ErrorCode::Stale.into());
        }
        Ok(record)
    }

    fn directory(&mut self, fid: Fid) -> Result<VnodeRecord, StorageError> {
        let record = self.checked(fid)?;
        if record.kind != FileKind::Directory {
            return Err(ErrorCode::NotDirectory.into());
        }
        Ok(record)
    }

    fn put(&mut self, vnode: VnodeId, record: VnodeRecord) {
        self.cache.entry(vnode.0).or_insert((None, None)).1 = Some(record);
    }

    /// Writes `record`, or frees the vnode when its last link is gone.
    fn put_or_free(&mut self, vnode: VnodeId, record: VnodeRecord) -> Result<(), StorageError> {
        if record.link_count > 0 {
            self.put(vnode, record);
            return Ok(());
        }
        let header = self.header_mut()?;
        header.vnode_count = header.vnode_count.saturating_sub(1);
        if record.kind == FileKind::File {
            header.bytes_used = header.bytes_used.saturating_sub(record.size);
            // Both forms go: a data file may exist beside inline data after a crash.
            self.file_data.push((vnode.0, Vec::new()));
            self.dead_files.push(vnode);
        }
        self.cache.entry(vnode.0).or_insert((None, None)).1 = None;
        Ok(())
    }

    fn entry(&mut self, dir: VnodeId, name: &str) -> Result<Option<(u64, u32, u8)>, StorageError> {
        if let Some((_, value)) = self
            .entries
            .iter()
            .rev()
            .find(|((d, n), _)| *d == dir.0 && n == name)
        {
            return Ok(*value);
        }
        self.reader.entry(dir, name)
    }

    fn put_entry(
        &mut self,
        dir: VnodeId,
        name: &str,
        vnode: VnodeId,
        record: &VnodeRecord,
    ) -> Result<(), StorageError> {
        self.entries.push((
            (dir.0, name.to_owned()),
            Some((vnode.0, record.unique.0, kind_code(record.kind))),
        ));
        Ok(())
    }

    fn remove_entry(&mut self, dir: VnodeId, name: &str) -> Result<(), StorageError> {
        self.entries.push(((dir.0, name.to_owned()), None));
        Ok(())
    }

    /// Sets a file's size, keeping the volume's byte count and quota.
    fn resize(&mut self, record: &mut VnodeRecord, size: u64) -> Result<(), StorageError> {
        if size > FILE_BYTES_MAX {
            return Err(ErrorCode::FileTooLarge.into());
        }
        let header = self.header_mut()?;
        let used = header
            .bytes_used
            .saturating_sub(record.size)
            .saturating_add(size);
        if size > record.size && header.quota_bytes != 0 && used > header.quota_bytes {
            return Err(ErrorCode::QuotaExceeded.into());
        }
        header.bytes_used = used;
        record.size = size;
        Ok(())
    }

    /// Adds a new vnode under `name` in `dir`; the directory's DV goes up by one.
    fn add_entry(
        &mut self,
        dir: Fid,
        name: &str,
        mut record: VnodeRecord,
    ) -> Result<(VnodeStatus, VnodeStatus), StorageError> {
        let mut dir_record = self.directory(dir)?;
        if self.entry(dir.vnode, name)?.is_some() {
            return Err(ErrorCode::Exists.into());
        }
        let header = self.header_mut()?;
        let vnode = VnodeId(header.next_vnode);
        header.next_vnode += 1;
        header.vnode_count += 1;
        record.parent = dir.vnode;
        let now = Timestamp::now();
        dir_record.size += 1;
        dir_record.touch_data(now);
        if record.kind == FileKind::Directory {
            dir_record.link_count += 1;
        }
        self.put_entry(dir.vnode, name, vnode, &record)?;
        let volume = self.reader.volume;
        let status = record.status(volume, vnode);
        self.put(vnode, record);
        self.put(dir.vnode, dir_record.clone());
        Ok((status, dir_record.status(volume, dir.vnode)))
    }

    /// Refuses to move directory `moved` into `to_dir` if `to_dir` is `moved` or lies
    /// beneath it.
    fn refuse_move_into_own_subtree(
        &mut self,
        moved: VnodeId,
        to_dir: VnodeId,
    ) -> Result<(), StorageError> {
        let mut current = to_dir;
        // Bounded walk: a corrupt parent chain must not loop forever.
        for _ in 0..100_000 {
            if current == moved {
                return Err(ErrorCode::InvalidArgument.into());
            }
            if current == VnodeId::ROOT {
                return Ok(());
            }
            current = self.vnode(current)?.parent;
        }
        Err(self.reader.corrupt(format!(
            "parent chain of vnode {to_dir} does not reach the root"
        )))
    }

    /// Writes the changes into the transaction; returns the data files to remove after
    /// the commit.
    fn flush(self) -> Result<Vec<VnodeId>, StorageError> {
        let Tx {
            txn,
            reader,
            header,
            header_dirty,
            cache,
            entries,
            file_data,
            dead_files,
        } = self;
        let path = reader.path;
        if header_dirty && let Some(header) = header {
            let bytes = postcard::to_allocvec(&header).map_err(|e| StorageError::Corrupt {
                path: path.to_owned(),
                detail: format!("encode header: {e}"),
            })?;
            let mut table = txn.open_table(HEADER).map_err(db_error(path))?;
            table
                .insert(HEADER_KEY, bytes.as_slice())
                .map_err(db_error(path))?;
        }
        if cache.values().any(|(before, after)| before != after) {
            let mut table = txn.open_table(VNODES).map_err(db_error(path))?;
            for (vnode, (before, after)) in cache {
                if before == after {
                    continue;
                }
                match after {
                    Some(record) => {
                        let bytes =
                            postcard::to_allocvec(&record).map_err(|e| StorageError::Corrupt {
                                path: path.to_owned(),
                                detail: format!("encode vnode {vnode}: {e}"),
                            })?;
                        table
                            .insert(vnode, bytes.as_slice())
                            .map_err(db_error(path))?;
                    }
                    None => {
                        table.remove(vnode).map_err(db_error(path))?;
                    }
                }
            }
        }
        if !entries.is_empty() {
            let mut table = txn.open_table(ENTRIES).map_err(db_error(path))?;
            for ((dir, name), value) in entries {
                match value {
                    Some(value) => {
                        table
                            .insert((dir, name.as_str()), value)
                            .map_err(db_error(path))?;
                    }
                    None => {
                        table.remove((dir, name.as_str())).map_err(db_error(path))?;
                    }
                }
            }
        }
        if !file_data.is_empty() {
            let mut table = txn.open_table(FILE_DATA).map_err(db_error(path))?;
            for (vnode, content) in file_data {
                if content.is_empty() {
                    table.remove(vnode).map_err(db_error(path))?;
                } else {
                    table
                        .insert(vnode, content.as_slice())
                        .map_err(db_error(path))?;
                }
            }
        }
        Ok(dead_files)
    }
}
