//! Lock service tests: a real fileserver on 127.0.0.1:0 and fake cache managers that
//! take, test and release byte-range locks and record the `LockGranted` pushes.

mod common;

use std::time::Duration;

use common::{EOF, Server, TIMEOUT, cache_manager, fid, wire_range};
use proto::rpc::Connection;
use proto::{
    ByteRange, ClientId, ErrorCode, Fid, InstanceNonce, LockKind, LockOwnerId, ProtoError, Request,
    Response, WaitId,
};
use tokio::sync::mpsc;

/// A fake cache manager: acknowledges every push and forwards `LockGranted` waits.
struct FakeClient {
    id: ClientId,
    connection: Connection,
    granted: mpsc::UnboundedReceiver<WaitId>,
}

impl FakeClient {
    async fn connect(address: &str, id: ClientId, instance: InstanceNonce) -> FakeClient {
        let (granted_tx, granted) = mpsc::unbounded_channel();
        let on_push = move |body| {
            if let Request::LockGranted { wait, .. } = body {
                let _ = granted_tx.send(wait);
            }
        };
        let connection = common::connect(address, cache_manager(id, instance), on_push).await;
        FakeClient {
            id,
            connection,
            granted,
        }
    }

    async fn new(address: &str) -> FakeClient {
        FakeClient::connect(address, ClientId::random(), InstanceNonce(1)).await
    }

    async fn call(&self, request: Request) -> Result<Response, ProtoError> {
        self.connection.call(request, TIMEOUT).await
    }

    async fn lock(
        &self,
        fid: Fid,
        owner: u64,
        (start, end): (u64, u64),
        kind: LockKind,
        wait: bool,
    ) -> Result<Response, ProtoError> {
        self.call(Request::SetLock {
            fid,
            owner: LockOwnerId(owner),
            range: wire_range(start, end),
            kind,
            wait,
            pid: 1000 + owner as u32,
        })
        .await
    }

    async fn unlock(&self, fid: Fid, owner: u64) {
        let reply = self
            .call(Request::ReleaseLock {
                fid,
                owner: LockOwnerId(owner),
                range: ByteRange::whole(),
            })
            .await;
        assert_eq!(reply.unwrap(), Response::Ok);
    }

    async fn next_grant(&mut self) -> WaitId {
        tokio::time::timeout(TIMEOUT, self.granted.recv())
            .await
            .expect("no LockGranted in time")
            .expect("connection gone")
    }
}

fn refused(reply: Result<Response, ProtoError>) -> ErrorCode {
    match reply {
        Err(ProtoError::Remote(code)) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn queued(reply: Result<Response, ProtoError>) -> WaitId {
    match reply {
        Ok(Response::LockQueued { wait }) => wait,
        other => panic!("expected LockQueued, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusive_conflict_would_block_and_test_names_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |_| {}).await;
    let a = FakeClient::new(&server.address).await;
    let b = FakeClient::new(&server.address).await;
    let file = fid(7);

    let reply = a.lock(file, 1, (0, 100), LockKind::Exclusive, false).await;
    assert_eq!(reply.unwrap(), Response::Ok);
    let reply = b.lock(file, 2, (50, 60), LockKind::Shared, false).await;
    assert_eq!(refused(reply), ErrorCode::WouldBlock);
    // Outside the held range there is no conflict.
    let reply = b
        .lock(file, 2, (100, EOF), LockKind::Exclusive, false)
        .await;
    assert_eq!(reply.unwrap(), Response::Ok);

    let reply = b
        .call(Request::TestLock {
            fid: file,
            owner: LockOwnerId(2),
            range: wire_range(0, 10),
            kind: LockKind::Shared,
        })
        .await
        .unwrap();
    let Response::LockTest {
        holder: Some(holder),
    } = reply
    else {
        panic!("expected a holder, got {reply:?}");
    };
    assert_eq!(holder.client, a.id);
    assert_eq!(holder.owner, LockOwnerId(1));
    assert_eq!(holder.pid, 1001);
    assert_eq!(holder.range, ByteRange::new(0, 100).unwrap());
    assert_eq!(holder.kind, LockKind::Exclusive);

    // The holder itself sees nothing in its way.
    let reply = a
        .call(Request::TestLock {
            fid: file,
            owner: LockOwnerId(1),
            range: wire_range(0, 10),
            kind: LockKind::Exclusive,
        })
        .await
        .unwrap();
    assert_eq!(reply, Response::LockTest { holder: None });
    let reply = a.lock(file, 1, (5, 5), LockKind::Shared, false).await;
    assert_eq!(refused(reply), ErrorCode::InvalidArgument);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_locks_coexist_and_a_queued_request_is_granted_after_release() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |_| {}).await;
    let a = FakeClient::new(&server.address).await;
    let mut b = FakeClient::new(&server.address).await;
    let file = fid(8);

    let reply = a.lock(file, 1, (0, EOF), LockKind::Shared, false).await;
    assert_eq!(reply.unwrap(), Response::Ok);
    let reply = b.lock(file, 2, (0, EOF), LockKind::Shared, false).await;
    assert_eq!(reply.unwrap(), Response::Ok);
    b.unlock(file, 2).await;

    let wait = queued(b.lock(file, 2, (0, 10), LockKind::Exclusive, true).await);
    a.unlock(file, 1).await;
    assert_eq!(b.next_grant().await, wait);
    // Granted: now a is the one blocked.
    let reply = a.lock(file, 1, (0, 1), LockKind::Shared, false).await;
    assert_eq!(refused(reply), ErrorCode::WouldBlock);

    // A cancelled wait is never granted.
    let wait = queued(a.lock(file, 1, (0, 1), LockKind::Shared, true).await);
    let reply = a.call(Request::CancelLockWait { wait }).await;
    assert_eq!(reply.unwrap(), Response::Ok);
    b.unlock(file, 2).await;
    let reply = a.lock(file, 1, (0, 1), LockKind::Exclusive, false).await;
    assert_eq!(reply.unwrap(), Response::Ok);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lapsed_lease_releases_locks_and_wakes_the_waiter() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |config| {
        config.lease = Duration::from_millis(400);
    })
    .await;
    let a = FakeClient::new(&server.address).await;
    let mut b = FakeClient::new(&server.address).await;
    let file = fid(9);

    let reply = a.lock(file, 1, (0, EOF), LockKind::Exclusive, false).await;
    assert_eq!(reply.unwrap(), Response::Ok);
    let wait = queued(b.lock(file, 2, (0, EOF), LockKind::Exclusive, true).await);
    // b keeps its lease; a goes silent and loses its lock within about a lease.
    let renew = tokio::spawn(async move {
        loop {
            let reply = b.call(Request::RenewLease).await;
            assert_eq!(reply.unwrap(), Response::Ok);
            tokio::select! {
                granted = b.granted.recv() => return granted,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    });
    let granted = tokio::time::timeout(TIMEOUT, renew).await.unwrap().unwrap();
    assert_eq!(granted, Some(wait));
    let reply = a.lock(file, 1, (0, 1), LockKind::Shared, false).await;
    assert_eq!(refused(reply), ErrorCode::WouldBlock);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_client_loses_its_locks_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |_| {}).await;
    let id = ClientId::random();
    let a = FakeClient::connect(&server.address, id, InstanceNonce(1)).await;
    let mut b = FakeClient::new(&server.address).await;
    let file = fid(10);

    let reply = a.lock(file, 1, (0, EOF), LockKind::Exclusive, false).await;
    assert_eq!(reply.unwrap(), Response::Ok);
    let wait = queued(b.lock(file, 2, (0, EOF), LockKind::Shared, true).await);
    // Same client, new instance: its old locks are void.
    let restarted = FakeClient::connect(&server.address, id, InstanceNonce(2)).await;
    assert_eq!(b.next_grant().await, wait);
    let reply = restarted
        .lock(file, 1, (0, EOF), LockKind::Exclusive, false)
        .await;
    assert_eq!(refused(reply), ErrorCode::WouldBlock);
    drop(a);
    server.stop().await;
}

async fn reclaim(
    client: &FakeClient,
    file: Fid,
    owner: u64,
    kind: LockKind,
) -> Result<Response, ProtoError> {
    client
        .call(Request::ReclaimLock {
            fid: file,
            owner: LockOwnerId(owner),
            range: ByteRange::whole(),
            kind,
            pid: 1000 + owner as u32,
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_survives_restart_and_is_reclaimed_by_its_owner_only() {
    let dir = tempfile::tempdir().unwrap();
    let id = ClientId::random();
    let file = fid(11);
    let server = Server::start(dir.path(), |_| {}).await;
    let a = FakeClient::connect(&server.address, id, InstanceNonce(1)).await;
    let reply = a.lock(file, 1, (0, EOF), LockKind::Exclusive, false).await;
    assert_eq!(reply.unwrap(), Response::Ok);
    drop(a);
    server.stop().await;

    // A long grace: only the owner's ReclaimDone can end it in time for this test.
    let server = Server::start(dir.path(), |config| {
        config.grace = Duration::from_secs(600);
    })
    .await;
    let mut b = FakeClient::new(&server.address).await;
    let reply = b.lock(file, 2, (0, 1), LockKind::Shared, false).await;
    assert!(matches!(refused(reply), ErrorCode::Grace { retry_ms } if retry_ms > 0));
    // A lock elsewhere collides with nothing recovered.
    let reply = b.lock(fid(12), 2, (0, 1), LockKind::Shared, false).await;
    assert_eq!(reply.unwrap(), Response::Ok);
    // Only the recorded owner may reclaim, and only exactly what it held.
    let reply = reclaim(&b, file, 1, LockKind::Exclusive).await;
    assert_eq!(refused(reply), ErrorCode::NotReclaimable);

    let a = FakeClient::connect(&server.address, id, InstanceNonce(1)).await;
    let reply = reclaim(&a, file, 1, LockKind::Shared).await;
    assert_eq!(refused(reply), ErrorCode::NotReclaimable);
    let reply = reclaim(&a, file, 1, LockKind::Exclusive).await;
    assert_eq!(reply.unwrap(), Response::Ok);
    // Reclaiming what it holds again is harmless (clients reclaim after every
    // reconnect); the other kind still is not its lock.
    let reply = reclaim(&a, file, 1, LockKind::Exclusive).await;
    assert_eq!(reply.unwrap(), Response::Ok);
    let reply = reclaim(&a, file, 1, LockKind::Shared).await;
    assert_eq!(refused(reply), ErrorCode::NotReclaimable);
    assert_eq!(a.call(Request::ReclaimDone).await.unwrap(), Response::Ok);

    // Grace ended early: b now queues behind the reclaimed lock like any conflict.
    let wait = queued(b.lock(file, 2, (0, 1), LockKind::Shared, true).await);
    a.unlock(file, 1).await;
    assert_eq!(b.next_grant().await, wait);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreclaimed_lock_is_dropped_when_grace_runs_out() {
    let dir = tempfile::tempdir().unwrap();
    let file = fid(13);
    let server = Server::start(dir.path(), |_| {}).await;
    let a = FakeClient::new(&server.address).await;
    let reply = a.lock(file, 1, (0, EOF), LockKind::Exclusive, false).await;
    assert_eq!(reply.unwrap(), Response::Ok);
    drop(a);
    server.stop().await;

    let grace = Duration::from_millis(300);
    let started = std::time::Instant::now();
    let server = Server::start(dir.path(), |config| config.grace = grace).await;
    let b = FakeClient::new(&server.address).await;
    let granted_after_grace = async {
        loop {
            match b.lock(file, 2, (0, EOF), LockKind::Exclusive, false).await {
                Ok(Response::Ok) => return,
                // The protocol's own back-off: retry after the time the server names.
                Err(ProtoError::Remote(ErrorCode::Grace { retry_ms })) => {
                    tokio::time::sleep(Duration::from_millis(retry_ms)).await;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    };
    tokio::time::timeout(TIMEOUT, granted_after_grace)
        .await
        .unwrap();
    assert!(started.elapsed() >= grace);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_restarted_while_the_server_was_down_loses_its_lock_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let id = ClientId::random();
    let file = fid(14);
    let server = Server::start(dir.path(), |_| {}).await;
    let a = FakeClient::connect(&server.address, id, InstanceNonce(1)).await;
    let reply = a.lock(file, 1, (0, EOF), LockKind::Exclusive, false).await;
    assert_eq!(reply.unwrap(), Response::Ok);
    drop(a);
    server.stop().await;

    let server = Server::start(dir.path(), |config| {
        config.grace = Duration::from_secs(600);
    })
    .await;
    let restarted = FakeClient::connect(&server.address, id, InstanceNonce(2)).await;
    // Its only recovered client restarted: grace is over and the lock is gone.
    let reply = restarted
        .call(Request::TestLock {
            fid: file,
            owner: LockOwnerId(9),
            range: ByteRange::whole(),
            kind: LockKind::Exclusive,
        })
        .await;
    assert_eq!(reply.unwrap(), Response::LockTest { holder: None });
    let b = FakeClient::new(&server.address).await;
    let reply = b.lock(file, 2, (0, EOF), LockKind::Exclusive, false).await;
    assert_eq!(reply.unwrap(), Response::Ok);
    server.stop().await;
}
