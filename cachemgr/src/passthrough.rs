//! Which kernel opens of each inode are passthrough opens (the kernel reads their version
//! file itself) and which go through the mount, and so what a new open may be given.
//! Invariant: an inode is never given a passthrough open while this table counts a normal
//! one of it, nor a normal open or a second backing file while it counts a passthrough
//! one; counts fall only at `release`, after the kernel's own, so they never undercount.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use proto::{DataVersion, Fid};

use crate::chunk_index::Generation;
use crate::inode::Ino;

/// Whether a mount gives passthrough opens (`--passthrough`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PassthroughMode {
    /// Where the kernel and this process's capabilities allow it.
    #[default]
    Auto,
    /// Never: every open goes through the mount.
    Off,
}

impl std::str::FromStr for PassthroughMode {
    type Err = String;

    fn from_str(text: &str) -> Result<PassthroughMode, String> {
        match text {
            "auto" => Ok(PassthroughMode::Auto),
            "off" => Ok(PassthroughMode::Off),
            other => Err(format!(
                "{other:?} is not a passthrough mode; use auto or off"
            )),
        }
    }
}

/// Names one binding of an inode to a version file, from its first passthrough open to
/// the release of its last: the FUSE side keeps the kernel's backing id under it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BindingId(pub u64);

/// An inode's passthrough opens and the version file the kernel reads for them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Binding {
    pub id: BindingId,
    pub fid: Fid,
    pub file: Generation,
    /// The data version the file shows now.
    pub shows: DataVersion,
    handles: u32,
    /// Of `handles`, those opened for writing: the kernel writes their bytes straight
    /// into the file, and the mount stores the file at their close.
    writers: u32,
    /// The file as it was when its bytes were last known to be stored (or when its
    /// first writer joined): a close of a writer that wrote nothing stores nothing.
    pub stored: Option<HeldStamp>,
    /// The kernel's backing id is registered: later opens can reuse it.
    ready: bool,
}

/// How far a change time is trusted to move on the next change of a file: a coarse
/// clock ticks every few milliseconds, so a change within the tick of the last one keeps
/// its time; one after this much since shows a later time.
const CHANGE_TIME_GRAIN_NS: i128 = 50_000_000;

/// A bound file's change and modification times and length, and when they were read:
/// the kernel tells the mount nothing of what passthrough opens write, but the file's
/// times move with every write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldStamp {
    changed_ns: i128,
    modified_ns: i128,
    length: u64,
    read_ns: i128,
}

impl HeldStamp {
    /// `meta` of a bound file, read now.
    pub fn read(meta: &std::fs::Metadata) -> HeldStamp {
        use std::os::unix::fs::MetadataExt;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        HeldStamp {
            changed_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
            modified_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            length: meta.len(),
            read_ns: now,
        }
    }

    /// Whether the file surely did not change between `self` and `later`: the same times
    /// and length, and `self` read long enough after the file's last change that any
    /// change since would have shown a later time, however coarse the clock.
    pub fn unchanged_at(&self, later: &HeldStamp) -> bool {
        (self.changed_ns, self.modified_ns, self.length)
            == (later.changed_ns, later.modified_ns, later.length)
            && self.read_ns - self.changed_ns > CHANGE_TIME_GRAIN_NS
    }
}

#[derive(Debug, Default)]
struct InodeOpens {
    /// Opens answered through the mount and not yet released.
    normal: u32,
    binding: Option<Binding>,
}

/// What a new open of an inode is to get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Through the mount (counted as such already).
    Normal,
    /// A passthrough open on the inode's bound file, which shows the wanted version
    /// (counted already).
    Reuse(BindingId),
    /// No binding and no normal open: the caller looks for a complete version file and
    /// calls `bind`, or `normal` when there is none.
    TryBind,
    /// The inode is bound to a file showing an older version, and the kernel gives it no
    /// other: the caller brings that file to the version wanted (`rebound`), then asks
    /// again.
    Rebind(Binding),
    /// A write open while passthrough opens are live: the kernel gives an inode with a
    /// backing file no other kind of open (not even a direct-I/O one), so it becomes a
    /// passthrough open of the binding too (counted already), its writes going into the
    /// version file, which the mount stores at its close (`Manager::store_passthrough_writes`).
    JoinWriter(BindingId),
    /// A read open that could be a passthrough open but for normal opens this table still
    /// counts (a close's `release` may be just behind this open): the caller may wait a
    /// moment for them and ask again, or count it (`normal`) and go through the mount.
    NormalLive,
    /// The binding's first open is still registering its backing file: the caller waits
    /// for it (`ready`, or a refusal) and asks again.
    Wait,
}

/// The kernel's opens of each inode, as this mount answered them. Pure.
#[derive(Debug, Default)]
pub struct KernelOpens {
    inodes: HashMap<Ino, InodeOpens>,
    next_binding: u64,
}

impl KernelOpens {
    /// Decides a new open of `ino`, which wants `version` (current under its callback).
    /// `eligible`: passthrough is on for this mount and the open only reads.
    pub fn decide(
        &mut self,
        ino: Ino,
        write: bool,
        version: DataVersion,
        enabled: bool,
    ) -> Decision {
        let opens = self.inodes.entry(ino).or_default();
        if let Some(binding) = &mut opens.binding {
            if !binding.ready {
                return Decision::Wait;
            }
            if binding.shows != version {
                return Decision::Rebind(*binding);
            }
            binding.handles += 1;
            if write {
                binding.writers += 1;
                return Decision::JoinWriter(binding.id);
            }
            return Decision::Reuse(binding.id);
        }
        if write || !enabled {
            opens.normal += 1;
            return Decision::Normal;
        }
        if opens.normal > 0 {
            return Decision::NormalLive;
        }
        Decision::TryBind
    }

    /// Counts a normal open of `ino` (after `TryBind` found nothing, or a create).
    pub fn normal(&mut self, ino: Ino) {
        self.inodes.entry(ino).or_default().normal += 1;
    }

    /// Binds `ino` to `file` showing `version` for a first passthrough open; `None` when
    /// another open was answered meanwhile (the caller lets `file` go and asks again).
    pub fn bind(
        &mut self,
        ino: Ino,
        fid: Fid,
        file: Generation,
        version: DataVersion,
    ) -> Option<BindingId> {
        let opens = self.inodes.entry(ino).or_default();
        if opens.binding.is_some() || opens.normal > 0 {
            return None;
        }
        self.next_binding += 1;
        let id = BindingId(self.next_binding);
        opens.binding = Some(Binding {
            id,
            fid,
            file,
            shows: version,
            handles: 1,
            writers: 0,
            stored: None,
            ready: false,
        });
        Some(id)
    }

    /// The binding `id`'s backing file is registered with the kernel.
    pub fn ready(&mut self, ino: Ino, id: BindingId) {
        if let Some(binding) = self
            .inodes
            .get_mut(&ino)
            .and_then(|o| o.binding.as_mut())
            .filter(|b| b.id == id)
        {
            binding.ready = true;
        }
    }

    /// The binding `id`'s file now shows `version`; `false` when it ended meanwhile.
    pub fn rebound(&mut self, ino: Ino, id: BindingId, version: DataVersion) -> bool {
        match self.inodes.get_mut(&ino).and_then(|o| o.binding.as_mut()) {
            Some(binding) if binding.id == id => {
                binding.shows = version;
                true
            }
            _ => false,
        }
    }

    /// The binding of `ino`, if any.
    pub fn binding(&self, ino: Ino) -> Option<Binding> {
        self.inodes.get(&ino).and_then(|o| o.binding)
    }

    /// Notes that binding `id`'s file, as `stamp` read it, is stored (or known to be).
    pub fn set_stored(&mut self, ino: Ino, id: BindingId, stamp: HeldStamp) {
        if let Some(binding) = self
            .inodes
            .get_mut(&ino)
            .and_then(|o| o.binding.as_mut())
            .filter(|b| b.id == id)
        {
            binding.stored = Some(stamp);
        }
    }

    /// The binding of `ino` while an open of it writes through the kernel into its file.
    pub fn written(&self, ino: Ino) -> Option<Binding> {
        self.binding(ino).filter(|b| b.writers > 0)
    }

    /// A passthrough open the kernel was to get could not be made (its backing file was
    /// refused): it becomes a normal open. Returns the binding it ended, if it was the
    /// binding's only open.
    pub fn unbind_failed(&mut self, ino: Ino, id: BindingId) -> Option<Binding> {
        let ended = self.release_passthrough(ino, id, false);
        self.normal(ino);
        ended
    }

    /// The kernel released a normal open of `ino`.
    pub fn release_normal(&mut self, ino: Ino) {
        if let Some(opens) = self.inodes.get_mut(&ino) {
            opens.normal = opens.normal.saturating_sub(1);
            self.forget_idle(ino);
        }
    }

    /// The kernel released a passthrough open of `ino` under binding `id` (`writer`: one
    /// opened for writing). Returns the binding when that was its last open: its file
    /// can be let go.
    pub fn release_passthrough(
        &mut self,
        ino: Ino,
        id: BindingId,
        writer: bool,
    ) -> Option<Binding> {
        let opens = self.inodes.get_mut(&ino)?;
        let binding = opens.binding.as_mut().filter(|b| b.id == id)?;
        binding.handles -= 1;
        if writer {
            binding.writers = binding.writers.saturating_sub(1);
        }
        if binding.handles > 0 {
            return None;
        }
        let ended = opens.binding.take();
        self.forget_idle(ino);
        ended
    }

    fn forget_idle(&mut self, ino: Ino) {
        if self
            .inodes
            .get(&ino)
            .is_some_and(|o| o.normal == 0 && o.binding.is_none())
        {
            self.inodes.remove(&ino);
        }
    }
}

/// What the manager keeps of its passthrough opens: the table, whether they are on, and
/// a signal for write opens waiting for passthrough opens to be released. (Their counts
/// are in `figures::DataPathFigures`.)
#[derive(Debug, Default)]
pub struct Passthrough {
    pub opens: parking_lot::Mutex<KernelOpens>,
    enabled: AtomicBool,
    /// Notified whenever a passthrough open is released or a binding becomes ready.
    pub changed: tokio::sync::Notify,
}

impl Passthrough {
    /// Whether this mount gives passthrough opens at all (the FUSE session's `init`
    /// decides; a kernel refusing backing files turns it off).
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    pub fn set_enabled(&self, enabled: bool) {
        self.enabled.store(enabled, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use proto::{Uniquifier, VnodeId, VolumeId};

    use super::*;

    const INO: Ino = Ino(7);
    const V1: DataVersion = DataVersion(1);
    const V2: DataVersion = DataVersion(2);

    fn fid() -> Fid {
        Fid {
            volume: VolumeId(1),
            vnode: VnodeId(2),
            unique: Uniquifier(1),
        }
    }

    #[test]
    fn a_passthrough_binding_is_shared_and_ends_with_its_last_open() {
        let mut opens = KernelOpens::default();
        assert_eq!(opens.decide(INO, false, V1, true), Decision::TryBind);
        let id = opens.bind(INO, fid(), Generation(5), V1).unwrap();
        assert_eq!(
            opens.decide(INO, false, V1, true),
            Decision::Wait,
            "not registered yet"
        );
        opens.ready(INO, id);
        assert_eq!(opens.decide(INO, false, V1, true), Decision::Reuse(id));
        assert_eq!(opens.release_passthrough(INO, id, false), None);
        let ended = opens.release_passthrough(INO, id, false).unwrap();
        assert_eq!(ended.file, Generation(5));
        assert_eq!(opens.decide(INO, false, V1, true), Decision::TryBind);
    }

    #[test]
    fn normal_and_passthrough_opens_never_mix() {
        let mut opens = KernelOpens::default();
        // A write open (or passthrough off) goes through the mount, and then so does
        // every read open until it is released.
        assert_eq!(opens.decide(INO, true, V1, true), Decision::Normal);
        assert_eq!(opens.decide(INO, false, V1, true), Decision::NormalLive);
        opens.normal(INO);
        assert_eq!(opens.decide(INO, false, V1, false), Decision::Normal);
        for _ in 0..3 {
            opens.release_normal(INO);
        }
        assert_eq!(opens.decide(INO, false, V1, true), Decision::TryBind);
        // An open answered meanwhile keeps the binding from being made.
        opens.normal(INO);
        assert_eq!(opens.bind(INO, fid(), Generation(5), V1), None);
        opens.release_normal(INO);
        opens.release_normal(INO);
        let id = opens.bind(INO, fid(), Generation(5), V1).unwrap();
        opens.ready(INO, id);
        // A write open of a bound inode joins the binding, counted as its writer.
        assert_eq!(opens.decide(INO, true, V1, true), Decision::JoinWriter(id));
        assert_eq!(opens.written(INO).map(|b| b.id), Some(id));
        assert_eq!(opens.release_passthrough(INO, id, true), None);
        assert_eq!(opens.written(INO), None, "its writer was released");
        assert_eq!(
            opens.release_passthrough(INO, id, false).map(|b| b.id),
            Some(id)
        );
        assert_eq!(opens.decide(INO, true, V1, true), Decision::Normal);
    }

    #[test]
    fn a_bound_file_counts_as_unchanged_only_when_its_times_could_not_hide_a_change() {
        let stamp = |changed_ns, length, read_ns| HeldStamp {
            changed_ns,
            modified_ns: changed_ns,
            length,
            read_ns,
        };
        let second = 1_000_000_000;
        let old = stamp(5 * second, 10, 9 * second);
        assert!(old.unchanged_at(&stamp(5 * second, 10, 20 * second)));
        assert!(!old.unchanged_at(&stamp(5 * second + 1, 10, 20 * second)));
        assert!(!old.unchanged_at(&stamp(5 * second, 11, 20 * second)));
        // Read within the clock's grain of the last change: a write just after it may
        // have kept the same time.
        let fresh = stamp(5 * second, 10, 5 * second + 1_000_000);
        assert!(!fresh.unchanged_at(&stamp(5 * second, 10, 20 * second)));
    }

    #[test]
    fn a_new_version_rebinds_the_bound_file_before_any_open_reads_it() {
        let mut opens = KernelOpens::default();
        opens.decide(INO, false, V1, true);
        let id = opens.bind(INO, fid(), Generation(5), V1).unwrap();
        opens.ready(INO, id);
        let Decision::Rebind(binding) = opens.decide(INO, false, V2, true) else {
            panic!("an open of a new version must not reuse the old bytes");
        };
        assert_eq!((binding.id, binding.shows), (id, V1));
        assert!(opens.rebound(INO, id, V2));
        assert_eq!(opens.decide(INO, false, V2, true), Decision::Reuse(id));
        assert!(!opens.rebound(INO, BindingId(99), V1));
    }

    #[test]
    fn a_refused_backing_file_turns_the_open_normal() {
        let mut opens = KernelOpens::default();
        opens.decide(INO, false, V1, true);
        let id = opens.bind(INO, fid(), Generation(5), V1).unwrap();
        assert!(opens.unbind_failed(INO, id).is_some());
        assert_eq!(opens.decide(INO, false, V1, true), Decision::NormalLive);
        opens.release_normal(INO);
        assert_eq!(opens.decide(INO, false, V1, true), Decision::TryBind);
    }
}
