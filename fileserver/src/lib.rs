//! The Holdfast fileserver: volumes on a partition, the RPC service, callback breaking,
//! byte-range locks, and the journal of callback, lock and client state it restarts from.
//! Entry point: `run(config, listener, shutdown)`; it binds nothing itself.

mod active;
pub mod bench;
mod callbacks;
mod config;
pub mod fence;
mod history;
pub mod inspect;
mod locks;
mod pair;
mod registration;
mod restart;
mod server_lock;
mod service;
mod shards;
mod state_journal;
mod stats;
pub mod storage;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use proto::Epoch;
use proto::server::ServerLimits;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::info;

pub use config::{Config, PairConfig};
pub use state_journal::StateJournalError;
pub use stats::Stats;
pub use storage::StorageError;

use active::Active;
use callbacks::Callbacks;
use fence::Fence;
use history::History;
use locks::Locks;
use pair::MemberService;
use state_journal::{JournalStop, StateJournal};

/// How often expired callback promises are swept (a bounded batch each time).
const EXPIRE_INTERVAL: Duration = Duration::from_secs(5);
/// The shortest period of the lease and grace sweeper.
pub(crate) const MIN_SWEEP: Duration = Duration::from_millis(10);

/// Why the fileserver could not run.
#[derive(Debug, Error)]
pub enum FileServerError {
    #[error("open partition: {0}")]
    Partition(#[from] StorageError),
    #[error("open partition: the opening task failed: {0}")]
    Task(String),
    #[error(transparent)]
    Journal(#[from] StateJournalError),
    #[error(
        "the recovered callback and lock state could not be snapshotted; the log says why (a full or failing disk?)"
    )]
    RestoreSnapshot,
    #[error(
        "{0}; the fileserver stopped so that no lock or callback promise goes unjournaled: fix the disk (full or failing?) and start it again, and clients reclaim their locks and callbacks"
    )]
    JournalFailed(String),
    #[error(
        "partition {path} is in use by another fileserver ({lock} is locked); stop it or use another partition"
    )]
    PartitionInUse { path: PathBuf, lock: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

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
        () = proto::server::serve(listener, service, ServerLimits::default(), shutdown) => None,
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

/// The failure of a journal whose stop nobody was waiting for any more.
pub(crate) const JOURNAL_FAILED_LATE: &str =
    "the state journal failed while the term ended (the log says why)";

pub(crate) async fn sweep_expired(callbacks: Arc<Callbacks>, mut shutdown: watch::Receiver<bool>) {
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

/// Releases the locks of clients whose lease lapsed, ends grace on time and snapshots
/// the journaled state when due. Runs a few times per lease (and grace) so a lapse or
/// the end of grace is noticed well within its length.
pub(crate) async fn sweep_leases(
    callbacks: Arc<Callbacks>,
    locks: Arc<Locks>,
    journal: Arc<StateJournal>,
    stats: Arc<Stats>,
    period: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut interval = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = interval.tick() => {
                locks.sweep();
                if journal.snapshot_due() {
                    restart::snapshot(&callbacks, &locks, &stats);
                }
            }
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}
