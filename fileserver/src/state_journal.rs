//! The journal of callback, lock and client state: its records go into the partition's
//! metadata log beside the storage batches (one flusher, one fsync for both), its
//! snapshots beside the log; replayed from both on start.
//! Invariant: records enter the log in the order they were handed over, under the locks
//! of their changes; a write or sync failing behind an open fence closes it for good
//! before any waiter is told, and nothing is appended after the fence or the term ended.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use proto::Epoch;
use state::journal::{Recovered, RecoveredSnapshot};
use state::journaled::{ReplayError, StateRecord, StateSnapshot, replay};
use state::{JournalError, JournalMode, Lsn};
use thiserror::Error;
use tokio::sync::{oneshot, watch};
use tracing::{error, info, warn};

use crate::fence::Fence;
use crate::storage::Partition;
use crate::storage::metadata_log::{LogError, LogStop, MetadataLog, StateRecovery};

/// The directory of the journal of earlier versions inside the partition: read once,
/// carried over as the first snapshot, and removed.
pub const STATE_DIR: &str = "state";
/// A snapshot is taken after this many records...
const SNAPSHOT_EVERY_RECORDS: u64 = 10_000;
/// ...or this long after the last one if any record came since...
const SNAPSHOT_EVERY: Duration = Duration::from_secs(300);
/// ...or once the state's records keep this many closed log segments from release.
const SNAPSHOT_SEGMENTS_HELD: usize = 4;

#[derive(Debug, Error)]
pub enum StateJournalError {
    #[error("state journal: {0}")]
    Log(#[from] LogError),
    #[error(transparent)]
    Replay(#[from] ReplayError),
    /// The journal of an earlier version could not be read for its migration.
    #[error("state journal of an earlier version in {dir}: {source}")]
    Migrate {
        dir: std::path::PathBuf,
        #[source]
        source: JournalError,
    },
    #[error("state journal: the partition's state was taken already")]
    Taken,
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    #[error("state journal: could not encode the migrated state: {0}")]
    Encode(postcard::Error),
}

/// How far the journal got, shared with the snapshot threads.
#[derive(Debug)]
struct Progress {
    /// Records handed over.
    handed: AtomicU64,
    /// A record could not be appended: nothing more becomes durable.
    failed: AtomicBool,
    /// The term that owned the journal ended without closing it: nothing more is
    /// appended, even behind a fence a later term opened.
    abandoned: AtomicBool,
    /// Closed cleanly: later records are lost.
    closed: AtomicBool,
    /// Why the journal stopped appending, once it has (the log's own failures come
    /// through `MetadataLog::stopped`).
    stop: watch::Sender<Option<JournalStop>>,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            handed: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            abandoned: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            stop: watch::Sender::new(None),
        }
    }

    /// Publishes why the journal stopped; the first reason stays.
    fn stopped(&self, why: JournalStop) {
        self.stop.send_if_modified(|stop| {
            if stop.is_some() {
                return false;
            }
            *stop = Some(why);
            true
        });
    }
}

/// Why the state journal stopped appending.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JournalStop {
    /// The fence closed (a lost lease) or the term abandoned the journal: expected; the
    /// term ends and a member may serve again in a later one.
    Fenced,
    /// A write or sync failed behind an open fence (a full or failing disk): the fence is
    /// closed for good and the process must stop.
    Failed(String),
}

impl From<LogStop> for JournalStop {
    fn from(stop: LogStop) -> JournalStop {
        match stop {
            LogStop::Failed(reason) => JournalStop::Failed(reason),
            LogStop::Fenced(_) => JournalStop::Fenced,
        }
    }
}

/// Makes a `StateSnapshot` from raw copies taken under the tables' locks, so that the
/// conversion runs on the snapshot thread rather than while requests wait.
/// `None`: the copy never came, and no snapshot is written.
pub type SnapshotSource = Box<dyn FnOnce() -> Option<StateSnapshot> + Send>;

/// Waits until a handed-over record is durable; `false` if the journal failed. `true`
/// comes only after a sync covering the record succeeded.
pub struct Durable(Option<oneshot::Receiver<bool>>);

impl Durable {
    pub fn ready() -> Durable {
        Durable(None)
    }

    fn failed() -> Durable {
        let (sender, receiver) = oneshot::channel();
        let _ = sender.send(false);
        Durable(Some(receiver))
    }

    pub async fn wait(self) -> bool {
        match self.0 {
            None => true,
            Some(receiver) => receiver.await.unwrap_or(false),
        }
    }
}

/// The server's handle on its state journal.
pub struct StateJournal {
    log: Arc<MetadataLog>,
    mode: JournalMode,
    fence: Arc<Fence>,
    epoch: Epoch,
    progress: Arc<Progress>,
    /// `progress.handed` at the last snapshot, and when that was.
    last_snapshot: Mutex<(u64, Instant)>,
    /// Snapshot threads, joined at close.
    snapshots: Mutex<Vec<JoinHandle<()>>>,
}

impl StateJournal {
    /// Takes the state side's part of `partition`'s log (its newest snapshot and its
    /// records after it), replays it and journals on the partition's log from now on.
    /// A partition of an earlier version, with its state journal in `root/state/`, has
    /// it carried over as the first snapshot here, and that directory removed. Every
    /// write goes through `fence`; snapshots carry `epoch`. Blocking.
    pub fn open(
        partition: &Partition,
        root: &Path,
        mode: JournalMode,
        fence: Arc<Fence>,
        epoch: Epoch,
    ) -> Result<(StateJournal, StateSnapshot), StateJournalError> {
        let recovery = partition
            .take_state_recovery()
            .ok_or(StateJournalError::Taken)?;
        let log = partition.log().clone();
        let (state, records) = match migrate(&log, root, &recovery, epoch)? {
            Some(state) => (state, 0),
            None => {
                let count = recovery.records.len();
                (replay_recovery(recovery)?, count)
            }
        };
        info!(
            clients = state.clients.len(),
            locks = state.locks.len(),
            callbacks = state.callbacks.promises.len(),
            records,
            "state journal replayed"
        );
        // Records replayed count towards the next snapshot: replay was that long.
        let last_snapshot = Mutex::new((0u64.wrapping_sub(records as u64), Instant::now()));
        Ok((
            StateJournal {
                log,
                mode,
                fence,
                epoch,
                progress: Arc::new(Progress::new()),
                last_snapshot,
                snapshots: Mutex::new(Vec::new()),
            },
            state,
        ))
    }

    /// Opens the partition at `root` behind an open fence and the journal on its log:
    /// tools and benches. The journal's records go nowhere once the partition is gone.
    pub fn open_partition(
        root: &Path,
        mode: JournalMode,
    ) -> Result<(Partition, StateJournal, StateSnapshot), StateJournalError> {
        let fence = Arc::new(Fence::open());
        let partition = Partition::open(root, fence.clone())?;
        let (journal, state) = StateJournal::open(&partition, root, mode, fence, Epoch(0))?;
        Ok((partition, journal, state))
    }

    /// Hands `record` to the log; call it under the lock of the change it records, so
    /// records keep the order of the changes. `must_be_durable` records (lock changes)
    /// are waited for in `Sync` and `Group` modes, every record in `Sync` mode; `None`
    /// mode waits for none (the log's flusher still syncs them soon after).
    pub fn record(&self, record: &StateRecord, must_be_durable: bool) -> Durable {
        let wait = match self.mode {
            JournalMode::Sync => true,
            JournalMode::Group => must_be_durable,
            JournalMode::None => false,
        };
        let refused = || {
            if wait {
                Durable::failed()
            } else {
                Durable::ready()
            }
        };
        if !self.may_append() {
            return refused();
        }
        let payload = match postcard::to_allocvec(record) {
            Ok(payload) => payload,
            Err(e) => {
                error!(error = %e, "could not encode a state record");
                return Durable::ready();
            }
        };
        let (done, durable) = if wait {
            let (sender, receiver) = oneshot::channel();
            (Some(sender), Durable(Some(receiver)))
        } else {
            (None, Durable::ready())
        };
        match self.log.append_state(&payload, done) {
            Ok(_) => {
                self.progress.handed.fetch_add(1, Ordering::AcqRel);
                durable
            }
            Err(e) => {
                self.fail(&e);
                refused()
            }
        }
    }

    /// Resolves once every record handed over before this call is durable, and waits
    /// only where a record that need not be durable waits (`Sync` mode): for an answer
    /// that rests on records handed over earlier, maybe by another request still
    /// waiting for their sync, or told that it failed — a promise an earlier grant
    /// journaled.
    pub fn barrier(&self) -> Durable {
        if self.mode != JournalMode::Sync {
            return Durable::ready();
        }
        if self.progress.failed.load(Ordering::Acquire) {
            return Durable::failed();
        }
        // Everything queued so far: the flusher makes the log durable in order.
        let upto = Lsn(self.log.next_lsn().0 - 1);
        let (done, receiver) = oneshot::channel();
        self.log.notify_durable(upto, done);
        Durable(Some(receiver))
    }

    /// Writes the state `source` makes as the snapshot at the log's current position;
    /// the answer resolves once it is durable (`false`: it was not written). The caller
    /// holds every lock records are handed over under, so none slips between.
    pub fn snapshot(&self, source: SnapshotSource) -> Durable {
        let (written, receiver) = oneshot::channel();
        // No state record is handed over meanwhile: every one up to here is in the
        // snapshot, every later one after it.
        let at = Lsn(self.log.next_lsn().0 - 1);
        let handed = self.progress.handed.load(Ordering::Acquire);
        *self.last_snapshot.lock() = (handed, Instant::now());
        if !self.may_append() {
            let _ = written.send(false);
            return Durable(Some(receiver));
        }
        let (log, epoch, progress) = (self.log.clone(), self.epoch, self.progress.clone());
        let spawned = std::thread::Builder::new()
            .name("state-snapshot".into())
            .spawn(move || {
                let ok = write_snapshot(&log, epoch, at, source, &progress);
                let _ = written.send(ok);
            });
        match spawned {
            Ok(handle) => {
                let mut snapshots = self.snapshots.lock();
                snapshots.retain(|handle| !handle.is_finished());
                snapshots.push(handle);
            }
            Err(e) => warn!(error = %e, "could not start a snapshot thread"),
        }
        Durable(Some(receiver))
    }

    /// Marks the journal as cleanly handed over at `epoch` and waits until the mark is
    /// durable; the caller snapshotted just before and admits no request meanwhile.
    pub async fn handover(&self, epoch: Epoch) -> bool {
        if !self.may_append() {
            return false;
        }
        let payload = match postcard::to_allocvec(&StateRecord::Handover { epoch }) {
            Ok(payload) => payload,
            Err(e) => {
                error!(error = %e, "could not encode the handover record");
                return false;
            }
        };
        let (sender, receiver) = oneshot::channel();
        match self.log.append_state(&payload, Some(sender)) {
            Ok(_) => Durable(Some(receiver)).wait().await,
            Err(e) => {
                self.fail(&e);
                false
            }
        }
    }

    /// Resolves once the journal stopped appending on its own (fenced, abandoned or
    /// failed, its own records' or the log's), and why, so that the term ends; never
    /// after a clean `close`. After `Failed` the fence is closed for good: the server
    /// must stop, and a restart recovers what was durable.
    pub fn stopped(&self) -> impl Future<Output = JournalStop> + Send + 'static {
        let mut own = self.progress.stop.subscribe();
        let mut log = self.log.stopped();
        let progress = self.progress.clone();
        async move {
            let why = tokio::select! {
                why = own.wait_for(Option::is_some) => why.ok().and_then(|why| why.clone()),
                why = log.wait_for(Option::is_some) => {
                    why.ok().and_then(|why| why.clone()).map(JournalStop::from)
                }
            };
            match why {
                // A log closed at the term's clean end stops nothing.
                Some(_) if progress.closed.load(Ordering::Acquire) => std::future::pending().await,
                Some(why) => why,
                // The journal is gone without stopping: nothing to report.
                None => std::future::pending().await,
            }
        }
    }

    /// Why the journal stopped appending, if it has.
    #[cfg(test)]
    pub fn stop_reason(&self) -> Option<JournalStop> {
        self.progress
            .stop
            .borrow()
            .clone()
            .or_else(|| self.log.stopped().borrow().clone().map(JournalStop::from))
    }

    /// The term ends without closing the journal (its fence closed): nothing more is
    /// appended, even if the fence opens again for a later term.
    pub fn abandon(&self) {
        self.progress.abandoned.store(true, Ordering::Release);
    }

    /// Whether enough records (or enough time with some records) passed since the last
    /// snapshot that replay should be shortened, or the state's records keep several
    /// segments of the log from being released.
    pub fn snapshot_due(&self) -> bool {
        let (handed_then, at) = *self.last_snapshot.lock();
        let records = self
            .progress
            .handed
            .load(Ordering::Acquire)
            .wrapping_sub(handed_then);
        records >= SNAPSHOT_EVERY_RECORDS
            || (records > 0 && at.elapsed() >= SNAPSHOT_EVERY)
            || self.log.segments_held_for_state() >= SNAPSHOT_SEGMENTS_HELD
    }

    /// Waits for running snapshots and until every record handed over so far is
    /// durable; later records are logged and lost. The log itself closes with the
    /// partition. Blocks.
    pub fn close(&self) {
        let snapshots = std::mem::take(&mut *self.snapshots.lock());
        for handle in snapshots {
            let _ = handle.join();
        }
        self.progress.closed.store(true, Ordering::Release);
        let upto = Lsn(self.log.next_lsn().0 - 1);
        if !self.progress.failed.load(Ordering::Acquire)
            && !self.progress.abandoned.load(Ordering::Acquire)
            && let Err(e) = self.log.wait_durable(upto)
        {
            // The failure was logged where it happened.
            info!(error = %e, "state journal closed after a failure of the log");
        }
        info!(position = %upto, "state journal closed");
    }

    /// Whether records may still be appended: the fence is open and the term neither
    /// abandoned nor closed the journal. Publishes `Fenced` when not (expected after a
    /// lost lease: the partner owns the partition now).
    fn may_append(&self) -> bool {
        if self.progress.closed.load(Ordering::Acquire) {
            warn!("a state record after the journal closed is not journaled");
            self.progress.failed.store(true, Ordering::Release);
            return false;
        }
        if self.fence.is_open() && !self.progress.abandoned.load(Ordering::Acquire) {
            return true;
        }
        info!("state journal fenced; journaling stops");
        self.progress.failed.store(true, Ordering::Release);
        self.progress.stopped(JournalStop::Fenced);
        false
    }

    /// The log refused a record. Poisoned, it published why (and closed the fence for
    /// good if it failed behind an open one); any other refusal (a record too large for
    /// the log) is the journal's own failure: the fence closes for good so that nothing
    /// unjournaled is answered.
    fn fail(&self, e: &LogError) {
        self.progress.failed.store(true, Ordering::Release);
        if let Some(stop) = self.log.stopped().borrow().clone() {
            self.progress.stopped(stop.into());
            return;
        }
        if !self.fence.is_open() {
            self.progress.stopped(JournalStop::Fenced);
            return;
        }
        self.fence.close_for_good();
        error!(error = %e, "state journal append failed; journaling stops and the server stops serving");
        self.progress.stopped(JournalStop::Failed(format!(
            "state journal append failed: {e}"
        )));
    }
}

/// Builds and writes one snapshot on its own thread; whether it was written.
fn write_snapshot(
    log: &MetadataLog,
    epoch: Epoch,
    at: Lsn,
    source: SnapshotSource,
    progress: &Progress,
) -> bool {
    let started = Instant::now();
    let Some(state) = source() else {
        warn!(position = %at, "state snapshot abandoned: the tables' copy never came");
        return false;
    };
    let payload = match postcard::to_allocvec(&state) {
        Ok(payload) => payload,
        Err(e) => {
            error!(error = %e, "could not encode a state snapshot");
            return false;
        }
    };
    if progress.abandoned.load(Ordering::Acquire) {
        return false;
    }
    match log.write_state_snapshot(epoch, at, &payload) {
        Ok(()) => {
            info!(
                position = %at,
                locks = state.locks.len(),
                bytes = payload.len(),
                took_ms = started.elapsed().as_millis() as u64,
                "state snapshot written"
            );
            true
        }
        Err(e) => {
            warn!(error = %e, position = %at, "state snapshot failed");
            false
        }
    }
}

/// The state the log's part for it rebuilds: the snapshot, then the records after it.
fn replay_recovery(recovery: StateRecovery) -> Result<StateSnapshot, ReplayError> {
    let recovered = Recovered {
        snapshot: recovery.snapshot.map(|s| RecoveredSnapshot {
            lsn: s.lsn,
            epoch: s.epoch,
            payload: s.payload,
        }),
        records: recovery
            .records
            .into_iter()
            .map(|r| (r.lsn, r.body))
            .collect(),
    };
    Ok(replay(&recovered)?.0)
}

/// Carries the journal of an earlier version (`root/state/`) over into the log, once:
/// its state becomes the first snapshot (a clean handover stays one), then the
/// directory goes. Left over after a migration that was interrupted after the snapshot,
/// the directory is only removed. Returns the migrated state, if it did.
fn migrate(
    log: &MetadataLog,
    root: &Path,
    recovery: &StateRecovery,
    epoch: Epoch,
) -> Result<Option<StateSnapshot>, StateJournalError> {
    let disk = log.disk().clone();
    let old_dir = root.join(STATE_DIR);
    let names = disk.list(root).map_err(|source| LogError::Io {
        op: "list",
        path: root.to_owned(),
        source,
    })?;
    if !names.iter().any(|name| name == STATE_DIR) {
        return Ok(None);
    }
    let remove = || -> Result<(), LogError> {
        let failed = |op| {
            let path = old_dir.clone();
            move |source| LogError::Io { op, path, source }
        };
        disk.remove_dir_all(&old_dir).map_err(failed("remove"))?;
        disk.sync_dir(root).map_err(|source| LogError::Io {
            op: "sync",
            path: root.to_owned(),
            source,
        })
    };
    if recovery.snapshot.is_some() || !recovery.records.is_empty() {
        info!(dir = %old_dir.display(), "removing the state journal of an earlier version, migrated before");
        remove()?;
        return Ok(None);
    }
    let (_, recovered) =
        state::journal::inspect(&old_dir).map_err(|source| StateJournalError::Migrate {
            dir: old_dir.clone(),
            source,
        })?;
    let (state, last) = replay(&recovered)?;
    let payload = postcard::to_allocvec(&state).map_err(StateJournalError::Encode)?;
    let at = Lsn(log.next_lsn().0 - 1);
    log.write_state_snapshot(epoch, at, &payload)?;
    if state.clean_handover {
        let mark = postcard::to_allocvec(&StateRecord::Handover { epoch })
            .map_err(StateJournalError::Encode)?;
        let lsn = log.append_state(&mark, None)?;
        log.wait_durable(lsn)?;
    }
    remove()?;
    info!(
        dir = %old_dir.display(),
        clients = state.clients.len(),
        locks = state.locks.len(),
        callbacks = state.callbacks.promises.len(),
        old_position = %last,
        position = %at,
        "state journal of an earlier version carried over into the metadata log"
    );
    Ok(Some(state))
}

/// Opens a partition on `disk` at `root` (its `server.id` on the real `root`) with small
/// log segments and no checkpointer, and the journal on its log: what a server start
/// does, on a disk whose power tests can cut.
#[cfg(test)]
pub(crate) fn open_on(
    disk: &crate::storage::mem_disk::MemDisk,
    root: &Path,
    mode: JournalMode,
    fence: Arc<Fence>,
    epoch: Epoch,
) -> Result<(Partition, StateJournal, StateSnapshot), StateJournalError> {
    use crate::storage::metadata_log::{BLOCK_BYTES, LogConfig};
    let config = crate::storage::PartitionConfig {
        log: LogConfig {
            segment_bytes: 8 * BLOCK_BYTES,
        },
        checkpoint_period: None,
    };
    let partition = Partition::open_with(root, fence.clone(), Arc::new(disk.clone()), config)?;
    let (journal, state) = StateJournal::open(&partition, root, mode, fence, epoch)?;
    Ok((partition, journal, state))
}

/// A partition on a `MemDisk` for tests of the state journal, reopened as often as a
/// test restarts.
#[cfg(test)]
pub(crate) struct TestLog {
    pub disk: crate::storage::mem_disk::MemDisk,
    root: tempfile::TempDir,
}

#[cfg(test)]
impl TestLog {
    pub fn new() -> TestLog {
        TestLog {
            disk: crate::storage::mem_disk::MemDisk::new(),
            root: tempfile::tempdir().expect("a temporary directory"),
        }
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// Opens the partition and the journal behind an open fence; drop the partition
    /// (after closing the journal) before opening again.
    pub fn open(&self, mode: JournalMode) -> (Partition, Arc<StateJournal>, StateSnapshot) {
        let (partition, journal, state) = open_on(
            &self.disk,
            self.root.path(),
            mode,
            Arc::new(Fence::open()),
            Epoch(1),
        )
        .expect("open the partition and its state journal");
        (partition, Arc::new(journal), state)
    }
}

#[cfg(test)]
mod tests {
    use proto::{ByteRange, ClientId, Fid, InstanceNonce, LockKind, LockOwnerId, VolumeId};
    use state::{ClientKey, Journal, JournalConfig, Lock, LockOwner};

    use super::*;

    fn fid(vnode: u64) -> Fid {
        Fid {
            volume: VolumeId(1),
            vnode: proto::VnodeId(vnode),
            unique: proto::Uniquifier(1),
        }
    }

    /// Writes a journal as a server of an earlier version left it in `root/state/`: a
    /// client, its lock and a promise, the client in a snapshot, the rest after it.
    fn write_earlier_journal(root: &Path, client: ClientId) {
        let config = JournalConfig {
            mode: JournalMode::Sync,
            epoch: Epoch(4),
            ..JournalConfig::default()
        };
        let (journal, _) = Journal::open(&root.join(STATE_DIR), config).unwrap();
        let key = ClientKey(3);
        let admitted = StateRecord::ClientAdmitted {
            key,
            client,
            instance: InstanceNonce(9),
        };
        let at = journal
            .append(&postcard::to_allocvec(&admitted).unwrap())
            .unwrap();
        let snapshot = StateSnapshot {
            clients: vec![state::journaled::ClientEntry {
                key,
                client,
                instance: InstanceNonce(9),
            }],
            ..StateSnapshot::default()
        };
        journal
            .write_snapshot(at, &postcard::to_allocvec(&snapshot).unwrap())
            .unwrap();
        let owner = LockOwner {
            client: key,
            owner: LockOwnerId(5),
        };
        let records = [
            StateRecord::LockGranted {
                fid: fid(2),
                lock: Lock {
                    owner,
                    range: ByteRange::new(0, 100).unwrap(),
                    kind: LockKind::Exclusive,
                },
                pid: 42,
            },
            StateRecord::CallbackGranted {
                fid: fid(7),
                client: key,
                expiry_ms: u64::MAX / 2,
            },
        ];
        for record in &records {
            journal
                .append(&postcard::to_allocvec(record).unwrap())
                .unwrap();
        }
        journal.close().unwrap();
    }

    fn summary(state: &StateSnapshot) -> (Vec<ClientId>, Vec<(Fid, u32)>, Vec<Fid>) {
        (
            state.clients.iter().map(|c| c.client).collect(),
            state.locks.iter().map(|l| (l.fid, l.pid)).collect(),
            state
                .callbacks
                .promises
                .keys()
                .map(|(fid, _)| *fid)
                .collect(),
        )
    }

    #[test]
    fn a_journal_of_an_earlier_version_is_carried_over_once_and_removed() {
        let root = tempfile::tempdir().unwrap();
        let client = ClientId::random();
        write_earlier_journal(root.path(), client);
        let expected = (vec![client], vec![(fid(2), 42)], vec![fid(7)]);

        let (partition, journal, state) =
            StateJournal::open_partition(root.path(), JournalMode::Sync).unwrap();
        assert_eq!(summary(&state), expected);
        assert!(
            !root.path().join(STATE_DIR).exists(),
            "the old journal is gone"
        );
        journal.close();
        drop((journal, partition));

        // The next start finds the locks and promises in the new form.
        let (partition, journal, state) =
            StateJournal::open_partition(root.path(), JournalMode::Sync).unwrap();
        assert_eq!(summary(&state), expected);
        journal.close();
        drop((journal, partition));

        // A migration interrupted after its snapshot left the old directory: it is only
        // removed, never read over the state carried over.
        write_earlier_journal(root.path(), ClientId::random());
        let (partition, journal, state) =
            StateJournal::open_partition(root.path(), JournalMode::Sync).unwrap();
        assert_eq!(summary(&state), expected);
        assert!(!root.path().join(STATE_DIR).exists());
        journal.close();
        drop((journal, partition));
    }

    /// A journal that ended with a clean handover stays one: the partner starts
    /// without grace after the migration too.
    #[test]
    fn a_clean_handover_survives_the_migration() {
        let root = tempfile::tempdir().unwrap();
        write_earlier_journal(root.path(), ClientId::random());
        let (journal, _) =
            Journal::open(&root.path().join(STATE_DIR), JournalConfig::default()).unwrap();
        let mark = StateRecord::Handover { epoch: Epoch(4) };
        journal
            .append(&postcard::to_allocvec(&mark).unwrap())
            .unwrap();
        journal.close().unwrap();
        let (partition, journal, state) =
            StateJournal::open_partition(root.path(), JournalMode::Sync).unwrap();
        assert!(state.clean_handover);
        journal.close();
        drop((journal, partition));
        let (_partition, journal, state) =
            StateJournal::open_partition(root.path(), JournalMode::Sync).unwrap();
        assert!(state.clean_handover);
        journal.close();
    }
}

#[cfg(test)]
mod handover_tests {
    use proto::{ByteRange, ClientId, Fid, InstanceNonce, LockKind, LockOwnerId, VolumeId};

    use super::*;
    use crate::restart::test_tables;
    use crate::stats::Stats;

    /// What `Active::hand_over` does (a snapshot, the mark, a clean close) leaves a log
    /// the partner recovers as a clean handover with every lock; a record after the
    /// mark (the partner's own) reopens it.
    #[tokio::test]
    async fn a_handover_mark_in_the_log_spares_the_partner_grace() {
        let log = TestLog::new();
        let (partition, journal, _) = log.open(JournalMode::Sync);
        let (callbacks, locks) = test_tables(&journal);
        let (id, instance) = (ClientId::random(), InstanceNonce(1));
        let key = callbacks.sessions().recover(id, instance).unwrap();
        locks.admitted(key, id, instance);
        let fid = Fid::root(VolumeId(1));
        let range = ByteRange::new(0, 10).unwrap();
        let granted = locks
            .set(
                key,
                fid,
                LockOwnerId(1),
                range,
                LockKind::Exclusive,
                false,
                7,
            )
            .await;
        assert!(granted.is_ok(), "{granted:?}");
        crate::restart::snapshot(&callbacks, &locks, &Stats::default());
        assert!(journal.handover(Epoch(2)).await);
        drop((callbacks, locks));
        journal.close();
        drop((journal, partition));

        let (partition, journal, state) = log.open(JournalMode::Sync);
        assert!(state.clean_handover, "the partner would start in grace");
        assert_eq!(state.locks.len(), 1);
        // The partner's first record: a later start is no clean handover any more.
        let admitted = StateRecord::ClientAdmitted {
            key: state::ClientKey(0),
            client: id,
            instance,
        };
        assert!(journal.record(&admitted, true).wait().await);
        journal.close();
        drop((journal, partition));
        let (_partition, journal, state) = log.open(JournalMode::Sync);
        assert!(!state.clean_handover);
        journal.close();
    }
}
