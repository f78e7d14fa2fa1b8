//! Recovery: from the files in a journal directory to the newest valid snapshot and the
//! records after it.
//! Invariant: every record an earlier process saw durable comes back, in order and
//! gap-free, or recovery fails; only an interrupted write at the very end is repaired.

use std::path::{Path, PathBuf};

use proto::Epoch;
use tracing::warn;

use crate::journal::segment::{self, SEGMENT_HEADER_BYTES, ScanEnd};
use crate::journal::snapshot;
use crate::journal::{Damage, JournalError, Lsn, Vfs};

const SEGMENT_PREFIX: &str = "segment-";
const SEGMENT_SUFFIX: &str = ".journal";

/// The name of the segment whose first record is `first_lsn`; zero-padded to sort in order.
pub(crate) fn segment_file_name(first_lsn: Lsn) -> String {
    format!("{SEGMENT_PREFIX}{:020}{SEGMENT_SUFFIX}", first_lsn.0)
}

fn parse_segment_file_name(name: &str) -> Option<Lsn> {
    let digits = name
        .strip_prefix(SEGMENT_PREFIX)?
        .strip_suffix(SEGMENT_SUFFIX)?;
    snapshot::parse_digits(digits)
}

/// The state recovered when a journal is opened.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// The newest valid snapshot, if any.
    pub snapshot: Option<RecoveredSnapshot>,
    /// The records after the snapshot (or all records, without one), in order.
    pub records: Vec<(Lsn, Vec<u8>)>,
}

/// A snapshot read back from disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveredSnapshot {
    /// The last record the snapshot covers.
    pub lsn: Lsn,
    /// Epoch of the server that wrote it.
    pub epoch: Epoch,
    pub payload: Vec<u8>,
}

/// A segment file that survived recovery.
#[derive(Clone, Debug)]
pub(crate) struct SegmentFile {
    pub path: PathBuf,
    pub first_lsn: Lsn,
    /// The last record it holds; `first_lsn - 1` when it holds none.
    pub last_lsn: Lsn,
    pub bytes: u64,
}

pub(crate) struct Outcome {
    pub recovered: Recovered,
    pub segments: Vec<SegmentFile>,
    /// The position the next record follows: the last record or the snapshot, whichever is
    /// later (a snapshot may cover records that never became durable in a segment).
    pub last_lsn: Lsn,
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> JournalError {
    move |e| JournalError::io(op, path, e)
}

fn corrupt(path: &Path, offset: u64, reason: Damage) -> JournalError {
    JournalError::Corrupt {
        path: path.to_path_buf(),
        offset,
        reason,
    }
}

/// Reads `dir`. With `repair`, also truncates a torn tail, removes a torn last segment and
/// removes leftover temporary snapshot files; without it, changes nothing.
pub(crate) fn recover(vfs: &dyn Vfs, dir: &Path, repair: bool) -> Result<Outcome, JournalError> {
    let names = vfs.list(dir).map_err(io("list", dir))?;
    let mut snapshots: Vec<(Lsn, PathBuf)> = Vec::new();
    let mut segments: Vec<(Lsn, PathBuf)> = Vec::new();
    for name in &names {
        let path = dir.join(name);
        if let Some(lsn) = snapshot::parse_file_name(name) {
            snapshots.push((lsn, path));
        } else if let Some(lsn) = parse_segment_file_name(name) {
            segments.push((lsn, path));
        } else if snapshot::is_temp_file_name(name) && repair {
            // An interrupted snapshot: it was never renamed, so nothing depends on it.
            vfs.remove(&path).map_err(io("remove", &path))?;
        }
    }
    snapshots.sort();
    segments.sort();

    let mut recovered = Recovered::default();
    for (lsn, path) in snapshots.iter().rev() {
        let bytes = vfs.read(path).map_err(io("read", path))?;
        match snapshot::decode(&bytes) {
            Ok((header, payload)) if header.lsn == *lsn => {
                recovered.snapshot = Some(RecoveredSnapshot {
                    lsn: header.lsn,
                    epoch: header.epoch,
                    payload,
                });
                break;
            }
            Ok(_) => {
                warn!(path = %path.display(), "snapshot name disagrees with its header; trying an older one")
            }
            // Falling back is safe: if the older snapshot lacks segments the newer one made
            // redundant, the sequence check below reports the gap.
            Err((offset, damage)) => {
                warn!(path = %path.display(), offset, %damage, "damaged snapshot; trying an older one")
            }
        }
    }
    let snapshot_lsn = recovered.snapshot.as_ref().map_or(Lsn(0), |s| s.lsn);

    let mut kept = Vec::new();
    let mut expected: Option<Lsn> = None;
    let segment_count = segments.len();
    for (index, (name_lsn, path)) in segments.iter().enumerate() {
        let is_last = index + 1 == segment_count;
        let bytes = vfs.read(path).map_err(io("read", path))?;
        let scan = match segment::scan_segment(&bytes) {
            Ok(scan) => scan,
            // A segment is synced with its header before any record goes into it, so a last
            // segment no longer than a header was being created when the process stopped.
            Err(damage) if is_last && bytes.len() <= SEGMENT_HEADER_BYTES => {
                warn!(path = %path.display(), %damage, "removing a segment whose creation was interrupted");
                if repair {
                    vfs.remove(path).map_err(io("remove", path))?;
                    vfs.sync_dir(dir).map_err(io("sync directory", dir))?;
                }
                continue;
            }
            Err(damage) => return Err(corrupt(path, 0, damage)),
        };
        let first = scan.header.first_lsn;
        if first != *name_lsn {
            return Err(corrupt(path, 0, Damage::NameMismatch));
        }
        // Records must follow on from the previous segment, except across a stretch the
        // snapshot covers (a process that restarts after a snapshot beyond its durable records
        // starts its new segment after the snapshot).
        let from = expected.unwrap_or(Lsn(1));
        let covered = first > from && first <= snapshot_lsn.next();
        if first != from && !covered {
            return Err(corrupt(
                path,
                0,
                Damage::Sequence {
                    expected: from,
                    found: first,
                },
            ));
        }
        match scan.end {
            ScanEnd::Clean => {}
            ScanEnd::Torn { offset, damage } if is_last => warn!(
                path = %path.display(), offset, %damage,
                dropped_bytes = bytes.len() as u64 - scan.valid_bytes,
                "truncating a torn record at the end of the journal"
            ),
            ScanEnd::Torn { offset, damage } | ScanEnd::Corrupt { offset, damage } => {
                return Err(corrupt(path, offset, damage));
            }
        }
        if is_last && repair {
            // Also syncs: the previous process may have left records it never synced (`none`
            // mode), and once a new segment follows this one, this one's tail can no longer
            // be treated as torn.
            vfs.truncate(path, scan.valid_bytes)
                .map_err(io("truncate", path))?;
        }
        let last = scan
            .records
            .last()
            .map_or(Lsn(first.0.saturating_sub(1)), |r| r.lsn);
        for record in &scan.records {
            if record.lsn > snapshot_lsn {
                recovered
                    .records
                    .push((record.lsn, bytes[record.payload.clone()].to_vec()));
            }
        }
        expected = Some(last.next());
        kept.push(SegmentFile {
            path: path.clone(),
            first_lsn: first,
            last_lsn: last,
            bytes: scan.valid_bytes,
        });
    }
    let records_last = expected.map_or(Lsn(0), |next| Lsn(next.0.saturating_sub(1)));
    Ok(Outcome {
        recovered,
        segments: kept,
        last_lsn: records_last.max(snapshot_lsn),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_round_trip() {
        assert_eq!(
            segment_file_name(Lsn(12)),
            "segment-00000000000000000012.journal"
        );
        assert_eq!(
            parse_segment_file_name(&segment_file_name(Lsn(12))),
            Some(Lsn(12))
        );
        assert_eq!(parse_segment_file_name("segment-12.journal"), None);
    }
}
