//! The in-memory index of the chunk cache: which chunks of which files are held, at which
//! data version and length, which are dirty, and the order the clean ones were used in.
//! Invariant: a dirty chunk is never evicted (it holds the only copy of this client's
//! writes); clean ones go, least recently used first, whenever the total passes the cap.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use proto::{DataVersion, Fid};

/// Bytes per chunk; also the largest `FetchData`/`StoreData` the cache issues.
pub const CHUNK_BYTES: u64 = 1 << 20;

/// Identifies one chunk: bytes `[index * CHUNK_BYTES, (index + 1) * CHUNK_BYTES)` of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkKey {
    pub fid: Fid,
    pub index: u64,
}

impl ChunkKey {
    pub fn offset(&self) -> u64 {
        self.index * CHUNK_BYTES
    }
}

/// Distinguishes successive files of one chunk key, so deleting an evicted file can never
/// delete a newer one of the same key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Generation(pub u64);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkMeta {
    pub data_version: DataVersion,
    pub len: u64,
    pub dirty: bool,
    pub generation: Generation,
    last_use: u64,
}

/// A chunk removed from the index; the caller deletes its file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Evicted {
    pub key: ChunkKey,
    pub generation: Generation,
    /// No data of this fid is left in the cache.
    pub last_of_fid: bool,
}

/// What the chunk cache holds and what it evicts. Pure: decisions come back as values
/// (`Evicted`) and the caller deletes the files.
#[derive(Debug)]
pub struct ChunkIndex {
    chunks: HashMap<ChunkKey, ChunkMeta>,
    /// Clean chunks by last use; dirty ones are absent (pinned).
    lru: BTreeMap<u64, ChunkKey>,
    by_fid: BTreeMap<Fid, BTreeSet<u64>>,
    /// The sum of every chunk's length, dirty ones included.
    bytes_used: u64,
    dirty_bytes: u64,
    bytes_max: u64,
    clock: u64,
    next_generation: u64,
}

impl ChunkIndex {
    pub fn new(bytes_max: u64) -> ChunkIndex {
        ChunkIndex {
            chunks: HashMap::new(),
            lru: BTreeMap::new(),
            by_fid: BTreeMap::new(),
            bytes_used: 0,
            dirty_bytes: 0,
            bytes_max,
            clock: 0,
            next_generation: 1,
        }
    }

    pub fn bytes_used(&self) -> u64 {
        self.bytes_used
    }

    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_bytes
    }

    pub fn bytes_max(&self) -> u64 {
        self.bytes_max
    }

    pub fn has_fid(&self, fid: Fid) -> bool {
        self.by_fid.contains_key(&fid)
    }

    pub fn has_dirty(&self, fid: Fid) -> bool {
        self.by_fid.get(&fid).is_some_and(|indexes| {
            indexes.iter().any(|&index| {
                self.chunks
                    .get(&ChunkKey { fid, index })
                    .is_some_and(|m| m.dirty)
            })
        })
    }

    /// A fresh generation for a file about to be written.
    pub fn reserve_generation(&mut self) -> Generation {
        let generation = Generation(self.next_generation);
        self.next_generation += 1;
        generation
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// The chunk when it holds data of `data_version` (or this client's unstored writes).
    pub fn lookup(&mut self, key: ChunkKey, data_version: DataVersion) -> Option<ChunkMeta> {
        let meta = *self.chunks.get(&key)?;
        if !meta.dirty && meta.data_version != data_version {
            return None;
        }
        if !meta.dirty {
            let now = self.tick();
            self.lru.remove(&meta.last_use);
            self.lru.insert(now, key);
            if let Some(m) = self.chunks.get_mut(&key) {
                m.last_use = now;
            }
        }
        self.chunks.get(&key).copied()
    }

    /// Adds a chunk whose file the caller has written under `generation`. A dirty chunk
    /// already there is never replaced by a clean one: the insert is refused (`false`).
    pub fn insert(
        &mut self,
        key: ChunkKey,
        data_version: DataVersion,
        len: u64,
        dirty: bool,
        generation: Generation,
    ) -> (bool, Vec<Evicted>) {
        let mut evicted = Vec::new();
        if let Some(old) = self.chunks.get(&key).copied() {
            if old.dirty && !dirty {
                return (
                    false,
                    vec![Evicted {
                        key,
                        generation,
                        last_of_fid: false,
                    }],
                );
            }
            self.remove(key);
            evicted.push(Evicted {
                key,
                generation: old.generation,
                last_of_fid: false,
            });
        }
        let now = self.tick();
        self.chunks.insert(
            key,
            ChunkMeta {
                data_version,
                len,
                dirty,
                generation,
                last_use: now,
            },
        );
        self.by_fid.entry(key.fid).or_default().insert(key.index);
        self.bytes_used += len;
        if dirty {
            self.dirty_bytes += len;
        } else {
            self.lru.insert(now, key);
        }
        evicted.extend(self.evict());
        (true, evicted)
    }

    /// Pins a present chunk for a write: it becomes dirty. `None` when absent.
    pub fn begin_write(&mut self, key: ChunkKey) -> Option<Generation> {
        let meta = self.chunks.get_mut(&key)?;
        if !meta.dirty {
            meta.dirty = true;
            self.lru.remove(&meta.last_use);
            self.dirty_bytes += meta.len;
        }
        Some(meta.generation)
    }

    /// Records that a write extended a dirty chunk to `len` bytes.
    pub fn grow(&mut self, key: ChunkKey, len: u64) -> Vec<Evicted> {
        if let Some(meta) = self.chunks.get_mut(&key)
            && len > meta.len
        {
            let added = len - meta.len;
            meta.len = len;
            self.bytes_used += added;
            if meta.dirty {
                self.dirty_bytes += added;
            }
        }
        self.evict()
    }

    pub fn dirty_fids(&self) -> Vec<Fid> {
        self.by_fid
            .keys()
            .copied()
            .filter(|fid| self.has_dirty(*fid))
            .collect()
    }

    /// Dirty chunks of a file in offset order.
    pub fn dirty_chunks(&self, fid: Fid) -> Vec<(ChunkKey, ChunkMeta)> {
        let Some(indexes) = self.by_fid.get(&fid) else {
            return Vec::new();
        };
        indexes
            .iter()
            .map(|&index| ChunkKey { fid, index })
            .filter_map(|key| self.chunks.get(&key).map(|m| (key, *m)))
            .filter(|(_, m)| m.dirty)
            .collect()
    }

    /// The server stored a dirty chunk; it now holds `data_version` and may be evicted.
    pub fn mark_clean(&mut self, key: ChunkKey, data_version: DataVersion) -> Vec<Evicted> {
        let now = self.tick();
        if let Some(meta) = self.chunks.get_mut(&key) {
            meta.data_version = data_version;
            if meta.dirty {
                meta.dirty = false;
                self.dirty_bytes -= meta.len;
                meta.last_use = now;
                self.lru.insert(now, key);
            }
        }
        self.evict()
    }

    /// Every version from `from` up to `to` came from this client's own changes (a
    /// write-back's stores, each marking its chunk clean at the version its reply gave):
    /// clean chunks of any version in `from..to` hold `to`'s bytes.
    pub fn retag(&mut self, fid: Fid, from: DataVersion, to: DataVersion) {
        let Some(indexes) = self.by_fid.get(&fid) else {
            return;
        };
        for &index in indexes {
            if let Some(meta) = self.chunks.get_mut(&ChunkKey { fid, index })
                && (from..to).contains(&meta.data_version)
            {
                meta.data_version = to;
            }
        }
    }

    /// Drops clean chunks of `fid` that do not hold `current`.
    pub fn drop_stale(&mut self, fid: Fid, current: DataVersion) -> Vec<Evicted> {
        self.drop_where(fid, |_, meta| !meta.dirty && meta.data_version != current)
    }

    /// Drops every chunk of `fid`, dirty ones too.
    pub fn drop_fid(&mut self, fid: Fid) -> Vec<Evicted> {
        self.drop_where(fid, |_, _| true)
    }

    /// The file was truncated to `size`: chunks past it go; the chunk that straddles it
    /// is cut, and returned with its new length so the caller can cut its file.
    pub fn truncate(
        &mut self,
        fid: Fid,
        size: u64,
    ) -> (Vec<Evicted>, Option<(ChunkKey, ChunkMeta)>) {
        let evicted = self.drop_where(fid, |key, _| key.offset() >= size);
        let straddling = ChunkKey {
            fid,
            index: size / CHUNK_BYTES,
        };
        let keep = size - straddling.offset();
        let mut cut = None;
        if let Some(meta) = self.chunks.get_mut(&straddling)
            && meta.len > keep
        {
            let removed = meta.len - keep;
            meta.len = keep;
            self.bytes_used -= removed;
            if meta.dirty {
                self.dirty_bytes -= removed;
            }
            cut = Some((straddling, *meta));
        }
        (evicted, cut)
    }

    /// Drops the chunk when it is still the one written under `generation` (its file
    /// could not be written); a newer chunk of the same key stays.
    pub fn drop_generation(&mut self, key: ChunkKey, generation: Generation) -> Option<Evicted> {
        if self.chunks.get(&key)?.generation != generation {
            return None;
        }
        self.remove(key)
    }

    fn drop_where(
        &mut self,
        fid: Fid,
        mut pred: impl FnMut(ChunkKey, &ChunkMeta) -> bool,
    ) -> Vec<Evicted> {
        let Some(indexes) = self.by_fid.get(&fid) else {
            return Vec::new();
        };
        let victims: Vec<ChunkKey> = indexes
            .iter()
            .map(|&index| ChunkKey { fid, index })
            .filter(|key| self.chunks.get(key).is_some_and(|m| pred(*key, m)))
            .collect();
        victims
            .into_iter()
            .filter_map(|key| self.remove(key))
            .collect()
    }

    fn remove(&mut self, key: ChunkKey) -> Option<Evicted> {
        let meta = self.chunks.remove(&key)?;
        self.bytes_used -= meta.len;
        if meta.dirty {
            self.dirty_bytes -= meta.len;
        } else {
            self.lru.remove(&meta.last_use);
        }
        let mut last_of_fid = false;
        if let Some(indexes) = self.by_fid.get_mut(&key.fid) {
            indexes.remove(&key.index);
            if indexes.is_empty() {
                self.by_fid.remove(&key.fid);
                last_of_fid = true;
            }
        }
        Some(Evicted {
            key,
            generation: meta.generation,
            last_of_fid,
        })
    }

    /// Brings `bytes_used` back under `bytes_max` by evicting the least recently used
    /// clean chunks. Dirty chunks are pinned, so they may keep the total over the limit
    /// until they are written back.
    fn evict(&mut self) -> Vec<Evicted> {
        let mut evicted = Vec::new();
        while self.bytes_used > self.bytes_max {
            let Some((_, key)) = self.lru.pop_first() else {
                break; // only dirty chunks left: they wait for write-back
            };
            // `remove` looks the LRU slot up again; it is already gone, which is fine.
            if let Some(e) = self.remove(key) {
                evicted.push(e);
            }
        }
        evicted
    }
}

#[cfg(test)]
mod tests {
    use proto::{Uniquifier, VnodeId, VolumeId};

    use super::*;

    fn key(vnode: u64, index: u64) -> ChunkKey {
        ChunkKey {
            fid: Fid {
                volume: VolumeId(1),
                vnode: VnodeId(vnode),
                unique: Uniquifier(1),
            },
            index,
        }
    }

    const V1: DataVersion = DataVersion(1);

    fn put(index: &mut ChunkIndex, key: ChunkKey, len: u64, dirty: bool) -> Vec<Evicted> {
        let generation = index.reserve_generation();
        let (inserted, evicted) = index.insert(key, V1, len, dirty, generation);
        assert!(inserted);
        evicted
    }

    #[test]
    fn evicts_least_recently_used_clean_chunk() {
        let mut index = ChunkIndex::new(300);
        put(&mut index, key(1, 0), 100, false);
        put(&mut index, key(2, 0), 100, false);
        put(&mut index, key(3, 0), 100, false);
        // Touch the oldest so the second becomes least recently used.
        assert!(index.lookup(key(1, 0), V1).is_some());
        let evicted = put(&mut index, key(4, 0), 100, false);
        assert_eq!(evicted.len(), 1);
        assert_eq!(evicted[0].key, key(2, 0));
        assert!(evicted[0].last_of_fid);
        assert_eq!(index.bytes_used(), 300);
    }

    #[test]
    fn dirty_chunks_are_pinned_until_clean() {
        let mut index = ChunkIndex::new(200);
        put(&mut index, key(1, 0), 100, true);
        put(&mut index, key(1, 1), 100, true);
        let evicted = put(&mut index, key(2, 0), 100, false);
        // The only evictable chunk is the one just added.
        assert_eq!(
            evicted.iter().map(|e| e.key).collect::<Vec<_>>(),
            [key(2, 0)]
        );
        assert_eq!(index.dirty_bytes(), 200);
        let evicted = put(&mut index, key(2, 1), 50, false);
        assert_eq!(evicted.len(), 1);
        assert_eq!(index.bytes_used(), 200);
        let evicted = index.mark_clean(key(1, 0), DataVersion(2));
        assert!(evicted.is_empty());
        assert_eq!(index.dirty_bytes(), 100);
        let evicted = put(&mut index, key(3, 0), 100, false);
        assert_eq!(
            evicted.iter().map(|e| e.key).collect::<Vec<_>>(),
            [key(1, 0)]
        );
        assert!(!evicted[0].last_of_fid, "chunk 1 of fid 1 is still cached");
    }

    #[test]
    fn version_mismatch_misses_unless_dirty() {
        let mut index = ChunkIndex::new(1000);
        put(&mut index, key(1, 0), 10, false);
        put(&mut index, key(1, 1), 10, true);
        assert!(index.lookup(key(1, 0), DataVersion(2)).is_none());
        assert!(index.lookup(key(1, 1), DataVersion(2)).is_some());
        index.retag(key(1, 0).fid, V1, DataVersion(2));
        assert!(index.lookup(key(1, 0), DataVersion(2)).is_some());
        // Retagging never moves a chunk backwards.
        index.retag(key(1, 0).fid, V1, DataVersion(2));
        assert!(index.lookup(key(1, 0), DataVersion(2)).is_some());
        let dropped = index.drop_stale(key(1, 0).fid, DataVersion(3));
        assert_eq!(
            dropped.iter().map(|e| e.key).collect::<Vec<_>>(),
            [key(1, 0)]
        );
        assert!(index.has_dirty(key(1, 1).fid));
    }

    #[test]
    fn retag_covers_every_version_of_a_write_back() {
        // A write-back from version 1 stored chunks 1 and 2 concurrently; their replies
        // came back as versions 3 and 2; chunk 0 was not touched and is still at 1.
        let mut index = ChunkIndex::new(1000);
        put(&mut index, key(1, 0), 10, false);
        put(&mut index, key(1, 1), 10, true);
        put(&mut index, key(1, 2), 10, true);
        put(&mut index, key(1, 3), 10, false);
        index.mark_clean(key(1, 2), DataVersion(3));
        index.mark_clean(key(1, 1), DataVersion(2));
        index.retag(key(1, 0).fid, V1, DataVersion(3));
        for chunk in 0..3 {
            assert!(index.lookup(key(1, chunk), DataVersion(3)).is_some());
        }
        let stale = index.drop_stale(key(1, 0).fid, DataVersion(3));
        assert!(stale.is_empty());
    }

    #[test]
    fn clean_insert_never_replaces_dirty_chunk() {
        let mut index = ChunkIndex::new(1000);
        put(&mut index, key(1, 0), 10, true);
        let generation = index.reserve_generation();
        let (inserted, evicted) = index.insert(key(1, 0), V1, 20, false, generation);
        assert!(!inserted);
        assert_eq!(
            evicted[0].generation, generation,
            "the caller deletes its new file"
        );
        assert_eq!(index.bytes_used(), 10);
    }

    #[test]
    fn begin_write_pins_and_grow_accounts() {
        let mut index = ChunkIndex::new(1000);
        put(&mut index, key(1, 0), 10, false);
        assert!(index.begin_write(key(1, 0)).is_some());
        assert!(index.begin_write(key(1, 9)).is_none());
        assert_eq!(index.dirty_bytes(), 10);
        index.grow(key(1, 0), 40);
        assert_eq!((index.bytes_used(), index.dirty_bytes()), (40, 40));
        let dirty = index.dirty_chunks(key(1, 0).fid);
        assert_eq!(dirty.len(), 1);
        assert_eq!(dirty[0].1.len, 40);
    }

    #[test]
    fn truncate_drops_and_cuts() {
        let mut index = ChunkIndex::new(10 * CHUNK_BYTES);
        put(&mut index, key(1, 0), CHUNK_BYTES, false);
        put(&mut index, key(1, 1), CHUNK_BYTES, true);
        put(&mut index, key(1, 2), 5, false);
        let (evicted, cut) = index.truncate(key(1, 0).fid, CHUNK_BYTES + 100);
        assert_eq!(
            evicted.iter().map(|e| e.key).collect::<Vec<_>>(),
            [key(1, 2)]
        );
        let (cut_key, meta) = cut.unwrap();
        assert_eq!((cut_key, meta.len), (key(1, 1), 100));
        assert_eq!(index.bytes_used(), CHUNK_BYTES + 100);
        assert_eq!(index.dirty_bytes(), 100);
    }

    #[test]
    fn drop_generation_spares_a_newer_chunk() {
        let mut index = ChunkIndex::new(1000);
        put(&mut index, key(1, 0), 10, false);
        let old = index.lookup(key(1, 0), V1).unwrap().generation;
        put(&mut index, key(1, 0), 20, false);
        assert!(index.drop_generation(key(1, 0), old).is_none());
        assert_eq!(index.bytes_used(), 20);
        let new = index.lookup(key(1, 0), V1).unwrap().generation;
        let dropped = index.drop_generation(key(1, 0), new).unwrap();
        assert!(dropped.last_of_fid);
        assert_eq!(index.bytes_used(), 0);
    }

    #[test]
    fn drop_fid_reports_last_chunk() {
        let mut index = ChunkIndex::new(1000);
        put(&mut index, key(1, 0), 10, false);
        put(&mut index, key(1, 1), 10, true);
        let dropped = index.drop_fid(key(1, 0).fid);
        assert_eq!(dropped.len(), 2);
        assert_eq!(dropped.iter().filter(|e| e.last_of_fid).count(), 1);
        assert!(!index.has_fid(key(1, 0).fid));
        assert_eq!((index.bytes_used(), index.dirty_bytes()), (0, 0));
    }
}
