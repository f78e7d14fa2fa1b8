//! RPC tests: a real fileserver on 127.0.0.1:0 and fake cache managers that record the
//! callback requests the server pushes to them.

mod common;

use std::sync::Arc;

use common::{FakeClient, Log, Server, VOLUME, create_file, create_volume, status_of, store};
use proto::{ClientId, ErrorCode, Fid, InstanceNonce, Request, Response, VolumeId};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn break_reaches_other_holder_before_the_store_reply() {
    let server = Server::in_tempdir().await;
    create_volume(&server.address).await;
    let log: Log = Arc::default();
    let a = FakeClient::fresh(&server.address, "A", &log).await;
    let b = FakeClient::fresh(&server.address, "B", &log).await;

    let fid = create_file(&a, "shared").await;
    let fetched = b.call(Request::FetchStatus { fid }).await.unwrap();
    assert!(matches!(
        fetched,
        Response::Status {
            callback: Some(_),
            ..
        }
    ));
    let stored = status_of(a.call(store(fid, b"new data")).await.unwrap());
    a.note("store replied");
    assert_eq!(stored.size, 8);

    let log = log.lock().clone();
    // Each new client is first told to reset; B's break precedes A's reply.
    assert!(log.contains(&"A reset".to_string()));
    let break_at = log
        .iter()
        .position(|e| e == &format!("B break {:?}", [fid]));
    let reply_at = log.iter().position(|e| e == "A store replied");
    assert!(break_at.is_some() && break_at < reply_at, "log: {log:?}");
    // The changer keeps its own callback: A got no break.
    assert!(
        !log.iter().any(|e| e.starts_with("A break")),
        "log: {log:?}"
    );

    let data = b
        .call(Request::FetchData {
            fid,
            offset: 0,
            length: 100,
        })
        .await
        .unwrap();
    // From version 4 the bytes come raw after the message.
    assert!(
        matches!(data, Response::DataBulk { ref data, .. } if data.bytes() == &b"new data"[..])
    );
    assert_eq!(server.stats.fetch_data_calls(), 1);
    assert_eq!(server.stats.fetch_data_bytes(), 8);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_break_is_delivered_on_reconnect_before_serving() {
    let server = Server::in_tempdir().await;
    create_volume(&server.address).await;
    let log: Log = Arc::default();
    let b_id = ClientId::random();
    let a = FakeClient::fresh(&server.address, "A", &log).await;
    let b = FakeClient::connect(&server.address, "B", b_id, InstanceNonce(9), &log).await;
    let fid = create_file(&a, "f").await;
    b.call(Request::FetchStatus { fid }).await.unwrap();
    b.connection.close();
    b.connection.closed().await;

    a.call(store(fid, b"changed while B was away"))
        .await
        .unwrap();
    assert!(!log.lock().iter().any(|e| e.starts_with("B break")));

    let b = FakeClient::connect(&server.address, "B", b_id, InstanceNonce(9), &log).await;
    b.call(Request::Ping).await.unwrap();
    b.note("ping replied");
    let events = log.lock().clone();
    let break_at = events
        .iter()
        .position(|e| e == &format!("B break {:?}", [fid]));
    let reply_at = events.iter().position(|e| e == "B ping replied");
    assert!(break_at.is_some() && break_at < reply_at, "log: {events:?}");
    // A returning client (same instance) is not told to reset again.
    assert_eq!(
        events.iter().filter(|e| *e == "B reset").count(),
        1,
        "log: {events:?}"
    );

    // A restarted client (new instance) is told to reset.
    let b = FakeClient::connect(&server.address, "B", b_id, InstanceNonce(10), &log).await;
    b.call(Request::Ping).await.unwrap();
    assert_eq!(b.log.lock().iter().filter(|e| *e == "B reset").count(), 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_names_and_errors_map_to_codes() {
    let server = Server::in_tempdir().await;
    create_volume(&server.address).await;
    let log: Log = Arc::default();
    let a = FakeClient::fresh(&server.address, "A", &log).await;
    let long = a
        .call(Request::Create {
            dir: Fid::root(VOLUME),
            name: "n".repeat(256),
            mode: 0o644,
            uid: 0,
            gid: 0,
            exclusive: true,
        })
        .await;
    assert_eq!(long.unwrap_err().remote(), Some(&ErrorCode::NameTooLong));
    let missing = a
        .call(Request::FetchStatus {
            fid: Fid::root(VolumeId(999)),
        })
        .await;
    assert_eq!(
        missing.unwrap_err().remote(),
        Some(&ErrorCode::NoSuchVolume)
    );
    let listing = a
        .call(Request::ReadDir {
            dir: Fid::root(VOLUME),
            after: None,
            count_max: 10,
        })
        .await
        .unwrap();
    assert!(
        matches!(listing, Response::DirPage { ref entries, more: false, .. } if entries.is_empty())
    );
    server.stop().await;
}

/// A cache manager's write-back: its stores in flight at once, then one `Fsync` before
/// `close()` returns. Every store counts once in the DV; the `Fsync` answers with the
/// final status and grants no promise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_back_stores_in_flight_then_fsync() {
    let server = Server::in_tempdir().await;
    create_volume(&server.address).await;
    let a = FakeClient::connect(
        &server.address,
        "A",
        ClientId::random(),
        InstanceNonce(1),
        &Log::default(),
    )
    .await;
    let fid = create_file(&a, "written").await;
    let created = status_of(a.call(Request::FetchStatus { fid }).await.unwrap());
    let chunk = 256 * 1024;
    let piece = |index: u8| Request::StoreData {
        fid,
        offset: u64::from(index) * chunk as u64,
        data: vec![index + 1; chunk],
        truncate_to: None,
    };
    let stores = tokio::join!(
        a.call(piece(3)),
        a.call(piece(2)),
        a.call(piece(1)),
        a.call(piece(0))
    );
    for stored in [stores.0, stores.1, stores.2, stores.3] {
        status_of(stored.unwrap());
    }
    let synced = a.call(Request::Fsync { fid }).await.unwrap();
    let Response::Status { status, callback } = synced else {
        panic!("expected a status, got {synced:?}");
    };
    assert!(callback.is_none());
    assert_eq!(status.size, 4 * chunk as u64);
    assert_eq!(status.data_version.0, created.data_version.0 + 4);
    for index in 0..4u8 {
        let fetched = a
            .call(Request::FetchData {
                fid,
                offset: u64::from(index) * chunk as u64,
                length: chunk as u32,
            })
            .await
            .unwrap();
        assert!(
            fetched.into_fetched().unwrap().data == vec![index + 1; chunk],
            "chunk {index}"
        );
    }
    server.stop().await;
}
