//! Who may do what: every file request checked for its caller's identity against the
//! access list of the directory that governs it and the POSIX rules of `proto::access`,
//! before it runs; and the access-list requests themselves.
//! Invariant: a request runs only after `authorize` passed it, with the owner, group
//! and mode `authorize` decided (never the ones a non-administrator asked for).

use std::sync::Arc;

use proto::access::{self, DirAccess, FileAccess};
use proto::{
    AccessList, ErrorCode, Fid, FileKind, Identity, Request, Response, Rights, SetAttrs,
    VnodeStatus,
};

use super::{Caller, FileService, blocking};
use crate::storage::Governed;

/// What must happen after a request `authorize` passed.
#[derive(Debug, Default)]
pub(super) struct After {
    /// A store by a non-administrator into a set-user-id or set-group-id file clears
    /// those bits (POSIX's "should", as Linux does).
    pub clear_mode: Option<(Fid, u32)>,
}

impl FileService {
    /// `fid` with the directory governing it, and the caller's rights there.
    async fn governed(&self, caller: &Identity, fid: Fid) -> Result<(Governed, Rights), ErrorCode> {
        let volume = self.volume(fid.volume)?;
        let governed = blocking(move || volume.governing(fid)).await?;
        let rights = governed.acl.rights_for(&caller.cps);
        Ok((governed, rights))
    }

    /// The caller's rights on directory `dir`, with its status.
    async fn dir_rights(
        &self,
        caller: &Identity,
        dir: Fid,
    ) -> Result<(VnodeStatus, Rights), ErrorCode> {
        let (governed, rights) = self.governed(caller, dir).await?;
        if governed.status.kind != FileKind::Directory {
            return Err(ErrorCode::NotDirectory);
        }
        Ok((governed.status, rights))
    }

    /// The status of entry `name` of `dir`, if it exists.
    async fn entry(&self, dir: Fid, name: &str) -> Result<Option<VnodeStatus>, ErrorCode> {
        let volume = self.volume(dir.volume)?;
        let name = name.to_owned();
        match blocking(move || volume.lookup(dir, &name)).await {
            Ok((status, _)) => Ok(Some(status)),
            Err(ErrorCode::NoSuchEntry) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// In a sticky directory, removing or replacing `name` needs its owner, the
    /// directory's owner or an administrator (EPERM, as Linux answers).
    async fn sticky(
        &self,
        caller: &Identity,
        dir: &VnodeStatus,
        name: &str,
    ) -> Result<(), ErrorCode> {
        if dir.mode & access::MODE_STICKY == 0 {
            return Ok(());
        }
        match self.entry(dir.fid, name).await? {
            Some(entry) if !access::sticky_allows(caller, dir, &entry) => {
                Err(ErrorCode::NotPermitted)
            }
            _ => Ok(()),
        }
    }

    /// The owner and group of a new vnode: the caller's id, and the group asked for if
    /// the caller is in it, else the directory's. An administrator's request keeps what
    /// it asked (root on a workstation creates files as root).
    fn ownership(caller: &Identity, dir: &VnodeStatus, uid: u32, gid: u32) -> (u32, u32) {
        if caller.is_administrator() {
            return (uid, gid);
        }
        let gid = if access::in_group(caller, gid) {
            gid
        } else {
            dir.gid
        };
        (access::posix_uid(caller), gid)
    }

    /// Checks `request` for `caller`; returns it as it may run (owners and modes
    /// decided here) and what to do after it.
    pub(super) async fn authorize(
        &self,
        caller: &Identity,
        request: Request,
    ) -> Result<(Request, After), ErrorCode> {
        let mut after = After::default();
        let request = match request {
            Request::FetchStatus { fid } => {
                let (_, rights) = self.governed(caller, fid).await?;
                access::check_dir(rights, DirAccess::Lookup)?;
                Request::FetchStatus { fid }
            }
            Request::FetchData {
                fid,
                offset,
                length,
            } => {
                let (governed, rights) = self.governed(caller, fid).await?;
                if governed.status.kind == FileKind::File {
                    access::check_file(caller, rights, &governed.status, FileAccess::Read)?;
                } else {
                    // A symlink's or mount point's content is read with lookup.
                    access::check_dir(rights, DirAccess::Lookup)?;
                }
                Request::FetchData {
                    fid,
                    offset,
                    length,
                }
            }
            request @ (Request::StoreData { fid, .. }
            | Request::StoreDataIf { fid, .. }
            | Request::StoreDataBulk { fid, .. }) => {
                let (governed, rights) = self.governed(caller, fid).await?;
                check_store(caller, rights, &governed.status)?;
                after.clear_mode =
                    access::mode_after_write(caller, &governed.status).map(|mode| (fid, mode));
                request
            }
            Request::Fsync { fid } => {
                let (_, rights) = self.governed(caller, fid).await?;
                if !rights.contains(Rights::LOOKUP) && !rights.contains(Rights::WRITE) {
                    return Err(ErrorCode::PermissionDenied);
                }
                Request::Fsync { fid }
            }
            Request::StoreNewFile {
                fid,
                base,
                attrs,
                data,
            } => {
                // A store of the whole file, then a `SetAttr`, each checked against the
                // file as it is now; a write by a non-administrator clears set-user-id
                // unless a mode is set after it.
                let (governed, rights) = self.governed(caller, fid).await?;
                check_store(caller, rights, &governed.status)?;
                let asked = SetAttrs {
                    size: None,
                    ..attrs
                };
                let mut attrs = access::check_set_attrs(caller, rights, &governed.status, &asked)?;
                if attrs.mode.is_none() {
                    attrs.mode = access::mode_after_write(caller, &governed.status);
                }
                Request::StoreNewFile {
                    fid,
                    base,
                    attrs,
                    data,
                }
            }
            Request::SetAttr { fid, attrs } => {
                let (governed, rights) = self.governed(caller, fid).await?;
                let attrs = set_attrs(caller, rights, &governed.status, &attrs)?;
                Request::SetAttr { fid, attrs }
            }
            request @ (Request::Lookup { dir, .. } | Request::ReadDir { dir, .. }) => {
                let (_, rights) = self.dir_rights(caller, dir).await?;
                access::check_dir(rights, DirAccess::Lookup)?;
                request
            }
            mut request @ (Request::Create { dir, .. }
            | Request::MakeDir { dir, .. }
            | Request::Symlink { dir, .. }
            | Request::MakeNode { dir, .. }
            | Request::CreateWithData { dir, .. }) => {
                let (dir_status, rights) = self.dir_rights(caller, dir).await?;
                access::check_dir(rights, DirAccess::Insert)?;
                decide_owner(&mut request, caller, &dir_status);
                request
            }
            request @ Request::MakeMountPoint { dir, .. } => {
                // As AFS: a mount point needs insert and administer.
                let (_, rights) = self.dir_rights(caller, dir).await?;
                access::check_dir(rights, DirAccess::Insert)?;
                access::check_dir(rights, DirAccess::Administer)?;
                request
            }
            Request::Link { dir, name, target } => {
                let (_, rights) = self.dir_rights(caller, dir).await?;
                access::check_dir(rights, DirAccess::Insert)?;
                // A file is governed by one directory's list: a second name in another
                // directory would put it under two (AFS refuses these links too).
                let (governed, _) = self.governed(caller, target).await?;
                if governed.status.kind != FileKind::Directory && governed.dir.fid != dir {
                    return Err(ErrorCode::CrossVolume);
                }
                Request::Link { dir, name, target }
            }
            Request::Remove { dir, name } => {
                self.remove_rights(caller, dir, &name).await?;
                Request::Remove { dir, name }
            }
            Request::RemoveDir { dir, name } => {
                self.remove_rights(caller, dir, &name).await?;
                Request::RemoveDir { dir, name }
            }
            Request::Rename {
                from_dir,
                from_name,
                to_dir,
                to_name,
            } => {
                self.remove_rights(caller, from_dir, &from_name).await?;
                let (to_status, to_rights) = self.dir_rights(caller, to_dir).await?;
                access::check_dir(to_rights, DirAccess::Insert)?;
                self.sticky(caller, &to_status, &to_name).await?;
                if from_dir != to_dir
                    && let Some(moved) = self.entry(from_dir, &from_name).await?
                    && moved.kind != FileKind::Directory
                    && moved.link_count > 1
                {
                    // Its other names would stay under the old directory's list.
                    return Err(ErrorCode::CrossVolume);
                }
                Request::Rename {
                    from_dir,
                    from_name,
                    to_dir,
                    to_name,
                }
            }
            request @ (Request::SetLock { fid, .. } | Request::TestLock { fid, .. }) => {
                // The lock table does not look files up: a lock on a vnode that does
                // not exist (any more) guards nothing, and is left to it.
                match self.governed(caller, fid).await {
                    Ok((governed, rights)) => {
                        access::check_file(caller, rights, &governed.status, FileAccess::Lock)?
                    }
                    Err(ErrorCode::NoSuchVolume | ErrorCode::Stale) => {}
                    Err(e) => return Err(e),
                }
                request
            }
            // Releasing one's own locks, giving up or reclaiming what was granted, the
            // lease, space, and everything not a file request: nothing to check here
            // (volume administration is checked in `checked`). Listed one by one, so a
            // new request is decided here, never let through by default.
            request @ (Request::Ping
            | Request::GiveUpCallbacks { .. }
            | Request::VolumeSpace { .. }
            | Request::BreakCallbacks { .. }
            | Request::ResetCallbacks
            | Request::CreateVolume { .. }
            | Request::RemoveVolume { .. }
            | Request::ListVolumes
            | Request::ExamineVolume { .. }
            | Request::ReleaseLock { .. }
            | Request::CancelLockWait { .. }
            | Request::RenewLease
            | Request::LockGranted { .. }
            | Request::ReclaimCallbacks { .. }
            | Request::ReclaimLock { .. }
            | Request::ReclaimDone
            | Request::ServerCounters
            | Request::ServerFigures
            | Request::FetchAcl { .. }
            | Request::StoreAcl { .. }
            | Request::FetchRights { .. }
            | Request::Sequenced { .. }
            | Request::VlRegisterServer { .. }
            | Request::VlListServers
            | Request::VlCreateEntry { .. }
            | Request::VlRemoveEntry { .. }
            | Request::VlGetEntry { .. }
            | Request::VlListEntries
            | Request::VlJoinPair { .. }
            | Request::VlAcquirePair { .. }
            | Request::VlRenewPair { .. }
            | Request::VlReleasePair { .. }
            | Request::VlGetPair { .. }
            | Request::PairSwitchover
            | Request::MemberState
            | Request::VlRaft { .. }
            | Request::VlStatus
            | Request::VlAddMember { .. }
            | Request::VlRemoveMember { .. }
            | Request::PtsCreateUser { .. }
            | Request::PtsSetPassword { .. }
            | Request::PtsCreateGroup { .. }
            | Request::PtsAddUser { .. }
            | Request::PtsRemoveUser { .. }
            | Request::PtsDelete { .. }
            | Request::PtsMembership { .. }
            | Request::PtsListEntries
            | Request::Login { .. }) => request,
        };
        Ok((request, after))
    }

    /// Delete right on `dir` and the sticky rule for `name`; returns the directory.
    async fn remove_rights(
        &self,
        caller: &Identity,
        dir: Fid,
        name: &str,
    ) -> Result<VnodeStatus, ErrorCode> {
        let (dir_status, rights) = self.dir_rights(caller, dir).await?;
        access::check_dir(rights, DirAccess::Delete)?;
        self.sticky(caller, &dir_status, name).await?;
        Ok(dir_status)
    }

    /// Clears set-user-id and set-group-id after a store `authorize` marked, and
    /// answers the store with the status that shows it (its data version unchanged, so
    /// the writer's next store still follows on). The other holders are broken again.
    pub(super) async fn after(
        self: &Arc<Self>,
        key: Caller,
        after: After,
        answer: Result<Response, ErrorCode>,
    ) -> Result<Response, ErrorCode> {
        let (Some((fid, mode)), Ok(Response::Status { callback, .. })) =
            (after.clear_mode, &answer)
        else {
            return answer;
        };
        let callback = *callback;
        let volume = self.volume(fid.volume)?;
        let attrs = SetAttrs {
            mode: Some(mode),
            ..SetAttrs::default()
        };
        let status = blocking(move || volume.set_attr(fid, &attrs)).await?;
        self.callbacks.break_callbacks(&[fid], key.key).await;
        Ok(Response::Status { status, callback })
    }

    /// `FetchAcl`: needs `l`.
    pub(super) async fn fetch_acl(
        &self,
        caller: &Identity,
        dir: Fid,
    ) -> Result<Response, ErrorCode> {
        let (governed, rights) = self.governed(caller, dir).await?;
        if governed.status.kind != FileKind::Directory {
            return Err(ErrorCode::NotDirectory);
        }
        access::check_dir(rights, DirAccess::Lookup)?;
        Ok(Response::Acl(governed.acl))
    }

    /// `StoreAcl`: needs `a`; breaks every other holder's promise on the directory, so
    /// rights cached anywhere are dropped before the answer.
    pub(super) async fn store_acl(
        self: &Arc<Self>,
        caller: &Identity,
        key: Caller,
        dir: Fid,
        acl: AccessList,
    ) -> Result<Response, ErrorCode> {
        let (_, rights) = self.dir_rights(caller, dir).await?;
        if self.access_checks {
            access::check_dir(rights, DirAccess::Administer)?;
        }
        if acl.len() > proto::identity::ACL_ENTRIES_MAX {
            return Err(ErrorCode::InvalidArgument);
        }
        let volume = self.volume(dir.volume)?;
        let status = blocking(move || volume.store_acl(dir, acl)).await?;
        self.callbacks.break_callbacks(&[dir], key.key).await;
        let callback = self.grant(key, dir).await;
        Ok(Response::Status { status, callback })
    }

    /// `FetchRights`: anyone may ask for their own rights. The promise on the governing
    /// directory is taken before the answer is read, so a change after it breaks it.
    pub(super) async fn fetch_rights(
        self: &Arc<Self>,
        caller: &Identity,
        key: Caller,
        fid: Fid,
    ) -> Result<Response, ErrorCode> {
        let (first, _) = self.governed(caller, fid).await?;
        let callback = self.grant(key, first.dir.fid).await;
        let (governed, rights) = self.governed(caller, fid).await?;
        if governed.dir.fid != first.dir.fid {
            // Moved meanwhile: no promise covers the new directory; ask again.
            return Err(ErrorCode::Busy);
        }
        Ok(Response::Rights {
            rights,
            dir: governed.dir,
            callback,
        })
    }
}

/// A store needs `w` and the write bit, or (as AFS) ownership with `i` or `w`: a file
/// created read-only (`open(O_CREAT|O_WRONLY, 0444)`) is written by its creator.
fn check_store(caller: &Identity, rights: Rights, status: &VnodeStatus) -> Result<(), ErrorCode> {
    if status.kind != FileKind::File {
        return Err(ErrorCode::PermissionDenied);
    }
    if access::check_file(caller, rights, status, FileAccess::Write).is_ok() {
        return Ok(());
    }
    let owner = status.uid == access::posix_uid(caller);
    if owner && (rights.contains(Rights::INSERT) || rights.contains(Rights::WRITE)) {
        return Ok(());
    }
    Err(ErrorCode::PermissionDenied)
}

/// `check_set_attrs`, with a truncation by the owner allowed as a store is.
fn set_attrs(
    caller: &Identity,
    rights: Rights,
    status: &VnodeStatus,
    attrs: &SetAttrs,
) -> Result<SetAttrs, ErrorCode> {
    let Some(size) = attrs.size else {
        return access::check_set_attrs(caller, rights, status, attrs);
    };
    check_store(caller, rights, status)?;
    let rest = SetAttrs {
        size: None,
        ..attrs.clone()
    };
    let mut applied = access::check_set_attrs(caller, rights, status, &rest)?;
    applied.size = Some(size);
    if applied.mode.is_none() {
        applied.mode = access::mode_after_write(caller, status);
    }
    Ok(applied)
}

/// A new file's mode: set-group-id only for a member of its group (or an administrator).
/// Sets a new vnode's owner, group and (for files and special files) mode in its
/// creating request, as `ownership` and `new_mode` decide them.
fn decide_owner(request: &mut Request, caller: &Identity, dir: &VnodeStatus) {
    let (uid, gid, mode) = match request {
        Request::Create { uid, gid, mode, .. }
        | Request::MakeNode { uid, gid, mode, .. }
        | Request::CreateWithData { uid, gid, mode, .. } => (uid, gid, Some(mode)),
        Request::MakeDir { uid, gid, .. } | Request::Symlink { uid, gid, .. } => (uid, gid, None),
        _ => return,
    };
    (*uid, *gid) = FileService::ownership(caller, dir, *uid, *gid);
    if let Some(mode) = mode {
        *mode = new_mode(caller, *gid, *mode);
    }
}

fn new_mode(caller: &Identity, gid: u32, mode: u32) -> u32 {
    if mode & access::MODE_SET_GID != 0
        && !caller.is_administrator()
        && !access::in_group(caller, gid)
    {
        mode & !access::MODE_SET_GID
    } else {
        mode
    }
}
