//! The periodic work of a term: expired promises dropped, lapsed leases and grace ended,
//! and the journaled state snapshotted when due.
//! Invariant: the sweepers stop with their term, and the lease sweeper runs a few times
//! per lease and grace, so a lapse or the end of grace is noticed well within its length.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::callbacks::Callbacks;
use crate::locks::Locks;
use crate::restart;
use crate::state_journal::StateJournal;
use crate::stats::Stats;

/// How often expired callback promises are swept (a bounded batch each time).
const EXPIRE_INTERVAL: Duration = Duration::from_secs(5);
/// The shortest and longest period of the lease and grace sweeper.
const LEASE_SWEEP_MIN: Duration = Duration::from_millis(10);
const LEASE_SWEEP_MAX: Duration = Duration::from_secs(5);

/// The lease and grace sweeper's period for a lease and a grace of these lengths.
pub fn lease_sweep_period(lease: Duration, grace: Duration) -> Duration {
    (lease.min(grace) / 4).clamp(LEASE_SWEEP_MIN, LEASE_SWEEP_MAX)
}

pub async fn sweep_expired(callbacks: Arc<Callbacks>, mut shutdown: watch::Receiver<bool>) {
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
pub async fn sweep_leases(
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
