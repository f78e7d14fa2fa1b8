//! Three replicas in one process over loopback: a single VLDB's database taken over as the
//! group's first snapshot and shipped to the others, and a replica refusing another
//! cell's data or another bootstrap membership.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use proto::tls::authority::test_transport;
use proto::{
    CellConfig, PeerClass, PeerKind, ServerId, Timestamp, VldbClient, VolumeName, VolumeRef,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use vlserver::{Config, DATABASE_FILE, Store, StoreLimits, VldbError};

/// Small, so that a test writes enough entries to snapshot and purge the log.
const SNAPSHOT_EVERY: u64 = 50;

const CELL: &str = "example.test";
const TIMEOUT: Duration = Duration::from_secs(5);

struct Replica {
    address: String,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), VldbError>>,
}

/// Starts replica `id` of `peers` on its listener, with its data in `dir`.
fn start(
    id: u64,
    listener: TcpListener,
    peers: &BTreeMap<u64, String>,
    dir: &Path,
    cell: &str,
) -> Replica {
    let address = listener.local_addr().unwrap().to_string();
    let (stop, shutdown) = watch::channel(false);
    let config = Config {
        data_dir: dir.to_owned(),
        cell_name: cell.into(),
        id,
        peers: peers.clone(),
        snapshot_every: SNAPSHOT_EVERY,
        connection_limits: Default::default(),
        token_key_file: None,
        token_lifetime_max: proto::identity::TOKEN_LIFETIME_DEFAULT,
        transport: test_transport(PeerClass::Server).unwrap(),
    };
    let task = tokio::spawn(vlserver::run(config, listener, shutdown));
    Replica {
        address,
        stop,
        task,
    }
}

/// A client of the replica at `address` alone.
fn client_of(address: &str) -> VldbClient {
    let cell = CellConfig {
        name: CELL.into(),
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

/// A single VLDB's file (format 1) holding `root.cell` and `home.a`.
fn single_vldb_file(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(DATABASE_FILE);
    {
        let store = Store::open(&path, StoreLimits::default()).unwrap();
        let server = ServerId::random();
        store
            .register_server(server, vec!["127.0.0.1:7000".into()], Timestamp::now())
            .unwrap();
        for name in ["root.cell", "home.a"] {
            store
                .create_entry(&VolumeName::parse(name).unwrap(), server)
                .unwrap();
        }
    }
    common::as_single_vldb_file(&path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_vldbs_database_reaches_every_replica() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    single_vldb_file(dirs[0].path());
    // Started first as a replica that is not the lowest id, it refuses, and takes nothing
    // over: the next start, right, takes it over whole.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let wrong = BTreeMap::from([
        (1, "127.0.0.1:1".to_owned()),
        (2, listener.local_addr().unwrap().to_string()),
    ]);
    let refused = start(2, listener, &wrong, dirs[0].path(), CELL)
        .task
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(refused, VldbError::Config(_)), "{refused}");
    let (replicas, peers) = fresh_group(&dirs).await;

    // Replicas 2 and 3 started empty: they hold the volumes once the snapshot reached them.
    let deadline = Instant::now() + Duration::from_secs(20);
    for replica in &replicas[1..] {
        let client = client_of(&replica.address);
        loop {
            let names: Vec<String> = match client.list_entries().await {
                Ok(entries) => entries.into_iter().map(|e| e.name.to_string()).collect(),
                Err(_) => Vec::new(),
            };
            if names == ["home.a", "root.cell"] {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "replica at {} never received the taken-over volumes: {names:?}",
                replica.address
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // And the group goes on from there: ids continue where the single VLDB stopped.
    let cell = CellConfig {
        name: CELL.into(),
        vlservers: replicas.iter().map(|r| r.address.clone()).collect(),
        credentials: None,
    };
    let client = VldbClient::new(
        cell,
        test_transport(PeerClass::Host).unwrap(),
        PeerKind::Admin,
        TIMEOUT,
    );
    let servers = client.list_servers().await.unwrap();
    let home_a = client
        .get_entry(VolumeRef::Name(VolumeName::parse("home.a").unwrap()))
        .await
        .unwrap();
    let home_b = client
        .create_entry(VolumeName::parse("home.b").unwrap(), servers[0].server)
        .await
        .unwrap();
    assert!(home_b.rw_id > home_a.rw_id);

    for replica in replicas {
        stop(replica).await;
    }

    // Started again with another bootstrap membership, or as another cell, replica 1
    // refuses, saying what to do.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut other_peers = peers.clone();
    other_peers.remove(&3);
    let refused = start(1, listener, &other_peers, dirs[0].path(), CELL)
        .task
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(refused, VldbError::OtherPeers { .. }), "{refused}");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refused = start(1, listener, &peers, dirs[0].path(), "other.test")
        .task
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(refused, VldbError::OtherCell { .. }), "{refused}");
}

/// Binds three listeners and starts a fresh group of three in `dirs`.
async fn fresh_group(dirs: &[tempfile::TempDir]) -> (Vec<Replica>, BTreeMap<u64, String>) {
    let mut listeners = Vec::new();
    let mut peers = BTreeMap::new();
    for id in 1..=3u64 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        peers.insert(id, listener.local_addr().unwrap().to_string());
        listeners.push(listener);
    }
    let replicas = listeners
        .into_iter()
        .zip(1..=3u64)
        .zip(dirs)
        .map(|((listener, id), dir)| start(id, listener, &peers, dir.path(), CELL))
        .collect();
    (replicas, peers)
}

async fn stop(replica: Replica) {
    replica.stop.send(true).unwrap();
    replica.task.await.unwrap().unwrap();
}

/// Opens the redb file at `path` of a stopped replica once its last task has let it go:
/// some end a moment after `run` returns (seen: `DatabaseAlreadyOpen`).
async fn open_released(path: &Path) -> Database {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Database::open(path) {
            Err(redb::DatabaseError::DatabaseAlreadyOpen) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            opened => return opened.unwrap(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_behind_the_purged_log_catches_up_from_a_snapshot() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (mut replicas, peers) = fresh_group(&dirs).await;
    let cell = CellConfig {
        name: CELL.into(),
        vlservers: replicas.iter().map(|r| r.address.clone()).collect(),
        credentials: None,
    };
    let client = VldbClient::new(
        cell,
        test_transport(PeerClass::Host).unwrap(),
        PeerKind::Admin,
        TIMEOUT,
    );
    let server = ServerId::random();
    client
        .register_server(server, vec!["127.0.0.1:7000".into()])
        .await
        .unwrap();
    // Replica 3 goes down; the other two go on for several snapshots' worth of entries,
    // and purge their logs behind the snapshots.
    stop(replicas.pop().unwrap()).await;
    let count = 4 * SNAPSHOT_EVERY;
    for i in 0..count {
        client
            .create_entry(VolumeName::parse(&format!("v{i:03}")).unwrap(), server)
            .await
            .unwrap();
    }
    let listener = TcpListener::bind(&peers[&3]).await.unwrap();
    let third = start(3, listener, &peers, dirs[2].path(), CELL);
    let third_client = client_of(&third.address);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let held = third_client.list_entries().await.map_or(0, |e| e.len());
        if held == count as usize {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replica 3 holds {held} of {count} volumes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    replicas.push(third);
    for replica in replicas {
        stop(replica).await;
    }
    // The leader's log was purged behind a snapshot, and replica 3 installed one.
    const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");
    const RAFT: TableDefinition<&str, &[u8]> = TableDefinition::new("raft");
    let log = open_released(&dirs[0].path().join(vlserver::LOG_FILE)).await;
    let txn = log.begin_read().unwrap();
    let first = txn
        .open_table(ENTRIES)
        .unwrap()
        .first()
        .unwrap()
        .unwrap()
        .0
        .value();
    assert!(first > SNAPSHOT_EVERY, "replica 1's log starts at {first}");
    let tables = open_released(&dirs[2].path().join(DATABASE_FILE)).await;
    let txn = tables.begin_read().unwrap();
    assert!(
        txn.open_table(RAFT)
            .unwrap()
            .get("snapshot")
            .unwrap()
            .is_some()
    );
}
