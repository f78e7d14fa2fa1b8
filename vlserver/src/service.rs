//! `VldbService`: answers VLDB requests on connections accepted by `proto::server::serve`.
//! Boundary: requests arrive decoded; store errors become `ErrorCode`s here, and storage
//! failures are logged here, where they are handled.

use std::sync::Arc;

use proto::rpc::{self, Connection};
use proto::server::Service;
use proto::{ErrorCode, Hello, HelloReply, Request, Response, Timestamp};
use tracing::{debug, error};

use crate::error::VldbError;
use crate::store::Store;

pub struct VldbService {
    store: Arc<Store>,
    cell_name: String,
}

impl VldbService {
    pub fn new(store: Arc<Store>, cell_name: String) -> VldbService {
        VldbService { store, cell_name }
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
            _ => Err(ErrorCode::Unsupported),
        }
    }
}
