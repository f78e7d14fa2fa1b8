//! The chunk cache on local disk: one file per cached chunk in `cache_dir/chunks/`, named
//! `VOLUME.VNODE.UNIQUE.INDEX.GENERATION`, with `ChunkIndex` deciding what stays.
//! Invariant: a file exists for every indexed chunk (written before it is indexed);
//! files of evicted chunks are deleted by generation, so an old deletion never hits a
//! newer file of the same chunk. The directory is wiped at start (no warm restart yet).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use proto::{DataVersion, Fid};
use tracing::debug;

use crate::chunk_index::{ChunkIndex, ChunkKey, ChunkMeta, Evicted, Generation};

pub struct ChunkStore {
    dir: PathBuf,
    index: Mutex<ChunkIndex>,
}

impl ChunkStore {
    /// Opens the store at `dir`, discarding whatever an earlier run left there.
    pub fn open(dir: PathBuf, bytes_max: u64) -> io::Result<ChunkStore> {
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::create_dir_all(&dir)?;
        Ok(ChunkStore {
            dir,
            index: Mutex::new(ChunkIndex::new(bytes_max)),
        })
    }

    fn path(&self, key: ChunkKey, generation: Generation) -> PathBuf {
        let fid = key.fid;
        self.dir.join(format!(
            "{}.{}.{}.{}.{}",
            fid.volume, fid.vnode, fid.unique, key.index, generation.0
        ))
    }

    pub fn bytes_max(&self) -> u64 {
        self.index.lock().bytes_max()
    }

    pub fn dirty_bytes(&self) -> u64 {
        self.index.lock().dirty_bytes()
    }

    pub fn has_fid(&self, fid: Fid) -> bool {
        self.index.lock().has_fid(fid)
    }

    pub fn has_dirty(&self, fid: Fid) -> bool {
        self.index.lock().has_dirty(fid)
    }

    /// Reads `len` bytes at `offset` within the chunk, when it holds `data_version`.
    /// Bytes past the chunk's end read as zeros (a hole before later writes).
    /// `None` on a miss, including a file evicted between lookup and read.
    pub fn read(
        &self,
        key: ChunkKey,
        data_version: DataVersion,
        offset: u64,
        len: usize,
    ) -> io::Result<Option<Vec<u8>>> {
        let mut buf = Vec::with_capacity(len);
        Ok(self
            .read_into(key, data_version, offset, len, &mut buf)?
            .then_some(buf))
    }

    /// `read`, appending to `out` (the reply buffer) rather than to a buffer of its own;
    /// `false` on a miss, with `out` unchanged.
    pub fn read_into(
        &self,
        key: ChunkKey,
        data_version: DataVersion,
        offset: u64,
        len: usize,
        out: &mut Vec<u8>,
    ) -> io::Result<bool> {
        let Some(meta) = self.index.lock().lookup(key, data_version) else {
            return Ok(false);
        };
        let file = match File::open(self.path(key, meta.generation)) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        let start = out.len();
        out.resize(start + len, 0);
        let available = meta.len.saturating_sub(offset).min(len as u64) as usize;
        if let Err(e) = file.read_exact_at(&mut out[start..start + available], offset) {
            out.truncate(start);
            return Err(e);
        }
        Ok(true)
    }

    /// Whether the chunk is cached at `data_version` (or holds unstored writes).
    pub fn holds(&self, key: ChunkKey, data_version: DataVersion) -> bool {
        self.index.lock().lookup(key, data_version).is_some()
    }

    /// Caches a chunk's bytes. Returns the fids whose last cached data was evicted.
    pub fn insert(
        &self,
        key: ChunkKey,
        data_version: DataVersion,
        data: &[u8],
        dirty: bool,
    ) -> io::Result<Vec<Fid>> {
        let generation = self.index.lock().reserve_generation();
        std::fs::write(self.path(key, generation), data)?;
        let (_, evicted) =
            self.index
                .lock()
                .insert(key, data_version, data.len() as u64, dirty, generation);
        Ok(self.delete(evicted))
    }

    /// Writes into a cached chunk of `data_version` (or already dirty), pinning it dirty.
    /// `Ok(false)` when no such chunk is cached: the caller must provide its bytes first.
    pub fn write(
        &self,
        key: ChunkKey,
        data_version: DataVersion,
        offset: u64,
        data: &[u8],
    ) -> io::Result<bool> {
        let generation = {
            let mut index = self.index.lock();
            if index.lookup(key, data_version).is_none() {
                return Ok(false);
            }
            index.begin_write(key)
        };
        let Some(generation) = generation else {
            return Ok(false);
        };
        let file = OpenOptions::new()
            .write(true)
            .open(self.path(key, generation))?;
        file.write_all_at(data, offset)?;
        let evicted = self.index.lock().grow(key, offset + data.len() as u64);
        self.delete(evicted);
        Ok(true)
    }

    /// Files with writes not yet stored.
    pub fn dirty_fids(&self) -> Vec<Fid> {
        self.index.lock().dirty_fids()
    }

    pub fn dirty_chunks(&self, fid: Fid) -> Vec<(ChunkKey, ChunkMeta)> {
        self.index.lock().dirty_chunks(fid)
    }

    /// The whole content of a (dirty, hence pinned) chunk.
    pub fn read_whole(&self, key: ChunkKey, meta: &ChunkMeta) -> io::Result<Vec<u8>> {
        let file = File::open(self.path(key, meta.generation))?;
        let mut buf = vec![0u8; meta.len as usize];
        file.read_exact_at(&mut buf, 0)?;
        Ok(buf)
    }

    /// The whole chunk when it is cached at `data_version` (or holds unstored writes).
    pub fn read_chunk(
        &self,
        key: ChunkKey,
        data_version: DataVersion,
    ) -> io::Result<Option<Vec<u8>>> {
        let Some(meta) = self.index.lock().lookup(key, data_version) else {
            return Ok(None);
        };
        match self.read_whole(key, &meta) {
            Ok(data) => Ok(Some(data)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn mark_clean(&self, key: ChunkKey, data_version: DataVersion) -> Vec<Fid> {
        let evicted = self.index.lock().mark_clean(key, data_version);
        self.delete(evicted)
    }

    pub fn retag(&self, fid: Fid, from: DataVersion, to: DataVersion) {
        self.index.lock().retag(fid, from, to);
    }

    pub fn drop_stale(&self, fid: Fid, current: DataVersion) {
        let evicted = self.index.lock().drop_stale(fid, current);
        self.delete(evicted);
    }

    pub fn drop_fid(&self, fid: Fid) {
        let evicted = self.index.lock().drop_fid(fid);
        self.delete(evicted);
    }

    pub fn truncate(&self, fid: Fid, size: u64) -> io::Result<()> {
        let (evicted, cut) = self.index.lock().truncate(fid, size);
        self.delete(evicted);
        if let Some((key, meta)) = cut {
            let file = OpenOptions::new()
                .write(true)
                .open(self.path(key, meta.generation))?;
            file.set_len(meta.len)?;
        }
        Ok(())
    }

    /// Deletes evicted chunks' files; returns the fids left with no cached data.
    fn delete(&self, evicted: Vec<Evicted>) -> Vec<Fid> {
        let mut emptied = Vec::new();
        for e in evicted {
            if let Err(err) = std::fs::remove_file(self.path(e.key, e.generation))
                && err.kind() != io::ErrorKind::NotFound
            {
                debug!(error = %err, "cannot delete evicted chunk file");
            }
            if e.last_of_fid {
                emptied.push(e.key.fid);
            }
        }
        emptied
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use proto::{Uniquifier, VnodeId, VolumeId};

    use super::*;

    fn key(index: u64) -> ChunkKey {
        ChunkKey {
            fid: Fid {
                volume: VolumeId(1),
                vnode: VnodeId(2),
                unique: Uniquifier(1),
            },
            index,
        }
    }

    #[test]
    fn write_read_evict_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path().join("chunks"), 8).unwrap();
        let v = DataVersion(1);
        assert!(store.insert(key(0), v, b"hello", false).unwrap().is_empty());
        assert_eq!(store.read(key(0), v, 1, 3).unwrap().unwrap(), b"ell");
        // Reading past the end of the chunk's bytes gives zeros.
        assert_eq!(store.read(key(0), v, 3, 4).unwrap().unwrap(), b"lo\0\0");
        assert!(store.read(key(0), DataVersion(2), 0, 1).unwrap().is_none());
        assert!(store.holds(key(0), v));
        assert!(!store.holds(key(0), DataVersion(2)));
        assert_eq!(store.read_chunk(key(0), v).unwrap().unwrap(), b"hello");
        assert!(store.read_chunk(key(0), DataVersion(2)).unwrap().is_none());
        let mut out = b"reply:".to_vec();
        assert!(store.read_into(key(0), v, 3, 4, &mut out).unwrap());
        assert_eq!(out, b"reply:lo\0\0");
        assert!(!store.read_into(key(1), v, 0, 4, &mut out).unwrap());
        assert_eq!(out, b"reply:lo\0\0", "a miss leaves the buffer alone");
        assert!(store.write(key(0), v, 5, b"!!").unwrap());
        assert!(!store.write(key(1), v, 0, b"x").unwrap());
        assert_eq!(store.dirty_fids(), [key(0).fid]);
        // Over the 8-byte limit: the new clean chunk is evicted, the dirty one stays.
        let emptied = store.insert(key(1), v, b"world", false).unwrap();
        assert!(emptied.is_empty());
        assert_eq!(store.read(key(0), v, 0, 7).unwrap().unwrap(), b"hello!!");
        assert!(store.read(key(1), v, 0, 1).unwrap().is_none());
        let dirty = store.dirty_chunks(key(0).fid);
        assert_eq!(
            store.read_whole(dirty[0].0, &dirty[0].1).unwrap(),
            b"hello!!"
        );
        let emptied = store.mark_clean(key(0), DataVersion(2));
        assert!(emptied.is_empty());
        store.truncate(key(0).fid, 2).unwrap();
        assert_eq!(
            store.read(key(0), DataVersion(2), 0, 3).unwrap().unwrap(),
            b"he\0"
        );
        store.drop_fid(key(0).fid);
        assert!(!store.has_fid(key(0).fid));
        assert_eq!(std::fs::read_dir(store.dir()).unwrap().count(), 0);
    }
}
