//! `VldbClient` against fake VLDB replicas on loopback: it finds the leader through dead
//! addresses and `NotLeader` hints, follows it when it moves, gives up at its deadline,
//! and resends after a transport failure only what is safe to resend.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::Identity;
use proto::rpc::{self, Connection};
use proto::server::{ServerLimits, Service, serve};
use proto::tls::authority::test_transport;
use proto::*;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

const CELL: &str = "test.cell";
/// Long enough for any loopback exchange; a test that reaches it has failed anyway.
const TIMEOUT: Duration = Duration::from_secs(10);

/// What a fake replica does with a request.
#[derive(Clone, Debug)]
enum Behaviour {
    /// Answers everything, naming itself.
    Leader,
    /// Answers `VlStatus`, and `NotLeader` with this hint to everything else.
    Follower(Option<String>),
    /// Closes the connection without answering: the request may or may not have
    /// been applied, as far as the client can tell.
    Vanish,
}

struct FakeReplica {
    id: u64,
    address: String,
    behaviour: Mutex<Behaviour>,
    requests: AtomicUsize,
}

impl FakeReplica {
    fn set(&self, behaviour: Behaviour) {
        *self.behaviour.lock().unwrap() = behaviour;
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    fn status(&self, behaviour: &Behaviour) -> VldbMemberStatus {
        let (role, leader) = match behaviour {
            Behaviour::Leader => (VldbRole::Leader, Some((self.id, self.address.clone()))),
            Behaviour::Follower(hint) => (VldbRole::Follower, hint.clone().map(|a| (0, a))),
            Behaviour::Vanish => (VldbRole::Shutdown, None),
        };
        VldbMemberStatus {
            id: self.id,
            address: self.address.clone(),
            role,
            term: 1,
            last_log_index: Some(1),
            applied_index: Some(1),
            leader,
            members: Vec::new(),
        }
    }
}

impl Service for FakeReplica {
    fn hello(&self, hello: &Hello) -> Result<HelloReply, ErrorCode> {
        Ok(HelloReply {
            version: rpc::negotiate(hello, CELL)?,
            server: None,
        })
    }

    async fn handle(
        self: Arc<Self>,
        connection: Connection,
        _hello: Arc<Hello>,
        _caller: Arc<Identity>,
        request: Request,
    ) -> Result<Response, ErrorCode> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let behaviour = self.behaviour.lock().unwrap().clone();
        match (behaviour, request) {
            (behaviour, Request::VlStatus) => Ok(Response::VlStatus(self.status(&behaviour))),
            (Behaviour::Leader, Request::VlAddMember { .. } | Request::VlRemoveMember { .. }) => {
                Ok(Response::Ok)
            }
            (Behaviour::Leader, _) => Ok(answered_by(self.id)),
            (Behaviour::Follower(leader), _) => Err(ErrorCode::NotLeader { leader }),
            (Behaviour::Vanish, _) => {
                connection.close();
                // Never answer; the server aborts this at its shutdown deadline.
                std::future::pending().await
            }
        }
    }
}

fn answered_by(id: u64) -> Response {
    Response::Counters(vec![("answered by".into(), id)])
}

/// Fake replicas serving until `stop`.
struct FakeCell {
    replicas: Vec<Arc<FakeReplica>>,
    stop: watch::Sender<bool>,
    servers: Vec<JoinHandle<()>>,
}

impl FakeCell {
    async fn start(behaviours: Vec<Behaviour>) -> FakeCell {
        let (stop, stop_rx) = watch::channel(false);
        let mut replicas = Vec::new();
        let mut servers = Vec::new();
        for (index, behaviour) in behaviours.into_iter().enumerate() {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let replica = Arc::new(FakeReplica {
                id: index as u64 + 1,
                address: listener.local_addr().unwrap().to_string(),
                behaviour: Mutex::new(behaviour),
                requests: AtomicUsize::new(0),
            });
            let limits = ServerLimits {
                shutdown_deadline: Duration::from_millis(100),
                ..ServerLimits::default()
            };
            servers.push(tokio::spawn(serve(
                listener,
                replica.clone(),
                limits,
                test_transport(PeerClass::Server).unwrap(),
                stop_rx.clone(),
            )));
            replicas.push(replica);
        }
        FakeCell {
            replicas,
            stop,
            servers,
        }
    }

    fn address(&self, index: usize) -> String {
        self.replicas[index].address.clone()
    }

    async fn stop(self) {
        self.stop.send_replace(true);
        for server in self.servers {
            server.await.unwrap();
        }
    }
}

/// An address nothing listens on: a port bound, then closed.
async fn dead_address() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().to_string()
}

fn client(addresses: Vec<String>, timeout: Duration) -> VldbClient {
    let cell = CellConfig {
        name: CELL.into(),
        vlservers: addresses,
        credentials: None,
    };
    VldbClient::new(
        cell,
        test_transport(PeerClass::Host).unwrap(),
        PeerKind::Admin,
        timeout,
    )
}

fn create_entry() -> Request {
    Request::VlCreateEntry {
        name: VolumeName::parse("home.alice").unwrap(),
        server: ServerId::random(),
    }
}

#[tokio::test]
async fn reaches_the_leader_past_a_dead_replica_and_a_follower() {
    let cell = FakeCell::start(vec![Behaviour::Leader, Behaviour::Leader]).await;
    let (leader, follower) = (&cell.replicas[0], &cell.replicas[1]);
    follower.set(Behaviour::Follower(Some(leader.address.clone())));
    let vldb = client(
        vec![dead_address().await, cell.address(1), cell.address(0)],
        TIMEOUT,
    );

    let answer = vldb.call(create_entry()).await.unwrap();
    assert_eq!(answer, answered_by(leader.id));
    assert_eq!(follower.requests(), 1, "the follower pointed at the leader");

    // The leader's connection is kept: later calls, writes or not, go straight to it.
    vldb.add_member(4, "127.0.0.1:1").await.unwrap();
    vldb.remove_member(3).await.unwrap();
    assert_eq!(vldb.status().await.unwrap().id, leader.id);
    assert_eq!(follower.requests(), 1);
    assert_eq!(leader.requests(), 4);
    cell.stop().await;
}

#[tokio::test]
async fn follows_the_leader_when_it_moves() {
    let cell = FakeCell::start(vec![Behaviour::Leader, Behaviour::Leader]).await;
    let (first, second) = (&cell.replicas[0], &cell.replicas[1]);
    second.set(Behaviour::Follower(Some(first.address.clone())));
    let vldb = client(vec![cell.address(1), cell.address(0)], TIMEOUT);
    assert_eq!(
        vldb.call(create_entry()).await.unwrap(),
        answered_by(first.id)
    );

    // The old leader now points at the new one, on the connection the client kept.
    first.set(Behaviour::Follower(Some(second.address.clone())));
    second.set(Behaviour::Leader);
    assert_eq!(
        vldb.call(create_entry()).await.unwrap(),
        answered_by(second.id)
    );
    assert_eq!(first.requests(), 2);

    let second_requests = second.requests();
    assert_eq!(
        vldb.call(create_entry()).await.unwrap(),
        answered_by(second.id)
    );
    assert_eq!(first.requests(), 2, "the new leader's connection is kept");
    assert_eq!(second.requests(), second_requests + 1);
    cell.stop().await;
}

#[tokio::test]
async fn no_leader_anywhere_fails_at_the_deadline_with_not_leader() {
    let no_leader = || Behaviour::Follower(None);
    let cell = FakeCell::start(vec![no_leader(), no_leader(), no_leader()]).await;
    // Long enough for three TLS handshakes and a round on a loaded two-core machine (a
    // debug build under the whole suite): the deadline must end a call that kept
    // trying, not one still dialling.
    let timeout = Duration::from_secs(2);
    let vldb = client((0..3).map(|i| cell.address(i)).collect(), timeout);

    // The outer bound only turns a hang into a failure; it says nothing about speed.
    let outcome = tokio::time::timeout(TIMEOUT, vldb.call(create_entry()))
        .await
        .expect("the call returned");
    let error = outcome.unwrap_err();
    assert_eq!(error.remote(), Some(&ErrorCode::NotLeader { leader: None }));

    // Every replica was tried, and the backoff after each round (at least 20 ms, the
    // last one cut at the deadline) bounds the attempts: no busy loop.
    let requests: Vec<usize> = cell.replicas.iter().map(|r| r.requests()).collect();
    assert!(requests.iter().all(|&n| n >= 1), "{requests:?}");
    let rounds_max = 1 + timeout.as_millis() as usize / 20;
    assert!(
        requests.iter().sum::<usize>() <= 3 * rounds_max,
        "{requests:?}"
    );
    cell.stop().await;
}

#[tokio::test]
async fn unsafe_request_is_not_resent_after_a_transport_failure() {
    let cell = FakeCell::start(vec![Behaviour::Vanish, Behaviour::Leader]).await;
    let (vanishing, leader) = (&cell.replicas[0], &cell.replicas[1]);
    let addresses = vec![cell.address(0), cell.address(1)];

    // The vanishing replica is tried first; the leader would have answered.
    let error = client(addresses.clone(), TIMEOUT)
        .call(create_entry())
        .await
        .unwrap_err();
    assert!(error.is_transport(), "{error}");
    let acquire = Request::VlAcquirePair {
        pair: PairName::parse("pair.a").unwrap(),
        member: "127.0.0.1:1".into(),
        epoch: Epoch(0),
        lease_ms: 1000,
    };
    let error = client(addresses.clone(), TIMEOUT)
        .call(acquire)
        .await
        .unwrap_err();
    assert!(error.is_transport(), "{error}");
    assert_eq!(vanishing.requests(), 2);
    assert_eq!(leader.requests(), 0);

    // Safe requests go again, to the next replica.
    let renew = Request::VlRenewPair {
        pair: PairName::parse("pair.a").unwrap(),
        member: "127.0.0.1:1".into(),
        epoch: Epoch(1),
        lease_ms: 1000,
    };
    for request in [Request::VlListEntries, renew] {
        let answer = client(addresses.clone(), TIMEOUT)
            .call(request)
            .await
            .unwrap();
        assert_eq!(answer, answered_by(leader.id));
    }
    assert_eq!(vanishing.requests(), 4);
    assert_eq!(leader.requests(), 2);
    cell.stop().await;
}

#[tokio::test]
async fn replica_status_asks_that_replica_only() {
    let cell = FakeCell::start(vec![Behaviour::Leader, Behaviour::Leader]).await;
    let (leader, follower) = (&cell.replicas[0], &cell.replicas[1]);
    follower.set(Behaviour::Follower(Some(leader.address.clone())));
    let vldb = client(vec![cell.address(0), cell.address(1)], TIMEOUT);

    let status = vldb.replica_status(&follower.address).await.unwrap();
    assert_eq!(status.id, follower.id);
    assert_eq!(status.role, VldbRole::Follower);
    assert_eq!(leader.requests(), 0);

    let dead = dead_address().await;
    let error = vldb.replica_status(&dead).await.unwrap_err();
    assert!(error.is_transport(), "{error}");
    assert!(error.to_string().contains(&dead), "{error}");
    cell.stop().await;
}

#[test]
fn resend_safety_of_the_vldb_requests() {
    let pair = PairName::parse("pair.a").unwrap();
    let safe = [
        Request::Ping,
        Request::VlStatus,
        Request::VlListEntries,
        Request::VlListServers,
        Request::VlGetEntry {
            volume: VolumeRef::Id(VolumeId(1)),
        },
        Request::VlGetPair { pair: pair.clone() },
        Request::VlRegisterServer {
            server: ServerId::random(),
            addresses: vec![],
        },
        Request::VlJoinPair {
            pair: pair.clone(),
            server: ServerId::random(),
            member: "m".into(),
        },
        Request::VlRenewPair {
            pair: pair.clone(),
            member: "m".into(),
            epoch: Epoch(1),
            lease_ms: 1,
        },
    ];
    let unsafe_ = [
        create_entry(),
        Request::VlRemoveEntry {
            volume: VolumeRef::Id(VolumeId(1)),
        },
        Request::VlAcquirePair {
            pair: pair.clone(),
            member: "m".into(),
            epoch: Epoch(1),
            lease_ms: 1,
        },
        Request::VlReleasePair {
            pair,
            member: "m".into(),
            epoch: Epoch(1),
            successor: None,
        },
        Request::VlAddMember {
            id: 4,
            address: "a".into(),
        },
        Request::VlRemoveMember { id: 4 },
    ];
    assert!(safe.iter().all(Request::safe_to_resend));
    assert!(!unsafe_.iter().any(Request::safe_to_resend));
}

#[tokio::test]
async fn follows_a_hint_to_a_leader_the_cell_file_does_not_list() {
    // A replica added after the cell file was written is found through the others.
    let cell = FakeCell::start(vec![Behaviour::Leader, Behaviour::Leader]).await;
    let (leader, follower) = (&cell.replicas[0], &cell.replicas[1]);
    follower.set(Behaviour::Follower(Some(leader.address.clone())));
    let vldb = client(vec![cell.address(1)], TIMEOUT);
    assert_eq!(
        vldb.call(create_entry()).await.unwrap(),
        answered_by(leader.id)
    );
    cell.stop().await;
}
