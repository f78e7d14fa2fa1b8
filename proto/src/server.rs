//! The accept loop every Holdfast server runs: connection caps with eviction, one task per
//! connection, mutual TLS, hello and idle timeouts, one frame-memory budget, bounded
//! requests in flight, rate-limited warnings about peers, and shutdown through one `watch`.
//! Invariant: services see decoded requests and answer `Result<Response, ErrorCode>`;
//! sockets, frames and handshakes stay here and in `rpc`; what a peer makes the server
//! hold is bounded by `ServerLimits`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::activity::{Activity, Eviction};
use crate::admission::{Admission, Admit, Seat};
use crate::budget::{FrameBudget, Intake};
use crate::error::{ErrorCode, ProtoError};
use crate::frame::encode_frame;
use crate::identity::{Identity, SealedToken, TokenError, TokenVerifier, VerifiedTokens};
use crate::message::{Frame, Hello, HelloReply, Request, Response, Timestamp};
use crate::resources;
use crate::rpc::{self, CloseReason, Connection, Limits};
use crate::tls::Transport;
use crate::warnings::{PeerWarnings, Warning};

/// What a server does with connections and requests.
pub trait Service: Send + Sync + 'static {
    /// Judges a `Hello`: the reply to send, or the error that refuses the connection.
    fn hello(&self, hello: &Hello) -> Result<HelloReply, ErrorCode>;

    /// Called once a connection is established, before its first request.
    fn connected(&self, _connection: &Connection, _hello: &Hello) {}

    /// Answers one request for `caller`. Runs concurrently with the connection's other
    /// requests.
    fn handle(
        self: Arc<Self>,
        connection: Connection,
        hello: Arc<Hello>,
        caller: Arc<Identity>,
        request: Request,
    ) -> impl Future<Output = Result<Response, ErrorCode>> + Send;

    /// The cell's token verifier. A service without one refuses every token (its
    /// requests are made for `system:anyuser` or by servers).
    fn token_verifier(&self) -> Option<&TokenVerifier> {
        None
    }

    /// Called once the connection has closed.
    fn disconnected(&self, _connection: &Connection, _hello: &Hello) {}
}

/// Default `ServerLimits::idle_timeout`: cache managers ping well within it.
pub const IDLE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(120);
/// Default `ServerLimits::connections_max`.
pub const CONNECTIONS_MAX_DEFAULT: usize = 4096;
/// Default `ServerLimits::connections_per_peer_max`.
pub const CONNECTIONS_PER_PEER_MAX_DEFAULT: usize = 1024;
/// Default `ServerLimits::frame_memory_bytes`.
pub const FRAME_MEMORY_BYTES_DEFAULT: usize = 64 << 20;
/// File descriptors kept for the server's own files (partition, journal, databases)
/// when the open-files limit caps the connections.
const FILES_RESERVED: u64 = 256;
/// How often the server looks whether a flood has passed and memory can go back.
const TRIM_CHECK_EVERY: Duration = Duration::from_secs(2);
/// How often a connection busy with a long request looks again whether it turned idle.
const IDLE_RECHECK: Duration = Duration::from_secs(1);
/// How long a refused connection is read from before it closes, so that its peer reads
/// the refusal.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);
/// Refused connections read from at once; more are closed at once.
const REFUSALS_LINGERING_MAX: usize = 64;
/// At most one warning per peer address and kind this often.
const WARNING_INTERVAL: Duration = Duration::from_secs(10);
/// At most one warning about a peer's certificate per address this often.
const CERTIFICATE_WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// Server-wide limits.
#[derive(Clone, Debug)]
pub struct ServerLimits {
    /// Each connection's limits; `handshake_timeout` is the hello timeout.
    pub connection: Limits,
    /// Connections open at once, handshakes included; over it a newcomer evicts the
    /// connection least worth keeping, or is refused when all are busy.
    pub connections_max: usize,
    /// Connections open at once from one IP address; over it a newcomer evicts that
    /// address's connection least worth keeping.
    pub connections_per_peer_max: usize,
    /// Requests of one connection handled at once.
    pub requests_in_flight_max: usize,
    /// A connection with nothing in flight that sends nothing for this long is told
    /// goodbye and closed.
    pub idle_timeout: Duration,
    /// Bytes of frames held at once across all connections, from their header until
    /// they are answered (beyond each connection's allowance).
    pub frame_memory_bytes: usize,
    /// Bytes of frames each connection holds outside the shared budget: its small
    /// requests never wait behind others' large frames.
    pub frame_allowance_bytes: usize,
    /// While frames wait for memory, a frame still arriving whose peer sent nothing for
    /// this long is evicted to make room.
    pub frame_stall_limit: Duration,
    /// How long shutdown waits for connections to finish.
    pub shutdown_deadline: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            connection: Limits::default(),
            connections_max: CONNECTIONS_MAX_DEFAULT,
            connections_per_peer_max: CONNECTIONS_PER_PEER_MAX_DEFAULT,
            requests_in_flight_max: 64,
            idle_timeout: IDLE_TIMEOUT_DEFAULT,
            frame_memory_bytes: FRAME_MEMORY_BYTES_DEFAULT,
            frame_allowance_bytes: 16 << 10,
            frame_stall_limit: Duration::from_secs(2),
            shutdown_deadline: Duration::from_secs(5),
        }
    }
}

/// What every connection task of one server shares.
struct Shared {
    limits: ServerLimits,
    admission: Arc<Admission>,
    budget: Arc<FrameBudget>,
    warnings: PeerWarnings,
    /// Peers refused at the TLS handshake: once a minute per address.
    certificate_warnings: PeerWarnings,
    refusals_lingering: Arc<AtomicUsize>,
    transport: Transport,
}

/// Serves `service` on `listener` over `transport` until `shutdown` turns true.
pub async fn serve<S: Service>(
    listener: TcpListener,
    service: Arc<S>,
    limits: ServerLimits,
    transport: Transport,
    mut shutdown: watch::Receiver<bool>,
) {
    resources::tune_allocator();
    let limits = within_open_files_limit(limits);
    let shared = Arc::new(Shared {
        admission: Admission::new(limits.connections_max, limits.connections_per_peer_max),
        budget: FrameBudget::new(
            limits
                .frame_memory_bytes
                .max(limits.connection.frame_bytes_max),
            limits.frame_stall_limit,
        ),
        warnings: PeerWarnings::new(WARNING_INTERVAL),
        certificate_warnings: PeerWarnings::new(CERTIFICATE_WARNING_INTERVAL),
        refusals_lingering: Arc::new(AtomicUsize::new(0)),
        transport,
        limits,
    });
    let trimmer = tokio::spawn(give_back_memory_after_floods(shared.clone()));
    let mut tasks = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            // Reap each finished connection task at once: until then it keeps its memory.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                shared.warnings.warn(
                    None,
                    Warning::Accept,
                    &format!("cannot accept connections: {e}"),
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let activity = Arc::new(Activity::new());
        let seat = match shared.admission.admit(peer, activity.clone()) {
            Admit::Seated(seat) => seat,
            Admit::Refused(why) => {
                refuse(stream, peer, why, &shared);
                continue;
            }
        };
        let service = service.clone();
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(serve_connection(
            stream, peer, seat, activity, service, shared, shutdown,
        ));
    }
    trimmer.abort();
    info!("server stopping; waiting for connections");
    let drained = tokio::time::timeout(shared.limits.shutdown_deadline, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!("connections did not finish within the shutdown deadline; aborting them");
        tasks.abort_all();
    }
}

/// Lowers the connection caps to what the open-files limit can hold (raising that limit
/// to its hard limit first).
fn within_open_files_limit(mut limits: ServerLimits) -> ServerLimits {
    let open_files = match resources::raise_open_files_limit() {
        Ok(open_files) => open_files,
        Err(e) => {
            warn!(error = %e, "cannot read the open-files limit; connection caps as configured");
            return limits;
        }
    };
    let room = open_files.saturating_sub(FILES_RESERVED).max(16) as usize;
    if limits.connections_max > room {
        warn!(
            open_files,
            connections_max = room,
            "the open-files limit holds fewer connections than --connections-max; \
             serving at most {room} (raise `ulimit -n` to serve more)"
        );
        limits.connections_max = room;
    }
    limits.connections_per_peer_max = limits.connections_per_peer_max.min(limits.connections_max);
    limits
}

/// Turns a newcomer away with `Busy` in place of its hello reply.
fn refuse(stream: TcpStream, peer: SocketAddr, why: Eviction, shared: &Arc<Shared>) {
    shared.warnings.warn(
        Some(peer),
        Warning::Refused,
        &format!(
            "refused a connection: {why}, and every connection there is busy \
             (--connections-max {}, --connections-per-peer-max {})",
            shared.limits.connections_max, shared.limits.connections_per_peer_max
        ),
    );
    let Ok(body) = encode_frame(&Frame::HelloReply(Err(ErrorCode::Busy))) else {
        return;
    };
    let mut bytes = Vec::with_capacity(8 + body.len());
    bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    bytes.extend_from_slice(&body);
    // The refusal goes through the TLS handshake, and closing with the peer's hello
    // unread would reset the connection, and the peer might lose the answer: both for a
    // moment at most, and for a few refused connections at a time.
    let lingering = shared.refusals_lingering.clone();
    if lingering.fetch_add(1, Ordering::Relaxed) >= REFUSALS_LINGERING_MAX {
        lingering.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    let transport = shared.transport.clone();
    tokio::spawn(async move {
        let _counted = Lingering(lingering);
        let _ = tokio::time::timeout(REFUSAL_LINGER, async move {
            let Ok(mut secured) = transport.accept(stream).await else {
                return;
            };
            if secured.write.write_all(&bytes).await.is_err() {
                return;
            }
            let _ = secured.write.shutdown().await;
            let mut sink = [0u8; 1024];
            while let Ok(1..) = secured.read.read(&mut sink).await {}
        })
        .await;
    });
}

/// Counts one refused connection being read from until it drops.
struct Lingering(Arc<AtomicUsize>);

impl Drop for Lingering {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve_connection<S: Service>(
    stream: TcpStream,
    peer: SocketAddr,
    seat: Seat,
    activity: Arc<Activity>,
    service: Arc<S>,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let limits = &shared.limits;
    let intake = Intake::bounded(
        activity.clone(),
        limits.frame_allowance_bytes,
        shared.budget.clone(),
    );
    let accepted = rpc::accept(
        stream,
        &shared.transport,
        &limits.connection,
        intake,
        |hello| service.hello(hello),
    )
    .await;
    let (connection, hello, mut incoming) = match accepted {
        Ok(accepted) => accepted,
        Err(e) => {
            handshake_failed(peer, &e, &activity, &shared);
            return;
        }
    };
    let hello = Arc::new(hello);
    service.connected(&connection, &hello);
    let in_flight = Arc::new(Semaphore::new(limits.requests_in_flight_max));
    let tokens = VerifiedTokens::default();
    // A request without a token acts for system:anyuser, and for a server of the cell
    // when the peer showed a server certificate (server-to-server calls). A plaintext
    // connection (benchmarks only: `tls::PLAINTEXT_ENV`) shows no class and proves
    // nothing, so it is taken as a server's, as everything was before TLS.
    let anonymous = Arc::new(Identity {
        server: connection.peer_class() != Some(crate::tls::PeerClass::Host),
        ..Identity::anonymous()
    });
    let mut requests = JoinSet::new();
    let mut next_idle_check = activity.last_received() + limits.idle_timeout;
    // Set once this side said goodbye: requests already on their way are still served
    // until then, and the connection closes.
    let mut drain_until: Option<Instant> = None;
    loop {
        let wake = drain_until.unwrap_or(next_idle_check);
        let next = tokio::select! {
            next = incoming.recv() => next,
            () = tokio::time::sleep_until(wake) => {
                if drain_until.is_some() {
                    break;
                }
                let now = Instant::now();
                if activity.in_flight() == 0 && activity.silent_for(now) >= limits.idle_timeout {
                    debug!(%peer, "connection idle; saying goodbye");
                    connection.goodbye();
                    drain_until = Some(now + limits.connection.handshake_timeout);
                } else {
                    next_idle_check = (activity.last_received() + limits.idle_timeout)
                        .max(now + IDLE_RECHECK);
                }
                continue;
            }
            () = activity.evicted() => None,
            _ = shutdown.wait_for(|stop| *stop) => None,
        };
        let Some(request) = next else { break };
        while requests.try_join_next().is_some() {}
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let (body, token, replier) = request.into_parts();
        let caller = match token {
            None => anonymous.clone(),
            Some(token) => match caller_of(&*service, &tokens, &token) {
                Ok(caller) => caller,
                Err(e) => {
                    shared.warnings.warn(
                        Some(peer),
                        Warning::Token,
                        &format!("refused a token: {e}"),
                    );
                    requests.spawn(async move {
                        replier
                            .reply(Err(ErrorCode::BadToken {
                                reason: e.to_string(),
                            }))
                            .await;
                        drop(permit);
                    });
                    continue;
                }
            },
        };
        let service = service.clone();
        let connection = connection.clone();
        let hello = hello.clone();
        requests.spawn(async move {
            let answer = service.handle(connection, hello, caller, body).await;
            replier.reply(answer).await;
            drop(permit);
        });
    }
    // Let requests already running finish, then close.
    while requests.join_next().await.is_some() {}
    connection.close();
    drop(seat);
    service.disconnected(&connection, &hello);
    connection_closed(peer, &connection, &activity, &shared);
}

/// Whom a request made with `token` acts for: its user, once the token verifies.
fn caller_of<S: Service>(
    service: &S,
    tokens: &VerifiedTokens,
    token: &SealedToken,
) -> Result<Arc<Identity>, TokenError> {
    let Some(verifier) = service.token_verifier() else {
        return Err(TokenError::UnknownKey {
            user: token
                .unverified_body()
                .map_or_else(|_| "someone".to_owned(), |body| body.user),
            key_id: 0,
        });
    };
    tokens.identity(verifier, token, Timestamp::now())
}

/// Logs why a handshake failed: at WARN (rate-limited) when the peer misbehaved.
fn handshake_failed(peer: SocketAddr, error: &ProtoError, activity: &Activity, shared: &Shared) {
    if let Some(why) = activity.eviction() {
        evicted(peer, why, shared);
        return;
    }
    let what = match error {
        ProtoError::Io(_) | ProtoError::Closed => {
            debug!(%peer, %error, "handshake ended");
            return;
        }
        ProtoError::Timeout(timeout) => format!(
            "closed a connection that completed no handshake within {} s",
            timeout.as_secs_f64()
        ),
        ProtoError::Tls(what) => {
            shared.certificate_warnings.warn(
                Some(peer),
                Warning::Certificate,
                &format!("refused a connection at the TLS handshake: the peer {what}"),
            );
            return;
        }
        other => format!("closed a connection in its handshake: {other}"),
    };
    shared.warnings.warn(Some(peer), Warning::Malformed, &what);
}

/// Logs why an established connection ended: at WARN (rate-limited) when the peer
/// misbehaved or the connection was evicted, at DEBUG otherwise (an idle goodbye, say).
fn connection_closed(
    peer: SocketAddr,
    connection: &Connection,
    activity: &Activity,
    shared: &Shared,
) {
    if let Some(why) = activity.eviction() {
        evicted(peer, why, shared);
        return;
    }
    match connection.close_reason() {
        Some(CloseReason::Malformed(what)) => {
            shared.warnings.warn(
                Some(peer),
                Warning::Malformed,
                &format!("closed a connection that {what}"),
            );
        }
        Some(CloseReason::Stalled(what)) => {
            shared.warnings.warn(
                Some(peer),
                Warning::Stalled,
                &format!("closed a connection that {what}"),
            );
        }
        reason => debug!(%peer, ?reason, "connection closed"),
    }
}

fn evicted(peer: SocketAddr, why: Eviction, shared: &Shared) {
    let kind = match why {
        Eviction::StalledUnderPressure => Warning::Stalled,
        Eviction::ConnectionsFull | Eviction::PeerFull => Warning::Evicted,
    };
    shared.warnings.warn(
        Some(peer),
        kind,
        &format!("closed a connection to make room: {why}"),
    );
}

/// When a flood has passed (many connections gone, or much frame memory returned),
/// hands the allocator's free memory back to the system.
async fn give_back_memory_after_floods(shared: Arc<Shared>) {
    let mut policy = TrimPolicy::default();
    loop {
        tokio::time::sleep(TRIM_CHECK_EVERY).await;
        let connections = shared.admission.len();
        let frame_bytes_peak = shared.budget.take_high_water();
        if policy.observe(connections, frame_bytes_peak, shared.budget.used()) {
            shared.admission.shrink();
            let _ = tokio::task::spawn_blocking(resources::give_back_free_memory).await;
        }
    }
}

/// Decides when the memory of a passed flood is worth handing back: trimming walks the
/// allocator's heaps, so only after a real drop, and on the two looks after it as well,
/// since a flood's connections take a few seconds to wind down.
#[derive(Debug, Default)]
struct TrimPolicy {
    connections_peak: usize,
    frame_bytes_peak: usize,
    /// Looks still to trim at after the last drop.
    trims_left: u8,
}

impl TrimPolicy {
    /// Connections this many fewer than their peak make a flood that passed.
    const CONNECTIONS_DROP: usize = 128;
    /// Frame bytes this many fewer than their peak likewise.
    const FRAME_BYTES_DROP: usize = 8 << 20;
    /// Looks after a drop that trim again.
    const TRIMS_AFTER: u8 = 2;

    /// Notes the counts now and the frame-memory peak since the last look; true when
    /// the memory should go back now.
    fn observe(&mut self, connections: usize, frame_bytes_peak: usize, frame_bytes: usize) -> bool {
        self.connections_peak = self.connections_peak.max(connections);
        self.frame_bytes_peak = self.frame_bytes_peak.max(frame_bytes_peak);
        let passed = self.connections_peak - connections >= Self::CONNECTIONS_DROP
            || self.frame_bytes_peak.saturating_sub(frame_bytes) >= Self::FRAME_BYTES_DROP;
        if passed {
            self.connections_peak = connections;
            self.frame_bytes_peak = frame_bytes;
            self.trims_left = Self::TRIMS_AFTER;
            return true;
        }
        if self.trims_left > 0 {
            self.trims_left -= 1;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_goes_back_after_a_flood_passes_and_twice_more() {
        let mut policy = TrimPolicy::default();
        assert!(!policy.observe(10, 0, 0));
        assert!(!policy.observe(1000, 0, 0));
        assert!(!policy.observe(900, 0, 0));
        let looks: Vec<bool> = (0..4).map(|_| policy.observe(100, 0, 0)).collect();
        assert_eq!(looks, [true, true, true, false]);
        assert!(!policy.observe(100, 64 << 20, 64 << 20));
        assert!(policy.observe(100, 0, 1 << 20));
        assert!(policy.observe(100, 1 << 20, 0));
        assert!(policy.observe(100, 1 << 20, 0));
        assert!(!policy.observe(100, 1 << 20, 0));
    }
}
