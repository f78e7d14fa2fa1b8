//! The vlserver over real sockets on loopback, driven through `proto::VldbClient`.

use std::time::Duration;

use proto::PeerClass;
use proto::tls::authority::test_transport;
use proto::{
    CellConfig, Epoch, ErrorCode, PairName, PeerKind, ProtoError, Request, Response, ServerId,
    VldbClient, VolumeName, VolumeRef,
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
    let config = Config::single(
        dir.path().join("vldb"),
        CELL.into(),
        test_transport(PeerClass::Server).unwrap(),
    );
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
        credentials: None,
    };
    VldbClient::new(
        cell,
        test_transport(PeerClass::Host).unwrap(),
        PeerKind::Admin,
        TIMEOUT,
    )
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
        let config = Config::single(
            dir.path().to_owned(),
            CELL.into(),
            test_transport(PeerClass::Server).unwrap(),
        );
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

#[tokio::test]
async fn arbitrates_a_pair_and_resolves_its_volumes_to_both_members() {
    const A: &str = "127.0.0.1:4001";
    const B: &str = "127.0.0.1:4002";
    let lease = Duration::from_secs(30);
    let vl = start().await;
    let client = client(&vl.address, CELL);
    let pair = PairName::parse("p1").unwrap();
    let server = ServerId::random();

    assert_eq!(remote(client.get_pair(&pair).await), ErrorCode::NoSuchPair);
    client.join_pair(&pair, server, A).await.unwrap();
    client.join_pair(&pair, server, B).await.unwrap();
    assert!(matches!(
        remote(client.join_pair(&pair, server, "127.0.0.1:4003").await),
        ErrorCode::PairFull { .. }
    ));
    assert_eq!(
        client
            .acquire_pair(&pair, A, Epoch(0), lease)
            .await
            .unwrap(),
        (Epoch(1), lease)
    );
    match remote(client.acquire_pair(&pair, B, Epoch(1), lease).await) {
        ErrorCode::LeaseHeld {
            epoch,
            active,
            lease_left_ms,
        } => {
            assert_eq!((epoch, active.as_deref()), (Epoch(1), Some(A)));
            assert!(
                lease_left_ms > 0 && lease_left_ms <= 30_000,
                "{lease_left_ms}"
            );
        }
        other => panic!("expected LeaseHeld, got {other:?}"),
    }
    assert_eq!(
        client.renew_pair(&pair, A, Epoch(1), lease).await.unwrap(),
        (Epoch(1), lease)
    );
    assert_eq!(
        remote(
            client
                .acquire_pair(&pair, A, Epoch(1), Duration::ZERO)
                .await
        ),
        ErrorCode::InvalidArgument
    );

    // A volume on the pair resolves to both members, the active first.
    let volume = client
        .create_entry(VolumeName::parse("on.pair").unwrap(), server)
        .await
        .unwrap();
    let entry = client.get_entry(VolumeRef::Id(volume.rw_id)).await.unwrap();
    let servers = client.list_servers().await.unwrap();
    let site = servers
        .iter()
        .find(|s| s.server == entry.sites[0].server)
        .unwrap();
    assert_eq!(site.addresses, [A, B]);

    client
        .release_pair(&pair, A, Epoch(1), Some(B))
        .await
        .unwrap();
    assert_eq!(
        remote(client.renew_pair(&pair, A, Epoch(1), lease).await),
        ErrorCode::LeaseLost { epoch: Epoch(1) }
    );
    assert_eq!(
        client
            .acquire_pair(&pair, B, Epoch(1), lease)
            .await
            .unwrap(),
        (Epoch(2), lease)
    );
    let got = client.get_pair(&pair).await.unwrap();
    assert_eq!((got.epoch, got.active.as_deref()), (Epoch(2), Some(B)));
    assert_eq!(
        (got.members.as_slice(), got.server),
        (&[A.to_owned(), B.to_owned()][..], server)
    );
    assert!(got.lease_left_ms > 0 && got.lease_left_ms <= 30_000);
    let servers = client.list_servers().await.unwrap();
    assert_eq!(servers[0].addresses, [B, A]);

    vl.stop.send(true).unwrap();
    vl.task.await.unwrap().unwrap();
}
