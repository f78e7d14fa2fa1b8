//! One volume: its database and data files, and the way each change reaches the disk.
//! Invariant: a request's metadata change commits in one durable redb transaction, shared
//! with the rest of its group commit, before any answer of that batch, refusals included.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::sync_channel;

use proto::{
    Fid, FileKind, Timestamp, VnodeId, VnodeStatus, VolumeId, VolumeInfo, VolumeName, VolumeType,
};
use redb::{Database, Durability, ReadableDatabase};

use crate::fence::Fence;

use super::StorageError;
use super::data_files::DataFiles;
use super::group_commit::GroupCommit;
use super::io_error;
use super::outcomes::{Answer, Outcome, SequenceKey};
use super::records::{HEADER_FORMAT, VnodeRecord, VolumeHeader};
use super::tables::{self, Reader, db_error};
use super::transaction::Tx;
use super::vnode_lock::VnodeLocks;

/// An open volume.
pub struct Volume {
    pub(super) id: VolumeId,
    db_path: PathBuf,
    db: Database,
    /// The data locks of the vnodes (see `data`).
    pub(super) locks: VnodeLocks,
    pub(super) files: DataFiles,
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
            tx.put_acl(VnodeId::ROOT, Some(proto::AccessList::for_new_volume()));
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

    /// Runs `op` in a durable write transaction and returns once it is committed. `op`
    /// runs on whichever thread leads the group commit, in one transaction with the
    /// other requests queued meanwhile, after theirs and seeing their changes; a refused
    /// `op` changes nothing. Every answer of a batch waits for its commit, refusals too,
    /// so no one is told of a change that a crash could still undo.
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
                    detail: "the write batch stopped before reaching this request".into(),
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
