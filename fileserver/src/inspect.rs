//! `holdfast state inspect`: what a partition's callback, lock and client state is (the
//! newest state snapshot beside the metadata log and the state records after it, or a
//! not yet migrated journal of an earlier version), rebuilt with the same replay the
//! server runs on start, like OpenAFS's state_analyzer summary.
//! Invariant: read-only: it never repairs a torn tail or removes a file, so it may look
//! at a running server's partition.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};

use proto::{ByteRange, ClientId, Epoch, Fid, InstanceNonce, LockKind, LockOwnerId};
use serde::{Serialize, Serializer};
use state::journal::segment::{SEGMENT_HEADER_BYTES, SegmentHeader};
use state::journal::{JournalSpan, Recovered};
use state::journaled::{LockEntry, Owed, ReplayError, StateSnapshot, replay};
use state::{ClientKey, JournalError, Lsn};
use thiserror::Error;

use crate::fence::Fence;
use crate::state_journal::STATE_DIR;
use crate::storage::disk::{Disk, OsDisk};
use crate::storage::metadata_log::{LOG_DIR, LogError, MetadataLog, Recovery, StateRecovery};

/// Fids of a client's promises listed in a report; beyond this only the count is given.
pub const CALLBACK_FIDS_LISTED_MAX: usize = 20;
/// A running server's snapshot may remove a segment while it is being read: read again.
const READ_ATTEMPTS: usize = 3;

/// Why a partition's state could not be inspected.
#[derive(Debug, Error)]
pub enum InspectError {
    #[error("{} has no fileserver state (no {LOG_DIR}/ directory); is it a partition?", path.display())]
    NoState { path: PathBuf },
    /// I/O failure or damage of the metadata log or a state snapshot (`Corrupt` names
    /// the file and byte offset).
    #[error(transparent)]
    Log(#[from] LogError),
    /// I/O failure or damage (`Corrupt` names the file and byte offset).
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The journal's frames are sound but a record or snapshot does not decode or apply.
    #[error(transparent)]
    Replay(#[from] ReplayError),
}

/// Everything `inspect` found, for text or JSON output: the epoch, the journal's span
/// and snapshot position, the clients with their locks and callback promises, and the
/// breaks owed.
#[derive(Clone, Debug, Serialize)]
pub struct StateReport {
    /// Where the state lives: the partition's log directory (or the journal directory
    /// of an earlier version, not yet migrated).
    pub state_dir: PathBuf,
    /// Epoch of the term that wrote the newest snapshot (of an earlier version's
    /// journal: of its newest segment's writer); `None` without one.
    pub epoch: Option<Epoch>,
    pub journal: JournalReport,
    pub counts: Counts,
    /// Sorted by client id.
    pub clients: Vec<ClientReport>,
    /// Promises held under a client key no client entry names (should be none).
    pub orphan_callback_count: usize,
}

/// The span of the log (every record kind) on disk, and the state's part of it.
#[derive(Clone, Debug, Serialize)]
pub struct JournalReport {
    #[serde(serialize_with = "lsn")]
    pub first: Lsn,
    #[serde(serialize_with = "lsn")]
    pub last: Lsn,
    /// Durable as far as the files show: everything read back from them.
    #[serde(serialize_with = "lsn")]
    pub durable: Lsn,
    pub segment_count: usize,
    pub segment_bytes: u64,
    /// The newest snapshot's position.
    #[serde(serialize_with = "optional_lsn")]
    pub snapshot: Option<Lsn>,
    /// State records after the snapshot that replay applies.
    pub records_after_snapshot: usize,
}

/// Table sizes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub clients: usize,
    pub callback_promises: usize,
    pub locks: usize,
    /// Clients owed breaks (delayed because they were unreachable, or in flight at the
    /// crash), and of those, how many are owed a whole reset.
    pub clients_owed_breaks: usize,
    pub clients_owed_reset: usize,
    pub owed_break_fids: usize,
}

/// One known client.
#[derive(Clone, Debug, Serialize)]
pub struct ClientReport {
    pub client: ClientId,
    pub instance: InstanceNonce,
    /// The client key of the process that wrote the journal.
    pub key: ClientKey,
    pub locks: Vec<LockReport>,
    pub callback_count: usize,
    /// The first [`CALLBACK_FIDS_LISTED_MAX`] fids of its promises, in fid order.
    pub callback_fids: Vec<Fid>,
    pub owed: Option<OwedReport>,
}

/// A granted byte-range lock; in JSON its range is `start` and `end` (exclusive,
/// `u64::MAX` means to end of file).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LockReport {
    pub fid: Fid,
    pub owner: LockOwnerId,
    #[serde(flatten)]
    pub range: ByteRange,
    pub kind: LockKind,
    pub pid: u32,
}

/// What a client is owed on its return.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OwedReport {
    Reset,
    Breaks { fid_count: usize },
}

fn lsn<S: Serializer>(lsn: &Lsn, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_u64(lsn.0)
}

fn optional_lsn<S: Serializer>(lsn: &Option<Lsn>, serializer: S) -> Result<S::Ok, S::Error> {
    match lsn {
        Some(lsn) => serializer.serialize_some(&lsn.0),
        None => serializer.serialize_none(),
    }
}

/// Reads `partition`'s state (its newest state snapshot and the state records of the
/// metadata log after it) and rebuilds its tables as a restart would, without changing
/// anything on disk. A partition whose state journal of an earlier version was not
/// migrated yet (no server of this version opened it) is read in that form.
pub fn inspect(partition: &Path) -> Result<StateReport, InspectError> {
    let old = partition.join(STATE_DIR);
    let dir = partition.join(LOG_DIR);
    if old.is_dir() && !has_state_snapshot(&dir) {
        return inspect_earlier_version(old);
    }
    if !dir.is_dir() {
        return Err(InspectError::NoState {
            path: partition.to_path_buf(),
        });
    }
    // Read-only: the fence is never asked.
    let disk = OsDisk::new(std::sync::Arc::new(Fence::open()));
    let (log, state) = read_log(&disk, &dir)?;
    let journal = JournalReport {
        first: log.first(),
        last: log.last,
        durable: log.last,
        segment_count: log.segment_count(),
        segment_bytes: segment_bytes(&dir),
        snapshot: state.snapshot.as_ref().map(|s| s.lsn),
        records_after_snapshot: state.records.len(),
    };
    let epoch = state.snapshot.as_ref().map(|s| s.epoch);
    let recovered = Recovered {
        snapshot: state.snapshot.map(|s| state::journal::RecoveredSnapshot {
            lsn: s.lsn,
            epoch: s.epoch,
            payload: s.payload,
        }),
        records: state.records.into_iter().map(|r| (r.lsn, r.body)).collect(),
    };
    let (replayed, _) = replay(&recovered)?;
    Ok(report(dir, epoch, journal, replayed))
}

fn has_state_snapshot(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().ends_with(".snap"))
    })
}

/// The log and the state's part of it. A running server may release a segment or
/// replace a snapshot while they are read: read again.
fn read_log(disk: &dyn Disk, dir: &Path) -> Result<(Recovery, StateRecovery), LogError> {
    let mut attempt = 1;
    loop {
        let read = MetadataLog::read(disk, dir)
            .and_then(|log| StateRecovery::read(disk, dir, &log).map(|state| (log, state)));
        match read {
            Err(LogError::Io { source, .. })
                if source.kind() == ErrorKind::NotFound && attempt < READ_ATTEMPTS =>
            {
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Bytes of the log's segments.
fn segment_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("segment-"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// A journal of an earlier version, in `PARTITION/state/`.
fn inspect_earlier_version(dir: PathBuf) -> Result<StateReport, InspectError> {
    let (span, recovered) = read_journal(&dir)?;
    let (state, _) = replay(&recovered)?;
    let epoch = newest_segment_epoch(&dir).or(recovered.snapshot.as_ref().map(|s| s.epoch));
    let journal = JournalReport {
        first: span.first,
        last: span.last,
        durable: span.durable,
        segment_count: span.segment_count,
        segment_bytes: span.segment_bytes,
        snapshot: span.snapshot,
        records_after_snapshot: recovered.records.len(),
    };
    Ok(report(dir, epoch, journal, state))
}

fn read_journal(dir: &Path) -> Result<(JournalSpan, Recovered), JournalError> {
    let mut attempt = 1;
    loop {
        match state::journal::inspect(dir) {
            Err(JournalError::Io { source, .. })
                if source.kind() == ErrorKind::NotFound && attempt < READ_ATTEMPTS =>
            {
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// The epoch in the header of the segment with the highest first position, if readable.
fn newest_segment_epoch(dir: &Path) -> Option<Epoch> {
    let newest = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("segment-") && name.ends_with(".journal"))
        .max()?;
    let mut header = [0u8; SEGMENT_HEADER_BYTES];
    std::fs::File::open(dir.join(newest))
        .ok()?
        .read_exact(&mut header)
        .ok()?;
    SegmentHeader::decode(&header).ok().map(|h| h.epoch)
}

fn report(
    state_dir: PathBuf,
    epoch: Option<Epoch>,
    journal: JournalReport,
    state: StateSnapshot,
) -> StateReport {
    let mut promises: BTreeMap<ClientKey, BTreeSet<Fid>> = BTreeMap::new();
    for &(fid, key) in state.callbacks.promises.keys() {
        promises.entry(key).or_default().insert(fid);
    }
    let mut locks: BTreeMap<ClientKey, Vec<LockReport>> = BTreeMap::new();
    for &LockEntry { fid, lock, pid } in &state.locks {
        locks
            .entry(lock.owner.client)
            .or_default()
            .push(LockReport {
                fid,
                owner: lock.owner.owner,
                range: lock.range,
                kind: lock.kind,
                pid,
            });
    }
    let mut counts = Counts {
        clients: state.clients.len(),
        callback_promises: state.callbacks.promises.len(),
        locks: state.locks.len(),
        ..Counts::default()
    };
    for owed in state.callbacks.owed.values() {
        counts.clients_owed_breaks += 1;
        match owed {
            Owed::Reset => counts.clients_owed_reset += 1,
            Owed::Fids(fids) => counts.owed_break_fids += fids.len(),
        }
    }
    let mut clients: Vec<ClientReport> = state
        .clients
        .iter()
        .map(|entry| {
            let fids = promises.remove(&entry.key).unwrap_or_default();
            ClientReport {
                client: entry.client,
                instance: entry.instance,
                key: entry.key,
                locks: locks.remove(&entry.key).unwrap_or_default(),
                callback_count: fids.len(),
                callback_fids: fids.into_iter().take(CALLBACK_FIDS_LISTED_MAX).collect(),
                owed: state.callbacks.owed.get(&entry.key).map(|owed| match owed {
                    Owed::Reset => OwedReport::Reset,
                    Owed::Fids(fids) => OwedReport::Breaks {
                        fid_count: fids.len(),
                    },
                }),
            }
        })
        .collect();
    clients.sort_by_key(|c| (c.client, c.key));
    StateReport {
        state_dir,
        epoch,
        journal,
        counts,
        clients,
        orphan_callback_count: promises.values().map(BTreeSet::len).sum(),
    }
}

/// The report as a person reads it.
pub fn render_text(report: &StateReport) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write_text(report, &mut out);
    out
}

fn write_text(report: &StateReport, out: &mut String) -> std::fmt::Result {
    let journal = &report.journal;
    writeln!(out, "state directory: {}", report.state_dir.display())?;
    match report.epoch {
        Some(epoch) => writeln!(out, "epoch: {epoch}")?,
        None => writeln!(out, "epoch: none (empty journal)")?,
    }
    writeln!(
        out,
        "journal: records {}..={}, durable to {}, {} segment(s), {} bytes",
        journal.first, journal.last, journal.durable, journal.segment_count, journal.segment_bytes
    )?;
    match journal.snapshot {
        Some(at) => writeln!(
            out,
            "snapshot: at {at}, {} record(s) replayed after it",
            journal.records_after_snapshot
        )?,
        None => writeln!(
            out,
            "snapshot: none, {} record(s) replayed",
            journal.records_after_snapshot
        )?,
    }
    let counts = &report.counts;
    writeln!(
        out,
        "counts: {} client(s), {} callback promise(s), {} lock(s)",
        counts.clients, counts.callback_promises, counts.locks
    )?;
    writeln!(
        out,
        "delayed breaks: {} client(s) owed breaks ({} a reset), {} fid(s) owed",
        counts.clients_owed_breaks, counts.clients_owed_reset, counts.owed_break_fids
    )?;
    if report.orphan_callback_count > 0 {
        writeln!(
            out,
            "orphan promises (no client entry): {}",
            report.orphan_callback_count
        )?;
    }
    for client in &report.clients {
        writeln!(out)?;
        writeln!(
            out,
            "client {} instance {} (key {})",
            client.client, client.instance, client.key.0
        )?;
        match &client.owed {
            Some(OwedReport::Reset) => writeln!(out, "  owed: reset")?,
            Some(OwedReport::Breaks { fid_count }) => {
                writeln!(out, "  owed: {fid_count} break(s)")?
            }
            None => {}
        }
        writeln!(out, "  locks: {}", client.locks.len())?;
        for lock in &client.locks {
            let kind = match lock.kind {
                LockKind::Shared => "shared",
                LockKind::Exclusive => "exclusive",
            };
            writeln!(
                out,
                "    {} owner {} {} {kind} pid {}",
                lock.fid, lock.owner, lock.range, lock.pid
            )?;
        }
        write!(out, "  callbacks: {}", client.callback_count)?;
        if !client.callback_fids.is_empty() {
            let fids: Vec<String> = client.callback_fids.iter().map(Fid::to_string).collect();
            let more = if client.callback_count > client.callback_fids.len() {
                " ..."
            } else {
                ""
            };
            write!(out, " ({}{more})", fids.join(" "))?;
        }
        writeln!(out)?;
    }
    Ok(())
}
