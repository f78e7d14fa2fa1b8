//! RPC tests: a real fileserver on 127.0.0.1:0 and fake cache managers that record the
//! callback requests the server pushes to them.

use std::sync::Arc;
use std::time::Duration;

use fileserver::Config;
use parking_lot::Mutex;
use proto::rpc::{self, Connection, Limits};
use proto::{
    CellConfig, ClientId, ErrorCode, Fid, Hello, InstanceNonce, PROTOCOL_VERSION_MAX,
    PROTOCOL_VERSION_MIN, PeerKind, ProtoError, Request, Response, VnodeStatus, VolumeId,
    VolumeName,
};
use tokio::net::TcpListener;
use tokio::sync::watch;

const CELL: &str = "test.cell";
const TIMEOUT: Duration = Duration::from_secs(10);
const VOLUME: VolumeId = VolumeId(100);

type Log = Arc<Mutex<Vec<String>>>;

struct Server {
    address: String,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    stats: Arc<fileserver::Stats>,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        // No VLDB listens here: registration keeps retrying in the background.
        let cell = CellConfig {
            name: CELL.into(),
            vlservers: vec!["127.0.0.1:1".into()],
        };
        let config = Config::new(dir.path().to_owned(), cell, vec![address.clone()]);
        let stats = config.stats.clone();
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(async move {
            fileserver::run(config, listener, shutdown).await.unwrap();
        });
        Server {
            address,
            stop,
            task,
            stats,
            _dir: dir,
        }
    }

    async fn stop(self) {
        self.stop.send(true).unwrap();
        self.task.await.unwrap();
    }
}

fn hello(peer: PeerKind) -> Hello {
    Hello {
        version_min: PROTOCOL_VERSION_MIN,
        version_max: PROTOCOL_VERSION_MAX,
        cell: CELL.into(),
        peer,
    }
}

async fn admin(address: &str) -> Connection {
    let (connection, _, _) = rpc::connect(address, hello(PeerKind::Admin), &Limits::default())
        .await
        .unwrap();
    connection
}

/// A fake cache manager: answers every callback request with `Ok` after logging it.
struct FakeClient {
    name: &'static str,
    connection: Connection,
    log: Log,
}

impl FakeClient {
    async fn connect(
        address: &str,
        name: &'static str,
        id: ClientId,
        instance: InstanceNonce,
        log: Log,
    ) -> FakeClient {
        let peer = PeerKind::CacheManager {
            client: id,
            instance,
        };
        let (connection, _, mut incoming) = rpc::connect(address, hello(peer), &Limits::default())
            .await
            .unwrap();
        let callback_log = log.clone();
        tokio::spawn(async move {
            while let Some(request) = incoming.recv().await {
                let (body, replier) = request.into_parts();
                let entry = match &body {
                    Request::BreakCallbacks { fids } => format!("{name} break {fids:?}"),
                    Request::ResetCallbacks => format!("{name} reset"),
                    other => format!("{name} unexpected {other:?}"),
                };
                callback_log.lock().push(entry);
                replier.reply(Ok(Response::Ok)).await;
            }
        });
        FakeClient {
            name,
            connection,
            log,
        }
    }

    async fn call(&self, request: Request) -> Result<Response, ProtoError> {
        self.connection.call(request, TIMEOUT).await
    }

    fn note(&self, what: &str) {
        self.log.lock().push(format!("{} {what}", self.name));
    }
}

fn status_of(response: Response) -> VnodeStatus {
    match response {
        Response::Status { status, .. } | Response::Entry { status, .. } => status,
        other => panic!("expected a status, got {other:?}"),
    }
}

async fn create_volume(address: &str) {
    let admin = admin(address).await;
    let created = admin
        .call(
            Request::CreateVolume {
                id: VOLUME,
                name: VolumeName::parse("root.cell").unwrap(),
                quota_bytes: 0,
            },
            TIMEOUT,
        )
        .await
        .unwrap();
    assert!(matches!(created, Response::Volume(_)));
}

async fn create_file(client: &FakeClient, name: &str) -> Fid {
    let response = client
        .call(Request::Create {
            dir: Fid::root(VOLUME),
            name: name.into(),
            mode: 0o644,
            uid: 0,
            gid: 0,
            exclusive: true,
        })
        .await
        .unwrap();
    status_of(response).fid
}

fn store(fid: Fid, data: &[u8]) -> Request {
    Request::StoreData {
        fid,
        offset: 0,
        data: data.to_vec(),
        truncate_to: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn break_reaches_other_holder_before_the_store_reply() {
    let server = Server::start().await;
    create_volume(&server.address).await;
    let log: Log = Arc::default();
    let a = FakeClient::connect(
        &server.address,
        "A",
        ClientId::random(),
        InstanceNonce(1),
        log.clone(),
    )
    .await;
    let b = FakeClient::connect(
        &server.address,
        "B",
        ClientId::random(),
        InstanceNonce(1),
        log.clone(),
    )
    .await;

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
    assert!(matches!(data, Response::Data { ref data, .. } if data == b"new data"));
    assert_eq!(server.stats.fetch_data_calls(), 1);
    assert_eq!(server.stats.fetch_data_bytes(), 8);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_break_is_delivered_on_reconnect_before_serving() {
    let server = Server::start().await;
    create_volume(&server.address).await;
    let log: Log = Arc::default();
    let b_id = ClientId::random();
    let a = FakeClient::connect(
        &server.address,
        "A",
        ClientId::random(),
        InstanceNonce(1),
        log.clone(),
    )
    .await;
    let b = FakeClient::connect(&server.address, "B", b_id, InstanceNonce(9), log.clone()).await;
    let fid = create_file(&a, "f").await;
    b.call(Request::FetchStatus { fid }).await.unwrap();
    b.connection.close();
    b.connection.closed().await;

    a.call(store(fid, b"changed while B was away"))
        .await
        .unwrap();
    assert!(!log.lock().iter().any(|e| e.starts_with("B break")));

    let b = FakeClient::connect(&server.address, "B", b_id, InstanceNonce(9), log.clone()).await;
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
    let b = FakeClient::connect(&server.address, "B", b_id, InstanceNonce(10), log.clone()).await;
    b.call(Request::Ping).await.unwrap();
    assert_eq!(b.log.lock().iter().filter(|e| *e == "B reset").count(), 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_names_and_errors_map_to_codes() {
    let server = Server::start().await;
    create_volume(&server.address).await;
    let log: Log = Arc::default();
    let a = FakeClient::connect(
        &server.address,
        "A",
        ClientId::random(),
        InstanceNonce(1),
        log,
    )
    .await;
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
    let server = Server::start().await;
    create_volume(&server.address).await;
    let a = FakeClient::connect(
        &server.address,
        "A",
        ClientId::random(),
        InstanceNonce(1),
        Log::default(),
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
            matches!(fetched, Response::Data { ref data, .. } if *data == vec![index + 1; chunk]),
            "chunk {index}"
        );
    }
    server.stop().await;
}
