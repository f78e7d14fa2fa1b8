//! A randomized lock workload of fake cache managers across fileserver restarts, checked
//! from a recorded history: no two owners ever hold overlapping ranges of one fid with at
//! least one of them exclusive.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{EOF, Server, TIMEOUT, cache_manager, hello, wire_range};
use parking_lot::Mutex;
use proto::rpc::{self, Connection, Limits};
use proto::{
    ByteRange, ClientId, ErrorCode, Fid, InstanceNonce, LockKind, LockOwnerId, ProtoError, Request,
    Response, WaitId,
};
use tokio::sync::{oneshot, watch};

const CLIENTS: usize = 4;
const OWNERS: u64 = 3;
const FIDS: u64 = 3;
/// Ranges start below this (or run to `EOF`), so owners collide often.
const SPAN: u64 = 16;
const ROUNDS: usize = 6;
/// Steps of each owner per round.
const STEPS: usize = 40;
/// The longest back-off taken on a `Grace` answer: grace ends early here, once every
/// client sent `ReclaimDone`, so the server's (longer) hint would only slow the test.
const GRACE_RETRY_MAX: Duration = Duration::from_millis(20);

fn fid(index: u64) -> Fid {
    common::fid(10 + index)
}

/// xorshift64*: the test's only source of choices, so a seed replays them.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // Never zero: xorshift would stay there.
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The run's seed, from `HOLDFAST_SEED` or the clock. It replays the run's choices, not
/// its interleaving.
fn seed() -> u64 {
    match std::env::var("HOLDFAST_SEED") {
        Ok(text) => text.parse().expect("HOLDFAST_SEED must be a u64"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    }
}

/// One lock as an owner holds it: `[start, end)` of a fid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Held {
    start: u64,
    end: u64,
    kind: LockKind,
}

impl Held {
    fn conflicts(&self, other: &Held) -> bool {
        let overlap = self.start < other.end && other.start < self.end;
        overlap && (self.kind == LockKind::Exclusive || other.kind == LockKind::Exclusive)
    }
}

/// (client index, owner).
type OwnerKey = (usize, u64);

#[derive(Clone)]
enum Event {
    Granted {
        owner: OwnerKey,
        fid: u64,
        held: Held,
        how: &'static str,
    },
    Released {
        owner: OwnerKey,
        fid: u64,
        why: &'static str,
    },
    /// Held before the restart and reclaimed after it.
    Reclaimed {
        owner: OwnerKey,
        fid: u64,
    },
    Restarted {
        round: usize,
    },
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Event::Granted {
                owner: (client, owner),
                fid,
                held,
                how,
            } => {
                let Held { start, end, kind } = held;
                write!(
                    f,
                    "client {client} owner {owner} granted fid {fid} [{start}, {end}) {kind:?} by {how}"
                )
            }
            Event::Released {
                owner: (client, owner),
                fid,
                why,
            } => write!(f, "client {client} owner {owner} released fid {fid}: {why}"),
            Event::Reclaimed {
                owner: (client, owner),
                fid,
            } => write!(f, "client {client} owner {owner} reclaimed fid {fid}"),
            Event::Restarted { round } => write!(f, "server started for round {round}"),
        }
    }
}

/// The history, in one global order: its index is the sequence number. A grant is
/// recorded only after the client learned of it (the server decided before) and a release
/// before it is sent, so every recorded holding lies within a true one: a conflict in the
/// history is a real conflict.
#[derive(Default)]
struct History {
    events: Mutex<Vec<Event>>,
    /// `Grace` answers seen: new locks asked for while others still reclaimed.
    grace_answers: AtomicUsize,
}

impl History {
    fn record(&self, event: Event) {
        self.events.lock().push(event);
    }

    fn count_since(&self, mark: usize, wanted: impl Fn(&Event) -> bool) -> usize {
        self.events.lock()[mark..]
            .iter()
            .filter(|e| wanted(e))
            .count()
    }

    fn len(&self) -> usize {
        self.events.lock().len()
    }
}

/// Replays `history`; the first conflict, or the first event the model cannot explain.
fn check(history: &[Event]) -> Result<HashMap<(OwnerKey, u64), Held>, String> {
    let mut holding: HashMap<(OwnerKey, u64), Held> = HashMap::new();
    for (seq, event) in history.iter().enumerate() {
        match event {
            Event::Granted {
                owner, fid, held, ..
            } => {
                if holding.contains_key(&(*owner, *fid)) {
                    return Err(format!("#{seq} {event:?}: granted twice without release"));
                }
                let conflict = holding
                    .iter()
                    .find(|((other, f), h)| other != owner && f == fid && h.conflicts(held));
                if let Some(((other, _), h)) = conflict {
                    return Err(format!(
                        "#{seq} {event:?} conflicts with {other:?} holding {h:?}"
                    ));
                }
                holding.insert((*owner, *fid), *held);
            }
            Event::Released { owner, fid, .. } => {
                if holding.remove(&(*owner, *fid)).is_none() {
                    return Err(format!("#{seq} {event:?}: released what it did not hold"));
                }
            }
            Event::Reclaimed { owner, fid } => {
                if !holding.contains_key(&(*owner, *fid)) {
                    return Err(format!("#{seq} {event:?}: reclaimed what it did not hold"));
                }
            }
            Event::Restarted { .. } => {}
        }
    }
    Ok(holding)
}

async fn start(partition: &Path) -> Server {
    Server::start(partition, |config| {
        // Grace ends early once every client reclaimed; this only bounds a stuck run.
        config.grace = Duration::from_secs(5);
        // A slow acknowledgement on a loaded machine must not take a known grant back.
        config.break_timeout = TIMEOUT;
    })
    .await
}

/// Where a queued request's `LockGranted` push stands.
enum Slot {
    Arrived,
    Waiting(oneshot::Sender<()>),
}

/// A fake cache manager: acknowledges every push and hands `LockGranted` to its waiter.
struct Client {
    index: usize,
    connection: Connection,
    grants: Arc<Mutex<HashMap<WaitId, Slot>>>,
}

impl Client {
    async fn connect(address: &str, index: usize, id: ClientId) -> Client {
        let grants: Arc<Mutex<HashMap<WaitId, Slot>>> = Arc::default();
        let slots = grants.clone();
        let on_push = move |body| {
            if let Request::LockGranted { wait, .. } = body {
                // The push may overtake the `LockQueued` reply that names the wait.
                let mut slots = slots.lock();
                match slots.remove(&wait) {
                    Some(Slot::Waiting(waiter)) => {
                        let _ = waiter.send(());
                    }
                    _ => {
                        slots.insert(wait, Slot::Arrived);
                    }
                }
            }
        };
        // The same instance across server restarts: its locks stay reclaimable.
        let peer = cache_manager(id, InstanceNonce(1));
        let connection = common::connect(address, peer, on_push).await;
        Client {
            index,
            connection,
            grants,
        }
    }

    async fn call(&self, request: Request) -> Result<Response, ProtoError> {
        self.connection.call(request, TIMEOUT).await
    }

    /// Waits for the push granting `wait`; `false` when the connection went first.
    async fn granted(&self, wait: WaitId) -> bool {
        let receiver = {
            let mut slots = self.grants.lock();
            if let Some(Slot::Arrived) = slots.remove(&wait) {
                return true;
            }
            let (sender, receiver) = oneshot::channel();
            slots.insert(wait, Slot::Waiting(sender));
            receiver
        };
        tokio::select! {
            biased;
            granted = receiver => granted.is_ok(),
            _ = self.connection.closed() => false,
            _ = tokio::time::sleep(TIMEOUT) => panic!(
                "client {} wait {wait}: queued request never granted", self.index
            ),
        }
    }
}

/// How far a round got, for the decision when to restart.
#[derive(Default)]
struct Progress {
    steps: usize,
    /// Owners waiting for a grant or done with their steps.
    parked: usize,
    /// `Grace` answers this round.
    graced: usize,
}

/// What one owner carries from round to round.
struct OwnerState {
    owner: u64,
    held: HashMap<u64, Held>,
    rng: Rng,
}

struct Round {
    history: Arc<History>,
    progress: watch::Sender<Progress>,
    /// Set before the server is told to stop: errors after it are the stop's.
    stopping: AtomicBool,
    /// The last round: owners release everything at the end instead of waiting.
    last: bool,
}

impl Round {
    fn park(&self, by: isize) {
        self.progress
            .send_modify(|p| p.parked = p.parked.saturating_add_signed(by));
    }

    /// An answer the workload does not expect: a failure, unless the connection broke
    /// or the server is stopping (then the round is over).
    fn unexpected(&self, what: &str, reply: Result<Response, ProtoError>) {
        let over = match &reply {
            Err(ProtoError::Remote(_)) => self.stopping.load(Ordering::SeqCst),
            Err(e) => e.is_transport() || self.stopping.load(Ordering::SeqCst),
            Ok(_) => false,
        };
        assert!(over, "{what}: unexpected {reply:?}");
    }

    async fn release(&self, client: &Client, state: &mut OwnerState, fid: u64, why: &'static str) {
        state.held.remove(&fid);
        // Recorded before it is sent: the server may release it only later.
        self.history.record(Event::Released {
            owner: (client.index, state.owner),
            fid,
            why,
        });
        let reply = client
            .call(Request::ReleaseLock {
                fid: self::fid(fid),
                owner: LockOwnerId(state.owner),
                range: ByteRange::whole(),
            })
            .await;
        if !matches!(reply, Ok(Response::Ok)) {
            self.unexpected("ReleaseLock", reply);
        }
    }

    /// Asks for a lock on `fid`; `false` when the round is over (the server stopped).
    async fn acquire(&self, client: &Client, state: &mut OwnerState, fid: u64) -> bool {
        let rng = &mut state.rng;
        let start = rng.below(SPAN);
        let end = if rng.below(8) == 0 {
            EOF
        } else {
            start + 1 + rng.below(4)
        };
        let kind = if rng.below(2) == 0 {
            LockKind::Shared
        } else {
            LockKind::Exclusive
        };
        // Only an owner holding nothing blocks, so no wait-for cycle can form.
        let wait = state.held.is_empty() && rng.below(2) == 0;
        let held = Held { start, end, kind };
        let owner = (client.index, state.owner);
        let request = Request::SetLock {
            fid: self::fid(fid),
            owner: LockOwnerId(state.owner),
            range: wire_range(start, end),
            kind,
            wait,
            pid: 1000 + state.owner as u32,
        };
        loop {
            let how = match client.call(request.clone()).await {
                Ok(Response::Ok) => "reply",
                Ok(Response::LockQueued { wait }) => {
                    self.park(1);
                    let granted = client.granted(wait).await;
                    self.park(-1);
                    if !granted {
                        return false;
                    }
                    "push"
                }
                Err(ProtoError::Remote(ErrorCode::WouldBlock)) => return true,
                Err(ProtoError::Remote(ErrorCode::Grace { retry_ms })) => {
                    self.history.grace_answers.fetch_add(1, Ordering::Relaxed);
                    self.progress.send_modify(|p| p.graced += 1);
                    // The protocol's own back-off.
                    tokio::time::sleep(Duration::from_millis(retry_ms).min(GRACE_RETRY_MAX)).await;
                    continue;
                }
                reply => {
                    self.unexpected("SetLock", reply);
                    return false;
                }
            };
            self.history.record(Event::Granted {
                owner,
                fid,
                held,
                how,
            });
            state.held.insert(fid, held);
            return true;
        }
    }

    async fn run_owner(&self, client: &Client, mut state: OwnerState) -> OwnerState {
        for _ in 0..STEPS {
            let fid = state.rng.below(FIDS);
            if state.held.contains_key(&fid) {
                self.release(client, &mut state, fid, "release").await;
                if client.connection.is_closed() {
                    return state;
                }
            } else if !self.acquire(client, &mut state, fid).await {
                return state;
            }
            self.progress.send_modify(|p| p.steps += 1);
        }
        if self.last {
            let fids: Vec<u64> = state.held.keys().copied().collect();
            for fid in fids {
                self.release(client, &mut state, fid, "final release").await;
            }
        } else {
            // Keep what it holds into the restart; reclaim brings it back.
            self.park(1);
            client.connection.closed().await;
        }
        state
    }
}

/// Reclaims every lock the client's owners hold; one not reclaimable is gone since the
/// restart. Runs for every client before any of them takes a new lock.
async fn reclaim(client: &Client, owners: &mut [OwnerState], history: &History) {
    for state in owners {
        let mut fids: Vec<u64> = state.held.keys().copied().collect();
        fids.sort_unstable();
        for fid in fids {
            let held = state.held[&fid];
            let reply = client
                .call(Request::ReclaimLock {
                    fid: self::fid(fid),
                    owner: LockOwnerId(state.owner),
                    range: wire_range(held.start, held.end),
                    kind: held.kind,
                    pid: 1000 + state.owner as u32,
                })
                .await;
            match reply {
                Ok(Response::Ok) => history.record(Event::Reclaimed {
                    owner: (client.index, state.owner),
                    fid,
                }),
                Err(ProtoError::Remote(ErrorCode::NotReclaimable)) => {
                    state.held.remove(&fid);
                    history.record(Event::Released {
                        owner: (client.index, state.owner),
                        fid,
                        why: "not reclaimable after restart",
                    });
                }
                other => panic!("ReclaimLock: unexpected {other:?}"),
            }
        }
    }
}

/// Several fake cache managers, each with several lock owners, take and release shared and
/// exclusive byte-range locks on a few fids, blocking or not, while the server is stopped
/// and started again on the same partition between rounds; after each restart the clients
/// reconnect as the same instance and reclaim what they hold. The seed is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_locking_across_restarts_never_grants_conflicting_locks() {
    let seed = seed();
    // Shown with the output of a failing run.
    println!("lock_history seed: {seed} (replay with HOLDFAST_SEED={seed})");
    let mut rng = Rng::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let history = Arc::new(History::default());
    let ids: Vec<ClientId> = (0..CLIENTS).map(|_| ClientId::random()).collect();
    let mut owners: Vec<Vec<OwnerState>> = (0..CLIENTS)
        .map(|c| {
            (1..=OWNERS)
                .map(|owner| OwnerState {
                    owner,
                    held: HashMap::new(),
                    rng: Rng::new(rng.next() ^ (c as u64) << 8 ^ owner),
                })
                .collect()
        })
        .collect();
    let total_steps = CLIENTS * OWNERS as usize * STEPS;

    for round in 0..ROUNDS {
        let server = start(dir.path()).await;
        history.record(Event::Restarted { round });
        let mark = history.len();
        let mut clients = Vec::new();
        for (index, id) in ids.iter().enumerate() {
            let client = Client::connect(&server.address, index, *id).await;
            reclaim(&client, &mut owners[index], &history).await;
            clients.push(Arc::new(client));
        }
        let last = round + 1 == ROUNDS;
        let state = Arc::new(Round {
            history: history.clone(),
            progress: watch::Sender::new(Progress::default()),
            stopping: AtomicBool::new(false),
            last,
        });
        let mut progress = state.progress.subscribe();
        // One client reports done late, so the others' new locks meet grace.
        let late = rng.below(CLIENTS as u64) as usize;
        let others = (CLIENTS - 1) * OWNERS as usize;
        let mut tasks = Vec::new();
        for (client, states) in clients.iter().zip(owners.iter_mut()) {
            let (client, states, state) = (client.clone(), std::mem::take(states), state.clone());
            let mut progress = state.progress.subscribe();
            tasks.push(tokio::spawn(async move {
                if client.index == late {
                    let others_went_on =
                        |p: &Progress| p.steps + p.graced >= 12 || p.parked == others;
                    progress.wait_for(others_went_on).await.unwrap();
                }
                // Each client starts as soon as it is done; others may still be in grace.
                let reply = client.call(Request::ReclaimDone).await;
                assert_eq!(reply.unwrap(), Response::Ok);
                let runs: Vec<_> = states
                    .into_iter()
                    .map(|owner| {
                        let (client, state) = (client.clone(), state.clone());
                        tokio::spawn(async move { state.run_owner(&client, owner).await })
                    })
                    .collect();
                let mut states = Vec::new();
                for run in runs {
                    states.push(run.await.unwrap());
                }
                states
            }));
        }
        if !last {
            // Restart somewhere in the middle of the workload, with requests in flight.
            let stop_at = total_steps / 5 + rng.below(total_steps as u64 * 3 / 10) as usize;
            let owner_count = CLIENTS * OWNERS as usize;
            tokio::time::timeout(
                Duration::from_secs(30),
                progress.wait_for(|p| p.steps >= stop_at || p.parked == owner_count),
            )
            .await
            .expect("the round made no progress")
            .unwrap();
            state.stopping.store(true, Ordering::SeqCst);
            server.stop().await;
            for (index, task) in tasks.into_iter().enumerate() {
                owners[index] = task.await.unwrap();
            }
        } else {
            for (index, task) in tasks.into_iter().enumerate() {
                owners[index] = task.await.unwrap();
            }
            // Everyone released everything: the server holds no lock on any fid.
            for f in 0..FIDS {
                let reply = clients[0]
                    .call(Request::TestLock {
                        fid: fid(f),
                        owner: LockOwnerId(99),
                        range: ByteRange::whole(),
                        kind: LockKind::Exclusive,
                    })
                    .await;
                assert_eq!(
                    reply.unwrap(),
                    Response::LockTest { holder: None },
                    "seed {seed}: a lock survived its release on fid {f}"
                );
            }
            server.stop().await;
        }
        let grants = history.count_since(mark, |e| matches!(e, Event::Granted { .. }));
        assert!(grants > 0, "seed {seed}: round {round} granted nothing");
        println!("round {round}: {grants} grants");
    }

    // Not vacuous: blocking grants, reclaims and collisions with grace all happened.
    let pushed = history.count_since(0, |e| matches!(e, Event::Granted { how: "push", .. }));
    let reclaimed = history.count_since(0, |e| matches!(e, Event::Reclaimed { .. }));
    let lost = history.count_since(
        0,
        |e| matches!(e, Event::Released { why, .. } if why.starts_with("not reclaimable")),
    );
    let grace_answers = history.grace_answers.load(Ordering::Relaxed);
    println!(
        "{pushed} grants pushed, {reclaimed} locks reclaimed, {lost} not reclaimable, \
         {grace_answers} grace answers"
    );
    assert!(
        pushed > 0 && reclaimed > 0,
        "seed {seed}: too little happened"
    );

    let events = history.events.lock().clone();
    match check(&events) {
        Ok(holding) => assert!(holding.is_empty(), "seed {seed}: still held {holding:?}"),
        Err(violation) => {
            let lines: Vec<String> = events
                .iter()
                .enumerate()
                .map(|(seq, event)| format!("#{seq} {event:?}"))
                .collect();
            panic!("seed {seed}: {violation}\nhistory:\n{}", lines.join("\n"));
        }
    }
}

#[test]
fn the_checker_finds_conflicts_and_allows_shared_overlap() {
    let held = |start, end, kind| Held { start, end, kind };
    let granted = |client, fid, held| Event::Granted {
        owner: (client, 1),
        fid,
        held,
        how: "reply",
    };
    let shared = vec![
        granted(0, 0, held(0, 10, LockKind::Shared)),
        granted(1, 0, held(5, 15, LockKind::Shared)),
        // Another fid, or adjacent bytes: no conflict.
        granted(2, 1, held(0, EOF, LockKind::Exclusive)),
        granted(3, 0, held(15, 20, LockKind::Exclusive)),
    ];
    assert!(check(&shared).is_ok());
    let mut conflicting = shared.clone();
    conflicting.push(granted(2, 0, held(9, 10, LockKind::Exclusive)));
    assert!(check(&conflicting).unwrap_err().starts_with("#4 "));
    // Released first, it is fine.
    let mut sequential = shared;
    sequential.insert(
        4,
        Event::Released {
            owner: (0, 1),
            fid: 0,
            why: "test",
        },
    );
    sequential.insert(
        5,
        Event::Released {
            owner: (1, 1),
            fid: 0,
            why: "test",
        },
    );
    sequential.push(granted(2, 0, held(9, 10, LockKind::Exclusive)));
    assert!(check(&sequential).is_ok());
    // A release of what is not held means the model lost track: reported too.
    sequential.push(Event::Released {
        owner: (0, 1),
        fid: 0,
        why: "test",
    });
    assert!(check(&sequential).is_err());
}

/// What the randomized test caught around restarts, made deterministic: a client that
/// received a `LockGranted` push but whose acknowledgement never reached the server (its
/// connection broke right after, as when the server shuts down with pushes in flight).
/// The client has learned it holds the lock, and its lease runs on, so the server must
/// not hand the range to another client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_its_client_received_is_not_given_to_another() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let a = Client::connect(&server.address, 0, ClientId::random()).await;
    let c = Client::connect(&server.address, 2, ClientId::random()).await;
    let set_lock = |wait| Request::SetLock {
        fid: fid(0),
        owner: LockOwnerId(1),
        range: wire_range(0, 10),
        kind: LockKind::Exclusive,
        wait,
        pid: 1001,
    };
    assert_eq!(a.call(set_lock(false)).await.unwrap(), Response::Ok);

    // Client B: takes in the push, then loses its connection before acknowledging.
    let peer = cache_manager(ClientId::random(), InstanceNonce(1));
    let (b, _, mut incoming) = rpc::connect(
        &server.address,
        hello(peer),
        &Limits::default(),
        &common::transport(proto::PeerClass::Host),
    )
    .await
    .unwrap();
    let (learned_tx, learned) = oneshot::channel();
    let broken = b.clone();
    tokio::spawn(async move {
        while let Some(request) = incoming.recv().await {
            let (body, _token, replier) = request.into_parts();
            if let Request::LockGranted { wait, .. } = body {
                // Learned, but the acknowledgement never leaves.
                broken.close();
                let _ = learned_tx.send(wait);
                return;
            }
            replier.reply(Ok(Response::Ok)).await;
        }
    });
    let reply = b.call(set_lock(true), TIMEOUT).await.unwrap();
    let Response::LockQueued { wait: b_wait } = reply else {
        panic!("expected LockQueued, got {reply:?}");
    };
    let reply = c.call(set_lock(true)).await.unwrap();
    let Response::LockQueued { wait: c_wait } = reply else {
        panic!("expected LockQueued, got {reply:?}");
    };
    let release = Request::ReleaseLock {
        fid: fid(0),
        owner: LockOwnerId(1),
        range: ByteRange::whole(),
    };
    assert_eq!(a.call(release).await.unwrap(), Response::Ok);
    let learned = tokio::time::timeout(TIMEOUT, learned)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(learned, b_wait);

    // B now holds [0, 10) exclusively as far as it knows, and its lease (30 s) runs on.
    // A bounded wait: the server's own reaction to the broken push takes milliseconds.
    let c_granted = tokio::time::timeout(Duration::from_secs(1), c.granted(c_wait)).await;
    assert!(
        c_granted.is_err(),
        "client C was granted the range client B was told it holds"
    );
    server.stop().await;
}
