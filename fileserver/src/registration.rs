//! Registration with the VLDB: announces a single server's id and addresses, retrying
//! with exponential backoff until it succeeds or the server stops.
//! Invariant: registration runs beside the server, which serves meanwhile, and holds no
//! request up.

use std::time::Duration;

use proto::{CellConfig, PeerKind, ServerId, Transport, VldbClient};
use tokio::sync::watch;
use tracing::{info, warn};

const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Registers until success or shutdown. Each failure is one WARN line; the backoff
/// doubling keeps that to a handful per minute.
pub async fn register_until_done(
    cell: CellConfig,
    transport: Transport,
    server: ServerId,
    addresses: Vec<String>,
    timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    if cell.vlservers.is_empty() {
        warn!(cell = %cell.name, "the cell names no vlservers; not registering");
        return;
    }
    let client = VldbClient::new(cell, transport, PeerKind::FileServer { server }, timeout);
    let mut backoff = BACKOFF_FIRST;
    loop {
        let attempt = tokio::select! {
            attempt = client.register_server(server, addresses.clone()) => attempt,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        match attempt {
            Ok(()) => {
                info!(%server, ?addresses, "registered with the VLDB");
                return;
            }
            Err(e) => {
                warn!(error = %e, retry_in = ?backoff, "could not register with the VLDB");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}
