//! The partition's write-ahead log: every storage batch of every volume and every
//! callback, lock and client record as a numbered record in preallocated segments under
//! `PARTITION/log/`, made durable by one flusher that writes and syncs whatever is
//! queued at once (group commit across volumes, state and threads).
//! Invariant: records are numbered gap-free in the order they are queued, and one is
//! reported durable only after a sync covering it succeeded; a failure poisons the log.

mod segment;
pub mod snapshot;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::Instant;

use parking_lot::{Condvar, Mutex};
use thiserror::Error;
use tokio::sync::{oneshot, watch};
use tracing::{debug, error, info, warn};

use super::disk::{Disk, DiskFile};
use crate::fence::Fence;
use crate::stats::Stats;

pub use segment::{BLOCK_BYTES, RECORD_BYTES_MAX};
use segment::{
    SEGMENT_VERSION, SEGMENT_VERSION_STORAGE_ONLY, ScanEnd, SegmentHeader, align_up, encode_frame,
    frame_bytes, scan_segment,
};
/// A record's number: the state crate's, one type from the tables to the disk.
pub use state::Lsn;

/// The log's directory under the partition.
pub const LOG_DIR: &str = "log";
const SEGMENT_PREFIX: &str = "segment-";
const SEGMENT_SUFFIX: &str = ".log";
const SPARE_PREFIX: &str = "spare-";
/// A segment being made: its name only once its header is durable.
const NEW_SEGMENT: &str = "segment.tmp";
/// Released segments kept for reuse: rewriting a file in place needs no allocation,
/// so its syncs need no file-system journal commit.
const SPARES_MAX: usize = 2;
/// A new segment is zero-filled this far ahead of its frames: written blocks are
/// overwritten in place, and only each extension changes the file's size.
const PREPARE_BYTES: u64 = 512 << 10;
pub const SEGMENT_BYTES_DEFAULT: u64 = 32 << 20;
/// Bytes of records queued and not yet taken by the flusher, at most: past it an append
/// waits for the flusher (a stalled disk makes the server wait instead of filling its
/// memory with records nobody waits for, such as callback promises).
const PENDING_BYTES_MAX: usize = 16 << 20;

/// What a record holds: its payload's first byte (segment version 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordKind {
    /// One storage batch of one volume: a postcard `Redo`.
    Storage = 1,
    /// One change of the callback, lock and client state: a postcard
    /// `state::journaled::StateRecord`.
    State = 2,
}

impl RecordKind {
    fn from_byte(byte: u8) -> Option<RecordKind> {
        match byte {
            1 => Some(RecordKind::Storage),
            2 => Some(RecordKind::State),
            _ => None,
        }
    }
}

/// One record read back from the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogRecord {
    pub lsn: Lsn,
    pub kind: RecordKind,
    /// The payload after the kind byte.
    pub body: Vec<u8>,
}

/// What the state side recovers from the log: its newest snapshot and its records
/// after it, in order.
#[derive(Clone, Debug, Default)]
pub struct StateRecovery {
    pub snapshot: Option<snapshot::StateSnapshotFile>,
    pub records: Vec<LogRecord>,
}

impl StateRecovery {
    /// Picks the state side's part of what the log holds: the newest snapshot in `dir`
    /// and the state records after it.
    pub fn read(disk: &dyn Disk, dir: &Path, log: &Recovery) -> Result<StateRecovery, LogError> {
        let snapshot = snapshot::newest(disk, dir)?;
        let after = snapshot.as_ref().map_or(Lsn(0), |s| s.lsn);
        let records = log
            .records
            .iter()
            .filter(|r| r.kind == RecordKind::State && r.lsn > after)
            .cloned()
            .collect();
        Ok(StateRecovery { snapshot, records })
    }

    /// The first record the state side needs: the one after its snapshot.
    pub fn needed_from(&self) -> Lsn {
        self.snapshot.as_ref().map_or(Lsn(1), |s| s.lsn.next())
    }
}

/// Why the log stopped taking records, once it has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogStop {
    /// A write or sync failed behind an open fence (or a change could not be applied):
    /// the fence is closed for good and the server must stop.
    Failed(String),
    /// The fence refused a write: the term ends, a later one may serve again.
    Fenced(String),
}

/// Errors of the metadata log.
#[derive(Debug, Error)]
pub enum LogError {
    #[error("metadata log: {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Bytes no crash of ours explains: recovery stops rather than lose acknowledged
    /// changes.
    #[error("metadata log {path} is corrupt at byte {offset}: {detail}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        detail: String,
    },
    /// An earlier write or sync failed: after a failed fsync nothing written since the
    /// last good one can be trusted, so the log takes no more records until reopened.
    #[error("metadata log unusable after an earlier failure: {0}")]
    Poisoned(String),
    #[error("metadata log record of {len} bytes exceeds the limit of {max} bytes")]
    RecordTooLarge { len: usize, max: usize },
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LogError + use<> {
    let path = path.to_owned();
    move |source| LogError::Io { op, path, source }
}

/// Settings of the log.
#[derive(Clone, Copy, Debug)]
pub struct LogConfig {
    /// Bytes a segment may grow to; a flush that does not fit starts a new one.
    pub segment_bytes: u64,
}

impl Default for LogConfig {
    fn default() -> LogConfig {
        LogConfig {
            segment_bytes: SEGMENT_BYTES_DEFAULT,
        }
    }
}

/// What the flusher did, for tests and `Partition::log_figures`; the latency of each
/// fsync and the records it made durable go to the server's `Stats` histograms
/// (`MetadataLog::observe`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogFigures {
    /// Flushes: frames written and synced.
    pub flushes: u64,
    /// Records made durable.
    pub records: u64,
    /// Bytes written in frames (padding included).
    pub bytes: u64,
    /// Segments started, and how many of them reused a released file.
    pub segments_started: u64,
    pub segments_reused: u64,
    /// The last record made durable.
    pub durable_lsn: u64,
}

impl LogFigures {
    fn flushed(&mut self, records: u64, bytes: u64, last: Lsn) {
        self.flushes += 1;
        self.records += records;
        self.bytes += bytes;
        self.durable_lsn = last.0;
    }
}

/// A segment whose frames are all durable.
#[derive(Clone, Debug)]
struct ClosedSegment {
    path: PathBuf,
    /// The last record it holds (`first - 1` when none).
    last: Lsn,
}

/// What recovery found in the log's directory.
#[derive(Debug)]
pub struct Recovery {
    /// Every record in the log, in order.
    pub records: Vec<LogRecord>,
    /// The last record, or the position a segment without records starts after.
    pub last: Lsn,
    segments: Vec<ClosedSegment>,
    spares: Vec<PathBuf>,
}

impl Recovery {
    /// How many segments the log holds.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// The first record the log holds (`last + 1` when it holds none).
    pub fn first(&self) -> Lsn {
        self.records.first().map_or(self.last.next(), |r| r.lsn)
    }
}

/// The segment the flusher writes.
struct Active {
    file: Arc<dyn DiskFile>,
    path: PathBuf,
    salt: u32,
    capacity: u64,
    /// Where the next frame goes.
    offset: u64,
    /// The file's length: the bytes written (zeros, or an earlier use's frames).
    prepared: u64,
}

struct Queue {
    /// The next number to hand out.
    next: Lsn,
    /// Records queued and not yet written, in order (payloads with their kind byte).
    pending: Vec<(Lsn, Vec<u8>)>,
    /// The bytes of `pending`'s payloads (at most `PENDING_BYTES_MAX` but for one record).
    pending_bytes: usize,
    /// Told `true` once the record they name is durable, `false` if the log fails first.
    waiters: Vec<(Lsn, oneshot::Sender<bool>)>,
    durable: Lsn,
    /// The first record the state side still needs (the one after its snapshot): no
    /// segment holding it or a later record is released.
    state_needed_from: Lsn,
    poisoned: Option<String>,
    shutdown: bool,
    /// Live `FlushHold`s: the flusher takes nothing while there are any.
    flush_holds: usize,
    figures: LogFigures,
    closed: Vec<ClosedSegment>,
    spares: Vec<PathBuf>,
    spare_next: u64,
}

struct Shared {
    disk: Arc<dyn Disk>,
    /// Closed for good when the log fails behind it: the server must stop.
    fence: Arc<Fence>,
    dir: PathBuf,
    config: LogConfig,
    queue: Mutex<Queue>,
    /// Signalled when `durable` moves or the log is poisoned.
    durable_changed: Condvar,
    /// Signalled to the flusher when records are queued or on shutdown.
    work: Condvar,
    /// Serialises releases of old segments.
    releasing: Mutex<()>,
    /// Where each flush's fsync latency and group size are recorded, once set.
    stats: OnceLock<Arc<Stats>>,
    /// Why the log stopped, once it has.
    stop: watch::Sender<Option<LogStop>>,
    /// Serialises state snapshots; the position of the last one written.
    state_snapshot: Mutex<Lsn>,
}

/// Holds the flusher off while it lives (`MetadataLog::hold`).
pub struct FlushHold<'a> {
    log: &'a MetadataLog,
}

impl Drop for FlushHold<'_> {
    fn drop(&mut self) {
        let mut queue = self.log.shared.queue.lock();
        queue.flush_holds -= 1;
        if queue.flush_holds == 0 {
            self.log.shared.work.notify_one();
        }
    }
}

/// The open log. Thread-safe: share it behind an `Arc`.
pub struct MetadataLog {
    shared: Arc<Shared>,
    flusher: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for MetadataLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetadataLog")
            .field("dir", &self.shared.dir)
            .finish()
    }
}

/// The name of the segment whose first record is `first`, zero-padded to sort in order.
fn segment_name(first: Lsn) -> String {
    format!("{SEGMENT_PREFIX}{:020}{SEGMENT_SUFFIX}", first.0)
}

fn parse_segment_name(name: &str) -> Option<Lsn> {
    let digits = name
        .strip_prefix(SEGMENT_PREFIX)?
        .strip_suffix(SEGMENT_SUFFIX)?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok().map(Lsn))
        .flatten()
}

pub(super) fn read_all(disk: &dyn Disk, path: &Path) -> Result<Vec<u8>, LogError> {
    let file = disk.open(path, false).map_err(io("open", path))?;
    let len = file.len().map_err(io("measure", path))?;
    let mut bytes = vec![0; len as usize];
    file.read_at(0, &mut bytes).map_err(io("read", path))?;
    Ok(bytes)
}

impl MetadataLog {
    /// Reads the log in `dir` (made if missing): every record, in order. A torn write
    /// at the end of the last segment is left out (the next open starts a new segment
    /// after it); any other damage is `Corrupt`. Changes nothing but leftovers of an
    /// interrupted segment or snapshot creation.
    pub fn recover(disk: &dyn Disk, dir: &Path) -> Result<Recovery, LogError> {
        disk.create_dir_all(dir).map_err(io("create", dir))?;
        MetadataLog::scan_dir(disk, dir, true)
    }

    /// Reads the log in `dir` as [`MetadataLog::recover`] does, changing nothing: what
    /// `holdfast state inspect` shows of a partition, maybe one in use.
    pub fn read(disk: &dyn Disk, dir: &Path) -> Result<Recovery, LogError> {
        MetadataLog::scan_dir(disk, dir, false)
    }

    fn scan_dir(disk: &dyn Disk, dir: &Path, repair: bool) -> Result<Recovery, LogError> {
        let mut segments = Vec::new();
        let mut spares = Vec::new();
        for name in disk.list(dir).map_err(io("list", dir))? {
            let path = dir.join(&name);
            if let Some(first) = parse_segment_name(&name) {
                segments.push((first, path));
            } else if name.starts_with(SPARE_PREFIX) && name.ends_with(SEGMENT_SUFFIX) {
                spares.push(path);
            } else if repair && (name == NEW_SEGMENT || name == snapshot::TEMP) {
                disk.remove_file(&path).map_err(io("remove", &path))?;
            }
        }
        segments.sort();
        spares.sort();
        let mut records = Vec::new();
        let mut closed = Vec::new();
        let mut expected: Option<Lsn> = None;
        let count = segments.len();
        for (index, (first, path)) in segments.into_iter().enumerate() {
            let bytes = read_all(disk, &path)?;
            let corrupt = |offset: u64, detail: String| LogError::Corrupt {
                path: path.clone(),
                offset,
                detail,
            };
            // A segment gets its name only once its header is durable.
            let scan = scan_segment(&bytes).map_err(|detail| corrupt(0, detail))?;
            if scan.header.first_lsn != first {
                return Err(corrupt(
                    0,
                    format!("header starts at record {}", scan.header.first_lsn),
                ));
            }
            if let Some(expected) = expected
                && first != expected
            {
                return Err(corrupt(
                    0,
                    format!(
                        "segment starts at record {first}, expected {expected}: records are missing"
                    ),
                ));
            }
            match scan.end {
                ScanEnd::Clean => {}
                ScanEnd::Torn { offset } => {
                    if index + 1 == count {
                        warn!(path = %path.display(), offset, "leaving out a torn write at the end of the metadata log");
                    }
                    // Before a later segment, a torn write was cut by an earlier
                    // recovery: the next segment's first record shows where it ended.
                }
                ScanEnd::Corrupt { offset, detail } => return Err(corrupt(offset, detail)),
            }
            let last = scan
                .records
                .last()
                .map_or(Lsn(first.0.saturating_sub(1)), |(lsn, _)| *lsn);
            for (lsn, range) in scan.records {
                let offset = range.start as u64;
                let payload = &bytes[range];
                let (kind, body) = match scan.header.version {
                    SEGMENT_VERSION_STORAGE_ONLY => (RecordKind::Storage, payload),
                    _ => {
                        let kind = payload.first().and_then(|b| RecordKind::from_byte(*b));
                        let Some(kind) = kind else {
                            return Err(corrupt(offset, format!("record {lsn} has no known kind")));
                        };
                        (kind, &payload[1..])
                    }
                };
                records.push(LogRecord {
                    lsn,
                    kind,
                    body: body.to_vec(),
                });
            }
            expected = Some(last.next());
            closed.push(ClosedSegment { path, last });
        }
        let last = expected.map_or(Lsn(0), |next| Lsn(next.0 - 1));
        Ok(Recovery {
            records,
            last,
            segments: closed,
            spares,
        })
    }

    /// Starts appending after `recovery.last` (or `floor`, if later: a position every
    /// volume's checkpoint has reached) in a new segment, and starts the flusher.
    pub fn start(
        disk: Arc<dyn Disk>,
        dir: &Path,
        recovery: Recovery,
        floor: Lsn,
        config: LogConfig,
        fence: Arc<Fence>,
    ) -> Result<MetadataLog, LogError> {
        // Whole blocks, and room for a header block and a frame.
        let config = LogConfig {
            segment_bytes: (config.segment_bytes / BLOCK_BYTES).max(2) * BLOCK_BYTES,
        };
        let Recovery {
            last,
            segments,
            spares,
            ..
        } = recovery;
        let last = last.max(floor);
        let next = last.next();
        // A segment without records that the new one replaces under its name.
        let closed: Vec<ClosedSegment> = segments
            .into_iter()
            .filter(|s| s.path.file_name() != Some(segment_name(next).as_ref()))
            .collect();
        // Past every spare's number, so that a new spare never replaces one.
        let spare_next = spares
            .iter()
            .filter_map(|path| {
                let name = path.file_name()?.to_str()?;
                name.strip_prefix(SPARE_PREFIX)?
                    .strip_suffix(SEGMENT_SUFFIX)?
                    .parse::<u64>()
                    .ok()
            })
            .max()
            .unwrap_or(0);
        let shared = Arc::new(Shared {
            disk,
            fence,
            dir: dir.to_owned(),
            config,
            queue: Mutex::new(Queue {
                next,
                pending: Vec::new(),
                pending_bytes: 0,
                waiters: Vec::new(),
                durable: last,
                // No hold until the state side (or `Partition::open`) sets one.
                state_needed_from: Lsn(u64::MAX),
                poisoned: None,
                shutdown: false,
                flush_holds: 0,
                figures: LogFigures {
                    durable_lsn: last.0,
                    ..LogFigures::default()
                },
                closed,
                spares,
                spare_next,
            }),
            durable_changed: Condvar::new(),
            work: Condvar::new(),
            releasing: Mutex::new(()),
            stats: OnceLock::new(),
            stop: watch::Sender::new(None),
            state_snapshot: Mutex::new(Lsn(0)),
        });
        let active = shared.new_segment(next)?;
        info!(dir = %dir.display(), next_lsn = %next, "metadata log opened");
        let flusher = {
            let shared = shared.clone();
            thread::Builder::new()
                .name("metadata-log".into())
                .spawn(move || shared.flusher_loop(active))
                .map_err(io("spawn the flusher of", dir))?
        };
        Ok(MetadataLog {
            shared,
            flusher: Mutex::new(Some(flusher)),
        })
    }

    /// Queues `payload`, a storage batch, as the next record and returns its number;
    /// `wait_durable` tells when it is durable.
    pub fn append(&self, payload: Vec<u8>) -> Result<Lsn, LogError> {
        self.append_kind(RecordKind::Storage, &payload, None)
    }

    /// Queues `payload`, a state record, as the next record and returns its number;
    /// `durable` (if given) is told `true` once it is durable, `false` if the log fails
    /// first. Short: callers hold the lock of the change it records, and it waits only
    /// when the disk fell `PENDING_BYTES_MAX` behind.
    pub fn append_state(
        &self,
        payload: &[u8],
        durable: Option<oneshot::Sender<bool>>,
    ) -> Result<Lsn, LogError> {
        self.append_kind(RecordKind::State, payload, durable)
    }

    fn append_kind(
        &self,
        kind: RecordKind,
        body: &[u8],
        durable: Option<oneshot::Sender<bool>>,
    ) -> Result<Lsn, LogError> {
        let max = RECORD_BYTES_MAX.min(self.shared.frame_payload_max());
        if body.len() + 1 > max {
            return Err(LogError::RecordTooLarge {
                len: body.len() + 1,
                max,
            });
        }
        let mut payload = Vec::with_capacity(body.len() + 1);
        payload.push(kind as u8);
        payload.extend_from_slice(body);
        let mut queue = self.shared.queue.lock();
        loop {
            if let Some(reason) = &queue.poisoned {
                return Err(LogError::Poisoned(reason.clone()));
            }
            if queue.shutdown {
                return Err(LogError::Poisoned("the metadata log is closed".into()));
            }
            // Under a hold the flusher makes no room: the few records appended while
            // one lasts go over the bound rather than wait for it.
            if queue.pending.is_empty()
                || queue.flush_holds > 0
                || queue.pending_bytes + payload.len() <= PENDING_BYTES_MAX
            {
                break;
            }
            // The flusher takes what is queued before each flush and says when the
            // flush is durable: room comes then.
            self.shared.durable_changed.wait(&mut queue);
        }
        let lsn = queue.next;
        queue.next = lsn.next();
        queue.pending_bytes += payload.len();
        queue.pending.push((lsn, payload));
        if let Some(durable) = durable {
            queue.waiters.push((lsn, durable));
        }
        self.shared.work.notify_one();
        Ok(lsn)
    }

    /// Keeps the flusher from taking queued records until the hold is dropped, so that
    /// the records appended meanwhile (a change's own and those it queues ahead of it)
    /// go to the disk in one flush rather than the first alone. Every flush waits for
    /// it: hold it only across a few appends.
    pub fn hold(&self) -> FlushHold<'_> {
        self.shared.queue.lock().flush_holds += 1;
        FlushHold { log: self }
    }

    /// Tells `durable` `true` once record `lsn` is durable (at once if it is), `false`
    /// if the log fails first.
    pub fn notify_durable(&self, lsn: Lsn, durable: oneshot::Sender<bool>) {
        let mut queue = self.shared.queue.lock();
        if queue.durable >= lsn {
            drop(queue);
            let _ = durable.send(true);
        } else if queue.poisoned.is_some() {
            drop(queue);
            let _ = durable.send(false);
        } else {
            queue.waiters.push((lsn, durable));
        }
    }

    /// The last record made durable.
    pub fn durable_lsn(&self) -> Lsn {
        self.shared.queue.lock().durable
    }

    /// Keeps every segment holding record `lsn` or a later one (the state side's
    /// records after its snapshot) until set again; called in snapshot order.
    pub fn hold_state_from(&self, lsn: Lsn) {
        self.shared.queue.lock().state_needed_from = lsn;
    }

    /// How many closed segments the state side's hold keeps (those holding a record at
    /// or after it): when there are several, a state snapshot lets them go.
    pub fn segments_held_for_state(&self) -> usize {
        let queue = self.shared.queue.lock();
        queue
            .closed
            .iter()
            .filter(|s| s.last >= queue.state_needed_from)
            .count()
    }

    /// Resolves to why the log stopped, once it has.
    pub fn stopped(&self) -> watch::Receiver<Option<LogStop>> {
        self.shared.stop.subscribe()
    }

    /// The disk the log lives on.
    pub fn disk(&self) -> &Arc<dyn Disk> {
        &self.shared.disk
    }

    /// Writes `payload` as the state snapshot at `lsn` (every state record up to it in,
    /// none after), once every record up to `lsn` is durable, then lets the log go
    /// below it. Blocking. A snapshot at or before one already written is skipped: the
    /// newer one covers it.
    pub fn write_state_snapshot(
        &self,
        epoch: proto::Epoch,
        lsn: Lsn,
        payload: &[u8],
    ) -> Result<(), LogError> {
        self.wait_durable(lsn)?;
        let mut written = self.shared.state_snapshot.lock();
        if lsn <= *written && *written > Lsn(0) {
            return Ok(());
        }
        snapshot::write(
            self.shared.disk.as_ref(),
            &self.shared.dir,
            epoch,
            lsn,
            payload,
        )?;
        *written = lsn;
        self.hold_state_from(lsn.next());
        Ok(())
    }

    /// Returns once record `lsn` is durable.
    pub fn wait_durable(&self, lsn: Lsn) -> Result<(), LogError> {
        let mut queue = self.shared.queue.lock();
        loop {
            if queue.durable >= lsn {
                return Ok(());
            }
            if let Some(reason) = &queue.poisoned {
                return Err(LogError::Poisoned(reason.clone()));
            }
            self.shared.durable_changed.wait(&mut queue);
        }
    }

    /// The number the next record gets: every record queued so far is below it.
    pub fn next_lsn(&self) -> Lsn {
        self.shared.queue.lock().next
    }

    /// Stops the log: a change was made durable in it that could not be applied, so
    /// nothing more may be, until recovery replays it.
    pub fn poison(&self, reason: String) {
        self.shared.poison(reason);
    }

    /// Lets go of the segments whose records are all below `bound` (each volume's
    /// checkpoint holds them) and below the state side's hold, oldest first, each gone
    /// durably before the next, so that a crash leaves no gap. Some are kept as spares
    /// for reuse.
    pub fn release_below(&self, bound: Lsn) -> Result<(), LogError> {
        let shared = &self.shared;
        let _serial = shared.releasing.lock();
        let released: Vec<ClosedSegment> = {
            let mut queue = shared.queue.lock();
            let bound = bound.min(queue.state_needed_from);
            let count = queue.closed.iter().take_while(|s| s.last < bound).count();
            queue.closed.drain(..count).collect()
        };
        for segment in released {
            let spare = {
                let mut queue = shared.queue.lock();
                (queue.spares.len() < SPARES_MAX).then(|| {
                    queue.spare_next += 1;
                    shared.dir.join(format!(
                        "{SPARE_PREFIX}{}{SEGMENT_SUFFIX}",
                        queue.spare_next
                    ))
                })
            };
            match &spare {
                Some(spare) => shared
                    .disk
                    .rename(&segment.path, spare)
                    .map_err(io("recycle", &segment.path))?,
                None => shared
                    .disk
                    .remove_file(&segment.path)
                    .map_err(io("remove", &segment.path))?,
            }
            shared
                .disk
                .sync_dir(&shared.dir)
                .map_err(io("sync", &shared.dir))?;
            debug!(path = %segment.path.display(), last = %segment.last, "metadata log segment released");
            if let Some(spare) = spare {
                shared.queue.lock().spares.push(spare);
            }
        }
        Ok(())
    }

    /// What the flusher did so far.
    /// Records each later flush's fsync latency and group size in `stats` (the first
    /// call wins: one server, one set of figures).
    pub fn observe(&self, stats: Arc<Stats>) {
        let _ = self.shared.stats.set(stats);
    }

    /// The server's figures, once `observe` set them.
    pub(super) fn observer(&self) -> Option<&Arc<Stats>> {
        self.shared.stats.get()
    }

    pub fn stats(&self) -> LogFigures {
        self.shared.queue.lock().figures
    }

    /// Flushes what is queued and stops the flusher; later appends fail.
    pub fn close(&self) {
        {
            let mut queue = self.shared.queue.lock();
            queue.shutdown = true;
        }
        self.shared.work.notify_all();
        if let Some(flusher) = self.flusher.lock().take()
            && flusher.join().is_err()
        {
            error!("metadata log flusher panicked");
        }
    }
}

impl Drop for MetadataLog {
    fn drop(&mut self) {
        self.close();
    }
}

impl Shared {
    /// The largest payload one frame of a segment takes.
    fn frame_payload_max(&self) -> usize {
        let room = self.config.segment_bytes.saturating_sub(BLOCK_BYTES);
        (room as usize).saturating_sub(segment::FRAME_HEADER_BYTES + segment::RECORD_HEADER_BYTES)
    }

    /// Stops the log. Behind an open fence this is server trouble: the fence closes for
    /// good, before any waiter is told, so that the server stops (as when the state
    /// journal fails); behind a closed one it is the fence's refusal.
    fn poison(&self, reason: String) {
        let mut queue = self.queue.lock();
        if queue.poisoned.is_none() {
            // Refused by the fence (even if a renewal opened it again since), or behind
            // a fence that closed meanwhile: the lost lease, not server trouble.
            let stop = if self.fence.is_open() && !crate::fence::refused(&reason) {
                error!(%reason, "metadata log failed: the server stops");
                self.fence.close_for_good();
                LogStop::Failed(format!("metadata log failed: {reason}"))
            } else {
                debug!(%reason, "metadata log stopped behind the fence");
                LogStop::Fenced(reason.clone())
            };
            queue.poisoned = Some(reason);
            // Published before any waiter is told.
            self.stop.send_replace(Some(stop));
        }
        let waiters = std::mem::take(&mut queue.waiters);
        drop(queue);
        for (_, waiter) in waiters {
            let _ = waiter.send(false);
        }
        self.durable_changed.notify_all();
    }

    /// Makes a segment starting at `first` durable under its name: a spare rewritten in
    /// place, or a new file zero-filled ahead; its header is synced before it is named,
    /// and the name is synced before any frame goes in.
    fn new_segment(&self, first: Lsn) -> Result<Active, LogError> {
        let path = self.dir.join(segment_name(first));
        let capacity = self.config.segment_bytes;
        let mut salt = uuid::Uuid::new_v4().as_u128() as u32;
        let spare = self.queue.lock().spares.pop();
        let (file, source, prepared) = match spare {
            Some(spare) => {
                let file = self.disk.open(&spare, false).map_err(io("open", &spare))?;
                let mut old = [0u8; segment::SEGMENT_HEADER_BYTES];
                if file.read_at(0, &mut old).is_ok()
                    && let Ok(header) = SegmentHeader::decode(&old)
                    && header.salt == salt
                {
                    salt = salt.wrapping_add(1);
                }
                let prepared = file.len().map_err(io("measure", &spare))?;
                (file, spare, prepared)
            }
            None => {
                let temp = self.dir.join(NEW_SEGMENT);
                let file = self.disk.open(&temp, true).map_err(io("create", &temp))?;
                file.set_len(0).map_err(io("truncate", &temp))?;
                let prepared = PREPARE_BYTES.min(capacity).max(BLOCK_BYTES);
                file.write_at(0, &vec![0; prepared as usize])
                    .map_err(io("prepare", &temp))?;
                (file, temp, prepared)
            }
        };
        let reused = source != self.dir.join(NEW_SEGMENT);
        let mut block = vec![0u8; BLOCK_BYTES as usize];
        let header = SegmentHeader {
            version: SEGMENT_VERSION,
            salt,
            first_lsn: first,
            capacity,
        };
        block[..segment::SEGMENT_HEADER_BYTES].copy_from_slice(&header.encode());
        file.write_at(0, &block)
            .map_err(io("write header of", &source))?;
        file.sync_data().map_err(io("sync", &source))?;
        self.disk
            .rename(&source, &path)
            .map_err(io("name", &path))?;
        self.disk
            .sync_dir(&self.dir)
            .map_err(io("sync", &self.dir))?;
        {
            let mut queue = self.queue.lock();
            queue.figures.segments_started += 1;
            queue.figures.segments_reused += u64::from(reused);
        }
        debug!(path = %path.display(), first = %first, reused, "metadata log segment started");
        Ok(Active {
            file,
            path,
            salt,
            capacity,
            offset: BLOCK_BYTES,
            prepared,
        })
    }

    /// Writes whatever is queued as one frame, syncs it and answers everyone it holds;
    /// until shutdown (having flushed everything queued) or a failure.
    fn flusher_loop(&self, mut active: Active) {
        let frame_room = self.config.segment_bytes.saturating_sub(BLOCK_BYTES);
        loop {
            let batch = {
                let mut queue = self.queue.lock();
                while (queue.pending.is_empty() || queue.flush_holds > 0)
                    && !queue.shutdown
                    && queue.poisoned.is_none()
                {
                    self.work.wait(&mut queue);
                }
                if queue.pending.is_empty() || queue.poisoned.is_some() {
                    return;
                }
                // As many as fit in one frame of a segment (at least one: `append`
                // bounds each record by it).
                let mut bytes = segment::FRAME_HEADER_BYTES as u64;
                let take = queue
                    .pending
                    .iter()
                    .take_while(|(_, p)| {
                        bytes += (segment::RECORD_HEADER_BYTES + p.len()) as u64;
                        align_up(bytes) <= frame_room
                    })
                    .count()
                    .max(1);
                let batch = queue.pending.drain(..take).collect::<Vec<_>>();
                let taken: usize = batch.iter().map(|(_, p)| p.len()).sum();
                queue.pending_bytes -= taken;
                batch
            };
            if let Err(e) = self.flush(&mut active, &batch) {
                self.poison(e.to_string());
                return;
            }
        }
    }

    fn flush(&self, active: &mut Active, batch: &[(Lsn, Vec<u8>)]) -> Result<(), LogError> {
        let first = batch[0].0;
        let last = batch[batch.len() - 1].0;
        let needed = frame_bytes(batch.iter().map(|(_, p)| p.len()));
        if active.offset + needed > active.capacity {
            let next = self.new_segment(first)?;
            let old = std::mem::replace(active, next);
            self.queue.lock().closed.push(ClosedSegment {
                path: old.path,
                last: Lsn(first.0 - 1),
            });
        }
        let payloads: Vec<&[u8]> = batch.iter().map(|(_, p)| p.as_slice()).collect();
        let frame = encode_frame(active.salt, first, &payloads);
        let end = active.offset + frame.len() as u64;
        if end > active.prepared {
            // Zeros ahead, so that the next flushes overwrite blocks in place.
            let target = (end + PREPARE_BYTES).min(active.capacity).max(end);
            let zeros = vec![0; (target - active.prepared) as usize];
            active
                .file
                .write_at(active.prepared, &zeros)
                .map_err(io("prepare", &active.path))?;
            active.prepared = target;
        }
        active
            .file
            .write_at(active.offset, &frame)
            .map_err(io("write", &active.path))?;
        let started = Instant::now();
        active.file.sync_data().map_err(io("sync", &active.path))?;
        let fsync = started.elapsed();
        active.offset = end;
        let mut queue = self.queue.lock();
        queue.durable = last;
        queue
            .figures
            .flushed(batch.len() as u64, frame.len() as u64, last);
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut queue.waiters)
            .into_iter()
            .partition(|(lsn, _)| *lsn <= last);
        queue.waiters = waiting;
        drop(queue);
        for (_, waiter) in ready {
            let _ = waiter.send(true);
        }
        if let Some(stats) = self.stats.get() {
            stats.record_log_flush(fsync, batch.len());
        }
        self.durable_changed.notify_all();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::mem_disk::MemDisk;
    use super::*;

    fn open(disk: &MemDisk, segment_bytes: u64) -> (MetadataLog, Vec<(Lsn, Vec<u8>)>) {
        let dir = Path::new("/p/log");
        let recovery = MetadataLog::recover(disk, dir).unwrap();
        let records = recovery
            .records
            .iter()
            .map(|r| (r.lsn, r.body.clone()))
            .collect();
        let log = MetadataLog::start(
            Arc::new(disk.clone()),
            dir,
            recovery,
            Lsn(0),
            LogConfig { segment_bytes },
            Arc::new(Fence::open()),
        )
        .unwrap();
        (log, records)
    }

    fn append_durable(log: &MetadataLog, payload: &[u8]) -> Lsn {
        let lsn = log.append(payload.to_vec()).unwrap();
        log.wait_durable(lsn).unwrap();
        lsn
    }

    /// A disk that falls behind makes appends wait once `PENDING_BYTES_MAX` is queued,
    /// rather than letting records nobody waits for pile up in memory; they go on as
    /// soon as the flusher takes the queue.
    #[test]
    fn appends_wait_while_the_queue_is_full() {
        let disk = MemDisk::new();
        let (log, _) = open(&disk, SEGMENT_BYTES_DEFAULT);
        let log = Arc::new(log);
        // Lets syncs through again however the test ends, so that a failure fails
        // rather than leaving the flusher (and the log's drop) waiting forever.
        struct Stalled(MemDisk);
        impl Drop for Stalled {
            fn drop(&mut self) {
                self.0.stall_syncs(false);
            }
        }
        disk.stall_syncs(true);
        let stalled = Stalled(disk.clone());
        let record = 1 << 20;
        // The flusher takes a first batch (less than a segment) and stalls syncing it;
        // the queue then holds `PENDING_BYTES_MAX` and the next append waits.
        let appends = (PENDING_BYTES_MAX + SEGMENT_BYTES_DEFAULT as usize) / record + 4;
        let appender = {
            let log = log.clone();
            thread::spawn(move || {
                for _ in 0..appends {
                    log.append_state(&vec![7; record - 1], None).unwrap();
                }
            })
        };
        let full = Lsn((PENDING_BYTES_MAX / record + 2) as u64);
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        while log.next_lsn() < full {
            assert!(
                Instant::now() < deadline,
                "appends stopped at {}",
                log.next_lsn()
            );
            thread::yield_now();
        }
        // Given time, no append gets past a full queue while the disk is stalled.
        thread::sleep(std::time::Duration::from_millis(100));
        let stopped = log.next_lsn();
        thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(log.next_lsn(), stopped, "an append went past a full queue");
        assert!(
            !appender.is_finished(),
            "every append went through a stalled disk"
        );
        drop(stalled);
        appender.join().unwrap();
        let last = Lsn(appends as u64);
        log.wait_durable(last).unwrap();
        assert_eq!(log.next_lsn(), last.next());
    }

    /// A change and the records it queues ahead of itself (a promise on the file it
    /// makes) go to the disk in one flush: while a hold lasts the flusher takes nothing,
    /// however long it is given.
    #[test]
    fn records_appended_under_a_hold_go_to_the_disk_in_one_flush() {
        let disk = MemDisk::new();
        let (log, _) = open(&disk, SEGMENT_BYTES_DEFAULT);
        append_durable(&log, b"before");
        let flushes = log.stats().flushes;
        let held = log.hold();
        log.append_state(b"ahead", None).unwrap();
        // Time for an idle flusher to take the first record alone, were it allowed to.
        thread::sleep(std::time::Duration::from_millis(50));
        let last = log.append(b"change".to_vec()).unwrap();
        drop(held);
        log.wait_durable(last).unwrap();
        let stats = log.stats();
        assert_eq!(stats.flushes, flushes + 1, "{stats:?}");
        assert_eq!(stats.records, 3);
    }

    #[test]
    fn records_come_back_in_order_across_segments_and_reopens() {
        let disk = MemDisk::new();
        let (log, records) = open(&disk, 4 * BLOCK_BYTES);
        assert!(records.is_empty());
        for i in 0..10u8 {
            assert_eq!(append_durable(&log, &[i; 100]), Lsn(u64::from(i) + 1));
        }
        assert!(log.stats().segments_started >= 4, "{:?}", log.stats());
        drop(log);
        let (log, records) = open(&disk, 4 * BLOCK_BYTES);
        let lsns: Vec<u64> = records.iter().map(|(lsn, _)| lsn.0).collect();
        assert_eq!(lsns, (1..=10).collect::<Vec<_>>());
        assert_eq!(records[3].1, vec![3; 100]);
        assert_eq!(append_durable(&log, b"next"), Lsn(11));
    }

    /// A record's payload is its kind byte, then the body: 2 for a state record, 1
    /// for a storage batch; both come back with their kind.
    #[test]
    fn record_kind_golden_bytes() {
        let disk = MemDisk::new();
        let (log, _) = open(&disk, 1 << 20);
        let (done, durable) = oneshot::channel();
        assert_eq!(log.append_state(b"xy", Some(done)).unwrap(), Lsn(1));
        assert_eq!(durable.blocking_recv(), Ok(true));
        append_durable(&log, b"z");
        let bytes = disk
            .read(&Path::new("/p/log").join(segment_name(Lsn(1))))
            .unwrap();
        assert_eq!(&bytes[8..12], &[2, 0, 0, 0], "segment version");
        let record = &bytes[BLOCK_BYTES as usize + 32..][..19];
        assert_eq!(&record[0..4], &[3, 0, 0, 0], "length: kind byte and body");
        assert_eq!(&record[8..16], &[1, 0, 0, 0, 0, 0, 0, 0], "lsn");
        assert_eq!(&record[16..19], &[2, b'x', b'y'], "state record");
        let record = &bytes[2 * BLOCK_BYTES as usize + 32..][..18];
        assert_eq!(&record[0..4], &[2, 0, 0, 0]);
        assert_eq!(&record[16..18], &[1, b'z'], "storage record");
        drop(log);
        let recovery = MetadataLog::recover(&disk, Path::new("/p/log")).unwrap();
        let kinds: Vec<(RecordKind, Vec<u8>)> = recovery
            .records
            .into_iter()
            .map(|r| (r.kind, r.body))
            .collect();
        assert_eq!(
            kinds,
            [
                (RecordKind::State, b"xy".to_vec()),
                (RecordKind::Storage, b"z".to_vec())
            ]
        );
    }

    /// Segments written before state records joined the log (version 1: no kind byte)
    /// are read as storage batches.
    #[test]
    fn a_version_1_segment_is_read_as_storage_batches() {
        let disk = MemDisk::new();
        let dir = Path::new("/p/log");
        disk.create_dir_all(dir).unwrap();
        let mut bytes = SegmentHeader {
            version: SEGMENT_VERSION_STORAGE_ONLY,
            salt: 9,
            first_lsn: Lsn(1),
            capacity: 1 << 20,
        }
        .encode()
        .to_vec();
        bytes.resize(BLOCK_BYTES as usize, 0);
        bytes.extend_from_slice(&encode_frame(9, Lsn(1), &[b"redo"]));
        let path = dir.join(segment_name(Lsn(1)));
        let file = disk.open(&path, true).unwrap();
        file.write_at(0, &bytes).unwrap();
        file.sync_data().unwrap();
        disk.sync_dir(dir).unwrap();
        let recovery = MetadataLog::recover(&disk, dir).unwrap();
        assert_eq!(
            recovery.records,
            [LogRecord {
                lsn: Lsn(1),
                kind: RecordKind::Storage,
                body: b"redo".to_vec(),
            }]
        );
    }

    #[test]
    fn concurrent_appenders_share_flushes() {
        let disk = MemDisk::new();
        let (log, _) = open(&disk, 1 << 20);
        let log = Arc::new(log);
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let log = log.clone();
                thread::spawn(move || {
                    for _ in 0..20 {
                        append_durable(&log, b"change");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let figures = log.stats();
        assert_eq!(figures.records, 160);
        assert!(figures.flushes <= 160);
        assert_eq!(figures.durable_lsn, 160);
    }

    #[test]
    fn released_segments_are_reused_and_never_leave_a_gap() {
        let disk = MemDisk::new();
        let (log, _) = open(&disk, 3 * BLOCK_BYTES);
        for i in 0..12u8 {
            append_durable(&log, &[i; 10]);
        }
        log.release_below(Lsn(9)).unwrap();
        for i in 12..20u8 {
            append_durable(&log, &[i; 10]);
        }
        assert!(log.stats().segments_reused > 0);
        drop(log);
        let (_log, records) = open(&disk, 3 * BLOCK_BYTES);
        let lsns: Vec<u64> = records.iter().map(|(lsn, _)| lsn.0).collect();
        let first = lsns[0];
        assert!(first <= 9, "records from 9 on are kept: {lsns:?}");
        assert_eq!(lsns, (first..=20).collect::<Vec<_>>());
    }

    #[test]
    fn a_record_too_large_for_a_segment_is_refused() {
        let disk = MemDisk::new();
        let (log, _) = open(&disk, 2 * BLOCK_BYTES);
        let refused = log.append(vec![0; 2 * BLOCK_BYTES as usize]).unwrap_err();
        assert!(
            matches!(refused, LogError::RecordTooLarge { .. }),
            "{refused}"
        );
        append_durable(&log, &vec![1; 4000]);
    }

    #[test]
    fn a_failed_sync_poisons_the_log() {
        let disk = MemDisk::new();
        let (log, _) = open(&disk, 1 << 20);
        append_durable(&log, b"one");
        disk.crash_after(0);
        let lsn = log.append(b"two".to_vec()).unwrap();
        assert!(matches!(log.wait_durable(lsn), Err(LogError::Poisoned(_))));
        assert!(matches!(
            log.append(b"three".to_vec()),
            Err(LogError::Poisoned(_))
        ));
    }

    #[test]
    fn a_missing_segment_is_corruption() {
        let disk = MemDisk::new();
        let (log, _) = open(&disk, 2 * BLOCK_BYTES);
        for i in 0..4u8 {
            append_durable(&log, &[i; 10]);
        }
        drop(log);
        disk.remove_file(&Path::new("/p/log").join(segment_name(Lsn(2))))
            .unwrap();
        let refused = MetadataLog::recover(&disk, Path::new("/p/log")).unwrap_err();
        assert!(matches!(refused, LogError::Corrupt { .. }), "{refused}");
        assert!(
            refused.to_string().contains("records are missing"),
            "{refused}"
        );
    }
}
