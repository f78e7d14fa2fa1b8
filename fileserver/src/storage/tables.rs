//! The tables of a volume's `meta.redb`, and typed reads and writes of them.
//! Invariant: no other module opens a table, and every value goes in with the encoding
//! `records` defines, so the format on disk is the one `docs/fileserver.md` describes.

use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;

use proto::{AccessList, ErrorCode, Fid, FileKind, Response, VnodeId, VolumeId};
use redb::{Database, ReadableTable, TableDefinition, WriteTransaction};

use super::outcomes::{SEQ_WINDOW, SequenceKey};
use super::records::{
    AclRecord, HEADER_FORMAT, OUTCOME_FORMAT, OutcomeRecord, VnodeRecord, VolumeHeader,
};
use super::{StorageError, io_error};
use crate::fence::{Fence, FencedFile};

/// `HEADER_KEY` -> encoded `VolumeHeader`.
const HEADER: TableDefinition<&str, &[u8]> = TableDefinition::new("volume");
/// Vnode number -> encoded `VnodeRecord`.
const VNODES: TableDefinition<u64, &[u8]> = TableDefinition::new("vnodes");
/// (directory vnode, name) -> `EntryValue`: ordered, so a listing is a range scan that
/// resumes after any name.
const ENTRIES: TableDefinition<(u64, &str), (u64, u32, u8)> = TableDefinition::new("entries");
/// Vnode -> the bytes of an `Inline` file, exactly `size` of them, no row while it is
/// empty. Apart from `VNODES` so that vnode records stay small.
const FILE_DATA: TableDefinition<u64, &[u8]> = TableDefinition::new("file_data");
/// (client uuid as u128, instance nonce, seq) -> encoded `OutcomeRecord`, written in the
/// change's own transaction. Made by the first sequenced change, not with the volume.
const OUTCOMES: TableDefinition<(u128, u64, u64), &[u8]> = TableDefinition::new("outcomes");
/// Directory vnode -> encoded `AclRecord`; a directory without a row has the list of a
/// new volume's root (`AccessList::for_new_volume`).
const ACLS: TableDefinition<u64, &[u8]> = TableDefinition::new("acls");
const HEADER_KEY: &str = "header";

/// A directory entry's value: (vnode, uniquifier, kind code).
pub(super) type EntryValue = (u64, u32, u8);

/// Opens (or with `create`, creates) a volume's redb file on the fenced backend.
pub(super) fn open_database(
    path: &Path,
    create: bool,
    fence: &Arc<Fence>,
) -> Result<Database, StorageError> {
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

/// Makes every table of a new volume, in one commit, so readers never meet a missing one.
pub(super) fn create_tables(db: &Database, path: &Path) -> Result<(), StorageError> {
    let txn = db.begin_write().map_err(db_error(path))?;
    txn.open_table(HEADER).map_err(db_error(path))?;
    txn.open_table(VNODES).map_err(db_error(path))?;
    txn.open_table(ENTRIES).map_err(db_error(path))?;
    txn.open_table(FILE_DATA).map_err(db_error(path))?;
    txn.open_table(ACLS).map_err(db_error(path))?;
    txn.commit().map_err(db_error(path))
}

/// Makes the tables an older volume lacks: volumes of record format 1 predate inline
/// data and its table, volumes before access lists their table.
pub(super) fn add_missing_tables(db: &Database, path: &Path) -> Result<(), StorageError> {
    let txn = db.begin_write().map_err(db_error(path))?;
    txn.open_table(FILE_DATA).map_err(db_error(path))?;
    txn.open_table(ACLS).map_err(db_error(path))?;
    txn.commit().map_err(db_error(path))
}

pub(super) fn db_error<E: Into<redb::Error>>(path: &Path) -> impl FnOnce(E) -> StorageError + '_ {
    move |e| StorageError::Database {
        path: path.to_owned(),
        source: e.into(),
    }
}

/// The tables a reader needs, from a read or a write transaction.
pub(super) trait TxnTables {
    fn get_header(&self) -> Result<Option<Vec<u8>>, redb::Error>;
    fn get_vnode(&self, vnode: u64) -> Result<Option<Vec<u8>>, redb::Error>;
    fn get_entry(&self, dir: u64, name: &str) -> Result<Option<EntryValue>, redb::Error>;
    fn get_file_data(&self, vnode: u64) -> Result<Option<Vec<u8>>, redb::Error>;
    fn get_acl(&self, dir: u64) -> Result<Option<Vec<u8>>, redb::Error>;
    /// Visits the entries of `dir` in name order, after `after` if given, while `visit`
    /// returns true.
    fn scan_entries(
        &self,
        dir: u64,
        after: Option<&str>,
        visit: &mut dyn FnMut(&str, EntryValue) -> bool,
    ) -> Result<(), redb::Error>;
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
            fn get_entry(&self, dir: u64, name: &str) -> Result<Option<EntryValue>, redb::Error> {
                let table = self.open_table(ENTRIES)?;
                Ok(table.get((dir, name))?.map(|v| v.value()))
            }
            fn get_file_data(&self, vnode: u64) -> Result<Option<Vec<u8>>, redb::Error> {
                let table = self.open_table(FILE_DATA)?;
                Ok(table.get(vnode)?.map(|v| v.value().to_vec()))
            }
            fn get_acl(&self, dir: u64) -> Result<Option<Vec<u8>>, redb::Error> {
                let table = self.open_table(ACLS)?;
                Ok(table.get(dir)?.map(|v| v.value().to_vec()))
            }
            fn scan_entries(
                &self,
                dir: u64,
                after: Option<&str>,
                visit: &mut dyn FnMut(&str, EntryValue) -> bool,
            ) -> Result<(), redb::Error> {
                let table = self.open_table(ENTRIES)?;
                let lower = match after {
                    Some(name) => Bound::Excluded((dir, name)),
                    None => Bound::Included((dir, "")),
                };
                let upper = Bound::Excluded((dir + 1, ""));
                for item in table.range::<(u64, &str)>((lower, upper))? {
                    let (key, value) = item?;
                    let (_, name) = key.value();
                    if !visit(name, value.value()) {
                        break;
                    }
                }
                Ok(())
            }
        }
    };
}

impl_txn_tables!(redb::ReadTransaction);
impl_txn_tables!(redb::WriteTransaction);

/// Typed reads through either kind of transaction.
pub(super) struct Reader<'a> {
    txn: &'a dyn TxnTables,
    path: &'a Path,
    volume: VolumeId,
}

impl<'a> Reader<'a> {
    pub(super) fn new(txn: &'a dyn TxnTables, path: &'a Path, volume: VolumeId) -> Reader<'a> {
        Reader { txn, path, volume }
    }

    pub(super) fn volume(&self) -> VolumeId {
        self.volume
    }

    pub(super) fn corrupt(&self, detail: String) -> StorageError {
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

    pub(super) fn header(&self) -> Result<VolumeHeader, StorageError> {
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
    pub(super) fn vnode(&self, vnode: VnodeId) -> Result<VnodeRecord, StorageError> {
        let bytes = self
            .txn
            .get_vnode(vnode.0)
            .map_err(|e| self.db(e))?
            .ok_or(ErrorCode::Stale)?;
        VnodeRecord::decode(&bytes).map_err(|e| self.corrupt(format!("vnode {vnode}: {e}")))
    }

    /// An inline file's bytes (empty when it has no row).
    pub(super) fn file_data(&self, vnode: VnodeId) -> Result<Vec<u8>, StorageError> {
        Ok(self
            .txn
            .get_file_data(vnode.0)
            .map_err(|e| self.db(e))?
            .unwrap_or_default())
    }

    /// A directory's access list as stored; `None` when it has no row.
    pub(super) fn acl(&self, dir: VnodeId) -> Result<Option<AccessList>, StorageError> {
        let Some(bytes) = self.txn.get_acl(dir.0).map_err(|e| self.db(e))? else {
            return Ok(None);
        };
        AclRecord::decode(&bytes)
            .map(Some)
            .map_err(|e| self.corrupt(format!("access list of vnode {dir}: {e}")))
    }

    /// The vnode a fid names, `Stale` unless the uniquifier matches.
    pub(super) fn checked(&self, fid: Fid) -> Result<VnodeRecord, StorageError> {
        if fid.volume != self.volume {
            return Err(ErrorCode::NoSuchVolume.into());
        }
        let record = self.vnode(fid.vnode)?;
        if record.unique != fid.unique {
            return Err(ErrorCode::Stale.into());
        }
        Ok(record)
    }

    pub(super) fn directory(&self, fid: Fid) -> Result<VnodeRecord, StorageError> {
        let record = self.checked(fid)?;
        if record.kind != FileKind::Directory {
            return Err(ErrorCode::NotDirectory.into());
        }
        Ok(record)
    }

    pub(super) fn entry(
        &self,
        dir: VnodeId,
        name: &str,
    ) -> Result<Option<EntryValue>, StorageError> {
        self.txn.get_entry(dir.0, name).map_err(|e| self.db(e))
    }

    /// Visits the entries of `dir` in name order, after `after` if given, until `visit`
    /// returns false or fails.
    pub(super) fn scan_entries(
        &self,
        dir: VnodeId,
        after: Option<&str>,
        mut visit: impl FnMut(&str, EntryValue) -> Result<bool, StorageError>,
    ) -> Result<(), StorageError> {
        let mut failed = None;
        self.txn
            .scan_entries(dir.0, after, &mut |name, value| match visit(name, value) {
                Ok(more) => more,
                Err(e) => {
                    failed = Some(e);
                    false
                }
            })
            .map_err(|e| self.db(e))?;
        failed.map_or(Ok(()), Err)
    }
}

/// Typed writes through a batch's write transaction.
pub(super) struct Writer<'a> {
    txn: &'a WriteTransaction,
    path: &'a Path,
}

impl<'a> Writer<'a> {
    pub(super) fn new(txn: &'a WriteTransaction, path: &'a Path) -> Writer<'a> {
        Writer { txn, path }
    }

    fn corrupt(&self, detail: String) -> StorageError {
        StorageError::Corrupt {
            path: self.path.to_owned(),
            detail,
        }
    }

    pub(super) fn put_header(&self, header: &VolumeHeader) -> Result<(), StorageError> {
        let path = self.path;
        let bytes = postcard::to_allocvec(header)
            .map_err(|e| self.corrupt(format!("encode header: {e}")))?;
        let mut table = self.txn.open_table(HEADER).map_err(db_error(path))?;
        table
            .insert(HEADER_KEY, bytes.as_slice())
            .map_err(db_error(path))?;
        Ok(())
    }

    /// Writes each vnode to its new record, or removes it for `None`.
    pub(super) fn put_vnodes(
        &self,
        vnodes: impl IntoIterator<Item = (u64, Option<VnodeRecord>)>,
    ) -> Result<(), StorageError> {
        let path = self.path;
        let mut table = self.txn.open_table(VNODES).map_err(db_error(path))?;
        for (vnode, record) in vnodes {
            match record {
                Some(record) => {
                    let bytes = postcard::to_allocvec(&record)
                        .map_err(|e| self.corrupt(format!("encode vnode {vnode}: {e}")))?;
                    table
                        .insert(vnode, bytes.as_slice())
                        .map_err(db_error(path))?;
                }
                None => {
                    table.remove(vnode).map_err(db_error(path))?;
                }
            }
        }
        Ok(())
    }

    /// Applies directory entry changes in order: `Some` inserts, `None` removes.
    pub(super) fn put_entries(
        &self,
        entries: impl IntoIterator<Item = ((u64, String), Option<EntryValue>)>,
    ) -> Result<(), StorageError> {
        let path = self.path;
        let mut table = self.txn.open_table(ENTRIES).map_err(db_error(path))?;
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
        Ok(())
    }

    /// Writes inline file data in order; empty content removes the row.
    pub(super) fn put_file_data(
        &self,
        file_data: impl IntoIterator<Item = (u64, Vec<u8>)>,
    ) -> Result<(), StorageError> {
        let path = self.path;
        let mut table = self.txn.open_table(FILE_DATA).map_err(db_error(path))?;
        for (vnode, content) in file_data {
            if content.is_empty() {
                table.remove(vnode).map_err(db_error(path))?;
            } else {
                table
                    .insert(vnode, content.as_slice())
                    .map_err(db_error(path))?;
            }
        }
        Ok(())
    }

    /// Writes access lists in order; `None` removes the row.
    pub(super) fn put_acls(
        &self,
        acls: impl IntoIterator<Item = (u64, Option<AccessList>)>,
    ) -> Result<(), StorageError> {
        let path = self.path;
        let mut table = self.txn.open_table(ACLS).map_err(db_error(path))?;
        for (dir, acl) in acls {
            match acl {
                Some(acl) => {
                    let bytes = AclRecord::encode(&acl)
                        .map_err(|e| self.corrupt(format!("encode access list {dir}: {e}")))?;
                    table
                        .insert(dir, bytes.as_slice())
                        .map_err(db_error(path))?;
                }
                None => {
                    table.remove(dir).map_err(db_error(path))?;
                }
            }
        }
        Ok(())
    }

    /// The recorded answer of `key`, if any.
    pub(super) fn find_outcome(
        &self,
        key: &SequenceKey,
    ) -> Result<Option<Result<Response, ErrorCode>>, StorageError> {
        let path = self.path;
        let table = self.txn.open_table(OUTCOMES).map_err(db_error(path))?;
        let Some(bytes) = table.get(outcome_key(key)).map_err(db_error(path))? else {
            return Ok(None);
        };
        let record: OutcomeRecord =
            postcard::from_bytes(bytes.value()).map_err(|e| self.corrupt(e.to_string()))?;
        if record.format != OUTCOME_FORMAT {
            return Err(self.corrupt(format!("outcome record format {}", record.format)));
        }
        Ok(Some(record.answer))
    }

    /// Records `answer` under `key` and prunes the client's older records: those of
    /// every other instance, and those of this instance below `seq - SEQ_WINDOW`.
    pub(super) fn record_outcome(
        &self,
        key: &SequenceKey,
        answer: Result<Response, ErrorCode>,
    ) -> Result<(), StorageError> {
        let path = self.path;
        let bytes = postcard::to_allocvec(&OutcomeRecord {
            format: OUTCOME_FORMAT,
            answer,
        })
        .map_err(|e| self.corrupt(format!("encode outcome: {e}")))?;
        let mut table = self.txn.open_table(OUTCOMES).map_err(db_error(path))?;
        table
            .insert(outcome_key(key), bytes.as_slice())
            .map_err(db_error(path))?;
        let client = key.client.0.as_u128();
        let instance = key.instance.0;
        // Older instances sort before this one, and so do this instance's old seqs.
        let oldest_kept = key.seq.saturating_sub(SEQ_WINDOW);
        table
            .retain_in((client, 0, 0)..(client, instance, oldest_kept), |_, _| {
                false
            })
            .map_err(db_error(path))?;
        if let Some(next) = instance.checked_add(1) {
            table
                .retain_in((client, next, 0)..=(client, u64::MAX, u64::MAX), |_, _| {
                    false
                })
                .map_err(db_error(path))?;
        }
        Ok(())
    }
}

fn outcome_key(key: &SequenceKey) -> (u128, u64, u64) {
    (key.client.0.as_u128(), key.instance.0, key.seq)
}

#[cfg(test)]
impl Writer<'_> {
    /// How many outcomes the table holds.
    pub(super) fn outcome_count(&self) -> u64 {
        use redb::ReadableTableMetadata;
        self.txn
            .open_table(OUTCOMES)
            .map_err(redb::Error::from)
            .and_then(|t| Ok(t.len()?))
            .unwrap_or(0)
    }
}
