//! The tables of a volume's `meta.redb`, and typed reads and writes of them.
//! Invariant: no other module opens a table, and every value goes in with the encoding
//! `records` defines, so the format on disk is the one `docs/fileserver.md` describes.

use std::ops::Bound;
use std::path::Path;

use proto::{AccessList, ErrorCode, Fid, FileKind, Response, VnodeId, VolumeId};
use redb::{Database, ReadableTable, TableDefinition, WriteTransaction};

use super::disk::Disk;
use super::metadata_log::Lsn;
use super::outcomes::{SEQ_WINDOW, SequenceKey};
use super::records::{
    AclRecord, HEADER_FORMAT, OUTCOME_FORMAT, OutcomeRecord, VnodeRecord, VolumeHeader,
};
use super::redo::Change;
use super::{StorageError, io_error};

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
/// `APPLIED_KEY` -> the number of the last metadata log record the tables include;
/// made durable with them by each checkpoint.
const LOG: TableDefinition<&str, u64> = TableDefinition::new("log");
const HEADER_KEY: &str = "header";
const APPLIED_KEY: &str = "applied";

pub(super) use super::redo::EntryValue;

/// Opens (or with `create`, creates) a volume's redb file on `disk`.
pub(super) fn open_database(
    disk: &dyn Disk,
    path: &Path,
    create: bool,
) -> Result<Database, StorageError> {
    let backend = disk.database(path, create).map_err(io_error(path))?;
    redb::Builder::new()
        .create_with_backend(backend)
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
    txn.open_table(LOG).map_err(db_error(path))?;
    txn.commit().map_err(db_error(path))
}

/// Makes the tables an older volume lacks: volumes of record format 1 predate inline
/// data and its table, volumes before access lists their table, volumes before the
/// metadata log the log's.
pub(super) fn add_missing_tables(db: &Database, path: &Path) -> Result<(), StorageError> {
    let txn = db.begin_write().map_err(db_error(path))?;
    txn.open_table(FILE_DATA).map_err(db_error(path))?;
    txn.open_table(ACLS).map_err(db_error(path))?;
    txn.open_table(LOG).map_err(db_error(path))?;
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

    /// Applies one batch's changes in order, opening each table once: the only way
    /// anything is written to a volume's tables, live and in replay alike.
    pub(super) fn apply(&self, changes: &[Change]) -> Result<(), StorageError> {
        let path = self.path;
        let mut header = None;
        let mut vnodes = None;
        let mut entries = None;
        let mut file_data = None;
        let mut acls = None;
        let mut outcomes = None;
        for change in changes {
            match change {
                Change::Header(bytes) => {
                    let table = match &mut header {
                        Some(table) => table,
                        None => header.insert(self.txn.open_table(HEADER).map_err(db_error(path))?),
                    };
                    table
                        .insert(HEADER_KEY, bytes.as_slice())
                        .map_err(db_error(path))?;
                }
                Change::Vnode { vnode, record } => {
                    let table = match &mut vnodes {
                        Some(table) => table,
                        None => vnodes.insert(self.txn.open_table(VNODES).map_err(db_error(path))?),
                    };
                    match record {
                        Some(bytes) => table.insert(vnode, bytes.as_slice()),
                        None => table.remove(vnode),
                    }
                    .map_err(db_error(path))?;
                }
                Change::Entry { dir, name, value } => {
                    let table = match &mut entries {
                        Some(table) => table,
                        None => {
                            entries.insert(self.txn.open_table(ENTRIES).map_err(db_error(path))?)
                        }
                    };
                    match value {
                        Some(value) => table.insert((*dir, name.as_str()), value).map(drop),
                        None => table.remove((*dir, name.as_str())).map(drop),
                    }
                    .map_err(db_error(path))?;
                }
                Change::FileData { vnode, content } => {
                    let table = match &mut file_data {
                        Some(table) => table,
                        None => file_data
                            .insert(self.txn.open_table(FILE_DATA).map_err(db_error(path))?),
                    };
                    if content.is_empty() {
                        table.remove(vnode).map(drop)
                    } else {
                        table.insert(vnode, content.as_slice()).map(drop)
                    }
                    .map_err(db_error(path))?;
                }
                Change::Acl { dir, record } => {
                    let table = match &mut acls {
                        Some(table) => table,
                        None => acls.insert(self.txn.open_table(ACLS).map_err(db_error(path))?),
                    };
                    match record {
                        Some(bytes) => table.insert(dir, bytes.as_slice()),
                        None => table.remove(dir),
                    }
                    .map_err(db_error(path))?;
                }
                Change::Outcome {
                    client,
                    instance,
                    seq,
                    record,
                } => {
                    let table = match &mut outcomes {
                        Some(table) => table,
                        None => {
                            outcomes.insert(self.txn.open_table(OUTCOMES).map_err(db_error(path))?)
                        }
                    };
                    let (client, instance) = (*client, *instance);
                    table
                        .insert((client, instance, *seq), record.as_slice())
                        .map_err(db_error(path))?;
                    // The client's older records go: those of every other instance, and
                    // this instance's below `seq - SEQ_WINDOW` (older instances sort
                    // before this one, and so do this instance's old seqs).
                    let oldest_kept = seq.saturating_sub(SEQ_WINDOW);
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
                }
            }
        }
        Ok(())
    }

    /// The number of the last metadata log record applied to the tables (0: none).
    pub(super) fn applied(&self) -> Result<Lsn, StorageError> {
        let path = self.path;
        let table = self.txn.open_table(LOG).map_err(db_error(path))?;
        let applied = table.get(APPLIED_KEY).map_err(db_error(path))?;
        Ok(Lsn(applied.map_or(0, |v| v.value())))
    }

    /// Records that the tables include every change up to record `lsn`, in the
    /// transaction that applies it.
    pub(super) fn set_applied(&self, lsn: Lsn) -> Result<(), StorageError> {
        let path = self.path;
        let mut table = self.txn.open_table(LOG).map_err(db_error(path))?;
        table.insert(APPLIED_KEY, lsn.0).map_err(db_error(path))?;
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
}

fn outcome_key(key: &SequenceKey) -> (u128, u64, u64) {
    (key.client.0.as_u128(), key.instance.0, key.seq)
}

/// Every row of every table of `db`, one line each, for tests that compare tables.
#[cfg(test)]
pub(super) fn dump(db: &Database) -> Vec<String> {
    use redb::ReadableDatabase;
    let txn = db.begin_read().unwrap();
    let mut rows = Vec::new();
    macro_rules! rows_of {
        ($table:expr) => {
            if let Ok(table) = txn.open_table($table) {
                for row in table.iter().unwrap() {
                    let (key, value) = row.unwrap();
                    rows.push(format!(
                        "{} {:?} = {:?}",
                        $table,
                        key.value(),
                        value.value()
                    ));
                }
            }
        };
    }
    rows_of!(HEADER);
    rows_of!(VNODES);
    rows_of!(ENTRIES);
    rows_of!(FILE_DATA);
    rows_of!(OUTCOMES);
    rows_of!(ACLS);
    rows_of!(LOG);
    rows
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
