//! Tests of failover as the manager sees it: a fileserver pair, one server with two
//! addresses, and how long a call to a server that does not answer lasts.
//! Invariant: a call lands on the active member only after the reclaim there, and a
//! retried change keeps its `seq`.

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::{ByteRange, ErrorCode, LockKind, LockOwnerId, Response, WaitId};

use super::test_support::{WAIT_MAX, start_manager, start_manager_with};
use super::{FsError, Manager};
use crate::fake_cell::{CutOff, FILE, FakeCell, Record};
use crate::inode::Ino;
use crate::manager::LockRequest;

fn file_ino(manager: &Manager) -> Ino {
    manager.state.lock().inodes.ino_for(FILE)
}

/// Where in the record `member` first got a request of `kind`.
fn first(record: &Record, member: usize, kind: &str) -> Option<usize> {
    record
        .requests
        .iter()
        .position(|(m, k)| *m == member && *k == kind)
}

fn count(record: &Record, member: usize, kind: &str) -> usize {
    record
        .requests
        .iter()
        .filter(|(m, k)| *m == member && *k == kind)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passive_member_points_calls_at_the_active() {
    let content = b"pair content".to_vec();
    let (cell, _stop) = FakeCell::start_pair(content.clone()).await;
    // The VLDB's order is stale: it lists the passive member first.
    cell.set_active(1);
    *cell.listed.lock() = Some(vec![cell.member(0), cell.member(1)]);
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&cell, dir.path()).await;
    let ino = file_ino(&manager);
    assert_eq!(manager.read(ino, 0, 4096).await.unwrap(), content);
    assert_eq!(manager.pool.answered(cell.server()), Some(cell.member(1)));
    let record = cell.record.lock();
    assert!(record.not_active.contains(&0), "{:?}", record.requests);
    assert_eq!(count(&record, 1, "FetchData"), 1, "{:?}", record.requests);
    assert_eq!(count(&record, 0, "FetchData"), 0, "{:?}", record.requests);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_cut_off_with_the_active_is_retried_on_the_other_member_after_the_reclaim() {
    let content = b"pair content".to_vec();
    let (cell, _stop) = FakeCell::start_pair(content.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&cell, dir.path()).await;
    let ino = file_ino(&manager);
    *cell.cut_off.lock() = Some(CutOff {
        member: 0,
        kind: "FetchData",
    });
    assert_eq!(manager.read(ino, 0, 4096).await.unwrap(), content);
    assert_eq!(manager.pool.answered(cell.server()), Some(cell.member(1)));
    let record = cell.record.lock();
    let requests = &record.requests;
    assert_eq!(count(&record, 0, "FetchData"), 1, "{requests:?}");
    let reclaimed = first(&record, 1, "ReclaimCallbacks").expect("callbacks reclaimed on 1");
    let done = first(&record, 1, "ReclaimDone").expect("reclaim done on 1");
    let fetched = first(&record, 1, "FetchData").expect("the read retried on 1");
    assert!(reclaimed < done && done < fetched, "{requests:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequenced_change_retried_on_the_new_active_keeps_its_seq() {
    let (cell, _stop) = FakeCell::start_pair(Vec::new()).await;
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&cell, dir.path()).await;
    *cell.cut_off.lock() = Some(CutOff {
        member: 0,
        kind: "Remove",
    });
    manager
        .remove(Ino::ROOT, OsStr::new("gone"), false)
        .await
        .unwrap();
    manager
        .remove(Ino::ROOT, OsStr::new("also-gone"), false)
        .await
        .unwrap();
    let record = cell.record.lock();
    let [(0, cut), (1, retried), (1, next)] = record.sequenced[..] else {
        panic!("unexpected sequenced requests: {:?}", record.sequenced);
    };
    assert_eq!(cut, retried, "a retry carries the same seq");
    assert!(next > retried, "the next change gets a new seq");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_back_cut_off_with_the_active_is_stored_and_synced_on_the_new_one() {
    let (cell, _stop) = FakeCell::start_pair(Vec::new()).await;
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&cell, dir.path()).await;
    let ino = file_ino(&manager);
    manager.open(ino).await.unwrap();

    // Member 0 dies under a store: the store and the sync go to member 1.
    *cell.cut_off.lock() = Some(CutOff {
        member: 0,
        kind: "StoreData",
    });
    manager.write(ino, 0, b"first").await.unwrap();
    manager.flush(ino).await.unwrap();
    assert_eq!(cell.content().0, b"first");
    {
        let record = cell.record.lock();
        assert_eq!(count(&record, 1, "StoreData"), 1, "{:?}", record.requests);
        assert_eq!(count(&record, 1, "Fsync"), 1, "{:?}", record.requests);
    }

    // Member 1 dies under the sync: it is made on member 0 before close returns.
    *cell.cut_off.lock() = Some(CutOff {
        member: 1,
        kind: "Fsync",
    });
    manager.write(ino, 5, b" second").await.unwrap();
    manager.flush(ino).await.unwrap();
    assert_eq!(cell.content().0, b"first second");
    let record = cell.record.lock();
    assert_eq!(count(&record, 1, "Fsync"), 2, "{:?}", record.requests);
    assert_eq!(count(&record, 0, "Fsync"), 1, "{:?}", record.requests);
    assert!(
        first(&record, 0, "Fsync") > first(&record, 0, "ReclaimDone"),
        "{:?}",
        record.requests
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_lock_queued_on_the_dead_active_is_asked_again_on_the_new_one() {
    let (cell, _stop) = FakeCell::start_pair(Vec::new()).await;
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&cell, dir.path()).await;
    let ino = file_ino(&manager);
    cell.lock_answers
        .lock()
        .push_back(Ok(Response::LockQueued { wait: WaitId(9) }));
    let request = LockRequest {
        owner: LockOwnerId(5),
        range: ByteRange::whole(),
        kind: Some(LockKind::Exclusive),
        pid: 42,
    };
    let waiter = {
        let manager = Arc::clone(&manager);
        tokio::spawn(async move { manager.setlk(ino, request, true).await })
    };
    cell.wait_for(WAIT_MAX, |r| first(r, 0, "SetLock").is_some())
        .await;
    // Member 0 dies with the request queued; member 1 takes over, in grace at first.
    cell.lock_answers
        .lock()
        .push_back(Err(ErrorCode::Grace { retry_ms: 1 }));
    cell.set_active(1);
    cell.drop_connections();
    tokio::time::timeout(WAIT_MAX, waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(manager.held_locks.lock().holds(FILE, LockOwnerId(5)));
    let record = cell.record.lock();
    assert_eq!(count(&record, 1, "SetLock"), 2, "{:?}", record.requests);
    assert!(
        first(&record, 1, "ReclaimDone") < first(&record, 1, "SetLock"),
        "{:?}",
        record.requests
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_server_that_hangs_fails_the_call_once_within_the_timeout() {
    let (cell, _stop) = FakeCell::start(b"content".to_vec(), 0, 0).await;
    let dir = tempfile::tempdir().unwrap();
    let rpc_timeout = Duration::from_millis(200);
    let manager = start_manager_with(&cell, dir.path(), WAIT_MAX, rpc_timeout, WAIT_MAX).await;
    let ino = file_ino(&manager);
    *cell.hang_on.lock() = Some("FetchData");
    let began = Instant::now();
    let failed = manager.read(ino, 0, 4096).await;
    assert_eq!(failed, Err(FsError::ETIMEDOUT));
    assert!(began.elapsed() < WAIT_MAX / 2, "{:?}", began.elapsed());
    assert_eq!(count(&cell.record.lock(), 0, "FetchData"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_with_no_member_answering_fails_after_the_failover_timeout() {
    let (cell, _stop) = FakeCell::start_pair(b"content".to_vec()).await;
    let dir = tempfile::tempdir().unwrap();
    let (rpc_timeout, failover_timeout) = (Duration::from_millis(100), Duration::from_millis(600));
    let manager =
        start_manager_with(&cell, dir.path(), WAIT_MAX, rpc_timeout, failover_timeout).await;
    let ino = file_ino(&manager);
    // The active hangs; the other member stays passive and points back at it.
    *cell.hang_on.lock() = Some("FetchData");
    let began = Instant::now();
    let failed = manager.read(ino, 0, 4096).await;
    let took = began.elapsed();
    assert_eq!(failed, Err(FsError::ETIMEDOUT));
    assert!(took >= failover_timeout, "{took:?}");
    assert!(took < WAIT_MAX / 2, "{took:?}");
    let record = cell.record.lock();
    assert!(count(&record, 0, "FetchData") >= 2, "{:?}", record.requests);
    assert!(record.not_active.contains(&1), "{:?}", record.requests);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_at_new_addresses_is_found_again_through_the_vldb() {
    let (cell, _stop) = FakeCell::start_pair(b"content".to_vec()).await;
    // The VLDB first names two ports where nothing listens any more.
    let mut gone = Vec::new();
    for _ in 0..2 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        gone.push(listener.local_addr().unwrap().to_string());
    }
    *cell.listed.lock() = Some(gone.clone());
    let dir = tempfile::tempdir().unwrap();
    let starting = {
        let cell = cell.clone();
        let dir = dir.path().to_owned();
        tokio::spawn(async move { start_manager(&cell, &dir).await })
    };
    cell.wait_for(WAIT_MAX, |r| r.server_lists >= 1).await;
    *cell.listed.lock() = None;
    let manager = tokio::time::timeout(WAIT_MAX, starting)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(manager.pool.answered(cell.server()), Some(cell.member(0)));
    let (_, addresses) = manager.whereis(Ino::ROOT).await.unwrap();
    assert_eq!(addresses, [cell.member(0), cell.member(1)]);
    assert!(
        first(&cell.record.lock(), 0, "FetchStatus").is_some(),
        "the root's status came from the pair's new address"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_pair_leaves_cached_reads_answered_at_once_and_fails_the_rest_after_the_failover_timeout()
 {
    let content = b"cached on the pair".to_vec();
    let (cell, _stop) = FakeCell::start_pair(content.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let (rpc_timeout, failover_timeout) = (Duration::from_millis(200), Duration::from_millis(800));
    let manager =
        start_manager_with(&cell, dir.path(), WAIT_MAX, rpc_timeout, failover_timeout).await;
    let ino = file_ino(&manager);
    assert_eq!(manager.read(ino, 0, 4096).await.unwrap(), content);

    // The active fences itself and closes its connections; no partner takes over.
    cell.set_fenced(true);
    cell.wait_for(WAIT_MAX, |r| {
        r.not_active.contains(&0) && r.not_active.contains(&1)
    })
    .await;
    let fetched = {
        let record = cell.record.lock();
        count(&record, 0, "FetchData") + count(&record, 0, "FetchStatus")
    };
    let began = Instant::now();
    assert_eq!(manager.read(ino, 0, 4096).await.unwrap(), content);
    manager.getattr(ino).await.unwrap();
    manager.getattr(Ino::ROOT).await.unwrap();
    assert!(
        began.elapsed() < failover_timeout,
        "cached reads waited for the pair: {:?}",
        began.elapsed()
    );
    {
        let record = cell.record.lock();
        let now = count(&record, 0, "FetchData") + count(&record, 0, "FetchStatus");
        assert_eq!(now, fetched, "{:?}", record.requests);
    }
    assert!(
        manager
            .check_servers()
            .await
            .iter()
            .all(|server| !server.up)
    );

    // What is not cached fails once no member took over within the failover timeout.
    let two = manager.state.lock().inodes.ino_for(crate::fake_cell::FILE2);
    let began = Instant::now();
    assert_eq!(manager.read(two, 0, 4096).await, Err(FsError::ETIMEDOUT));
    assert!(began.elapsed() >= failover_timeout, "{:?}", began.elapsed());

    // A member serves again: the rest works, after the reclaim there.
    cell.set_fenced(false);
    assert_eq!(manager.read(two, 0, 4096).await.unwrap(), b"");
    assert!(manager.check_servers().await.iter().all(|server| server.up));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_to_a_hung_server_each_fail_at_their_own_timeout_while_cached_reads_answer() {
    let content = b"cached".to_vec();
    let (cell, _stop) = FakeCell::start(content.clone(), 0, 0).await;
    let dir = tempfile::tempdir().unwrap();
    let rpc_timeout = Duration::from_millis(300);
    let manager = start_manager_with(&cell, dir.path(), WAIT_MAX, rpc_timeout, WAIT_MAX).await;
    let one = file_ino(&manager);
    assert_eq!(manager.read(one, 0, 4096).await.unwrap(), content);
    cell.set_content(crate::fake_cell::FILE2, b"not cached".to_vec());
    let two = manager.state.lock().inodes.ino_for(crate::fake_cell::FILE2);
    *cell.hang_on.lock() = Some("FetchData");

    // Readers of an uncached file, in two waves: the second finds the connection the
    // first one's timeout closed, and connects again.
    for _ in 0..2 {
        let readers: Vec<_> = (0..8)
            .map(|_| {
                let manager = Arc::clone(&manager);
                tokio::spawn(async move {
                    let began = Instant::now();
                    (manager.read(two, 0, 4096).await, began.elapsed())
                })
            })
            .collect();
        let began = Instant::now();
        assert_eq!(manager.read(one, 0, 4096).await.unwrap(), content);
        assert!(began.elapsed() < rpc_timeout, "{:?}", began.elapsed());
        for reader in readers {
            let (result, took) = reader.await.unwrap();
            assert_eq!(result, Err(FsError::ETIMEDOUT));
            assert!(took < rpc_timeout + Duration::from_secs(1), "{took:?}");
        }
    }
    *cell.hang_on.lock() = None;
    assert_eq!(manager.read(two, 0, 4096).await.unwrap(), b"not cached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_active_is_not_marked_silent_and_its_partner_takes_the_call_once_active() {
    let content = b"pair content".to_vec();
    let (cell, _stop) = FakeCell::start_pair(content.clone()).await;
    cell.set_content(crate::fake_cell::FILE2, b"not cached".to_vec());
    let dir = tempfile::tempdir().unwrap();
    let rpc_timeout = Duration::from_millis(300);
    let manager = start_manager_with(&cell, dir.path(), WAIT_MAX, rpc_timeout, WAIT_MAX).await;
    let one = file_ino(&manager);
    assert_eq!(manager.read(one, 0, 4096).await.unwrap(), content);
    let two = manager.state.lock().inodes.ino_for(crate::fake_cell::FILE2);

    // The active stops (SIGSTOP): its call times out, and the passive points back at it
    // until it takes over.
    cell.set_stopped(0, true);
    let reader = {
        let manager = Arc::clone(&manager);
        tokio::spawn(async move { manager.read(two, 0, 4096).await })
    };
    cell.wait_for(WAIT_MAX, |r| r.not_active.contains(&1)).await;
    assert!(!manager.pool.is_silent(cell.server()));
    cell.set_active(1);
    let read = tokio::time::timeout(WAIT_MAX, reader)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(read.unwrap(), b"not cached");
    assert_eq!(manager.pool.answered(cell.server()), Some(cell.member(1)));
    assert!(!manager.pool.is_silent(cell.server()));
    // The member that timed out refuses nothing either: the pair goes on on the partner.
    manager.write(two, 0, b"N").await.unwrap();
    manager.flush(two).await.unwrap();
    assert_eq!(count(&cell.record.lock(), 1, "StoreData"), 1);
}
