//! Byte-range locks across clients: the I/O side of the pure `LockTable`, `Leases` and
//! `Grace` in the `state` crate. Holds them behind one short lock, renews a client's lease
//! on each of its requests, pushes `LockGranted` to a client whose queued request became
//! grantable, releases the locks of clients whose lease lapsed or that restarted, and
//! journals every change of the granted locks and known clients.
//! Invariant: a lock granted from the queue is either acknowledged by its client's
//! `LockGranted` reply or released again (which may grant others in turn); every change
//! is handed to the journal under the tables' lock, so records keep the order of the
//! changes, and a lock reply or push waits until its record is durable (per mode); every
//! lock and queued request belongs to a client in `holders`, so a lapse of any other
//! client costs no table scan.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use proto::{ClientId, ErrorCode, Fid, InstanceNonce, LockHolder, Request, Response};
use state::{
    ByteRange, ClientKey, Effect, Grace, GraceCheck, GraceConfig, Leases, Lock, LockKind,
    LockOutcome, LockOwner, LockTable, LockTableConfig, Millis, WaitId,
};
use tracing::{debug, info, warn};

use crate::callback_model::CallbackModel;
use crate::callbacks::Callbacks;
use crate::state_journal::{
    ClientEntry, Durable, LockEntry, StateJournal, StateRecord, StateSnapshot,
};

/// The answer to a `SetLock`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetLockReply {
    Granted,
    Queued(WaitId),
}

struct Tables {
    locks: LockTable,
    leases: Leases,
    /// The process that took each owner's locks on a fid, for `TestLock` reports. Pruned
    /// against the table when it grows past twice the lock count, so it stays bounded.
    pids: HashMap<(Fid, LockOwner), u32>,
    /// The client and process of each queued request; the process moves to `pids` when
    /// the request is granted.
    waits: HashMap<WaitId, (ClientKey, u32)>,
    /// Clients that may hold locks or queued requests.
    holders: HashSet<ClientKey>,
    /// Every admitted client (bounded by the client table), for reports and snapshots.
    clients: HashMap<ClientKey, (ClientId, InstanceNonce)>,
    /// The grace period after a restart that recovered locks; `None` once it ended.
    grace: Option<Grace>,
}

/// Clients whose lease renewals are coalesced (keys at or above it renew under the
/// mutex every time); the client table's default bound fits. 8 bytes each.
const RENEWED_SLOTS: usize = 1 << 17;
/// A `renewed` slot of a client whose lease the tables do not hold.
const NEVER: u64 = u64::MAX;

/// The server's lock state and the machinery to grant queued requests.
pub struct Locks {
    tables: Mutex<Tables>,
    /// When each client's lease was last renewed in `tables` (`now()` ms, by key), so
    /// that the request path renews under the mutex at most once per `renew_every_ms`
    /// and otherwise touches no lock at all. A skipped renewal shortens a lease by less
    /// than a tenth; the sweep marks a lapsed client `NEVER` under the mutex, and a
    /// skip can only happen within a tenth of a lease of a recorded renewal, long
    /// before that renewal's expiry, so a lapsed client's next request always renews.
    renewed: Box<[AtomicU64]>,
    renew_every_ms: u64,
    callbacks: Arc<Callbacks>,
    journal: Arc<StateJournal>,
    origin: Instant,
}

impl Locks {
    pub fn new(callbacks: Arc<Callbacks>, journal: Arc<StateJournal>, lease: Duration) -> Locks {
        Locks {
            tables: Mutex::new(Tables {
                locks: LockTable::new(LockTableConfig::default()),
                leases: Leases::new(lease),
                pids: HashMap::new(),
                waits: HashMap::new(),
                holders: HashSet::new(),
                clients: HashMap::new(),
                grace: None,
            }),
            renewed: (0..RENEWED_SLOTS).map(|_| AtomicU64::new(NEVER)).collect(),
            renew_every_ms: u64::try_from(lease.as_millis() / 10).unwrap_or(u64::MAX),
            callbacks,
            journal,
            origin: Instant::now(),
        }
    }

    fn now(&self) -> Millis {
        Millis(u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX))
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
        let mut tables = self.tables.lock();
        for (key, client, instance) in clients {
            tables.clients.insert(key, (client, instance));
            if grace.is_none() {
                tables.leases.touch(key, now);
            }
        }
        let mut recovered = Vec::new();
        for (fid, lock, pid) in locks {
            let reply = tables
                .locks
                .lock(fid, lock.owner, lock.range, lock.kind, false);
            if reply.outcome != LockOutcome::Granted {
                warn!(?fid, ?lock, outcome = ?reply.outcome, "a recovered lock does not fit; dropped");
                continue;
            }
            tables.pids.insert((fid, lock.owner), pid);
            tables.holders.insert(lock.owner.client);
            recovered.push((fid, lock));
        }
        let Some(grace) = grace else {
            info!(
                locks = recovered.len(),
                clients = tables.clients.len(),
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
            None => tables.grace = Some(grace),
        }
    }

    /// The running grace period, as `MemberState` reports it; `None` outside grace.
    pub fn grace_state(&self) -> Option<proto::GraceState> {
        let now = self.now();
        let tables = self.tables.lock();
        let status = tables.grace.as_ref()?.status();
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
        capture(&self.tables.lock())
    }

    /// Buffers for the next `snapshot`'s copy, sized to the tables now (with slack for
    /// growth) and written once. Call it before taking the callbacks' lock: allocating
    /// and page-faulting megabytes is what would otherwise stall requests.
    pub fn snapshot_room(&self) -> SnapshotRoom {
        let (locks, pids, clients) = {
            let tables = self.tables.lock();
            (tables.locks.len(), tables.pids.len(), tables.clients.len())
        };
        let with_slack = |len: usize| len + len / 64 + 64;
        let owner = LockOwner {
            client: ClientKey(0),
            owner: 0,
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

    /// Writes a snapshot of the lock and client state together with `callbacks`, the
    /// callback state captured under the callbacks' lock, which the caller still holds:
    /// with both locks held no record can slip in between. Under the lock only flat
    /// copies into `room` are made (locks, clients, the pid map's entries; `room` grows
    /// if the tables outgrew it); matching pids to locks, encoding and writing happen
    /// on the snapshot thread.
    pub fn snapshot(&self, callbacks: CallbackModel, room: SnapshotRoom) {
        let SnapshotRoom {
            mut locks,
            mut pids,
            mut clients,
        } = room;
        let tables = self.tables.lock();
        locks.extend(tables.locks.iter());
        pids.extend(tables.pids.iter().map(|(key, pid)| (*key, *pid)));
        clients.extend(tables.clients.iter().map(|(key, client)| (*key, *client)));
        self.journal.snapshot(Box::new(move || {
            let pids: HashMap<(Fid, LockOwner), u32> = pids.into_iter().collect();
            StateSnapshot {
                clients: client_entries(clients.into_iter()),
                locks: lock_entries(locks.into_iter(), &pids),
                callbacks,
                clean_handover: false,
            }
        }));
    }

    /// A client was admitted under `key`: journal who it is.
    pub fn admitted(&self, key: ClientKey, client: ClientId, instance: InstanceNonce) {
        let mut tables = self.tables.lock();
        if tables.clients.get(&key) == Some(&(client, instance)) {
            return;
        }
        tables.clients.insert(key, (client, instance));
        let record = StateRecord::ClientAdmitted {
            key: key.0,
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
        let mut tables = self.tables.lock();
        tables.leases.touch(client, now);
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
        owner: u64,
        range: ByteRange,
        kind: LockKind,
        wait: bool,
        pid: u32,
    ) -> Result<SetLockReply, ErrorCode> {
        let owner = LockOwner { client, owner };
        let now = self.now();
        let (answer, durable, effects) = {
            let mut tables = self.tables.lock();
            if let Some(grace) = &tables.grace
                && let GraceCheck::Wait { retry } =
                    grace.check_new_lock(fid, owner, range, kind, now)
            {
                let retry_ms = u64::try_from(retry.as_millis()).unwrap_or(u64::MAX);
                return Err(ErrorCode::Grace { retry_ms });
            }
            let reply = tables.locks.lock(fid, owner, range, kind, wait);
            let mut durable = Durable::ready();
            let answer = match reply.outcome {
                LockOutcome::Granted => {
                    tables.pids.insert((fid, owner), pid);
                    tables.holders.insert(client);
                    durable = self.record_grant(fid, owner, range, kind, pid);
                    Ok(SetLockReply::Granted)
                }
                LockOutcome::Queued(id) => {
                    tables.waits.insert(id, (client, pid));
                    tables.holders.insert(client);
                    Ok(SetLockReply::Queued(id))
                }
                LockOutcome::Conflict { .. } => Err(ErrorCode::WouldBlock),
                LockOutcome::TooMany => Err(ErrorCode::TooManyLocks),
            };
            let effects = self.note_grants(&mut tables, reply.effects);
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
        owner: u64,
        range: ByteRange,
    ) -> Result<(), ErrorCode> {
        let owner = LockOwner { client, owner };
        let (durable, effects) = {
            let mut tables = self.tables.lock();
            let effects = tables
                .locks
                .unlock(fid, owner, range)
                .map_err(|_| ErrorCode::TooManyLocks)?;
            let durable = self.record_release(fid, owner, range);
            prune_pids(&mut tables);
            (durable, self.note_grants(&mut tables, effects))
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
        owner: u64,
        range: ByteRange,
        kind: LockKind,
    ) -> Option<LockHolder> {
        let owner = LockOwner { client, owner };
        let tables = self.tables.lock();
        let holder = tables.locks.test(fid, owner, range, kind)?;
        let pid = tables.pids.get(&(fid, holder.owner)).copied().or_else(|| {
            // The obstacle may be a queued request: its process is in `waits`.
            tables
                .locks
                .waiters()
                .find(|(f, _, lock)| *f == fid && *lock == holder)
                .and_then(|(_, wait, _)| tables.waits.get(&wait).map(|(_, pid)| *pid))
        });
        // Every client with a lock was admitted; a nil id would only hide who it is.
        let client = tables
            .clients
            .get(&holder.owner.client)
            .map_or(ClientId(uuid::Uuid::nil()), |(id, _)| *id);
        Some(LockHolder {
            client,
            owner: holder.owner.owner,
            start: holder.range.start(),
            end: holder.range.end(),
            kind: wire_kind(holder.kind),
            pid: pid.unwrap_or(0),
        })
    }

    /// `CancelLockWait`: withdraws the caller's queued request; someone else's id or an
    /// id already granted is a no-op.
    pub fn cancel(self: &Arc<Self>, client: ClientKey, wait: WaitId) {
        let effects = {
            let mut tables = self.tables.lock();
            if tables.waits.get(&wait).map(|(owner, _)| *owner) != Some(client) {
                return;
            }
            tables.waits.remove(&wait);
            let effects = tables.locks.cancel_wait(wait);
            self.note_grants(&mut tables, effects)
        };
        self.deliver(effects);
    }

    /// `ReclaimLock`: during grace, only the recorded owner, exactly as recorded. Outside
    /// grace (or for a lock grace does not list) a lock the owner holds already answers
    /// `Ok`: clients reclaim after every reconnect, also after a clean handover.
    pub fn reclaim(
        &self,
        client: ClientKey,
        fid: Fid,
        owner: u64,
        range: ByteRange,
        kind: LockKind,
        pid: u32,
    ) -> Result<(), ErrorCode> {
        let owner = LockOwner { client, owner };
        let mut tables = self.tables.lock();
        let lock = Lock { owner, range, kind };
        let in_grace = tables
            .grace
            .as_mut()
            .is_some_and(|grace| grace.reclaim(fid, lock).is_ok());
        let held = || {
            tables
                .locks
                .locks_of(client)
                .iter()
                .any(|(held_fid, held)| {
                    *held_fid == fid
                        && held.owner == owner
                        && held.kind == kind
                        && held.range.start() <= range.start()
                        && range.end() <= held.range.end()
                })
        };
        if !in_grace && !held() {
            return Err(ErrorCode::NotReclaimable);
        }
        tables.pids.insert((fid, owner), pid);
        debug!(client = client.0, ?fid, "lock reclaimed");
        Ok(())
    }

    /// `ReclaimDone`: the client reclaimed all it held; grace may end early.
    pub fn reclaim_done(self: &Arc<Self>, client: ClientKey) {
        if let Some(grace) = self.tables.lock().grace.as_mut() {
            grace.client_done(client);
        }
        self.tick_grace();
    }

    /// Drops every lock and queued request of `client` (it restarted, or its lease
    /// lapsed) and grants what that frees. Returns how many locks it held.
    pub fn release_client(self: &Arc<Self>, client: ClientKey) -> usize {
        let (held, effects) = {
            let mut guard = self.tables.lock();
            let tables = &mut *guard;
            // A restarted client cannot reclaim what its old instance held.
            if let Some(grace) = tables.grace.as_mut() {
                for (fid, lock) in tables.locks.locks_of(client) {
                    let _ = grace.reclaim(fid, lock);
                }
                grace.client_done(client);
            }
            let (held, effects) = self.release_client_locked(tables, client);
            (held, self.note_grants(tables, effects))
        };
        self.deliver(effects);
        self.tick_grace();
        held
    }

    /// Releases the locks of clients whose lease lapsed, a bounded batch per call, and
    /// ends grace when its time is up.
    pub fn sweep(self: &Arc<Self>) {
        let now = self.now();
        let (clients, locks, effects) = {
            let mut tables = self.tables.lock();
            let lapsed = tables.leases.expired(now);
            let (mut clients, mut locks, mut effects) = (0, 0, Vec::new());
            for client in lapsed {
                if let Some(slot) = self.renewed.get(client.0 as usize) {
                    slot.store(NEVER, Ordering::Relaxed);
                }
                if !tables.holders.contains(&client) {
                    continue;
                }
                let (held, granted) = self.release_client_locked(&mut tables, client);
                clients += 1;
                locks += held;
                effects.extend(self.note_grants(&mut tables, granted));
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
        let now = self.now();
        let effects = {
            let mut tables = self.tables.lock();
            let Some(end) = tables.grace.as_mut().and_then(|grace| grace.tick(now)) else {
                return;
            };
            tables.grace = None;
            info!(
                ended = if end.early { "early" } else { "timeout" },
                reclaimed = end.reclaimed,
                dropped = end.dropped.len(),
                "grace ended"
            );
            let mut effects = Vec::new();
            for (fid, lock) in end.dropped {
                // Unlocking a recovered range never splits a lock of another range, but
                // an error would only leave the lock until its lease lapses.
                if let Ok(granted) = tables.locks.unlock(fid, lock.owner, lock.range) {
                    let _ = self.record_release(fid, lock.owner, lock.range);
                    effects.extend(granted);
                }
            }
            self.note_grants(&mut tables, effects)
        };
        self.deliver(effects);
    }

    fn release_client_locked(
        &self,
        tables: &mut Tables,
        client: ClientKey,
    ) -> (usize, Vec<Effect>) {
        if !tables.holders.remove(&client) {
            return (0, Vec::new());
        }
        let held = tables
            .locks
            .iter()
            .filter(|(_, lock)| lock.owner.client == client)
            .count();
        let effects = tables.locks.release_client(client);
        tables.pids.retain(|(_, owner), _| owner.client != client);
        tables.waits.retain(|_, (owner, _)| *owner != client);
        if held > 0 {
            // Waited for by nothing: the client is gone, and a lost record only means
            // recovery brings back a lock that grace then drops.
            let _ = self
                .journal
                .record(&StateRecord::ClientReleased { key: client.0 }, false);
        }
        (held, effects)
    }

    /// Journals the queued requests `effects` granted and moves their processes from
    /// `waits` to `pids`; each grant's push waits for its record.
    fn note_grants(&self, tables: &mut Tables, effects: Vec<Effect>) -> Vec<(Effect, Durable)> {
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
                let pid = tables.waits.remove(&wait).map_or(0, |(_, pid)| pid);
                tables.pids.insert((fid, owner), pid);
                let durable = self.record_grant(fid, owner, range, kind, pid);
                (effect, durable)
            })
            .collect()
    }

    fn record_grant(
        &self,
        fid: Fid,
        owner: LockOwner,
        range: ByteRange,
        kind: LockKind,
        pid: u32,
    ) -> Durable {
        let record = StateRecord::LockGranted {
            fid,
            client: owner.client.0,
            owner: owner.owner,
            start: range.start(),
            end: range.end(),
            kind: wire_kind(kind),
            pid,
        };
        self.journal.record(&record, true)
    }

    fn record_release(&self, fid: Fid, owner: LockOwner, range: ByteRange) -> Durable {
        let record = StateRecord::LockReleased {
            fid,
            client: owner.client.0,
            owner: owner.owner,
            start: range.start(),
            end: range.end(),
        };
        self.journal.record(&record, true)
    }

    /// Tells each client whose queued request was granted, once the grant is durable.
    /// Only a client that answers "nobody here waits for that" loses the grant again. A
    /// push that got no answer (timeout, lost connection) may still have arrived, so the
    /// grant stays, exactly like a lock granted in a direct reply: the client's lease or
    /// its reclaim after reconnecting settles it. Releasing it would hand the range to
    /// the next waiter while the first may already believe it holds it.
    fn deliver(self: &Arc<Self>, effects: Vec<(Effect, Durable)>) {
        for (effect, durable) in effects {
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
                    this.withdraw(fid, owner, range);
                    return;
                }
                match this.push(owner, wait, fid).await {
                    Push::Acknowledged => {
                        debug!(
                            client = owner.client.0,
                            wait = wait.0,
                            "queued lock granted"
                        );
                    }
                    Push::Unanswered => debug!(
                        client = owner.client.0,
                        wait = wait.0,
                        "lock grant not acknowledged; kept until the lease or a reclaim settles it"
                    ),
                    Push::Refused => {
                        warn!(
                            client = owner.client.0,
                            wait = wait.0,
                            "client refused a lock grant; releasing it"
                        );
                        this.withdraw(fid, owner, range);
                    }
                }
            });
        }
    }

    /// Takes back a grant its owner does not know of, and grants what that frees.
    fn withdraw(self: &Arc<Self>, fid: Fid, owner: LockOwner, range: ByteRange) {
        // Releasing the granted range also drops any lock the owner held there before:
        // it asked to replace that range anyway.
        let effects = {
            let mut tables = self.tables.lock();
            let effects = tables.locks.unlock(fid, owner, range).unwrap_or_default();
            let _ = self.record_release(fid, owner, range);
            self.note_grants(&mut tables, effects)
        };
        self.deliver(effects);
    }

    async fn push(&self, owner: LockOwner, wait: WaitId, fid: Fid) -> Push {
        let Some(connection) = self.callbacks.connection(owner.client) else {
            return Push::Unanswered;
        };
        let request = Request::LockGranted { wait: wait.0, fid };
        let timeout = self.callbacks.break_timeout();
        match connection.call(request, timeout).await {
            Ok(Response::Ok) => Push::Acknowledged,
            Err(e) if e.is_transport() => Push::Unanswered,
            Ok(_) | Err(_) => Push::Refused,
        }
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

/// The journaled state as of now, copied out of the tables.
#[cfg(test)]
fn capture(tables: &Tables) -> StateSnapshot {
    StateSnapshot {
        clients: client_entries(tables.clients.iter().map(|(k, v)| (*k, *v))),
        locks: lock_entries(tables.locks.iter(), &tables.pids),
        callbacks: CallbackModel::default(),
        clean_handover: false,
    }
}

fn client_entries(
    clients: impl Iterator<Item = (ClientKey, (ClientId, InstanceNonce))>,
) -> Vec<ClientEntry> {
    clients
        .map(|(key, (client, instance))| ClientEntry {
            key: key.0,
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
            client: lock.owner.client.0,
            owner: lock.owner.owner,
            start: lock.range.start(),
            end: lock.range.end(),
            kind: wire_kind(lock.kind),
            pid: pids.get(&(fid, lock.owner)).copied().unwrap_or(0),
        })
        .collect()
}

/// Forgets the processes of owners that hold nothing any more, once the side map has
/// grown past twice the table (amortized: each prune halves it at least).
fn prune_pids(tables: &mut Tables) {
    if tables.pids.len() <= 2 * tables.locks.len() + 64 {
        return;
    }
    let live: HashSet<(Fid, LockOwner)> = tables
        .locks
        .iter()
        .map(|(fid, lock)| (fid, lock.owner))
        .collect();
    tables.pids.retain(|key, _| live.contains(key));
}

pub fn state_kind(kind: proto::LockKind) -> LockKind {
    match kind {
        proto::LockKind::Shared => LockKind::Shared,
        proto::LockKind::Exclusive => LockKind::Exclusive,
    }
}

pub fn wire_kind(kind: LockKind) -> proto::LockKind {
    match kind {
        LockKind::Shared => proto::LockKind::Shared,
        LockKind::Exclusive => proto::LockKind::Exclusive,
    }
}

/// `[start, end)` as a lock range; an empty range is an invalid argument.
pub fn range(start: u64, end: u64) -> Result<ByteRange, ErrorCode> {
    ByteRange::new(start, end).map_err(|_| ErrorCode::InvalidArgument)
}

#[cfg(test)]
mod tests {
    use state::JournalMode;

    use super::*;
    use crate::state_journal::LockEntry;

    fn sorted(mut locks: Vec<LockEntry>) -> Vec<LockEntry> {
        locks.sort_unstable_by_key(|l| (l.fid, l.client, l.owner, l.start));
        locks
    }

    #[tokio::test]
    async fn a_snapshot_keeps_every_lock_and_its_pid_even_past_its_room() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = StateJournal::open(dir.path(), JournalMode::None).unwrap();
        let journal = Arc::new(journal);
        let callbacks = Arc::new(Callbacks::new(
            100,
            10,
            5,
            Duration::from_millis(10),
            journal.clone(),
        ));
        let locks = Arc::new(Locks::new(
            callbacks.clone(),
            journal.clone(),
            Duration::from_secs(60),
        ));
        let (id, instance) = (ClientId::random(), InstanceNonce(1));
        let key = callbacks.recover(id, instance).unwrap();
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
                    1,
                    ByteRange::whole(),
                    LockKind::Shared,
                    false,
                    vnode + 1,
                )
                .await;
            assert_eq!(reply, Ok(SetLockReply::Granted));
        }
        let live = locks.state();
        callbacks.snapshot_with(|model| locks.snapshot(model, room));
        drop((callbacks, locks));
        Arc::into_inner(journal).unwrap().close();

        let (journal, replayed) = StateJournal::open(dir.path(), JournalMode::None).unwrap();
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
