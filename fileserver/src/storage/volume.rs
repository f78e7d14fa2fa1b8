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

use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::sync_channel;

use proto::{
    DirEntry, ErrorCode, Fid, FileKind, Response, SetAttrs, Timestamp, Uniquifier, VnodeId,
    VnodeStatus, VolumeId, VolumeInfo, VolumeName, VolumeType,
};
use redb::{Database, Durability, ReadableDatabase};

use crate::fence::Fence;

use super::data_files::DataFiles;
use super::group_commit::GroupCommit;
use super::outcomes::{Answer, Outcome, SequenceKey};
use super::records::{DataLocation, HEADER_FORMAT, VnodeRecord, VolumeHeader, kind_from_code};
use super::tables::{self, Reader, db_error};
use super::transaction::Tx;
use super::vnode_lock::{Access, VnodeLocks};
use super::{StorageError, io_error};

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
        let db = tables::open_database(&db_path, true, &fence)?;
        tables::create_tables(&db, &db_path)?;
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
            tx.put_header(header);
            tx.put(VnodeId::ROOT, root);
            Ok(())
        })?;
        Ok(volume)
    }

    /// Opens an existing volume directory, checking that it is the volume `id`.
    pub fn open(dir: &Path, id: VolumeId, fence: Arc<Fence>) -> Result<Volume, StorageError> {
        let data_dir = dir.join("data");
        let db_path = dir.join("meta.redb");
        let db = tables::open_database(&db_path, false, &fence)?;
        tables::add_missing_tables(&db, &db_path)?;
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
        self.read(|r| {
            let dir_record = r.directory(dir)?;
            let mut entries = Vec::new();
            let mut bytes = 0;
            let mut more = false;
            r.scan_entries(dir.vnode, after, |name, (vnode, unique, kind)| {
                if entries.len() >= count_max || bytes + name.len() + 32 > bytes_max {
                    more = true;
                    return Ok(false);
                }
                bytes += name.len() + 32;
                entries.push(DirEntry {
                    name: name.to_owned(),
                    fid: Fid {
                        volume: self.id,
                        vnode: VnodeId(vnode),
                        unique: Uniquifier(unique),
                    },
                    kind: kind_from_code(kind)
                        .ok_or_else(|| r.corrupt(format!("entry {name:?} has kind code {kind}")))?,
                });
                Ok(true)
            })?;
            Ok((dir_record.status(self.id, dir.vnode), entries, more))
        })
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
            change_data(tx, fid.vnode, &mut record, planned, size, change)?;
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
            grow_data_file(tx, fid.vnode, &mut record, end)?;
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
                change_data(tx, fid.vnode, &mut record, planned, size, change)?;
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
            let (status, dir) = add_entry(tx, dir, &name, record)?;
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
        self.write_once(sequence, move |tx| add_entry(tx, dir, &name, record))
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
        self.write_once(sequence, move |tx| add_entry(tx, dir, &name, record))
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
        self.write_once(sequence, move |tx| add_entry(tx, dir, &name, record))
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
            tx.put_entry(dir.vnode, &name, target.vnode, &record);
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
            tx.remove_entry(dir.vnode, &name);
            dir_record.size = dir_record.size.saturating_sub(1);
            dir_record.touch_data(now);
            record.ctime = now;
            let target = record.status(id, vnode);
            put_or_free(tx, vnode, record)?;
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
                refuse_move_into_own_subtree(tx, moved, to_dir.vnode)?;
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
                put_or_free(tx, target, target_record)?;
                tx.remove_entry(to_dir.vnode, &to_name);
                let mut to = tx.vnode(to_dir.vnode)?;
                to.size -= 1;
                tx.put(to_dir.vnode, to);
            }
            tx.remove_entry(from_dir.vnode, &from_name);
            tx.put_entry(to_dir.vnode, &to_name, moved, &moved_record);
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
        op(&Reader::new(&txn, &self.db_path, self.id))
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
        let outcome = self.write(move |tx| {
            if let Some(answer) = tx.find_outcome(&key)? {
                return Ok(Err(answer));
            }
            let applied = op(tx);
            let answer = match &applied {
                Ok(value) => Ok(value.answer()),
                Err(StorageError::Refused(code)) => Err(code.clone()),
                // Server trouble is not an answer: the retry runs the change again.
                Err(_) => return applied.map(Ok),
            };
            tx.record_outcome(&key, answer)?;
            applied.map(Ok)
        });
        match outcome {
            Ok(Ok(value)) => Ok(Outcome::Applied(value)),
            Ok(Err(answer)) => Ok(Outcome::Replayed(Box::new(answer))),
            // A refusal was recorded; it is answered as it is, like an applied one.
            Err(e) => Err(e),
        }
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

/// Applies a planned data change to `record` (size, quota, location, DV +1). The plan
/// was made under the vnode's data lock from DV `planned`; the lock keeps that DV
/// current, so a mismatch is a bug, refused rather than applied.
fn change_data(
    tx: &mut Tx<'_>,
    vnode: VnodeId,
    record: &mut VnodeRecord,
    planned: proto::DataVersion,
    size: u64,
    change: DataChange,
) -> Result<(), StorageError> {
    require_file(record.kind)?;
    if record.data_version != planned {
        return Err(tx.corrupt(format!(
            "vnode {vnode} changed from DV {planned} to {} under its data lock",
            record.data_version
        )));
    }
    resize(tx, record, size)?;
    match change {
        DataChange::Inline(content) => tx.put_file_data(vnode, content),
        DataChange::ToFile => {
            record.data = DataLocation::File;
            tx.put_file_data(vnode, Vec::new());
        }
        DataChange::InFile => {}
        DataChange::FromFile(content) => {
            record.data = DataLocation::Inline;
            tx.put_file_data(vnode, content);
            tx.remove_data_file(vnode);
        }
    }
    record.touch_data(Timestamp::now());
    Ok(())
}

/// A store into the data file under a `StoreRange` lock: the size grows to `end` if
/// below it (quota checked), DV +1. The lock keeps the data in its data file, so
/// finding it elsewhere is a bug, refused rather than applied.
fn grow_data_file(
    tx: &mut Tx<'_>,
    vnode: VnodeId,
    record: &mut VnodeRecord,
    end: u64,
) -> Result<(), StorageError> {
    require_file(record.kind)?;
    if record.data != DataLocation::File {
        return Err(tx.corrupt(format!(
            "vnode {vnode} left its data file under a store lock"
        )));
    }
    resize(tx, record, record.size.max(end))?;
    record.touch_data(Timestamp::now());
    Ok(())
}

/// Sets a file's size, keeping the volume's byte count and quota.
fn resize(tx: &mut Tx<'_>, record: &mut VnodeRecord, size: u64) -> Result<(), StorageError> {
    if size > FILE_BYTES_MAX {
        return Err(ErrorCode::FileTooLarge.into());
    }
    let header = tx.header_mut()?;
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

/// Writes `record`, or frees the vnode when its last link is gone.
fn put_or_free(tx: &mut Tx<'_>, vnode: VnodeId, record: VnodeRecord) -> Result<(), StorageError> {
    if record.link_count > 0 {
        tx.put(vnode, record);
        return Ok(());
    }
    let header = tx.header_mut()?;
    header.vnode_count = header.vnode_count.saturating_sub(1);
    if record.kind == FileKind::File {
        header.bytes_used = header.bytes_used.saturating_sub(record.size);
        // Both forms go: a data file may exist beside inline data after a crash.
        tx.put_file_data(vnode, Vec::new());
        tx.remove_data_file(vnode);
    }
    tx.delete(vnode);
    Ok(())
}

/// Adds a new vnode under `name` in `dir`; the directory's DV goes up by one.
fn add_entry(
    tx: &mut Tx<'_>,
    dir: Fid,
    name: &str,
    mut record: VnodeRecord,
) -> Result<(VnodeStatus, VnodeStatus), StorageError> {
    let mut dir_record = tx.directory(dir)?;
    if tx.entry(dir.vnode, name)?.is_some() {
        return Err(ErrorCode::Exists.into());
    }
    let header = tx.header_mut()?;
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
    tx.put_entry(dir.vnode, name, vnode, &record);
    let volume = tx.volume();
    let status = record.status(volume, vnode);
    tx.put(vnode, record);
    tx.put(dir.vnode, dir_record.clone());
    Ok((status, dir_record.status(volume, dir.vnode)))
}

/// Refuses to move directory `moved` into `to_dir` if `to_dir` is `moved` or lies
/// beneath it.
fn refuse_move_into_own_subtree(
    tx: &mut Tx<'_>,
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
        current = tx.vnode(current)?.parent;
    }
    Err(tx.corrupt(format!(
        "parent chain of vnode {to_dir} does not reach the root"
    )))
}

#[cfg(test)]
impl Volume {
    /// How many sequenced outcomes the volume records.
    pub(super) fn outcome_count(&self) -> u64 {
        self.db
            .begin_write()
            .map(|txn| tables::Writer::new(&txn, &self.db_path).outcome_count())
            .unwrap_or(0)
    }
}
