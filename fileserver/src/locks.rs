//! Byte-range locks across clients: the pure `LockTable`, `Leases` and `Grace` of `state`
//! in shards by fid, with leases, pushed grants and every change journaled.
//! Invariant: every change of a fid's locks is journaled under its shard's lock, so the
//! records keep the order of the changes, and its reply or push waits for its record.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};
use proto::{
    ByteRange, ClientId, ErrorCode, Fid, InstanceNonce, LockHolder, LockKind, LockOwnerId, Request,
    Response, WaitId,
};
use state::journaled::{CallbackModel, ClientEntry, LockEntry, StateRecord, StateSnapshot};
use state::{
    ClientKey, Effect, Grace, GraceCheck, GraceConfig, Leases, Lock, LockOutcome, LockOwner,
    LockTable, LockTableConfig, Millis,
};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::sessions::Sessions;
use crate::shards::{SHARD_BITS, SHARDS, shard_of};
use crate::state_journal::{Durable, StateJournal};

/// The answer to a `SetLock`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetLockReply {
    Granted,
    Queued(WaitId),
}

/// The locks of the fids that fall in one shard.
struct Shard {
    locks: LockTable,
    /// The process that took each owner's locks on a fid, for `TestLock` reports. Pruned
    /// against the table when it grows past twice the lock count, so it stays bounded.
    pids: HashMap<(Fid, LockOwner), u32>,
    /// The client and process of each queued request, by the shard table's own wait id;
    /// the process moves to `pids` when the request is granted.
    waits: HashMap<WaitId, (ClientKey, u32)>,
    /// Clients that may hold locks or queued requests in this shard: every lock and queued
    /// request of the shard belongs to one of them, so that the lapse of any other client
    /// costs no scan of the table.
    holders: HashSet<ClientKey>,
    /// Grants of queued requests not yet pushed to their client, by the shard table's
    /// wait id: one entry per push task, removed when it ends.
    pushing: HashMap<WaitId, Pushing>,
}

/// A granted request whose `LockGranted` push is under way.
struct Pushing {
    client: ClientKey,
    /// The client withdrew the request (`CancelLockWait`) meanwhile: a push that gets no
    /// answer releases the grant rather than keep it.
    withdrawn: bool,
    /// Ends (its sender dropped) once the push task is done with the grant.
    done: watch::Receiver<()>,
}

/// A grant to push once `durable`; `done` is dropped when its push task ends.
struct Delivery {
    effect: Effect,
    durable: Durable,
    done: watch::Sender<()>,
}

/// What concerns clients rather than fids.
struct Clients {
    leases: Leases,
    /// Every admitted client (bounded by the client table), for reports and snapshots.
    clients: HashMap<ClientKey, (ClientId, InstanceNonce)>,
    /// The grace period after a restart that recovered locks; `None` once it ended.
    grace: Option<Grace>,
}

/// Clients whose lease renewals are coalesced (keys at or above it renew under the
/// client lock every time); the client table's default bound fits. 8 bytes each.
const RENEWED_SLOTS: usize = 1 << 17;
/// A `renewed` slot of a client whose lease the tables do not hold.
const NEVER: u64 = u64::MAX;

/// One shard's bounds: its share of the server's, with a quarter more for fids that do
/// not spread exactly (so the server as a whole holds at most 5/4 of the defaults);
/// per-fid bounds stay whole.
fn shard_config() -> LockTableConfig {
    let whole = LockTableConfig::default();
    let share = |total: usize| (total / SHARDS) * 5 / 4;
    LockTableConfig {
        lock_count_max: share(whole.lock_count_max),
        waiter_count_max: share(whole.waiter_count_max),
        ..whole
    }
}

/// A wait id as clients see it: the shard table's own id with the shard in its low
/// bits, so that a `CancelLockWait` finds its shard.
fn client_wait(shard: usize, wait: WaitId) -> WaitId {
    // A table counts its waits from 0 by one: its top bits stay clear for ages.
    debug_assert!(wait.0 >> (u64::BITS - SHARD_BITS) == 0, "wait id overflow");
    WaitId((wait.0 << SHARD_BITS) | shard as u64)
}

/// The shard and the shard table's id of a wait id a client gave.
fn shard_wait(wait: WaitId) -> (usize, WaitId) {
    (
        (wait.0 & (SHARDS as u64 - 1)) as usize,
        WaitId(wait.0 >> SHARD_BITS),
    )
}

/// The server's lock state and the machinery to grant queued requests. Locks are taken
/// shards first, in index order, then `clients`; a lock request outside grace takes only
/// its fid's shard lock.
pub struct Locks {
    shards: Box<[Mutex<Shard>]>,
    clients: Mutex<Clients>,
    /// Whether `clients.grace` is set: outside grace a lock request does not need the
    /// client lock. Set before requests are served, cleared when grace ends.
    in_grace: AtomicBool,
    /// When each client's lease was last renewed in `clients` (`now()` ms, by key), so
    /// that the request path renews under the lock at most once per `renew_every_ms`
    /// and otherwise touches no lock at all. A skipped renewal shortens a lease by less
    /// than a tenth; the sweep marks a lapsed client `NEVER` under the lock, and a
    /// skip can only happen within a tenth of a lease of a recorded renewal, long
    /// before that renewal's expiry, so a lapsed client's next request always renews.
    renewed: Box<[AtomicU64]>,
    renew_every_ms: u64,
    sessions: Arc<Sessions>,
    journal: Arc<StateJournal>,
    origin: Instant,
}

impl Locks {
    pub fn new(sessions: Arc<Sessions>, journal: Arc<StateJournal>, lease: Duration) -> Locks {
        Locks {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        locks: LockTable::new(shard_config()),
                        pids: HashMap::new(),
                        waits: HashMap::new(),
                        holders: HashSet::new(),
                        pushing: HashMap::new(),
                    })
                })
                .collect(),
            clients: Mutex::new(Clients {
                leases: Leases::new(lease),
                clients: HashMap::new(),
                grace: None,
            }),
            in_grace: AtomicBool::new(false),
            renewed: (0..RENEWED_SLOTS).map(|_| AtomicU64::new(NEVER)).collect(),
            renew_every_ms: u64::try_from(lease.as_millis() / 10).unwrap_or(u64::MAX),
            sessions,
            journal,
            origin: Instant::now(),
        }
    }

    fn now(&self) -> Millis {
        Millis(u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    /// Locks every shard, in index order.
    fn lock_all(&self) -> Vec<MutexGuard<'_, Shard>> {
        self.shards.iter().map(|shard| shard.lock()).collect()
    }

    /// Installs the state replayed from the journal (client keys already mapped to this
    /// process's keys) and starts grace over its locks; with no `grace` (a clean
    /// handover, where the journal is known complete and every lock still has its
    /// owner) the locks stay held by their owners, whose leases start now.
    pub fn recover(
        &self,
        clients: Vec<(ClientKey, ClientId, InstanceNonce)>,
        locks: Vec<(Fid, Lock, u32)>,
        grace: Option<GraceConfig>,
        complete: bool,
    ) {
        let now = self.now();
        let mut shards = self.lock_all();
        let mut known = self.clients.lock();
        for (key, client, instance) in clients {
            known.clients.insert(key, (client, instance));
            if grace.is_none() {
                known.leases.touch(key, now);
            }
        }
        let mut recovered = Vec::new();
        for (fid, lock, pid) in locks {
            let shard = &mut shards[shard_of(fid)];
            let reply = shard
                .locks
                .lock(fid, lock.owner, lock.range, lock.kind, false);
            if reply.outcome != LockOutcome::Granted {
                warn!(?fid, ?lock, outcome = ?reply.outcome, "a recovered lock does not fit; dropped");
                continue;
            }
            shard.pids.insert((fid, lock.owner), pid);
            shard.holders.insert(lock.owner.client);
            recovered.push((fid, lock));
        }
        let Some(grace) = grace else {
            info!(
                locks = recovered.len(),
                clients = known.clients.len(),
                "locks taken over from a clean handover: no grace"
            );
            return;
        };
        let mut grace = Grace::new(grace, recovered, complete, now);
        let status = grace.status();
        info!(
            locks = status.locks_recovered,
            clients = status.clients_recovered,
            complete,
            ends_in_ms = now.until(status.ends).as_millis() as u64,
            "grace started"
        );
        // No recovered lock has an owner to wait for: grace ends at once.
        match grace.tick(now) {
            Some(end) => info!(
                ended = "early",
                reclaimed = end.reclaimed,
                dropped = 0,
                "grace ended"
            ),
            None => {
                known.grace = Some(grace);
                self.in_grace.store(true, Ordering::Release);
            }
        }
    }

    /// The running grace period, as `MemberState` reports it; `None` outside grace.
    pub fn grace_state(&self) -> Option<proto::GraceState> {
        let now = self.now();
        let known = self.clients.lock();
        let status = known.grace.as_ref()?.status();
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        Some(proto::GraceState {
            remaining_ms: u64::try_from(now.until(status.ends).as_millis()).unwrap_or(u64::MAX),
            clients_recovered: count(status.clients_recovered),
            clients_reclaimed: count(status.clients_done),
            locks_unreclaimed: count(
                status
                    .locks_recovered
                    .saturating_sub(status.locks_reclaimed),
            ),
        })
    }

    /// The lock and client state as a snapshot would hold it (for tests).
    #[cfg(test)]
    pub fn state(&self) -> StateSnapshot {
        let shards = self.lock_all();
        let known = self.clients.lock();
        StateSnapshot {
            clients: client_entries(known.clients.iter().map(|(k, v)| (*k, *v))),
            locks: shards
                .iter()
                .flat_map(|shard| lock_entries(shard.locks.iter(), &shard.pids))
                .collect(),
            callbacks: CallbackModel::default(),
            clean_handover: false,
        }
    }

    /// Buffers for the next `snapshot`'s copy, sized to the tables now (with slack for
    /// growth) and written once. Call it before taking the callbacks' lock: allocating
    /// and page-faulting megabytes is what would otherwise stall requests.
    pub fn snapshot_room(&self) -> SnapshotRoom {
        let (mut locks, mut pids) = (0, 0);
        for shard in self.shards.iter() {
            let shard = shard.lock();
            locks += shard.locks.len();
            pids += shard.pids.len();
        }
        let clients = self.clients.lock().clients.len();
        let with_slack = |len: usize| len + len / 64 + 64;
        let owner = LockOwner {
            client: ClientKey(0),
            owner: LockOwnerId(0),
        };
        let lock = Lock {
            owner,
            range: ByteRange::whole(),
            kind: LockKind::Shared,
        };
        let fid = Fid::root(proto::VolumeId(0));
        let client = (ClientId(uuid::Uuid::nil()), InstanceNonce(0));
        SnapshotRoom {
            locks: touched(with_slack(locks), (fid, lock)),
            pids: touched(with_slack(pids), ((fid, owner), 0)),
            clients: touched(with_slack(clients), (ClientKey(0), client)),
        }
    }

    /// Starts a snapshot of the lock and client state together with `callbacks`, the
    /// callback state captured under the callbacks' locks, which the caller still
    /// holds: this takes every lock of these tables too and fixes the snapshot's journal
    /// position, so no record of either table slips in between. The caller then lets
    /// the callbacks' locks go and copies this state with `Frozen::capture`; the
    /// snapshot thread waits for that copy.
    pub fn freeze(&self, callbacks: CallbackModel) -> (Frozen<'_>, Durable) {
        let shards = self.lock_all();
        let known = self.clients.lock();
        let since = Instant::now();
        let (copied, copy) = std::sync::mpsc::sync_channel::<SnapshotRoom>(1);
        let written = self.journal.snapshot(Box::new(move || {
            // No copy: `Frozen` was dropped without one, and nothing is written.
            let SnapshotRoom {
                locks,
                pids,
                clients,
            } = copy.recv().ok()?;
            let pids: HashMap<(Fid, LockOwner), u32> = pids.into_iter().collect();
            Some(StateSnapshot {
                clients: client_entries(clients.into_iter()),
                locks: lock_entries(locks.into_iter(), &pids),
                callbacks,
                clean_handover: false,
            })
        }));
        let frozen = Frozen {
            shards,
            known,
            copied,
            since,
        };
        (frozen, written)
    }

    /// A client was admitted under `key`: journal who it is.
    pub fn admitted(&self, key: ClientKey, client: ClientId, instance: InstanceNonce) {
        let mut known = self.clients.lock();
        if known.clients.get(&key) == Some(&(client, instance)) {
            return;
        }
        known.clients.insert(key, (client, instance));
        let record = StateRecord::ClientAdmitted {
            key,
            client,
            instance,
        };
        // The client's own lock records follow and wait for their sync, covering this.
        let _ = self.journal.record(&record, false);
    }

    /// The client spoke: its lease runs one more lease from now (from its last
    /// recorded renewal, when that was less than a tenth of a lease ago).
    pub fn touch(&self, client: ClientKey) {
        let now = self.now();
        let slot = self.renewed.get(client.0 as usize);
        if let Some(slot) = slot {
            let last = slot.load(Ordering::Relaxed);
            if last != NEVER && now.0 < last.saturating_add(self.renew_every_ms) {
                return;
            }
        }
        let mut known = self.clients.lock();
        known.leases.touch(client, now);
        if let Some(slot) = slot {
            slot.store(now.0, Ordering::Relaxed);
        }
    }

    /// `SetLock`: granted, queued (a `LockGranted` push follows) or refused.
    #[allow(clippy::too_many_arguments)]
    pub async fn set(
        self: &Arc<Self>,
        client: ClientKey,
        fid: Fid,
        owner: LockOwnerId,
        range: ByteRange,
        kind: LockKind,
        wait: bool,
        pid: u32,
    ) -> Result<SetLockReply, ErrorCode> {
        let owner = LockOwner { client, owner };
        let now = self.now();
        let index = shard_of(fid);
        let (answer, durable, effects) = {
            let mut shard = self.shards[index].lock();
            if self.in_grace.load(Ordering::Acquire)
                && let Some(grace) = &self.clients.lock().grace
                && let GraceCheck::Wait { retry } =
                    grace.check_new_lock(fid, owner, range, kind, now)
            {
                let retry_ms = u64::try_from(retry.as_millis()).unwrap_or(u64::MAX);
                return Err(ErrorCode::Grace { retry_ms });
            }
            let reply = shard.locks.lock(fid, owner, range, kind, wait);
            let mut durable = Durable::ready();
            let answer = match reply.outcome {
                LockOutcome::Granted => {
                    shard.pids.insert((fid, owner), pid);
                    shard.holders.insert(client);
                    durable = self.record_grant(fid, Lock { owner, range, kind }, pid);
                    Ok(SetLockReply::Granted)
                }
                LockOutcome::Queued(id) => {
                    shard.waits.insert(id, (client, pid));
                    shard.holders.insert(client);
                    Ok(SetLockReply::Queued(client_wait(index, id)))
                }
                LockOutcome::Conflict { .. } => Err(ErrorCode::WouldBlock),
                LockOutcome::TooMany => Err(ErrorCode::TooManyLocks),
            };
            let effects = self.note_grants(index, &mut shard, reply.effects);
            (answer, durable, effects)
        };
        self.deliver(effects);
        if !durable.wait().await {
            return Err(ErrorCode::Internal("state journal failed".into()));
        }
        answer
    }

    /// `ReleaseLock`: drops `owner`'s locks within `range`.
    pub async fn release(
        self: &Arc<Self>,
        client: ClientKey,
        fid: Fid,
        owner: LockOwnerId,
        range: ByteRange,
    ) -> Result<(), ErrorCode> {
        let owner = LockOwner { client, owner };
        let index = shard_of(fid);
        let (durable, effects) = {
            let mut shard = self.shards[index].lock();
            let effects = shard
                .locks
                .unlock(fid, owner, range)
                .map_err(|_| ErrorCode::TooManyLocks)?;
            let durable = self.record_release(fid, owner, range);
            prune_pids(&mut shard);
            (durable, self.note_grants(index, &mut shard, effects))
        };
        self.deliver(effects);
        if !durable.wait().await {
            return Err(ErrorCode::Internal("state journal failed".into()));
        }
        Ok(())
    }

    /// `TestLock`: what would keep this request from being granted now.
    pub fn test(
        &self,
        client: ClientKey,
        fid: Fid,
        owner: LockOwnerId,
        range: ByteRange,
        kind: LockKind,
    ) -> Option<LockHolder> {
        let owner = LockOwner { client, owner };
        let shard = self.shards[shard_of(fid)].lock();
        let holder = shard.locks.test(fid, owner, range, kind)?;
        let pid = shard.pids.get(&(fid, holder.owner)).copied().or_else(|| {
            // The obstacle may be a queued request: its process is in `waits`.
            shard
                .locks
                .waiters()
                .find(|(f, _, lock)| *f == fid && *lock == holder)
                .and_then(|(_, wait, _)| shard.waits.get(&wait).map(|(_, pid)| *pid))
        });
        // Every client with a lock was admitted; a nil id would only hide who it is.
        let client = self
            .clients
            .lock()
            .clients
            .get(&holder.owner.client)
            .map_or(ClientId(uuid::Uuid::nil()), |(id, _)| *id);
        Some(LockHolder {
            client,
            owner: holder.owner.owner,
            range: holder.range,
            kind: holder.kind,
            pid: pid.unwrap_or(0),
        })
    }

    /// `CancelLockWait`: withdraws the caller's queued request; someone else's id or an
    /// id already granted and pushed is a no-op. A grant still being pushed is marked
    /// withdrawn, and the answer waits for its push to end (the client refuses it, so it
    /// is released), so that no grant of `wait` reaches the client after this answer.
    pub async fn cancel(self: &Arc<Self>, client: ClientKey, wait: WaitId) {
        let (index, id) = shard_wait(wait);
        let (effects, pushing) = {
            let mut shard = self.shards[index].lock();
            if let Some(pushing) = shard.pushing.get_mut(&id) {
                if pushing.client != client {
                    return;
                }
                pushing.withdrawn = true;
                (Vec::new(), Some(pushing.done.clone()))
            } else {
                if shard.waits.get(&id).map(|(owner, _)| *owner) != Some(client) {
                    return;
                }
                shard.waits.remove(&id);
                let effects = shard.locks.cancel_wait(id);
                (self.note_grants(index, &mut shard, effects), None)
            }
        };
        self.deliver(effects);
        if let Some(mut done) = pushing {
            // The push has its own deadline; this bound only guards a stuck journal.
            let bound = self.sessions.call_timeout() * 2;
            let _ = tokio::time::timeout(bound, done.changed()).await;
        }
    }

    /// `ReclaimLock`: during grace, only the recorded owner, exactly as recorded. Outside
    /// grace (or for a lock grace does not list) a lock the owner holds already answers
    /// `Ok`: clients reclaim after every reconnect, also after a clean handover.
    pub fn reclaim(
        &self,
        client: ClientKey,
        fid: Fid,
        owner: LockOwnerId,
        range: ByteRange,
        kind: LockKind,
        pid: u32,
    ) -> Result<(), ErrorCode> {
        let owner = LockOwner { client, owner };
        let mut shard = self.shards[shard_of(fid)].lock();
        let lock = Lock { owner, range, kind };
        let in_grace = self
            .clients
            .lock()
            .grace
            .as_mut()
            .is_some_and(|grace| grace.reclaim(fid, lock).is_ok());
        let held = || {
            shard.locks.locks_of(client).iter().any(|(held_fid, held)| {
                *held_fid == fid
                    && held.owner == owner
                    && held.kind == kind
                    && held.range.contains(range)
            })
        };
        if !in_grace && !held() {
            return Err(ErrorCode::NotReclaimable);
        }
        shard.pids.insert((fid, owner), pid);
        debug!(client = client.0, ?fid, "lock reclaimed");
        Ok(())
    }

    /// `ReclaimDone`: the client reclaimed all it held; grace may end early.
    pub fn reclaim_done(self: &Arc<Self>, client: ClientKey) {
        if let Some(grace) = self.clients.lock().grace.as_mut() {
            grace.client_done(client);
        }
        self.tick_grace();
    }

    /// Drops every lock and queued request of `client` (it restarted, or its lease
    /// lapsed) and grants what that frees. Returns how many locks it held.
    pub fn release_client(self: &Arc<Self>, client: ClientKey) -> usize {
        let (held, effects) = {
            let mut shards = self.lock_all();
            // A restarted client cannot reclaim what its old instance held.
            if let Some(grace) = self.clients.lock().grace.as_mut() {
                for shard in &shards {
                    for (fid, lock) in shard.locks.locks_of(client) {
                        let _ = grace.reclaim(fid, lock);
                    }
                }
                grace.client_done(client);
            }
            self.release_client_locked(&mut shards, client)
        };
        self.deliver(effects);
        self.tick_grace();
        held
    }

    /// Releases the locks of clients whose lease lapsed, a bounded batch per call, and
    /// ends grace when its time is up.
    pub fn sweep(self: &Arc<Self>) {
        let now = self.now();
        let lapsed = {
            let mut known = self.clients.lock();
            let lapsed = known.leases.expired(now);
            for client in &lapsed {
                if let Some(slot) = self.renewed.get(client.0 as usize) {
                    slot.store(NEVER, Ordering::Relaxed);
                }
            }
            lapsed
        };
        let (clients, locks, effects) = if lapsed.is_empty() {
            (0, 0, Vec::new())
        } else {
            // The lease lapsed, so the locks go, even if a request of the client renews
            // it before the shards are taken: it learns so when it reclaims.
            let mut shards = self.lock_all();
            let (mut clients, mut locks, mut effects) = (0, 0, Vec::new());
            for client in lapsed {
                if !shards.iter().any(|shard| shard.holders.contains(&client)) {
                    continue;
                }
                let (held, granted) = self.release_client_locked(&mut shards, client);
                clients += 1;
                locks += held;
                effects.extend(granted);
            }
            (clients, locks, effects)
        };
        if clients > 0 {
            info!(
                clients,
                locks,
                granted = effects.len(),
                "lease lapsed: locks released"
            );
        }
        self.deliver(effects);
        self.tick_grace();
    }

    /// Ends grace if its time is up or every recovered client is done; releases the
    /// recovered locks nobody reclaimed and grants what that frees.
    fn tick_grace(self: &Arc<Self>) {
        if !self.in_grace.load(Ordering::Acquire) {
            return;
        }
        let now = self.now();
        let effects = {
            // Every shard first (the lock order): grace ends and the locks nobody
            // reclaimed go in one step, so that no reclaim or new lock can see the one
            // without the other and be told it holds a lock about to be released.
            let mut shards = self.lock_all();
            let mut known = self.clients.lock();
            let Some(end) = known.grace.as_mut().and_then(|grace| grace.tick(now)) else {
                return;
            };
            known.grace = None;
            self.in_grace.store(false, Ordering::Release);
            info!(
                ended = if end.early { "early" } else { "timeout" },
                reclaimed = end.reclaimed,
                dropped = end.dropped.len(),
                "grace ended"
            );
            let mut effects = Vec::new();
            for (fid, lock) in end.dropped {
                let index = shard_of(fid);
                let shard = &mut shards[index];
                // Unlocking a recovered range never splits a lock of another range, but
                // an error would only leave the lock until its lease lapses.
                if let Ok(granted) = shard.locks.unlock(fid, lock.owner, lock.range) {
                    let _ = self.record_release(fid, lock.owner, lock.range);
                    effects.extend(self.note_grants(index, shard, granted));
                }
            }
            effects
        };
        self.deliver(effects);
    }

    /// Drops `client`'s locks and queued requests from every shard (`shards` holds them
    /// all, locked) and journals it under all of them, so that the record keeps its place
    /// among each fid's records; then grants what that frees. Returns how many locks it
    /// held.
    fn release_client_locked(
        &self,
        shards: &mut [MutexGuard<'_, Shard>],
        client: ClientKey,
    ) -> (usize, Vec<Delivery>) {
        let mut held = 0;
        let mut freed = Vec::new();
        for (index, shard) in shards.iter_mut().enumerate() {
            if !shard.holders.remove(&client) {
                continue;
            }
            held += shard
                .locks
                .iter()
                .filter(|(_, lock)| lock.owner.client == client)
                .count();
            let granted = shard.locks.release_client(client);
            shard.pids.retain(|(_, owner), _| owner.client != client);
            shard.waits.retain(|_, (owner, _)| *owner != client);
            freed.push((index, granted));
        }
        if held > 0 {
            // Waited for by nothing: the client is gone, and a lost record only means
            // recovery brings back a lock that grace then drops. Journaled before the
            // grants it frees, which replay must find free.
            let _ = self
                .journal
                .record(&StateRecord::ClientReleased { key: client }, false);
        }
        let mut effects = Vec::new();
        for (index, granted) in freed {
            effects.extend(self.note_grants(index, &mut shards[index], granted));
        }
        (held, effects)
    }

    /// Journals the queued requests `effects` of shard `index` granted and moves their
    /// processes from `waits` to `pids`; each grant's push waits for its record. The
    /// effects returned carry the wait ids clients know.
    fn note_grants(&self, index: usize, shard: &mut Shard, effects: Vec<Effect>) -> Vec<Delivery> {
        effects
            .into_iter()
            .map(|effect| {
                let Effect::Granted {
                    wait,
                    fid,
                    owner,
                    range,
                    kind,
                } = effect;
                let pid = shard.waits.remove(&wait).map_or(0, |(_, pid)| pid);
                shard.pids.insert((fid, owner), pid);
                let durable = self.record_grant(fid, Lock { owner, range, kind }, pid);
                let (done, until_done) = watch::channel(());
                shard.pushing.insert(
                    wait,
                    Pushing {
                        client: owner.client,
                        withdrawn: false,
                        done: until_done,
                    },
                );
                let effect = Effect::Granted {
                    wait: client_wait(index, wait),
                    fid,
                    owner,
                    range,
                    kind,
                };
                Delivery {
                    effect,
                    durable,
                    done,
                }
            })
            .collect()
    }

    /// The push of the grant of `wait` (a client's id) ended: forgets it; returns whether
    /// the client withdrew the request meanwhile.
    fn pushed(&self, wait: WaitId) -> bool {
        let (index, id) = shard_wait(wait);
        let mut shard = self.shards[index].lock();
        shard.pushing.remove(&id).is_some_and(|p| p.withdrawn)
    }

    fn record_grant(&self, fid: Fid, lock: Lock, pid: u32) -> Durable {
        self.journal
            .record(&StateRecord::LockGranted { fid, lock, pid }, true)
    }

    fn record_release(&self, fid: Fid, owner: LockOwner, range: ByteRange) -> Durable {
        self.journal
            .record(&StateRecord::LockReleased { fid, owner, range }, true)
    }

    /// Tells each client whose queued request was granted, once the grant is durable.
    /// Only a client that answers "nobody here waits for that" loses the grant again. A
    /// push that got no answer (timeout, lost connection) may still have arrived, so the
    /// grant stays, exactly like a lock granted in a direct reply: the client's lease or
    /// its reclaim after reconnecting settles it. Releasing it would hand the range to
    /// the next waiter while the first may already believe it holds it.
    fn deliver(self: &Arc<Self>, effects: Vec<Delivery>) {
        for Delivery {
            effect,
            durable,
            done,
        } in effects
        {
            let Effect::Granted {
                wait,
                fid,
                owner,
                range,
                ..
            } = effect;
            let this = self.clone();
            tokio::spawn(async move {
                if !durable.wait().await {
                    // The journal failed: the grant was never made known to anyone.
                    this.pushed(wait);
                    this.withdraw(fid, owner, range);
                    return;
                }
                let push = this.push(owner, wait, fid).await;
                let withdrawn = this.pushed(wait);
                match push {
                    Push::Acknowledged => {
                        debug!(
                            client = owner.client.0,
                            wait = wait.0,
                            "queued lock granted"
                        );
                    }
                    Push::Unanswered if withdrawn => {
                        debug!(
                            client = owner.client.0,
                            wait = wait.0,
                            "lock grant unanswered and its request withdrawn; releasing it"
                        );
                        this.withdraw(fid, owner, range);
                    }
                    Push::Unanswered => debug!(
                        client = owner.client.0,
                        wait = wait.0,
                        "lock grant not acknowledged; kept until the lease or a reclaim settles it"
                    ),
                    // An interrupted waiter refuses the grant it withdrew: expected.
                    Push::Refused if withdrawn => {
                        debug!(
                            client = owner.client.0,
                            wait = wait.0,
                            "grant of a withdrawn lock request refused; releasing it"
                        );
                        this.withdraw(fid, owner, range);
                    }
                    Push::Refused => {
                        warn!(
                            client = owner.client.0,
                            wait = wait.0,
                            "client refused a lock grant; releasing it"
                        );
                        this.withdraw(fid, owner, range);
                    }
                }
                // Only now may a `CancelLockWait` waiting on this push answer.
                drop(done);
            });
        }
    }

    /// Takes back a grant its owner does not know of, and grants what that frees.
    fn withdraw(self: &Arc<Self>, fid: Fid, owner: LockOwner, range: ByteRange) {
        // Releasing the granted range also drops any lock the owner held there before:
        // it asked to replace that range anyway.
        let index = shard_of(fid);
        let effects = {
            let mut shard = self.shards[index].lock();
            let effects = shard.locks.unlock(fid, owner, range).unwrap_or_default();
            let _ = self.record_release(fid, owner, range);
            self.note_grants(index, &mut shard, effects)
        };
        self.deliver(effects);
    }

    async fn push(&self, owner: LockOwner, wait: WaitId, fid: Fid) -> Push {
        let Some(connection) = self.sessions.connection(owner.client) else {
            return Push::Unanswered;
        };
        let request = Request::LockGranted { wait, fid };
        let timeout = self.sessions.call_timeout();
        match connection.call(request, timeout).await {
            Ok(Response::Ok) => Push::Acknowledged,
            Err(e) if e.is_transport() => Push::Unanswered,
            Ok(_) | Err(_) => Push::Refused,
        }
    }
}

/// The lock and client state held still for a snapshot whose journal position is
/// fixed: every shard's lock and the client lock.
pub struct Frozen<'a> {
    shards: Vec<MutexGuard<'a, Shard>>,
    known: MutexGuard<'a, Clients>,
    copied: std::sync::mpsc::SyncSender<SnapshotRoom>,
    since: Instant,
}

impl Frozen<'_> {
    /// Copies the state into `room` (flat copies only: locks, clients, the pid maps'
    /// entries; `room` grows if the tables outgrew it), lets the locks go and hands the
    /// copy to the snapshot thread, which matches pids to locks, encodes and writes.
    /// Returns how long the locks were held.
    pub fn capture(self, room: SnapshotRoom) -> Duration {
        let SnapshotRoom {
            mut locks,
            mut pids,
            mut clients,
        } = room;
        let Frozen {
            shards,
            known,
            copied,
            since,
        } = self;
        for shard in &shards {
            locks.extend(shard.locks.iter());
            pids.extend(shard.pids.iter().map(|(key, pid)| (*key, *pid)));
        }
        clients.extend(known.clients.iter().map(|(key, client)| (*key, *client)));
        drop((known, shards));
        let held = since.elapsed();
        // Room for one: never blocks. An error means the journal dropped the snapshot.
        let _ = copied.send(SnapshotRoom {
            locks,
            pids,
            clients,
        });
        held
    }
}

/// Empty buffers with room for one snapshot's copy of the lock state, made by
/// `Locks::snapshot_room` before any lock is taken.
pub struct SnapshotRoom {
    locks: Vec<(Fid, Lock)>,
    pids: Vec<((Fid, LockOwner), u32)>,
    clients: Vec<(ClientKey, (ClientId, InstanceNonce))>,
}

/// An empty vector with room for `len` items whose memory was written once, so that
/// filling it later takes no page faults.
fn touched<T: Clone>(len: usize, filler: T) -> Vec<T> {
    let mut buffer = Vec::with_capacity(len);
    buffer.resize(len, filler);
    buffer.clear();
    buffer
}

/// How a client answered a pushed lock grant.
enum Push {
    Acknowledged,
    /// No answer: the client may or may not have seen it.
    Unanswered,
    /// The client said no request of its waits for this grant.
    Refused,
}

fn client_entries(
    clients: impl Iterator<Item = (ClientKey, (ClientId, InstanceNonce))>,
) -> Vec<ClientEntry> {
    clients
        .map(|(key, (client, instance))| ClientEntry {
            key,
            client,
            instance,
        })
        .collect()
}

fn lock_entries(
    locks: impl Iterator<Item = (Fid, Lock)>,
    pids: &HashMap<(Fid, LockOwner), u32>,
) -> Vec<LockEntry> {
    locks
        .map(|(fid, lock)| LockEntry {
            fid,
            lock,
            pid: pids.get(&(fid, lock.owner)).copied().unwrap_or(0),
        })
        .collect()
}

/// Forgets the processes of owners that hold nothing any more, once the side map has
/// grown past twice the table (amortized: each prune halves it at least).
fn prune_pids(shard: &mut Shard) {
    if shard.pids.len() <= 2 * shard.locks.len() + 64 {
        return;
    }
    let live: HashSet<(Fid, LockOwner)> = shard
        .locks
        .iter()
        .map(|(fid, lock)| (fid, lock.owner))
        .collect();
    shard.pids.retain(|key, _| live.contains(key));
}

/// A range from a request, refused as an invalid argument when empty.
pub fn checked(range: ByteRange) -> Result<ByteRange, ErrorCode> {
    range.checked().map_err(|_| ErrorCode::InvalidArgument)
}

#[cfg(test)]
mod tests {
    use state::JournalMode;

    use super::*;
    use crate::restart::test_tables;
    use crate::state_journal::TestLog;

    const ONE: LockOwnerId = LockOwnerId(1);

    fn sorted(mut locks: Vec<LockEntry>) -> Vec<LockEntry> {
        locks.sort_unstable_by_key(|l| (l.fid, l.lock.owner, l.lock.range));
        locks
    }

    /// Queued requests on fids of every shard get distinct wait ids, and cancelling by
    /// the id a client was given withdraws the right request: releasing the holder's
    /// locks afterwards grants nothing.
    #[tokio::test]
    async fn a_wait_id_finds_its_shard_for_a_cancel() {
        let log = TestLog::new();
        let (_partition, journal, _) = log.open(JournalMode::None);
        let (_, locks) = test_tables(&journal);
        let (holder, waiter) = (ClientKey(0), ClientKey(1));
        let fids: Vec<Fid> = (0..64u64)
            .map(|vnode| Fid {
                volume: proto::VolumeId(1),
                vnode: proto::VnodeId(vnode + 2),
                unique: proto::Uniquifier(1),
            })
            .collect();
        let shards: HashSet<usize> = fids.iter().map(|&fid| shard_of(fid)).collect();
        assert_eq!(shards.len(), SHARDS, "the fids cover every shard");
        let whole = ByteRange::whole();
        let mut waits = HashSet::new();
        for &fid in &fids {
            let granted = locks
                .set(holder, fid, ONE, whole, LockKind::Exclusive, false, 1)
                .await;
            assert_eq!(granted, Ok(SetLockReply::Granted));
            let queued = locks
                .set(waiter, fid, ONE, whole, LockKind::Exclusive, true, 2)
                .await;
            let Ok(SetLockReply::Queued(wait)) = queued else {
                panic!("expected a queued request, got {queued:?}");
            };
            assert!(waits.insert(wait), "wait id {wait:?} given twice");
        }
        for &wait in &waits {
            locks.cancel(waiter, wait).await;
        }
        for &fid in &fids {
            assert_eq!(locks.release(holder, fid, ONE, whole).await, Ok(()));
        }
        assert!(locks.state().locks.is_empty());
    }

    #[tokio::test]
    async fn a_snapshot_keeps_every_lock_and_its_pid_even_past_its_room() {
        let log = TestLog::new();
        let (partition, journal, _) = log.open(JournalMode::None);
        let (callbacks, locks) = test_tables(&journal);
        let (id, instance) = (ClientId::random(), InstanceNonce(1));
        let key = callbacks.sessions().recover(id, instance).unwrap();
        locks.admitted(key, id, instance);
        // Made for an empty table: the 200 locks below outgrow it.
        let room = locks.snapshot_room();
        for vnode in 0..200u32 {
            let fid = Fid {
                volume: proto::VolumeId(1),
                vnode: proto::VnodeId(u64::from(vnode) + 2),
                unique: proto::Uniquifier(1),
            };
            let reply = locks
                .set(
                    key,
                    fid,
                    ONE,
                    ByteRange::whole(),
                    LockKind::Shared,
                    false,
                    vnode + 1,
                )
                .await;
            assert_eq!(reply, Ok(SetLockReply::Granted));
        }
        let live = locks.state();
        crate::restart::snapshot_into(&callbacks, &locks, room);
        drop((callbacks, locks));
        Arc::into_inner(journal).unwrap().close();
        drop(partition);

        let (_partition, journal, replayed) = log.open(JournalMode::None);
        journal.close();
        assert_eq!(live.locks.len(), 200);
        assert!(
            live.locks
                .iter()
                .all(|lock| lock.pid == lock.fid.vnode.0 as u32 - 1)
        );
        assert_eq!(sorted(replayed.locks), sorted(live.locks));
        assert_eq!(replayed.clients.len(), 1);
    }
}
