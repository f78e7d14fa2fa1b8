//! One term of serving a partition: the open volumes and their metadata log, the state
//! journal on that log, the callback and lock tables rebuilt from it, and their sweepers.
//! Invariant: a term ends in exactly one way: `close` (journal closed cleanly),
//! `hand_over` (snapshot, handover mark, close) or `abandon` (nothing more written).

use std::sync::Arc;

use proto::Epoch;
use state::GraceConfig;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::callbacks::Callbacks;
use crate::config::Config;
use crate::error::FileServerError;
use crate::fence::Fence;
use crate::locks::Locks;
use crate::restart;
use crate::service::FileService;
use crate::sessions::Sessions;
use crate::state_journal::{JournalStop, StateJournal};
use crate::storage::Partition;
use crate::sweep::{lease_sweep_period, sweep_expired, sweep_leases};

/// What a term recovered when it opened, for the takeover log line.
#[derive(Clone, Copy, Debug, Default)]
pub struct Recovered {
    pub clients: usize,
    pub locks: usize,
    pub callbacks: usize,
    pub volumes: usize,
    /// The journal ended with a clean handover: no grace.
    pub clean_handover: bool,
}

/// An open partition and the state served from it. A single server has one term for its
/// whole run; a pair member opens one each time it wins the lease, behind a fence
/// already open (opening the partition checks it).
pub struct Active {
    pub service: Arc<FileService>,
    journal: Arc<StateJournal>,
    callbacks: Arc<Callbacks>,
    locks: Arc<Locks>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Active {
    /// Opens the partition behind `fence` (replaying its log into the volumes), then the
    /// state journal on the same log, restores the journaled state
    /// (grace unless the journal ends with a clean handover) and starts the sweepers.
    pub async fn open(
        config: &Config,
        fence: Arc<Fence>,
        epoch: Epoch,
    ) -> Result<(Active, Recovered), FileServerError> {
        let path = config.partition.clone();
        let mode = config.journal_mode;
        let stats = config.stats.clone();
        let (partition, (journal, state)) = tokio::task::spawn_blocking(move || {
            let partition = Partition::open(&path, fence.clone())?;
            partition.observe(stats);
            let journal = StateJournal::open(&partition, &path, mode, fence, epoch)?;
            Ok::<_, FileServerError>((partition, journal))
        })
        .await
        .map_err(|e| FileServerError::Task(e.to_string()))??;
        let recovered = Recovered {
            clients: state.clients.len(),
            locks: state.locks.len(),
            callbacks: state.callbacks.promises.len(),
            volumes: partition.volumes().len(),
            clean_handover: state.clean_handover,
        };
        let partition = Arc::new(partition);
        let journal = Arc::new(journal);
        let sessions = Arc::new(Sessions::new(config.client_count_max, config.break_timeout));
        let callbacks = Arc::new(Callbacks::new(
            config.callback_count_max,
            config.delayed_breaks_per_client_max,
            sessions.clone(),
            journal.clone(),
        ));
        let locks = Arc::new(Locks::new(sessions.clone(), journal.clone(), config.lease));
        let grace = GraceConfig {
            length: config.grace,
            ..GraceConfig::default()
        };
        // Served only once the restored state is durable in this process's terms: the
        // records on disk name the previous process's client keys, and a restored
        // promise's new expiry is journaled nowhere else.
        if restart::restore(&callbacks, &locks, state, grace, mode)
            && !restart::snapshot(&callbacks, &locks, &config.stats)
                .wait()
                .await
        {
            return Err(FileServerError::RestoreSnapshot);
        }
        let service = Arc::new(FileService {
            partition,
            sessions,
            callbacks: callbacks.clone(),
            locks: locks.clone(),
            cell: config.cell.name.clone(),
            stats: config.stats.clone(),
            access_checks: !config.skip_access_checks,
        });
        let (stop, stopped) = watch::channel(false);
        let sweep_period = lease_sweep_period(config.lease, config.grace);
        let tasks = vec![
            tokio::spawn(sweep_expired(callbacks.clone(), stopped.clone())),
            tokio::spawn(sweep_leases(
                callbacks.clone(),
                locks.clone(),
                journal.clone(),
                config.stats.clone(),
                sweep_period,
                stopped,
            )),
        ];
        let active = Active {
            service,
            journal,
            callbacks,
            locks,
            stop,
            tasks,
        };
        Ok((active, recovered))
    }

    /// Resolves once the state journal stopped appending, and why: the term must end
    /// by `abandon` (after `Failed` the fence is closed for good and the process stops).
    pub fn journal_stopped(&self) -> impl Future<Output = JournalStop> + Send + 'static {
        self.journal.stopped()
    }

    /// Ends the term cleanly: the journal gets every record handed over and is closed.
    pub async fn close(self) {
        let journal = self.stop_tasks();
        if let Err(e) = tokio::task::spawn_blocking(move || journal.close()).await {
            warn!(error = %e, "closing the state journal failed");
        }
    }

    /// Ends the term for a planned switchover: a final snapshot, then the handover mark
    /// that lets the partner start without grace, then a clean close. The caller admits
    /// no request and has none in flight. Returns whether the mark is durable.
    pub async fn hand_over(self, epoch: Epoch) -> bool {
        restart::snapshot(&self.callbacks, &self.locks, &self.service.stats);
        let marked = self.journal.handover(epoch).await;
        info!(epoch = epoch.0, marked, "state handed over");
        self.close().await;
        marked
    }

    /// Ends the term after the fence closed: everything is dropped, nothing written (the
    /// fence refuses every write the drops might still attempt).
    pub fn abandon(self) {
        let journal = self.stop_tasks();
        // Its writer may outlive the term in tasks still holding the tables.
        journal.abandon();
    }

    fn stop_tasks(self) -> Arc<StateJournal> {
        let _ = self.stop.send(true);
        for task in &self.tasks {
            task.abort();
        }
        self.journal
    }
}
