//! The Holdfast fileserver: volumes on a partition, the RPC service, callback breaking.
//! Entry point: `run(config, listener, shutdown)`; it binds nothing itself.

mod callbacks;
mod config;
mod registration;
mod service;
mod stats;
pub mod storage;

use std::sync::Arc;
use std::time::Duration;

use proto::server::ServerLimits;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::info;

pub use config::Config;
pub use stats::Stats;
pub use storage::StorageError;

use callbacks::Callbacks;
use service::FileService;
use storage::Partition;

/// How often expired callback promises are swept (a bounded batch each time).
const EXPIRE_INTERVAL: Duration = Duration::from_secs(5);

/// Why the fileserver could not run.
#[derive(Debug, Error)]
pub enum FileServerError {
    #[error("open partition: {0}")]
    Partition(#[from] StorageError),
    #[error("open partition: the opening task failed: {0}")]
    Task(String),
}

/// Opens the partition, registers with the VLDB in the background and serves on
/// `listener` until `shutdown` turns true.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: watch::Receiver<bool>,
) -> Result<(), FileServerError> {
    let path = config.partition.clone();
    let partition = tokio::task::spawn_blocking(move || Partition::open(&path))
        .await
        .map_err(|e| FileServerError::Task(e.to_string()))??;
    let partition = Arc::new(partition);
    let server_id = partition.server_id();
    let callbacks = Arc::new(Callbacks::new(
        config.callback_count_max,
        config.client_count_max,
        config.delayed_breaks_per_client_max,
        config.break_timeout,
    ));
    let service = Arc::new(FileService {
        partition,
        callbacks: callbacks.clone(),
        cell: config.cell.name.clone(),
        stats: config.stats.clone(),
    });
    let registration = tokio::spawn(registration::register_until_done(
        config.cell.clone(),
        server_id,
        config.advertise.clone(),
        config.vldb_timeout,
        shutdown.clone(),
    ));
    let sweeper = tokio::spawn(sweep_expired(callbacks, shutdown.clone()));
    info!(server = %server_id, address = ?listener.local_addr().ok(), "fileserver serving");
    proto::server::serve(listener, service, ServerLimits::default(), shutdown).await;
    registration.abort();
    sweeper.abort();
    info!(server = %server_id, "fileserver stopped");
    Ok(())
}

async fn sweep_expired(callbacks: Arc<Callbacks>, mut shutdown: watch::Receiver<bool>) {
    let mut interval = tokio::time::interval(EXPIRE_INTERVAL);
    loop {
        tokio::select! {
            _ = interval.tick() => {
                callbacks.expire();
            }
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}
