//! `LogStore`: a replica's Raft log, vote and commit point in their own redb file, one
//! synced transaction per `append` (so one fsync serves every entry openraft batched).
//! Invariant: `append` reports an entry flushed only after its transaction committed
//! durably, and a purge or truncate never leaves a gap below the last entry.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, Entry, LogId, RaftLogReader, StorageError, StorageIOError, Vote};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::TypeConfig;
use crate::error::VldbError;

/// Log index -> postcard `Entry`.
const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");
/// `vote`, `committed`, `purged`, `peers`: postcard values.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "purged";
/// The membership `--peers` bootstrapped this replica with.
pub(crate) const PEERS: &str = "peers";

type Result<T> = std::result::Result<T, StorageError<u64>>;

/// The log file; cheap to clone (openraft reads it from a second handle).
#[derive(Clone)]
pub(crate) struct LogStore {
    db: Arc<Database>,
    path: Arc<PathBuf>,
}

impl LogStore {
    pub(crate) fn open(path: &Path) -> std::result::Result<LogStore, VldbError> {
        let db = crate::tables::open_checked(path)?;
        let txn = db.begin_write()?;
        txn.open_table(ENTRIES)?;
        txn.open_table(META)?;
        txn.commit()?;
        Ok(LogStore {
            db: Arc::new(db),
            path: Arc::new(path.to_owned()),
        })
    }

    /// One of the meta values, decoded.
    pub(crate) fn meta<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> std::result::Result<Option<T>, VldbError> {
        read_meta(&self.db, key)
    }

    /// Writes one meta value, synced.
    pub(crate) fn set_meta<T: Serialize>(
        &self,
        key: &str,
        value: &T,
    ) -> std::result::Result<(), VldbError> {
        write_meta(&self.db, key, value)
    }

    /// Records that everything up to `log_id` is in the state machine's snapshot.
    pub(crate) fn set_purged(&self, log_id: LogId<u64>) -> std::result::Result<(), VldbError> {
        write_meta(&self.db, PURGED, &log_id)
    }

    /// True when the log holds nothing: no entry, no vote, nothing purged.
    pub(crate) fn is_pristine(&self) -> std::result::Result<bool, VldbError> {
        let txn = self.db.begin_read()?;
        let entries = txn.open_table(ENTRIES)?;
        let meta = txn.open_table(META)?;
        Ok(entries.first()?.is_none() && meta.get(VOTE)?.is_none() && meta.get(PURGED)?.is_none())
    }

    /// Runs blocking redb work off the async runtime; `what` names it in errors.
    async fn blocking<T: Send + 'static>(
        &self,
        error: fn(AnyError) -> StorageIOError<u64>,
        work: impl FnOnce(&Database, &Path) -> std::result::Result<T, VldbError> + Send + 'static,
    ) -> Result<T> {
        let db = self.db.clone();
        let path = self.path.clone();
        super::off_runtime(error, move || work(&db, &path)).await
    }
}

fn read_meta<T: DeserializeOwned>(
    db: &Database,
    key: &str,
) -> std::result::Result<Option<T>, VldbError> {
    let txn = db.begin_read()?;
    let table = txn.open_table(META)?;
    match table.get(key)? {
        Some(bytes) => Ok(Some(crate::tables::decode(
            "raft log meta",
            key,
            bytes.value(),
        )?)),
        None => Ok(None),
    }
}

fn write_meta<T: Serialize>(
    db: &Database,
    key: &str,
    value: &T,
) -> std::result::Result<(), VldbError> {
    let bytes = crate::tables::encode(value)?;
    let txn = db.begin_write()?;
    txn.open_table(META)?.insert(key, bytes.as_slice())?;
    txn.commit()?;
    Ok(())
}

/// Decodes the entry stored at `index`; bytes that do not decode name the file and index.
fn decode_entry(
    path: &Path,
    index: u64,
    bytes: &[u8],
) -> std::result::Result<Entry<TypeConfig>, VldbError> {
    postcard::from_bytes(bytes).map_err(|e| VldbError::Corrupt {
        table: "raft log entries",
        key: format!("{} index {index}", path.display()),
        reason: e.to_string(),
    })
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(&i) => Bound::Included(i),
            Bound::Excluded(&i) => Bound::Excluded(i),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.end_bound() {
            Bound::Included(&i) => Bound::Included(i),
            Bound::Excluded(&i) => Bound::Excluded(i),
            Bound::Unbounded => Bound::Unbounded,
        };
        self.blocking(StorageIOError::read_logs, move |db, path| {
            let txn = db.begin_read()?;
            let table = txn.open_table(ENTRIES)?;
            let mut out = Vec::new();
            for row in table.range::<u64>((start, end))? {
                let (index, bytes) = row?;
                out.push(decode_entry(path, index.value(), bytes.value())?);
            }
            Ok(out)
        })
        .await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>> {
        self.blocking(StorageIOError::read_logs, |db, path| {
            let purged: Option<LogId<u64>> = read_meta(db, PURGED)?;
            let txn = db.begin_read()?;
            let table = txn.open_table(ENTRIES)?;
            let last = match table.last()? {
                Some((index, bytes)) => {
                    Some(decode_entry(path, index.value(), bytes.value())?.log_id)
                }
                None => purged,
            };
            Ok(LogState {
                last_purged_log_id: purged,
                last_log_id: last,
            })
        })
        .await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<()> {
        let vote = *vote;
        self.blocking(StorageIOError::write_vote, move |db, _| {
            write_meta(db, VOTE, &vote)
        })
        .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>> {
        self.blocking(StorageIOError::read_vote, |db, _| read_meta(db, VOTE))
            .await
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> Result<()> {
        self.blocking(StorageIOError::write, move |db, _| {
            write_meta(db, COMMITTED, &committed)
        })
        .await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>> {
        self.blocking(StorageIOError::read, |db, _| {
            Ok(read_meta::<Option<LogId<u64>>>(db, COMMITTED)?.flatten())
        })
        .await
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let written = self
            .blocking(StorageIOError::write_logs, move |db, _| {
                let txn = db.begin_write()?;
                {
                    let mut table = txn.open_table(ENTRIES)?;
                    for entry in &entries {
                        let bytes = crate::tables::encode(entry)?;
                        table.insert(entry.log_id.index, bytes.as_slice())?;
                    }
                }
                txn.commit()?;
                Ok(())
            })
            .await;
        match &written {
            Ok(()) => callback.log_io_completed(Ok(())),
            Err(e) => callback.log_io_completed(Err(std::io::Error::other(e.to_string()))),
        }
        written
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<()> {
        self.blocking(StorageIOError::write_logs, move |db, _| {
            let txn = db.begin_write()?;
            txn.open_table(ENTRIES)?
                .retain_in::<u64, _>(log_id.index.., |_, _| false)?;
            txn.commit()?;
            Ok(())
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<()> {
        self.blocking(StorageIOError::write_logs, move |db, _| {
            let bytes = crate::tables::encode(&log_id)?;
            let txn = db.begin_write()?;
            txn.open_table(META)?.insert(PURGED, bytes.as_slice())?;
            txn.open_table(ENTRIES)?
                .retain_in::<u64, _>(..=log_id.index, |_, _| false)?;
            txn.commit()?;
            Ok(())
        })
        .await
    }
}
