//! State snapshots beside the metadata log: the callback, lock and client state as of one
//! log position, in `PARTITION/log/state-<lsn>.snap` (the state crate's chunked snapshot
//! format), written temp + sync + rename + directory sync.
//! Invariant: a snapshot has its final name only once all its bytes are durable, and
//! only once every record up to its position is durable in the log.

use std::path::{Path, PathBuf};

use proto::Epoch;
use state::journal::snapshot::{CHUNK_BYTES, decode, encode};

use super::{LogError, Lsn, io, read_all};
use crate::storage::disk::Disk;

const PREFIX: &str = "state-";
const SUFFIX: &str = ".snap";
/// A snapshot being written: removed at open.
pub(super) const TEMP: &str = "state-snapshot.tmp";

/// A state snapshot read back from the log's directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateSnapshotFile {
    /// The last log record the snapshot covers.
    pub lsn: Lsn,
    /// Epoch of the term that wrote it.
    pub epoch: Epoch,
    /// The encoded state (opaque here).
    pub payload: Vec<u8>,
}

/// The name of the snapshot at `lsn`; zero-padded so that names sort by position.
fn file_name(lsn: Lsn) -> String {
    format!("{PREFIX}{:020}{SUFFIX}", lsn.0)
}

fn parse_file_name(name: &str) -> Option<Lsn> {
    let digits = name.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok().map(Lsn))
        .flatten()
}

/// The snapshots in `dir`, oldest first.
fn list(disk: &dyn Disk, dir: &Path) -> Result<Vec<(Lsn, PathBuf)>, LogError> {
    let mut found: Vec<(Lsn, PathBuf)> = disk
        .list(dir)
        .map_err(io("list", dir))?
        .into_iter()
        .filter_map(|name| parse_file_name(&name).map(|lsn| (lsn, dir.join(name))))
        .collect();
    found.sort();
    Ok(found)
}

/// The newest snapshot in `dir`, if any. It was named only once durable, so damage in
/// it is `Corrupt` (file and offset), never a reason to fall back to an older one.
pub fn newest(disk: &dyn Disk, dir: &Path) -> Result<Option<StateSnapshotFile>, LogError> {
    let Some((lsn, path)) = list(disk, dir)?.pop() else {
        return Ok(None);
    };
    let bytes = read_all(disk, &path)?;
    let (header, payload) = decode(&bytes).map_err(|(offset, damage)| LogError::Corrupt {
        path: path.clone(),
        offset,
        detail: damage.to_string(),
    })?;
    if header.lsn != lsn {
        return Err(LogError::Corrupt {
            path,
            offset: 0,
            detail: format!("the header says record {}, the name {lsn}", header.lsn),
        });
    }
    Ok(Some(StateSnapshotFile {
        lsn,
        epoch: header.epoch,
        payload,
    }))
}

/// Writes `payload` as the snapshot at `lsn` durably, then removes the older ones. The
/// caller made every record up to `lsn` durable first.
pub fn write(
    disk: &dyn Disk,
    dir: &Path,
    epoch: Epoch,
    lsn: Lsn,
    payload: &[u8],
) -> Result<(), LogError> {
    let temp = dir.join(TEMP);
    let path = dir.join(file_name(lsn));
    let bytes = encode(epoch, lsn, payload, CHUNK_BYTES);
    let file = disk.open(&temp, true).map_err(io("create", &temp))?;
    file.set_len(0).map_err(io("truncate", &temp))?;
    file.write_at(0, &bytes).map_err(io("write", &temp))?;
    file.sync_data().map_err(io("sync", &temp))?;
    disk.rename(&temp, &path).map_err(io("name", &path))?;
    disk.sync_dir(dir).map_err(io("sync", dir))?;
    let older: Vec<PathBuf> = list(disk, dir)?
        .into_iter()
        .filter(|(at, _)| *at < lsn)
        .map(|(_, path)| path)
        .collect();
    if !older.is_empty() {
        for path in &older {
            disk.remove_file(path).map_err(io("remove", path))?;
        }
        disk.sync_dir(dir).map_err(io("sync", dir))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::super::mem_disk::MemDisk;
    use super::*;

    #[test]
    fn the_newest_snapshot_replaces_the_older_ones() {
        let disk = MemDisk::new();
        let dir = Path::new("/p/log");
        disk.create_dir_all(dir).unwrap();
        assert_eq!(newest(&disk, dir).unwrap(), None);
        write(&disk, dir, Epoch(1), Lsn(5), b"five").unwrap();
        write(&disk, dir, Epoch(2), Lsn(9), b"nine").unwrap();
        let found = newest(&disk, dir).unwrap().unwrap();
        assert_eq!((found.lsn, found.epoch), (Lsn(9), Epoch(2)));
        assert_eq!(found.payload, b"nine");
        assert_eq!(list(&disk, dir).unwrap().len(), 1);
        assert_eq!(file_name(Lsn(7)), "state-00000000000000000007.snap");
    }

    #[test]
    fn a_damaged_snapshot_is_corruption() {
        let disk = MemDisk::new();
        let dir = Path::new("/p/log");
        disk.create_dir_all(dir).unwrap();
        write(&disk, dir, Epoch(1), Lsn(3), b"three").unwrap();
        let path = dir.join(file_name(Lsn(3)));
        let mut bytes = disk.read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        disk.overwrite(&path, bytes).unwrap();
        let refused = newest(&disk, dir).unwrap_err();
        assert!(matches!(refused, LogError::Corrupt { .. }), "{refused}");
    }
}
