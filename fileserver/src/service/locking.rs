//! Lock requests: set, release, test and cancel a byte-range lock, and reclaim one after
//! this server restarted or took over.
//! Invariant: only a cache manager locks, and an empty range is refused before it
//! reaches the lock table.

use std::sync::Arc;

use proto::{ByteRange, ErrorCode, Fid, LockKind, LockOwnerId, Response, WaitId};

use state::ClientKey;

use super::{Caller, FileService};
use crate::locks::{self, SetLockReply};

/// A lock asked for: of `owner` on `range` of `fid`, by process `pid`.
#[derive(Clone, Copy, Debug)]
pub(super) struct LockRequest {
    pub fid: Fid,
    pub owner: LockOwnerId,
    pub range: ByteRange,
    pub kind: LockKind,
    pub pid: u32,
}

impl LockRequest {
    /// The request as its caller's, with a range the lock table may hold.
    fn checked(self, caller: Caller) -> Result<(ClientKey, LockRequest), ErrorCode> {
        let client = caller.client()?;
        let range = locks::checked(self.range)?;
        Ok((client, LockRequest { range, ..self }))
    }
}

impl FileService {
    pub(super) async fn set_lock(
        self: &Arc<Self>,
        caller: Caller,
        lock: LockRequest,
        wait: bool,
    ) -> Result<Response, ErrorCode> {
        let (client, lock) = lock.checked(caller)?;
        let LockRequest {
            fid,
            owner,
            range,
            kind,
            pid,
        } = lock;
        match self
            .locks
            .set(client, fid, owner, range, kind, wait, pid)
            .await?
        {
            SetLockReply::Granted => Ok(Response::Ok),
            SetLockReply::Queued(wait) => Ok(Response::LockQueued { wait }),
        }
    }

    pub(super) async fn release_lock(
        self: &Arc<Self>,
        caller: Caller,
        fid: Fid,
        owner: LockOwnerId,
        range: ByteRange,
    ) -> Result<Response, ErrorCode> {
        let client = caller.client()?;
        self.locks
            .release(client, fid, owner, locks::checked(range)?)
            .await?;
        Ok(Response::Ok)
    }

    pub(super) fn test_lock(
        &self,
        caller: Caller,
        fid: Fid,
        owner: LockOwnerId,
        range: ByteRange,
        kind: LockKind,
    ) -> Result<Response, ErrorCode> {
        let client = caller.client()?;
        let range = locks::checked(range)?;
        let holder = self.locks.test(client, fid, owner, range, kind);
        Ok(Response::LockTest { holder })
    }

    /// Answers once no grant of `wait` can reach the caller any more.
    pub(super) async fn cancel_lock_wait(
        self: &Arc<Self>,
        caller: Caller,
        wait: WaitId,
    ) -> Result<Response, ErrorCode> {
        self.locks.cancel(caller.client()?, wait).await;
        Ok(Response::Ok)
    }

    pub(super) fn reclaim_lock(
        &self,
        caller: Caller,
        lock: LockRequest,
    ) -> Result<Response, ErrorCode> {
        let (client, lock) = lock.checked(caller)?;
        self.locks.reclaim(
            client, lock.fid, lock.owner, lock.range, lock.kind, lock.pid,
        )?;
        Ok(Response::Ok)
    }

    pub(super) fn reclaim_done(self: &Arc<Self>, caller: Caller) -> Result<Response, ErrorCode> {
        self.locks.reclaim_done(caller.client()?);
        Ok(Response::Ok)
    }
}
