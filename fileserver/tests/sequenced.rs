//! Sequenced namespace changes: a retry with the same sequence number is answered from
//! the recorded outcome and applied once; a new sequence number applies again.

mod common;

use std::sync::Arc;

use common::{FakeClient, Log, Server, VOLUME, create_volume};
use proto::{ClientId, ErrorCode, Fid, InstanceNonce, ProtoError, Request, Response};

fn sequenced(seq: u64, request: Request) -> Request {
    Request::Sequenced {
        seq,
        request: Box::new(request),
    }
}

fn create(name: &str) -> Request {
    Request::Create {
        dir: Fid::root(VOLUME),
        name: name.into(),
        mode: 0o644,
        uid: 0,
        gid: 0,
        exclusive: true,
    }
}

fn refusal(answer: Result<Response, ProtoError>) -> ErrorCode {
    match answer {
        Err(ProtoError::Remote(code)) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// The root directory's data version, which every applied change bumps by one.
async fn root_version(client: &FakeClient) -> u64 {
    let status = client
        .call(Request::FetchStatus {
            fid: Fid::root(VOLUME),
        })
        .await
        .unwrap();
    common::status_of(status).data_version.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_sequenced_change_is_applied_once_and_answered_the_same() {
    let server = Server::in_tempdir().await;
    create_volume(&server.address).await;
    let log: Log = Arc::default();
    let id = ClientId::random();
    let client = FakeClient::connect(&server.address, "A", id, InstanceNonce(1), &log).await;
    let start = root_version(&client).await;

    let first = client.call(sequenced(1, create("a"))).await.unwrap();
    let Response::Entry {
        status, callback, ..
    } = &first
    else {
        panic!("create answered {first:?}");
    };
    assert!(callback.is_some(), "an applied create grants a promise");
    let retry = client.call(sequenced(1, create("a"))).await.unwrap();
    match &retry {
        Response::Entry {
            status: again,
            callback: None,
            ..
        } => assert_eq!(again, status),
        other => panic!("the retry answered {other:?}"),
    }
    assert_eq!(root_version(&client).await, start + 1, "applied once");
    // A new sequence number is a new request: the file exists now.
    assert_eq!(
        refusal(client.call(sequenced(2, create("a"))).await),
        ErrorCode::Exists
    );
    // ...and that refusal is itself what a retry of seq 2 gets.
    assert_eq!(
        refusal(client.call(sequenced(2, create("a"))).await),
        ErrorCode::Exists
    );

    let rename = Request::Rename {
        from_dir: Fid::root(VOLUME),
        from_name: "a".into(),
        to_dir: Fid::root(VOLUME),
        to_name: "b".into(),
    };
    let renamed = client.call(sequenced(3, rename.clone())).await.unwrap();
    assert!(matches!(renamed, Response::Renamed { .. }));
    assert_eq!(
        client.call(sequenced(3, rename.clone())).await.unwrap(),
        renamed
    );
    assert_eq!(
        refusal(client.call(sequenced(4, rename)).await),
        ErrorCode::NoSuchEntry
    );

    let remove = Request::Remove {
        dir: Fid::root(VOLUME),
        name: "b".into(),
    };
    let removed = client.call(sequenced(5, remove.clone())).await.unwrap();
    // The removed file's last status, with no link left (a version-3 answer).
    assert!(matches!(
        &removed,
        Response::Removed { target: Some(gone), .. } if gone.link_count == 0
    ));
    assert_eq!(
        client.call(sequenced(5, remove.clone())).await.unwrap(),
        removed
    );
    assert_eq!(
        refusal(client.call(sequenced(6, remove)).await),
        ErrorCode::NoSuchEntry
    );
    // create, rename, remove: three changes, however many retries.
    assert_eq!(root_version(&client).await, start + 3);

    // Another instance of the same client has its own sequence space.
    let restarted = FakeClient::connect(&server.address, "A2", id, InstanceNonce(2), &log).await;
    let again = restarted.call(sequenced(1, create("a"))).await.unwrap();
    assert!(matches!(
        again,
        Response::Entry {
            callback: Some(_),
            ..
        }
    ));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_namespace_changes_of_cache_managers_are_sequenced() {
    let server = Server::in_tempdir().await;
    create_volume(&server.address).await;
    let log: Log = Arc::default();
    let client = FakeClient::fresh(&server.address, "A", &log).await;
    let fetch = Request::FetchStatus {
        fid: Fid::root(VOLUME),
    };
    assert_eq!(
        refusal(client.call(sequenced(1, fetch)).await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        refusal(client.call(sequenced(2, sequenced(3, create("x")))).await),
        ErrorCode::InvalidArgument
    );
    let admin = common::admin(&server.address).await;
    assert_eq!(
        refusal(admin.call(sequenced(4, create("x")), common::TIMEOUT).await),
        ErrorCode::Unsupported
    );
    server.stop().await;
}
