//! The Holdfast fileserver: volumes on a partition, the RPC service, callback breaking,
//! byte-range locks, and the journal of callback, lock and client state it restarts from.
//! Entry point: `run(config, listener, shutdown)`; it binds nothing itself.

pub mod bench;
mod callback_model;
mod callbacks;
mod config;
pub mod inspect;
mod locks;
mod registration;
mod restart;
mod service;
mod state_journal;
mod stats;
pub mod storage;

use std::sync::Arc;
use std::time::Duration;

use proto::server::ServerLimits;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

pub use config::Config;
pub use state_journal::StateJournalError;
pub use stats::Stats;
pub use storage::StorageError;

use callbacks::Callbacks;
use locks::Locks;
use service::FileService;
use state::GraceConfig;
use state_journal::StateJournal;
use storage::Partition;

/// How often expired callback promises are swept (a bounded batch each time).
const EXPIRE_INTERVAL: Duration = Duration::from_secs(5);
/// The shortest period of the lease and grace sweeper.
const MIN_SWEEP: Duration = Duration::from_millis(10);

/// Why the fileserver could not run.
#[derive(Debug, Error)]
pub enum FileServerError {
    #[error("open partition: {0}")]
    Partition(#[from] StorageError),
    #[error("open partition: the opening task failed: {0}")]
    Task(String),
    #[error(transparent)]
    Journal(#[from] StateJournalError),
}

/// Opens the partition and its state journal, rebuilds the callback and lock state from
/// it (starting grace when locks were recovered), registers with the VLDB in the
/// background and serves on `listener` until `shutdown` turns true.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: watch::Receiver<bool>,
) -> Result<(), FileServerError> {
    let path = config.partition.clone();
    let mode = config.journal_mode;
    let (partition, (journal, recovered)) = tokio::task::spawn_blocking(move || {
        let partition = Partition::open(&path)?;
        let journal = StateJournal::open(&path, mode)?;
        Ok::<_, FileServerError>((partition, journal))
    })
    .await
    .map_err(|e| FileServerError::Task(e.to_string()))??;
    let partition = Arc::new(partition);
    let server_id = partition.server_id();
    let journal = Arc::new(journal);
    let callbacks = Arc::new(Callbacks::new(
        config.callback_count_max,
        config.client_count_max,
        config.delayed_breaks_per_client_max,
        config.break_timeout,
        journal.clone(),
    ));
    let locks = Arc::new(Locks::new(callbacks.clone(), journal.clone(), config.lease));
    let grace = GraceConfig {
        length: config.grace,
        ..GraceConfig::default()
    };
    if restart::restore(&callbacks, &locks, recovered, grace, mode) {
        restart::snapshot(&callbacks, &locks, &config.stats);
    }
    let service = Arc::new(FileService {
        partition,
        callbacks: callbacks.clone(),
        locks: locks.clone(),
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
    let sweeper = tokio::spawn(sweep_expired(callbacks.clone(), shutdown.clone()));
    let sweep_period = (config.lease.min(config.grace) / 4).clamp(MIN_SWEEP, EXPIRE_INTERVAL);
    let lease_sweeper = tokio::spawn(sweep_leases(
        callbacks,
        locks,
        journal.clone(),
        config.stats.clone(),
        sweep_period,
        shutdown.clone(),
    ));
    info!(server = %server_id, address = ?listener.local_addr().ok(), "fileserver serving");
    proto::server::serve(listener, service, ServerLimits::default(), shutdown).await;
    registration.abort();
    sweeper.abort();
    lease_sweeper.abort();
    if let Err(e) = tokio::task::spawn_blocking(move || journal.close()).await {
        warn!(error = %e, "closing the state journal failed");
    }
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

/// Releases the locks of clients whose lease lapsed, ends grace on time and snapshots
/// the journaled state when due. Runs a few times per lease (and grace) so a lapse or
/// the end of grace is noticed well within its length.
async fn sweep_leases(
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
