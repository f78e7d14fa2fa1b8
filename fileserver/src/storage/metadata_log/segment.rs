//! The metadata log's segment format: the header, the block-aligned frames one flush
//! writes, and the records in them; encoded and scanned without I/O.
//! Invariant: the scanner never panics nor allocates from a length it read; each record
//! it returns passed its checksums and is numbered one after its predecessor.

use std::ops::Range;

use super::Lsn;

/// Frames start on block boundaries and are padded to them, so that every flush
/// writes whole blocks and a frame header can be looked for at each boundary.
pub const BLOCK_BYTES: u64 = 4096;
pub const SEGMENT_MAGIC: [u8; 8] = *b"HFMETLOG";
/// Version 2: each record's payload starts with its kind (`RecordKind`). Version 1
/// segments (every record a storage batch, no kind byte) are still read.
pub const SEGMENT_VERSION: u32 = 2;
pub const SEGMENT_VERSION_STORAGE_ONLY: u32 = 1;
pub const SEGMENT_HEADER_BYTES: usize = 36;
pub const FRAME_HEADER_BYTES: usize = 32;
pub const RECORD_HEADER_BYTES: usize = 16;
/// Largest payload a record may carry: a format constant, so that a length beyond it is
/// recognisable as damage whatever the reader's configuration.
pub const RECORD_BYTES_MAX: usize = 32 << 20;

/// The first block of a segment (little-endian; drawn in `docs/metadata-log.md`):
///
/// ```text
/// header (36 bytes, then zeros to 4096): magic "HFMETLOG" | version u32 | salt u32
///        | first lsn u64 | capacity u64 | crc32c u32 (of the 32 bytes before it)
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The format of the records: [`SEGMENT_VERSION`] for every segment this build
    /// starts; [`SEGMENT_VERSION_STORAGE_ONLY`] is read.
    pub version: u32,
    /// Random per use of the file: frames carry it, so frames left from an earlier use
    /// of a recycled file are told apart from this one's.
    pub salt: u32,
    /// The number of the segment's first record (or of the next one, while it has none).
    pub first_lsn: Lsn,
    /// Bytes the segment may grow to.
    pub capacity: u64,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_BYTES] {
        let mut out = [0u8; SEGMENT_HEADER_BYTES];
        out[0..8].copy_from_slice(&SEGMENT_MAGIC);
        out[8..12].copy_from_slice(&self.version.to_le_bytes());
        out[12..16].copy_from_slice(&self.salt.to_le_bytes());
        out[16..24].copy_from_slice(&self.first_lsn.0.to_le_bytes());
        out[24..32].copy_from_slice(&self.capacity.to_le_bytes());
        let crc = crc32c::crc32c(&out[0..32]);
        out[32..36].copy_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<SegmentHeader, String> {
        let header = bytes
            .get(..SEGMENT_HEADER_BYTES)
            .ok_or("shorter than a segment header")?;
        if header[0..8] != SEGMENT_MAGIC {
            return Err("bad magic".into());
        }
        if crc32c::crc32c(&header[0..32]) != read_u32(header, 32) {
            return Err("header checksum mismatch".into());
        }
        let version = read_u32(header, 8);
        if version != SEGMENT_VERSION && version != SEGMENT_VERSION_STORAGE_ONLY {
            return Err(format!("unsupported segment version {version}"));
        }
        Ok(SegmentHeader {
            version,
            salt: read_u32(header, 12),
            first_lsn: Lsn(read_u64(header, 16)),
            capacity: read_u64(header, 24),
        })
    }
}

/// The header of a frame: the records one flush wrote.
///
/// ```text
/// frame header (32 bytes): salt u32 | record count u32 | first lsn u64 | body len u32
///        | body crc32c u32 | reserved u32 (0) | header crc32c u32 (of the 28 before it)
/// body: records, each  len u32 | crc32c u32 (of len, lsn, payload) | lsn u64 | payload
/// then zeros to the next block boundary
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FrameHeader {
    salt: u32,
    count: u32,
    first_lsn: Lsn,
    body_len: u32,
    body_crc: u32,
}

impl FrameHeader {
    fn encode(&self) -> [u8; FRAME_HEADER_BYTES] {
        let mut out = [0u8; FRAME_HEADER_BYTES];
        out[0..4].copy_from_slice(&self.salt.to_le_bytes());
        out[4..8].copy_from_slice(&self.count.to_le_bytes());
        out[8..16].copy_from_slice(&self.first_lsn.0.to_le_bytes());
        out[16..20].copy_from_slice(&self.body_len.to_le_bytes());
        out[20..24].copy_from_slice(&self.body_crc.to_le_bytes());
        let crc = crc32c::crc32c(&out[0..28]);
        out[28..32].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// The header at the start of `bytes`, if its checksum holds.
    fn decode(bytes: &[u8]) -> Option<FrameHeader> {
        let header = bytes.get(..FRAME_HEADER_BYTES)?;
        if crc32c::crc32c(&header[0..28]) != read_u32(header, 28) {
            return None;
        }
        Some(FrameHeader {
            salt: read_u32(header, 0),
            count: read_u32(header, 4),
            first_lsn: Lsn(read_u64(header, 8)),
            body_len: read_u32(header, 16),
            body_crc: read_u32(header, 20),
        })
    }
}

/// The bytes a frame of records of `lens` payload bytes takes, padding included.
pub fn frame_bytes(lens: impl IntoIterator<Item = usize>) -> u64 {
    let body: usize = lens.into_iter().map(|len| RECORD_HEADER_BYTES + len).sum();
    align_up((FRAME_HEADER_BYTES + body) as u64)
}

pub fn align_up(bytes: u64) -> u64 {
    bytes.div_ceil(BLOCK_BYTES) * BLOCK_BYTES
}

/// Encodes the records numbered from `first_lsn` as one frame, padded with zeros to a
/// block boundary. The caller bounds each payload by [`RECORD_BYTES_MAX`].
pub fn encode_frame(salt: u32, first_lsn: Lsn, payloads: &[&[u8]]) -> Vec<u8> {
    let mut body = Vec::new();
    for (i, payload) in payloads.iter().enumerate() {
        assert!(
            payload.len() <= RECORD_BYTES_MAX,
            "caller checks the record size"
        );
        encode_record(Lsn(first_lsn.0 + i as u64), payload, &mut body);
    }
    let header = FrameHeader {
        salt,
        count: payloads.len() as u32,
        first_lsn,
        body_len: body.len() as u32,
        body_crc: crc32c::crc32c(&body),
    };
    let mut out = Vec::with_capacity(frame_bytes(payloads.iter().map(|p| p.len())) as usize);
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(&body);
    out.resize(align_up(out.len() as u64) as usize, 0);
    out
}

/// Appends one record (`len | crc | lsn | payload`) to `out`: the unit a pair partner
/// will be shipped.
pub fn encode_record(lsn: Lsn, payload: &[u8], out: &mut Vec<u8>) {
    let len = (payload.len() as u32).to_le_bytes();
    let lsn = lsn.0.to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&record_crc(&len, &lsn, payload).to_le_bytes());
    out.extend_from_slice(&lsn);
    out.extend_from_slice(payload);
}

fn record_crc(len: &[u8], lsn: &[u8], payload: &[u8]) -> u32 {
    let crc = crc32c::crc32c(len);
    let crc = crc32c::crc32c_append(crc, lsn);
    crc32c::crc32c_append(crc, payload)
}

/// How a segment's frames end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScanEnd {
    /// No frame header of this use: zeros, the end of the capacity, bytes of an
    /// earlier use of the file, or a header never completely written.
    Clean,
    /// A frame header of this use whose body is incomplete or fails its checksums, with
    /// no frame of this use after it: an interrupted flush, never acknowledged.
    Torn { offset: u64 },
    /// Damage no crash explains: a frame out of sequence, or a bad frame followed by a
    /// later one of this use (so its flush had completed).
    Corrupt { offset: u64, detail: String },
}

/// What a segment holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentScan {
    pub header: SegmentHeader,
    /// Each good record's number and where its payload lies in the bytes.
    pub records: Vec<(Lsn, Range<usize>)>,
    /// Where the next frame would go.
    pub end_offset: u64,
    pub end: ScanEnd,
}

/// Reads a whole segment. A damaged header is an `Err`; damage after it is reported in
/// [`SegmentScan::end`] together with the good records before it.
pub fn scan_segment(bytes: &[u8]) -> Result<SegmentScan, String> {
    let header = SegmentHeader::decode(bytes)?;
    let mut records = Vec::new();
    let mut offset = BLOCK_BYTES as usize;
    let mut expected = header.first_lsn;
    let end = loop {
        let Some(rest) = bytes
            .get(offset..)
            .filter(|r| r.len() >= FRAME_HEADER_BYTES)
        else {
            break ScanEnd::Clean;
        };
        let frame = match FrameHeader::decode(rest) {
            Some(frame) if frame.salt == header.salt => frame,
            // Zeros, a frame of an earlier use (a valid checksum, another salt), the middle
            // of one, or a header this use never finished writing.
            _ => break probe(bytes, &header, offset, expected, ScanEnd::Clean),
        };
        if frame.first_lsn != expected {
            break ScanEnd::Corrupt {
                offset: offset as u64,
                detail: format!(
                    "frame starts at record {}, expected {expected}",
                    frame.first_lsn
                ),
            };
        }
        let body = rest
            .get(FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + frame.body_len as usize)
            .filter(|body| crc32c::crc32c(body) == frame.body_crc);
        let parsed = body.and_then(|body| parse_body(body, &frame));
        let Some(parsed) = parsed else {
            break probe(
                bytes,
                &header,
                offset,
                expected,
                ScanEnd::Torn {
                    offset: offset as u64,
                },
            );
        };
        let body_start = offset + FRAME_HEADER_BYTES;
        for (lsn, range) in parsed {
            records.push((lsn, body_start + range.start..body_start + range.end));
        }
        expected = Lsn(expected.0 + u64::from(frame.count));
        offset += align_up((FRAME_HEADER_BYTES + frame.body_len as usize) as u64) as usize;
    };
    Ok(SegmentScan {
        header,
        records,
        end_offset: offset as u64,
        end,
    })
}

/// The records of a frame's body, if they are exactly `count` good ones in sequence.
fn parse_body(body: &[u8], frame: &FrameHeader) -> Option<Vec<(Lsn, Range<usize>)>> {
    let mut out = Vec::new();
    let mut at = 0;
    for i in 0..u64::from(frame.count) {
        let rest = body.get(at..)?;
        let head = rest.get(..RECORD_HEADER_BYTES)?;
        let len = read_u32(head, 0) as usize;
        if len > RECORD_BYTES_MAX {
            return None;
        }
        let payload = rest.get(RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + len)?;
        if record_crc(&head[0..4], &head[8..16], payload) != read_u32(head, 4) {
            return None;
        }
        let lsn = Lsn(read_u64(head, 8));
        if lsn != Lsn(frame.first_lsn.0 + i) {
            return None;
        }
        let start = at + RECORD_HEADER_BYTES;
        out.push((lsn, start..start + len));
        at = start + len;
    }
    (at == body.len()).then_some(out)
}

/// The frames stop at `offset`. The flusher writes a frame only after the previous
/// one's sync returned, so a frame of this use further on proves that a flush at
/// `offset` had completed: damage, not an interrupted write. Otherwise `end` holds.
fn probe(
    bytes: &[u8],
    header: &SegmentHeader,
    offset: usize,
    expected: Lsn,
    end: ScanEnd,
) -> ScanEnd {
    let mut at = offset + BLOCK_BYTES as usize;
    while let Some(rest) = bytes.get(at..) {
        if let Some(frame) = FrameHeader::decode(rest)
            && frame.salt == header.salt
            && frame.first_lsn > expected
        {
            return ScanEnd::Corrupt {
                offset: offset as u64,
                detail: format!(
                    "record {expected} is missing or damaged, but a later flush (record {}) \
                     follows at byte {at}",
                    frame.first_lsn
                ),
            };
        }
        at += BLOCK_BYTES as usize;
    }
    end
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SALT: u32 = 0x5a17;

    fn segment(first: u64, frames: &[&[&[u8]]]) -> Vec<u8> {
        let mut bytes = SegmentHeader {
            version: SEGMENT_VERSION,
            salt: SALT,
            first_lsn: Lsn(first),
            capacity: 1 << 20,
        }
        .encode()
        .to_vec();
        bytes.resize(BLOCK_BYTES as usize, 0);
        let mut next = first;
        for frame in frames {
            bytes.extend_from_slice(&encode_frame(SALT, Lsn(next), frame));
            next += frame.len() as u64;
        }
        bytes.resize(bytes.len() + 3 * BLOCK_BYTES as usize, 0);
        bytes
    }

    fn lsns(scan: &SegmentScan) -> Vec<u64> {
        scan.records.iter().map(|(lsn, _)| lsn.0).collect()
    }

    #[test]
    fn segment_header_golden_bytes() {
        let header = SegmentHeader {
            version: SEGMENT_VERSION,
            salt: 0x0403_0201,
            first_lsn: Lsn(0x0102),
            capacity: 0x1000,
        };
        let bytes = header.encode();
        assert_eq!(&bytes[0..8], b"HFMETLOG");
        assert_eq!(&bytes[8..12], &[2, 0, 0, 0]);
        assert_eq!(&bytes[12..16], &[1, 2, 3, 4]);
        assert_eq!(&bytes[16..24], &[2, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&bytes[24..32], &[0, 0x10, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&bytes[32..36], &crc32c::crc32c(&bytes[0..32]).to_le_bytes());
        assert_eq!(SegmentHeader::decode(&bytes), Ok(header));
    }

    #[test]
    fn frame_golden_bytes() {
        let frame = encode_frame(7, Lsn(5), &[b"ab", b"c"]);
        assert_eq!(frame.len(), BLOCK_BYTES as usize);
        assert_eq!(&frame[0..4], &[7, 0, 0, 0], "salt");
        assert_eq!(&frame[4..8], &[2, 0, 0, 0], "record count");
        assert_eq!(&frame[8..16], &[5, 0, 0, 0, 0, 0, 0, 0], "first lsn");
        assert_eq!(&frame[16..20], &[35, 0, 0, 0], "body length");
        assert_eq!(&frame[24..28], &[0, 0, 0, 0], "reserved");
        let body = &frame[32..67];
        assert_eq!(&frame[20..24], &crc32c::crc32c(body).to_le_bytes());
        assert_eq!(&body[0..4], &[2, 0, 0, 0], "first record's length");
        assert_eq!(
            &body[8..16],
            &[5, 0, 0, 0, 0, 0, 0, 0],
            "first record's lsn"
        );
        assert_eq!(&body[16..18], b"ab");
        assert_eq!(
            &body[26..34],
            &[6, 0, 0, 0, 0, 0, 0, 0],
            "second record's lsn"
        );
        assert_eq!(&body[34..35], b"c");
        assert!(frame[67..].iter().all(|&b| b == 0), "padding");
    }

    #[test]
    fn scan_reads_frames_in_order() {
        let bytes = segment(10, &[&[b"a", b""], &[b"ccc"]]);
        let scan = scan_segment(&bytes).unwrap();
        assert_eq!(scan.end, ScanEnd::Clean);
        assert_eq!(lsns(&scan), vec![10, 11, 12]);
        assert_eq!(&bytes[scan.records[2].1.clone()], b"ccc");
        assert_eq!(scan.end_offset, 3 * BLOCK_BYTES);
    }

    #[test]
    fn a_damaged_last_frame_is_torn_and_a_damaged_earlier_one_corrupt() {
        let bytes = segment(1, &[&[b"one"], &[b"two"], &[b"three"]]);
        let mut torn = bytes.clone();
        torn[3 * BLOCK_BYTES as usize + 40] ^= 0xff;
        let scan = scan_segment(&torn).unwrap();
        assert_eq!(
            scan.end,
            ScanEnd::Torn {
                offset: 3 * BLOCK_BYTES
            }
        );
        assert_eq!(lsns(&scan), vec![1, 2]);

        let mut corrupt = bytes;
        corrupt[2 * BLOCK_BYTES as usize + 40] ^= 0xff;
        let scan = scan_segment(&corrupt).unwrap();
        assert!(
            matches!(scan.end, ScanEnd::Corrupt { offset, .. } if offset == 2 * BLOCK_BYTES),
            "{:?}",
            scan.end
        );
    }

    #[test]
    fn frames_of_an_earlier_use_end_the_segment() {
        let old = segment(1, &[&[b"old"], &[b"older"]]);
        let mut reused = old.clone();
        let header = SegmentHeader {
            version: SEGMENT_VERSION,
            salt: SALT + 1,
            first_lsn: Lsn(40),
            capacity: 1 << 20,
        }
        .encode();
        reused[..SEGMENT_HEADER_BYTES].copy_from_slice(&header);
        let frame = encode_frame(SALT + 1, Lsn(40), &[b"new"]);
        reused[BLOCK_BYTES as usize..][..frame.len()].copy_from_slice(&frame);
        let scan = scan_segment(&reused).unwrap();
        assert_eq!(scan.end, ScanEnd::Clean);
        assert_eq!(lsns(&scan), vec![40]);
    }

    #[test]
    fn a_frame_out_of_sequence_is_corrupt() {
        let mut bytes = segment(1, &[&[b"one"]]);
        let frame = encode_frame(SALT, Lsn(3), &[b"three"]);
        bytes[2 * BLOCK_BYTES as usize..][..frame.len()].copy_from_slice(&frame);
        let scan = scan_segment(&bytes).unwrap();
        assert!(
            matches!(scan.end, ScanEnd::Corrupt { .. }),
            "{:?}",
            scan.end
        );
        assert_eq!(lsns(&scan), vec![1]);
    }
}
