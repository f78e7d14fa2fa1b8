//! `holdfast state inspect`: what a partition's state journal holds, rebuilt with the
//! same replay the server runs on start, like OpenAFS's state_analyzer summary.
//! Invariant: read-only: it never takes the journal's directory lock, repairs a torn tail
//! or removes a file, so it may look at a running server's partition.

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

use crate::state_journal::STATE_DIR;

/// Fids of a client's promises listed in a report; beyond this only the count is given.
pub const CALLBACK_FIDS_LISTED_MAX: usize = 20;
/// A running server's snapshot may remove a segment while it is being read: read again.
const READ_ATTEMPTS: usize = 3;

/// Why a partition's state could not be inspected.
#[derive(Debug, Error)]
pub enum InspectError {
    #[error("{} has no fileserver state (no {STATE_DIR}/ directory); is it a partition?", path.display())]
    NoState { path: PathBuf },
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
    pub state_dir: PathBuf,
    /// Epoch of the newest segment's writer (or of the snapshot's, without a readable
    /// segment header); `None` for an empty journal.
    pub epoch: Option<Epoch>,
    pub journal: JournalReport,
    pub counts: Counts,
    /// Sorted by client id.
    pub clients: Vec<ClientReport>,
    /// Promises held under a client key no client entry names (should be none).
    pub orphan_callback_count: usize,
}

/// The span of the journal on disk.
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
    /// Records after the snapshot that replay applies.
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

/// Reads `partition`'s state journal and rebuilds its tables as a restart would, without
/// changing anything on disk.
pub fn inspect(partition: &Path) -> Result<StateReport, InspectError> {
    let dir = partition.join(STATE_DIR);
    if !dir.is_dir() {
        return Err(InspectError::NoState {
            path: partition.to_path_buf(),
        });
    }
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
