//! Connections to fileservers: one per server, opened on first use and again after a
//! failure. Each connection also carries the server's callback breaks to this client.
//! Invariant: every call ends within `rpc_timeout` (connecting and waiting for a
//! reclaim included); a connection that timed out or died is closed and forgotten, so
//! the next call reconnects. The cache hears of each lost connection exactly once
//! (`connection_lost`), before a new connection to that server is made, and a new
//! connection is handed to callers only after the cache reclaimed what it held there.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use proto::rpc::{self, Connection, IncomingRequest, Limits};
use proto::{ErrorCode, Fid, Hello, ProtoError, Request, Response, ServerId};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::volume::VolumeLocation;

/// A reclaim in progress, borrowing the sink and the new connection.
pub type ReclaimFuture<'a> = Pin<Box<dyn Future<Output = Result<(), ProtoError>> + Send + 'a>>;

/// What the pool tells the cache about callbacks, lock grants and connections.
pub trait CallbackSink: Send + Sync + 'static {
    /// The server broke these callbacks; called before the break is acknowledged.
    fn break_callbacks(&self, fids: &[Fid]);
    /// The server asked to reset: every callback from `server` is void.
    fn reset_callbacks(&self, server: ServerId);
    /// The server granted the queued lock request `wait`; `true` acknowledges it.
    fn lock_granted(&self, server: ServerId, wait: u64, fid: Fid) -> bool;
    /// The connection to `server` ended: breaks may have been lost and queued lock
    /// requests died with it.
    fn connection_lost(&self, server: ServerId);
    /// A new connection to `server` is up: reclaim callbacks and locks over it before
    /// any other call uses it. Fails only on a transport error.
    fn reclaim<'a>(
        &'a self,
        server: ServerId,
        connection: &'a Connection,
        timeout: Duration,
    ) -> ReclaimFuture<'a>;
}

pub struct ServerPool {
    /// Lets a connection's task report its end after the call that opened it returned.
    this: Weak<ServerPool>,
    hello: Hello,
    rpc_timeout: Duration,
    /// Live connections; short sections, never held across an `.await`.
    connections: Mutex<HashMap<ServerId, Connection>>,
    /// One connect (and reclaim) at a time per server; callers wait here for it.
    gates: Mutex<HashMap<ServerId, Arc<tokio::sync::Mutex<()>>>>,
    sink: std::sync::OnceLock<Weak<dyn CallbackSink>>,
}

/// Renders a duration as an operator reads it: `2s`, `1500ms`.
pub fn human_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 && d.as_secs() > 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

impl ServerPool {
    pub fn new(hello: Hello, rpc_timeout: Duration) -> Arc<ServerPool> {
        Arc::new_cyclic(|this| ServerPool {
            this: this.clone(),
            hello,
            rpc_timeout,
            connections: Mutex::new(HashMap::new()),
            gates: Mutex::new(HashMap::new()),
            sink: std::sync::OnceLock::new(),
        })
    }

    pub fn set_sink(&self, sink: Weak<dyn CallbackSink>) {
        let _ = self.sink.set(sink);
    }

    pub fn rpc_timeout(&self) -> Duration {
        self.rpc_timeout
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

    pub async fn call_with_timeout(
        &self,
        server: ServerId,
        addresses: &[String],
        request: Request,
        timeout: Duration,
    ) -> Result<Response, ProtoError> {
        let connection = self.connection(server, addresses, timeout).await?;
        let result = connection.call(request, timeout).await;
        if let Err(e) = &result
            && e.is_transport()
        {
            if matches!(e, ProtoError::Timeout(_)) {
                warn!(
                    "fileserver {} did not answer within {}",
                    connection.peer_addr(),
                    human_duration(timeout)
                );
            } else {
                debug!(peer = %connection.peer_addr(), error = %e, "fileserver connection failed");
            }
            self.forget(server, &connection).await;
        }
        result
    }

    async fn forget(&self, server: ServerId, connection: &Connection) {
        connection.close();
        self.lost(server, connection);
    }

    fn sink(&self) -> Option<Arc<dyn CallbackSink>> {
        self.sink.get().and_then(|s| s.upgrade())
    }

    /// Forgets `connection` if it is still the live one and tells the cache, once.
    fn lost(&self, server: ServerId, connection: &Connection) {
        let removed = {
            let mut connections = self.connections.lock();
            let current = connections.get(&server).is_some_and(|c| c.same(connection));
            current && connections.remove(&server).is_some()
        };
        if removed && let Some(sink) = self.sink() {
            debug!(peer = %connection.peer_addr(), "fileserver connection ended");
            sink.connection_lost(server);
        }
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

    async fn connection(
        &self,
        server: ServerId,
        addresses: &[String],
        timeout: Duration,
    ) -> Result<Connection, ProtoError> {
        if let Some(connection) = self.live(server) {
            return Ok(connection);
        }
        let gate = self.gates.lock().entry(server).or_default().clone();
        // Waits behind another caller's connect and reclaim, within the deadline.
        let _gate = tokio::time::timeout(timeout, gate.lock())
            .await
            .map_err(|_| ProtoError::Timeout(timeout))?;
        if let Some(connection) = self.live(server) {
            return Ok(connection);
        }
        let limits = Limits {
            handshake_timeout: timeout,
            ..Limits::default()
        };
        let mut last_error = ProtoError::Closed;
        for address in addresses {
            match rpc::connect(address, self.hello.clone(), &limits).await {
                Ok((connection, reply, incoming)) => {
                    if reply.server.is_some_and(|s| s != server) {
                        warn!(%address, "fileserver answered with another server id than the VLDB records");
                    }
                    info!(%address, "connected to fileserver");
                    self.spawn_callback_loop(server, connection.clone(), incoming);
                    if let Some(sink) = self.sink()
                        && let Err(e) = sink.reclaim(server, &connection, timeout).await
                    {
                        warn!(%address, error = %e, "reclaim after reconnecting failed; will retry");
                        connection.close();
                        return Err(e);
                    }
                    self.connections.lock().insert(server, connection.clone());
                    return Ok(connection);
                }
                Err(ProtoError::Remote(code)) => return Err(ProtoError::Remote(code)),
                Err(e) => {
                    if matches!(e, ProtoError::Timeout(_)) {
                        warn!(
                            "fileserver {address} did not answer within {}",
                            human_duration(timeout)
                        );
                    } else {
                        warn!("cannot reach fileserver {address}: {e}");
                    }
                    last_error = e;
                }
            }
        }
        Err(last_error)
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
                let (body, replier) = request.into_parts();
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
                            debug!(wait, %fid, "refusing a lock grant nobody waits for");
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
