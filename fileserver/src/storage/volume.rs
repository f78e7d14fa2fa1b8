//! One volume: its database and data files, and the way each change reaches the disk.
//! Invariant: a batch's changes are applied to `meta.redb` (and so seen by any reader)
//! only once the metadata log record holding them is durable, and every answer of the
//! batch, refusals included, waits for that; a checkpoint makes them durable in redb.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::sync_channel;

use parking_lot::Mutex;
use proto::{
    Fid, FileKind, Timestamp, VnodeId, VnodeStatus, VolumeId, VolumeInfo, VolumeName, VolumeType,
};
use redb::{Database, Durability, ReadableDatabase, WriteTransaction};

use crate::fence::Fence;

use super::StorageError;
use super::data_files::DataFiles;
use super::disk::Disk;
use super::group_commit::GroupCommit;
use super::io_error;
use super::metadata_log::{Lsn, MetadataLog};
use super::outcomes::{Answer, Outcome, SequenceKey};
use super::records::{HEADER_FORMAT, VnodeRecord, VolumeHeader};
use super::redo::Redo;
use super::tables::{self, Reader, Writer, db_error};
use super::transaction::Tx;
use super::vnode_lock::VnodeLocks;

const DATABASE_FILE: &str = "meta.redb";
const DATA_DIR: &str = "data";

/// An open volume.
pub struct Volume {
    pub(super) id: VolumeId,
    db_path: PathBuf,
    db: Database,
    /// The data locks of the vnodes (see `data`).
    pub(super) locks: VnodeLocks,
    pub(super) files: DataFiles,
    committer: GroupCommit<WriteJob>,
    /// Why the last failed batch failed, for the jobs it dropped before running them
    /// (so a closed fence reads as one for them too).
    last_failure: parking_lot::Mutex<String>,
    log: Arc<MetadataLog>,
    position: Mutex<Position>,
}

/// Where the volume stands in the metadata log.
#[derive(Clone, Copy, Debug)]
struct Position {
    /// The last record of this volume queued in the log.
    appended: Lsn,
    /// The last record the durable state of `meta.redb` includes.
    checkpointed: Lsn,
}

/// One request's change, run by whichever thread leads the batch holding it.
type WriteJob = Box<dyn FnOnce(&mut Tx<'_>) -> Applied + Send>;

/// What a job did: whether its `Tx` holds changes to write, and how to answer it once
/// the batch's commit is known.
struct Applied {
    changed: bool,
    answer: Box<dyn FnOnce(Result<(), StorageError>) + Send>,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume").field("id", &self.id).finish()
    }
}

/// A volume's database, opened before the metadata log is replayed into it.
pub(super) struct Tables {
    pub(super) db: Database,
    pub(super) path: PathBuf,
}

impl Tables {
    /// Opens the database of the volume directory `dir`, adding tables it lacks.
    pub(super) fn open(disk: &dyn Disk, dir: &Path) -> Result<Tables, StorageError> {
        let path = dir.join(DATABASE_FILE);
        let db = tables::open_database(disk, &path, false)?;
        tables::add_missing_tables(&db, &path)?;
        Ok(Tables { db, path })
    }
}

/// Commits `txn` durably: redb syncs it, with its allocator state so that opening
/// after a crash is quick.
pub(super) fn commit_durably(mut txn: WriteTransaction, path: &Path) -> Result<(), StorageError> {
    txn.set_durability(Durability::Immediate)
        .map_err(db_error(path))?;
    txn.set_quick_repair(true);
    txn.commit().map_err(db_error(path))
}

impl Volume {
    /// Makes a new volume in the empty directory `dir`, with its root directory, durably
    /// and outside the log: its tables include every record up to `applied`, so no
    /// record of an earlier volume of the same id is ever replayed into them.
    pub(super) fn initialize(
        disk: &dyn Disk,
        dir: &Path,
        id: VolumeId,
        name: VolumeName,
        quota_bytes: u64,
        fence: &Fence,
        applied: Lsn,
    ) -> Result<(), StorageError> {
        let data_dir = dir.join(DATA_DIR);
        fence.check().map_err(io_error(dir))?;
        disk.create_dir_all(&data_dir)
            .map_err(io_error(&data_dir))?;
        let db_path = dir.join(DATABASE_FILE);
        let db = tables::open_database(disk, &db_path, true)?;
        tables::create_tables(&db, &db_path)?;
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
        let txn = db.begin_write().map_err(db_error(&db_path))?;
        let redo = RefCell::new(Vec::new());
        let mut tx = Tx::new(&txn, &db_path, id, &redo);
        tx.put_header(header);
        tx.put(VnodeId::ROOT, root);
        tx.put_acl(VnodeId::ROOT, Some(proto::AccessList::for_new_volume()));
        tx.flush()?;
        Writer::new(&txn, &db_path).set_applied(applied)?;
        commit_durably(txn, &db_path)
    }

    /// The volume `id` of directory `dir`, on its tables as recovered (their durable
    /// state includes every record up to `checkpointed`).
    pub(super) fn open(
        dir: &Path,
        id: VolumeId,
        tables: Tables,
        fence: Arc<Fence>,
        log: Arc<MetadataLog>,
        checkpointed: Lsn,
    ) -> Result<Volume, StorageError> {
        let volume = Volume {
            id,
            db_path: tables.path,
            db: tables.db,
            locks: VnodeLocks::new(),
            files: DataFiles::new(dir.join(DATA_DIR), fence),
            committer: GroupCommit::new(),
            last_failure: parking_lot::Mutex::default(),
            log,
            position: Mutex::new(Position {
                appended: checkpointed,
                checkpointed,
            }),
        };
        let header = volume.header()?;
        if header.id != id {
            return Err(StorageError::Corrupt {
                path: volume.db_path.clone(),
                detail: format!("header names volume {} in the directory of {id}", header.id),
            });
        }
        Ok(volume)
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

    pub fn fetch_status(&self, fid: Fid) -> Result<VnodeStatus, StorageError> {
        self.read(|r| Ok(r.checked(fid)?.status(self.id, fid.vnode)))
    }

    pub(super) fn read<T>(
        &self,
        op: impl FnOnce(&Reader<'_>) -> Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        let txn = self.db.begin_read().map_err(db_error(&self.db_path))?;
        op(&Reader::new(&txn, &self.db_path, self.id))
    }

    /// Runs `op` in a write transaction and returns once its change is durable in the
    /// metadata log and applied. `op` runs on whichever thread leads the group commit,
    /// in one transaction with the other requests queued meanwhile, after theirs and
    /// seeing their changes; a refused `op` changes nothing. Every answer of a batch
    /// waits for its log record, refusals too, so no one is told of a change that a
    /// crash could still undo.
    pub(super) fn write<T: Send + 'static>(
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
                    detail: format!(
                        "the write batch stopped before reaching this request: {}",
                        self.last_failure.lock()
                    ),
                })
            })
    }

    /// `write` for a namespace change that may carry a sequence key: in the same
    /// transaction, a key already recorded is answered from its record (nothing is
    /// applied), and a new one has its answer recorded with the change. Refusals are
    /// recorded too: a retry must get the answer the first attempt got.
    pub(super) fn write_once<T: Answer + Send + 'static>(
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

    /// Applies `jobs` in order in one write transaction, appends its writes to the
    /// metadata log as one record, waits for that record to be durable, commits the
    /// transaction without a sync of its own (the log holds the change; a checkpoint
    /// makes it durable in redb), removes the data files it freed (a crash before that
    /// leaves an orphan file, never lost data) and answers every job.
    fn run_batch(&self, jobs: Vec<WriteJob>) {
        let mut answers = Vec::with_capacity(jobs.len());
        let mut dead_files = Vec::new();
        let mut ahead = Vec::new();
        let redo = RefCell::new(Vec::new());
        let committed = (|| {
            let mut txn = self.db.begin_write().map_err(db_error(&self.db_path))?;
            txn.set_durability(Durability::None)
                .map_err(db_error(&self.db_path))?;
            for job in jobs {
                let mut tx = Tx::new(&txn, &self.db_path, self.id, &redo);
                let applied = job(&mut tx);
                answers.push(applied.answer);
                if applied.changed {
                    ahead.extend(tx.take_ahead());
                    dead_files.extend(tx.flush()?);
                }
            }
            let changes = redo.take();
            if changes.is_empty() {
                // Nothing was written: the jobs only read, after earlier batches that
                // are durable already.
                return txn.abort().map_err(db_error(&self.db_path));
            }
            let record = Redo::new(self.id, changes)
                .encode()
                .map_err(|detail| self.corrupt(detail))?;
            let lsn = if ahead.is_empty() {
                self.append(record)?
            } else {
                // What the jobs queue ahead goes in the same flush as their record.
                let _held = self.log.hold();
                for queue in ahead.drain(..) {
                    queue();
                }
                self.append(record)?
            };
            Writer::new(&txn, &self.db_path).set_applied(lsn)?;
            self.log.wait_durable(lsn).map_err(|e| self.log_failed(e))?;
            txn.commit().map_err(|e| {
                // The log holds a change the tables lack: later batches would be
                // computed without it, so nothing more may be logged until a restart
                // replays it.
                let e = db_error(&self.db_path)(e);
                self.log
                    .poison(format!("applying record {lsn} failed: {e}"));
                e
            })
        })();
        let committed = match committed {
            Ok(()) => {
                for vnode in dead_files {
                    self.files.remove(vnode);
                }
                Ok(())
            }
            Err(e) => {
                let detail = e.to_string();
                self.last_failure.lock().clone_from(&detail);
                Err(detail)
            }
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

    /// Queues a record of this volume in the log, noting it in the volume's position
    /// in the same step, so that a checkpoint that looks at the position after reading
    /// the log's next number never misses it.
    fn append(&self, record: Vec<u8>) -> Result<Lsn, StorageError> {
        let mut position = self.position.lock();
        let lsn = self.log.append(record).map_err(|e| self.log_failed(e))?;
        position.appended = lsn;
        Ok(lsn)
    }

    fn log_failed(&self, e: super::metadata_log::LogError) -> StorageError {
        StorageError::BatchFailed {
            path: self.db_path.clone(),
            detail: e.to_string(),
        }
    }

    fn corrupt(&self, detail: String) -> StorageError {
        StorageError::Corrupt {
            path: self.db_path.clone(),
            detail,
        }
    }

    /// Makes every change applied so far durable in `meta.redb`, with the number of the
    /// last record it includes, in one synced commit. Waits for a batch in progress.
    pub(super) fn checkpoint(&self) -> Result<(), StorageError> {
        let txn = self.db.begin_write().map_err(db_error(&self.db_path))?;
        let applied = Writer::new(&txn, &self.db_path).applied()?;
        if applied <= self.position.lock().checkpointed {
            txn.abort().map_err(db_error(&self.db_path))?;
            return Ok(());
        }
        Writer::new(&txn, &self.db_path).set_applied(applied)?;
        commit_durably(txn, &self.db_path)?;
        let mut position = self.position.lock();
        position.checkpointed = position.checkpointed.max(applied);
        Ok(())
    }

    /// The first log record this volume may still need after a crash: `None` when its
    /// durable tables include everything it queued.
    pub(super) fn needed_from(&self) -> Option<Lsn> {
        let position = self.position.lock();
        (position.appended > position.checkpointed).then(|| position.checkpointed.next())
    }
}

#[cfg(test)]
impl Volume {
    /// Every row of the volume's tables, for tests that compare them.
    pub(super) fn dump(&self) -> Vec<String> {
        tables::dump(&self.db)
    }

    /// How many sequenced outcomes the volume records.
    pub(super) fn outcome_count(&self) -> u64 {
        self.db
            .begin_write()
            .map(|txn| tables::Writer::new(&txn, &self.db_path).outcome_count())
            .unwrap_or(0)
    }
}
