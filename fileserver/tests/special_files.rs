//! Special files over the wire: a version-3 client makes and sees FIFOs, sockets and
//! device nodes; an older client is never sent what it cannot decode.
//! Invariant: one fileserver on a fresh partition per test, on loopback.

mod common;

use std::time::Duration;

use common::{Server, VOLUME, cache_manager, create_volume};
use proto::rpc::Limits;
use proto::{
    ClientId, Fid, FileKind, Hello, InstanceNonce, PROTOCOL_VERSION_IDENTITY, ProtoError, Request,
    Response, rpc,
};

const TIMEOUT: Duration = Duration::from_secs(5);

/// A cache manager's connection speaking at most `version_max`.
async fn client(address: &str, version_max: u16) -> rpc::Connection {
    let hello = Hello {
        version_max,
        ..common::hello(cache_manager(
            ClientId(uuid::Uuid::new_v4()),
            InstanceNonce(u64::from(version_max)),
        ))
    };
    let host = common::transport(proto::PeerClass::Host);
    let (connection, reply, mut incoming) = rpc::connect(address, hello, &Limits::default(), &host)
        .await
        .unwrap();
    assert_eq!(reply.version, version_max);
    // Callback breaks acknowledged, as a cache manager does.
    tokio::spawn(async move {
        while let Some(request) = incoming.recv().await {
            let (_, _, replier) = request.into_parts();
            replier.reply(Ok(Response::Ok)).await;
        }
    });
    connection
}

fn make_node(name: &str, kind: FileKind) -> Request {
    Request::Sequenced {
        seq: 1,
        request: Box::new(Request::MakeNode {
            dir: Fid::root(VOLUME),
            name: name.into(),
            kind,
            mode: 0o640,
            uid: 0,
            gid: 0,
        }),
    }
}

fn lookup(name: &str) -> Request {
    Request::Lookup {
        dir: Fid::root(VOLUME),
        name: name.into(),
    }
}

fn remove(name: &str) -> Request {
    Request::Remove {
        dir: Fid::root(VOLUME),
        name: name.into(),
    }
}

/// The kinds a directory listing gives, in name order.
async fn listed(connection: &rpc::Connection) -> Vec<FileKind> {
    let page = Request::ReadDir {
        dir: Fid::root(VOLUME),
        after: None,
        count_max: 100,
    };
    match connection.call(page, TIMEOUT).await.unwrap() {
        Response::DirPage { entries, .. } => entries.into_iter().map(|e| e.kind).collect(),
        other => panic!("not a listing: {other:?}"),
    }
}

fn kind_of(response: Response) -> FileKind {
    match response {
        Response::Entry { status, .. } => status.kind,
        other => panic!("not an entry: {other:?}"),
    }
}

#[tokio::test]
async fn special_files_reach_new_clients_whole_and_old_ones_as_files() {
    let server = Server::in_tempdir().await;
    create_volume(&server.address).await;
    let new = client(&server.address, PROTOCOL_VERSION_IDENTITY).await;
    let old = client(&server.address, 2).await;

    let device = FileKind::CharDevice { rdev: 0x0103 };
    assert_eq!(
        kind_of(new.call(make_node("dev", device), TIMEOUT).await.unwrap()),
        device
    );
    let fifo = Request::MakeNode {
        dir: Fid::root(VOLUME),
        name: "fifo".into(),
        kind: FileKind::Fifo,
        mode: 0o600,
        uid: 0,
        gid: 0,
    };
    assert_eq!(
        kind_of(new.call(fifo.clone(), TIMEOUT).await.unwrap()),
        FileKind::Fifo
    );
    // An older server is never asked: the connection refuses to send it.
    assert!(matches!(
        old.call(fifo, TIMEOUT).await,
        Err(ProtoError::PeerTooOld { peer: 2, needed: 3 })
    ));

    assert_eq!(listed(&new).await, [device, FileKind::Fifo]);
    assert_eq!(
        kind_of(new.call(lookup("dev"), TIMEOUT).await.unwrap()),
        device
    );
    // The older client decodes them as the regular files it knows, with no data.
    assert_eq!(listed(&old).await, [FileKind::File, FileKind::File]);
    assert_eq!(
        kind_of(old.call(lookup("dev"), TIMEOUT).await.unwrap()),
        FileKind::File
    );

    // Removing a last name: a new client gets the vnode's last status (no link left),
    // an older one what it always got (none).
    match new.call(remove("dev"), TIMEOUT).await.unwrap() {
        Response::Removed {
            target: Some(gone), ..
        } => assert_eq!((gone.kind, gone.link_count), (device, 0)),
        other => panic!("not removed: {other:?}"),
    }
    assert!(matches!(
        old.call(remove("fifo"), TIMEOUT).await.unwrap(),
        Response::Removed { target: None, .. }
    ));
    server.stop().await;
}
