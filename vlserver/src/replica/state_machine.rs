//! `StateMachine`: the VLDB's tables (`Store`) as openraft applies the log to them, and
//! their snapshots (every table's rows, kept in the same file).
//! Invariant: each entry's effect and the applied mark that names it commit in one
//! transaction, and a snapshot is built only from marks already synced.

use std::io::Cursor;
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{
    AnyError, Entry, EntryPayload, LogId, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use tracing::info;

use super::{Clock, Node, TypeConfig};
use crate::command::{Applied, Outcome};
use crate::error::VldbError;
use crate::store::Store;
use crate::tables::{RAFT_SNAPSHOT, decode, encode};

type Result<T> = std::result::Result<T, StorageError<u64>>;

/// What an applied mark records: the last entry applied and the membership it left.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Mark {
    pub(crate) applied: Option<LogId<u64>>,
    pub(crate) membership: StoredMembership<u64, Node>,
}

/// The current snapshot as stored: its metadata and the tables' image.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<u64, Node>,
    image: Vec<u8>,
}

pub(crate) struct StateMachine {
    store: Arc<Store>,
    clock: Clock,
}

impl StateMachine {
    pub(crate) fn new(store: Arc<Store>, clock: Clock) -> StateMachine {
        StateMachine { store, clock }
    }

    /// Runs blocking store work off the async runtime.
    async fn blocking<T: Send + 'static>(
        &self,
        error: fn(AnyError) -> StorageIOError<u64>,
        work: impl FnOnce(&Store) -> std::result::Result<T, VldbError> + Send + 'static,
    ) -> Result<T> {
        let store = self.store.clone();
        super::off_runtime(error, move || work(&store)).await
    }
}

/// The mark `store` holds, or none for a state machine that applied nothing yet.
pub(crate) fn read_mark(store: &Store) -> std::result::Result<Mark, VldbError> {
    match store.applied_mark()? {
        Some(bytes) => decode("raft", "applied", &bytes),
        None => Ok(Mark::default()),
    }
}

/// Installs `image` as the tables at `meta` and keeps it as the current snapshot.
pub(crate) fn install(
    store: &Store,
    meta: &SnapshotMeta<u64, Node>,
    image: Vec<u8>,
) -> std::result::Result<(), VldbError> {
    let mark = Mark {
        applied: meta.last_log_id,
        membership: meta.last_membership.clone(),
    };
    let index = meta.last_log_id.map_or(0, |id| id.index);
    let stored = StoredSnapshot {
        meta: meta.clone(),
        image,
    };
    store.install_image(&stored.image, &encode(&mark)?, &encode(&stored)?, index)
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId<u64>>, StoredMembership<u64, Node>)> {
        let mark = self
            .blocking(StorageIOError::read_state_machine, read_mark)
            .await?;
        Ok((mark.applied, mark.membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Outcome>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let clock = self.clock.clone();
        self.blocking(StorageIOError::write_state_machine, move |store| {
            let mut mark = read_mark(store)?;
            let mut outcomes = Vec::with_capacity(entries.len());
            for entry in entries {
                mark.applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => {
                        store.write_mark(&encode(&mark)?)?;
                        outcomes.push(Outcome(Ok(Applied::Done)));
                    }
                    EntryPayload::Membership(membership) => {
                        info!(log = %entry.log_id, ?membership, "VLDB membership applied");
                        mark.membership = StoredMembership::new(Some(entry.log_id), membership);
                        store.write_mark(&encode(&mark)?)?;
                        outcomes.push(Outcome(Ok(Applied::Done)));
                    }
                    EntryPayload::Normal(command) => {
                        outcomes.push(store.apply(&command, &encode(&mark)?, clock.now())?);
                    }
                }
            }
            Ok(outcomes)
        })
        .await
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            store: self.store.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<()> {
        let meta = meta.clone();
        let image = snapshot.into_inner();
        info!(last = ?meta.last_log_id, bytes = image.len(), "installing a VLDB snapshot");
        self.blocking(
            |e| StorageIOError::write_snapshot(None, e),
            move |store| install(store, &meta, image),
        )
        .await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>> {
        self.blocking(
            |e| StorageIOError::read_snapshot(None, e),
            |store| {
                let Some(bytes) = store.raft_value(RAFT_SNAPSHOT)? else {
                    return Ok(None);
                };
                let stored: StoredSnapshot = decode("raft", RAFT_SNAPSHOT, &bytes)?;
                Ok(Some(Snapshot {
                    meta: stored.meta,
                    snapshot: Box::new(Cursor::new(stored.image)),
                }))
            },
        )
        .await
    }
}

pub(crate) struct SnapshotBuilder {
    store: Arc<Store>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>> {
        let store = self.store.clone();
        super::off_runtime(
            |e| StorageIOError::write_snapshot(None, e),
            move || {
                let (mark, image) = store.image()?;
                let mark: Mark = match mark {
                    Some(bytes) => decode("raft", "applied", &bytes)?,
                    None => Mark::default(),
                };
                let snapshot_id = match mark.applied {
                    Some(log_id) => format!("{}-{}", log_id.leader_id, log_id.index),
                    None => "empty".to_owned(),
                };
                let meta = SnapshotMeta {
                    last_log_id: mark.applied,
                    last_membership: mark.membership,
                    snapshot_id,
                };
                let stored = StoredSnapshot {
                    meta: meta.clone(),
                    image: image.clone(),
                };
                let index = meta.last_log_id.map_or(0, |id| id.index);
                if !store.keep_snapshot(&encode(&stored)?, index)? {
                    info!(last = ?meta.last_log_id, "a newer snapshot was installed meanwhile");
                }
                info!(last = ?meta.last_log_id, bytes = image.len(), "VLDB snapshot built");
                Ok(Snapshot {
                    meta,
                    snapshot: Box::new(Cursor::new(image)),
                })
            },
        )
        .await
    }
}
