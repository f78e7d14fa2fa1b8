//! The Holdfast VLDB server: maps volume names and ids to sites, and records fileservers
//! and pairs.
//! Invariant: `run` binds nothing, and all state is behind `Store`, whose operations take
//! the clock as an input.

mod error;
mod limits;
mod pairs;
mod service;
mod store;
mod tables;

use std::path::PathBuf;
use std::sync::Arc;

use proto::server::{ServerLimits, serve};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::info;

pub use error::VldbError;
pub use limits::StoreLimits;
pub use service::VldbService;
pub use store::{IDS_PER_VOLUME, Store, VOLUME_ID_FIRST};
pub use tables::FORMAT_VERSION;

/// The database file inside the data directory.
pub const DATABASE_FILE: &str = "vldb.redb";

#[derive(Clone, Debug)]
pub struct Config {
    /// Directory holding the database file; created if missing.
    pub data_dir: PathBuf,
    /// The cell this VLDB serves; connections naming another cell are refused.
    pub cell_name: String,
}

/// Serves the VLDB on `listener` until `shutdown` turns true.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: watch::Receiver<bool>,
) -> Result<(), VldbError> {
    let data_dir = config.data_dir.clone();
    let store = tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&data_dir).map_err(|source| VldbError::CreateDir {
            path: data_dir.clone(),
            source,
        })?;
        Store::open(&data_dir.join(DATABASE_FILE), StoreLimits::default())
    })
    .await
    .map_err(|e| VldbError::Task(e.to_string()))??;
    let local = listener.local_addr().ok();
    info!(cell = %config.cell_name, data = %config.data_dir.display(), listen = ?local,
        "vlserver started");
    let service = Arc::new(VldbService::new(Arc::new(store), config.cell_name));
    serve(listener, service, ServerLimits::default(), shutdown).await;
    info!("vlserver stopped");
    Ok(())
}
