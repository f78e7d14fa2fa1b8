//! Segment file format: the header and the record frames, encoded and decoded without
//! I/O.
//! Invariant: the decoder never panics nor allocates from a length it read; each record
//! it returns passed its checksum and is numbered one after its predecessor.

use std::ops::Range;

use proto::Epoch;

use crate::journal::Lsn;
use crate::journal::error::Damage;

pub const SEGMENT_MAGIC: [u8; 8] = *b"HFJOURNL";
pub const SEGMENT_VERSION: u32 = 1;
pub const SEGMENT_HEADER_BYTES: usize = 32;
pub const RECORD_HEADER_BYTES: usize = 16;
/// Largest payload a record may carry. A fixed format constant, not a setting, so that a
/// length field beyond it is recognisable as damage whatever the configuration of the reader.
pub const RECORD_BYTES_MAX: usize = 16 << 20;

/// The first bytes of every segment file. The layout (all integers little-endian; drawn
/// in `docs/on-disk-format.md`):
///
/// ```text
/// header (32 bytes): magic "HFJOURNL" | version u32 | epoch u64 | first lsn u64
///                    | crc32c u32 (of the 28 bytes before it)
/// record (16 + len): len u32 | crc32c u32 | lsn u64 | payload[len]
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Epoch of the server that created the segment.
    pub epoch: Epoch,
    /// Sequence number of the segment's first record (or of the next record, if empty).
    pub first_lsn: Lsn,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_BYTES] {
        let mut out = [0u8; SEGMENT_HEADER_BYTES];
        out[0..8].copy_from_slice(&SEGMENT_MAGIC);
        out[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
        out[12..20].copy_from_slice(&self.epoch.0.to_le_bytes());
        out[20..28].copy_from_slice(&self.first_lsn.0.to_le_bytes());
        let crc = crc32c::crc32c(&out[0..28]);
        out[28..32].copy_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<SegmentHeader, Damage> {
        let header = bytes
            .get(..SEGMENT_HEADER_BYTES)
            .ok_or(Damage::Incomplete)?;
        if header[0..8] != SEGMENT_MAGIC {
            return Err(Damage::BadMagic);
        }
        if crc32c::crc32c(&header[0..28]) != read_u32(header, 28) {
            return Err(Damage::HeaderChecksum);
        }
        let version = read_u32(header, 8);
        if version != SEGMENT_VERSION {
            return Err(Damage::UnsupportedVersion(version));
        }
        Ok(SegmentHeader {
            epoch: Epoch(read_u64(header, 12)),
            first_lsn: Lsn(read_u64(header, 20)),
        })
    }
}

/// Appends one framed record to `out`. The caller bounds `payload` by [`RECORD_BYTES_MAX`].
pub fn encode_record(lsn: Lsn, payload: &[u8], out: &mut Vec<u8>) {
    assert!(
        payload.len() <= RECORD_BYTES_MAX,
        "caller checks the record size"
    );
    let len = (payload.len() as u32).to_le_bytes();
    let lsn = lsn.0.to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&record_crc(&len, &lsn, payload).to_le_bytes());
    out.extend_from_slice(&lsn);
    out.extend_from_slice(payload);
}

/// A record's checksum covers its length, its lsn and its payload.
fn record_crc(len: &[u8], lsn: &[u8], payload: &[u8]) -> u32 {
    let crc = crc32c::crc32c(len);
    let crc = crc32c::crc32c_append(crc, lsn);
    crc32c::crc32c_append(crc, payload)
}

/// One record found by [`scan_segment`]: its sequence number and where its payload lies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScannedRecord {
    pub lsn: Lsn,
    pub payload: Range<usize>,
}

/// How the bytes after the last good record look.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScanEnd {
    /// The last good record ends exactly at the end of the bytes.
    Clean,
    /// What follows could be an interrupted append: a frame cut short, or a frame with a bad
    /// checksum followed by nothing but zeros (a file system may zero-fill a torn extent).
    /// Only acceptable at the end of the last segment.
    Torn { offset: u64, damage: Damage },
    /// What follows cannot be an interrupted append: a valid frame with the wrong sequence
    /// number, an impossible length, or a bad checksum with data after it.
    Corrupt { offset: u64, damage: Damage },
}

/// The result of reading a segment's bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentScan {
    pub header: SegmentHeader,
    pub records: Vec<ScannedRecord>,
    /// Bytes up to the end of the last good record (the header, if none).
    pub valid_bytes: u64,
    pub end: ScanEnd,
}

/// Reads a whole segment. A damaged header is an `Err` (its offset is 0); damage after the
/// header is reported in [`SegmentScan::end`] together with the good records before it.
pub fn scan_segment(bytes: &[u8]) -> Result<SegmentScan, Damage> {
    let header = SegmentHeader::decode(bytes)?;
    let mut records = Vec::new();
    let mut offset = SEGMENT_HEADER_BYTES;
    let mut expected = header.first_lsn;
    let end = loop {
        let rest = &bytes[offset..];
        if rest.is_empty() {
            break ScanEnd::Clean;
        }
        let at = offset as u64;
        if rest.len() < RECORD_HEADER_BYTES {
            break ScanEnd::Torn {
                offset: at,
                damage: Damage::Incomplete,
            };
        }
        let len = read_u32(rest, 0) as usize;
        if len > RECORD_BYTES_MAX {
            break ScanEnd::Corrupt {
                offset: at,
                damage: Damage::LengthTooLarge(len as u64),
            };
        }
        let Some(frame) = rest.get(..RECORD_HEADER_BYTES + len) else {
            break ScanEnd::Torn {
                offset: at,
                damage: Damage::Incomplete,
            };
        };
        let payload = &frame[RECORD_HEADER_BYTES..];
        if record_crc(&frame[0..4], &frame[8..16], payload) != read_u32(frame, 4) {
            let after = &rest[frame.len()..];
            break if after.iter().all(|&b| b == 0) {
                ScanEnd::Torn {
                    offset: at,
                    damage: Damage::Checksum,
                }
            } else {
                ScanEnd::Corrupt {
                    offset: at,
                    damage: Damage::Checksum,
                }
            };
        }
        let lsn = Lsn(read_u64(frame, 8));
        if lsn != expected {
            break ScanEnd::Corrupt {
                offset: at,
                damage: Damage::Sequence {
                    expected,
                    found: lsn,
                },
            };
        }
        let start = offset + RECORD_HEADER_BYTES;
        records.push(ScannedRecord {
            lsn,
            payload: start..start + len,
        });
        offset += frame.len();
        expected = expected.next();
    };
    Ok(SegmentScan {
        header,
        records,
        valid_bytes: offset as u64,
        end,
    })
}

pub(crate) fn read_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

pub(crate) fn read_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(first: u64, payloads: &[&[u8]]) -> Vec<u8> {
        let mut bytes = SegmentHeader {
            epoch: Epoch(7),
            first_lsn: Lsn(first),
        }
        .encode()
        .to_vec();
        for (i, p) in payloads.iter().enumerate() {
            encode_record(Lsn(first + i as u64), p, &mut bytes);
        }
        bytes
    }

    #[test]
    fn header_golden_bytes() {
        let header = SegmentHeader {
            epoch: Epoch(2),
            first_lsn: Lsn(0x0102),
        };
        let bytes = header.encode();
        assert_eq!(&bytes[0..8], b"HFJOURNL");
        assert_eq!(&bytes[8..12], &[1, 0, 0, 0]);
        assert_eq!(&bytes[12..20], &[2, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&bytes[20..28], &[2, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(SegmentHeader::decode(&bytes), Ok(header));
    }

    #[test]
    fn record_frame_layout() {
        let mut out = Vec::new();
        encode_record(Lsn(5), b"abc", &mut out);
        assert_eq!(out.len(), RECORD_HEADER_BYTES + 3);
        assert_eq!(&out[0..4], &[3, 0, 0, 0]);
        assert_eq!(&out[8..16], &[5, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&out[16..], b"abc");
    }

    #[test]
    fn scan_reads_records_in_order() {
        let bytes = segment(10, &[b"a", b"", b"ccc"]);
        let scan = scan_segment(&bytes).unwrap();
        assert_eq!(scan.end, ScanEnd::Clean);
        let lsns: Vec<u64> = scan.records.iter().map(|r| r.lsn.0).collect();
        assert_eq!(lsns, vec![10, 11, 12]);
        assert_eq!(&bytes[scan.records[2].payload.clone()], b"ccc");
        assert_eq!(scan.valid_bytes, bytes.len() as u64);
    }

    #[test]
    fn bad_checksum_followed_by_zeros_is_torn_and_by_data_is_corrupt() {
        let mut bytes = segment(1, &[b"one", b"two"]);
        let second = SEGMENT_HEADER_BYTES + RECORD_HEADER_BYTES + 3;
        bytes[second + RECORD_HEADER_BYTES] ^= 0xff;
        let mut zero_filled = bytes.clone();
        zero_filled.extend_from_slice(&[0u8; 100]);
        let torn = scan_segment(&zero_filled).unwrap();
        assert_eq!(
            torn.end,
            ScanEnd::Torn {
                offset: second as u64,
                damage: Damage::Checksum
            }
        );
        bytes.extend_from_slice(&segment(3, &[b"x"])[SEGMENT_HEADER_BYTES..]);
        let corrupt = scan_segment(&bytes).unwrap();
        assert_eq!(
            corrupt.end,
            ScanEnd::Corrupt {
                offset: second as u64,
                damage: Damage::Checksum
            }
        );
        assert_eq!(corrupt.records.len(), 1);
    }

    #[test]
    fn wrong_sequence_is_corrupt() {
        let mut bytes = segment(1, &[b"one"]);
        encode_record(Lsn(3), b"three", &mut bytes);
        let scan = scan_segment(&bytes).unwrap();
        assert_eq!(
            scan.end,
            ScanEnd::Corrupt {
                offset: (SEGMENT_HEADER_BYTES + RECORD_HEADER_BYTES + 3) as u64,
                damage: Damage::Sequence {
                    expected: Lsn(2),
                    found: Lsn(3)
                }
            }
        );
    }
}
