//! The in-memory index of the chunk cache: which chunks of which files are held, at which
//! data version and length, which are dirty, where their bytes live (a version file or a
//! file of their own), and the order the clean ones were used in.
//! Invariant: a dirty chunk, or a chunk of a version file a passthrough open holds, is
//! never evicted; clean ones go, least recently used first, whenever the total passes the
//! cap, and a held version file's bytes count against the cap until it is let go.

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

/// Where a chunk's bytes live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Home {
    /// A file of its own, named by the chunk's generation, holding the chunk from offset 0:
    /// the home of a write's chunks.
    Own,
    /// At the chunk's own offset in the version file of that generation: one sparse file
    /// per (fid, data version), which fetched chunks fill and a passthrough open reads.
    Version(Generation),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkMeta {
    pub data_version: DataVersion,
    pub len: u64,
    pub dirty: bool,
    /// Fresh for every chunk cached, wherever its bytes live.
    pub generation: Generation,
    pub home: Home,
    last_use: u64,
}

/// What the caller does with the bytes of a chunk removed from the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// Delete the chunk's own file (named by its generation).
    DeleteChunkFile,
    /// Punch the chunk's slot out of this version file.
    PunchSlot(Generation),
    /// This version file holds no chunk and no open: delete it.
    DeleteVersionFile(Generation),
    /// Leave the bytes: a passthrough open reads them (its file goes when let go).
    Keep,
}

/// A chunk removed from the index; the caller releases its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Evicted {
    pub key: ChunkKey,
    pub generation: Generation,
    /// No data of this fid is left in the cache.
    pub last_of_fid: bool,
    pub release: Release,
}

/// One version file: the chunks of one (fid, data version) at their offsets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct VersionFile {
    fid: Fid,
    data_version: DataVersion,
    /// Indexed chunks whose home is this file.
    chunks: u64,
    /// Passthrough opens holding it: while any does, its chunks are pinned and its bytes
    /// stay, indexed or not.
    holds: u32,
    /// Bytes of chunks dropped from the index while it was held, still counted in
    /// `bytes_used` until the last hold goes.
    retired_bytes: u64,
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
    version_files: HashMap<Generation, VersionFile>,
    /// Per fid, the version file its fetched chunks go to now.
    current_file: HashMap<Fid, Generation>,
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
            version_files: HashMap::new(),
            current_file: HashMap::new(),
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

    /// Whether the chunk cached under `generation` is still indexed (no LRU touch).
    pub fn still_cached(&self, key: ChunkKey, generation: Generation) -> bool {
        self.chunks
            .get(&key)
            .is_some_and(|m| m.generation == generation)
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
        if !self.pinned(&meta) {
            let now = self.tick();
            self.lru.remove(&meta.last_use);
            self.lru.insert(now, key);
            if let Some(m) = self.chunks.get_mut(&key) {
                m.last_use = now;
            }
        }
        self.chunks.get(&key).copied()
    }

    /// Whether the chunk stays whatever the cap says: dirty, or in a held version file.
    fn pinned(&self, meta: &ChunkMeta) -> bool {
        meta.dirty
            || match meta.home {
                Home::Own => false,
                Home::Version(file) => self.version_files.get(&file).is_some_and(|f| f.holds > 0),
            }
    }

    /// The version file fetched chunks of `fid` at `data_version` go to: the fid's current
    /// one when it holds that version, else a new one (`true`: the caller creates it).
    /// A version file is never given a second version.
    pub fn version_file_for(&mut self, fid: Fid, data_version: DataVersion) -> (Generation, bool) {
        if let Some(&file) = self.current_file.get(&fid)
            && self
                .version_files
                .get(&file)
                .is_some_and(|f| f.data_version == data_version)
        {
            return (file, false);
        }
        let file = self.reserve_generation();
        self.version_files.insert(
            file,
            VersionFile {
                fid,
                data_version,
                chunks: 0,
                holds: 0,
                retired_bytes: 0,
            },
        );
        self.current_file.insert(fid, file);
        (file, true)
    }

    /// Adds a chunk whose bytes the caller has put (or is putting) at `home` under
    /// `generation`. A dirty chunk already there is never replaced by a clean one: the
    /// insert is refused (`false`) and the caller releases the new bytes as told.
    pub fn insert(
        &mut self,
        key: ChunkKey,
        data_version: DataVersion,
        len: u64,
        dirty: bool,
        generation: Generation,
        home: Home,
    ) -> (bool, Vec<Evicted>) {
        let mut evicted = Vec::new();
        if self.chunks.get(&key).is_some_and(|old| old.dirty && !dirty) {
            let release = match home {
                Home::Own => Release::DeleteChunkFile,
                Home::Version(file) => self.release_slot(file, 0),
            };
            return (
                false,
                vec![Evicted {
                    key,
                    generation,
                    last_of_fid: false,
                    release,
                }],
            );
        }
        // Counted in its file first, so replacing that file's only chunk never empties it.
        if let Home::Version(file) = home
            && let Some(f) = self.version_files.get_mut(&file)
        {
            f.chunks += 1;
        }
        if let Some(mut replaced) = self.remove(key) {
            // Replaced, not gone: the fid keeps data; and a slot the new bytes overwrite
            // needs no punching.
            replaced.last_of_fid = false;
            if let Release::PunchSlot(file) = replaced.release
                && home == Home::Version(file)
            {
                replaced.release = Release::Keep;
            }
            evicted.push(replaced);
        }
        let now = self.tick();
        let meta = ChunkMeta {
            data_version,
            len,
            dirty,
            generation,
            home,
            last_use: now,
        };
        self.chunks.insert(key, meta);
        self.by_fid.entry(key.fid).or_default().insert(key.index);
        self.bytes_used += len;
        if dirty {
            self.dirty_bytes += len;
        }
        if !self.pinned(&meta) {
            self.lru.insert(now, key);
        }
        evicted.extend(self.evict());
        (true, evicted)
    }

    /// Pins a present chunk for a write: it becomes dirty. `None` when absent. A chunk in
    /// a version file must first be moved to a file of its own (`rehome`): version files
    /// are never written in place.
    pub fn begin_write(&mut self, key: ChunkKey) -> Option<Generation> {
        let meta = *self.chunks.get(&key)?;
        if meta.home != Home::Own {
            return None;
        }
        if !meta.dirty {
            if !self.pinned(&meta) {
                self.lru.remove(&meta.last_use);
            }
            self.dirty_bytes += meta.len;
            if let Some(m) = self.chunks.get_mut(&key) {
                m.dirty = true;
            }
        }
        Some(meta.generation)
    }

    /// Moves a chunk still cached under `old` into a file of its own written under `new`;
    /// returns what to do with its old slot, or `None` (the caller deletes its new file)
    /// when that chunk is gone or replaced meanwhile.
    pub fn rehome(&mut self, key: ChunkKey, old: Generation, new: Generation) -> Option<Evicted> {
        let meta = *self.chunks.get(&key)?;
        if meta.generation != old {
            return None;
        }
        let Home::Version(file) = meta.home else {
            return None;
        };
        // Its file holds one chunk fewer: moving out the last one deletes the file.
        if let Some(f) = self.version_files.get_mut(&file) {
            f.chunks -= 1;
        }
        let release = self.release_slot(file, meta.len);
        if let Some(m) = self.chunks.get_mut(&key) {
            m.home = Home::Own;
            m.generation = new;
        }
        // It may have been pinned by a hold on its old file only.
        let now = self.tick();
        if let Some(m) = self.chunks.get_mut(&key) {
            self.lru.remove(&m.last_use);
            m.last_use = now;
        }
        let moved = self.chunks[&key];
        if !self.pinned(&moved) {
            self.lru.insert(now, key);
        }
        Some(Evicted {
            key,
            generation: old,
            last_of_fid: false,
            release,
        })
    }

    /// A slot of `file` no longer indexed: what to do with its bytes. `len` bytes of a
    /// held file stay counted as retired.
    fn release_slot(&mut self, file: Generation, len: u64) -> Release {
        let Some(f) = self.version_files.get_mut(&file) else {
            return Release::Keep;
        };
        if f.holds > 0 {
            f.retired_bytes += len;
            self.bytes_used += len;
            return Release::Keep;
        }
        if f.chunks == 0 {
            let fid = f.fid;
            self.version_files.remove(&file);
            if self.current_file.get(&fid) == Some(&file) {
                self.current_file.remove(&fid);
            }
            return Release::DeleteVersionFile(file);
        }
        Release::PunchSlot(file)
    }

    /// The version file a passthrough open of `fid` at `data_version` (`size` bytes) may
    /// read: one holding every chunk of that version, clean, at its offset.
    pub fn passthrough_file(
        &self,
        fid: Fid,
        data_version: DataVersion,
        size: u64,
    ) -> Option<Generation> {
        let count = size.div_ceil(CHUNK_BYTES);
        if count == 0 {
            return None;
        }
        let mut found = None;
        for index in 0..count {
            let meta = self.chunks.get(&ChunkKey { fid, index })?;
            let Home::Version(file) = meta.home else {
                return None;
            };
            let want = (size - index * CHUNK_BYTES).min(CHUNK_BYTES);
            if meta.dirty || meta.data_version != data_version || meta.len != want {
                return None;
            }
            if *found.get_or_insert(file) != file {
                return None;
            }
        }
        found
    }

    /// Chunks whose home is `file`, in offset order.
    pub fn chunks_in(&self, file: Generation) -> Vec<(ChunkKey, ChunkMeta)> {
        let Some(f) = self.version_files.get(&file) else {
            return Vec::new();
        };
        let fid = f.fid;
        self.by_fid.get(&fid).map_or_else(Vec::new, |indexes| {
            indexes
                .iter()
                .map(|&index| ChunkKey { fid, index })
                .filter_map(|key| self.chunks.get(&key).map(|m| (key, *m)))
                .filter(|(_, m)| m.home == Home::Version(file))
                .collect()
        })
    }

    /// A passthrough open holds `file`: its chunks are pinned until the last hold goes.
    /// `false` when no such file is indexed.
    pub fn hold(&mut self, file: Generation) -> bool {
        let Some(f) = self.version_files.get_mut(&file) else {
            return false;
        };
        f.holds += 1;
        if f.holds == 1 {
            for (_, meta) in self.chunks_in(file) {
                if !meta.dirty {
                    self.lru.remove(&meta.last_use);
                }
            }
        }
        true
    }

    /// One hold on `file` ends. At the last, its chunks rejoin the LRU order, its retired
    /// bytes leave the count, and a file with no chunk left goes (as an `Evicted` with no
    /// key of its own: the first chunk key of its fid, generation `file`).
    pub fn unhold(&mut self, file: Generation) -> Vec<Evicted> {
        let Some(f) = self.version_files.get_mut(&file) else {
            return Vec::new();
        };
        f.holds = f.holds.saturating_sub(1);
        if f.holds > 0 {
            return Vec::new();
        }
        let (fid, retired, chunks) = (f.fid, f.retired_bytes, f.chunks);
        f.retired_bytes = 0;
        self.bytes_used -= retired;
        let mut evicted = Vec::new();
        if chunks == 0 {
            self.version_files.remove(&file);
            if self.current_file.get(&fid) == Some(&file) {
                self.current_file.remove(&fid);
            }
            evicted.push(Evicted {
                key: ChunkKey { fid, index: 0 },
                generation: file,
                last_of_fid: false,
                release: Release::DeleteVersionFile(file),
            });
        } else {
            for (key, meta) in self.chunks_in(file) {
                if !meta.dirty {
                    let now = self.tick();
                    if let Some(m) = self.chunks.get_mut(&key) {
                        m.last_use = now;
                    }
                    self.lru.insert(now, key);
                }
            }
        }
        evicted.extend(self.evict());
        evicted
    }

    /// Bytes a held `file` shows beyond its indexed chunks (a newer version copied in for
    /// the opens bound to it) are counted as retired: at least `bytes` in all.
    pub fn count_held_bytes(&mut self, file: Generation, bytes: u64) -> Vec<Evicted> {
        let mut indexed = 0;
        for (_, meta) in self.chunks_in(file) {
            indexed += meta.len;
        }
        let Some(f) = self.version_files.get_mut(&file) else {
            return Vec::new();
        };
        if f.holds == 0 {
            return Vec::new();
        }
        let want = bytes.saturating_sub(indexed);
        if want > f.retired_bytes {
            self.bytes_used += want - f.retired_bytes;
            f.retired_bytes = want;
        }
        self.evict()
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
                let meta = *meta;
                if !self.pinned(&meta) {
                    self.lru.insert(now, key);
                }
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
        // Their version files hold `to`'s bytes too.
        for f in self.version_files.values_mut() {
            if f.fid == fid && (from..to).contains(&f.data_version) {
                f.data_version = to;
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
    /// is cut, and returned with its new length so the caller can cut its file, except
    /// one in a version file, which is never written in place: that one goes too.
    pub fn truncate(
        &mut self,
        fid: Fid,
        size: u64,
    ) -> (Vec<Evicted>, Option<(ChunkKey, ChunkMeta)>) {
        let straddling = ChunkKey {
            fid,
            index: size / CHUNK_BYTES,
        };
        let keep = size - straddling.offset();
        let evicted = self.drop_where(fid, |key, meta| {
            key.offset() >= size || (key == straddling && meta.home != Home::Own && meta.len > keep)
        });
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
        let meta = self.chunks.get(&key).copied()?;
        if !self.pinned(&meta) {
            self.lru.remove(&meta.last_use);
        }
        self.chunks.remove(&key);
        self.bytes_used -= meta.len;
        if meta.dirty {
            self.dirty_bytes -= meta.len;
        }
        let release = match meta.home {
            Home::Own => Release::DeleteChunkFile,
            Home::Version(file) => {
                if let Some(f) = self.version_files.get_mut(&file) {
                    f.chunks -= 1;
                }
                self.release_slot(file, meta.len)
            }
        };
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
            release,
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
        let (inserted, evicted) = index.insert(key, V1, len, dirty, generation, Home::Own);
        assert!(inserted);
        evicted
    }

    /// Caches a fetched chunk in the fid's version file of `version`.
    fn fetched(
        index: &mut ChunkIndex,
        key: ChunkKey,
        version: DataVersion,
        len: u64,
    ) -> (Generation, Vec<Evicted>) {
        let (file, _) = index.version_file_for(key.fid, version);
        let generation = index.reserve_generation();
        let (inserted, evicted) =
            index.insert(key, version, len, false, generation, Home::Version(file));
        assert!(inserted);
        (file, evicted)
    }

    fn keys(evicted: &[Evicted]) -> Vec<ChunkKey> {
        evicted.iter().map(|e| e.key).collect()
    }

    #[test]
    fn one_version_file_per_fid_and_version() {
        let mut index = ChunkIndex::new(10 * CHUNK_BYTES);
        let fid = key(1, 0).fid;
        let (first, new) = index.version_file_for(fid, V1);
        assert!(new);
        assert_eq!(index.version_file_for(fid, V1), (first, false));
        let (file, _) = fetched(&mut index, key(1, 0), V1, CHUNK_BYTES);
        assert_eq!(file, first);
        fetched(&mut index, key(1, 1), V1, 10);
        assert_eq!(
            index.passthrough_file(fid, V1, CHUNK_BYTES + 10),
            Some(first)
        );
        assert_eq!(index.passthrough_file(fid, V1, CHUNK_BYTES + 11), None);
        assert_eq!(
            index.passthrough_file(fid, DataVersion(2), CHUNK_BYTES + 10),
            None
        );
        // A new version gets a file of its own; the old one is never given it.
        let (second, new) = index.version_file_for(fid, DataVersion(2));
        assert!(new && second != first);
        let dropped = index.drop_stale(fid, DataVersion(2));
        assert_eq!(keys(&dropped), [key(1, 0), key(1, 1)]);
        assert_eq!(dropped[0].release, Release::PunchSlot(first));
        assert_eq!(dropped[1].release, Release::DeleteVersionFile(first));
        assert_eq!(index.bytes_used(), 0);
    }

    #[test]
    fn a_held_version_file_is_pinned_and_counted_until_let_go() {
        let mut index = ChunkIndex::new(3 * CHUNK_BYTES);
        let fid = key(1, 0).fid;
        let (file, _) = fetched(&mut index, key(1, 0), V1, CHUNK_BYTES);
        fetched(&mut index, key(1, 1), V1, CHUNK_BYTES);
        assert!(index.hold(file));
        // Other files' chunks come and go; the held ones stay.
        for vnode in 2..6 {
            fetched(&mut index, key(vnode, 0), V1, CHUNK_BYTES);
        }
        assert!(index.lookup(key(1, 0), V1).is_some());
        assert!(index.lookup(key(1, 1), V1).is_some());
        assert!(index.bytes_used() <= 3 * CHUNK_BYTES);
        // A new version drops them from the index, but the open still reads the file:
        // nothing is punched and its bytes still count.
        let dropped = index.drop_stale(fid, DataVersion(2));
        assert_eq!(keys(&dropped), [key(1, 0), key(1, 1)]);
        assert!(dropped.iter().all(|e| e.release == Release::Keep));
        assert!(index.bytes_used() >= 2 * CHUNK_BYTES);
        // A second open of it, then both let go: the file goes and its bytes with it.
        assert!(index.hold(file));
        assert!(index.unhold(file).is_empty());
        let gone = index.unhold(file);
        assert_eq!(gone[0].release, Release::DeleteVersionFile(file));
        assert!(index.bytes_used() <= CHUNK_BYTES);
        assert!(!index.hold(file), "a file let go is no longer indexed");
    }

    #[test]
    fn held_chunks_rejoin_the_lru_when_let_go() {
        let mut index = ChunkIndex::new(2 * CHUNK_BYTES);
        let (file, _) = fetched(&mut index, key(1, 0), V1, CHUNK_BYTES);
        assert!(index.hold(file));
        fetched(&mut index, key(2, 0), V1, CHUNK_BYTES);
        let (_, evicted) = fetched(&mut index, key(3, 0), V1, CHUNK_BYTES);
        assert_eq!(keys(&evicted), [key(2, 0)], "the held chunk is pinned");
        let evicted = index.unhold(file);
        assert!(evicted.is_empty());
        let (_, evicted) = fetched(&mut index, key(4, 0), V1, CHUNK_BYTES);
        assert_eq!(
            keys(&evicted),
            [key(3, 0)],
            "let go, it is used more recently"
        );
    }

    /// Moving the two chunks of a version file out (written) punches the first slot and
    /// deletes the file with the second: no version file is left behind empty.
    #[test]
    fn moving_out_a_version_files_last_chunk_deletes_the_file() {
        let mut index = ChunkIndex::new(4 * CHUNK_BYTES);
        let (file, _) = fetched(&mut index, key(1, 0), V1, CHUNK_BYTES);
        fetched(&mut index, key(1, 1), V1, CHUNK_BYTES);
        for (index_in_fid, release) in [
            (0, Release::PunchSlot(file)),
            (1, Release::DeleteVersionFile(file)),
        ] {
            let old = index.lookup(key(1, index_in_fid), V1).unwrap().generation;
            let own = index.reserve_generation();
            let moved = index.rehome(key(1, index_in_fid), old, own).unwrap();
            assert_eq!(moved.release, release);
        }
    }

    #[test]
    fn writes_never_land_in_a_version_file_and_dirty_data_is_never_evicted() {
        let mut index = ChunkIndex::new(2 * CHUNK_BYTES);
        let (file, _) = fetched(&mut index, key(1, 0), V1, CHUNK_BYTES);
        fetched(&mut index, key(1, 1), V1, CHUNK_BYTES);
        assert_eq!(index.begin_write(key(1, 0)), None, "must move out first");
        let old = index.lookup(key(1, 0), V1).unwrap().generation;
        let own = index.reserve_generation();
        let moved = index.rehome(key(1, 0), old, own).unwrap();
        assert_eq!(moved.release, Release::PunchSlot(file));
        assert_eq!(index.begin_write(key(1, 0)), Some(own));
        assert!(index.rehome(key(1, 0), old, own).is_none(), "already moved");
        for vnode in 2..6 {
            fetched(&mut index, key(vnode, 0), V1, CHUNK_BYTES);
        }
        assert!(
            index.lookup(key(1, 0), DataVersion(9)).is_some(),
            "dirty stays"
        );
        assert_eq!(index.dirty_bytes(), CHUNK_BYTES);
        assert_eq!(
            index.passthrough_file(key(1, 0).fid, V1, 2 * CHUNK_BYTES),
            None
        );
    }

    #[test]
    fn truncation_drops_a_straddling_chunk_of_a_version_file() {
        let mut index = ChunkIndex::new(10 * CHUNK_BYTES);
        fetched(&mut index, key(1, 0), V1, CHUNK_BYTES);
        fetched(&mut index, key(1, 1), V1, CHUNK_BYTES);
        let (evicted, cut) = index.truncate(key(1, 0).fid, CHUNK_BYTES + 5);
        assert_eq!(keys(&evicted), [key(1, 1)]);
        assert!(cut.is_none());
        assert_eq!(index.bytes_used(), CHUNK_BYTES);
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
        let (inserted, evicted) = index.insert(key(1, 0), V1, 20, false, generation, Home::Own);
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
