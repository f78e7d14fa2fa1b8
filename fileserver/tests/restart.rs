//! Restart tests for callback state: a real fileserver stopped and started again on the
//! same partition, with fake cache managers that log the breaks and resets pushed to them.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{FakeClient, Log, create_file, create_volume, status_of, store};
use proto::{ClientId, DataVersion, Fid, InstanceNonce, Request, Response};
use state::JournalMode;

async fn start(partition: &Path, mode: JournalMode) -> common::Server {
    common::Server::start(partition, |config| config.journal_mode = mode).await
}

/// Connects a fake cache manager and waits until the server serves it (its owed pushes
/// went out first).
async fn connect(address: &str, name: &'static str, id: ClientId, log: &Log) -> FakeClient {
    let client = FakeClient::connect(address, name, id, InstanceNonce(1), log).await;
    assert_eq!(client.call(Request::Ping).await.unwrap(), Response::Pong);
    client
}

async fn fetch(client: &FakeClient, fid: Fid) -> DataVersion {
    let response = client.call(Request::FetchStatus { fid }).await.unwrap();
    assert!(
        matches!(
            response,
            Response::Status {
                callback: Some(_),
                ..
            }
        ),
        "{response:?}"
    );
    status_of(response).data_version
}

/// Where `entry` was last logged.
fn position(log: &Log, entry: &str) -> Option<usize> {
    log.lock().iter().rposition(|e| e == entry)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_granted_before_a_restart_is_broken_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let (a_id, b_id) = (ClientId::random(), ClientId::random());
    let log: Log = Arc::default();
    let server = start(dir.path(), JournalMode::Sync).await;
    create_volume(&server.address).await;
    let a = connect(&server.address, "A", a_id, &log).await;
    let b = connect(&server.address, "B", b_id, &log).await;
    let fid = create_file(&a, "kept").await;
    fetch(&b, fid).await;
    drop((a, b));
    server.stop().await;

    let server = start(dir.path(), JournalMode::Sync).await;
    log.lock().push("restarted".into());
    let a = connect(&server.address, "A", a_id, &log).await;
    let b = connect(&server.address, "B", b_id, &log).await;
    status_of(a.call(store(fid, b"after restart")).await.unwrap());
    a.note("store replied");

    let restarted = position(&log, "restarted");
    let broken = position(&log, &format!("B break {:?}", [fid]));
    let replied = position(&log, "A store replied");
    assert!(
        broken > restarted && broken < replied,
        "log: {:?}",
        log.lock()
    );
    // Returning clients of a complete journal keep their callbacks: no reset.
    assert!(
        !log.lock()[restarted.unwrap()..]
            .iter()
            .any(|e| e.ends_with("reset")),
        "log: {:?}",
        log.lock()
    );
    drop(b);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_break_owed_to_an_absent_client_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (a_id, b_id) = (ClientId::random(), ClientId::random());
    let log: Log = Arc::default();
    let server = start(dir.path(), JournalMode::Sync).await;
    create_volume(&server.address).await;
    let a = connect(&server.address, "A", a_id, &log).await;
    let b = connect(&server.address, "B", b_id, &log).await;
    let fid = create_file(&a, "owed").await;
    fetch(&b, fid).await;
    b.connection.close();
    b.connection.closed().await;
    // B is gone: its break queues.
    status_of(a.call(store(fid, b"while B was away")).await.unwrap());
    drop(a);
    server.stop().await;

    let server = start(dir.path(), JournalMode::Sync).await;
    log.lock().push("restarted".into());
    let b = connect(&server.address, "B", b_id, &log).await;
    b.note("served");
    let broken = position(&log, &format!("B break {:?}", [fid]));
    assert!(
        position(&log, "restarted") < broken && broken < position(&log, "B served"),
        "log: {:?}",
        log.lock()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_sync_journal_recovered_clients_reset() {
    let dir = tempfile::tempdir().unwrap();
    let b_id = ClientId::random();
    let log: Log = Arc::default();
    let server = start(dir.path(), JournalMode::Group).await;
    create_volume(&server.address).await;
    let b = connect(&server.address, "B", b_id, &log).await;
    let fid = create_file(&b, "f").await;
    fetch(&b, fid).await;
    drop(b);
    server.stop().await;

    let server = start(dir.path(), JournalMode::Group).await;
    log.lock().push("restarted".into());
    let b = connect(&server.address, "B", b_id, &log).await;
    b.note("served");
    let reset = position(&log, "B reset");
    assert!(
        position(&log, "restarted") < reset && reset < position(&log, "B served"),
        "log: {:?}",
        log.lock()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reclaimed_callbacks_are_regranted_only_when_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let log: Log = Arc::default();
    let server = start(dir.path(), JournalMode::Sync).await;
    create_volume(&server.address).await;
    let a = connect(&server.address, "A", ClientId::random(), &log).await;
    let b = connect(&server.address, "B", ClientId::random(), &log).await;
    let same = create_file(&a, "same").await;
    let changed = create_file(&a, "changed").await;
    let same_version = fetch(&b, same).await;
    let old_version = fetch(&b, changed).await;
    status_of(a.call(store(changed, b"new")).await.unwrap());

    let reply = b
        .call(Request::ReclaimCallbacks {
            fids: vec![(same, same_version), (changed, old_version)],
        })
        .await
        .unwrap();
    let Response::CallbacksReclaimed { broken, callback } = reply else {
        panic!("unexpected {reply:?}");
    };
    assert_eq!(broken, vec![changed]);
    assert!(callback.lifetime_ms > 0);
    // The re-granted promise is live: a change breaks it.
    status_of(a.call(store(same, b"x")).await.unwrap());
    assert!(position(&log, &format!("B break {:?}", [same])).is_some());
    server.stop().await;
}
