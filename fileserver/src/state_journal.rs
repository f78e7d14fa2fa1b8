//! The journal of callback, lock and client state in `PARTITION/state/`: a writer thread
//! appending records in order with group commit, snapshots, and replay on start.
//! Invariant: records reach the disk in the order they were handed over, and a write or
//! sync failing behind an open fence closes it for good before any waiter is told.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use proto::Epoch;
use state::journal::Vfs;
use state::journaled::{ReplayError, StateRecord, StateSnapshot, replay};
use state::{Journal, JournalConfig, JournalError, JournalMode, Lsn};
use thiserror::Error;
use tokio::sync::{oneshot, watch};
use tracing::{debug, error, info, warn};

use crate::fence::{Fence, FencedVfs};

/// The directory of the journal inside the partition.
pub const STATE_DIR: &str = "state";
/// Records handed over but not yet appended, at most; a full queue makes the server wait.
const QUEUE_MAX: usize = 4096;
/// A snapshot is taken after this many records...
const SNAPSHOT_EVERY_RECORDS: u64 = 10_000;
/// ...or this long after the last one if any record came since.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(300);
/// Most records appended before one group sync.
const BATCH_MAX: usize = 1024;

#[derive(Debug, Error)]
pub enum StateJournalError {
    #[error("state journal: {0}")]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Replay(#[from] ReplayError),
    #[error("state journal: could not start the writer thread: {0}")]
    Thread(std::io::Error),
}

enum Job {
    Record {
        payload: Vec<u8>,
        done: Option<oneshot::Sender<bool>>,
    },
    /// Builds the snapshot on the snapshot thread from what was copied under the locks,
    /// and says whether it was written.
    Snapshot(SnapshotSource, oneshot::Sender<bool>),
    /// Say once the first `upto` records handed over are durable (`false` if the
    /// journal failed first).
    Barrier {
        upto: u64,
        done: oneshot::Sender<bool>,
    },
    /// Append what came before, close the journal, then say so.
    Close(SyncSender<()>),
}

/// How far the writer got, shared with the handles so that a barrier on records that
/// are durable already costs no trip to the writer.
#[derive(Debug)]
struct Progress {
    /// Records handed to the writer (counted before they are queued).
    handed: AtomicU64,
    /// Of those, how many the writer made durable (all of the first `durable`).
    durable: AtomicU64,
    /// The journal failed or was fenced: nothing becomes durable any more.
    failed: AtomicBool,
    /// The term that owned the journal ended without closing it: the writer appends
    /// nothing more, even behind a fence a later term opened.
    abandoned: AtomicBool,
    /// Why the writer stopped appending, once it has.
    stop: watch::Sender<Option<JournalStop>>,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            handed: AtomicU64::new(0),
            durable: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            abandoned: AtomicBool::new(false),
            stop: watch::Sender::new(None),
        }
    }

    /// Publishes why the writer stopped; the first reason stays.
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
    /// A write or sync failed behind an open fence (a full or failing disk), or the
    /// writer died: the fence is closed for good and the process must stop.
    Failed(String),
}

/// Makes a `StateSnapshot` from raw copies taken under the tables' locks, so that the
/// conversion runs on the snapshot thread rather than while requests wait.
/// `None`: the copy never came, and no snapshot is written.
pub type SnapshotSource = Box<dyn FnOnce() -> Option<StateSnapshot> + Send>;

/// Waits until a handed-over record is durable; `false` if the journal failed. `true`
/// comes only after a sync covering the record succeeded, except in `None` mode, which
/// syncs nothing (there the handover mark rests on the close that follows it).
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
    queue: SyncSender<Job>,
    mode: JournalMode,
    progress: Arc<Progress>,
    /// `progress.handed` at the last snapshot, and when that was.
    last_snapshot: Mutex<(u64, Instant)>,
}

impl StateJournal {
    /// Opens (creating) the journal in `partition` behind an open fence: tools, tests.
    pub fn open(
        partition: &Path,
        mode: JournalMode,
    ) -> Result<(StateJournal, StateSnapshot), StateJournalError> {
        StateJournal::open_fenced(partition, mode, Arc::new(Fence::open()), Epoch(0))
    }

    /// Opens (creating) the journal in `partition`, replays it and starts the writer.
    /// Every write goes through `fence`; new segments and snapshots carry `epoch`.
    pub fn open_fenced(
        partition: &Path,
        mode: JournalMode,
        fence: Arc<Fence>,
        epoch: Epoch,
    ) -> Result<(StateJournal, StateSnapshot), StateJournalError> {
        let vfs = Arc::new(FencedVfs::new(fence.clone()));
        StateJournal::open_with_vfs(vfs, partition, mode, fence, epoch)
    }

    /// [`StateJournal::open_fenced`] with the journal's files on `vfs` (which must honour
    /// `fence` itself; the writer only checks it between records): crash tests pass a
    /// `MemVfs` to cut the power at any write.
    pub fn open_with_vfs(
        vfs: Arc<dyn Vfs>,
        partition: &Path,
        mode: JournalMode,
        fence: Arc<Fence>,
        epoch: Epoch,
    ) -> Result<(StateJournal, StateSnapshot), StateJournalError> {
        // The writer batches and syncs itself; `None` keeps the journal from syncing.
        let open_mode = match mode {
            JournalMode::None => JournalMode::None,
            JournalMode::Sync | JournalMode::Group => JournalMode::Group,
        };
        let config = JournalConfig {
            mode: open_mode,
            epoch,
            ..JournalConfig::default()
        };
        let (journal, recovered) = Journal::open_with(vfs, &partition.join(STATE_DIR), config)?;
        let (state, last) = replay(&recovered)?;
        info!(
            clients = state.clients.len(),
            locks = state.locks.len(),
            callbacks = state.callbacks.promises.len(),
            records = recovered.records.len(),
            position = %last,
            "state journal replayed"
        );
        let (queue, jobs) = sync_channel(QUEUE_MAX);
        let journal = Arc::new(journal);
        let progress = Arc::new(Progress::new());
        let writer_progress = progress.clone();
        std::thread::Builder::new()
            .name("state-journal".into())
            .spawn(move || write_loop(journal, jobs, last, mode, fence, &writer_progress))
            .map_err(StateJournalError::Thread)?;
        // Records replayed count towards the next snapshot: replay was that long.
        let replayed = recovered.records.len() as u64;
        let last_snapshot = Mutex::new((0u64.wrapping_sub(replayed), Instant::now()));
        Ok((
            StateJournal {
                queue,
                mode,
                progress,
                last_snapshot,
            },
            state,
        ))
    }

    /// Hands `record` to the writer; call it under the lock of the change it records, so
    /// records keep the order of the changes. `must_be_durable` records (lock changes)
    /// are waited for in `Sync` and `Group` modes, every record in `Sync` mode.
    pub fn record(&self, record: &StateRecord, must_be_durable: bool) -> Durable {
        let payload = match postcard::to_allocvec(record) {
            Ok(payload) => payload,
            Err(e) => {
                error!(error = %e, "could not encode a state record");
                return Durable::ready();
            }
        };
        let wait = match self.mode {
            JournalMode::Sync => true,
            JournalMode::Group => must_be_durable,
            JournalMode::None => false,
        };
        let (done, durable) = if wait {
            let (sender, receiver) = oneshot::channel();
            (Some(sender), Durable(Some(receiver)))
        } else {
            (None, Durable::ready())
        };
        self.send_record(payload, done);
        durable
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
        let upto = self.progress.handed.load(Ordering::Acquire);
        if self.progress.durable.load(Ordering::Acquire) >= upto {
            return Durable::ready();
        }
        let (done, receiver) = oneshot::channel();
        self.send(Job::Barrier { upto, done });
        Durable(Some(receiver))
    }

    /// Counts a record, then queues it: a barrier that counts it waits until the writer
    /// has it, so counting first can only make a barrier wait longer, never too little.
    fn send_record(&self, payload: Vec<u8>, done: Option<oneshot::Sender<bool>>) {
        self.progress.handed.fetch_add(1, Ordering::AcqRel);
        self.send(Job::Record { payload, done });
    }

    /// Writes `state` as the snapshot at the position of the last record handed over;
    /// the answer resolves once it is durable (`false`: it was not written). The caller
    /// holds every lock records are handed over under, so none slips between.
    pub fn snapshot(&self, source: SnapshotSource) -> Durable {
        let (written, receiver) = oneshot::channel();
        self.send(Job::Snapshot(source, written));
        let handed = self.progress.handed.load(Ordering::Acquire);
        *self.last_snapshot.lock() = (handed, Instant::now());
        Durable(Some(receiver))
    }

    /// Marks the journal as cleanly handed over at `epoch` and waits until the mark is
    /// durable; the caller snapshotted just before and admits no request meanwhile.
    pub async fn handover(&self, epoch: Epoch) -> bool {
        let (sender, receiver) = oneshot::channel();
        let payload = match postcard::to_allocvec(&StateRecord::Handover { epoch }) {
            Ok(payload) => payload,
            Err(e) => {
                error!(error = %e, "could not encode the handover record");
                return false;
            }
        };
        self.send_record(payload, Some(sender));
        // The writer syncs a batch with a waiter in every mode but `None`, which syncs
        // nothing: there the mark rests on the close that follows.
        Durable(Some(receiver)).wait().await
    }

    /// Resolves once the writer stopped appending on its own (fenced, abandoned, failed
    /// or dead), and why, so that the term ends; never after a clean `close`. After
    /// `Failed` the fence is closed for good: the server must stop, and a restart
    /// recovers what was durable.
    pub fn stopped(&self) -> impl Future<Output = JournalStop> + Send + 'static {
        let mut stop = self.progress.stop.subscribe();
        async move {
            let why = stop
                .wait_for(Option::is_some)
                .await
                .map(|why| why.clone().unwrap_or(JournalStop::Fenced));
            match why {
                Ok(why) => why,
                // The journal is gone without stopping: nothing to report.
                Err(_) => std::future::pending().await,
            }
        }
    }

    /// Why the writer stopped appending, if it has.
    #[cfg(test)]
    pub fn stop_reason(&self) -> Option<JournalStop> {
        self.progress.stop.borrow().clone()
    }

    /// The term ends without closing the journal (its fence closed): the writer appends
    /// nothing more, even if the fence opens again for a later term.
    pub fn abandon(&self) {
        self.progress.abandoned.store(true, Ordering::Release);
    }

    /// Whether enough records (or enough time with some records) passed since the last
    /// snapshot that replay should be shortened.
    pub fn snapshot_due(&self) -> bool {
        let (handed_then, at) = *self.last_snapshot.lock();
        let records = self
            .progress
            .handed
            .load(Ordering::Acquire)
            .wrapping_sub(handed_then);
        records >= SNAPSHOT_EVERY_RECORDS || (records > 0 && at.elapsed() >= SNAPSHOT_EVERY)
    }

    /// Appends everything handed over so far, waits for running snapshots and closes the
    /// journal (releasing its directory lock). Later records are logged and lost. Blocks.
    pub fn close(&self) {
        let (done, closed) = sync_channel(1);
        self.send(Job::Close(done));
        // An error means the writer was gone already; the journal is closed then too.
        let _ = closed.recv();
    }

    fn send(&self, job: Job) {
        let job = match self.queue.try_send(job) {
            Ok(()) => return,
            Err(TrySendError::Full(job)) => job,
            Err(TrySendError::Disconnected(_)) => {
                error!("state journal writer is gone; the change is not journaled");
                return;
            }
        };
        // Back-pressure: the writer is behind by a full queue.
        if self.queue.send(job).is_err() {
            error!("state journal writer is gone; the change is not journaled");
        }
    }
}

/// Appends batches of records, syncs once per batch that has a waiter, and writes
/// snapshots on a helper thread at the position they were handed over at.
fn write_loop(
    journal: Arc<Journal>,
    jobs: Receiver<Job>,
    mut last: Lsn,
    mode: JournalMode,
    fence: Arc<Fence>,
    progress: &Progress,
) {
    let _died = DiedGuard {
        fence: &fence,
        progress,
    };
    let mut failed = false;
    let mut snapshots: Vec<JoinHandle<()>> = Vec::new();
    let mut closing = None;
    // Records received, and barriers waiting for more of them to be durable.
    let mut received = 0u64;
    let mut barriers: Vec<(u64, oneshot::Sender<bool>)> = Vec::new();
    while closing.is_none() {
        let Ok(first) = jobs.recv() else {
            break;
        };
        let mut batch = vec![first];
        while batch.len() < BATCH_MAX {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let mut waiters = Vec::new();
        for job in batch {
            match job {
                Job::Record { payload, done } => {
                    received += 1;
                    if !failed && !may_append(&fence, progress) {
                        failed = true;
                    }
                    if !failed {
                        match journal.append(&payload) {
                            Ok(lsn) => last = lsn,
                            Err(e) => {
                                fail(&fence, progress, "append", &e);
                                failed = true;
                            }
                        }
                    }
                    waiters.extend(done);
                }
                Job::Snapshot(state, written) => {
                    snapshots.retain(|handle| !handle.is_finished());
                    if failed {
                        let _ = written.send(false);
                    } else {
                        snapshots.extend(spawn_snapshot(journal.clone(), last, state, written));
                    }
                }
                Job::Barrier { upto, done } => barriers.push((upto, done)),
                Job::Close(done) => closing = Some(done),
            }
        }
        let must_sync = !waiters.is_empty() || barriers.iter().any(|(upto, _)| *upto <= received);
        if must_sync && !failed && !may_append(&fence, progress) {
            failed = true;
        }
        if must_sync
            && !failed
            && mode != JournalMode::None
            && let Err(e) = journal.flush()
        {
            fail(&fence, progress, "sync", &e);
            failed = true;
        }
        // Published before anyone is answered: a barrier after an answer sees it.
        if failed {
            progress.failed.store(true, Ordering::Release);
        } else if must_sync {
            progress.durable.store(received, Ordering::Release);
        }
        for waiter in waiters {
            let _ = waiter.send(!failed);
        }
        let (answered, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut barriers)
            .into_iter()
            .partition(|(upto, _)| failed || *upto <= received);
        barriers = waiting;
        for (_, done) in answered {
            let _ = done.send(!failed);
        }
    }
    for handle in snapshots {
        let _ = handle.join();
    }
    match Arc::try_unwrap(journal) {
        Ok(journal) => {
            match journal.close() {
                Ok(()) => {}
                // The failure that stopped the writer was logged when it happened.
                Err(e) if failed => debug!(error = %e, "state journal closed after its failure"),
                Err(e) => error!(error = %e, "state journal close failed"),
            }
        }
        Err(_) => error!("state journal still shared at close"),
    }
    info!(position = %last, "state journal closed");
    if let Some(done) = closing {
        let _ = done.send(());
    }
}

/// Whether the writer may still append: the fence is open and the term did not abandon
/// the journal. Publishes `Fenced` when not. Expected after a lost lease: the partner
/// owns the journal now.
fn may_append(fence: &Fence, progress: &Progress) -> bool {
    if fence.is_open() && !progress.abandoned.load(Ordering::Acquire) {
        return true;
    }
    info!("state journal fenced; journaling stops");
    progress.stopped(JournalStop::Fenced);
    false
}

/// A write or sync failed. Refused by the fence (the error says so, even if a renewal
/// opened the fence again since), or behind a fence that closed meanwhile, that is the
/// lost lease again. Otherwise the fence closes for good, so nothing more is answered
/// or written, and the failure is published for the server to stop on.
fn fail(fence: &Fence, progress: &Progress, what: &str, error: &JournalError) {
    if crate::fence::refused(error) || !fence.is_open() {
        info!(error = %error, "state journal fenced; journaling stops");
        progress.stopped(JournalStop::Fenced);
        return;
    }
    fence.close_for_good();
    error!(error = %error, "state journal {what} failed; journaling stops and the server stops serving");
    progress.stopped(JournalStop::Failed(format!(
        "state journal {what} failed: {error}"
    )));
}

/// Stops the process if the writer thread dies (a panic): the records handed over would
/// otherwise wait forever, and the server would serve on unjournaled.
struct DiedGuard<'a> {
    fence: &'a Fence,
    progress: &'a Progress,
}

impl Drop for DiedGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.fence.close_for_good();
            self.progress.failed.store(true, Ordering::Release);
            self.progress.stopped(JournalStop::Failed(
                "the state journal writer died (the log says why)".into(),
            ));
        }
    }
}

fn spawn_snapshot(
    journal: Arc<Journal>,
    lsn: Lsn,
    source: SnapshotSource,
    written: oneshot::Sender<bool>,
) -> Option<JoinHandle<()>> {
    let spawned = std::thread::Builder::new()
        .name("state-snapshot".into())
        .spawn(move || {
            let started = Instant::now();
            let Some(state) = source() else {
                warn!(position = %lsn, "state snapshot abandoned: the tables' copy never came");
                let _ = written.send(false);
                return;
            };
            let payload = match postcard::to_allocvec(&state) {
                Ok(payload) => payload,
                Err(e) => {
                    error!(error = %e, "could not encode a state snapshot");
                    let _ = written.send(false);
                    return;
                }
            };
            let result = journal.write_snapshot(lsn, &payload);
            match &result {
                Ok(()) => info!(
                    position = %lsn,
                    locks = state.locks.len(),
                    bytes = payload.len(),
                    took_ms = started.elapsed().as_millis() as u64,
                    "state snapshot written"
                ),
                Err(e) => warn!(error = %e, position = %lsn, "state snapshot failed"),
            }
            let _ = written.send(result.is_ok());
        });
    match spawned {
        Ok(handle) => Some(handle),
        Err(e) => {
            warn!(error = %e, "could not start a snapshot thread");
            None
        }
    }
}
