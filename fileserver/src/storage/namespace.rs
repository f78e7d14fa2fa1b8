//! The namespace operations of a volume: lookup, listing, and the changes of entries.
//! Invariant: a change is one transaction and bumps each directory it changes by one DV;
//! a directory's size is its entry count, its link count 2 + its subdirectories.

use proto::{
    CREATE_DATA_BYTES_MAX, DataVersion, DirEntry, ErrorCode, Fid, FileKind, Response, SetAttrs,
    Timestamp, Uniquifier, VnodeId, VnodeStatus, VolumeName,
};

use super::StorageError;
use super::data::{INLINE_BYTES_MAX, resize};
use super::outcomes::{Answer, Outcome, SequenceKey};
use super::records::{DataLocation, EntryKind, VnodeRecord, kind_from_code};
use super::transaction::Tx;
use super::vnode_lock::Access;
use super::volume::Volume;

/// What a create runs with the fid of the file it made (or found) once the change is
/// applied, just before the change's record is queued in the metadata log and with the
/// flusher held off (`Tx::log_ahead`): a caller queues there what must be durable with
/// the change (the creator's promise on the new file), so that one flush makes both
/// durable and the caller waits for one, not two. A failed batch, or a crash, that
/// loses the change may keep that record: a promise on a file nobody holds, whose only
/// effect is a needless break.
pub type Ahead = Box<dyn FnOnce(Fid) + Send>;

/// Has `ahead`, if any, run for `fid` just before `tx`'s batch record is queued.
fn queue_ahead(tx: &mut Tx<'_>, ahead: Option<Ahead>, fid: Fid) {
    if let Some(ahead) = ahead {
        tx.log_ahead(move || ahead(fid));
    }
}

/// Longest symlink target, as `PATH_MAX`.
pub const SYMLINK_TARGET_BYTES_MAX: usize = 4096;
/// Most links one file may have.
pub const LINK_COUNT_MAX: u32 = 65_000;

/// The outcome of `create`.
#[derive(Clone, Debug)]
pub struct Created {
    pub status: VnodeStatus,
    pub dir: VnodeStatus,
    /// False when a non-exclusive create found the file already there.
    pub created: bool,
}

/// The outcome of `remove`: the directory's and the removed vnode's new status.
#[derive(Clone, Debug)]
pub struct Removed {
    pub dir: VnodeStatus,
    /// The vnode that lost a link; `link_count` 0 means it is gone.
    pub target: VnodeStatus,
}

/// The outcome of `rename`.
#[derive(Clone, Debug)]
pub struct Renamed {
    pub from_dir: VnodeStatus,
    pub to_dir: VnodeStatus,
    pub moved: VnodeStatus,
    /// The vnode the rename replaced; `link_count` 0 means it is gone.
    pub replaced: Option<VnodeStatus>,
}

impl Volume {
    pub fn lookup(&self, dir: Fid, name: &str) -> Result<(VnodeStatus, VnodeStatus), StorageError> {
        proto::check_entry_name(name)?;
        self.read(|r| {
            let dir_record = r.directory(dir)?;
            let (vnode, _, _) = r.entry(dir.vnode, name)?.ok_or(ErrorCode::NoSuchEntry)?;
            let record = r.vnode(VnodeId(vnode))?;
            Ok((
                record.status(self.id, VnodeId(vnode)),
                dir_record.status(self.id, dir.vnode),
            ))
        })
    }

    /// Lists `dir` in name order after `after`: at most `count_max` entries and about
    /// `bytes_max` bytes of names; `more` says whether entries follow.
    pub fn read_dir(
        &self,
        dir: Fid,
        after: Option<&str>,
        count_max: usize,
        bytes_max: usize,
    ) -> Result<(VnodeStatus, Vec<DirEntry>, bool), StorageError> {
        self.read(|r| {
            let dir_record = r.directory(dir)?;
            let mut entries = Vec::new();
            let mut bytes = 0;
            let mut more = false;
            r.scan_entries(dir.vnode, after, |name, (vnode, unique, kind)| {
                if entries.len() >= count_max || bytes + name.len() + 32 > bytes_max {
                    more = true;
                    return Ok(false);
                }
                bytes += name.len() + 32;
                entries.push(DirEntry {
                    name: name.to_owned(),
                    fid: Fid {
                        volume: self.id,
                        vnode: VnodeId(vnode),
                        unique: Uniquifier(unique),
                    },
                    kind: match kind_from_code(kind) {
                        Some(EntryKind::Known(kind)) => kind,
                        // Devices are rare: their number costs one record read.
                        Some(EntryKind::Device) => r.vnode(VnodeId(vnode))?.kind,
                        None => {
                            return Err(r.corrupt(format!("entry {name:?} has kind code {kind}")));
                        }
                    },
                });
                Ok(true)
            })?;
            Ok((dir_record.status(self.id, dir.vnode), entries, more))
        })
    }

    // The changes. Each takes the sequence key of a `Sequenced` request, if any: with a
    // key already recorded the change is not applied again but answered from the record
    // (`Outcome::Replayed`); without a key it is always `Outcome::Applied`.

    /// Creates a file; a non-exclusive create of an existing file returns it unchanged.
    #[expect(
        clippy::too_many_arguments,
        reason = "the fields of a Create request, and its sequence key"
    )]
    pub fn create(
        &self,
        sequence: Option<SequenceKey>,
        dir: Fid,
        name: &str,
        mode: u32,
        uid: u32,
        gid: u32,
        exclusive: bool,
    ) -> Result<Outcome<Created>, StorageError> {
        self.create_logging_ahead(sequence, dir, name, mode, uid, gid, exclusive, None)
    }

    /// `create`, running `ahead` with the file's fid (made or found) in its transaction.
    #[expect(
        clippy::too_many_arguments,
        reason = "the fields of a Create request, its sequence key, and what to log ahead"
    )]
    pub fn create_logging_ahead(
        &self,
        sequence: Option<SequenceKey>,
        dir: Fid,
        name: &str,
        mode: u32,
        uid: u32,
        gid: u32,
        exclusive: bool,
        ahead: Option<Ahead>,
    ) -> Result<Outcome<Created>, StorageError> {
        proto::check_entry_name(name)?;
        let (id, name) = (self.id, name.to_owned());
        self.write_once(sequence, move |tx| {
            let dir_record = tx.directory(dir)?;
            if let Some((vnode, _, _)) = tx.entry(dir.vnode, &name)? {
                if exclusive {
                    return Err(ErrorCode::Exists.into());
                }
                let record = tx.vnode(VnodeId(vnode))?;
                if record.kind == FileKind::Directory {
                    return Err(ErrorCode::IsDirectory.into());
                }
                let status = record.status(id, VnodeId(vnode));
                queue_ahead(tx, ahead, status.fid);
                return Ok(Created {
                    status,
                    dir: dir_record.status(id, dir.vnode),
                    created: false,
                });
            }
            let record = VnodeRecord::new(FileKind::File, mode, uid, gid, dir.vnode);
            let (status, dir) = add_entry(tx, dir, &name, record)?;
            queue_ahead(tx, ahead, status.fid);
            Ok(Created {
                status,
                dir,
                created: true,
            })
        })
    }

    /// Creates the file `name` in `dir` holding `data`, kept inline: the entry, the
    /// record and the bytes commit together, so the file is never seen (nor recovered)
    /// without its bytes. A name that exists is `Exists`, whatever it names; more than
    /// `CREATE_DATA_BYTES_MAX` bytes is `InvalidArgument`. The file's DV is that of any
    /// new file: nobody saw it before it held these bytes.
    #[expect(
        clippy::too_many_arguments,
        reason = "the fields of a CreateWithData request, and its sequence key"
    )]
    pub fn create_with_data(
        &self,
        sequence: Option<SequenceKey>,
        dir: Fid,
        name: &str,
        mode: u32,
        uid: u32,
        gid: u32,
        data: Vec<u8>,
    ) -> Result<Outcome<(VnodeStatus, VnodeStatus)>, StorageError> {
        self.create_with_data_logging_ahead(sequence, dir, name, mode, uid, gid, data, None)
    }

    /// `create_with_data`, running `ahead` with the new file's fid in its transaction.
    #[expect(
        clippy::too_many_arguments,
        reason = "the fields of a CreateWithData request, its sequence key, and what to log ahead"
    )]
    pub fn create_with_data_logging_ahead(
        &self,
        sequence: Option<SequenceKey>,
        dir: Fid,
        name: &str,
        mode: u32,
        uid: u32,
        gid: u32,
        data: Vec<u8>,
        ahead: Option<Ahead>,
    ) -> Result<Outcome<(VnodeStatus, VnodeStatus)>, StorageError> {
        proto::check_entry_name(name)?;
        let size = data.len() as u64;
        if size > u64::from(CREATE_DATA_BYTES_MAX).min(INLINE_BYTES_MAX) {
            return Err(ErrorCode::InvalidArgument.into());
        }
        let name = name.to_owned();
        self.write_once(sequence, move |tx| {
            let header = tx.header_mut()?;
            let used = header.bytes_used.saturating_add(size);
            if size > 0 && header.quota_bytes != 0 && used > header.quota_bytes {
                return Err(ErrorCode::QuotaExceeded.into());
            }
            header.bytes_used = used;
            let mut record = VnodeRecord::new(FileKind::File, mode, uid, gid, dir.vnode);
            record.size = size;
            let (status, dir_status) = add_entry(tx, dir, &name, record)?;
            tx.put_file_data(status.fid.vnode, data);
            queue_ahead(tx, ahead, status.fid);
            Ok((status, dir_status))
        })
    }

    /// Fills the file `fid`, unchanged since `base`, with `data` (replacing its bytes)
    /// and then `attrs` (as `authorize` passed them; `size` ignored), in one
    /// transaction: the bytes and the attributes are never seen, nor recovered, one
    /// without the other. Only a file whose bytes are inline (as every new file's are)
    /// and at most `CREATE_DATA_BYTES_MAX` bytes: any other is `InvalidArgument`; a
    /// file moved past `base` is `StoreOutdated`. DV +1; the mtime is the fill's unless
    /// `attrs` set one.
    pub fn store_new_file(
        &self,
        sequence: Option<SequenceKey>,
        fid: Fid,
        base: DataVersion,
        data: Vec<u8>,
        attrs: SetAttrs,
    ) -> Result<Outcome<VnodeStatus>, StorageError> {
        let size = data.len() as u64;
        if size > u64::from(CREATE_DATA_BYTES_MAX).min(INLINE_BYTES_MAX) {
            return Err(ErrorCode::InvalidArgument.into());
        }
        // No store of this vnode's data meanwhile (one may be moving it to a data file).
        let _guard = self.locks.lock(fid.vnode, Access::Exclusive);
        let outcome = self.write_once(sequence, move |tx| {
            let mut record = tx.checked(fid)?;
            if record.kind != FileKind::File {
                return Err(ErrorCode::InvalidArgument.into());
            }
            if record.data_version != base {
                return Err(ErrorCode::StoreOutdated {
                    current: record.data_version,
                }
                .into());
            }
            if record.data != DataLocation::Inline {
                return Err(ErrorCode::InvalidArgument.into());
            }
            resize(tx, &mut record, size)?;
            record.last_store = None;
            record.touch_data(Timestamp::now());
            record.apply_attrs(&attrs);
            tx.put_file_data(fid.vnode, data);
            tx.put(fid.vnode, record.clone());
            Ok(Filled(record.status(tx.volume(), fid.vnode)))
        })?;
        Ok(match outcome {
            Outcome::Applied(Filled(status)) => Outcome::Applied(status),
            Outcome::Replayed(answer) => Outcome::Replayed(answer),
        })
    }

    pub fn make_dir(
        &self,
        sequence: Option<SequenceKey>,
        dir: Fid,
        name: &str,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<Outcome<(VnodeStatus, VnodeStatus)>, StorageError> {
        proto::check_entry_name(name)?;
        let name = name.to_owned();
        let record = VnodeRecord::new(FileKind::Directory, mode, uid, gid, dir.vnode);
        self.write_once(sequence, move |tx| add_entry(tx, dir, &name, record))
    }

    pub fn symlink(
        &self,
        sequence: Option<SequenceKey>,
        dir: Fid,
        name: &str,
        target: &str,
        uid: u32,
        gid: u32,
    ) -> Result<Outcome<(VnodeStatus, VnodeStatus)>, StorageError> {
        proto::check_entry_name(name)?;
        let name = name.to_owned();
        if target.is_empty() || target.contains('\0') {
            return Err(ErrorCode::InvalidArgument.into());
        }
        if target.len() > SYMLINK_TARGET_BYTES_MAX {
            return Err(ErrorCode::NameTooLong.into());
        }
        let mut record = VnodeRecord::new(FileKind::Symlink, 0o777, uid, gid, dir.vnode);
        record.size = target.len() as u64;
        record.content = Some(target.to_owned());
        self.write_once(sequence, move |tx| add_entry(tx, dir, &name, record))
    }

    /// Makes a special file (a FIFO, a socket or a device node): an entry with no data,
    /// which the server never opens. Any other kind is `InvalidArgument`.
    #[expect(
        clippy::too_many_arguments,
        reason = "the fields of a MakeNode request, and its sequence key"
    )]
    pub fn make_node(
        &self,
        sequence: Option<SequenceKey>,
        dir: Fid,
        name: &str,
        kind: FileKind,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<Outcome<(VnodeStatus, VnodeStatus)>, StorageError> {
        proto::check_entry_name(name)?;
        if !kind.is_special() {
            return Err(ErrorCode::InvalidArgument.into());
        }
        let name = name.to_owned();
        let record = VnodeRecord::new(kind, mode, uid, gid, dir.vnode);
        self.write_once(sequence, move |tx| add_entry(tx, dir, &name, record))
    }

    /// Makes a mount point showing `volume`: content `#volume.` as in AFS.
    pub fn make_mount_point(
        &self,
        sequence: Option<SequenceKey>,
        dir: Fid,
        name: &str,
        volume: &VolumeName,
    ) -> Result<Outcome<(VnodeStatus, VnodeStatus)>, StorageError> {
        proto::check_entry_name(name)?;
        let name = name.to_owned();
        let content = format!("#{volume}.");
        let mut record = VnodeRecord::new(FileKind::MountPoint, 0o644, 0, 0, dir.vnode);
        record.size = content.len() as u64;
        record.content = Some(content);
        self.write_once(sequence, move |tx| add_entry(tx, dir, &name, record))
    }

    /// A new hard link `name` in `dir` to the file `target`.
    pub fn link(
        &self,
        sequence: Option<SequenceKey>,
        dir: Fid,
        name: &str,
        target: Fid,
    ) -> Result<Outcome<(VnodeStatus, VnodeStatus)>, StorageError> {
        proto::check_entry_name(name)?;
        let (id, name) = (self.id, name.to_owned());
        self.write_once(sequence, move |tx| {
            let mut dir_record = tx.directory(dir)?;
            let mut record = tx.checked(target)?;
            if record.kind == FileKind::Directory {
                return Err(ErrorCode::PermissionDenied.into());
            }
            if tx.entry(dir.vnode, &name)?.is_some() {
                return Err(ErrorCode::Exists.into());
            }
            if record.link_count >= LINK_COUNT_MAX {
                return Err(ErrorCode::TooManyLinks.into());
            }
            let now = Timestamp::now();
            record.link_count += 1;
            record.ctime = now;
            tx.put_entry(dir.vnode, &name, target.vnode, &record);
            dir_record.size += 1;
            dir_record.touch_data(now);
            tx.put(target.vnode, record.clone());
            tx.put(dir.vnode, dir_record.clone());
            Ok((
                record.status(id, target.vnode),
                dir_record.status(id, dir.vnode),
            ))
        })
    }

    /// Removes the entry `name`: a directory only if `directory` (and then it must be
    /// empty), anything else only if not.
    pub fn remove(
        &self,
        sequence: Option<SequenceKey>,
        dir: Fid,
        name: &str,
        directory: bool,
    ) -> Result<Outcome<Removed>, StorageError> {
        proto::check_entry_name(name)?;
        let (id, name) = (self.id, name.to_owned());
        self.write_once(sequence, move |tx| {
            let mut dir_record = tx.directory(dir)?;
            let (vnode, _, _) = tx.entry(dir.vnode, &name)?.ok_or(ErrorCode::NoSuchEntry)?;
            let vnode = VnodeId(vnode);
            let mut record = tx.vnode(vnode)?;
            let now = Timestamp::now();
            match (directory, record.kind == FileKind::Directory) {
                (true, false) => return Err(ErrorCode::NotDirectory.into()),
                (false, true) => return Err(ErrorCode::IsDirectory.into()),
                (true, true) => {
                    if record.size != 0 {
                        return Err(ErrorCode::NotEmpty.into());
                    }
                    dir_record.link_count -= 1;
                    record.link_count = 0;
                }
                (false, false) => record.link_count = record.link_count.saturating_sub(1),
            }
            tx.remove_entry(dir.vnode, &name);
            dir_record.size = dir_record.size.saturating_sub(1);
            dir_record.touch_data(now);
            record.ctime = now;
            let target = record.status(id, vnode);
            put_or_free(tx, vnode, record)?;
            tx.put(dir.vnode, dir_record.clone());
            Ok(Removed {
                dir: dir_record.status(id, dir.vnode),
                target,
            })
        })
    }

    /// Renames within the volume, replacing a compatible target as POSIX `rename` does.
    pub fn rename(
        &self,
        sequence: Option<SequenceKey>,
        from_dir: Fid,
        from_name: &str,
        to_dir: Fid,
        to_name: &str,
    ) -> Result<Outcome<Renamed>, StorageError> {
        proto::check_entry_name(from_name)?;
        proto::check_entry_name(to_name)?;
        let (id, from_name, to_name) = (self.id, from_name.to_owned(), to_name.to_owned());
        self.write_once(sequence, move |tx| {
            tx.directory(from_dir)?;
            tx.directory(to_dir)?;
            let (moved, _, _) = tx
                .entry(from_dir.vnode, &from_name)?
                .ok_or(ErrorCode::NoSuchEntry)?;
            let moved = VnodeId(moved);
            let mut moved_record = tx.vnode(moved)?;
            let moved_is_dir = moved_record.kind == FileKind::Directory;
            let existing = tx.entry(to_dir.vnode, &to_name)?;
            if existing.map(|e| e.0) == Some(moved.0) {
                // Both names are links to one vnode (or the very same entry): POSIX
                // says do nothing.
                let from = tx.vnode(from_dir.vnode)?.status(id, from_dir.vnode);
                let to = tx.vnode(to_dir.vnode)?.status(id, to_dir.vnode);
                return Ok(Renamed {
                    from_dir: from,
                    to_dir: to,
                    moved: moved_record.status(id, moved),
                    replaced: None,
                });
            }
            if moved_is_dir && from_dir.vnode != to_dir.vnode {
                refuse_move_into_own_subtree(tx, moved, to_dir.vnode)?;
            }
            let now = Timestamp::now();
            let mut replaced = None;
            if let Some((target, _, _)) = existing {
                let target = VnodeId(target);
                let mut target_record = tx.vnode(target)?;
                let target_is_dir = target_record.kind == FileKind::Directory;
                match (moved_is_dir, target_is_dir) {
                    (true, false) => return Err(ErrorCode::NotDirectory.into()),
                    (false, true) => return Err(ErrorCode::IsDirectory.into()),
                    (true, true) => {
                        if target_record.size != 0 {
                            return Err(ErrorCode::NotEmpty.into());
                        }
                        target_record.link_count = 0;
                        let mut to = tx.vnode(to_dir.vnode)?;
                        to.link_count -= 1;
                        tx.put(to_dir.vnode, to);
                    }
                    (false, false) => {
                        target_record.link_count = target_record.link_count.saturating_sub(1)
                    }
                }
                target_record.ctime = now;
                replaced = Some(target_record.status(id, target));
                put_or_free(tx, target, target_record)?;
                tx.remove_entry(to_dir.vnode, &to_name);
                let mut to = tx.vnode(to_dir.vnode)?;
                to.size -= 1;
                tx.put(to_dir.vnode, to);
            }
            tx.remove_entry(from_dir.vnode, &from_name);
            tx.put_entry(to_dir.vnode, &to_name, moved, &moved_record);
            let mut from = tx.vnode(from_dir.vnode)?;
            from.size = from.size.saturating_sub(1);
            from.touch_data(now);
            if from_dir.vnode != to_dir.vnode {
                // A file is governed by its directory's access list: it follows the move.
                moved_record.parent = to_dir.vnode;
                if moved_is_dir {
                    from.link_count -= 1;
                }
            }
            tx.put(from_dir.vnode, from);
            let mut to = tx.vnode(to_dir.vnode)?;
            to.size += 1;
            if from_dir.vnode != to_dir.vnode {
                to.touch_data(now);
                if moved_is_dir {
                    to.link_count += 1;
                }
            }
            tx.put(to_dir.vnode, to);
            moved_record.ctime = now;
            tx.put(moved, moved_record.clone());
            Ok(Renamed {
                from_dir: tx.vnode(from_dir.vnode)?.status(id, from_dir.vnode),
                to_dir: tx.vnode(to_dir.vnode)?.status(id, to_dir.vnode),
                moved: moved_record.status(id, moved),
                replaced,
            })
        })
    }
}

/// The outcome of `store_new_file`: the file's status after it.
struct Filled(VnodeStatus);

impl Answer for Filled {
    fn answer(&self) -> Response {
        Response::Status {
            status: self.0.clone(),
            callback: None,
        }
    }
}

impl Answer for Created {
    fn answer(&self) -> Response {
        Response::Entry {
            status: self.status.clone(),
            callback: None,
            dir: self.dir.clone(),
        }
    }
}

/// (entry made, directory) of `make_dir`, `make_node`, `symlink`, `make_mount_point`
/// and `link`.
impl Answer for (VnodeStatus, VnodeStatus) {
    fn answer(&self) -> Response {
        Response::Entry {
            status: self.0.clone(),
            callback: None,
            dir: self.1.clone(),
        }
    }
}

impl Answer for Removed {
    fn answer(&self) -> Response {
        Response::Removed {
            dir: self.dir.clone(),
            // With `link_count` 0 when the vnode is gone: a client with it open shows
            // that (`fstat`); `Response::for_version` drops it for older peers.
            target: Some(self.target.clone()),
        }
    }
}

impl Answer for Renamed {
    fn answer(&self) -> Response {
        Response::Renamed {
            from_dir: self.from_dir.clone(),
            to_dir: self.to_dir.clone(),
            moved: self.moved.clone(),
            replaced: self.replaced.clone(),
        }
    }
}

/// Writes `record`, or frees the vnode when its last link is gone.
fn put_or_free(tx: &mut Tx<'_>, vnode: VnodeId, record: VnodeRecord) -> Result<(), StorageError> {
    if record.link_count > 0 {
        tx.put(vnode, record);
        return Ok(());
    }
    let header = tx.header_mut()?;
    header.vnode_count = header.vnode_count.saturating_sub(1);
    if record.kind == FileKind::File {
        header.bytes_used = header.bytes_used.saturating_sub(record.size);
        // Both forms go: a data file may exist beside inline data after a crash.
        tx.put_file_data(vnode, Vec::new());
        tx.remove_data_file(vnode);
    }
    if record.kind == FileKind::Directory {
        tx.put_acl(vnode, None);
    }
    tx.delete(vnode);
    Ok(())
}

/// Adds a new vnode under `name` in `dir`; the directory's DV goes up by one.
fn add_entry(
    tx: &mut Tx<'_>,
    dir: Fid,
    name: &str,
    mut record: VnodeRecord,
) -> Result<(VnodeStatus, VnodeStatus), StorageError> {
    let mut dir_record = tx.directory(dir)?;
    if tx.entry(dir.vnode, name)?.is_some() {
        return Err(ErrorCode::Exists.into());
    }
    let header = tx.header_mut()?;
    let vnode = VnodeId(header.next_vnode);
    header.next_vnode += 1;
    header.vnode_count += 1;
    record.parent = dir.vnode;
    let now = Timestamp::now();
    dir_record.size += 1;
    dir_record.touch_data(now);
    if record.kind == FileKind::Directory {
        dir_record.link_count += 1;
        // A new directory takes its parent's access list (no row: the default, kept).
        if let Some(acl) = tx.acl(dir.vnode)? {
            tx.put_acl(vnode, Some(acl));
        }
    }
    tx.put_entry(dir.vnode, name, vnode, &record);
    let volume = tx.volume();
    let status = record.status(volume, vnode);
    tx.put(vnode, record);
    tx.put(dir.vnode, dir_record.clone());
    Ok((status, dir_record.status(volume, dir.vnode)))
}

/// Refuses to move directory `moved` into `to_dir` if `to_dir` is `moved` or lies
/// beneath it.
fn refuse_move_into_own_subtree(
    tx: &mut Tx<'_>,
    moved: VnodeId,
    to_dir: VnodeId,
) -> Result<(), StorageError> {
    let mut current = to_dir;
    // Bounded walk: a corrupt parent chain must not loop forever.
    for _ in 0..100_000 {
        if current == moved {
            return Err(ErrorCode::InvalidArgument.into());
        }
        if current == VnodeId::ROOT {
            return Ok(());
        }
        current = tx.vnode(current)?.parent;
    }
    Err(tx.corrupt(format!(
        "parent chain of vnode {to_dir} does not reach the root"
    )))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proto::{ClientId, DataVersion, InstanceNonce, VolumeId, VolumeName};

    use super::*;
    use crate::fence::Fence;
    use crate::storage::Partition;

    fn volume() -> (tempfile::TempDir, Arc<Volume>, Fid) {
        volume_with_quota(0)
    }

    fn volume_with_quota(quota_bytes: u64) -> (tempfile::TempDir, Arc<Volume>, Fid) {
        let dir = tempfile::tempdir().unwrap();
        let partition = Partition::open(dir.path(), Arc::new(Fence::open())).unwrap();
        let id = VolumeId(536870913);
        partition
            .create_volume(id, VolumeName::parse("root.cell").unwrap(), quota_bytes)
            .unwrap();
        let volume = partition.volume(id).unwrap();
        (dir, volume, Fid::root(id))
    }

    fn applied<T: std::fmt::Debug>(outcome: Result<Outcome<T>, StorageError>) -> T {
        match outcome {
            Ok(Outcome::Applied(value)) => value,
            other => panic!("expected an applied change, got {other:?}"),
        }
    }

    fn refusal<T: std::fmt::Debug>(outcome: Result<T, StorageError>) -> ErrorCode {
        match outcome {
            Err(StorageError::Refused(code)) => code,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_file_created_with_its_bytes_reads_them_back_at_its_first_version() {
        let (_dir, volume, root) = volume();
        let dir_before = volume.fetch_status(root).unwrap().data_version;
        let data = b"small file".to_vec();
        let (status, dir) = applied(volume.create_with_data(None, root, "f", 0o640, 7, 8, data));
        assert_eq!(status.size, 10);
        assert_eq!(status.mode, 0o640);
        assert_eq!((status.uid, status.gid), (7, 8));
        assert_eq!(status.data_version, DataVersion(1));
        assert_eq!(dir.data_version, dir_before.next());
        assert_eq!(dir.size, 1);
        let (fetched, bytes) = volume.fetch_data(status.fid, 0, 100).unwrap();
        assert_eq!(fetched, status);
        assert_eq!(bytes, b"small file");
        assert_eq!(volume.lookup(root, "f").unwrap().0, status);
        assert_eq!(volume.info().unwrap().bytes_used, 10);
    }

    #[test]
    fn an_existing_name_is_refused_and_nothing_changes() {
        let (_dir, volume, root) = volume();
        let (first, _) =
            applied(volume.create_with_data(None, root, "f", 0o644, 0, 0, b"one".to_vec()));
        let dir_before = volume.fetch_status(root).unwrap();
        let again = volume.create_with_data(None, root, "f", 0o644, 0, 0, b"two!".to_vec());
        assert_eq!(refusal(again), ErrorCode::Exists);
        applied(volume.make_dir(None, root, "d", 0o755, 0, 0));
        let over_dir = volume.create_with_data(None, root, "d", 0o644, 0, 0, Vec::new());
        assert_eq!(refusal(over_dir), ErrorCode::Exists);
        assert_eq!(volume.fetch_data(first.fid, 0, 100).unwrap().1, b"one");
        assert_eq!(volume.info().unwrap().bytes_used, 3);
        assert_eq!(
            volume.fetch_status(root).unwrap().data_version,
            dir_before.data_version.next(),
            "only the mkdir changed the directory"
        );
    }

    #[test]
    fn more_than_the_limit_or_past_the_quota_is_refused() {
        let (_dir, volume, root) = volume();
        let limit = CREATE_DATA_BYTES_MAX as usize;
        let too_big = volume.create_with_data(None, root, "big", 0o644, 0, 0, vec![1; limit + 1]);
        assert_eq!(refusal(too_big), ErrorCode::InvalidArgument);
        let (whole, _) =
            applied(volume.create_with_data(None, root, "max", 0o644, 0, 0, vec![2; limit]));
        assert_eq!(
            volume.fetch_data(whole.fid, 0, u32::MAX).unwrap().1,
            vec![2; limit]
        );
        let (_dir, volume, root) = volume_with_quota(10);
        let over = volume.create_with_data(None, root, "over", 0o644, 0, 0, vec![3; 11]);
        assert_eq!(refusal(over), ErrorCode::QuotaExceeded);
        assert_eq!(refusal(volume.lookup(root, "over")), ErrorCode::NoSuchEntry);
        applied(volume.create_with_data(None, root, "fits", 0o644, 0, 0, vec![3; 10]));
    }

    #[test]
    fn a_new_file_is_filled_with_its_bytes_and_then_its_attributes_at_once() {
        let (_dir, volume, root) = volume();
        let created = applied(volume.create(None, root, "f", 0o600, 7, 8, true));
        let fid = created.status.fid;
        let base = created.status.data_version;
        let mtime = Timestamp {
            secs: 978_307_200,
            nanos: 5,
        };
        let attrs = SetAttrs {
            mode: Some(0o644),
            mtime: Some(mtime),
            ..SetAttrs::default()
        };
        let status = applied(volume.store_new_file(None, fid, base, b"bytes".to_vec(), attrs));
        assert_eq!(status.size, 5);
        assert_eq!(status.mode, 0o644);
        assert_eq!(status.mtime, mtime, "the times set after the bytes stay");
        assert_eq!((status.uid, status.gid), (7, 8));
        assert_eq!(status.data_version, base.next());
        let (fetched, bytes) = volume.fetch_data(fid, 0, 100).unwrap();
        assert_eq!((fetched, bytes.as_slice()), (status.clone(), &b"bytes"[..]));
        assert_eq!(volume.info().unwrap().bytes_used, 5);
        // Once changed, the file is no new file at `base` any more.
        let again = volume.store_new_file(None, fid, base, b"x".to_vec(), SetAttrs::default());
        assert_eq!(
            refusal(again),
            ErrorCode::StoreOutdated {
                current: status.data_version
            }
        );
        assert_eq!(volume.fetch_data(fid, 0, 100).unwrap().1, b"bytes");
    }

    #[test]
    fn a_fill_of_a_file_held_in_a_data_file_or_too_big_is_refused() {
        let (_dir, volume, root) = volume();
        let created = applied(volume.create(None, root, "big", 0o644, 0, 0, true));
        let fid = created.status.fid;
        let big = vec![1u8; INLINE_BYTES_MAX as usize + 1];
        let stored = volume.store_data(fid, 0, &big, None).unwrap();
        let refused = volume.store_new_file(
            None,
            fid,
            stored.data_version,
            b"x".to_vec(),
            SetAttrs::default(),
        );
        assert_eq!(refusal(refused), ErrorCode::InvalidArgument);
        assert_eq!(volume.fetch_status(fid).unwrap().size, big.len() as u64);
        let limit = CREATE_DATA_BYTES_MAX as usize;
        let small = applied(volume.create(None, root, "small", 0o644, 0, 0, true)).status;
        let too_big = volume.store_new_file(
            None,
            small.fid,
            small.data_version,
            vec![2; limit + 1],
            SetAttrs::default(),
        );
        assert_eq!(refusal(too_big), ErrorCode::InvalidArgument);
        let (_dir, volume, root) = volume_with_quota(10);
        let small = applied(volume.create(None, root, "q", 0o644, 0, 0, true)).status;
        let over = volume.store_new_file(
            None,
            small.fid,
            small.data_version,
            vec![3; 11],
            SetAttrs::default(),
        );
        assert_eq!(refusal(over), ErrorCode::QuotaExceeded);
    }

    #[test]
    fn a_retried_fill_is_answered_from_its_record() {
        let (_dir, volume, root) = volume();
        let created = applied(volume.create(None, root, "f", 0o644, 0, 0, true)).status;
        let key = SequenceKey {
            client: ClientId(uuid::Uuid::from_u128(6)),
            instance: InstanceNonce(1),
            seq: 3,
        };
        let fill = |v: &Volume| {
            v.store_new_file(
                Some(key),
                created.fid,
                created.data_version,
                b"abc".to_vec(),
                SetAttrs::default(),
            )
        };
        let status = applied(fill(&volume));
        match fill(&volume) {
            Ok(Outcome::Replayed(answer)) => assert_eq!(
                *answer,
                Ok(Response::Status {
                    status: status.clone(),
                    callback: None,
                })
            ),
            other => panic!("expected the recorded answer, got {other:?}"),
        }
        assert_eq!(
            volume.fetch_status(created.fid).unwrap(),
            status,
            "applied once"
        );
    }

    #[test]
    fn a_retry_of_the_same_sequence_is_answered_from_its_record() {
        let (_dir, volume, root) = volume();
        let key = SequenceKey {
            client: ClientId(uuid::Uuid::from_u128(5)),
            instance: InstanceNonce(1),
            seq: 9,
        };
        let (status, dir) =
            applied(volume.create_with_data(Some(key), root, "f", 0o644, 0, 0, b"abc".to_vec()));
        let replayed = volume.create_with_data(Some(key), root, "f", 0o644, 0, 0, b"abc".to_vec());
        match replayed {
            Ok(Outcome::Replayed(answer)) => assert_eq!(
                *answer,
                Ok(Response::Entry {
                    status: status.clone(),
                    callback: None,
                    dir,
                })
            ),
            other => panic!("expected the recorded answer, got {other:?}"),
        }
        assert_eq!(volume.fetch_status(root).unwrap().size, 1, "applied once");
        // A refusal is recorded too: its retry is refused alike even once the name is free.
        let other = SequenceKey { seq: 10, ..key };
        assert_eq!(
            refusal(
                volume
                    .create_with_data(Some(other), root, "f", 0o644, 0, 0, Vec::new())
                    .and_then(|o| match o {
                        Outcome::Replayed(answer) => answer.map_err(StorageError::Refused),
                        Outcome::Applied(_) => Ok(Response::Ok),
                    })
            ),
            ErrorCode::Exists
        );
        applied(volume.remove(None, root, "f", false));
        match volume.create_with_data(Some(other), root, "f", 0o644, 0, 0, Vec::new()) {
            Ok(Outcome::Replayed(answer)) => assert_eq!(*answer, Err(ErrorCode::Exists)),
            other => panic!("expected the recorded refusal, got {other:?}"),
        }
    }
}
