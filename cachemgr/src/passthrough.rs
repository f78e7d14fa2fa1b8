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
    /// The kernel's backing id is registered: later opens can reuse it.
    ready: bool,
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
    /// A write open while passthrough opens are live: the caller waits for their release
    /// and asks again.
    Drain,
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
            if write {
                return Decision::Drain;
            }
            if !binding.ready {
                return Decision::Wait;
            }
            if binding.shows != version {
                return Decision::Rebind(*binding);
            }
            binding.handles += 1;
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

    /// A passthrough open the kernel was to get could not be made (its backing file was
    /// refused): it becomes a normal open. Returns the binding it ended, if it was the
    /// binding's only open.
    pub fn unbind_failed(&mut self, ino: Ino, id: BindingId) -> Option<Binding> {
        let ended = self.release_passthrough(ino, id);
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

    /// The kernel released a passthrough open of `ino` under binding `id`. Returns the
    /// binding when that was its last open: its file can be let go.
    pub fn release_passthrough(&mut self, ino: Ino, id: BindingId) -> Option<Binding> {
        let opens = self.inodes.get_mut(&ino)?;
        let binding = opens.binding.as_mut().filter(|b| b.id == id)?;
        binding.handles -= 1;
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
        assert_eq!(opens.release_passthrough(INO, id), None);
        let ended = opens.release_passthrough(INO, id).unwrap();
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
        assert_eq!(opens.decide(INO, true, V1, true), Decision::Drain);
        assert_eq!(opens.release_passthrough(INO, id).map(|b| b.id), Some(id));
        assert_eq!(opens.decide(INO, true, V1, true), Decision::Normal);
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
