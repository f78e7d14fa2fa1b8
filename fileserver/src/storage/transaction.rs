//! One request's part of a batch's write transaction: the records it reads and changes,
//! and the physical writes they become, kept for the batch's metadata log record.
//! Invariant: a request's changes reach the tables only through `flush`, once it
//! succeeded, so a failed one leaves nothing behind but a sequenced refusal's record;
//! every write to the tables is also added, in order, to the batch's `Change`s.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;

use proto::{AccessList, ErrorCode, Fid, FileKind, Response, VnodeId, VolumeId};
use redb::WriteTransaction;

use super::StorageError;
use super::outcomes::SequenceKey;
use super::records::{
    AclRecord, OUTCOME_FORMAT, OutcomeRecord, VnodeRecord, VolumeHeader, kind_code,
};
use super::redo::Change;
use super::tables::{EntryValue, Reader, Writer};

/// A write transaction in progress: records read and changed are kept here and written
/// once at the end, so one request touching a vnode twice writes it once.
pub(super) struct Tx<'a> {
    reader: Reader<'a>,
    writer: Writer<'a>,
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
    /// Access lists to write in order; `None` removes the row.
    acls: Vec<(u64, Option<AccessList>)>,
    /// The batch's writes so far, which its metadata log record carries.
    redo: &'a RefCell<Vec<Change>>,
    /// What to queue in the metadata log just before this change's record, in the same
    /// flush (`log_ahead`).
    ahead: Vec<Box<dyn FnOnce() + Send>>,
}

impl<'a> Tx<'a> {
    pub(super) fn new(
        txn: &'a WriteTransaction,
        path: &'a Path,
        volume: VolumeId,
        redo: &'a RefCell<Vec<Change>>,
    ) -> Tx<'a> {
        Tx {
            reader: Reader::new(txn, path, volume),
            writer: Writer::new(txn, path),
            header: None,
            header_dirty: false,
            cache: BTreeMap::new(),
            entries: Vec::new(),
            file_data: Vec::new(),
            dead_files: Vec::new(),
            acls: Vec::new(),
            redo,
            ahead: Vec::new(),
        }
    }

    /// Runs `queue` (which queues records in the metadata log) once this change is
    /// applied, just before its batch's record is queued, with the log's flusher held
    /// off so that one flush makes them all durable. Dropped unrun if the change fails.
    pub(super) fn log_ahead(&mut self, queue: impl FnOnce() + Send + 'static) {
        self.ahead.push(Box::new(queue));
    }

    /// What this change asked to be queued ahead of its record.
    pub(super) fn take_ahead(&mut self) -> Vec<Box<dyn FnOnce() + Send>> {
        std::mem::take(&mut self.ahead)
    }

    pub(super) fn volume(&self) -> VolumeId {
        self.reader.volume()
    }

    pub(super) fn corrupt(&self, detail: String) -> StorageError {
        self.reader.corrupt(detail)
    }

    pub(super) fn header_mut(&mut self) -> Result<&mut VolumeHeader, StorageError> {
        if self.header.is_none() {
            self.header = Some(self.reader.header()?);
        }
        self.header_dirty = true;
        self.header
            .as_mut()
            .ok_or_else(|| self.reader.corrupt("volume header vanished".into()))
    }

    /// Sets the header of a new volume.
    pub(super) fn put_header(&mut self, header: VolumeHeader) {
        self.header = Some(header);
        self.header_dirty = true;
    }

    pub(super) fn vnode(&mut self, vnode: VnodeId) -> Result<VnodeRecord, StorageError> {
        if let Some((_, current)) = self.cache.get(&vnode.0) {
            return current.clone().ok_or_else(|| ErrorCode::Stale.into());
        }
        let record = self.reader.vnode(vnode)?;
        self.cache
            .insert(vnode.0, (Some(record.clone()), Some(record.clone())));
        Ok(record)
    }

    pub(super) fn checked(&mut self, fid: Fid) -> Result<VnodeRecord, StorageError> {
        if fid.volume != self.reader.volume() {
            return Err(ErrorCode::NoSuchVolume.into());
        }
        let record = self.vnode(fid.vnode)?;
        if record.unique != fid.unique {
            return Err(ErrorCode::Stale.into());
        }
        Ok(record)
    }

    pub(super) fn directory(&mut self, fid: Fid) -> Result<VnodeRecord, StorageError> {
        let record = self.checked(fid)?;
        if record.kind != FileKind::Directory {
            return Err(ErrorCode::NotDirectory.into());
        }
        Ok(record)
    }

    pub(super) fn put(&mut self, vnode: VnodeId, record: VnodeRecord) {
        self.cache.entry(vnode.0).or_insert((None, None)).1 = Some(record);
    }

    /// Deletes the vnode's record.
    pub(super) fn delete(&mut self, vnode: VnodeId) {
        self.cache.entry(vnode.0).or_insert((None, None)).1 = None;
    }

    pub(super) fn entry(
        &mut self,
        dir: VnodeId,
        name: &str,
    ) -> Result<Option<EntryValue>, StorageError> {
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

    pub(super) fn put_entry(
        &mut self,
        dir: VnodeId,
        name: &str,
        vnode: VnodeId,
        record: &VnodeRecord,
    ) {
        self.entries.push((
            (dir.0, name.to_owned()),
            Some((vnode.0, record.unique.0, kind_code(record.kind))),
        ));
    }

    pub(super) fn remove_entry(&mut self, dir: VnodeId, name: &str) {
        self.entries.push(((dir.0, name.to_owned()), None));
    }

    /// Sets an inline file's bytes; empty removes its row.
    pub(super) fn put_file_data(&mut self, vnode: VnodeId, content: Vec<u8>) {
        self.file_data.push((vnode.0, content));
    }

    /// A directory's access list as stored (with this request's changes); `None` when it
    /// has no row.
    pub(super) fn acl(&mut self, dir: VnodeId) -> Result<Option<AccessList>, StorageError> {
        if let Some((_, acl)) = self.acls.iter().rev().find(|(d, _)| *d == dir.0) {
            return Ok(acl.clone());
        }
        self.reader.acl(dir)
    }

    /// Sets a directory's access list; `None` removes its row (a removed directory).
    pub(super) fn put_acl(&mut self, dir: VnodeId, acl: Option<AccessList>) {
        self.acls.push((dir.0, acl));
    }

    /// Removes the vnode's data file once the transaction is committed.
    pub(super) fn remove_data_file(&mut self, vnode: VnodeId) {
        self.dead_files.push(vnode);
    }

    /// The recorded answer of `key`, if any.
    pub(super) fn find_outcome(
        &self,
        key: &SequenceKey,
    ) -> Result<Option<Result<Response, ErrorCode>>, StorageError> {
        self.writer.find_outcome(key)
    }

    /// Records `answer` under `key`, at once: not undone when the request is refused.
    pub(super) fn record_outcome(
        &self,
        key: &SequenceKey,
        answer: Result<Response, ErrorCode>,
    ) -> Result<(), StorageError> {
        let record = postcard::to_allocvec(&OutcomeRecord {
            format: OUTCOME_FORMAT,
            answer,
        })
        .map_err(|e| self.corrupt(format!("encode outcome: {e}")))?;
        let change = Change::Outcome {
            client: key.client.0.as_u128(),
            instance: key.instance.0,
            seq: key.seq,
            record,
        };
        self.writer.apply(std::slice::from_ref(&change))?;
        self.redo.borrow_mut().push(change);
        Ok(())
    }

    /// Writes the changes into the transaction; returns the data files to remove after
    /// the commit.
    pub(super) fn flush(self) -> Result<Vec<VnodeId>, StorageError> {
        #[cfg(test)]
        if faults::take_flush() {
            return Err(self.corrupt("injected failure of the batch".into()));
        }
        let Tx {
            reader,
            writer,
            header,
            header_dirty,
            cache,
            entries,
            file_data,
            dead_files,
            acls,
            redo,
            // Taken by the batch (`take_ahead`) before this.
            ahead: _,
        } = self;
        let encode =
            |what: &str, e: &dyn std::fmt::Display| reader.corrupt(format!("encode {what}: {e}"));
        let mut changes = Vec::new();
        if header_dirty && let Some(header) = header {
            let bytes = postcard::to_allocvec(&header).map_err(|e| encode("header", &e))?;
            changes.push(Change::Header(bytes));
        }
        for (vnode, (before, after)) in cache {
            if before == after {
                continue;
            }
            let record = match after {
                Some(record) => Some(
                    postcard::to_allocvec(&record)
                        .map_err(|e| encode(&format!("vnode {vnode}"), &e))?,
                ),
                None => None,
            };
            changes.push(Change::Vnode { vnode, record });
        }
        for ((dir, name), value) in entries {
            changes.push(Change::Entry { dir, name, value });
        }
        for (vnode, content) in file_data {
            changes.push(Change::FileData { vnode, content });
        }
        for (dir, acl) in acls {
            let record = match acl {
                Some(acl) => Some(
                    AclRecord::encode(&acl)
                        .map_err(|e| encode(&format!("access list {dir}"), &e))?,
                ),
                None => None,
            };
            changes.push(Change::Acl { dir, record });
        }
        writer.apply(&changes)?;
        redo.borrow_mut().extend(changes);
        Ok(dead_files)
    }
}

/// A failure a test arms on its own thread: the next batch it leads fails to write its
/// changes, as a commit that fails would, and nothing of the batch is committed.
#[cfg(test)]
pub(super) mod faults {
    use std::cell::Cell;

    thread_local! {
        static FLUSH_FAILS: Cell<bool> = const { Cell::new(false) };
    }

    pub(in crate::storage) fn fail_next_batch() {
        FLUSH_FAILS.set(true);
    }

    pub(super) fn take_flush() -> bool {
        FLUSH_FAILS.replace(false)
    }
}
