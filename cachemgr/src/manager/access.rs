//! Checks made here for the caller, without a call while the rights hold: opens,
//! `access(2)`, lookups and listings are judged by `proto::access` with the caller's
//! rights cached per (user, directory) under that directory's callback.
//! Invariant: a caller is judged as the fileserver would judge it: the same rules, its
//! token's identity (or `system:anyuser`), and rights no older than the last break.

use std::time::Instant;

use proto::access::{self, DirAccess, FileAccess};
use proto::{AccessList, Fid, Identity, ProtoError, Request, Response, Rights, Timestamp};

use super::{FsError, FsResult, Manager, NodeKind, rpc_error, unexpected};
use crate::inode::Ino;
use crate::rights::Cached;
use crate::tokens;

impl Manager {
    /// Whom the current task acts for: its caller's token, read without verifying (the
    /// fileservers verify), or `system:anyuser`. An expired token is refused, as a
    /// fileserver would refuse it.
    pub(super) fn caller_identity(&self) -> FsResult<Identity> {
        let Some(uid) = tokens::current_caller() else {
            return Ok(Identity::anonymous());
        };
        match self.tokens.get(uid) {
            None => Ok(Identity::anonymous()),
            Some(held) if held.body.expiry <= Timestamp::now() => Err(FsError::EACCES),
            Some(held) => Ok(Identity::from_token(&held.body)),
        }
    }

    /// The caller's rights on the directory governing `fid` (itself for a directory),
    /// from the cache while that directory's callback holds, else from the server.
    pub(super) async fn rights_on(&self, caller: &Identity, fid: Fid) -> FsResult<Rights> {
        if let Some(cached) = self.rights.get(caller.id, fid)
            && self
                .state
                .lock()
                .statuses
                .fresh(cached.dir, Instant::now())
                .is_some()
        {
            return Ok(cached.rights);
        }
        let location = self.location(fid.volume).await?;
        let sent_at = Instant::now();
        match self
            .pool
            .call(&location, Request::FetchRights { fid })
            .await
        {
            Ok(Response::Rights {
                rights,
                dir,
                callback,
            }) => {
                let dir_fid = dir.fid;
                let promised = callback.is_some();
                self.absorb(dir, callback, sent_at);
                if promised {
                    let cached = Cached {
                        rights,
                        dir: dir_fid,
                    };
                    self.rights.put(caller.id, fid, cached);
                }
                Ok(rights)
            }
            // A server before access lists enforces nothing: neither is anything here.
            Err(ProtoError::PeerTooOld { .. }) => Ok(Rights::ALL),
            Ok(other) => Err(unexpected(&other)),
            Err(e) => Err(rpc_error(&e)),
        }
    }

    /// Checks each of `wanted` on `ino` for the caller (an `open` or `access(2)`).
    pub async fn check_access(&self, ino: Ino, wanted: &[FileAccess]) -> FsResult<()> {
        let fid = self.resolved_fid(ino).await?;
        let caller = self.caller_identity()?;
        let status = self.valid_status(fid).await?;
        if wanted.is_empty() {
            return Ok(());
        }
        let rights = self.rights_on(&caller, fid).await?;
        for access in wanted {
            access::check_file(&caller, rights, &status, *access).map_err(|_| FsError::EACCES)?;
        }
        Ok(())
    }

    /// Checks that the caller may look names up in directory `dir`.
    pub async fn check_lookup(&self, dir: Ino) -> FsResult<()> {
        let dir = self.fid(dir)?;
        let caller = self.caller_identity()?;
        let rights = self.rights_on(&caller, dir).await?;
        access::check_dir(rights, DirAccess::Lookup).map_err(|_| FsError::EACCES)
    }

    /// Notes that `child`, found by a lookup in `dir`, is governed by `dir`'s list when
    /// it is not a directory: every name of a file is in one directory (the fileserver
    /// refuses links and renames that would make it two), so the caller's rights cached
    /// for `dir` are its rights, and its opens need no `FetchRights` of their own.
    pub fn found_in(&self, dir: Ino, child: Ino, kind: NodeKind) {
        if kind == NodeKind::Directory {
            return;
        }
        let (Ok(dir), Ok(child), Ok(caller)) =
            (self.fid(dir), self.fid(child), self.caller_identity())
        else {
            return;
        };
        if let Some(cached) = self.rights.get(caller.id, dir)
            && cached.dir == dir
        {
            self.rights.put(caller.id, child, cached);
        }
    }

    /// Directory `dir`'s access list, fetched for the caller (`fs listacl`).
    pub async fn fetch_acl(&self, dir: Ino) -> FsResult<AccessList> {
        let dir = self.fid(dir)?;
        match self.call(dir.volume, Request::FetchAcl { dir }).await? {
            Response::Acl(acl) => Ok(acl),
            other => Err(unexpected(&other)),
        }
    }

    /// Replaces directory `dir`'s access list for the caller (`fs setacl`). The server
    /// breaks every other holder's promise on it; this manager's own rights for it go
    /// here.
    pub async fn store_acl(&self, dir: Ino, acl: AccessList) -> FsResult<()> {
        let dir = self.fid(dir)?;
        let sent_at = Instant::now();
        let answer = self.call(dir.volume, Request::StoreAcl { dir, acl }).await;
        self.rights.drop_dir(dir);
        match answer? {
            Response::Status { status, callback } => {
                self.absorb(status, callback, sent_at);
                Ok(())
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Forgets the rights cached under these directories (this client's own change of
    /// them, which breaks no promise of its own).
    pub fn forget_rights(&self, dirs: &[Ino]) {
        for dir in dirs {
            if let Ok(fid) = self.fid(*dir) {
                self.rights.drop_dir(fid);
            }
        }
    }

    /// Forgets cached rights: a token was given or dropped on this workstation.
    pub fn tokens_changed(&self) {
        self.rights.clear();
    }
}
