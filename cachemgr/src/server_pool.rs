//! Connections to fileservers, one per server, opened on first use and after a failure,
//! and kept alive while the cache holds callbacks or locks there; each also carries the
//! server's breaks and lock grants to this client. A single server that let a call time
//! out is marked silent, and calls to it fail at once until it answers again.
//! Invariant: a connection is handed to callers only after the cache reclaimed what it
//! held there, and the cache hears of each lost connection once, before the next is made.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use proto::rpc::{self, Connection, IncomingRequest, Limits};
use proto::{
    ErrorCode, Fid, Hello, ProtoError, Request, Response, SealedToken, ServerId, Transport, WaitId,
};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::tokens::TokenStore;
use crate::volume::VolumeLocation;

/// First and longest pause between attempts on a pair's members: short, since a
/// passive member points at the active at once (an attempt costs a round trip) and a
/// takeover takes about a lease, one second by default.
const FAILOVER_BACKOFF_MIN: Duration = Duration::from_millis(50);
const FAILOVER_BACKOFF_MAX: Duration = Duration::from_millis(100);
/// Every member of a pair failing to connect this long sends the pool to the VLDB
/// for the server's current addresses, at most once per this long within one call.
const RELOCATE_AFTER: Duration = Duration::from_secs(1);
/// A connection this client holds callbacks or locks on gets a `Ping` once it has sent
/// nothing for this long, so a fileserver's idle timeout (120 s) never closes the path
/// its breaks and lock grants take; a connection holding nothing is left to close.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// A call to a single server marked silent gets this long to find it answering again
/// (the probe's connect in flight, or a short one of its own) instead of its timeout:
/// a handshake with a server that is back takes far less, and a stopped server costs
/// each call no more.
const SILENT_TRY: Duration = Duration::from_millis(200);
/// A silent mark lapses this long after the last timeout that confirmed it. The probe
/// confirms it every two seconds or so while the server stays silent; a mark nobody
/// confirms shortens no call for long.
const SILENCE_KEPT: Duration = Duration::from_secs(5);
/// The longest a probe of a server waits for its handshake and its ping.
pub const PROBE_TIMEOUT_MAX: Duration = Duration::from_secs(1);

/// A reclaim in progress, borrowing the sink and the new connection.
pub type ReclaimFuture<'a> = Pin<Box<dyn Future<Output = Result<(), ProtoError>> + Send + 'a>>;
/// A VLDB lookup of a server's addresses in progress.
pub type RelocateFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<String>, ProtoError>> + Send + 'a>>;

/// What the pool tells the cache about callbacks, lock grants and connections.
pub trait CallbackSink: Send + Sync + 'static {
    /// The server broke these callbacks; called before the break is acknowledged.
    fn break_callbacks(&self, fids: &[Fid]);
    /// The server asked to reset: every callback from `server` is void.
    fn reset_callbacks(&self, server: ServerId);
    /// The server granted the queued lock request `wait`; `true` acknowledges it.
    fn lock_granted(&self, server: ServerId, wait: WaitId, fid: Fid) -> bool;
    /// The connection to `server` ended: queued lock requests died with it, and breaks
    /// sent meanwhile are queued on the server until a new connection collects them.
    fn connection_lost(&self, server: ServerId);
    /// `server` let a call or a handshake time out and is marked silent: calls to it
    /// fail at once. Probe it (`ServerPool::probe`) with growing pauses until it answers,
    /// which ends the mark (`ServerPool::is_silent`).
    fn server_silent(&self, server: ServerId);
    /// Whether this client holds a callback or a lock on `server`, or awaits a lock
    /// there: then its connection is worth keeping alive.
    fn holds_promises(&self, server: ServerId) -> bool;
    /// A new connection to `server` is up: reclaim callbacks and locks over it before
    /// any other call uses it. Fails on a transport error, or with `NotActive` when the
    /// member reached is not the pair's active one.
    fn reclaim<'a>(
        &'a self,
        server: ServerId,
        connection: &'a Connection,
        timeout: Duration,
    ) -> ReclaimFuture<'a>;
    /// No member of `server` could be reached for a while: ask the VLDB for its
    /// current addresses (active first) and remember them for later calls.
    fn relocate(&self, server: ServerId) -> RelocateFuture<'_>;
}

/// Which member of a pair this client talks to.
#[derive(Debug, Default)]
struct Member {
    /// The address whose connection was handed out last.
    answered: Option<String>,
    /// The address to try first on the next connect: the one that answered, or the
    /// one a failure pointed at.
    try_first: Option<String>,
}

/// How one attempt on a pair ended, when it did not end the call.
enum Retry {
    /// Try the other member (or the same again, once it restarts).
    Next,
    /// A passive member named the active one.
    Hinted(String),
}

/// What a caller about to connect gets: a connection already live, or the gate.
enum LiveOrGate {
    Live(Connection),
    Gate(tokio::sync::OwnedMutexGuard<()>),
}

/// Who asks for a connection: a call to a server marked silent gets only a short try
/// at it, a probe its whole time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Purpose {
    Call,
    Probe,
}

/// One caller's connect: when it was asked for, how long it may wait at the gate and
/// for the handshake (`until`, or `deadline` once the server answers), and the timeout
/// its failure reports.
#[derive(Clone, Copy, Debug)]
struct Attempt {
    asked: Instant,
    until: Instant,
    deadline: Instant,
    timeout: Duration,
}

/// A single server's outage, as its failed connects and timed-out calls show it.
struct Down {
    since: Instant,
    last_failure: Instant,
    /// What the last connect or call failed with.
    error: ProtoError,
    /// While this lasts the server is silent and calls fail at once: a call or a
    /// handshake that had its time got no answer, and no probe got one since. `None`
    /// when it refuses instead, which costs a call nothing: then every call tries.
    silent_until: Option<Instant>,
}

/// What a failed connect or call says of a server's silence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Silence {
    /// A wait of at least half the pool's timeout went unanswered: marks it silent.
    Proven,
    /// A shorter wait (a probe's, or one cut short by an earlier wait): keeps a mark
    /// alive, makes none, so a short probe never fails calls that would have succeeded.
    Kept,
}

impl Silence {
    /// What a wait of `budget` proves against the pool's `rpc_timeout`.
    fn of(budget: Duration, rpc_timeout: Duration) -> Silence {
        if budget >= rpc_timeout / 2 {
            Silence::Proven
        } else {
            Silence::Kept
        }
    }
}

/// A copy of `error` for another caller (`ProtoError` holds an `io::Error`, which does
/// not clone): the same variant, an i/o error's kind and text.
fn copy_error(error: &ProtoError) -> ProtoError {
    match error {
        ProtoError::Io(e) => ProtoError::Io(std::io::Error::new(e.kind(), e.to_string())),
        ProtoError::Timeout(timeout) => ProtoError::Timeout(*timeout),
        ProtoError::Closed => ProtoError::Closed,
        ProtoError::Remote(code) => ProtoError::Remote(code.clone()),
        ProtoError::Tls(what) => ProtoError::Tls(what.clone()),
        other => ProtoError::Handshake(other.to_string()),
    }
}

pub struct ServerPool {
    /// Lets a connection's task report its end after the call that opened it returned.
    this: Weak<ServerPool>,
    hello: Hello,
    /// This host's TLS credentials.
    transport: Transport,
    rpc_timeout: Duration,
    failover_timeout: Duration,
    /// Live connections; short sections, never held across an `.await`.
    connections: Mutex<HashMap<ServerId, Connection>>,
    /// When a request was last sent to each server, for the keepalive. Bounded like
    /// `gates`, by the servers called.
    last_sent: Mutex<HashMap<ServerId, Instant>>,
    /// Single servers whose connects fail or that let a call time out: the outage is
    /// logged once at WARN, its end at INFO. Bounded by the servers called.
    down: Mutex<HashMap<ServerId, Down>>,
    /// One connect (and reclaim) at a time per server; callers wait here for it.
    gates: Mutex<HashMap<ServerId, Arc<tokio::sync::Mutex<()>>>>,
    /// Per server, the member in use. Bounded like `gates`, by the servers called.
    members: Mutex<HashMap<ServerId, Member>>,
    /// The `seq` of the next `Sequenced` request of this mount instance.
    next_seq: AtomicU64,
    sink: std::sync::OnceLock<Weak<dyn CallbackSink>>,
    /// The workstation's tokens: a call carries its caller's (`tokens::acting_for`).
    tokens: std::sync::OnceLock<Arc<TokenStore>>,
}

/// Renders a duration as an operator reads it: `2s`, `1500ms`.
pub fn human_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 && d.as_secs() > 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// One request as every attempt sends it, byte for byte, with its caller's token.
#[derive(Clone, Copy)]
struct Call<'a> {
    request: &'a Request,
    token: Option<&'a SealedToken>,
}

impl Call<'_> {
    async fn on(self, connection: &Connection, timeout: Duration) -> Result<Response, ProtoError> {
        connection
            .try_call_as(self.token, self.request, timeout)
            .await
            .unwrap_or(Err(ProtoError::Closed))
    }
}

/// Whether a failed attempt on a pair is worth another try, and where.
fn retry_of(error: &ProtoError, addresses: &[String]) -> Option<Retry> {
    match error {
        e if e.is_transport() => Some(Retry::Next),
        ProtoError::Remote(ErrorCode::NotActive { hint, .. }) => {
            Some(match hint.as_ref().filter(|h| addresses.contains(h)) {
                Some(hint) => Retry::Hinted(hint.clone()),
                None => Retry::Next,
            })
        }
        _ => None,
    }
}

impl ServerPool {
    /// `rpc_timeout` bounds each attempt; `failover_timeout` how long a call to a pair
    /// keeps trying its members.
    pub fn new(
        hello: Hello,
        transport: Transport,
        rpc_timeout: Duration,
        failover_timeout: Duration,
    ) -> Arc<ServerPool> {
        Arc::new_cyclic(|this| ServerPool {
            this: this.clone(),
            hello,
            transport,
            rpc_timeout,
            failover_timeout,
            connections: Mutex::new(HashMap::new()),
            last_sent: Mutex::new(HashMap::new()),
            down: Mutex::new(HashMap::new()),
            gates: Mutex::new(HashMap::new()),
            members: Mutex::new(HashMap::new()),
            next_seq: AtomicU64::new(1),
            sink: std::sync::OnceLock::new(),
            tokens: std::sync::OnceLock::new(),
        })
    }

    pub fn set_sink(&self, sink: Weak<dyn CallbackSink>) {
        let _ = self.sink.set(sink);
    }

    /// Makes every call carry the token of the task's caller, from `tokens`.
    pub fn set_tokens(&self, tokens: Arc<TokenStore>) {
        let _ = self.tokens.set(tokens);
    }

    /// The token the current task's calls carry: its caller's, if it holds one.
    fn caller_token(&self) -> Option<SealedToken> {
        self.tokens.get()?.for_current_caller()
    }

    pub fn rpc_timeout(&self) -> Duration {
        self.rpc_timeout
    }

    /// The address of `server` whose connection was handed out last.
    pub fn answered(&self, server: ServerId) -> Option<String> {
        self.members.lock().get(&server)?.answered.clone()
    }

    /// Calls the fileserver holding `location` with the pool's timeout.
    pub async fn call(
        &self,
        location: &VolumeLocation,
        request: Request,
    ) -> Result<Response, ProtoError> {
        self.call_with_timeout(
            location.server,
            &location.addresses,
            request,
            self.rpc_timeout,
        )
        .await
    }

    /// Calls `server`, each attempt within `timeout`; a pair's members are tried until
    /// `failover_timeout` has passed. A namespace change goes as `Sequenced`.
    ///
    /// A single server's call is over by `timeout`, whatever it waits for (another
    /// caller's connect, its own, the reclaim, the answer). A pair's call is over once
    /// `failover_timeout` has passed, but each of its attempts is bounded step by step
    /// (the connect, the handshake, each request of the reclaim, the call), so one that
    /// starts just before the failover timeout runs out can outlast it by a few
    /// `timeout`s.
    pub async fn call_with_timeout(
        &self,
        server: ServerId,
        addresses: &[String],
        request: Request,
        timeout: Duration,
    ) -> Result<Response, ProtoError> {
        let request = self.sequenced(request);
        let token = self.caller_token();
        let call = Call {
            request: &request,
            token: token.as_ref(),
        };
        if addresses.len() < 2 {
            return self.call_once(server, addresses, call, timeout).await;
        }
        self.call_pair(server, addresses, call, timeout, self.failover_timeout)
            .await
    }

    /// Whether `server` answers a ping within `timeout`: one connect (with its reclaim)
    /// when no connection is live, on each member of a pair in turn, and no failover
    /// wait: a pair none of whose members is active now counts as down. A single server
    /// marked silent gets the whole `timeout` here, and a connect that succeeds ends the
    /// mark; one that times out keeps it.
    pub async fn probe(&self, server: ServerId, addresses: &[String], timeout: Duration) -> bool {
        let connection = if addresses.len() < 2 {
            let deadline = Instant::now() + timeout;
            self.connection(server, addresses, timeout, deadline, Purpose::Probe)
                .await
        } else {
            self.pair_connection(server, addresses, timeout).await
        };
        match connection {
            Ok(connection) => self.ping(server, &connection, timeout).await,
            Err(e) => {
                debug!(%server, error = %e, "fileserver does not answer a probe");
                false
            }
        }
    }

    /// Pings `server` over `connection`; a failure closes it, as any call's would.
    async fn ping(&self, server: ServerId, connection: &Connection, timeout: Duration) -> bool {
        self.note_sent(server);
        match connection.call(Request::Ping, timeout).await {
            Ok(Response::Pong) => true,
            Ok(other) => {
                debug!(%server, response = other.kind_name(), "unexpected answer to a ping");
                false
            }
            Err(e) => {
                debug!(%server, peer = %connection.peer_addr(), error = %e, "ping failed");
                if e.is_transport() || matches!(e, ProtoError::Remote(ErrorCode::NotActive { .. }))
                {
                    self.forget(server, connection).await;
                }
                false
            }
        }
    }

    /// Starts the keepalive: every third of `idle`, `ping_idle(idle)`, until the pool is
    /// dropped.
    pub fn start_keepalive(&self, idle: Duration) {
        let pool = self.this.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(idle / 3);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(pool) = pool.upgrade() else {
                    return;
                };
                pool.ping_idle(idle).await;
            }
        });
    }

    /// How long a probe of a server waits: the pool's timeout, at most
    /// `PROBE_TIMEOUT_MAX`.
    pub fn probe_timeout(&self) -> Duration {
        self.rpc_timeout.min(PROBE_TIMEOUT_MAX)
    }

    /// Whether `server` is marked silent: a call or handshake to it timed out and no
    /// connect has succeeded since. Calls to it fail at once meanwhile.
    pub fn is_silent(&self, server: ServerId) -> bool {
        let now = Instant::now();
        self.down
            .lock()
            .get(&server)
            .and_then(|down| down.silent_until)
            .is_some_and(|until| until > now)
    }

    /// Pings, all at once, every live connection that has sent nothing for `idle` and
    /// that holds what the cache needs kept (`CallbackSink::holds_promises`); returns
    /// how many were pinged, once each ping has ended.
    pub async fn ping_idle(&self, idle: Duration) -> usize {
        let (Some(pool), Some(sink)) = (self.this.upgrade(), self.sink()) else {
            return 0;
        };
        let live: Vec<(ServerId, Connection)> = self
            .connections
            .lock()
            .iter()
            .map(|(server, connection)| (*server, connection.clone()))
            .collect();
        let now = Instant::now();
        let mut pings = tokio::task::JoinSet::new();
        for (server, connection) in live {
            let sent = self.last_sent.lock().get(&server).copied();
            if sent.is_some_and(|at| now.saturating_duration_since(at) < idle)
                || !sink.holds_promises(server)
            {
                continue;
            }
            let pool = pool.clone();
            pings.spawn(async move {
                let timeout = pool.rpc_timeout;
                if !pool.ping(server, &connection, timeout).await {
                    debug!(%server, "keepalive ping failed");
                }
            });
        }
        let count = pings.len();
        pings.join_all().await;
        count
    }

    fn note_sent(&self, server: ServerId) {
        self.last_sent.lock().insert(server, Instant::now());
    }

    fn sequenced(&self, request: Request) -> Request {
        if !request.needs_sequence() {
            return request;
        }
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        Request::Sequenced {
            seq,
            request: Box::new(request),
        }
    }

    /// One attempt, as a single server gets it, over by `timeout` whatever it waits for
    /// (a connect, a reclaim, the answer): a transport failure drops the connection.
    /// A connection made earlier that turns out closed (the server closed it as idle, or
    /// restarted) is replaced once, and the request goes again, byte for byte, on the new
    /// one, as a pair's retry would: the server did not fail, its old connection did.
    /// A call that had its time and got no answer marks the server silent, so the calls
    /// after it (the kernel asking for the same page again, say) fail at once rather than
    /// each wait out a timeout of its own.
    async fn call_once(
        &self,
        server: ServerId,
        addresses: &[String],
        call: Call<'_>,
        timeout: Duration,
    ) -> Result<Response, ProtoError> {
        let deadline = Instant::now() + timeout;
        let mut reused = self.live(server).is_some();
        loop {
            let connection = self
                .connection(server, addresses, timeout, deadline, Purpose::Call)
                .await?;
            let budget = deadline.saturating_duration_since(Instant::now());
            self.note_sent(server);
            let result = call.on(&connection, budget).await;
            let Err(e) = &result else {
                return result;
            };
            if !e.is_transport() {
                return result;
            }
            let timed_out = matches!(e, ProtoError::Timeout(_));
            if timed_out && budget < timeout / 2 {
                // The connect took most of the call's time: too little was left to judge
                // the server by its silence. The call fails; its connection stays.
                debug!(peer = %connection.peer_addr(), "call ran out of time after a slow connect");
                return Err(ProtoError::Timeout(timeout));
            }
            if timed_out {
                // Only the silence of the connection in use says anything of the server:
                // a late timeout of one already replaced does not.
                let in_use = self
                    .connections
                    .lock()
                    .get(&server)
                    .is_none_or(|live| live.same(&connection));
                let peer = connection.peer_addr().to_string();
                if in_use {
                    self.note_failure(server, &peer, e, Silence::of(budget, self.rpc_timeout));
                } else {
                    debug!(%peer, "a call on a connection already replaced timed out");
                }
            } else {
                debug!(peer = %connection.peer_addr(), error = %e, "fileserver connection failed");
            }
            self.forget(server, &connection).await;
            // Closed because another call found the server silent: this one fails with
            // it, as a caller queued behind a failed connect does.
            if timed_out || self.is_silent(server) {
                return Err(ProtoError::Timeout(timeout));
            }
            if !std::mem::take(&mut reused) {
                return result;
            }
        }
    }

    /// Tries the pair's members in turn until one answers or `failover` has passed: a
    /// pair is one server with two addresses, and a call that fails on the transport or
    /// is answered `NotActive` is tried again on the other member (or the one hinted),
    /// after a short backoff. The request is borrowed per attempt (no copy), so a retry
    /// is byte-for-byte the same request: a `Sequenced` one keeps its `seq`.
    async fn call_pair(
        &self,
        server: ServerId,
        listed: &[String],
        call: Call<'_>,
        timeout: Duration,
        failover: Duration,
    ) -> Result<Response, ProtoError> {
        let began = Instant::now();
        let mut addresses = listed.to_vec();
        let mut pause = FAILOVER_BACKOFF_MIN;
        let mut unreachable_since: Option<Instant> = None;
        loop {
            let (result, used) = match self.pair_connection(server, &addresses, timeout).await {
                Ok(connection) => {
                    unreachable_since = None;
                    self.note_sent(server);
                    let result = call.on(&connection, timeout).await;
                    (result, Some(connection))
                }
                Err(e) => (Err(e), None),
            };
            let error = match result {
                Err(e) => e,
                ok => return ok,
            };
            let Some(retry) = retry_of(&error, &addresses) else {
                return Err(error);
            };
            if let Some(connection) = &used {
                debug!(%server, peer = %connection.peer_addr(), error = %error, "fileserver pair member failed; trying the other");
                // Only the failure of the connection in use moves the pool on: a late
                // one of a connection already replaced says nothing of the new member.
                // (Its callback loop may have noticed the end first and forgotten it
                // already: then no connection is live, and the pool moves on too.)
                let in_use = self.forget(server, connection).await;
                if in_use || self.live(server).is_none() {
                    // The address as the VLDB spells it, which the socket's may not be.
                    let failed = self
                        .answered(server)
                        .unwrap_or_else(|| connection.peer_addr().to_string());
                    self.move_on(server, &addresses, retry, &failed);
                }
            } else {
                // Every member was tried (hints noted) by `pair_connection`.
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= RELOCATE_AFTER {
                    unreachable_since = Some(Instant::now());
                    self.relocate(server, &mut addresses, timeout).await;
                }
            }
            let elapsed = began.elapsed();
            if elapsed >= failover {
                warn!(%server, addresses = ?addresses, error = %error, "no member of the fileserver pair answered within {}", human_duration(failover));
                return Err(error);
            }
            tokio::time::sleep(pause.min(failover - elapsed)).await;
            pause = (pause * 2).min(FAILOVER_BACKOFF_MAX);
        }
    }

    /// Points the next connect to `server` at the hinted member, or at the member after
    /// the one that failed.
    fn move_on(&self, server: ServerId, addresses: &[String], retry: Retry, failed: &str) {
        let next = match retry {
            Retry::Hinted(hint) => hint,
            Retry::Next => {
                let at = addresses.iter().position(|a| a == failed);
                let next = at.map_or(0, |i| (i + 1) % addresses.len());
                addresses[next].clone()
            }
        };
        self.members.lock().entry(server).or_default().try_first = Some(next);
    }

    /// Asks the cache (which asks the VLDB) where `server` lives now.
    async fn relocate(&self, server: ServerId, addresses: &mut Vec<String>, timeout: Duration) {
        let Some(sink) = self.sink() else {
            return;
        };
        match tokio::time::timeout(timeout, sink.relocate(server)).await {
            Ok(Ok(found)) if !found.is_empty() && found != *addresses => {
                info!(%server, addresses = ?found, "fileserver pair: the VLDB lists new addresses");
                self.members.lock().entry(server).or_default().try_first = found.first().cloned();
                *addresses = found;
            }
            Ok(Ok(_)) => debug!(%server, "the VLDB lists the same addresses"),
            Ok(Err(e)) => debug!(%server, error = %e, "cannot look the fileserver up in the VLDB"),
            Err(_) => debug!(%server, "the VLDB did not answer in time"),
        }
    }

    /// Closes `connection`, so the next call reconnects; true when it was the one in
    /// use. Called for a connection that timed out or died, and for a pair member's that
    /// answered `NotActive`.
    async fn forget(&self, server: ServerId, connection: &Connection) -> bool {
        connection.close();
        self.lost(server, connection)
    }

    fn sink(&self) -> Option<Arc<dyn CallbackSink>> {
        self.sink.get().and_then(|s| s.upgrade())
    }

    /// Forgets `connection` if it is still the live one and tells the cache, once;
    /// true when it was.
    fn lost(&self, server: ServerId, connection: &Connection) -> bool {
        let removed = {
            let mut connections = self.connections.lock();
            let current = connections.get(&server).is_some_and(|c| c.same(connection));
            current && connections.remove(&server).is_some()
        };
        if removed && let Some(sink) = self.sink() {
            debug!(peer = %connection.peer_addr(), "fileserver connection ended");
            sink.connection_lost(server);
        }
        removed
    }

    /// The live connection to `server`, noting a dead one as lost.
    fn live(&self, server: ServerId) -> Option<Connection> {
        let connection = self.connections.lock().get(&server).cloned()?;
        if connection.is_closed() {
            self.lost(server, &connection);
            return None;
        }
        Some(connection)
    }

    /// Waits behind another caller's connect and reclaim until `until`, or — when the
    /// server answered meanwhile (that connect is reclaiming) — until `deadline`.
    async fn gate(
        &self,
        server: ServerId,
        until: Instant,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<tokio::sync::OwnedMutexGuard<()>, ProtoError> {
        let gate = self.gates.lock().entry(server).or_default().clone();
        let mut until = until;
        loop {
            let at = tokio::time::Instant::from_std(until);
            match tokio::time::timeout_at(at, gate.clone().lock_owned()).await {
                Ok(guard) => return Ok(guard),
                Err(_) if until < deadline && !self.is_silent(server) => until = deadline,
                Err(_) => return Err(ProtoError::Timeout(timeout)),
            }
        }
    }

    /// The live connection to `server`, or — when there is none — the right to make
    /// one: waits behind another caller's connect and reclaim (until `until`, or
    /// `deadline` once the server answers), and hands out the connection that caller
    /// made, if any.
    async fn live_or_gate(
        &self,
        server: ServerId,
        until: Instant,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<LiveOrGate, ProtoError> {
        if let Some(connection) = self.live(server) {
            return Ok(LiveOrGate::Live(connection));
        }
        let gate = self.gate(server, until, deadline, timeout).await?;
        Ok(match self.live(server) {
            Some(connection) => LiveOrGate::Live(connection),
            None => LiveOrGate::Gate(gate),
        })
    }

    /// The live connection to `server`, or a new one (reclaimed) by `deadline`. The
    /// connect runs as a task of its own behind the server's gate, so a caller that gives
    /// up at its deadline never cuts a reclaim short: the connection goes to the next
    /// caller. The wait at the gate and the handshake get only what is left of the
    /// caller's deadline, and a call to a server marked silent only `SILENT_TRY` of it.
    async fn connection(
        &self,
        server: ServerId,
        addresses: &[String],
        timeout: Duration,
        deadline: Instant,
        purpose: Purpose,
    ) -> Result<Connection, ProtoError> {
        if let Some(connection) = self.live(server) {
            return Ok(connection);
        }
        let Some(pool) = self.this.upgrade() else {
            return Err(ProtoError::Closed);
        };
        let addresses = addresses.to_vec();
        let asked = Instant::now();
        let until = match purpose {
            Purpose::Call if self.is_silent(server) => {
                debug!(%server, "fileserver marked silent: a short try only");
                deadline.min(asked + SILENT_TRY)
            }
            Purpose::Call | Purpose::Probe => deadline,
        };
        let attempt = Attempt {
            asked,
            until,
            deadline,
            timeout,
        };
        let connect = tokio::spawn(async move { pool.connect(server, &addresses, attempt).await });
        let deadline = tokio::time::Instant::from_std(deadline);
        match tokio::time::timeout_at(deadline, connect).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ProtoError::Closed),
            Err(_) => Err(ProtoError::Timeout(timeout)),
        }
    }

    /// Connects to `server` and reclaims over the connection, unless another caller's
    /// connect made one meanwhile. A connect or call that failed after this one was
    /// `asked` for answers for it too: callers queued behind a dead server's gate fail
    /// together rather than each try in turn. The handshake gets what is left of the
    /// attempt: until `until` while the server is silent, else until `deadline`.
    async fn connect(
        &self,
        server: ServerId,
        addresses: &[String],
        attempt: Attempt,
    ) -> Result<Connection, ProtoError> {
        let Attempt {
            asked,
            until,
            deadline,
            timeout,
        } = attempt;
        let _gate = match self.live_or_gate(server, until, deadline, timeout).await? {
            LiveOrGate::Live(connection) => return Ok(connection),
            LiveOrGate::Gate(gate) => gate,
        };
        if let Some(error) = self.failed_since(server, asked) {
            return Err(error);
        }
        let until = if self.is_silent(server) {
            until
        } else {
            deadline
        };
        let mut last_error = ProtoError::Closed;
        for address in addresses {
            let budget = until.saturating_duration_since(Instant::now());
            if budget.is_zero() {
                return Err(ProtoError::Timeout(timeout));
            }
            let limits = Limits {
                handshake_timeout: budget,
                ..Limits::default()
            };
            // Bounded as a whole: the connect with TLS and the hello each have the budget.
            let connecting = rpc::connect(address, self.hello.clone(), &limits, &self.transport);
            let connected = tokio::time::timeout(budget, connecting)
                .await
                .unwrap_or(Err(ProtoError::Timeout(budget)));
            match connected {
                Ok((connection, reply, incoming)) => {
                    if reply.server.is_some_and(|s| s != server) {
                        warn!(%address, "fileserver answered with another server id than the VLDB records");
                    }
                    self.note_reachable(server, address);
                    self.spawn_callback_loop(server, connection.clone(), incoming);
                    if let Some(sink) = self.sink()
                        && let Err(e) = sink.reclaim(server, &connection, self.rpc_timeout).await
                    {
                        warn!(%address, error = %e, "reclaim after reconnecting failed; will retry");
                        connection.close();
                        return Err(e);
                    }
                    self.note_sent(server);
                    self.connections.lock().insert(server, connection.clone());
                    return Ok(connection);
                }
                Err(ProtoError::Remote(code)) => return Err(ProtoError::Remote(code)),
                Err(e) => {
                    self.note_failure(server, address, &e, Silence::of(budget, self.rpc_timeout));
                    last_error = e;
                }
            }
        }
        Err(last_error)
    }

    /// The error of a connect or call to `server` that failed after `asked`, if any.
    fn failed_since(&self, server: ServerId, asked: Instant) -> Option<ProtoError> {
        let down = self.down.lock();
        let down = down.get(&server).filter(|d| d.last_failure >= asked)?;
        Some(copy_error(&down.error))
    }

    /// A connect or call to `server` at `address` failed: the first failure of an outage
    /// is a WARN, the rest (every call and probe meanwhile) DEBUG. A timeout marks the
    /// server silent when `silence` proves it, or keeps a mark alive; anything else (a
    /// refusal, a reset) ends a mark. The cache is told when a mark begins.
    fn note_failure(&self, server: ServerId, address: &str, error: &ProtoError, silence: Silence) {
        let (first, silenced) = {
            let mut down = self.down.lock();
            let now = Instant::now();
            let first = !down.contains_key(&server);
            let entry = down.entry(server).or_insert_with(|| Down {
                since: now,
                last_failure: now,
                error: ProtoError::Closed,
                silent_until: None,
            });
            let was_silent = entry.silent_until.is_some_and(|until| until > now);
            entry.last_failure = now;
            entry.error = copy_error(error);
            let timed_out = matches!(error, ProtoError::Timeout(_));
            let marks = silence == Silence::Proven || entry.silent_until.is_some();
            entry.silent_until = (timed_out && marks).then_some(now + SILENCE_KEPT);
            (first, !was_silent && entry.silent_until.is_some())
        };
        let what = match error {
            ProtoError::Timeout(timeout) => {
                format!("did not answer within {}", human_duration(*timeout))
            }
            e => format!("cannot be reached: {e}"),
        };
        if first && silenced {
            warn!(
                "fileserver {address} {what}; calls that need it fail at once until it answers again, files cached under callbacks stay readable"
            );
        } else if first {
            warn!("fileserver {address} {what}; files cached under callbacks stay readable");
        } else {
            debug!("fileserver {address} {what}");
        }
        if silenced && let Some(sink) = self.sink() {
            sink.server_silent(server);
        }
    }

    /// A connect to `server` succeeded, which ends a silent mark; says so at INFO, with
    /// the outage it ended.
    fn note_reachable(&self, server: ServerId, address: &str) {
        match self.down.lock().remove(&server) {
            Some(down) => info!(
                %address,
                "fileserver answers again, after {}",
                human_duration(down.since.elapsed())
            ),
            None => info!(%address, "connected to fileserver"),
        }
    }

    /// The connection to a pair's active member: the member tried first is the one in
    /// use (or pointed at), then the others in the VLDB's order. A member that refuses,
    /// or answers `NotActive` to the handshake or the reclaim, is passed over; failures
    /// are DEBUG here, since the caller retries and logs the switch once.
    async fn pair_connection(
        &self,
        server: ServerId,
        addresses: &[String],
        timeout: Duration,
    ) -> Result<Connection, ProtoError> {
        let deadline = Instant::now() + timeout;
        let _gate = match self
            .live_or_gate(server, deadline, deadline, timeout)
            .await?
        {
            LiveOrGate::Live(connection) => return Ok(connection),
            LiveOrGate::Gate(gate) => gate,
        };
        let limits = Limits {
            handshake_timeout: timeout,
            ..Limits::default()
        };
        let first = self
            .members
            .lock()
            .get(&server)
            .and_then(|m| m.try_first.clone())
            .filter(|a| addresses.contains(a));
        let order = first
            .iter()
            .chain(addresses.iter().filter(|a| Some(*a) != first.as_ref()));
        let mut last_error = ProtoError::Closed;
        for address in order {
            let connecting = rpc::connect(address, self.hello.clone(), &limits, &self.transport);
            let error = match connecting.await {
                Ok((connection, reply, incoming)) => {
                    if reply.server.is_some_and(|s| s != server) {
                        warn!(%address, "fileserver answered with another server id than the VLDB records");
                    }
                    self.spawn_callback_loop(server, connection.clone(), incoming);
                    let reclaimed = match self.sink() {
                        Some(sink) => sink.reclaim(server, &connection, timeout).await,
                        None => Ok(()),
                    };
                    match reclaimed {
                        Ok(()) => {
                            self.handed_out(server, address);
                            self.note_sent(server);
                            self.connections.lock().insert(server, connection.clone());
                            return Ok(connection);
                        }
                        Err(e) => {
                            connection.close();
                            e
                        }
                    }
                }
                Err(e) => e,
            };
            debug!(%server, %address, error = %error, "fileserver pair member not usable");
            match retry_of(&error, addresses) {
                None => return Err(error),
                Some(Retry::Hinted(hint)) => {
                    self.members.lock().entry(server).or_default().try_first = Some(hint);
                }
                Some(Retry::Next) => {}
            }
            last_error = error;
        }
        Err(last_error)
    }

    /// Notes the member whose connection is handed out; a change of member is the one
    /// line an operator sees of a failover.
    fn handed_out(&self, server: ServerId, address: &str) {
        let mut members = self.members.lock();
        let member = members.entry(server).or_default();
        match &member.answered {
            Some(previous) if previous != address => {
                info!(%server, %previous, "fileserver pair: now using {address}");
            }
            Some(_) => info!(%address, "reconnected to fileserver"),
            None => info!(%address, "connected to fileserver"),
        }
        member.answered = Some(address.to_owned());
        member.try_first = Some(address.to_owned());
    }

    fn spawn_callback_loop(
        &self,
        server: ServerId,
        connection: Connection,
        mut incoming: mpsc::Receiver<IncomingRequest>,
    ) {
        let sink = self.sink.get().cloned();
        let pool = self.this.clone();
        tokio::spawn(async move {
            let sink = sink.and_then(|s| s.upgrade());
            while let Some(request) = incoming.recv().await {
                let (body, _token, replier) = request.into_parts();
                let answer = match (&body, &sink) {
                    (Request::BreakCallbacks { fids }, Some(sink)) => {
                        debug!(count = fids.len(), "callback break");
                        sink.break_callbacks(fids);
                        Ok(Response::Ok)
                    }
                    (Request::ResetCallbacks, Some(sink)) => {
                        info!(%server, "fileserver asked to reset callbacks");
                        sink.reset_callbacks(server);
                        Ok(Response::Ok)
                    }
                    (Request::LockGranted { wait, fid }, Some(sink)) => {
                        if sink.lock_granted(server, *wait, *fid) {
                            Ok(Response::Ok)
                        } else {
                            debug!(%wait, %fid, "refusing a lock grant nobody waits for");
                            Err(ErrorCode::Stale)
                        }
                    }
                    (Request::Ping, _) => Ok(Response::Pong),
                    _ => Err(ErrorCode::Unsupported),
                };
                replier.reply(answer).await;
            }
            connection.close();
            drop(sink);
            if let Some(pool) = pool.upgrade() {
                pool.lost(server, &connection);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_an_operator_writes_them() {
        assert_eq!(human_duration(Duration::from_secs(2)), "2s");
        assert_eq!(human_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(human_duration(Duration::from_millis(200)), "200ms");
    }
}
