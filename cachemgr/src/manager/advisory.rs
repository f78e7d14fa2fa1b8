//! Advisory locks on the mount (`fcntl`, `flock`) as the fileservers' byte-range locks,
//! mirrored in `HeldLocks`, with the lease renewed while any is held or awaited.
//! Invariant: `HeldLocks` changes only after the server call returns; a blocking request
//! waits for the server's push, and polls only a server in grace, at the pace it asks; an
//! interrupted one holds nothing once it returns `EINTR`.

use std::future::Future;
use std::time::Duration;

use proto::{
    ByteRange, ErrorCode, Fid, LockHolder, LockKind, LockOwnerId, ProtoError, Request, Response,
    ServerId, WaitId,
};
use tracing::{debug, info, warn};

use super::fs_error::unexpected;
use super::{FsError, FsResult, Manager, rpc_error};
use crate::held_locks::HeldLock;
use crate::inode::Ino;
use crate::lock_waits::WaitEnd;
use crate::volume::VolumeLocation;

/// Bounds on the server's `Grace { retry_ms }` hint for a blocking request.
const GRACE_RETRY_MIN: Duration = Duration::from_millis(20);
const GRACE_RETRY_MAX: Duration = Duration::from_secs(5);

/// What an interrupted blocking request answers.
fn interrupted_error() -> FsError {
    FsError::from_errno(libc::EINTR)
}

/// A lock request from the kernel, in the server's terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockRequest {
    pub owner: LockOwnerId,
    pub range: ByteRange,
    /// `None` unlocks the range.
    pub kind: Option<LockKind>,
    pub pid: u32,
}

/// Each kernel lock call maps onto the fileserver's lock calls, and the locks granted are
/// mirrored in `HeldLocks`, so a close costs an RPC only when its owner holds something
/// and a reconnect can reclaim them. A grant is recorded once granted; a release is
/// forgotten even if the server could not be told, since then the lease ends the lock. A
/// blocking request waits for the server's `LockGranted` push, never by polling, except
/// for the server's own `Grace` retry hint.
impl Manager {
    /// `F_SETLK`/`F_SETLKW`/`flock`: takes, changes or releases a lock. `wait` blocks
    /// until the range frees; otherwise a conflict is `EAGAIN`.
    pub async fn setlk(&self, ino: Ino, request: LockRequest, wait: bool) -> FsResult<()> {
        self.set_lock(ino, request, wait, std::future::pending())
            .await
    }

    /// A blocking `setlk` that ends with `EINTR` once `interrupted` completes, the
    /// server's queued request withdrawn. A grant that wins the race with the interrupt
    /// is kept and answered `Ok`, as a local lock granted while a signal arrives: no lock
    /// is ever left with a caller that was told `EINTR`.
    pub async fn setlk_interruptible(
        &self,
        ino: Ino,
        request: LockRequest,
        interrupted: impl Future<Output = ()>,
    ) -> FsResult<()> {
        self.set_lock(ino, request, true, interrupted).await
    }

    async fn set_lock(
        &self,
        ino: Ino,
        request: LockRequest,
        wait: bool,
        interrupted: impl Future<Output = ()>,
    ) -> FsResult<()> {
        let fid = self.resolved_fid(ino).await?;
        let Some(kind) = request.kind else {
            return self.unlock(fid, request.owner, request.range).await;
        };
        let location = self.location(fid.volume).await?;
        let server = location.server;
        let mut interrupted = std::pin::pin!(interrupted);
        loop {
            let call = Request::SetLock {
                fid,
                owner: request.owner,
                range: request.range,
                kind,
                wait,
                pid: request.pid,
            };
            let asking = wait.then(|| self.lock_waits.asking(server));
            // Not raced with the interrupt: the call has its deadline, and its answer
            // (granted, or queued under an id) is what an interrupt must undo.
            let answer = self.pool.call(&location, call).await;
            debug!(%fid, owner = request.owner.0, ?kind, wait, answer = ?answer.as_ref().map(Response::kind_name), "set lock");
            match answer {
                Ok(Response::Ok) => {
                    self.record_grant(fid, request, kind);
                    return Ok(());
                }
                Ok(Response::LockQueued { wait: id }) => {
                    let Some(asking) = asking else {
                        return Err(unexpected(&Response::LockQueued { wait: id }));
                    };
                    let mut granted = self.lock_waits.wait_for(&asking, id);
                    drop(asking);
                    let end = tokio::select! {
                        biased;
                        end = &mut granted => end.ok(),
                        () = &mut interrupted => {
                            if self.withdraw_wait(&location, id).await {
                                return Err(interrupted_error());
                            }
                            // The wait ended first: kept if granted; otherwise (lost
                            // with its connection) not asked again.
                            if granted.try_recv() != Ok(WaitEnd::Granted) {
                                self.lock_waits.forget(server, id);
                                return Err(interrupted_error());
                            }
                            Some(WaitEnd::Granted)
                        }
                    };
                    match end {
                        Some(WaitEnd::Granted) => {
                            self.record_grant(fid, request, kind);
                            return Ok(());
                        }
                        // The connection ended under the wait: ask again (after the
                        // reconnect has reclaimed what this client holds).
                        Some(WaitEnd::Lost) | None => {
                            self.lock_waits.forget(server, id);
                            info!(%fid, "connection lost while waiting for a lock; asking again");
                        }
                    }
                }
                Err(ProtoError::Remote(ErrorCode::Grace { retry_ms })) if wait => {
                    drop(asking);
                    let pause =
                        Duration::from_millis(retry_ms).clamp(GRACE_RETRY_MIN, GRACE_RETRY_MAX);
                    debug!(%fid, ?pause, "fileserver in grace; retrying the lock");
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = &mut interrupted => return Err(interrupted_error()),
                    }
                }
                Err(ProtoError::Remote(ErrorCode::WouldBlock | ErrorCode::Grace { .. })) => {
                    return Err(FsError::EAGAIN);
                }
                Err(e) => return Err(rpc_error(&e)),
                Ok(other) => return Err(unexpected(&other)),
            }
        }
    }

    /// Withdraws the queued request `wait` of an interrupted waiter: a grant pushed from
    /// now on is refused (and so released by the server), and the server drops the
    /// request, waking those queued behind it. Returns `false` when the wait had already
    /// ended, granted or lost, before it could be withdrawn.
    async fn withdraw_wait(&self, location: &VolumeLocation, wait: WaitId) -> bool {
        let server = location.server;
        if !self.lock_waits.withdraw(server, wait) {
            return false;
        }
        // The server answers once no grant of `wait` is on its way any more.
        let answer = self
            .pool
            .call(location, Request::CancelLockWait { wait })
            .await;
        self.lock_waits.withdrawn(server, wait);
        match answer {
            Ok(_) => debug!(%server, wait = wait.0, "interrupted lock wait withdrawn"),
            // A grant it makes later is refused if pushed in time; else the lease ends it.
            Err(e) => {
                warn!(%server, wait = wait.0, error = %e, "cannot withdraw an interrupted lock wait")
            }
        }
        true
    }

    fn record_grant(&self, fid: Fid, request: LockRequest, kind: LockKind) {
        self.held_locks.lock().grant(
            fid,
            HeldLock {
                owner: request.owner,
                range: request.range,
                kind,
                pid: request.pid,
            },
        );
    }

    async fn unlock(&self, fid: Fid, owner: LockOwnerId, range: ByteRange) -> FsResult<()> {
        let request = Request::ReleaseLock { fid, owner, range };
        let answer = self.call(fid.volume, request).await;
        // Forgotten either way: a server that could not be told ends it with the lease.
        self.held_locks.lock().release(fid, owner, range);
        match answer? {
            Response::Ok => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// `F_GETLK`: the lock that would conflict with this one, if any.
    pub async fn getlk(
        &self,
        ino: Ino,
        owner: LockOwnerId,
        range: ByteRange,
        kind: LockKind,
    ) -> FsResult<Option<LockHolder>> {
        let fid = self.resolved_fid(ino).await?;
        let request = Request::TestLock {
            fid,
            owner,
            range,
            kind,
        };
        match self.call(fid.volume, request).await? {
            Response::LockTest { holder } => Ok(holder),
            other => Err(unexpected(&other)),
        }
    }

    /// A close by `owner` (FLUSH for POSIX locks, RELEASE for `flock`): releases its
    /// locks on the file, with an RPC only when it holds one there.
    pub async fn release_owner(&self, ino: Ino, owner: LockOwnerId) -> FsResult<()> {
        let fid = self.fid(ino)?;
        if !self.held_locks.lock().holds(fid, owner) {
            return Ok(());
        }
        self.unlock(fid, owner, ByteRange::whole()).await
    }

    /// The servers on which this client holds or awaits a lock: their leases must be
    /// kept alive.
    fn lease_servers(&self) -> Vec<(ServerId, Vec<String>)> {
        let fids: Vec<Fid> = self.held_locks.lock().fids().collect();
        let mut servers: Vec<(ServerId, Vec<String>)> = Vec::new();
        for fid in fids {
            if let Some(location) = self.volumes.cached(fid.volume)
                && !servers.iter().any(|(s, _)| *s == location.server)
            {
                servers.push((location.server, location.addresses.clone()));
            }
        }
        for (server, addresses) in self.volumes.servers() {
            if self.lock_waits.waiting_on(server) && !servers.iter().any(|(s, _)| *s == server) {
                servers.push((server, addresses));
            }
        }
        servers
    }

    /// Renews the lease on every server where a lock is held or awaited, each
    /// `interval`, until the manager is dropped.
    pub(super) fn spawn_lease_renewal(&self, interval: Duration) {
        let this = self.this.clone();
        self.runtime.spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(manager) = this.upgrade() else {
                    return;
                };
                for (server, addresses) in manager.lease_servers() {
                    let answer = manager
                        .pool
                        .call_with_timeout(
                            server,
                            &addresses,
                            Request::RenewLease,
                            manager.pool.rpc_timeout(),
                        )
                        .await;
                    match answer {
                        Ok(_) => debug!(%server, "lease renewed"),
                        Err(e) => warn!(%server, error = %e, "cannot renew the lock lease"),
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proto::{ClientId, LockHolder, WaitId};

    use super::*;
    use crate::fake_cell::{FILE, FakeCell};
    use crate::fuse_fs::lock_range;
    use crate::manager::test_support::{start_manager, start_manager_renewing};

    const OWNER: LockOwnerId = LockOwnerId(5);

    fn exclusive(range: ByteRange) -> LockRequest {
        LockRequest {
            owner: OWNER,
            range,
            kind: Some(LockKind::Exclusive),
            pid: 42,
        }
    }

    fn set_locks(calls: &[Request]) -> Vec<&Request> {
        calls
            .iter()
            .filter(|c| matches!(c, Request::SetLock { .. }))
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn set_test_and_unlock_map_onto_server_calls() {
        let (cell, _stop) = FakeCell::start(Vec::new(), 0, 0).await;
        let dir = tempfile::tempdir().unwrap();
        let manager = start_manager(&cell, dir.path()).await;
        let ino = manager.state.lock().inodes.ino_for(FILE);

        // fcntl(F_SETLK) of bytes 0..=9 (kernel range, inclusive end).
        manager
            .setlk(ino, exclusive(lock_range(0, 9).unwrap()), false)
            .await
            .unwrap();
        // A shared whole-file lock of another owner (flock: 0..=OFFSET_MAX).
        let shared = LockRequest {
            owner: LockOwnerId(6),
            range: lock_range(0, i64::MAX as u64).unwrap(),
            kind: Some(LockKind::Shared),
            pid: 43,
        };
        manager.setlk(ino, shared, false).await.unwrap();
        // A conflict without waiting is EAGAIN and records nothing.
        cell.lock_answers
            .lock()
            .push_back(Err(ErrorCode::WouldBlock));
        let refused = manager
            .setlk(ino, exclusive(lock_range(100, 199).unwrap()), false)
            .await;
        assert_eq!(refused, Err(FsError::EAGAIN));
        {
            let calls = &cell.record.lock().lock_calls;
            assert_eq!(
                set_locks(calls),
                [
                    &Request::SetLock {
                        fid: FILE,
                        owner: LockOwnerId(5),
                        range: ByteRange::new(0, 10).unwrap(),
                        kind: LockKind::Exclusive,
                        wait: false,
                        pid: 42,
                    },
                    &Request::SetLock {
                        fid: FILE,
                        owner: LockOwnerId(6),
                        range: ByteRange::whole(),
                        kind: LockKind::Shared,
                        wait: false,
                        pid: 43,
                    },
                    &Request::SetLock {
                        fid: FILE,
                        owner: LockOwnerId(5),
                        range: ByteRange::new(100, 200).unwrap(),
                        kind: LockKind::Exclusive,
                        wait: false,
                        pid: 42,
                    },
                ]
            );
        }
        let held = manager.held_locks.lock().all();
        assert_eq!(held.len(), 2, "{held:?}");

        // F_GETLK reports the server's holder as it is.
        let holder = LockHolder {
            client: ClientId::random(),
            owner: LockOwnerId(99),
            range: ByteRange::new(4, ByteRange::EOF).unwrap(),
            kind: LockKind::Shared,
            pid: 1234,
        };
        *cell.test_holder.lock() = Some(holder.clone());
        let found = manager
            .getlk(ino, OWNER, lock_range(0, 9).unwrap(), LockKind::Exclusive)
            .await
            .unwrap();
        assert_eq!(found, Some(holder));
        assert!(cell.record.lock().lock_calls.contains(&Request::TestLock {
            fid: FILE,
            owner: LockOwnerId(5),
            range: ByteRange::new(0, 10).unwrap(),
            kind: LockKind::Exclusive,
        }));

        // F_UNLCK of bytes 0..=4 releases that part only.
        let unlock = LockRequest {
            kind: None,
            ..exclusive(lock_range(0, 4).unwrap())
        };
        manager.setlk(ino, unlock, false).await.unwrap();
        assert_eq!(
            cell.record.lock().lock_calls.last(),
            Some(&Request::ReleaseLock {
                fid: FILE,
                owner: LockOwnerId(5),
                range: ByteRange::new(0, 5).unwrap(),
            })
        );
        assert!(manager.held_locks.lock().holds(FILE, OWNER));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_blocking_lock_completes_when_the_server_pushes_the_grant() {
        let (cell, _stop) = FakeCell::start(Vec::new(), 0, 0).await;
        let dir = tempfile::tempdir().unwrap();
        let manager = start_manager(&cell, dir.path()).await;
        let ino = manager.state.lock().inodes.ino_for(FILE);
        cell.lock_answers
            .lock()
            .push_back(Ok(Response::LockQueued { wait: WaitId(9) }));
        let waiter = {
            let manager = Arc::clone(&manager);
            tokio::spawn(async move {
                manager
                    .setlk(ino, exclusive(ByteRange::whole()), true)
                    .await
            })
        };
        cell.wait_for_lock_calls(|calls| !set_locks(calls).is_empty())
            .await;
        assert!(!waiter.is_finished());
        assert!(manager.lock_waits.waiting_on(cell_server(&manager)));
        // The push may overtake the `LockQueued` answer; either way it reaches the waiter.
        assert_eq!(
            cell.push_grant(WaitId(9), FILE).await.unwrap(),
            Response::Ok
        );
        tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(manager.held_locks.lock().holds(FILE, OWNER));
        assert!(matches!(
            set_locks(&cell.record.lock().lock_calls)[..],
            [Request::SetLock { wait: true, .. }]
        ));
    }

    /// An interrupted wait answers `EINTR`, withdraws the request on the server, refuses
    /// the grant if it is pushed late, and records no lock; a grant that came first wins.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_interrupted_wait_is_withdrawn_and_its_late_grant_refused() {
        let (cell, _stop) = FakeCell::start(Vec::new(), 0, 0).await;
        let dir = tempfile::tempdir().unwrap();
        let manager = start_manager(&cell, dir.path()).await;
        let ino = manager.state.lock().inodes.ino_for(FILE);
        cell.lock_answers
            .lock()
            .push_back(Ok(Response::LockQueued { wait: WaitId(11) }));
        let (interrupt, interrupted) = tokio::sync::oneshot::channel::<()>();
        let waiter = {
            let manager = Arc::clone(&manager);
            tokio::spawn(async move {
                let interrupted = async {
                    let _ = interrupted.await;
                };
                manager
                    .setlk_interruptible(ino, exclusive(ByteRange::whole()), interrupted)
                    .await
            })
        };
        cell.wait_for_lock_calls(|calls| !set_locks(calls).is_empty())
            .await;
        interrupt.send(()).unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(answer, Err(FsError::from_errno(libc::EINTR)));
        assert!(
            cell.record
                .lock()
                .lock_calls
                .contains(&Request::CancelLockWait { wait: WaitId(11) })
        );
        // A grant pushed after the withdrawal is refused, so the server releases it.
        assert!(cell.push_grant(WaitId(11), FILE).await.is_err());
        assert!(!manager.held_locks.lock().holds(FILE, OWNER));
        assert!(!manager.lock_waits.waiting_on(cell_server(&manager)));

        // The grant arrives first: the interrupt that follows changes nothing.
        cell.lock_answers
            .lock()
            .push_back(Ok(Response::LockQueued { wait: WaitId(12) }));
        let (interrupt, interrupted) = tokio::sync::oneshot::channel::<()>();
        let waiter = {
            let manager = Arc::clone(&manager);
            tokio::spawn(async move {
                let interrupted = async {
                    let _ = interrupted.await;
                };
                manager
                    .setlk_interruptible(ino, exclusive(ByteRange::whole()), interrupted)
                    .await
            })
        };
        cell.wait_for_lock_calls(|calls| set_locks(calls).len() == 2)
            .await;
        assert_eq!(
            cell.push_grant(WaitId(12), FILE).await.unwrap(),
            Response::Ok
        );
        let _ = interrupt.send(());
        let answer = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(answer, Ok(()));
        assert!(manager.held_locks.lock().holds(FILE, OWNER));
    }

    fn cell_server(manager: &Manager) -> ServerId {
        match manager.volumes.servers()[..] {
            [(server, _)] => server,
            _ => panic!("the fake cell has one server"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn grace_is_waited_out_when_blocking_and_eagain_otherwise() {
        let (cell, _stop) = FakeCell::start(Vec::new(), 0, 0).await;
        let dir = tempfile::tempdir().unwrap();
        let manager = start_manager(&cell, dir.path()).await;
        let ino = manager.state.lock().inodes.ino_for(FILE);
        let grace = Err(ErrorCode::Grace { retry_ms: 1 });
        cell.lock_answers.lock().push_back(grace.clone());
        let refused = manager
            .setlk(ino, exclusive(ByteRange::whole()), false)
            .await;
        assert_eq!(refused, Err(FsError::EAGAIN));
        assert!(!manager.held_locks.lock().holds(FILE, OWNER));
        cell.lock_answers.lock().extend([grace.clone(), grace]);
        manager
            .setlk(ino, exclusive(ByteRange::whole()), true)
            .await
            .unwrap();
        assert_eq!(set_locks(&cell.record.lock().lock_calls).len(), 4);
        assert!(manager.held_locks.lock().holds(FILE, OWNER));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_close_releases_only_what_its_owner_holds() {
        let (cell, _stop) = FakeCell::start(Vec::new(), 0, 0).await;
        let dir = tempfile::tempdir().unwrap();
        let manager = start_manager(&cell, dir.path()).await;
        let ino = manager.state.lock().inodes.ino_for(FILE);
        // Closes with no lock held cost no RPC.
        manager.release_owner(ino, OWNER).await.unwrap();
        manager
            .setlk(ino, exclusive(lock_range(10, 19).unwrap()), false)
            .await
            .unwrap();
        manager.release_owner(ino, LockOwnerId(6)).await.unwrap();
        assert_eq!(cell.record.lock().lock_calls.len(), 1, "only the SetLock");
        manager.release_owner(ino, OWNER).await.unwrap();
        assert_eq!(
            cell.record.lock().lock_calls.last(),
            Some(&Request::ReleaseLock {
                fid: FILE,
                owner: LockOwnerId(5),
                range: ByteRange::whole(),
            })
        );
        assert!(manager.held_locks.lock().is_empty());
        manager.release_owner(ino, OWNER).await.unwrap();
        assert_eq!(cell.record.lock().lock_calls.len(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_lease_is_renewed_while_a_lock_is_held_only() {
        let (cell, _stop) = FakeCell::start(Vec::new(), 0, 0).await;
        let dir = tempfile::tempdir().unwrap();
        let renew = Duration::from_millis(50);
        let manager = start_manager_renewing(&cell, dir.path(), renew).await;
        let ino = manager.state.lock().inodes.ino_for(FILE);
        manager
            .setlk(ino, exclusive(ByteRange::whole()), false)
            .await
            .unwrap();
        let renewals = |calls: &[Request]| {
            calls
                .iter()
                .filter(|c| matches!(c, Request::RenewLease))
                .count()
        };
        cell.wait_for_lock_calls(|calls| renewals(calls) >= 2).await;
        manager.release_owner(ino, OWNER).await.unwrap();
        assert!(manager.lease_servers().is_empty());
    }
}
