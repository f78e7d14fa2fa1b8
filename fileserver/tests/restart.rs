//! Restart tests for callback state: a real fileserver stopped and started again on the
//! same partition, with fake cache managers that log the breaks and resets pushed to them.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fileserver::Config;
use parking_lot::Mutex;
use proto::rpc::{self, Connection, Limits};
use proto::{
    CellConfig, ClientId, DataVersion, Fid, Hello, InstanceNonce, PROTOCOL_VERSION_MAX,
    PROTOCOL_VERSION_MIN, PeerKind, ProtoError, Request, Response, VnodeStatus, VolumeId,
    VolumeName,
};
use state::JournalMode;
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
}

impl Server {
    async fn start(partition: &Path, mode: JournalMode) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let cell = CellConfig {
            name: CELL.into(),
            vlservers: vec!["127.0.0.1:1".into()],
        };
        let mut config = Config::new(partition.to_owned(), cell, vec![address.clone()]);
        config.journal_mode = mode;
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(async move {
            fileserver::run(config, listener, shutdown).await.unwrap();
        });
        Server {
            address,
            stop,
            task,
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

/// A fake cache manager that logs and acknowledges every push.
struct FakeClient {
    name: &'static str,
    connection: Connection,
    log: Log,
}

impl FakeClient {
    /// Connects and waits until the server serves it (its owed pushes went out first).
    async fn connect(address: &str, name: &'static str, id: ClientId, log: &Log) -> FakeClient {
        let peer = PeerKind::CacheManager {
            client: id,
            instance: InstanceNonce(1),
        };
        let (connection, _, mut incoming) = rpc::connect(address, hello(peer), &Limits::default())
            .await
            .unwrap();
        let pushes = log.clone();
        tokio::spawn(async move {
            while let Some(request) = incoming.recv().await {
                let (body, replier) = request.into_parts();
                let entry = match &body {
                    Request::BreakCallbacks { fids } => format!("{name} break {fids:?}"),
                    Request::ResetCallbacks => format!("{name} reset"),
                    other => format!("{name} unexpected {other:?}"),
                };
                pushes.lock().push(entry);
                replier.reply(Ok(Response::Ok)).await;
            }
        });
        let client = FakeClient {
            name,
            connection,
            log: log.clone(),
        };
        assert_eq!(client.call(Request::Ping).await.unwrap(), Response::Pong);
        client
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
    let peer = PeerKind::Admin;
    let (admin, _, _) = rpc::connect(address, hello(peer), &Limits::default())
        .await
        .unwrap();
    let request = Request::CreateVolume {
        id: VOLUME,
        name: VolumeName::parse("root.cell").unwrap(),
        quota_bytes: 0,
    };
    let created = admin.call(request, TIMEOUT).await.unwrap();
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

fn store(fid: Fid, data: &[u8]) -> Request {
    Request::StoreData {
        fid,
        offset: 0,
        data: data.to_vec(),
        truncate_to: None,
    }
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
    let server = Server::start(dir.path(), JournalMode::Sync).await;
    create_volume(&server.address).await;
    let a = FakeClient::connect(&server.address, "A", a_id, &log).await;
    let b = FakeClient::connect(&server.address, "B", b_id, &log).await;
    let fid = create_file(&a, "kept").await;
    fetch(&b, fid).await;
    drop((a, b));
    server.stop().await;

    let server = Server::start(dir.path(), JournalMode::Sync).await;
    log.lock().push("restarted".into());
    let a = FakeClient::connect(&server.address, "A", a_id, &log).await;
    let b = FakeClient::connect(&server.address, "B", b_id, &log).await;
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
    let server = Server::start(dir.path(), JournalMode::Sync).await;
    create_volume(&server.address).await;
    let a = FakeClient::connect(&server.address, "A", a_id, &log).await;
    let b = FakeClient::connect(&server.address, "B", b_id, &log).await;
    let fid = create_file(&a, "owed").await;
    fetch(&b, fid).await;
    b.connection.close();
    b.connection.closed().await;
    // B is gone: its break queues.
    status_of(a.call(store(fid, b"while B was away")).await.unwrap());
    drop(a);
    server.stop().await;

    let server = Server::start(dir.path(), JournalMode::Sync).await;
    log.lock().push("restarted".into());
    let b = FakeClient::connect(&server.address, "B", b_id, &log).await;
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
    let server = Server::start(dir.path(), JournalMode::Group).await;
    create_volume(&server.address).await;
    let b = FakeClient::connect(&server.address, "B", b_id, &log).await;
    let fid = create_file(&b, "f").await;
    fetch(&b, fid).await;
    drop(b);
    server.stop().await;

    let server = Server::start(dir.path(), JournalMode::Group).await;
    log.lock().push("restarted".into());
    let b = FakeClient::connect(&server.address, "B", b_id, &log).await;
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
    let server = Server::start(dir.path(), JournalMode::Sync).await;
    create_volume(&server.address).await;
    let a = FakeClient::connect(&server.address, "A", ClientId::random(), &log).await;
    let b = FakeClient::connect(&server.address, "B", ClientId::random(), &log).await;
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
