//! Sequential read detection: which chunks of a file to fetch ahead of its reader, so the
//! network stays busy while the kernel consumes the chunk it asked for.
//! Invariant: only a read that starts the file or continues its previous read fetches
//! anything ahead (random access fetches nothing), and the files tracked stay bounded.

use std::collections::HashMap;
use std::ops::Range;

use proto::Fid;

use crate::chunk_index::CHUNK_BYTES;

/// Files whose last read position is remembered. A full table is cleared, which costs a
/// reader only its next fetch ahead.
pub const FILES_MAX: usize = 4096;

/// Per file, where its last read ended. Pure: it takes read offsets and sizes and
/// returns chunk ranges.
#[derive(Debug)]
pub struct ReadAhead {
    /// Per file, the chunk the last read ended in.
    last_chunk: HashMap<Fid, u64>,
    /// Chunks fetched ahead of the one being read.
    chunks_ahead: u64,
}

impl ReadAhead {
    pub fn new(chunks_ahead: u64) -> ReadAhead {
        ReadAhead {
            last_chunk: HashMap::new(),
            chunks_ahead,
        }
    }

    /// Records a read of `len` bytes at `offset` of a file whose server copy holds
    /// `server_size` bytes, and returns the chunks worth fetching ahead of it. A read is
    /// sequential when it starts the file or starts in the chunk the previous read of
    /// the file ended in or the next one (the kernel's reads may arrive slightly out of
    /// order).
    pub fn on_read(&mut self, fid: Fid, offset: u64, len: u64, server_size: u64) -> Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let first = offset / CHUNK_BYTES;
        let last = (offset + len - 1) / CHUNK_BYTES;
        let sequential = offset == 0
            || self
                .last_chunk
                .get(&fid)
                .is_some_and(|&previous| first == previous || first == previous + 1);
        if self.last_chunk.len() >= FILES_MAX && !self.last_chunk.contains_key(&fid) {
            self.last_chunk.clear();
        }
        self.last_chunk.insert(fid, last);
        if !sequential {
            return 0..0;
        }
        let chunks = server_size.div_ceil(CHUNK_BYTES);
        let start = (last + 1).min(chunks);
        start..(last + 1 + self.chunks_ahead).min(chunks)
    }

    /// Forgets a file (its data was dropped, so its reader starts over).
    pub fn forget(&mut self, fid: Fid) {
        self.last_chunk.remove(&fid);
    }
}

#[cfg(test)]
mod tests {
    use proto::{Uniquifier, VnodeId, VolumeId};

    use super::*;

    fn fid(vnode: u64) -> Fid {
        Fid {
            volume: VolumeId(1),
            vnode: VnodeId(vnode),
            unique: Uniquifier(1),
        }
    }

    const KIB_128: u64 = 128 * 1024;

    #[test]
    fn sequential_reads_fetch_ahead_within_the_file() {
        let mut ahead = ReadAhead::new(4);
        let size = 10 * CHUNK_BYTES + 5;
        assert_eq!(ahead.on_read(fid(1), 0, KIB_128, size), 1..5);
        assert_eq!(ahead.on_read(fid(1), KIB_128, KIB_128, size), 1..5);
        // Into the next chunk: the window slides.
        assert_eq!(ahead.on_read(fid(1), CHUNK_BYTES, KIB_128, size), 2..6);
        // Near the end the window stops at the last chunk (index 10).
        assert_eq!(
            ahead.on_read(fid(1), 8 * CHUNK_BYTES, KIB_128, size),
            0..0,
            "a jump of two chunks is not sequential"
        );
        assert_eq!(
            ahead.on_read(fid(1), 9 * CHUNK_BYTES, KIB_128, size),
            10..11
        );
        assert_eq!(ahead.on_read(fid(1), 10 * CHUNK_BYTES, 5, size), 11..11);
    }

    #[test]
    fn random_reads_fetch_nothing() {
        let mut ahead = ReadAhead::new(4);
        let size = 100 * CHUNK_BYTES;
        assert_eq!(ahead.on_read(fid(1), 50 * CHUNK_BYTES, 4096, size), 0..0);
        assert_eq!(ahead.on_read(fid(1), 20 * CHUNK_BYTES, 4096, size), 0..0);
        // Another file's position is its own.
        assert_eq!(ahead.on_read(fid(2), 0, 4096, size), 1..5);
        assert_eq!(
            ahead.on_read(fid(1), 20 * CHUNK_BYTES + 4096, 4096, size),
            21..25
        );
        ahead.forget(fid(1));
        assert_eq!(ahead.on_read(fid(1), 21 * CHUNK_BYTES, 4096, size), 0..0);
        assert_eq!(ahead.on_read(fid(1), 0, 0, size), 0..0);
    }

    #[test]
    fn table_is_bounded() {
        let mut ahead = ReadAhead::new(1);
        for vnode in 0..(FILES_MAX as u64 + 10) {
            ahead.on_read(fid(vnode), 0, 1, CHUNK_BYTES * 2);
        }
        assert!(ahead.last_chunk.len() <= FILES_MAX);
    }
}
