//! `VldbService`: answers VLDB requests on connections accepted by
//! `proto::server::serve`.
//! Invariant: store errors become `ErrorCode`s here, and storage failures are logged
//! here, once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::rpc::{self, Connection};
use proto::server::Service;
use proto::{ErrorCode, Hello, HelloReply, Request, Response, Timestamp};
use state::Millis;
use tracing::{debug, error};

use crate::error::VldbError;
use crate::store::Store;

pub struct VldbService {
    store: Arc<Store>,
    cell_name: String,
    /// The origin of the pair leases' clock.
    started: Instant,
}

impl VldbService {
    pub fn new(store: Arc<Store>, cell_name: String) -> VldbService {
        VldbService {
            store,
            cell_name,
            started: Instant::now(),
        }
    }

    /// The VLDB's monotonic clock, read when a request is handled: never earlier than
    /// the member sent it, so the VLDB's lease never ends before the member's view of it.
    fn now(&self) -> Millis {
        Millis(u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    /// Runs a blocking store operation off the async runtime.
    async fn with_store<T: Send + 'static>(
        &self,
        operation: impl FnOnce(&Store) -> Result<T, VldbError> + Send + 'static,
    ) -> Result<T, ErrorCode> {
        let store = self.store.clone();
        let outcome = tokio::task::spawn_blocking(move || operation(&store))
            .await
            .unwrap_or_else(|e| Err(VldbError::Task(e.to_string())));
        outcome.map_err(|e| {
            if !matches!(e, VldbError::Refused(_)) {
                error!(error = %e, "VLDB request failed");
            }
            e.code()
        })
    }
}

impl Service for VldbService {
    fn hello(&self, hello: &Hello) -> Result<HelloReply, ErrorCode> {
        let version = rpc::negotiate(hello, &self.cell_name)?;
        Ok(HelloReply {
            version,
            server: None,
        })
    }

    async fn handle(
        self: Arc<Self>,
        connection: Connection,
        _hello: Arc<Hello>,
        request: Request,
    ) -> Result<Response, ErrorCode> {
        debug!(peer = %connection.peer_addr(), ?request, "VLDB request");
        match request {
            Request::Ping => Ok(Response::Pong),
            Request::VlRegisterServer { server, addresses } => {
                let now = Timestamp::now();
                self.with_store(move |s| s.register_server(server, addresses, now))
                    .await
                    .map(Response::Server)
            }
            Request::VlListServers => self
                .with_store(|s| s.servers())
                .await
                .map(Response::Servers),
            Request::VlCreateEntry { name, server } => self
                .with_store(move |s| s.create_entry(&name, server))
                .await
                .map(Response::VolumeEntry),
            Request::VlRemoveEntry { volume } => self
                .with_store(move |s| s.remove_entry(&volume))
                .await
                .map(|_| Response::Ok),
            Request::VlGetEntry { volume } => self
                .with_store(move |s| s.entry(&volume))
                .await
                .map(Response::VolumeEntry),
            Request::VlListEntries => self
                .with_store(|s| s.entries())
                .await
                .map(Response::VolumeEntries),
            Request::VlJoinPair {
                pair,
                server,
                member,
            } => {
                let now = Timestamp::now();
                self.with_store(move |s| s.join_pair(&pair, server, &member, now))
                    .await
                    .map(|()| Response::Ok)
            }
            Request::VlAcquirePair {
                pair,
                member,
                epoch,
                lease_ms,
            } => {
                let now = self.now();
                let lease = Duration::from_millis(lease_ms);
                self.with_store(move |s| s.acquire_pair(&pair, &member, epoch, lease, now))
                    .await
                    .map(|epoch| Response::PairLease { epoch, lease_ms })
            }
            Request::VlRenewPair {
                pair,
                member,
                epoch,
                lease_ms,
            } => {
                let now = self.now();
                let lease = Duration::from_millis(lease_ms);
                self.with_store(move |s| s.renew_pair(&pair, &member, epoch, lease, now))
                    .await
                    .map(|epoch| Response::PairLease { epoch, lease_ms })
            }
            Request::VlReleasePair {
                pair,
                member,
                epoch,
                successor,
            } => {
                let now = self.now();
                self.with_store(move |s| {
                    s.release_pair(&pair, &member, epoch, successor.as_deref(), now)
                })
                .await
                .map(|()| Response::Ok)
            }
            Request::VlGetPair { pair } => {
                let now = self.now();
                self.with_store(move |s| s.pair(&pair, now))
                    .await
                    .map(Response::Pair)
            }
            _ => Err(ErrorCode::Unsupported),
        }
    }
}
