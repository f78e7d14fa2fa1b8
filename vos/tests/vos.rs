//! `Vos` against a real vlserver and test-double fileservers, all on loopback.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::rpc::{self, Connection};
use proto::server::{ServerLimits, Service, serve};
use proto::tls::authority::CellAuthority;
use proto::{
    CellConfig, ErrorCode, Hello, HelloReply, PeerClass, PeerKind, Request, Response, ServerId,
    Timestamp, Transport, VldbClient, VolumeId, VolumeInfo, VolumeType,
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use vos::{Vos, VosError, format_examine, format_listvldb, format_listvol};

const CELL: &str = "example.test";
const TIMEOUT: Duration = Duration::from_secs(5);

/// A fileserver that keeps volume records in memory and answers the admin calls.
struct FakeFileserver {
    server: ServerId,
    volumes: Mutex<BTreeMap<VolumeId, VolumeInfo>>,
    refuse_create: Option<ErrorCode>,
}

impl Service for FakeFileserver {
    fn hello(&self, hello: &Hello) -> Result<HelloReply, ErrorCode> {
        Ok(HelloReply {
            version: rpc::negotiate(hello, CELL)?,
            server: Some(self.server),
        })
    }

    async fn handle(
        self: Arc<Self>,
        _connection: Connection,
        _hello: Arc<Hello>,
        _caller: Arc<proto::Identity>,
        request: Request,
    ) -> Result<Response, ErrorCode> {
        let mut volumes = self.volumes.lock().unwrap();
        match request {
            Request::CreateVolume {
                id,
                name,
                quota_bytes,
            } => {
                if let Some(code) = &self.refuse_create {
                    return Err(code.clone());
                }
                let info = VolumeInfo {
                    id,
                    name,
                    kind: VolumeType::ReadWrite,
                    bytes_used: 0,
                    quota_bytes,
                    file_count: 1,
                    created: Timestamp::now(),
                };
                volumes.insert(id, info.clone());
                Ok(Response::Volume(info))
            }
            Request::RemoveVolume { id } => volumes
                .remove(&id)
                .map(|_| Response::Ok)
                .ok_or(ErrorCode::NoSuchVolume),
            Request::ExamineVolume { id } => volumes
                .get(&id)
                .cloned()
                .map(Response::Volume)
                .ok_or(ErrorCode::NoSuchVolume),
            Request::ListVolumes => Ok(Response::Volumes(volumes.values().cloned().collect())),
            _ => Err(ErrorCode::Unsupported),
        }
    }
}

/// A vlserver and the fileservers registered with it; everything stops on drop.
struct Cell {
    config: CellConfig,
    authority: CellAuthority,
    stop: watch::Sender<bool>,
    shutdown: watch::Receiver<bool>,
    fileservers: Vec<(String, Arc<FakeFileserver>)>,
    _dir: tempfile::TempDir,
}

impl Cell {
    async fn start() -> Cell {
        let dir = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (stop, shutdown) = watch::channel(false);
        let authority = CellAuthority::generate(CELL).unwrap();
        let transport = authority.transport(PeerClass::Server, "vldb").unwrap();
        let config = vlserver::Config::single(dir.path().to_owned(), CELL.into(), transport);
        tokio::spawn(vlserver::run(config, listener, shutdown.clone()));
        Cell {
            config: CellConfig {
                name: CELL.into(),
                vlservers: vec![address],
                credentials: None,
            },
            authority,
            stop,
            shutdown,
            fileservers: Vec::new(),
            _dir: dir,
        }
    }

    fn transport(&self, class: PeerClass) -> Transport {
        self.authority.transport(class, "test").unwrap()
    }

    fn vos(&self) -> Vos {
        Vos::new(
            self.config.clone(),
            self.transport(PeerClass::Host),
            TIMEOUT,
        )
    }

    async fn register(&self, server: ServerId, address: &str) {
        let peer = PeerKind::FileServer { server };
        VldbClient::new(
            self.config.clone(),
            self.transport(PeerClass::Server),
            peer,
            TIMEOUT,
        )
        .register_server(server, vec![address.into()])
        .await
        .unwrap();
    }

    /// Starts a fileserver double and registers it; returns its address.
    async fn add_fileserver(&mut self, refuse_create: Option<ErrorCode>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let fileserver = Arc::new(FakeFileserver {
            server: ServerId::random(),
            volumes: Mutex::new(BTreeMap::new()),
            refuse_create,
        });
        let limits = ServerLimits::default();
        tokio::spawn(serve(
            listener,
            fileserver.clone(),
            limits,
            self.transport(PeerClass::Server),
            self.shutdown.clone(),
        ));
        self.register(fileserver.server, &address).await;
        self.fileservers.push((address.clone(), fileserver));
        address
    }

    /// Registers a fileserver at an address where nothing listens.
    async fn add_dead_fileserver(&self) -> String {
        let address = unused_address().await;
        self.register(ServerId::random(), &address).await;
        address
    }

    fn volumes_on(&self, address: &str) -> Vec<String> {
        let (_, fileserver) = self.fileservers.iter().find(|(a, _)| a == address).unwrap();
        let volumes = fileserver.volumes.lock().unwrap();
        volumes.values().map(|v| v.name.to_string()).collect()
    }
}

impl Drop for Cell {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

async fn unused_address() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().to_string()
}

#[tokio::test]
async fn create_places_the_volume_on_the_only_fileserver() {
    let mut cell = Cell::start().await;
    let address = cell.add_fileserver(None).await;
    let vos = cell.vos();

    let entry = vos.create("root.cell", None, 5).await.unwrap();
    assert_eq!(entry.name.as_str(), "root.cell");
    assert_eq!(entry.rw_id, vlserver::VOLUME_ID_FIRST);
    assert_eq!(cell.volumes_on(&address), ["root.cell"]);

    let (examined, info) = vos.examine("root.cell").await.unwrap();
    assert_eq!(examined, entry);
    let info = info.unwrap();
    assert_eq!(info.quota_bytes, 5 << 20);
    let servers = vos.servers().await.unwrap();
    let text = format_examine(&examined, Some(&info), &servers);
    assert!(text.contains("root.cell"), "{text}");
    assert!(text.contains(&entry.rw_id.to_string()), "{text}");
    assert!(
        text.contains(&format!("server {address} RW Site")),
        "{text}"
    );
    assert!(text.contains("MaxQuota 5120 K"), "{text}");

    // The numeric id finds the same volume.
    let (by_id, _) = vos.examine(&entry.rw_id.to_string()).await.unwrap();
    assert_eq!(by_id, entry);
}

#[tokio::test]
async fn create_refuses_an_existing_name() {
    let mut cell = Cell::start().await;
    cell.add_fileserver(None).await;
    let vos = cell.vos();
    vos.create("user.a", None, 0).await.unwrap();
    let err = vos.create("user.a", None, 0).await.unwrap_err();
    assert!(matches!(err, VosError::Exists { .. }), "{err:?}");
    assert_eq!(err.to_string(), "volume 'user.a' already exists");
}

#[tokio::test]
async fn create_refuses_bad_names() {
    let mut cell = Cell::start().await;
    cell.add_fileserver(None).await;
    let vos = cell.vos();
    let err = vos.create("a b", None, 0).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "bad volume name 'a b': use 1 to 64 characters of A-Z a-z 0-9 . _ -"
    );
    let err = vos.create("12345", None, 0).await.unwrap_err();
    assert!(matches!(err, VosError::NumericName { .. }), "{err:?}");
    assert!(vos.listvldb().await.unwrap().is_empty());
}

#[tokio::test]
async fn unreachable_vldb_is_named_with_its_address() {
    let address = unused_address().await;
    let cell = CellConfig {
        name: CELL.into(),
        vlservers: vec![address.clone()],
        credentials: None,
    };
    let authority = CellAuthority::generate(CELL).unwrap();
    let transport = authority.transport(PeerClass::Host, "test").unwrap();
    let vos = Vos::new(cell, transport, TIMEOUT);
    let err = vos.listvldb().await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with(&format!("cannot reach the VLDB at {address}: ")),
        "{text}"
    );
    assert!(text.ends_with("is `holdfast vlserver` running?"), "{text}");
}

#[tokio::test]
async fn listvldb_and_listvol_show_every_volume() {
    let mut cell = Cell::start().await;
    let address = cell.add_fileserver(None).await;
    let vos = cell.vos();
    for name in ["user.b", "root.cell", "user.a"] {
        vos.create(name, None, 0).await.unwrap();
    }
    let entries = vos.listvldb().await.unwrap();
    let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["root.cell", "user.a", "user.b"]);
    let text = format_listvldb(&entries, &vos.servers().await.unwrap());
    assert!(text.contains("Total entries: 3"), "{text}");
    assert_eq!(
        text.matches(&format!("server {address} RW Site")).count(),
        3,
        "{text}"
    );

    let listing = vos.listvol(Some(&address)).await.unwrap();
    assert_eq!(listing.len(), 1);
    let names: Vec<&str> = listing[0].1.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["root.cell", "user.a", "user.b"]);
    let text = format_listvol(&listing);
    assert!(
        text.starts_with(&format!("Total number of volumes on server {address}: 3\n")),
        "{text}"
    );
    assert_eq!(vos.listvol(None).await.unwrap(), listing);
}

#[tokio::test]
async fn remove_then_examine_finds_no_volume() {
    let mut cell = Cell::start().await;
    let address = cell.add_fileserver(None).await;
    let vos = cell.vos();
    let entry = vos.create("scratch", None, 0).await.unwrap();
    vos.remove("scratch").await.unwrap();
    assert!(cell.volumes_on(&address).is_empty());
    let err = vos.examine("scratch").await.unwrap_err();
    assert_eq!(err.to_string(), "no volume named 'scratch' in the VLDB");
    let err = vos.remove(&entry.rw_id.to_string()).await.unwrap_err();
    assert!(matches!(err, VosError::NoSuchVolume { .. }), "{err:?}");
}

#[tokio::test]
async fn two_fileservers_need_a_server_address() {
    let mut cell = Cell::start().await;
    let first = cell.add_fileserver(None).await;
    let second = cell.add_fileserver(None).await;
    let vos = cell.vos();

    let err = vos.create("user.a", None, 0).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "the cell has 2 fileservers; pass --server ADDR"
    );

    let nowhere = unused_address().await;
    let err = vos.create("user.a", Some(&nowhere), 0).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "no fileserver registered at {nowhere}; registered: "
        )),
        "{text}"
    );
    assert!(text.contains(&first) && text.contains(&second), "{text}");

    vos.create("user.a", Some(&second), 0).await.unwrap();
    assert!(cell.volumes_on(&first).is_empty());
    assert_eq!(cell.volumes_on(&second), ["user.a"]);
}

#[tokio::test]
async fn create_without_fileservers_says_to_start_one() {
    let cell = Cell::start().await;
    let err = cell.vos().create("user.a", None, 0).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "no fileserver is registered in the VLDB; start one with `holdfast fileserver`"
    );
}

#[tokio::test]
async fn a_refused_creation_leaves_no_vldb_entry() {
    let mut cell = Cell::start().await;
    let address = cell.add_fileserver(Some(ErrorCode::NoSpace)).await;
    let vos = cell.vos();
    let err = vos.create("user.a", None, 0).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "the fileserver at {address} refused the request: no space left on the server's partition"
        )
    );
    assert!(vos.listvldb().await.unwrap().is_empty());
}

#[tokio::test]
async fn an_unreachable_fileserver() {
    let cell = Cell::start().await;
    let address = cell.add_dead_fileserver().await;
    let vos = cell.vos();
    let err = vos.create("user.a", None, 0).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with(&format!("cannot reach the fileserver at {address}: ")),
        "{text}"
    );
    assert!(vos.listvldb().await.unwrap().is_empty());
    let err = vos.listvol(None).await.unwrap_err();
    assert!(
        matches!(err, VosError::FileserverUnreachable { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn examine_shows_the_entry_when_the_fileserver_cannot_answer() {
    let mut cell = Cell::start().await;
    let address = cell.add_fileserver(None).await;
    let vos = cell.vos();
    let entry = vos.create("user.a", None, 0).await.unwrap();
    let server = cell.fileservers[0].1.server;

    // The fileserver lost the volume behind the VLDB's back.
    cell.fileservers[0].1.volumes.lock().unwrap().clear();
    let (examined, info) = vos.examine("user.a").await.unwrap();
    assert_eq!((&examined, info), (&entry, None));
    let text = format_examine(&examined, None, &vos.servers().await.unwrap());
    assert!(text.contains("could not get the volume's status"), "{text}");
    assert!(
        text.contains(&format!("server {address} RW Site")),
        "{text}"
    );

    // The fileserver moved to an address where nothing answers.
    let dead = unused_address().await;
    cell.register(server, &dead).await;
    let (examined, info) = vos.examine("user.a").await.unwrap();
    assert_eq!((&examined, info), (&entry, None));
    let err = vos.remove("user.a").await.unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("cannot reach the fileserver at {dead}: ")),
        "{err}"
    );
    assert_eq!(vos.listvldb().await.unwrap(), vec![entry]);

    // Back where it was: removing works, and the volume being gone there is fine.
    cell.register(server, &address).await;
    vos.remove("user.a").await.unwrap();
    assert!(vos.listvldb().await.unwrap().is_empty());
}
