//! The grace period after a restart or takeover: recovered locks kept for their owners,
//! colliding new locks held back, and what nobody reclaimed dropped at the end.
//! Invariant: a recovered lock is reclaimed at most once, only by its recorded owner and
//! exactly as recorded; once over, grace holds nothing back and never ends again.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use proto::{ByteRange, Fid, LockKind};
use smallvec::SmallVec;
use thiserror::Error;

use crate::client_table::ClientKey;
use crate::lock_table::{LEASE_DEFAULT, Lock, LockOwner};
use crate::time::Millis;

/// How long grace lasts and how soon a held-back request should retry.
#[derive(Clone, Debug)]
pub struct GraceConfig {
    /// Default: one client lease, so every live client has had the chance to renew
    /// (and thereby find the new server) and reclaim.
    pub length: Duration,
    pub retry: Duration,
}

impl Default for GraceConfig {
    fn default() -> Self {
        GraceConfig {
            length: LEASE_DEFAULT,
            retry: Duration::from_secs(1),
        }
    }
}

/// Whether a new (not reclaimed) lock request may proceed during grace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GraceCheck {
    /// Go on to the lock table.
    Allow,
    /// Answer `Grace`: the client retries after `retry`.
    Wait { retry: Duration },
}

#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum GraceError {
    /// No such lock was recovered for this owner, or it was already reclaimed.
    #[error("no such recovered lock")]
    NotRecovered,
    /// Grace is over: unreclaimed locks are gone.
    #[error("grace period is over")]
    Over,
}

/// How grace ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GraceEnd {
    /// Every recovered client said it was done before the full length.
    pub early: bool,
    pub reclaimed: usize,
    /// Recovered locks nobody reclaimed, in fid and range order: the server releases
    /// them from its lock table, which wakes their waiters.
    pub dropped: Vec<(Fid, Lock)>,
}

/// What `pair status` and `state inspect` show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GraceStatus {
    pub over: bool,
    /// The recovered state is provably complete (`sync` journal mode).
    pub complete: bool,
    pub ends: Millis,
    pub locks_recovered: usize,
    pub locks_reclaimed: usize,
    pub clients_recovered: usize,
    pub clients_done: usize,
}

/// The grace period of one server start. The server keeps the recovered locks in its
/// `LockTable` throughout; this is only the bookkeeping of which of them are still
/// unclaimed, and of who may lock meanwhile.
#[derive(Debug)]
pub struct Grace {
    config: GraceConfig,
    complete: bool,
    ends: Millis,
    /// Exactly the recovered locks not yet reclaimed. A fid's locks inline when it has
    /// one (the common case): no allocation per fid.
    unreclaimed: HashMap<Fid, SmallVec<[Lock; 1]>>,
    locks_recovered: usize,
    locks_reclaimed: usize,
    clients_recovered: usize,
    /// Recovered clients that have not said they are done.
    clients_pending: BTreeSet<ClientKey>,
    over: bool,
}

impl Grace {
    /// Starts grace at `now` over the `recovered` locks. `complete` says the recovered
    /// state holds every lock granted before the restart.
    pub fn new(
        config: GraceConfig,
        recovered: impl IntoIterator<Item = (Fid, Lock)>,
        complete: bool,
        now: Millis,
    ) -> Grace {
        let mut unreclaimed: HashMap<Fid, SmallVec<[Lock; 1]>> = HashMap::new();
        let mut clients_pending = BTreeSet::new();
        let mut locks_recovered = 0;
        for (fid, lock) in recovered {
            let locks = unreclaimed.entry(fid).or_default();
            // A lock recorded twice is one lock: reclaiming it once must suffice.
            if !locks.contains(&lock) {
                locks.push(lock);
                locks_recovered += 1;
                clients_pending.insert(lock.owner.client);
            }
        }
        Grace {
            ends: now.saturating_add(config.length),
            config,
            complete,
            unreclaimed,
            locks_recovered,
            locks_reclaimed: 0,
            clients_recovered: clients_pending.len(),
            clients_pending,
            over: false,
        }
    }

    /// `lock.owner` reclaims `lock` on `fid`: it must match a recovered, unreclaimed
    /// lock exactly (owner, range and kind).
    pub fn reclaim(&mut self, fid: Fid, lock: Lock) -> Result<(), GraceError> {
        if self.over {
            return Err(GraceError::Over);
        }
        let locks = self
            .unreclaimed
            .get_mut(&fid)
            .ok_or(GraceError::NotRecovered)?;
        let index = locks
            .iter()
            .position(|recovered| *recovered == lock)
            .ok_or(GraceError::NotRecovered)?;
        locks.swap_remove(index);
        if locks.is_empty() {
            self.unreclaimed.remove(&fid);
        }
        self.locks_reclaimed += 1;
        Ok(())
    }

    /// May `owner` take a new lock on `range` of `fid` now? During grace it waits if it
    /// could collide with an unreclaimed lock: one of another owner it conflicts with,
    /// or one of its own it overlaps (it must reclaim that first, or dropping it at the
    /// end would cut into the new lock). With incomplete state anything may collide with
    /// a lock nobody recorded, so every new lock waits, as in NFSv4.
    pub fn check_new_lock(
        &self,
        fid: Fid,
        owner: LockOwner,
        range: ByteRange,
        kind: LockKind,
        now: Millis,
    ) -> GraceCheck {
        if self.over {
            return GraceCheck::Allow;
        }
        let request = Lock { owner, range, kind };
        let collides = !self.complete
            || self.unreclaimed.get(&fid).is_some_and(|locks| {
                locks.iter().any(|recovered| {
                    recovered.conflicts(&request)
                        || (recovered.owner == owner && recovered.range.overlaps(range))
                })
            });
        if !collides {
            return GraceCheck::Allow;
        }
        // Never ask for a retry past the end, nor for none at all.
        let retry = self
            .config
            .retry
            .min(now.until(self.ends))
            .max(Duration::from_millis(1));
        GraceCheck::Wait { retry }
    }

    /// `client` has reclaimed everything it holds.
    pub fn client_done(&mut self, client: ClientKey) {
        self.clients_pending.remove(&client);
    }

    /// Ends grace when its length has passed, or early once every recovered client is
    /// done. Returns `Some` exactly once.
    pub fn tick(&mut self, now: Millis) -> Option<GraceEnd> {
        if self.over {
            return None;
        }
        let early = now < self.ends;
        if early && !self.clients_pending.is_empty() {
            return None;
        }
        self.over = true;
        let mut dropped: Vec<(Fid, Lock)> = self
            .unreclaimed
            .drain()
            .flat_map(|(fid, locks)| locks.into_iter().map(move |lock| (fid, lock)))
            .collect();
        dropped.sort_unstable_by_key(|(fid, lock)| (*fid, lock.range, lock.owner, lock.kind));
        Some(GraceEnd {
            early,
            reclaimed: self.locks_reclaimed,
            dropped,
        })
    }

    pub fn is_over(&self) -> bool {
        self.over
    }

    pub fn status(&self) -> GraceStatus {
        GraceStatus {
            over: self.over,
            complete: self.complete,
            ends: self.ends,
            locks_recovered: self.locks_recovered,
            locks_reclaimed: self.locks_reclaimed,
            clients_recovered: self.clients_recovered,
            clients_done: self.clients_recovered - self.clients_pending.len(),
        }
    }
}

#[cfg(test)]
mod tests;
