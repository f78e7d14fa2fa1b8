//! Snapshot files: the caller's whole state as of one journal position, in checksummed
//! chunks.
//! Invariant: a snapshot file has its final name only once all of its bytes are durable,
//! so recovery never has to guess whether a snapshot is complete.

use std::path::{Path, PathBuf};

use proto::Epoch;

use crate::journal::segment::{read_u32, read_u64};
use crate::journal::{Damage, JournalError, Lsn, Vfs};

pub const SNAPSHOT_MAGIC: [u8; 8] = *b"HFSNAPST";
pub const SNAPSHOT_VERSION: u32 = 1;
pub const SNAPSHOT_HEADER_BYTES: usize = 44;
pub const CHUNK_HEADER_BYTES: usize = 8;
/// Chunk size this build writes.
pub const CHUNK_BYTES: u32 = 1 << 20;
/// Largest chunk size a reader accepts, so a damaged header cannot ask for a huge buffer.
pub const CHUNK_BYTES_MAX: u32 = 64 << 20;

const FILE_PREFIX: &str = "snapshot-";
const FILE_SUFFIX: &str = ".snap";
const TEMP_SUFFIX: &str = ".tmp";

/// The fixed fields at the start of a snapshot file. The layout (all integers
/// little-endian; drawn in `docs/on-disk-format.md`):
///
/// ```text
/// header (44 bytes): magic "HFSNAPST" | version u32 | chunk bytes u32 | epoch u64
///                    | lsn u64 | payload bytes u64
///                    | crc32c u32 (of the 40 bytes before it)
/// chunk (8 + len):   len u32 | crc32c u32 (of payload offset u64 LE, then the data)
///                    | data
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotHeader {
    /// Epoch of the server that wrote it.
    pub epoch: Epoch,
    /// The last journal record the snapshot covers.
    pub lsn: Lsn,
    pub payload_bytes: u64,
    pub chunk_bytes: u32,
}

impl SnapshotHeader {
    fn encode(&self) -> [u8; SNAPSHOT_HEADER_BYTES] {
        let mut out = [0u8; SNAPSHOT_HEADER_BYTES];
        out[0..8].copy_from_slice(&SNAPSHOT_MAGIC);
        out[8..12].copy_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&self.chunk_bytes.to_le_bytes());
        out[16..24].copy_from_slice(&self.epoch.0.to_le_bytes());
        out[24..32].copy_from_slice(&self.lsn.0.to_le_bytes());
        out[32..40].copy_from_slice(&self.payload_bytes.to_le_bytes());
        let crc = crc32c::crc32c(&out[0..40]);
        out[40..44].copy_from_slice(&crc.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Result<SnapshotHeader, Damage> {
        let header = bytes
            .get(..SNAPSHOT_HEADER_BYTES)
            .ok_or(Damage::Incomplete)?;
        if header[0..8] != SNAPSHOT_MAGIC {
            return Err(Damage::BadMagic);
        }
        if crc32c::crc32c(&header[0..40]) != read_u32(header, 40) {
            return Err(Damage::HeaderChecksum);
        }
        let version = read_u32(header, 8);
        if version != SNAPSHOT_VERSION {
            return Err(Damage::UnsupportedVersion(version));
        }
        let chunk_bytes = read_u32(header, 12);
        if chunk_bytes == 0 || chunk_bytes > CHUNK_BYTES_MAX {
            return Err(Damage::LengthTooLarge(u64::from(chunk_bytes)));
        }
        Ok(SnapshotHeader {
            chunk_bytes,
            epoch: Epoch(read_u64(header, 16)),
            lsn: Lsn(read_u64(header, 24)),
            payload_bytes: read_u64(header, 32),
        })
    }
}

fn chunk_crc(payload_offset: u64, data: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&payload_offset.to_le_bytes()), data)
}

/// Hands the file's bytes to `sink` piece by piece, without copying the payload.
fn encode_pieces<E>(
    header: &SnapshotHeader,
    payload: &[u8],
    sink: &mut dyn FnMut(&[u8]) -> Result<(), E>,
) -> Result<(), E> {
    sink(&header.encode())?;
    let mut offset = 0u64;
    for data in payload.chunks(header.chunk_bytes as usize) {
        let mut frame = [0u8; CHUNK_HEADER_BYTES];
        frame[0..4].copy_from_slice(&(data.len() as u32).to_le_bytes());
        frame[4..8].copy_from_slice(&chunk_crc(offset, data).to_le_bytes());
        sink(&frame)?;
        sink(data)?;
        offset += data.len() as u64;
    }
    Ok(())
}

/// Encodes a whole snapshot file in memory, with `chunk_bytes` per chunk (tests and tools;
/// the journal streams with [`CHUNK_BYTES`]).
pub fn encode(epoch: Epoch, lsn: Lsn, payload: &[u8], chunk_bytes: u32) -> Vec<u8> {
    assert!((1..=CHUNK_BYTES_MAX).contains(&chunk_bytes));
    let header = SnapshotHeader {
        epoch,
        lsn,
        payload_bytes: payload.len() as u64,
        chunk_bytes,
    };
    let mut out = Vec::with_capacity(SNAPSHOT_HEADER_BYTES + payload.len());
    let _ = encode_pieces::<()>(&header, payload, &mut |piece| {
        out.extend_from_slice(piece);
        Ok(())
    });
    out
}

/// Decodes a whole snapshot file. On damage, returns the byte offset of the damaged
/// structure. Allocates at most the size of `bytes`. Every chunk but the last holds
/// exactly `chunk bytes`, and the file ends after the last chunk.
pub fn decode(bytes: &[u8]) -> Result<(SnapshotHeader, Vec<u8>), (u64, Damage)> {
    let header = SnapshotHeader::decode(bytes).map_err(|damage| (0, damage))?;
    let capacity = usize::try_from(header.payload_bytes)
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    let mut payload = Vec::with_capacity(capacity);
    let mut at = SNAPSHOT_HEADER_BYTES;
    while (payload.len() as u64) < header.payload_bytes {
        let expected_len =
            (header.payload_bytes - payload.len() as u64).min(u64::from(header.chunk_bytes));
        let Some(frame) = bytes.get(at..at + CHUNK_HEADER_BYTES) else {
            return Err((at as u64, Damage::Incomplete));
        };
        let len = read_u32(frame, 0);
        if u64::from(len) != expected_len {
            return Err((at as u64, Damage::LengthTooLarge(u64::from(len))));
        }
        let start = at + CHUNK_HEADER_BYTES;
        let Some(data) = bytes.get(start..start + len as usize) else {
            return Err((at as u64, Damage::Incomplete));
        };
        if chunk_crc(payload.len() as u64, data) != read_u32(frame, 4) {
            return Err((at as u64, Damage::Checksum));
        }
        payload.extend_from_slice(data);
        at = start + data.len();
    }
    if at != bytes.len() {
        return Err((at as u64, Damage::TrailingBytes));
    }
    Ok((header, payload))
}

/// The file name of the snapshot at `lsn`; zero-padded so names sort by position.
pub fn file_name(lsn: Lsn) -> String {
    format!("{FILE_PREFIX}{:020}{FILE_SUFFIX}", lsn.0)
}

/// The position a snapshot file name claims, if `name` is one.
pub fn parse_file_name(name: &str) -> Option<Lsn> {
    let digits = name.strip_prefix(FILE_PREFIX)?.strip_suffix(FILE_SUFFIX)?;
    parse_digits(digits)
}

/// Whether `name` is a snapshot that was being written when the process stopped.
pub fn is_temp_file_name(name: &str) -> bool {
    name.strip_prefix(FILE_PREFIX)
        .and_then(|rest| rest.strip_suffix(TEMP_SUFFIX))
        .and_then(parse_digits)
        .is_some()
}

pub(crate) fn parse_digits(digits: &str) -> Option<Lsn> {
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().map(Lsn)
}

/// Writes the snapshot durably: temporary file, fsync, rename, directory fsync. Returns the
/// final path.
pub(crate) fn write_file(
    vfs: &dyn Vfs,
    dir: &Path,
    epoch: Epoch,
    lsn: Lsn,
    payload: &[u8],
) -> Result<PathBuf, JournalError> {
    let temp = dir.join(format!("{FILE_PREFIX}{:020}{TEMP_SUFFIX}", lsn.0));
    let path = dir.join(file_name(lsn));
    let file = vfs
        .create(&temp)
        .map_err(|e| JournalError::io("create snapshot", &temp, e))?;
    let header = SnapshotHeader {
        epoch,
        lsn,
        payload_bytes: payload.len() as u64,
        chunk_bytes: CHUNK_BYTES,
    };
    encode_pieces(&header, payload, &mut |piece| file.write_all(piece))
        .map_err(|e| JournalError::io("write snapshot", &temp, e))?;
    file.sync_data()
        .map_err(|e| JournalError::io("sync snapshot", &temp, e))?;
    vfs.rename(&temp, &path)
        .map_err(|e| JournalError::io("rename snapshot", &temp, e))?;
    vfs.sync_dir(dir)
        .map_err(|e| JournalError::io("sync directory", dir, e))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_over_several_chunks() {
        let payload: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let bytes = encode(Epoch(3), Lsn(42), &payload, 300);
        assert_eq!(
            bytes.len(),
            SNAPSHOT_HEADER_BYTES + 4 * CHUNK_HEADER_BYTES + 1000
        );
        let (header, decoded) = decode(&bytes).unwrap();
        assert_eq!(header.lsn, Lsn(42));
        assert_eq!(header.epoch, Epoch(3));
        assert_eq!(decoded, payload);
    }

    #[test]
    fn empty_payload_has_no_chunks() {
        let bytes = encode(Epoch(1), Lsn(0), b"", 16);
        assert_eq!(bytes.len(), SNAPSHOT_HEADER_BYTES);
        assert_eq!(decode(&bytes).unwrap().1, b"");
    }

    #[test]
    fn damage_is_located() {
        let payload = vec![9u8; 100];
        let mut bytes = encode(Epoch(1), Lsn(5), &payload, 40);
        let second_chunk = SNAPSHOT_HEADER_BYTES + CHUNK_HEADER_BYTES + 40;
        bytes[second_chunk + CHUNK_HEADER_BYTES + 3] ^= 1;
        assert_eq!(decode(&bytes), Err((second_chunk as u64, Damage::Checksum)));
        let whole = encode(Epoch(1), Lsn(5), &payload, 40);
        assert_eq!(
            decode(&whole[..whole.len() - 1]),
            Err(((second_chunk + 48) as u64, Damage::Incomplete))
        );
        let mut longer = whole.clone();
        longer.push(0);
        assert_eq!(
            decode(&longer),
            Err((whole.len() as u64, Damage::TrailingBytes))
        );
    }

    #[test]
    fn names_sort_by_position() {
        assert_eq!(file_name(Lsn(7)), "snapshot-00000000000000000007.snap");
        assert_eq!(
            parse_file_name(&file_name(Lsn(u64::MAX))),
            Some(Lsn(u64::MAX))
        );
        assert_eq!(parse_file_name("snapshot-7.snap"), None);
        assert!(is_temp_file_name("snapshot-00000000000000000007.tmp"));
    }
}
