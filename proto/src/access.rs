//! What an identity may do to a vnode: the AFS rights of its directory combined with the
//! POSIX mode bits, owner and group of a file, decided the same way by the fileserver
//! (which enforces) and the cache manager (which answers cached opens without a call).
//! Invariant: pure; administrators pass every POSIX check as root does, but get from an
//! access list only what it grants them (plus `l` and `a`).

use crate::error::ErrorCode;
use crate::identity::{Identity, PrincipalId, Rights};
use crate::message::{FileKind, SetAttrs, VnodeStatus};

/// The set-user-id, set-group-id and sticky bits.
pub const MODE_SET_UID: u32 = 0o4000;
pub const MODE_SET_GID: u32 = 0o2000;
pub const MODE_STICKY: u32 = 0o1000;

/// What a request wants of a file (or of a directory as a file: reading its entries).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileAccess {
    Read,
    Write,
    Execute,
    /// Taking an advisory lock.
    Lock,
}

/// What a request wants of a directory's entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirAccess {
    /// Look a name up, list the entries, stat what is inside.
    Lookup,
    /// Add an entry (create, mkdir, mknod, symlink, link, the target side of rename).
    Insert,
    /// Remove an entry (unlink, rmdir, the source side of rename).
    Delete,
    /// Change the access list.
    Administer,
}

impl DirAccess {
    fn right(self) -> Rights {
        match self {
            DirAccess::Lookup => Rights::LOOKUP,
            DirAccess::Insert => Rights::INSERT,
            DirAccess::Delete => Rights::DELETE,
            DirAccess::Administer => Rights::ADMINISTER,
        }
    }
}

/// The POSIX gid a group principal owns files as: its id negated (group -300 is gid
/// 300), so group ids never meet user ids.
pub fn posix_gid(group: PrincipalId) -> Option<u32> {
    group.is_group().then(|| group.0.unsigned_abs())
}

/// The caller's uid for ownership: its id, or `ANONYMOUS` without a token.
pub fn posix_uid(caller: &Identity) -> u32 {
    caller.id.as_posix_id()
}

/// True when the caller is in the POSIX group `gid`.
pub fn in_group(caller: &Identity, gid: u32) -> bool {
    caller.cps.iter().any(|p| posix_gid(*p) == Some(gid))
}

/// Checks a directory operation against the directory's rights for the caller.
pub fn check_dir(dir_rights: Rights, access: DirAccess) -> Result<(), ErrorCode> {
    if dir_rights.contains(access.right()) {
        Ok(())
    } else {
        Err(ErrorCode::PermissionDenied)
    }
}

/// Checks a file operation: `dir_rights` are the caller's rights on the file's
/// directory (for a directory read as a file, its own), `status` the file's.
pub fn check_file(
    caller: &Identity,
    dir_rights: Rights,
    status: &VnodeStatus,
    access: FileAccess,
) -> Result<(), ErrorCode> {
    if status.kind == FileKind::Directory {
        // A directory's entries are governed by its list alone, as in AFS.
        let right = match access {
            FileAccess::Read | FileAccess::Execute => Rights::LOOKUP,
            FileAccess::Write => Rights::INSERT,
            FileAccess::Lock => Rights::LOCK,
        };
        return if dir_rights.contains(right) {
            Ok(())
        } else {
            Err(ErrorCode::PermissionDenied)
        };
    }
    let (right, bit) = match access {
        FileAccess::Read => (Rights::READ, 0o4),
        FileAccess::Write => (Rights::WRITE, 0o2),
        FileAccess::Execute => (Rights::READ, 0o1),
        // Locking needs `k`, and reading or writing the file as POSIX asks of fcntl.
        FileAccess::Lock => (Rights::LOCK, 0),
    };
    if !dir_rights.contains(right) {
        return Err(ErrorCode::PermissionDenied);
    }
    if mode_allows(caller, status, bit) {
        Ok(())
    } else {
        Err(ErrorCode::PermissionDenied)
    }
}

/// The POSIX check of one permission `bit` (4, 2 or 1; 0 asks nothing) for the caller's
/// class: owner, group or other. Administrators are root: they may read and write
/// anything and execute what anyone may execute.
pub fn mode_allows(caller: &Identity, status: &VnodeStatus, bit: u32) -> bool {
    if bit == 0 {
        return true;
    }
    if caller.is_administrator() {
        return bit != 0o1 || status.mode & 0o111 != 0 || status.kind == FileKind::Directory;
    }
    let shift = if status.uid == posix_uid(caller) {
        6
    } else if in_group(caller, status.gid) {
        3
    } else {
        0
    };
    status.mode >> shift & bit != 0
}

/// Checks a `SetAttr` against POSIX's rules for who may change what, and returns the
/// attributes to apply: the mode as asked, or with set-group-id cleared when a
/// non-member sets it, and with set-user-id and set-group-id cleared by a chown.
pub fn check_set_attrs(
    caller: &Identity,
    dir_rights: Rights,
    status: &VnodeStatus,
    attrs: &SetAttrs,
) -> Result<SetAttrs, ErrorCode> {
    let admin = caller.is_administrator();
    let owner = status.uid == posix_uid(caller);
    let mut applied = attrs.clone();
    if let Some(uid) = attrs.uid {
        // Only root gives a file away; the owner may "change" it to itself (as Linux,
        // anyone else may not, not even to the same owner).
        let may = admin || (owner && uid == status.uid);
        if !may {
            return Err(ErrorCode::NotPermitted);
        }
    }
    if let Some(gid) = attrs.gid {
        // The owner may move it into a group it is in, or leave it in its own.
        let may = admin || (owner && (gid == status.gid || in_group(caller, gid)));
        if !may {
            return Err(ErrorCode::NotPermitted);
        }
    }
    if let Some(mode) = attrs.mode {
        // A writer's kernel clears set-user-id and set-group-id before it writes (as a
        // store would here): that much needs only the right to write.
        let kills_privileges = mode & 0o7777 == status.mode & !(MODE_SET_UID | MODE_SET_GID)
            && mode & 0o7777 != status.mode;
        let writer =
            kills_privileges && check_file(caller, dir_rights, status, FileAccess::Write).is_ok();
        if !owner && !admin && !writer {
            return Err(ErrorCode::NotPermitted);
        }
        let gid = attrs.gid.unwrap_or(status.gid);
        let mut mode = mode & 0o7777;
        if mode & MODE_SET_GID != 0
            && status.kind != FileKind::Directory
            && !admin
            && !in_group(caller, gid)
        {
            mode &= !MODE_SET_GID;
        }
        applied.mode = Some(mode);
    }
    // A chown, by anyone (Linux treats root alike), clears set-user-id, and set-group-id
    // when group execute is set (without it, set-group-id marks mandatory locking).
    let chown = attrs.uid.is_some() || attrs.gid.is_some();
    if chown && status.kind == FileKind::File && attrs.mode.is_none() {
        let mut mode = status.mode & !MODE_SET_UID;
        if mode & 0o010 != 0 {
            mode &= !MODE_SET_GID;
        }
        if mode != status.mode {
            applied.mode = Some(mode);
        }
    }
    if attrs.size.is_some() && status.kind != FileKind::Directory {
        check_file(caller, dir_rights, status, FileAccess::Write)?;
    }
    if attrs.atime.is_some() || attrs.mtime.is_some() {
        // Setting times needs ownership; setting them to "now" (which the wire does not
        // tell apart) is allowed to writers as well.
        if !owner && !admin && check_file(caller, dir_rights, status, FileAccess::Write).is_err() {
            return Err(ErrorCode::NotPermitted);
        }
    }
    Ok(applied)
}

/// The mode a write by `caller` leaves: a write by anyone but an administrator clears
/// set-user-id, and set-group-id when group execute is set (POSIX's
/// "should clear" as Linux does it).
pub fn mode_after_write(caller: &Identity, status: &VnodeStatus) -> Option<u32> {
    if caller.is_administrator() || status.kind != FileKind::File {
        return None;
    }
    let mut mode = status.mode & !MODE_SET_UID;
    if mode & 0o010 != 0 {
        mode &= !MODE_SET_GID;
    }
    (mode != status.mode).then_some(mode)
}

/// In a sticky directory, only the entry's owner, the directory's owner or an
/// administrator may remove or rename the entry.
pub fn sticky_allows(caller: &Identity, dir: &VnodeStatus, entry: &VnodeStatus) -> bool {
    if dir.mode & MODE_STICKY == 0 || caller.is_administrator() {
        return true;
    }
    let uid = posix_uid(caller);
    entry.uid == uid || dir.uid == uid
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{DataVersion, Fid, Uniquifier, VnodeId, VolumeId};
    use crate::message::Timestamp;

    fn user(id: i32, groups: &[i32]) -> Identity {
        let mut cps: Vec<PrincipalId> = groups.iter().map(|g| PrincipalId(*g)).collect();
        cps.extend([PrincipalId(id), PrincipalId::AUTHUSER, PrincipalId::ANYUSER]);
        Identity {
            user: Some(format!("u{id}")),
            id: PrincipalId(id),
            cps,
            server: false,
        }
    }

    fn admin() -> Identity {
        user(1, &[PrincipalId::ADMINISTRATORS.0])
    }

    fn file(mode: u32, uid: u32, gid: u32) -> VnodeStatus {
        VnodeStatus {
            fid: Fid {
                volume: VolumeId(1),
                vnode: VnodeId(2),
                unique: Uniquifier(1),
            },
            kind: FileKind::File,
            mode,
            link_count: 1,
            size: 0,
            data_version: DataVersion(1),
            uid,
            gid,
            atime: Timestamp::default(),
            mtime: Timestamp::default(),
            ctime: Timestamp::default(),
        }
    }

    const RW: Rights = Rights(Rights::ALL.0 & !Rights::ADMINISTER.0);

    #[test]
    fn mode_bits_decide_by_the_callers_class() {
        // (mode, caller, access, allowed)
        let alice = user(1001, &[-300]);
        let bob = user(1002, &[]);
        let cases = [
            (0o640, &alice, FileAccess::Read, true),
            (0o640, &alice, FileAccess::Write, true),
            (0o460, &alice, FileAccess::Write, false),
            (0o040, &alice, FileAccess::Read, false),
            (0o640, &bob, FileAccess::Read, false),
            (0o644, &bob, FileAccess::Read, true),
            (0o755, &bob, FileAccess::Execute, true),
            (0o754, &bob, FileAccess::Execute, false),
        ];
        for (mode, caller, access, allowed) in cases {
            let status = file(mode, 1001, 999);
            assert_eq!(
                check_file(caller, RW, &status, access).is_ok(),
                allowed,
                "{mode:o} {access:?} by {:?}",
                caller.user
            );
        }
        // Group class: bob is not in group 300, alice-as-member reads through it.
        let carol = user(1003, &[-300]);
        assert!(check_file(&carol, RW, &file(0o040, 1001, 300), FileAccess::Read).is_ok());
        assert!(check_file(&bob, RW, &file(0o040, 1001, 300), FileAccess::Read).is_err());
    }

    #[test]
    fn the_access_list_bounds_what_mode_bits_allow() {
        let alice = user(1001, &[]);
        let status = file(0o666, 1001, 0);
        let rl = Rights::parse("rl").unwrap();
        assert!(check_file(&alice, rl, &status, FileAccess::Read).is_ok());
        assert_eq!(
            check_file(&alice, rl, &status, FileAccess::Write),
            Err(ErrorCode::PermissionDenied)
        );
        assert!(check_dir(rl, DirAccess::Insert).is_err());
        assert!(check_dir(Rights::parse("li").unwrap(), DirAccess::Insert).is_ok());
    }

    #[test]
    fn administrators_are_root_for_mode_bits_only() {
        let status = file(0o000, 1001, 0);
        assert!(check_file(&admin(), RW, &status, FileAccess::Read).is_ok());
        assert!(check_file(&admin(), RW, &status, FileAccess::Execute).is_err());
        assert!(check_file(&admin(), Rights::NONE, &status, FileAccess::Read).is_err());
    }

    #[test]
    fn chmod_and_chown_follow_posix() {
        let alice = user(1001, &[-300]);
        let bob = user(1002, &[]);
        let status = file(0o644, 1001, 300);
        let mode = |m| SetAttrs {
            mode: Some(m),
            ..SetAttrs::default()
        };
        let owner_to = |uid| SetAttrs {
            uid: Some(uid),
            ..SetAttrs::default()
        };
        let group_to = |gid| SetAttrs {
            gid: Some(gid),
            ..SetAttrs::default()
        };
        assert!(check_set_attrs(&alice, RW, &status, &mode(0o600)).is_ok());
        assert_eq!(
            check_set_attrs(&bob, RW, &status, &mode(0o600)),
            Err(ErrorCode::NotPermitted)
        );
        assert_eq!(
            check_set_attrs(&alice, RW, &status, &owner_to(1002)),
            Err(ErrorCode::NotPermitted)
        );
        assert!(check_set_attrs(&admin(), RW, &status, &owner_to(1002)).is_ok());
        assert_eq!(
            check_set_attrs(&alice, RW, &status, &group_to(400)),
            Err(ErrorCode::NotPermitted)
        );
        // Set-group-id asked by an owner outside the group is dropped silently.
        let applied = check_set_attrs(&alice, RW, &file(0o644, 1001, 400), &mode(0o2755));
        assert_eq!(applied.unwrap().mode, Some(0o755));
        // A non-owner may not chown or chgrp, even to what the file has already.
        assert_eq!(
            check_set_attrs(&bob, RW, &status, &owner_to(1001)),
            Err(ErrorCode::NotPermitted)
        );
        assert_eq!(
            check_set_attrs(&bob, RW, &status, &group_to(300)),
            Err(ErrorCode::NotPermitted)
        );
        assert!(check_set_attrs(&alice, RW, &status, &group_to(300)).is_ok());
        // A writer may clear set-user-id and set-group-id, and nothing else.
        let suid = file(0o6777, 1001, 300);
        assert_eq!(
            check_set_attrs(&bob, RW, &suid, &mode(0o777)).unwrap().mode,
            Some(0o777)
        );
        assert_eq!(
            check_set_attrs(&bob, RW, &suid, &mode(0o775)),
            Err(ErrorCode::NotPermitted)
        );
        assert_eq!(
            check_set_attrs(&bob, RW, &file(0o6755, 1001, 300), &mode(0o755)),
            Err(ErrorCode::NotPermitted)
        );
        // A chown clears set-user-id and set-group-id (with group execute).
        let suid = file(0o6755, 1001, 300);
        let applied = check_set_attrs(&admin(), RW, &suid, &owner_to(1002)).unwrap();
        assert_eq!(applied.mode, Some(0o755));
    }

    #[test]
    fn a_write_clears_set_user_id_and_set_group_id_with_group_execute() {
        let alice = user(1001, &[]);
        assert_eq!(
            mode_after_write(&alice, &file(0o6755, 1001, 0)),
            Some(0o755)
        );
        assert_eq!(
            mode_after_write(&alice, &file(0o2755, 1001, 0)),
            Some(0o755)
        );
        assert_eq!(mode_after_write(&alice, &file(0o2745, 1001, 0)), None);
        assert_eq!(mode_after_write(&admin(), &file(0o6755, 1001, 0)), None);
    }

    #[test]
    fn a_sticky_directory_lets_only_owners_remove() {
        let alice = user(1001, &[]);
        let bob = user(1002, &[]);
        let mut dir = file(0o1777, 0, 0);
        dir.kind = FileKind::Directory;
        let alices = file(0o644, 1001, 0);
        assert!(sticky_allows(&alice, &dir, &alices));
        assert!(!sticky_allows(&bob, &dir, &alices));
        assert!(sticky_allows(&admin(), &dir, &alices));
        dir.uid = 1002;
        assert!(sticky_allows(&bob, &dir, &alices));
    }
}
