//! The data operations of a volume: a file's bytes fetched, stored, resized, synced.
//! Invariant: a store is all or nothing (a failed one leaves size, DV and bytes as they
//! were), and a fetch never pairs a DV with bytes of another version.

use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use proto::{
    DataVersion, ErrorCode, Fid, FileKind, Response, SetAttrs, Timestamp, VnodeId, VnodeStatus,
    WriteBackId,
};
use tracing::{error, warn};

use super::data_files::{DataFile, DataFiles};
use super::outcomes::{Outcome, SequenceKey};
use super::records::{DataLocation, StoreMark, VnodeRecord};
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
/// Most old bytes a `StoreData` with `truncate_to` below its offset may turn into zeros
/// in a data file: the old bytes are kept in memory until the commit, to be put back.
const ZEROED_BYTES_MAX: u64 = 16 << 20;

/// How a request changes a file's bytes, planned under the vnode's data lock from a
/// snapshot; `change_data` applies it, given the DV it was planned from.
enum DataChange {
    /// Inline data becomes these bytes.
    Inline(Vec<u8>),
    /// The bytes moved to a data file, already written and durable.
    ToFile,
    /// The data file's bytes, already written (not synced), change under this size.
    InFile,
    /// The file was emptied: its data goes back inline with these bytes and the data
    /// file is removed after the commit.
    FromFile(Vec<u8>),
}

// A vnode's data is guarded by its data lock (`vnode_lock`), held from the plan to the
// commit and any write after it: a fetch never pairs a DV with bytes of another version,
// overlapping stores to one file apply in DV order, and a data change planned from a
// snapshot still holds when its transaction runs. Stores that only rewrite bytes inside
// a data file's size and length share the lock when their ranges are disjoint: they
// plan nothing from the snapshot, and change neither the size nor the file's length.
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
            // The kernel opens these itself: no FUSE read ever asks for their data.
            FileKind::Fifo
            | FileKind::Socket
            | FileKind::CharDevice { .. }
            | FileKind::BlockDevice { .. } => return Err(ErrorCode::InvalidArgument.into()),
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

    /// Writes `data` at `offset`, after setting the length to `truncate_to` if given,
    /// unconditionally (`StoreData`). DV +1. All or nothing, as `store`.
    pub fn store_data(
        &self,
        fid: Fid,
        offset: u64,
        data: &[u8],
        truncate_to: Option<u64>,
    ) -> Result<VnodeStatus, StorageError> {
        match self.store(fid, offset, data, truncate_to, None)? {
            Outcome::Applied(status) => {
                self.start_writeback(fid, offset, data.len());
                Ok(status)
            }
            Outcome::Replayed(_) => Err(StorageError::Corrupt {
                path: self.files.path(fid.vnode),
                detail: "a store without a sequence was answered from a record".into(),
            }),
        }
    }

    /// Writes `data` at `offset` if `condition` holds (`StoreDataIf`), else refuses
    /// with `StoreOutdated`; a retry of a store already applied is answered from its
    /// record. DV +1. All or nothing, as `store`.
    pub fn store_data_if(
        &self,
        fid: Fid,
        offset: u64,
        data: &[u8],
        condition: StoreCondition,
    ) -> Result<Outcome<VnodeStatus>, StorageError> {
        let refused = match self.store(fid, offset, data, None, Some(condition)) {
            Err(StorageError::Refused(ErrorCode::StoreOutdated { current })) => current,
            Ok(Outcome::Applied(status)) => {
                self.start_writeback(fid, offset, data.len());
                return Ok(Outcome::Applied(status));
            }
            other => return other,
        };
        // A retry of a store that was applied, whose own version the file has moved
        // past since, is answered from its record (a rare path: it costs a commit).
        let key = condition.sequence;
        match self.write(move |tx| tx.find_outcome(&key))? {
            Some(answer) => Ok(Outcome::Replayed(Box::new(answer))),
            None => Err(ErrorCode::StoreOutdated { current: refused }.into()),
        }
    }

    /// A store, all or nothing: a failure at any step (the write of the bytes, a sync,
    /// the commit, a refusal found in the transaction) leaves the file's size, DV and
    /// bytes as they were. Inline data changes with its record in one transaction; a
    /// file growing past `INLINE_BYTES_MAX` gets a whole new durable data file before
    /// the record points to it; bytes stored into a data file in use are written
    /// before the commit and put back if it fails (`Undo`), and are not synced:
    /// `fsync` makes them durable. Why this order is safe for readers and after a
    /// crash: docs/fileserver.md, "Stores".
    fn store(
        &self,
        fid: Fid,
        offset: u64,
        data: &[u8],
        truncate_to: Option<u64>,
        condition: Option<StoreCondition>,
    ) -> Result<Outcome<VnodeStatus>, StorageError> {
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or(ErrorCode::FileTooLarge)?;
        if end > FILE_BYTES_MAX {
            return Err(ErrorCode::FileTooLarge.into());
        }
        // The common case of rewriting a file in place, bytes inside a data file's
        // committed size and length, shares the vnode with stores of other ranges.
        // Checked again under the lock; only an exclusive holder can change them.
        if truncate_to.is_none() && !data.is_empty() && self.overwrite_target(fid, end)?.is_some() {
            let guard = self
                .locks
                .lock(fid.vnode, Access::StoreRange { start: offset, end });
            if let Some((record, file)) = self.overwrite_target(fid, end)? {
                return self.overwrite(fid, &record, &file, offset, data, condition);
            }
            drop(guard);
        }
        let _guard = self.locks.lock(fid.vnode, Access::Exclusive);
        let (record, inline) = self.read_file_record(fid)?;
        if let Some(condition) = &condition {
            condition.check(&record)?;
        }
        let base = truncate_to.unwrap_or(record.size);
        let size = if data.is_empty() { base } else { base.max(end) };
        if size > FILE_BYTES_MAX {
            return Err(ErrorCode::FileTooLarge.into());
        }
        let planned = record.data_version;
        let change = match inline {
            Some(content) if size <= INLINE_BYTES_MAX => {
                DataChange::Inline(spliced(content, base, offset, data, size))
            }
            Some(content) => {
                let content = spliced(content, base, 0, &[], base);
                self.files
                    .write_new(fid.vnode, &content, offset, data, size)?;
                let committed =
                    self.commit_store(fid, planned, size, DataChange::ToFile, condition);
                if committed.is_err() {
                    // The record still says inline: the new file is never read.
                    self.files.remove(fid.vnode);
                }
                return committed;
            }
            None if truncate_to == Some(0) && size <= INLINE_BYTES_MAX => {
                DataChange::FromFile(spliced(Vec::new(), 0, offset, data, size))
            }
            None => {
                return self.store_in_file(
                    fid,
                    &record,
                    offset,
                    data,
                    truncate_to,
                    size,
                    condition,
                );
            }
        };
        self.commit_store(fid, planned, size, change, condition)
    }

    /// A store into the data file under the vnode's exclusive lock: the bytes, and the
    /// zeros a `truncate_to` below them asks for, are written first, then the commit;
    /// a failure of either puts the old bytes and length back.
    #[allow(clippy::too_many_arguments)]
    fn store_in_file(
        &self,
        fid: Fid,
        record: &VnodeRecord,
        offset: u64,
        data: &[u8],
        truncate_to: Option<u64>,
        size: u64,
        condition: Option<StoreCondition>,
    ) -> Result<Outcome<VnodeStatus>, StorageError> {
        let Some(file) = self.files.get(fid.vnode, true)? else {
            return Err(self.missing_data_file(fid.vnode));
        };
        let path = self.files.path(fid.vnode);
        cut_uncommitted(&self.files, &file, &path, record.size)?;
        let mut undo = Undo::begin(&self.files, &file, path)?;
        let written = (|| {
            if let Some(cut) = truncate_to
                && !data.is_empty()
                && offset > cut
            {
                // Old bytes between the cut and the data must read as zeros.
                let stop = offset.min(undo.length);
                if stop > cut {
                    if stop - cut > ZEROED_BYTES_MAX {
                        return Err(ErrorCode::InvalidArgument.into());
                    }
                    undo.write(cut, &vec![0; (stop - cut) as usize])?;
                }
            }
            undo.write(offset, data)
        })();
        let stored = written.and_then(|()| {
            self.commit_store(
                fid,
                record.data_version,
                size,
                DataChange::InFile,
                condition,
            )
        });
        match stored {
            Ok(Outcome::Applied(status)) => {
                if truncate_to.is_some() {
                    // Bytes past the new size are never read; cut them to free the
                    // space (a failure here leaves them to the next extension's cut).
                    if let Err(e) =
                        cut_uncommitted(&self.files, &file, &self.files.path(fid.vnode), size)
                    {
                        warn!(error = %e, "could not cut a data file to its size after a store");
                    }
                }
                Ok(Outcome::Applied(status))
            }
            Ok(replayed) => Ok(replayed),
            Err(e) => {
                undo.restore();
                Err(e)
            }
        }
    }

    /// A store of bytes inside the data file's committed size and length, under a
    /// `StoreRange` lock: written first, then the commit (which finds the record as the
    /// stores of other ranges left it), the old bytes put back if it fails.
    fn overwrite(
        &self,
        fid: Fid,
        record: &VnodeRecord,
        file: &DataFile,
        offset: u64,
        data: &[u8],
        condition: Option<StoreCondition>,
    ) -> Result<Outcome<VnodeStatus>, StorageError> {
        if let Some(condition) = &condition {
            condition.check(record)?;
        }
        let mut undo = Undo::begin(&self.files, file, self.files.path(fid.vnode))?;
        let stored = undo.write(offset, data).and_then(|()| {
            self.write(move |tx| {
                let mut record = tx.checked(fid)?;
                if let Some(answer) = replayed(tx, condition.as_ref(), &record)? {
                    return Ok(Outcome::Replayed(Box::new(answer)));
                }
                touch_data_file(tx, fid.vnode, &mut record)?;
                Ok(Outcome::Applied(finish_store(tx, fid, record, condition)?))
            })
        });
        if stored.is_err() {
            undo.restore();
        }
        stored
    }

    /// The record and the data file of `fid` if a store ending at `end` only rewrites
    /// bytes the file holds: its data is in a data file whose committed size and
    /// length both reach `end`.
    fn overwrite_target(
        &self,
        fid: Fid,
        end: u64,
    ) -> Result<Option<(VnodeRecord, Arc<DataFile>)>, StorageError> {
        let record = self.read(|r| r.checked(fid))?;
        if record.kind != FileKind::File || record.data != DataLocation::File || record.size < end {
            return Ok(None);
        }
        let Some(file) = self.files.get(fid.vnode, false)? else {
            return Ok(None);
        };
        let length = file
            .metadata()
            .map_err(io_error(self.files.path(fid.vnode)))?
            .len();
        Ok((length >= end).then_some((record, file)))
    }

    /// Commits a store's planned change (size, location, DV +1), with its outcome when
    /// it is conditional: a recorded outcome is answered instead, and a condition that
    /// no longer holds refuses it.
    fn commit_store(
        &self,
        fid: Fid,
        planned: DataVersion,
        size: u64,
        change: DataChange,
        condition: Option<StoreCondition>,
    ) -> Result<Outcome<VnodeStatus>, StorageError> {
        self.write(move |tx| {
            let mut record = tx.checked(fid)?;
            if let Some(answer) = replayed(tx, condition.as_ref(), &record)? {
                return Ok(Outcome::Replayed(Box::new(answer)));
            }
            change_data(tx, fid.vnode, &mut record, planned, size, change)?;
            Ok(Outcome::Applied(finish_store(tx, fid, record, condition)?))
        })
    }

    fn missing_data_file(&self, vnode: VnodeId) -> StorageError {
        StorageError::Corrupt {
            path: self.files.path(vnode),
            detail: "a data file asked to be created was not there".into(),
        }
    }

    /// Makes the file's data durable: every store answered before this call, with one
    /// `fdatasync` of its data file shared with concurrent calls (`DataFiles::sync_data`;
    /// inline data is durable with its commit, as is every record). Returns the status
    /// as it was when the call came, whose bytes the sync made durable.
    pub fn fsync(&self, fid: Fid) -> Result<VnodeStatus, StorageError> {
        // Shared with fetches, the record and the file are read as one: every store
        // answered before this call is written. The sync runs after the lock, so the
        // stores of the file's next batch are not held behind it; a store that lands
        // meanwhile is only made durable early.
        let (record, file) = {
            let _guard = self.locks.lock(fid.vnode, Access::Read);
            let record = self.read(|r| r.checked(fid))?;
            let file = match record.kind == FileKind::File && record.data == DataLocation::File {
                true => self.files.get(fid.vnode, false)?,
                false => None,
            };
            (record, file)
        };
        if let Some(file) = file {
            self.files.sync_data(fid.vnode, &file)?;
        }
        Ok(record.status(self.id, fid.vnode))
    }

    /// After a store into a data file: its bytes start for the disk now, so the `Fsync`
    /// that makes its write-back durable finds them written (`DataFiles::start_writeback`).
    fn start_writeback(&self, fid: Fid, offset: u64, length: usize) {
        if length == 0 {
            return;
        }
        if let Ok(Some(file)) = self.files.get(fid.vnode, false) {
            self.files.start_writeback(&file, offset, length as u64);
        }
    }

    /// Changes attributes; a size change truncates or extends the file (DV +1).
    /// Truncating a file kept in a data file to zero brings it back inline; any other
    /// truncation leaves the data where it is.
    pub fn set_attr(&self, fid: Fid, attrs: &SetAttrs) -> Result<VnodeStatus, StorageError> {
        let _guard = self.locks.lock(fid.vnode, Access::Exclusive);
        let mut resize = None;
        let mut committed_size = 0;
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
                committed_size = record.size;
            }
        }
        // Opened before the commit: see `DataFiles` on removal.
        let in_file = match resize {
            Some((_, _, DataChange::InFile)) => self.files.get(fid.vnode, true)?,
            _ => None,
        };
        if let Some(file) = &in_file {
            // An extension must show zeros, not what a failed store left past the size.
            cut_uncommitted(
                &self.files,
                file,
                &self.files.path(fid.vnode),
                committed_size,
            )?;
        }
        let moved_to_file = matches!(resize, Some((_, _, DataChange::ToFile)));
        let new_size = attrs.size;
        let attrs = attrs.clone();
        let status = self.write(move |tx| {
            let mut record = tx.checked(fid)?;
            let now = Timestamp::now();
            if let Some((size, planned, change)) = resize {
                change_data(tx, fid.vnode, &mut record, planned, size, change)?;
            } else if attrs.size.is_some() {
                require_file(record.kind)?;
            }
            record.apply_attrs(&attrs);
            record.ctime = now;
            tx.put(fid.vnode, record.clone());
            Ok(record.status(tx.volume(), fid.vnode))
        });
        let status = match status {
            Err(e) if moved_to_file => {
                // The record still says inline: the new file is never read.
                self.files.remove(fid.vnode);
                return Err(e);
            }
            other => other?,
        };
        if let Some(file) = in_file
            && let Some(size) = new_size
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
        // A reused buffer of the data path's pool: it goes back once the reply is sent.
        let mut buffer = proto::buffer_pool::take(wanted);
        buffer.resize(wanted, 0);
        let Some(file) = self.files.get(vnode, false)? else {
            return Ok(buffer);
        };
        let mut done = 0;
        while done < wanted {
            match self
                .files
                .read_data(&file, &mut buffer[done..], offset + done as u64)
            {
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
        FileKind::Symlink
        | FileKind::MountPoint
        | FileKind::Fifo
        | FileKind::Socket
        | FileKind::CharDevice { .. }
        | FileKind::BlockDevice { .. } => Err(ErrorCode::InvalidArgument.into()),
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
    record.last_store = None;
    Ok(())
}

/// A store inside a data file's size under a `StoreRange` lock: DV +1, the size as it
/// is. The lock keeps the data in its data file and the size from shrinking, so
/// finding otherwise is a bug, refused rather than applied.
fn touch_data_file(
    tx: &mut Tx<'_>,
    vnode: VnodeId,
    record: &mut VnodeRecord,
) -> Result<(), StorageError> {
    require_file(record.kind)?;
    if record.data != DataLocation::File {
        return Err(tx.corrupt(format!(
            "vnode {vnode} left its data file under a store lock"
        )));
    }
    record.touch_data(Timestamp::now());
    record.last_store = None;
    Ok(())
}

/// The recorded answer of a conditional store already applied, if this is a retry of
/// one; else checks its condition against `record` as the transaction finds it.
fn replayed(
    tx: &Tx<'_>,
    condition: Option<&StoreCondition>,
    record: &VnodeRecord,
) -> Result<Option<Result<Response, ErrorCode>>, StorageError> {
    let Some(condition) = condition else {
        return Ok(None);
    };
    if let Some(answer) = tx.find_outcome(&condition.sequence)? {
        return Ok(Some(answer));
    }
    condition.check(record)?;
    Ok(None)
}

/// Puts a store's changed record, marked as the conditional store's if it is one and
/// with its outcome recorded; returns the status it answers.
fn finish_store(
    tx: &mut Tx<'_>,
    fid: Fid,
    mut record: VnodeRecord,
    condition: Option<StoreCondition>,
) -> Result<VnodeStatus, StorageError> {
    record.last_store = condition.map(|c| c.mark(record.data_version));
    tx.put(fid.vnode, record.clone());
    let status = record.status(tx.volume(), fid.vnode);
    if let Some(condition) = condition {
        let answer = Response::Status {
            status: status.clone(),
            callback: None,
        };
        tx.record_outcome(&condition.sequence, Ok(answer))?;
    }
    Ok(status)
}

/// The precondition of a `StoreDataIf`: the version its write-back started from, and
/// who sends it. It holds while the file is at `base`, or while its version was made by
/// a store of the same client instance from this write-back or an earlier one, so a
/// write-back's pipelined stores never refuse each other and an older write-back's
/// store that lands late is still followed by the newer one; never after any other
/// change (a truncate, another client's store, a newer write-back of the same client).
#[derive(Clone, Copy, Debug)]
pub struct StoreCondition {
    pub base: DataVersion,
    pub write_back: WriteBackId,
    /// The request's sequence key, which names the client instance.
    pub sequence: SequenceKey,
}

impl StoreCondition {
    pub fn holds(&self, record: &VnodeRecord) -> bool {
        record.data_version == self.base
            || record.last_store.is_some_and(|mark| {
                mark.version == record.data_version
                    && mark.client == self.sequence.client
                    && mark.instance == self.sequence.instance
                    && mark.write_back <= self.write_back
            })
    }

    fn check(&self, record: &VnodeRecord) -> Result<(), StorageError> {
        if self.holds(record) {
            return Ok(());
        }
        Err(ErrorCode::StoreOutdated {
            current: record.data_version,
        }
        .into())
    }

    fn mark(&self, version: DataVersion) -> StoreMark {
        StoreMark {
            client: self.sequence.client,
            instance: self.sequence.instance,
            write_back: self.write_back,
            version,
        }
    }
}

/// Bytes of a data file past its committed size are never read, but a later
/// extension would show them instead of zeros: they are what a failed store could not
/// take back or a crash left between a store's write and its commit. Cut them (not
/// synced: every extension cuts again first).
fn cut_uncommitted(
    files: &DataFiles,
    file: &File,
    path: &Path,
    size: u64,
) -> Result<(), StorageError> {
    if file.metadata().map_err(io_error(path))?.len() > size {
        files.check_fence(path)?;
        file.set_len(size).map_err(io_error(path))?;
    }
    Ok(())
}

/// What a store has changed in a data file before its commit, to put back if it fails:
/// the file's length, and the old bytes of every range it wrote inside that length.
struct Undo<'a> {
    files: &'a DataFiles,
    file: &'a DataFile,
    path: PathBuf,
    length: u64,
    /// (offset, the bytes there before, how many of them were overwritten), in order.
    saved: Vec<(u64, Vec<u8>, usize)>,
}

impl<'a> Undo<'a> {
    fn begin(
        files: &'a DataFiles,
        file: &'a DataFile,
        path: PathBuf,
    ) -> Result<Undo<'a>, StorageError> {
        let length = file.metadata().map_err(io_error(&path))?.len();
        Ok(Undo {
            files,
            file,
            path,
            length,
            saved: Vec::new(),
        })
    }

    /// Writes `data` at `offset`, first saving the bytes it overwrites. On a failure
    /// part of it may be written: `restore` puts back what was.
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), StorageError> {
        let kept = self.length.saturating_sub(offset).min(data.len() as u64) as usize;
        let mut old = vec![0; kept];
        self.file
            .read_exact_at(&mut old, offset)
            .map_err(io_error(&self.path))?;
        self.saved.push((offset, old, 0));
        let Some((_, _, written)) = self.saved.last_mut() else {
            unreachable!("pushed above");
        };
        self.files.check_fence(&self.path)?;
        while *written < data.len() {
            let at = offset + *written as u64;
            match self.files.write_data(self.file, &data[*written..], at) {
                Ok(0) => {
                    let e = std::io::Error::from(ErrorKind::WriteZero);
                    return Err(io_error(&self.path)(e));
                }
                Ok(n) => *written += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(io_error(&self.path)(e)),
            }
        }
        Ok(())
    }

    /// Puts the old bytes and length back. Rewriting bytes just written needs no new
    /// space, so this succeeds on a full disk; if it fails anyway, the file's bytes
    /// no longer match its version and a person must look.
    fn restore(self) {
        let mut failed = None;
        for (offset, old, written) in self.saved.iter().rev() {
            let back = &old[..(*written).min(old.len())];
            if let Err(e) = self.file.write_all_at(back, *offset) {
                failed.get_or_insert(e);
            }
        }
        match self.file.metadata() {
            Ok(now) if now.len() > self.length => {
                if let Err(e) = self.file.set_len(self.length) {
                    failed.get_or_insert(e);
                }
            }
            Ok(_) => {}
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
        if let Some(e) = failed {
            error!(path = %self.path.display(), error = %e, "a failed store could not be undone: the data file no longer matches its data version");
        }
    }
}

/// Sets a file's size, keeping the volume's byte count and quota.
pub(super) fn resize(
    tx: &mut Tx<'_>,
    record: &mut VnodeRecord,
    size: u64,
) -> Result<(), StorageError> {
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

#[cfg(test)]
mod batch_tests;
