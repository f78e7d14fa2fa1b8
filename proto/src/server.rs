//! The accept loop every Holdfast server runs: connection slots, one task per connection,
//! bounded requests in flight, and shutdown through one `watch` with an exit deadline.
//! Invariant: services see decoded requests and answer `Result<Response, ErrorCode>`;
//! sockets, frames and handshakes stay here and in `rpc`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::error::ErrorCode;
use crate::message::{Hello, HelloReply, Request, Response};
use crate::rpc::{self, Connection, Limits};

/// What a server does with connections and requests.
pub trait Service: Send + Sync + 'static {
    /// Judges a `Hello`: the reply to send, or the error that refuses the connection.
    fn hello(&self, hello: &Hello) -> Result<HelloReply, ErrorCode>;

    /// Called once a connection is established, before its first request.
    fn connected(&self, _connection: &Connection, _hello: &Hello) {}

    /// Answers one request. Runs concurrently with the connection's other requests.
    fn handle(
        self: Arc<Self>,
        connection: Connection,
        hello: Arc<Hello>,
        request: Request,
    ) -> impl Future<Output = Result<Response, ErrorCode>> + Send;

    /// Called once the connection has closed.
    fn disconnected(&self, _connection: &Connection, _hello: &Hello) {}
}

/// Server-wide limits.
#[derive(Clone, Debug)]
pub struct ServerLimits {
    pub connection: Limits,
    /// Connections served at once; further peers wait in the listen backlog.
    pub connections_max: usize,
    /// Requests of one connection handled at once.
    pub requests_in_flight_max: usize,
    /// How long shutdown waits for connections to finish.
    pub shutdown_deadline: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            connection: Limits::default(),
            connections_max: 4096,
            requests_in_flight_max: 64,
            shutdown_deadline: Duration::from_secs(5),
        }
    }
}

/// Serves `service` on `listener` until `shutdown` turns true.
pub async fn serve<S: Service>(
    listener: TcpListener,
    service: Arc<S>,
    limits: ServerLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let connection_slots = Arc::new(Semaphore::new(limits.connections_max));
    let mut tasks = JoinSet::new();
    loop {
        let permit = tokio::select! {
            permit = connection_slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        // Reap finished connection tasks so the set does not grow without bound.
        while tasks.try_join_next().is_some() {}
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = service.clone();
        let limits = limits.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            serve_connection(stream, peer, service, limits, shutdown).await;
            drop(permit);
        });
    }
    info!("server stopping; waiting for connections");
    let drained = tokio::time::timeout(limits.shutdown_deadline, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!("connections did not finish within the shutdown deadline; aborting them");
        tasks.abort_all();
    }
}

async fn serve_connection<S: Service>(
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    service: Arc<S>,
    limits: ServerLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let accepted = rpc::accept(stream, &limits.connection, |hello| service.hello(hello)).await;
    let (connection, hello, mut incoming) = match accepted {
        Ok(accepted) => accepted,
        Err(e) => {
            debug!(%peer, error = %e, "handshake failed");
            return;
        }
    };
    let hello = Arc::new(hello);
    service.connected(&connection, &hello);
    let in_flight = Arc::new(Semaphore::new(limits.requests_in_flight_max));
    let mut requests = JoinSet::new();
    loop {
        let next = tokio::select! {
            next = incoming.recv() => next,
            _ = shutdown.wait_for(|stop| *stop) => None,
        };
        let Some(request) = next else { break };
        while requests.try_join_next().is_some() {}
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let (body, replier) = request.into_parts();
        let service = service.clone();
        let connection = connection.clone();
        let hello = hello.clone();
        requests.spawn(async move {
            let answer = service.handle(connection, hello, body).await;
            replier.reply(answer).await;
            drop(permit);
        });
    }
    // Let requests already running finish, then close.
    while requests.join_next().await.is_some() {}
    connection.close();
    service.disconnected(&connection, &hello);
}
