//! The lock table: advisory byte-range locks per fid, granted to (client, lock owner)
//! pairs, and the FIFO queues of the requests blocked on them.
//! Invariant: no two granted locks on a fid conflict; an owner's locks on a fid are
//! disjoint, adjacent ones of one kind merged; the bounds on locks and waiters hold.

mod lease;
mod lock;
mod queue;

use std::collections::HashMap;

use proto::{ByteRange, Fid, LockKind, WaitId};
use smallvec::SmallVec;
use thiserror::Error;

use crate::client_table::ClientKey;

pub use lease::{LEASE_DEFAULT, LEASE_EXPIRE_BATCH_MAX, Leases};
pub use lock::{Lock, LockOwner};
use queue::{WaitQueue, Waiter};

/// Bounds on what clients can make the table hold.
#[derive(Clone, Debug)]
pub struct LockTableConfig {
    pub lock_count_max: usize,
    pub lock_count_per_fid_max: usize,
    pub waiter_count_max: usize,
    pub waiter_count_per_fid_max: usize,
}

impl Default for LockTableConfig {
    fn default() -> Self {
        LockTableConfig {
            lock_count_max: 100_000,
            lock_count_per_fid_max: 1024,
            waiter_count_max: 10_000,
            waiter_count_per_fid_max: 256,
        }
    }
}

/// The answer to a lock request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockOutcome {
    Granted,
    /// Not granted and not queued (`wait == false`): `holder` is in the way. It is a
    /// granted lock, or a request queued earlier that this one may not overtake.
    Conflict {
        holder: Lock,
    },
    /// Blocked; an `Effect::Granted` with this id follows when the range frees.
    Queued(WaitId),
    /// Granting or queueing would exceed the table's bounds.
    TooMany,
}

/// What the server must do after a table change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// A queued request is now granted: record it and wake the client.
    Granted {
        wait: WaitId,
        fid: Fid,
        owner: LockOwner,
        range: ByteRange,
        kind: LockKind,
    },
}

/// The outcome of `lock`, and the queued requests it made grantable (a downgrade or a
/// shrink by the same owner frees bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockReply {
    pub outcome: LockOutcome,
    pub effects: Vec<Effect>,
}

/// An unlock would split a lock when the table is full.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
#[error("lock table full: an unlock inside a lock would split it")]
pub struct TooManyLocks;

/// The locks of one fid. Most locked fids hold one lock and nobody waits, so that case
/// lives in the table's entry itself: no allocation, no pointer to chase when a
/// snapshot copies the table.
#[derive(Debug, Default)]
struct FileLocks {
    granted: SmallVec<[Lock; 1]>,
    waiters: WaitQueue,
}

impl FileLocks {
    fn is_empty(&self) -> bool {
        self.granted.is_empty() && self.waiters.is_empty()
    }

    /// What keeps `request` from being granted: a conflicting granted lock (the lowest
    /// one, so the answer is deterministic), else a conflicting request among the first
    /// `ahead` waiters that is not itself waiting on the requester.
    ///
    /// Fairness: a conflicting request queued earlier holds a request back as a granted
    /// lock does, so a stream of shared requests cannot starve a queued exclusive one. A
    /// queued request that is itself waiting on the requester's own locks does not: that
    /// would deadlock an upgrade.
    fn blocker(&self, request: &Lock, ahead: usize) -> Option<Lock> {
        let granted = self
            .granted
            .iter()
            .filter(|held| held.conflicts(request))
            .min_by_key(|held| (held.range, held.owner));
        if let Some(held) = granted {
            return Some(*held);
        }
        self.waiters
            .iter()
            .take(ahead)
            .map(|waiter| waiter.lock)
            .find(|queued| queued.conflicts(request) && !self.waits_on(queued, request.owner))
    }

    /// Whether `queued` is blocked by a granted lock of `owner`.
    fn waits_on(&self, queued: &Lock, owner: LockOwner) -> bool {
        self.granted
            .iter()
            .any(|held| held.owner == owner && held.conflicts(queued))
    }

    /// `owner`'s locks on this file after it locks (`Some(kind)`) or unlocks (`None`)
    /// `range`, by POSIX rules: the new lock replaces whatever the owner held in
    /// `range`, pieces outside it survive, and adjacent locks of one kind merge.
    fn plan(&self, owner: LockOwner, range: ByteRange, kind: Option<LockKind>) -> Vec<Lock> {
        let mut planned = Vec::new();
        for held in self.granted.iter().filter(|held| held.owner == owner) {
            if !held.range.overlaps(range) {
                planned.push(*held);
                continue;
            }
            let (below, above) = held.range.around(range);
            for piece in [below, above].into_iter().flatten() {
                planned.push(Lock {
                    range: piece,
                    ..*held
                });
            }
        }
        if let Some(kind) = kind {
            let mut merged = range;
            planned.retain(|held| {
                let adjacent =
                    held.range.end() == merged.start() || held.range.start() == merged.end();
                if held.kind == kind && adjacent {
                    merged = merged.cover(held.range);
                    return false;
                }
                true
            });
            planned.push(Lock {
                owner,
                range: merged,
                kind,
            });
        }
        planned
    }

    fn held_by(&self, owner: LockOwner) -> usize {
        self.granted
            .iter()
            .filter(|held| held.owner == owner)
            .count()
    }

    fn commit(&mut self, owner: LockOwner, planned: Vec<Lock>) {
        self.granted.retain(|held| held.owner != owner);
        self.granted.extend(planned);
        self.shrink();
    }

    /// Moves the granted locks back inline once a fid that held several holds one again.
    fn shrink(&mut self) {
        if self.granted.spilled() && self.granted.len() <= self.granted.inline_size() {
            self.granted.shrink_to_fit();
        }
    }
}

/// The table of byte-range locks of one server. Not done: deadlock detection (`EDEADLK`)
/// across owners.
#[derive(Debug)]
pub struct LockTable {
    config: LockTableConfig,
    files: HashMap<Fid, FileLocks>,
    /// Where each queued request waits: exactly the queued requests, no more.
    waits: HashMap<WaitId, Fid>,
    lock_count: usize,
    next_wait: u64,
}

impl LockTable {
    pub fn new(config: LockTableConfig) -> LockTable {
        assert!(
            config.lock_count_max > 0 && config.lock_count_per_fid_max > 0,
            "a lock table needs room"
        );
        LockTable {
            config,
            files: HashMap::new(),
            waits: HashMap::new(),
            lock_count: 0,
            next_wait: 0,
        }
    }

    /// Number of granted locks.
    pub fn len(&self) -> usize {
        self.lock_count
    }

    pub fn is_empty(&self) -> bool {
        self.lock_count == 0
    }

    /// Number of queued requests.
    pub fn waiter_count(&self) -> usize {
        self.waits.len()
    }

    /// `owner` asks for `range` of `fid` as `kind` (`F_SETLK`, or `F_SETLKW` and
    /// blocking `flock` with `wait`). Granted at once when nothing is in the way;
    /// otherwise queued if `wait`, else refused naming what is in the way.
    pub fn lock(
        &mut self,
        fid: Fid,
        owner: LockOwner,
        range: ByteRange,
        kind: LockKind,
        wait: bool,
    ) -> LockReply {
        let request = Lock { owner, range, kind };
        let file = self.files.entry(fid).or_default();
        let ahead = file.waiters.len();
        let outcome = match file.blocker(&request, ahead) {
            Some(holder) if !wait => LockOutcome::Conflict { holder },
            Some(_) => {
                if file.waiters.len() >= self.config.waiter_count_per_fid_max
                    || self.waits.len() >= self.config.waiter_count_max
                {
                    LockOutcome::TooMany
                } else {
                    let id = WaitId(self.next_wait);
                    self.next_wait += 1;
                    file.waiters.push_back(Waiter {
                        wait: id,
                        lock: request,
                    });
                    self.waits.insert(id, fid);
                    LockOutcome::Queued(id)
                }
            }
            None => {
                let planned = file.plan(owner, range, Some(kind));
                if fits(&self.config, self.lock_count, file, owner, &planned) {
                    self.lock_count = self.lock_count + planned.len() - file.held_by(owner);
                    file.commit(owner, planned);
                    LockOutcome::Granted
                } else {
                    LockOutcome::TooMany
                }
            }
        };
        let effects = match outcome {
            LockOutcome::Granted => self.wake(fid),
            _ => Vec::new(),
        };
        self.drop_if_empty(fid);
        LockReply { outcome, effects }
    }

    /// `owner` releases `range` of `fid`; returns the queued requests now granted.
    /// Unlocking the middle of a lock splits it, which fails only when the table is
    /// full; unlocking the whole file never fails.
    pub fn unlock(
        &mut self,
        fid: Fid,
        owner: LockOwner,
        range: ByteRange,
    ) -> Result<Vec<Effect>, TooManyLocks> {
        let Some(file) = self.files.get_mut(&fid) else {
            return Ok(Vec::new());
        };
        let held = file.held_by(owner);
        if held == 0 {
            return Ok(Vec::new());
        }
        let planned = file.plan(owner, range, None);
        if !fits(&self.config, self.lock_count, file, owner, &planned) {
            return Err(TooManyLocks);
        }
        self.lock_count = self.lock_count + planned.len() - held;
        file.commit(owner, planned);
        let effects = self.wake(fid);
        self.drop_if_empty(fid);
        Ok(effects)
    }

    /// `F_GETLK`: what would keep `owner` from locking `range` as `kind` right now,
    /// exactly as `lock` without `wait` would answer.
    pub fn test(
        &self,
        fid: Fid,
        owner: LockOwner,
        range: ByteRange,
        kind: LockKind,
    ) -> Option<Lock> {
        let file = self.files.get(&fid)?;
        file.blocker(&Lock { owner, range, kind }, file.waiters.len())
    }

    /// Withdraws a queued request (the caller was interrupted or went away). Requests
    /// queued behind it may become grantable. An unknown id is a no-op: the request may
    /// have been granted in the meantime.
    pub fn cancel_wait(&mut self, wait: WaitId) -> Vec<Effect> {
        let Some(fid) = self.waits.remove(&wait) else {
            return Vec::new();
        };
        if let Some(file) = self.files.get_mut(&fid) {
            file.waiters.retain(|waiter| waiter.wait != wait);
        }
        let effects = self.wake(fid);
        self.drop_if_empty(fid);
        effects
    }

    /// Drops every lock and queued request of `client` (its lease lapsed or it
    /// restarted), returning the requests of others now granted, in fid order. Scans
    /// the table: this happens once per lapse, not per request.
    pub fn release_client(&mut self, client: ClientKey) -> Vec<Effect> {
        let mut touched: Vec<Fid> = Vec::new();
        for (&fid, file) in &mut self.files {
            let (granted, waiters) = (file.granted.len(), file.waiters.len());
            file.granted.retain(|held| held.owner.client != client);
            file.shrink();
            file.waiters.retain(|waiter| {
                let mine = waiter.lock.owner.client == client;
                if mine {
                    self.waits.remove(&waiter.wait);
                }
                !mine
            });
            if file.granted.len() != granted || file.waiters.len() != waiters {
                self.lock_count -= granted - file.granted.len();
                touched.push(fid);
            }
        }
        touched.sort_unstable();
        let mut effects = Vec::new();
        for fid in touched {
            effects.extend(self.wake(fid));
            self.drop_if_empty(fid);
        }
        effects
    }

    /// The locks `client` holds, in fid order (for its reclaim list and inspection).
    pub fn locks_of(&self, client: ClientKey) -> Vec<(Fid, Lock)> {
        let mut locks: Vec<(Fid, Lock)> = self
            .iter()
            .filter(|(_, lock)| lock.owner.client == client)
            .collect();
        locks.sort_unstable_by_key(|(fid, lock)| (*fid, lock.range, lock.owner));
        locks
    }

    /// Every granted lock, in no particular order (for snapshots and `state inspect`).
    pub fn iter(&self) -> impl Iterator<Item = (Fid, Lock)> + '_ {
        self.files
            .iter()
            .flat_map(|(&fid, file)| file.granted.iter().map(move |&lock| (fid, lock)))
    }

    /// Every queued request, oldest first per fid, fids in no particular order.
    pub fn waiters(&self) -> impl Iterator<Item = (Fid, WaitId, Lock)> + '_ {
        self.files.iter().flat_map(|(&fid, file)| {
            file.waiters
                .iter()
                .map(move |waiter| (fid, waiter.wait, waiter.lock))
        })
    }

    /// Grants, oldest first, every queued request on `fid` that nothing is in the way
    /// of any longer. A request still in the way of a later one keeps it waiting.
    /// A grant can free bytes for a request passed over earlier (the new lock replaces
    /// a stronger one of the same owner), so passes repeat until one grants nothing.
    fn wake(&mut self, fid: Fid) -> Vec<Effect> {
        let mut effects = Vec::new();
        let Some(file) = self.files.get_mut(&fid) else {
            return effects;
        };
        loop {
            let before = effects.len();
            let mut index = 0;
            while let Some(Waiter { wait, lock }) = file.waiters.get(index) {
                if file.blocker(&lock, index).is_some() {
                    index += 1;
                    continue;
                }
                let planned = file.plan(lock.owner, lock.range, Some(lock.kind));
                if !fits(&self.config, self.lock_count, file, lock.owner, &planned) {
                    // Full: it stays queued and is retried at the next change here.
                    index += 1;
                    continue;
                }
                self.lock_count = self.lock_count + planned.len() - file.held_by(lock.owner);
                file.commit(lock.owner, planned);
                file.waiters.remove(index);
                self.waits.remove(&wait);
                effects.push(Effect::Granted {
                    wait,
                    fid,
                    owner: lock.owner,
                    range: lock.range,
                    kind: lock.kind,
                });
            }
            if effects.len() == before {
                return effects;
            }
        }
    }

    fn drop_if_empty(&mut self, fid: Fid) {
        if self.files.get(&fid).is_some_and(FileLocks::is_empty) {
            self.files.remove(&fid);
        }
    }
}

/// Whether replacing `owner`'s locks on `file` by `planned` stays within the bounds.
/// Shrinking is always allowed, so a table over a lowered bound can drain.
fn fits(
    config: &LockTableConfig,
    lock_count: usize,
    file: &FileLocks,
    owner: LockOwner,
    planned: &[Lock],
) -> bool {
    let held = file.held_by(owner);
    if planned.len() <= held {
        return true;
    }
    let added = planned.len() - held;
    lock_count + added <= config.lock_count_max
        && file.granted.len() + added <= config.lock_count_per_fid_max
}

#[cfg(test)]
mod tests;
