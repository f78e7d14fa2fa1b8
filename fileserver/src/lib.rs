//! The Holdfast fileserver: volumes on a partition served over RPC, with callback
//! promises, byte-range locks and the journal of their state it restarts from.
//! Invariant: `run(config, listener, shutdown)` binds nothing itself, and returns an
//! error rather than serve on once the state journal failed.

mod active;
pub mod bench;
mod callbacks;
mod config;
mod error;
pub mod fence;
mod history;
pub mod inspect;
mod locks;
mod pair;
mod registration;
mod restart;
mod server_lock;
mod service;
mod sessions;
mod shards;
mod state_journal;
mod stats;
pub mod storage;
mod sweep;
#[cfg(test)]
mod test_rng;

use std::sync::Arc;

use proto::Epoch;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::info;

pub use config::{Config, PairConfig, Tokens};
pub use error::FileServerError;
pub use state_journal::StateJournalError;
pub use stats::Stats;
pub use storage::StorageError;

use active::Active;
use error::JOURNAL_FAILED_LATE;
use fence::Fence;
use history::History;
use pair::MemberService;
use state_journal::JournalStop;

/// Serves the partition on `listener` until `shutdown` turns true. A single server
/// (no `config.pair`) takes `PARTITION/server.lock`, opens the partition and its state
/// journal, rebuilds the callback and lock state (grace when locks were recovered) and
/// registers with the VLDB in the background. A pair member runs `pair::run` instead.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: watch::Receiver<bool>,
) -> Result<(), FileServerError> {
    if let Some(pair) = config.pair.clone() {
        return pair::run(config, pair, listener, shutdown).await;
    }
    let path = config.partition.clone();
    let lock = tokio::task::spawn_blocking(move || server_lock::take(&path))
        .await
        .map_err(|e| FileServerError::Task(e.to_string()))??;
    // A single server is never fenced: nothing else may open the partition.
    let fence = Arc::new(Fence::open());
    let (active, _) = Active::open(&config, fence.clone(), Epoch(0)).await?;
    let server_id = active.service.partition.server_id();
    let history = config.history.as_deref().map(History::open).transpose()?;
    let member = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let service = Arc::new(MemberService::single(
        &config,
        member,
        server_id,
        fence.clone(),
        history,
        active.service.clone(),
    ));
    let registration = tokio::spawn(registration::register_until_done(
        config.cell.clone(),
        config.transport.clone(),
        server_id,
        config.advertise.clone(),
        config.vldb_timeout,
        shutdown.clone(),
    ));
    info!(server = %server_id, address = ?listener.local_addr().ok(), "fileserver serving");
    // A journal that stops closed the fence for good (a single server's fence closes no
    // other way): nothing more is answered, and dropping the serving future ends every
    // connection at once.
    let stopped = tokio::select! {
        () = proto::server::serve(
            listener,
            service,
            config.connection_limits.clone(),
            config.transport.clone(),
            shutdown,
        ) => None,
        why = active.journal_stopped() => Some(why),
    };
    registration.abort();
    let result = match stopped {
        None => {
            active.close().await;
            info!(server = %server_id, "fileserver stopped");
            // The journal may have failed during the shutdown or its last appends.
            if fence.is_closed_for_good() {
                Err(FileServerError::JournalFailed(JOURNAL_FAILED_LATE.into()))
            } else {
                Ok(())
            }
        }
        Some(why) => {
            active.abandon();
            Err(FileServerError::JournalFailed(match why {
                JournalStop::Failed(reason) => reason,
                JournalStop::Fenced => "the state journal stopped".into(),
            }))
        }
    };
    drop(lock);
    result
}
