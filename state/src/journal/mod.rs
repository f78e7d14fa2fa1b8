//! The journal: opaque payloads as sequenced, checksummed records in segment files, made
//! durable by group commit, and snapshots that let old segments go.
//! Invariant: records are written in order, gap-free, and reported durable only after a
//! sync covering them succeeded; a failed record write or sync poisons the journal.

mod error;
mod mem_vfs;
mod recovery;
pub mod segment;
pub mod snapshot;
mod vfs;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};
use proto::Epoch;
use tracing::{debug, error, info, warn};

pub use error::{Damage, JournalError};
pub use mem_vfs::MemVfs;
pub use recovery::{Recovered, RecoveredSnapshot};
pub use vfs::{DirLock, OsVfs, Vfs, VfsFile};

use recovery::{SegmentFile, segment_file_name};
use segment::{RECORD_BYTES_MAX, SegmentHeader};

/// A record's position in the journal. Records are numbered from 1; `Lsn(0)` is the position
/// before the first record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lsn(pub u64);

impl Lsn {
    pub fn next(self) -> Lsn {
        Lsn(self.0 + 1)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// When appended records become durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JournalMode {
    /// `append` returns once the record is durable.
    Sync,
    /// Records become durable within `group_delay`; `append_durable` and `flush` wait.
    Group,
    /// The journal never syncs records on its own; only `flush` and snapshots persist.
    None,
}

impl FromStr for JournalMode {
    type Err = String;

    fn from_str(s: &str) -> Result<JournalMode, String> {
        match s {
            "sync" => Ok(JournalMode::Sync),
            "group" => Ok(JournalMode::Group),
            "none" => Ok(JournalMode::None),
            other => Err(format!(
                "unknown journal mode {other:?} (expected sync, group or none)"
            )),
        }
    }
}

/// Settings for [`Journal::open`].
#[derive(Clone, Debug)]
pub struct JournalConfig {
    pub mode: JournalMode,
    /// A segment is closed and a new one started once the next record would pass this size.
    pub segment_bytes_max: u64,
    /// In `Group` mode, how long a written record may wait for its sync.
    pub group_delay: Duration,
    /// Written into new segment and snapshot headers.
    pub epoch: Epoch,
}

pub const SEGMENT_BYTES_MAX_DEFAULT: u64 = 64 << 20;
pub const GROUP_DELAY_DEFAULT: Duration = Duration::from_millis(10);

impl Default for JournalConfig {
    fn default() -> JournalConfig {
        JournalConfig {
            mode: JournalMode::Sync,
            segment_bytes_max: SEGMENT_BYTES_MAX_DEFAULT,
            group_delay: GROUP_DELAY_DEFAULT,
            epoch: Epoch(0),
        }
    }
}

/// What a journal directory holds, for `holdfast state inspect`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalSpan {
    /// The newest snapshot's position.
    pub snapshot: Option<Lsn>,
    /// The first record held in a segment (`last + 1` when none is).
    pub first: Lsn,
    /// The last record appended (or covered by the snapshot).
    pub last: Lsn,
    /// The last record known durable.
    pub durable: Lsn,
    pub segment_count: usize,
    pub segment_bytes: u64,
}

/// Counters for tests and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JournalStats {
    pub appends: u64,
    /// Syncs of segment files that made records durable.
    pub syncs: u64,
}

/// An open journal. Thread-safe: share it behind an `Arc`.
pub struct Journal {
    shared: Arc<Shared>,
    flusher: Option<JoinHandle<()>>,
    closed: bool,
    _dir_lock: DirLock,
}

struct Shared {
    vfs: Arc<dyn Vfs>,
    dir: PathBuf,
    config: JournalConfig,
    inner: Mutex<Inner>,
    /// Signalled when `durable` moves, a sync ends or the journal is poisoned.
    durable_changed: Condvar,
    /// Signalled to the group-commit flusher when there is something to sync or on shutdown.
    flusher_wake: Condvar,
    /// Serialises snapshots; never held together with `inner` for long.
    snapshot_serial: Mutex<()>,
}

struct ActiveSegment {
    file: Arc<dyn VfsFile>,
    path: PathBuf,
    first_lsn: Lsn,
    bytes: u64,
}

struct Inner {
    active: ActiveSegment,
    /// Closed segments in order; all of their bytes are durable.
    closed: Vec<SegmentFile>,
    last_written: Lsn,
    durable: Lsn,
    snapshot: Option<Lsn>,
    syncing: bool,
    poisoned: Option<String>,
    shutdown: bool,
    stats: JournalStats,
    frame: Vec<u8>,
}

impl Journal {
    /// Opens (creating if needed) the journal in `dir` on the real file system, recovers its
    /// contents and starts a new segment for appends.
    pub fn open(dir: &Path, config: JournalConfig) -> Result<(Journal, Recovered), JournalError> {
        Journal::open_with(Arc::new(OsVfs), dir, config)
    }

    /// [`Journal::open`] on any [`Vfs`].
    pub fn open_with(
        vfs: Arc<dyn Vfs>,
        dir: &Path,
        config: JournalConfig,
    ) -> Result<(Journal, Recovered), JournalError> {
        assert!(
            config.segment_bytes_max > 0,
            "segment_bytes_max must be positive"
        );
        vfs.create_dir_all(dir)
            .map_err(|e| JournalError::io("create directory", dir, e))?;
        let dir_lock = vfs
            .lock_dir(dir)
            .map_err(|e| JournalError::io("lock directory", dir, e))?;
        let outcome = recovery::recover(vfs.as_ref(), dir, true)?;
        let mut closed = outcome.segments;
        let next = outcome.last_lsn.next();
        // A new segment per open: the epoch in its header is this process's, and the previous
        // segment's tail is left exactly as recovery repaired it.
        closed.retain(|s| s.first_lsn != next || s.last_lsn >= next);
        let active = create_segment(vfs.as_ref(), dir, config.epoch, next)?;
        let snapshot = outcome.recovered.snapshot.as_ref().map(|s| s.lsn);
        info!(
            dir = %dir.display(),
            snapshot = ?snapshot,
            records = outcome.recovered.records.len(),
            next_lsn = %next,
            segments = closed.len() + 1,
            mode = ?config.mode,
            "journal opened"
        );
        let shared = Arc::new(Shared {
            vfs,
            dir: dir.to_path_buf(),
            inner: Mutex::new(Inner {
                active,
                closed,
                last_written: outcome.last_lsn,
                durable: outcome.last_lsn,
                snapshot,
                syncing: false,
                poisoned: None,
                shutdown: false,
                stats: JournalStats::default(),
                frame: Vec::new(),
            }),
            config,
            durable_changed: Condvar::new(),
            flusher_wake: Condvar::new(),
            snapshot_serial: Mutex::new(()),
        });
        let flusher = if shared.config.mode == JournalMode::Group {
            let shared = shared.clone();
            Some(
                thread::Builder::new()
                    .name("journal-flusher".into())
                    .spawn(move || shared.flusher_loop())
                    .map_err(|e| JournalError::io("spawn flusher for", dir, e))?,
            )
        } else {
            None
        };
        Ok((
            Journal {
                shared,
                flusher,
                closed: false,
                _dir_lock: dir_lock,
            },
            outcome.recovered,
        ))
    }

    /// Appends a record and returns its position. In `Sync` mode, returns once the record is
    /// durable (sharing the sync with concurrent appenders); otherwise once it is written.
    pub fn append(&self, payload: &[u8]) -> Result<Lsn, JournalError> {
        let lsn = self.shared.write(payload)?;
        if self.shared.config.mode == JournalMode::Sync {
            self.shared.sync_to(lsn)?;
        }
        Ok(lsn)
    }

    /// Appends a record that must be durable before the caller replies (a lock grant): waits
    /// for its sync in `Sync` and `Group` modes. In `None` mode it is [`Journal::append`].
    pub fn append_durable(&self, payload: &[u8]) -> Result<Lsn, JournalError> {
        let lsn = self.shared.write(payload)?;
        if self.shared.config.mode != JournalMode::None {
            self.shared.sync_to(lsn)?;
        }
        Ok(lsn)
    }

    /// Makes every record written so far durable, in every mode; returns the last of them.
    pub fn flush(&self) -> Result<Lsn, JournalError> {
        let target = self.shared.inner.lock().last_written;
        self.shared.sync_to(target)?;
        Ok(target)
    }

    /// Writes `payload` as the snapshot of the caller's state after record `lsn`, then removes
    /// the segments and the snapshot it makes redundant. The caller captures its state at
    /// `lsn` (the result of the append it last applied) and may call this from another
    /// thread: appends go on meanwhile, since the journal's lock is only taken briefly.
    pub fn write_snapshot(&self, lsn: Lsn, payload: &[u8]) -> Result<(), JournalError> {
        let shared = &self.shared;
        let _serial = shared.snapshot_serial.lock();
        let previous = {
            let inner = shared.inner.lock();
            let last_snapshot = inner.snapshot.unwrap_or(Lsn(0));
            if lsn > inner.last_written || lsn < last_snapshot {
                return Err(JournalError::SnapshotPosition {
                    requested: lsn,
                    last_appended: inner.last_written,
                    last_snapshot,
                });
            }
            inner.snapshot
        };
        let started = Instant::now();
        snapshot::write_file(
            shared.vfs.as_ref(),
            &shared.dir,
            shared.config.epoch,
            lsn,
            payload,
        )?;
        // The snapshot is durable under its final name: only now may what it covers go.
        let obsolete: Vec<SegmentFile> = {
            let mut inner = shared.inner.lock();
            inner.snapshot = Some(lsn);
            let covered = inner
                .closed
                .iter()
                .take_while(|s| s.last_lsn <= lsn)
                .count();
            inner.closed.drain(..covered).collect()
        };
        let mut removals: Vec<PathBuf> = obsolete.iter().map(|s| s.path.clone()).collect();
        if let Some(previous) = previous.filter(|p| *p != lsn) {
            removals.push(shared.dir.join(snapshot::file_name(previous)));
        }
        for path in &removals {
            shared
                .vfs
                .remove(path)
                .map_err(|e| JournalError::io("remove", path, e))?;
        }
        shared
            .vfs
            .sync_dir(&shared.dir)
            .map_err(|e| JournalError::io("sync directory", &shared.dir, e))?;
        info!(
            lsn = %lsn,
            payload_bytes = payload.len(),
            segments_removed = obsolete.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "snapshot written"
        );
        Ok(())
    }

    /// What the journal holds now.
    pub fn span(&self) -> JournalSpan {
        let inner = self.shared.inner.lock();
        let first = inner
            .closed
            .first()
            .map_or(inner.active.first_lsn, |s| s.first_lsn);
        JournalSpan {
            snapshot: inner.snapshot,
            first,
            last: inner.last_written,
            durable: inner.durable,
            segment_count: inner.closed.len() + 1,
            segment_bytes: inner.closed.iter().map(|s| s.bytes).sum::<u64>() + inner.active.bytes,
        }
    }

    pub fn stats(&self) -> JournalStats {
        self.shared.inner.lock().stats
    }

    /// Stops the flusher and, except in `None` mode, makes every written record durable.
    pub fn close(mut self) -> Result<(), JournalError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), JournalError> {
        self.closed = true;
        self.shared.inner.lock().shutdown = true;
        self.shared.flusher_wake.notify_all();
        if let Some(flusher) = self.flusher.take()
            && flusher.join().is_err()
        {
            error!("journal flusher thread panicked");
        }
        if self.shared.config.mode == JournalMode::None {
            return Ok(());
        }
        let target = self.shared.inner.lock().last_written;
        self.shared.sync_to(target)
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        if !self.closed
            && let Err(e) = self.shutdown()
        {
            warn!(error = %e, "journal dropped without its last records made durable");
        }
    }
}

/// Reads a journal directory without changing it (no repair, no new segment): what
/// `holdfast state inspect` shows. Fails like [`Journal::open`] on damage, except that a torn
/// tail is only reported (at WARN), not truncated.
pub fn inspect(dir: &Path) -> Result<(JournalSpan, Recovered), JournalError> {
    inspect_with(&OsVfs, dir)
}

/// [`inspect`] on any [`Vfs`].
pub fn inspect_with(vfs: &dyn Vfs, dir: &Path) -> Result<(JournalSpan, Recovered), JournalError> {
    let outcome = recovery::recover(vfs, dir, false)?;
    let span = JournalSpan {
        snapshot: outcome.recovered.snapshot.as_ref().map(|s| s.lsn),
        first: outcome
            .segments
            .first()
            .map_or(outcome.last_lsn.next(), |s| s.first_lsn),
        last: outcome.last_lsn,
        durable: outcome.last_lsn,
        segment_count: outcome.segments.len(),
        segment_bytes: outcome.segments.iter().map(|s| s.bytes).sum(),
    };
    Ok((span, outcome.recovered))
}

/// Creates a segment durably: header written and synced, and the directory synced, before any
/// record goes in, so that recovery can tell an interrupted creation by its size alone.
fn create_segment(
    vfs: &dyn Vfs,
    dir: &Path,
    epoch: Epoch,
    first_lsn: Lsn,
) -> Result<ActiveSegment, JournalError> {
    let path = dir.join(segment_file_name(first_lsn));
    let file = vfs
        .create(&path)
        .map_err(|e| JournalError::io("create segment", &path, e))?;
    let header = SegmentHeader { epoch, first_lsn }.encode();
    file.write_all(&header)
        .map_err(|e| JournalError::io("write segment header", &path, e))?;
    file.sync_data()
        .map_err(|e| JournalError::io("sync segment", &path, e))?;
    vfs.sync_dir(dir)
        .map_err(|e| JournalError::io("sync directory", dir, e))?;
    debug!(path = %path.display(), first_lsn = %first_lsn, "segment created");
    Ok(ActiveSegment {
        file,
        path,
        first_lsn,
        bytes: header.len() as u64,
    })
}

impl Shared {
    /// Marks the journal unusable and reports `err`: the caller's error, every later call's
    /// `Poisoned`. Logged by the caller, which decides what the failure means.
    fn poison(&self, inner: &mut Inner, err: JournalError) -> JournalError {
        debug!(error = %err, dir = %self.dir.display(), "journal write failed; refusing further appends");
        inner.poisoned = Some(err.to_string());
        self.durable_changed.notify_all();
        err
    }

    /// Writes one record (rolling the segment first if it is full); does not sync it.
    fn write(&self, payload: &[u8]) -> Result<Lsn, JournalError> {
        if payload.len() > RECORD_BYTES_MAX {
            return Err(JournalError::RecordTooLarge {
                len: payload.len(),
                max: RECORD_BYTES_MAX,
            });
        }
        let mut guard = self.inner.lock();
        let inner = &mut *guard;
        if let Some(reason) = &inner.poisoned {
            return Err(JournalError::Poisoned(reason.clone()));
        }
        let lsn = inner.last_written.next();
        inner.frame.clear();
        segment::encode_record(lsn, payload, &mut inner.frame);
        let has_records = inner.last_written >= inner.active.first_lsn;
        if has_records
            && inner.active.bytes + inner.frame.len() as u64 > self.config.segment_bytes_max
        {
            self.roll(inner)?;
        }
        if let Err(e) = inner.active.file.write_all(&inner.frame) {
            let err = JournalError::io("append to", &inner.active.path, e);
            return Err(self.poison(inner, err));
        }
        let was_all_durable = inner.durable == inner.last_written;
        inner.active.bytes += inner.frame.len() as u64;
        inner.last_written = lsn;
        inner.stats.appends += 1;
        if was_all_durable && self.config.mode == JournalMode::Group {
            self.flusher_wake.notify_one();
        }
        Ok(lsn)
    }

    /// Closes the active segment and starts the next one. The closed segment is synced first:
    /// recovery accepts a torn record only at the end of the last segment.
    fn roll(&self, inner: &mut Inner) -> Result<(), JournalError> {
        if let Err(e) = inner.active.file.sync_data() {
            let err = JournalError::io("sync segment", &inner.active.path, e);
            return Err(self.poison(inner, err));
        }
        inner.stats.syncs += 1;
        inner.durable = inner.last_written;
        self.durable_changed.notify_all();
        let next = match create_segment(
            self.vfs.as_ref(),
            &self.dir,
            self.config.epoch,
            inner.last_written.next(),
        ) {
            Ok(next) => next,
            Err(err) => return Err(self.poison(inner, err)),
        };
        let old = std::mem::replace(&mut inner.active, next);
        info!(closed = %old.path.display(), first_lsn = %inner.active.first_lsn, "journal segment rolled");
        inner.closed.push(SegmentFile {
            path: old.path,
            first_lsn: old.first_lsn,
            last_lsn: inner.last_written,
            bytes: old.bytes,
        });
        Ok(())
    }

    /// Returns once record `lsn` is durable, leading a sync if none is in progress.
    fn sync_to(&self, lsn: Lsn) -> Result<(), JournalError> {
        let mut inner = self.inner.lock();
        self.sync_locked(&mut inner, lsn)
    }

    /// Group commit, leader/follower: an appender that needs its record durable and finds
    /// no sync in progress becomes the leader, syncs everything written so far with the
    /// lock released, and wakes everyone the sync covered; appenders arriving meanwhile
    /// queue behind it, and the next leader syncs them all at once.
    fn sync_locked(&self, inner: &mut MutexGuard<'_, Inner>, lsn: Lsn) -> Result<(), JournalError> {
        loop {
            if let Some(reason) = &inner.poisoned {
                return Err(JournalError::Poisoned(reason.clone()));
            }
            if inner.durable >= lsn {
                return Ok(());
            }
            if inner.syncing {
                self.durable_changed.wait(inner);
                continue;
            }
            // Leader: everything written so far is in the active segment or in closed
            // segments, which were synced when they closed.
            inner.syncing = true;
            let target = inner.last_written;
            let file = inner.active.file.clone();
            let result = MutexGuard::unlocked(inner, || file.sync_data());
            inner.syncing = false;
            match result {
                Ok(()) => {
                    inner.stats.syncs += 1;
                    inner.durable = inner.durable.max(target);
                    self.durable_changed.notify_all();
                }
                Err(e) => {
                    let err = JournalError::io("sync segment", &inner.active.path, e);
                    return Err(self.poison(inner, err));
                }
            }
        }
    }

    /// `Group` mode: syncs within `group_delay` of the first unsynced write, so that one sync
    /// covers every record written in the meantime.
    fn flusher_loop(&self) {
        let mut inner = self.inner.lock();
        loop {
            if inner.shutdown || inner.poisoned.is_some() {
                return;
            }
            if inner.last_written <= inner.durable {
                self.flusher_wake.wait(&mut inner);
                continue;
            }
            let deadline = Instant::now() + self.config.group_delay;
            while !inner.shutdown && Instant::now() < deadline {
                self.flusher_wake.wait_until(&mut inner, deadline);
            }
            let target = inner.last_written;
            // A failure poisons the journal and is logged there; appenders see it.
            let _ = self.sync_locked(&mut inner, target);
        }
    }
}
