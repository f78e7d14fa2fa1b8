//! Checkpoints and replay: how redb, the checkpointed view, catches up with the metadata
//! log, periodically while serving and from the log's records when a partition opens.
//! Invariant: a log record is let go only once every volume whose changes it may hold
//! has them durably in its tables, and replay applies to each volume exactly the
//! records above its checkpoint, in order, committing them with the last one's number.

use std::collections::BTreeMap;
use std::path::Path;

use proto::VolumeId;
use redb::WriteTransaction;
use tracing::{debug, info};

use super::StorageError;
use super::metadata_log::{Lsn, MetadataLog, RecordKind, Recovery};
use super::redo::Redo;
use super::tables::{Writer, db_error};
use super::volume::{Tables, Volume, commit_durably};

/// Makes each volume's applied changes durable in its tables, then releases the log
/// segments below the first record any volume may still need.
pub(super) fn checkpoint_all(
    volumes: &parking_lot::RwLock<BTreeMap<VolumeId, std::sync::Arc<Volume>>>,
    log: &MetadataLog,
) -> Result<(), StorageError> {
    // Read before the volumes: a record queued later is numbered at least this, and one
    // queued earlier is in its volume's position by the time the volume is looked at.
    let mut bound = log.next_lsn();
    let list: Vec<_> = volumes.read().values().cloned().collect();
    for volume in list {
        let started = std::time::Instant::now();
        volume.checkpoint()?;
        if let Some(stats) = log.observer() {
            stats.record_storage_commit(started.elapsed());
        }
        if let Some(needed) = volume.needed_from() {
            bound = bound.min(needed);
        }
    }
    log.release_below(bound)?;
    Ok(())
}

/// Applies to each volume of `tables` the records of `recovery` above its checkpoint,
/// and commits them durably with the last one's number. Returns each volume's
/// checkpoint afterwards. A record of a volume not on the partition (removed since) is
/// skipped; a volume whose checkpoint is past the log's end means records were lost.
pub(super) fn replay(
    tables: &BTreeMap<VolumeId, &Tables>,
    recovery: &Recovery,
    log_dir: &Path,
) -> Result<BTreeMap<VolumeId, Lsn>, StorageError> {
    struct Replaying<'a> {
        txn: WriteTransaction,
        path: &'a Path,
        checkpoint: Lsn,
        last: Option<Lsn>,
        records: u64,
    }
    let mut replaying: BTreeMap<VolumeId, Replaying<'_>> = BTreeMap::new();
    for (id, table) in tables {
        let txn = table.db.begin_write().map_err(db_error(&table.path))?;
        let checkpoint = Writer::new(&txn, &table.path).applied()?;
        if checkpoint > recovery.last {
            return Err(StorageError::Corrupt {
                path: log_dir.to_owned(),
                detail: format!(
                    "volume {id} includes record {checkpoint} but the log ends at {}: \
                     records are missing",
                    recovery.last
                ),
            });
        }
        replaying.insert(
            *id,
            Replaying {
                txn,
                path: &table.path,
                checkpoint,
                last: None,
                records: 0,
            },
        );
    }
    for record in &recovery.records {
        // State records are the state side's (`state_journal`).
        if record.kind != RecordKind::Storage {
            continue;
        }
        let lsn = &record.lsn;
        let redo = Redo::decode(&record.body).map_err(|detail| StorageError::Corrupt {
            path: log_dir.to_owned(),
            detail: format!("record {lsn}: {detail}"),
        })?;
        let Some(volume) = replaying.get_mut(&redo.volume) else {
            debug!(%lsn, volume = %redo.volume, "skipping a record of a volume no longer here");
            continue;
        };
        if *lsn <= volume.checkpoint {
            continue;
        }
        Writer::new(&volume.txn, volume.path).apply(&redo.changes)?;
        volume.last = Some(*lsn);
        volume.records += 1;
    }
    let mut checkpoints = BTreeMap::new();
    for (id, volume) in replaying {
        let Some(last) = volume.last else {
            volume.txn.abort().map_err(db_error(volume.path))?;
            checkpoints.insert(id, volume.checkpoint);
            continue;
        };
        Writer::new(&volume.txn, volume.path).set_applied(last)?;
        commit_durably(volume.txn, volume.path)?;
        info!(volume = %id, records = volume.records, from = %volume.checkpoint, to = %last, "metadata log replayed");
        checkpoints.insert(id, last);
    }
    Ok(checkpoints)
}
