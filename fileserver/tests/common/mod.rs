//! Support shared by the fileserver integration tests: a real fileserver on a partition
//! and a 127.0.0.1:0 listener, and connections that play a cache manager or an admin.
//! Every test file compiles this module on its own and uses only part of it.
#![allow(dead_code)] // Each test binary uses a different part of this module.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fileserver::Config;
use parking_lot::Mutex;
use proto::rpc::{self, Connection, Limits};
use proto::{
    ByteRange, CellConfig, ClientId, Fid, Hello, InstanceNonce, PROTOCOL_VERSION_MAX,
    PROTOCOL_VERSION_MIN, PeerKind, ProtoError, Request, Response, VnodeId, VnodeStatus, VolumeId,
    VolumeName,
};
use proto::{PeerClass, Transport};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub const CELL: &str = "test.cell";
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// The volume `create_volume` makes.
pub const VOLUME: VolumeId = VolumeId(100);
/// The end of a lock range that runs to the end of the file.
pub const EOF: u64 = ByteRange::EOF;

/// `[start, end)` as a peer sends it: decoded, not checked, so that a test can also send
/// the empty range `ByteRange::new` refuses.
pub fn wire_range(start: u64, end: u64) -> ByteRange {
    let bytes = postcard::to_allocvec(&(start, end)).expect("two integers encode");
    postcard::from_bytes(&bytes).expect("two integers decode as a range")
}

/// A fileserver task serving one partition until `stop`.
pub struct Server {
    pub address: String,
    pub stats: Arc<fileserver::Stats>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    /// The partition, when the server owns it (`in_tempdir`); removed after the server.
    _dir: Option<tempfile::TempDir>,
}

impl Server {
    /// Starts a fileserver on `partition` with the test cell's config as `configure`
    /// leaves it.
    pub async fn start(partition: &Path, configure: impl FnOnce(&mut Config)) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        // No VLDB listens here: registration keeps retrying in the background.
        let cell = CellConfig {
            name: CELL.into(),
            vlservers: vec!["127.0.0.1:1".into()],
            credentials: None,
        };
        let mut config = Config::new(
            partition.to_owned(),
            cell,
            transport(PeerClass::Server),
            vec![address.clone()],
        );
        config.tokens = fileserver::Tokens(Some(token_key().verifier(CELL)));
        configure(&mut config);
        let stats = config.stats.clone();
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(async move {
            fileserver::run(config, listener, shutdown).await.unwrap();
        });
        Server {
            address,
            stats,
            stop,
            task,
            _dir: None,
        }
    }

    /// Starts a fileserver with the default config on a fresh partition of its own.
    pub async fn in_tempdir() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let mut server = Server::start(dir.path(), |_| {}).await;
        server._dir = Some(dir);
        server
    }

    /// Tells the server to shut down and waits until it has.
    pub async fn stop(self) {
        self.stop.send(true).unwrap();
        self.task.await.unwrap();
    }
}

/// A transport of `class` under the tests' one CA.
pub fn transport(class: PeerClass) -> Transport {
    proto::tls::authority::test_transport(class).unwrap()
}

pub fn hello(peer: PeerKind) -> Hello {
    Hello {
        version_min: PROTOCOL_VERSION_MIN,
        version_max: PROTOCOL_VERSION_MAX,
        cell: CELL.into(),
        peer,
    }
}

pub fn cache_manager(client: ClientId, instance: InstanceNonce) -> PeerKind {
    PeerKind::CacheManager { client, instance }
}

/// Connects as `peer` and answers every request the server pushes with `Ok`, after
/// handing it to `on_push`.
pub async fn connect(
    address: &str,
    peer: PeerKind,
    mut on_push: impl FnMut(Request) + Send + 'static,
) -> Connection {
    let host = transport(PeerClass::Host);
    let (connection, _, mut incoming) =
        rpc::connect(address, hello(peer), &Limits::default(), &host)
            .await
            .unwrap();
    tokio::spawn(async move {
        while let Some(request) = incoming.recv().await {
            let (body, _token, replier) = request.into_parts();
            on_push(body);
            replier.reply(Ok(Response::Ok)).await;
        }
    });
    connection
}

/// An admin connection; the server pushes nothing to admins.
pub async fn admin(address: &str) -> Connection {
    // A server of the cell's certificate: volumes are made and removed only by servers
    // and administrators.
    let host = transport(PeerClass::Server);
    let (connection, _, _) =
        rpc::connect(address, hello(PeerKind::Admin), &Limits::default(), &host)
            .await
            .unwrap();
    connection
}

/// Creates `VOLUME` (named root.cell) through an admin connection.
pub async fn create_volume(address: &str) {
    let admin = admin(address).await;
    let request = Request::CreateVolume {
        id: VOLUME,
        name: VolumeName::parse("root.cell").unwrap(),
        quota_bytes: 0,
    };
    let created = admin.call(request, TIMEOUT).await.unwrap();
    assert!(matches!(created, Response::Volume(_)), "{created:?}");
    open_to_anyone(&admin, Fid::root(VOLUME)).await;
}

/// The key the test servers verify tokens with.
pub fn token_key() -> proto::TokenKey {
    proto::TokenKey::from_secret([42; 32])
}

/// A token of the test cell: `user` with `id` in `groups`, for an hour.
pub fn token(user: &str, id: i32, groups: &[proto::PrincipalId]) -> proto::SealedToken {
    let now = proto::Timestamp::now();
    token_key().seal(proto::TokenBody {
        cell: CELL.into(),
        user: user.into(),
        id: proto::PrincipalId(id),
        groups: groups.to_vec(),
        issued: now,
        expiry: proto::Timestamp {
            secs: now.secs + 3600,
            nanos: 0,
        },
        key_id: 0,
    })
}

/// The cell's administrator's token.
pub fn admin_token() -> proto::SealedToken {
    token("admin", 1, &[proto::PrincipalId::ADMINISTRATORS])
}

/// `request` sent over `connection` for the holder of `token`.
pub async fn call_as(
    connection: &Connection,
    token: &proto::SealedToken,
    request: Request,
) -> Result<Response, ProtoError> {
    connection
        .try_call_as(Some(token), &request, TIMEOUT)
        .await
        .unwrap_or(Err(ProtoError::Closed))
}

/// Gives `system:anyuser` every right on `dir`, as an administrator: the tests of
/// callbacks, locks and restarts act without tokens.
pub async fn open_to_anyone(connection: &Connection, dir: Fid) {
    let mut acl = proto::AccessList::for_new_volume();
    acl.set(proto::PrincipalId::ANYUSER, proto::Rights::ALL, false);
    let stored = call_as(connection, &admin_token(), Request::StoreAcl { dir, acl })
        .await
        .unwrap();
    assert!(matches!(stored, Response::Status { .. }), "{stored:?}");
}

/// A fid of `VOLUME` that need not exist: the lock service does not look files up.
pub fn fid(vnode: u64) -> Fid {
    Fid {
        volume: VOLUME,
        vnode: VnodeId(vnode),
        unique: proto::Uniquifier(1),
    }
}

pub type Log = Arc<Mutex<Vec<String>>>;

/// A fake cache manager that logs every callback push as "NAME break [FIDS]" or
/// "NAME reset" and acknowledges it.
pub struct FakeClient {
    pub name: &'static str,
    pub connection: Connection,
    pub log: Log,
}

impl FakeClient {
    pub async fn connect(
        address: &str,
        name: &'static str,
        id: ClientId,
        instance: InstanceNonce,
        log: &Log,
    ) -> FakeClient {
        let pushes = log.clone();
        let on_push = move |body: Request| {
            let entry = match &body {
                Request::BreakCallbacks { fids } => format!("{name} break {fids:?}"),
                Request::ResetCallbacks => format!("{name} reset"),
                other => format!("{name} unexpected {other:?}"),
            };
            pushes.lock().push(entry);
        };
        let connection = connect(address, cache_manager(id, instance), on_push).await;
        FakeClient {
            name,
            connection,
            log: log.clone(),
        }
    }

    /// A new client (random id, first instance).
    pub async fn fresh(address: &str, name: &'static str, log: &Log) -> FakeClient {
        FakeClient::connect(address, name, ClientId::random(), InstanceNonce(1), log).await
    }

    pub async fn call(&self, request: Request) -> Result<Response, ProtoError> {
        self.connection.call(request, TIMEOUT).await
    }

    /// Logs "NAME what", ordered with the pushes.
    pub fn note(&self, what: &str) {
        self.log.lock().push(format!("{} {what}", self.name));
    }
}

pub fn status_of(response: Response) -> VnodeStatus {
    match response {
        Response::Status { status, .. } | Response::Entry { status, .. } => status,
        other => panic!("expected a status, got {other:?}"),
    }
}

/// Creates the file `name` in the root of `VOLUME`.
pub async fn create_file(client: &FakeClient, name: &str) -> Fid {
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

/// Writes `data` at the start of `fid`.
pub fn store(fid: Fid, data: &[u8]) -> Request {
    Request::StoreData {
        fid,
        offset: 0,
        data: data.to_vec(),
        truncate_to: None,
    }
}
