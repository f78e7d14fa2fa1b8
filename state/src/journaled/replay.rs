//! Replay: the journaled state rebuilt from the newest snapshot and the records after it,
//! with the lock table's own rules so that merges and splits come out as they did live.
//! Invariant: pure; it never refuses what the live table granted, and a lock grant of an
//! unknown client or a lock record with an empty range fails at that record's position.

use std::collections::HashMap;

use proto::{ByteRange, ClientId, Fid, InstanceNonce};
use thiserror::Error;

use super::callback_model::CallbackModel;
use super::record::{ClientEntry, LockEntry, StateRecord};
use super::state_snapshot::StateSnapshot;
use crate::client_table::ClientKey;
use crate::journal::{Lsn, Recovered};
use crate::lock_table::{LockOwner, LockTable, LockTableConfig};

/// Why the journaled state could not be rebuilt from frames that are themselves sound.
#[derive(Debug, Error)]
pub enum ReplayError {
    #[error("state journal: undecodable {what} at {lsn}: {error}")]
    Decode {
        what: &'static str,
        lsn: Lsn,
        error: postcard::Error,
    },
    #[error("state journal: record at {lsn} names unknown client key {}", key.0)]
    UnknownClient { lsn: Lsn, key: ClientKey },
    #[error("state journal: record at {lsn} has an empty lock range")]
    EmptyRange { lsn: Lsn },
}

/// Rebuilds the journaled state from what a journal directory holds (the newest snapshot
/// and the records after it), returning it with the position of the last record applied.
/// Pure: used on start and by `inspect`, which must not open the journal.
pub fn replay(recovered: &Recovered) -> Result<(StateSnapshot, Lsn), ReplayError> {
    let mut last = recovered.snapshot.as_ref().map_or(Lsn(0), |s| s.lsn);
    let mut replay = match &recovered.snapshot {
        Some(snapshot) => {
            let decoded: StateSnapshot =
                postcard::from_bytes(&snapshot.payload).map_err(|error| ReplayError::Decode {
                    what: "snapshot",
                    lsn: snapshot.lsn,
                    error,
                })?;
            Replay::from_snapshot(decoded)
        }
        None => Replay::default(),
    };
    for (lsn, payload) in &recovered.records {
        let record: StateRecord =
            postcard::from_bytes(payload).map_err(|error| ReplayError::Decode {
                what: "record",
                lsn: *lsn,
                error,
            })?;
        replay.apply(*lsn, record)?;
        last = *lsn;
    }
    Ok((replay.finish(), last))
}

/// The journaled state rebuilt record by record, with the lock table's own rules so that
/// merges and splits come out as they did live. The snapshot's locks are loaded into a
/// table only when a lock record follows: otherwise they are the answer as they are.
#[derive(Default)]
pub struct Replay {
    clients: HashMap<ClientKey, (ClientId, InstanceNonce)>,
    callbacks: CallbackModel,
    /// The snapshot's locks while no lock record needed the table.
    snapshot_locks: Vec<LockEntry>,
    locks: Option<LockTable>,
    pids: HashMap<(Fid, LockOwner), u32>,
    clean_handover: bool,
}

impl Replay {
    fn table(&mut self) -> &mut LockTable {
        let (snapshot_locks, pids) = (&mut self.snapshot_locks, &mut self.pids);
        self.locks.get_or_insert_with(|| {
            // Replay must never refuse what the live table granted.
            let mut table = LockTable::new(LockTableConfig {
                lock_count_max: usize::MAX,
                lock_count_per_fid_max: usize::MAX,
                ..LockTableConfig::default()
            });
            for LockEntry { fid, lock, pid } in std::mem::take(snapshot_locks) {
                table.lock(fid, lock.owner, lock.range, lock.kind, false);
                pids.insert((fid, lock.owner), pid);
            }
            table
        })
    }

    /// Starts from a snapshot's state.
    pub fn from_snapshot(snapshot: StateSnapshot) -> Replay {
        let mut replay = Replay {
            callbacks: snapshot.callbacks,
            snapshot_locks: snapshot.locks,
            ..Replay::default()
        };
        replay
            .snapshot_locks
            .retain(|entry| entry.lock.range.checked().is_ok());
        for entry in snapshot.clients {
            replay
                .clients
                .insert(entry.key, (entry.client, entry.instance));
        }
        replay
    }

    /// Applies the record at `lsn`.
    pub fn apply(&mut self, lsn: Lsn, record: StateRecord) -> Result<(), ReplayError> {
        self.callbacks.apply(&record);
        // Only the journal's last record counts: anything after a handover reopens it.
        self.clean_handover = matches!(record, StateRecord::Handover { .. });
        match record {
            StateRecord::ClientAdmitted {
                key,
                client,
                instance,
            } => {
                self.clients.insert(key, (client, instance));
            }
            StateRecord::LockGranted { fid, lock, pid } => {
                if !self.clients.contains_key(&lock.owner.client) {
                    return Err(ReplayError::UnknownClient {
                        lsn,
                        key: lock.owner.client,
                    });
                }
                let range = checked(lsn, lock.range)?;
                self.table().lock(fid, lock.owner, range, lock.kind, false);
                self.pids.insert((fid, lock.owner), pid);
            }
            StateRecord::LockReleased { fid, owner, range } => {
                let range = checked(lsn, range)?;
                // Unbounded replay table: an unlock never fails for room.
                let _ = self.table().unlock(fid, owner, range);
            }
            StateRecord::ClientReleased { key } => {
                self.table().release_client(key);
                self.pids.retain(|(_, owner), _| owner.client != key);
            }
            StateRecord::CallbackGranted { .. }
            | StateRecord::CallbacksGivenUp { .. }
            | StateRecord::ClientCallbacksDropped { .. }
            | StateRecord::BreaksSent { .. }
            | StateRecord::BreaksAcked { .. }
            | StateRecord::ResetSent { .. }
            | StateRecord::ResetAcked { .. }
            | StateRecord::DelayedQueued { .. }
            | StateRecord::DelayedReset { .. }
            | StateRecord::DelayedTaken { .. }
            | StateRecord::Handover { .. } => {}
        }
        Ok(())
    }

    /// The state so far as a live server would snapshot it at this position: breaks in
    /// flight are still in flight.
    pub fn snapshot(&mut self) -> StateSnapshot {
        let mut callbacks = self.callbacks.clone();
        callbacks.promises.settle();
        StateSnapshot {
            clients: self.client_entries(),
            locks: self.lock_entries(false),
            callbacks,
            clean_handover: self.clean_handover,
        }
    }

    /// The state at the end of the journal, for a restart: breaks still in flight were
    /// never acknowledged, so their clients are owed them.
    pub fn finish(mut self) -> StateSnapshot {
        let clients = self.client_entries();
        let locks = self.lock_entries(true);
        self.callbacks.finish_replay();
        StateSnapshot {
            clients,
            locks,
            callbacks: self.callbacks,
            clean_handover: self.clean_handover,
        }
    }

    fn client_entries(&self) -> Vec<ClientEntry> {
        let mut clients: Vec<ClientEntry> = self
            .clients
            .iter()
            .map(|(&key, &(client, instance))| ClientEntry {
                key,
                client,
                instance,
            })
            .collect();
        clients.sort_unstable_by_key(|c| c.key);
        clients
    }

    /// The locks so far, in order; `take` moves the snapshot's locks out rather than
    /// copy them (at the end of replay, where they may be many).
    fn lock_entries(&mut self, take: bool) -> Vec<LockEntry> {
        let mut locks = match self.locks {
            None if take => std::mem::take(&mut self.snapshot_locks),
            None => self.snapshot_locks.clone(),
            Some(_) => self.table_entries(),
        };
        locks.sort_unstable_by_key(|entry| (entry.fid, entry.lock.owner, entry.lock.range));
        locks
    }

    /// The replayed lock table's locks, with the process that took each.
    fn table_entries(&mut self) -> Vec<LockEntry> {
        let mut locks: Vec<LockEntry> = self
            .table()
            .iter()
            .map(|(fid, lock)| LockEntry { fid, lock, pid: 0 })
            .collect();
        for entry in &mut locks {
            entry.pid = self
                .pids
                .get(&(entry.fid, entry.lock.owner))
                .copied()
                .unwrap_or(0);
        }
        locks
    }
}

/// A recorded range, which the live table never lets be empty.
fn checked(lsn: Lsn, range: ByteRange) -> Result<ByteRange, ReplayError> {
    range.checked().map_err(|_| ReplayError::EmptyRange { lsn })
}
