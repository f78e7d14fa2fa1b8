//! Connections to fileservers: one per server, opened on first use and again after a
//! failure. Each connection also carries the server's callback breaks to this client.
//! Invariant: every call ends within `rpc_timeout` (connecting included); a connection
//! that timed out or died is closed and forgotten, so the next call reconnects; when a
//! connection ends, every callback from that server is dropped (breaks may have been lost).

use std::collections::HashMap;
use std::sync::Weak;
use std::time::Duration;

use proto::rpc::{self, Connection, IncomingRequest, Limits};
use proto::{ErrorCode, Fid, Hello, ProtoError, Request, Response, ServerId};
use tokio::sync::{Mutex, mpsc};
use tracing::{debug, info, warn};

use crate::volume::VolumeLocation;

/// What the pool tells the cache about callbacks.
pub trait CallbackSink: Send + Sync + 'static {
    /// The server broke these callbacks; called before the break is acknowledged.
    fn break_callbacks(&self, fids: &[Fid]);
    /// Every callback from `server` is void (reset asked, or the connection ended).
    fn reset_callbacks(&self, server: ServerId);
}

pub struct ServerPool {
    hello: Hello,
    rpc_timeout: Duration,
    connections: Mutex<HashMap<ServerId, Connection>>,
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
    pub fn new(hello: Hello, rpc_timeout: Duration) -> ServerPool {
        ServerPool {
            hello,
            rpc_timeout,
            connections: Mutex::new(HashMap::new()),
            sink: std::sync::OnceLock::new(),
        }
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
        let mut connections = self.connections.lock().await;
        if connections.get(&server).is_some_and(|c| c.same(connection)) {
            connections.remove(&server);
        }
    }

    async fn connection(
        &self,
        server: ServerId,
        addresses: &[String],
        timeout: Duration,
    ) -> Result<Connection, ProtoError> {
        let mut connections = self.connections.lock().await;
        if let Some(connection) = connections.get(&server).filter(|c| !c.is_closed()) {
            return Ok(connection.clone());
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
                    connections.insert(server, connection.clone());
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
                    (Request::Ping, _) => Ok(Response::Pong),
                    _ => Err(ErrorCode::Unsupported),
                };
                replier.reply(answer).await;
            }
            connection.close();
            if let Some(sink) = sink {
                info!(peer = %connection.peer_addr(), "fileserver connection ended; its callbacks are void");
                sink.reset_callbacks(server);
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
