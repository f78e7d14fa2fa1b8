//! The vlserver over real sockets on loopback, driven through `proto::VldbClient`.

use std::time::Duration;

use proto::{
    CellConfig, ErrorCode, PeerKind, ProtoError, Request, Response, ServerId, VldbClient,
    VolumeName, VolumeRef,
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use vlserver::{Config, VOLUME_ID_FIRST, VldbError};

const CELL: &str = "example.test";
const TIMEOUT: Duration = Duration::from_secs(5);

struct Running {
    address: String,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), VldbError>>,
    _dir: tempfile::TempDir,
}

async fn start() -> Running {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let (stop, shutdown) = watch::channel(false);
    let config = Config {
        data_dir: dir.path().join("vldb"),
        cell_name: CELL.into(),
    };
    let task = tokio::spawn(vlserver::run(config, listener, shutdown));
    Running {
        address,
        stop,
        task,
        _dir: dir,
    }
}

fn client(address: &str, cell: &str) -> VldbClient {
    let cell = CellConfig {
        name: cell.into(),
        vlservers: vec![address.into()],
    };
    VldbClient::new(cell, PeerKind::Admin, TIMEOUT)
}

fn remote(result: Result<impl std::fmt::Debug, ProtoError>) -> ErrorCode {
    match result {
        Err(ProtoError::Remote(code)) => code,
        other => panic!("expected an error answer, got {other:?}"),
    }
}

#[tokio::test]
async fn serves_the_vldb_calls() {
    let vl = start().await;
    let client = client(&vl.address, CELL);
    let name = |n: &str| VolumeName::parse(n).unwrap();

    assert_eq!(client.call(Request::Ping).await.unwrap(), Response::Pong);
    let server = ServerId::random();
    let answer = client
        .call(Request::VlRegisterServer {
            server,
            addresses: vec!["127.0.0.1:7000".into()],
        })
        .await
        .unwrap();
    assert!(
        matches!(answer, Response::Server(ref s) if s.server == server),
        "{answer:?}"
    );
    let servers = client.list_servers().await.unwrap();
    assert_eq!(servers.len(), 1);
    assert_eq!(servers[0].addresses, ["127.0.0.1:7000"]);

    let user = client.create_entry(name("user.b"), server).await.unwrap();
    assert_eq!(user.rw_id, VOLUME_ID_FIRST);
    let root = client
        .create_entry(name("root.cell"), server)
        .await
        .unwrap();
    assert_eq!(
        remote(client.create_entry(name("root.cell"), server).await),
        ErrorCode::VolumeExists
    );
    assert_eq!(
        remote(client.create_entry(name("x"), ServerId::random()).await),
        ErrorCode::NoSuchServer
    );

    assert_eq!(
        client.get_entry(VolumeRef::Id(root.rw_id)).await.unwrap(),
        root
    );
    assert_eq!(
        client
            .get_entry(VolumeRef::Name(name("user.b")))
            .await
            .unwrap(),
        user
    );
    let listed = client.list_entries().await.unwrap();
    assert_eq!(listed, vec![root.clone(), user.clone()]);

    client
        .remove_entry(VolumeRef::Name(name("root.cell")))
        .await
        .unwrap();
    assert_eq!(
        remote(client.get_entry(VolumeRef::Id(root.rw_id)).await),
        ErrorCode::NoSuchVolume
    );
    assert_eq!(
        remote(client.remove_entry(VolumeRef::Id(root.rw_id)).await),
        ErrorCode::NoSuchVolume
    );
    assert_eq!(
        remote(client.call(Request::ListVolumes).await),
        ErrorCode::Unsupported
    );
    let too_many = (0..17).map(|i| format!("127.0.0.1:{i}")).collect();
    assert_eq!(
        remote(client.register_server(ServerId::random(), too_many).await),
        ErrorCode::InvalidArgument
    );

    vl.stop.send(true).unwrap();
    vl.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn refuses_the_wrong_cell_at_hello() {
    let vl = start().await;
    let stranger = client(&vl.address, "other.test");
    assert_eq!(
        remote(stranger.call(Request::Ping).await),
        ErrorCode::WrongCell {
            expected: CELL.into()
        }
    );
    vl.stop.send(true).unwrap();
    vl.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn keeps_entries_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut created = None;
    for round in 0..2 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (stop, shutdown) = watch::channel(false);
        let config = Config {
            data_dir: dir.path().to_owned(),
            cell_name: CELL.into(),
        };
        let task = tokio::spawn(vlserver::run(config, listener, shutdown));
        let client = client(&address, CELL);
        if round == 0 {
            let server = ServerId::random();
            client
                .register_server(server, vec!["127.0.0.1:7000".into()])
                .await
                .unwrap();
            let name = VolumeName::parse("root.cell").unwrap();
            created = Some(client.create_entry(name, server).await.unwrap());
        } else {
            assert_eq!(
                client.list_entries().await.unwrap(),
                vec![created.clone().unwrap()]
            );
        }
        stop.send(true).unwrap();
        task.await.unwrap().unwrap();
    }
}
