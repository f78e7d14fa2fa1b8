//! Fileserver pairs, in-process: a real VLDB, two members on one partition, each
//! reaching the VLDB through a loopback proxy the test can cut to fake a partition.
//! Scenarios are named as faults: `pair_failover__...`, `pair_switchover__...`.
#![allow(non_snake_case)] // Scenario names separate the fault with `__`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{CELL, FakeClient, Log, TIMEOUT, VOLUME, hello};
use fileserver::{Config, PairConfig};
use parking_lot::Mutex;
use proto::PeerClass;
use proto::rpc::{self, Connection, Limits};
use proto::{
    ByteRange, CellConfig, ClientId, Epoch, ErrorCode, Fid, InstanceNonce, LockKind, LockOwnerId,
    MemberRole, PairName, PeerKind, ProtoError, Request, Response, VolumeName,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const LEASE: Duration = Duration::from_millis(1000);
const PAIR: &str = "fs.pair";

/// A VLDB task on 127.0.0.1:0.
struct Vldb {
    address: String,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Vldb {
    async fn start() -> Vldb {
        let dir = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let config = vlserver::Config::single(
            dir.path().to_owned(),
            CELL.into(),
            common::transport(PeerClass::Server),
        );
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(async move {
            vlserver::run(config, listener, shutdown).await.unwrap();
        });
        Vldb {
            address,
            stop,
            task,
            _dir: dir,
        }
    }

    async fn stop(self) {
        self.stop.send(true).unwrap();
        self.task.await.unwrap();
    }
}

/// A loopback TCP proxy to `upstream` that `cut` turns into a black hole: open
/// connections are dropped, new ones are accepted and then get no answer.
struct Proxy {
    address: String,
    cut: Arc<Mutex<bool>>,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
    task: JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let cut = Arc::new(Mutex::new(false));
        let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (is_cut, all) = (cut.clone(), links.clone());
        let task = tokio::spawn(async move {
            // Held, never read: a cut proxy's peers hang as behind a partition.
            let mut held = Vec::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                if *is_cut.lock() {
                    held.push(inbound);
                    continue;
                }
                let upstream = upstream.clone();
                all.lock().push(tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                }));
            }
        });
        Proxy {
            address,
            cut,
            links,
            task,
        }
    }

    fn cut(&self) {
        *self.cut.lock() = true;
        for link in self.links.lock().drain(..) {
            link.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        for link in self.links.lock().drain(..) {
            link.abort();
        }
    }
}

/// A pair member task reaching the VLDB through `vldb`.
struct Member {
    address: String,
    history: PathBuf,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Member {
    async fn start(partition: &Path, vldb: &str, history: PathBuf) -> Member {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let cell = CellConfig {
            name: CELL.into(),
            vlservers: vec![vldb.to_owned()],
            credentials: None,
        };
        let mut config = Config::new(
            partition.to_owned(),
            cell,
            common::transport(PeerClass::Server),
            vec![address.clone()],
        );
        config.tokens = fileserver::Tokens(Some(common::token_key().verifier(CELL)));
        config.pair = Some(PairConfig {
            name: PairName::parse(PAIR).unwrap(),
            lease: LEASE,
        });
        config.history = Some(history.clone());
        config.vldb_timeout = Duration::from_secs(2);
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(async move {
            fileserver::run(config, listener, shutdown).await.unwrap();
        });
        Member {
            address,
            history,
            stop,
            task,
        }
    }

    async fn state(&self) -> proto::MemberState {
        match admin(&self.address)
            .await
            .call(Request::MemberState, TIMEOUT)
            .await
        {
            Ok(Response::MemberState(state)) => state,
            other => panic!("MemberState answered {other:?}"),
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        self.task.await.unwrap();
    }
}

async fn admin(address: &str) -> Connection {
    // A server of the cell's certificate: volumes are made only by servers and
    // administrators.
    let (connection, _, _) = rpc::connect(
        address,
        hello(PeerKind::Admin),
        &Limits::default(),
        &common::transport(PeerClass::Server),
    )
    .await
    .unwrap();
    connection
}

/// Waits (bounded) until `member` reports `role`, returning its state.
async fn await_role(member: &Member, role: MemberRole, after: Epoch) -> proto::MemberState {
    let waited = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let state = member.state().await;
            if state.role == role && state.epoch > after {
                return state;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    waited.unwrap_or_else(|_| panic!("{} never became {role:?} after {after:?}", member.address))
}

/// Waits until one of the two members is active; returns (active, passive).
async fn await_active<'a>(a: &'a Member, b: &'a Member) -> (&'a Member, &'a Member) {
    let waited = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match (a.state().await.role, b.state().await.role) {
                (MemberRole::Active, MemberRole::Passive) => return (a, b),
                (MemberRole::Passive, MemberRole::Active) => return (b, a),
                (MemberRole::Active, MemberRole::Active) => panic!("two active members"),
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    waited.expect("no member became active")
}

async fn create_volume(address: &str) {
    let request = Request::CreateVolume {
        id: VOLUME,
        name: VolumeName::parse("root.cell").unwrap(),
        quota_bytes: 0,
    };
    let admin = admin(address).await;
    let created = admin.call(request, TIMEOUT).await.unwrap();
    assert!(matches!(created, Response::Volume(_)), "{created:?}");
    common::open_to_anyone(&admin, Fid::root(VOLUME)).await;
}

/// History lines as (unix micros, epoch, member, what).
fn history(path: &Path) -> Vec<(u128, u64, String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            assert_eq!(fields.len(), 4, "history line {line:?}");
            (
                fields[0].parse().unwrap(),
                fields[1].parse().unwrap(),
                fields[2].to_owned(),
                fields[3].to_owned(),
            )
        })
        .collect()
}

fn sequenced_create(seq: u64, name: &str) -> Request {
    Request::Sequenced {
        seq,
        request: Box::new(Request::Create {
            dir: Fid::root(VOLUME),
            name: name.into(),
            mode: 0o644,
            uid: 0,
            gid: 0,
            exclusive: true,
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pair_failover__active_cut_from_vldb_fences_itself_before_the_partner_takes_over() {
    let vldb = Vldb::start().await;
    let partition = tempfile::tempdir().unwrap();
    let histories = tempfile::tempdir().unwrap();
    let proxy_a = Proxy::start(vldb.address.clone()).await;
    let proxy_b = Proxy::start(vldb.address.clone()).await;
    let a = Member::start(
        partition.path(),
        &proxy_a.address,
        histories.path().join("a"),
    )
    .await;
    let b = Member::start(
        partition.path(),
        &proxy_b.address,
        histories.path().join("b"),
    )
    .await;

    let (active, passive) = await_active(&a, &b).await;
    let epoch = active.state().await.epoch;
    // The passive points clients at the active (once its next look at the VLDB saw it).
    let pointed = tokio::time::timeout(TIMEOUT, async {
        loop {
            match admin(&passive.address)
                .await
                .call(Request::Ping, TIMEOUT)
                .await
            {
                Err(ProtoError::Remote(ErrorCode::NotActive {
                    hint: Some(hint), ..
                })) => {
                    return hint;
                }
                Err(ProtoError::Remote(ErrorCode::NotActive { hint: None, .. })) => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                other => panic!("the passive answered {other:?}"),
            }
        }
    });
    assert_eq!(pointed.await.unwrap(), active.address);

    create_volume(&active.address).await;
    let log: Log = Arc::default();
    let id = ClientId::random();
    let client = FakeClient::connect(&active.address, "C", id, InstanceNonce(1), &log).await;
    let created = client.call(sequenced_create(1, "f")).await.unwrap();
    let Response::Entry { status, .. } = created else {
        panic!("create answered {created:?}");
    };
    // Acknowledged writes keep coming until the fence stops them.
    let writer = {
        let connection = client.connection.clone();
        tokio::spawn(async move {
            let fid = status.fid;
            while connection
                .call(common::store(fid, b"data"), Duration::from_millis(500))
                .await
                .is_ok()
            {}
        })
    };

    let proxy_of_active = if std::ptr::eq(active, &a) {
        &proxy_a
    } else {
        &proxy_b
    };
    proxy_of_active.cut();
    let taken = await_role(passive, MemberRole::Active, epoch).await;
    assert_eq!(taken.epoch, Epoch(epoch.0 + 1));
    assert_eq!(
        active.state().await.role,
        MemberRole::Passive,
        "the old active fenced itself"
    );
    writer.await.unwrap();

    // The last acknowledgement of the old epoch precedes the first of the new one.
    let old = history(&active.history);
    let new = history(&passive.history);
    let last_old = old
        .iter()
        .filter(|line| line.1 == epoch.0 && line.3 != "active")
        .map(|line| line.0)
        .max()
        .expect("the old active acknowledged something");
    assert!(
        old.iter().any(|line| line.3 == "fenced"),
        "old history: {old:?}"
    );
    let first_new = new
        .iter()
        .filter(|line| line.1 == epoch.0 + 1)
        .map(|line| line.0)
        .min()
        .expect("the new active wrote its takeover");
    assert!(last_old < first_new, "old {old:?} new {new:?}");

    // A retry of the create after the failover is answered from the record.
    let client = FakeClient::connect(&passive.address, "C", id, InstanceNonce(1), &log).await;
    match client.call(sequenced_create(1, "f")).await.unwrap() {
        Response::Entry {
            status: again,
            callback: None,
            ..
        } => assert_eq!(again.fid, status.fid),
        other => panic!("the retried create answered {other:?}"),
    }
    let new_file = client.call(sequenced_create(2, "g")).await.unwrap();
    assert!(matches!(
        new_file,
        Response::Entry {
            callback: Some(_),
            ..
        }
    ));
    assert!(
        history(&passive.history)
            .iter()
            .any(|l| l.3 == "Create" && l.1 == epoch.0 + 1)
    );

    drop(client);
    a.stop().await;
    b.stop().await;
    vldb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pair_switchover__moves_a_held_lock_without_grace() {
    let vldb = Vldb::start().await;
    let partition = tempfile::tempdir().unwrap();
    let histories = tempfile::tempdir().unwrap();
    let a = Member::start(partition.path(), &vldb.address, histories.path().join("a")).await;
    let b = Member::start(partition.path(), &vldb.address, histories.path().join("b")).await;
    let (active, passive) = await_active(&a, &b).await;
    let epoch = active.state().await.epoch;
    create_volume(&active.address).await;

    let log: Log = Arc::default();
    let owner_id = ClientId::random();
    let owner = FakeClient::connect(&active.address, "O", owner_id, InstanceNonce(1), &log).await;
    let file = common::create_file(&owner, "locked").await;
    let lock = |owner: u64| Request::SetLock {
        fid: file,
        owner: LockOwnerId(owner),
        range: ByteRange::whole(),
        kind: LockKind::Exclusive,
        wait: false,
        pid: 1,
    };
    assert_eq!(owner.call(lock(1)).await.unwrap(), Response::Ok);

    let switched = admin(&active.address)
        .await
        .call(Request::PairSwitchover, Duration::from_secs(20))
        .await;
    assert_eq!(switched.unwrap(), Response::Ok);
    let state = await_role(passive, MemberRole::Active, epoch).await;
    assert_eq!(state.grace, None, "a clean handover runs no grace");
    assert_eq!(active.state().await.role, MemberRole::Passive);

    // Another client's conflicting lock is refused as a conflict, not told to wait.
    let other = FakeClient::fresh(&passive.address, "X", &log).await;
    match other.call(lock(7)).await {
        Err(ProtoError::Remote(ErrorCode::WouldBlock)) => {}
        reply => panic!("a conflicting lock got {reply:?}"),
    }
    // The owner, reconnecting, reclaims what it holds.
    let owner = FakeClient::connect(&passive.address, "O", owner_id, InstanceNonce(1), &log).await;
    let reclaimed = owner
        .call(Request::ReclaimLock {
            fid: file,
            owner: LockOwnerId(1),
            range: ByteRange::whole(),
            kind: LockKind::Exclusive,
            pid: 1,
        })
        .await;
    assert_eq!(reclaimed.unwrap(), Response::Ok);

    drop((owner, other));
    a.stop().await;
    b.stop().await;
    vldb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_single_servers_cannot_share_a_partition() {
    let dir = tempfile::tempdir().unwrap();
    let first = common::Server::start(dir.path(), |_| {}).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cell = CellConfig {
        name: CELL.into(),
        vlservers: vec![],
        credentials: None,
    };
    let config = Config::new(
        dir.path().to_owned(),
        cell,
        common::transport(PeerClass::Server),
        vec![],
    );
    let (_stop, shutdown) = watch::channel(false);
    // Serving means the first holds the partition's lock.
    let pong = admin(&first.address)
        .await
        .call(Request::Ping, TIMEOUT)
        .await;
    assert_eq!(pong.unwrap(), Response::Pong);
    match admin(&first.address)
        .await
        .call(Request::MemberState, TIMEOUT)
        .await
    {
        Ok(Response::MemberState(state)) => {
            assert_eq!(
                (state.role, state.pair, state.grace),
                (MemberRole::Single, None, None)
            )
        }
        other => panic!("MemberState answered {other:?}"),
    }
    let second = tokio::time::timeout(TIMEOUT, fileserver::run(config, listener, shutdown));
    let refused = second
        .await
        .expect("the second server started")
        .unwrap_err();
    assert!(
        refused.to_string().contains("in use by another fileserver"),
        "{refused}"
    );
    first.stop().await;
}
