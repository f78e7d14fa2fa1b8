//! The data operations of a volume: a file's bytes fetched, stored, resized, synced.
//! Invariant: a crash never leaves file data changed under an unchanged DV, and a fetch
//! never pairs a new DV with bytes not yet written.

use std::io::ErrorKind;
use std::os::unix::fs::FileExt;

use proto::{ErrorCode, Fid, FileKind, SetAttrs, Timestamp, VnodeId, VnodeStatus};

use super::records::{DataLocation, VnodeRecord};
use super::transaction::Tx;
use super::vnode_lock::Access;
use super::volume::Volume;
use super::{StorageError, io_error};

/// Largest data a single `FetchData` returns.
pub const FETCH_BYTES_MAX: u32 = 1 << 20;
/// Largest file kept inline in `file_data`; a file growing past it moves to a data file.
pub const INLINE_BYTES_MAX: u64 = 64 * 1024;
/// Largest file size accepted (1 TiB).
pub const FILE_BYTES_MAX: u64 = 1 << 40;

/// How a request changes a file's bytes, planned under the vnode's data lock from a
/// snapshot; `change_data` applies it, given the DV it was planned from.
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

// A vnode's data is guarded by its data lock (`vnode_lock`), held from the plan to the
// last write: a fetch never pairs a new DV with data not yet written, overlapping
// stores to one file apply in DV order, and a data change planned from a snapshot still
// holds when its transaction runs. Stores into a data file of disjoint ranges share the
// lock: they plan nothing from the snapshot, their transaction grows the size from the
// record it finds.
impl Volume {
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
