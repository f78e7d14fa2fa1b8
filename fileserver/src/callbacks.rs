//! Callback promises and their breaking: promises in shards by fid, breaks sent in
//! parallel with a deadline, and owed breaks delivered before a client is served again.
//! Invariant: a promise broken for a change is journaled as sent, then acknowledged by
//! its holder or queued as owed, before that change is answered.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::{Mutex, MutexGuard, RwLock};
use proto::rpc::Connection;
use proto::{CallbackGrant, ClientId, Fid, InstanceNonce, Request};
use state::callback_table::CallbackCapture;
use state::journaled::{CallbackModel, Owed, Promises, StateRecord, journaled_expiry_ms};
use state::{
    Admission, CallbackTable, CallbackTableConfig, ClientKey, DelayedBreaks, Millis, Pending,
};
use tracing::{debug, info, warn};

use crate::sessions::Sessions;
use crate::shards::{SHARDS, shard_of};
use crate::state_journal::{Durable, StateJournal};

/// Most fids in one `BreakCallbacks` request, well within the frame limit.
const FIDS_PER_BREAK_MAX: usize = 8192;

/// What clients are owed: touched on connect, on breaks and on delivery.
struct Owing {
    delayed: DelayedBreaks,
    /// What the journal knows of `delayed` and of breaks in flight (its `promises` stay
    /// empty: the shards are the only copy).
    model: CallbackModel,
}

impl Owing {
    /// Journals `record` (applying its breaks to the model first): the one way changes
    /// of owed and in-flight breaks reach the journal.
    fn emit(
        &mut self,
        journal: &StateJournal,
        record: StateRecord,
        must_be_durable: bool,
    ) -> Durable {
        self.model.apply_breaks(&record);
        journal.record(&record, must_be_durable)
    }
}

/// The locked shards of a set of fids, taken in index order.
struct Locked<'a> {
    shards: Vec<(usize, MutexGuard<'a, CallbackTable>)>,
}

impl Locked<'_> {
    fn table(&mut self, fid: Fid) -> &mut CallbackTable {
        let shard = shard_of(fid);
        let at = self
            .shards
            .binary_search_by_key(&shard, |(index, _)| *index)
            .unwrap_or_else(|_| unreachable!("the shard of every fid given was locked"));
        &mut self.shards[at].1
    }
}

/// The server's callback state and the machinery to break callbacks.
///
/// A request's path takes one shard's lock: granting promises on different fids runs in
/// parallel. Every change is handed to the journal under the locks of what it changes
/// (the shards of its fids; `owing` for owed and in-flight breaks), so the records about
/// one fid, and those about owed breaks, keep the order of the changes. Locks are taken
/// shards first, in index order, then `owing`, then the sessions'. The promises live
/// only in the shards (a grant is journaled when its rounded wall-clock expiry moves past
/// the one journaled for the table's previous expiry); owed and in-flight breaks also in
/// `owing.model`. A detached task finishes a break's delivery even if the request that
/// caused it goes away.
pub struct Callbacks {
    shards: Box<[Mutex<CallbackTable>]>,
    owing: RwLock<Owing>,
    sessions: Arc<Sessions>,
    journal: Arc<StateJournal>,
    origin: Instant,
    /// Wall-clock milliseconds at `origin`: table expiries (monotonic, since `origin`)
    /// become journaled wall-clock expiries by adding it, so the journaled expiry is a
    /// function of the table's and needs no copy.
    wall_origin_ms: u64,
}

/// Milliseconds since the Unix epoch: journaled expiries must mean the same after a
/// restart, which a monotonic clock does not.
fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}

impl Callbacks {
    pub fn new(
        promise_count_max: usize,
        delayed_per_client_max: usize,
        sessions: Arc<Sessions>,
        journal: Arc<StateJournal>,
    ) -> Callbacks {
        // A shard holds its share: a full one evicts a little before the whole is full.
        let config = CallbackTableConfig {
            promise_count_max: promise_count_max.max(1).div_ceil(SHARDS),
            ..CallbackTableConfig::default()
        };
        Callbacks {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(CallbackTable::new(config.clone())))
                .collect(),
            owing: RwLock::new(Owing {
                delayed: DelayedBreaks::new(delayed_per_client_max),
                model: CallbackModel::new(delayed_per_client_max),
            }),
            sessions,
            journal,
            origin: Instant::now(),
            wall_origin_ms: wall_ms(),
        }
    }

    fn now(&self) -> Millis {
        Millis(u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    /// The journaled (wall-clock, rounded up) expiry of a table expiry.
    fn journaled_expiry_ms(&self, expiry: Millis) -> u64 {
        journaled_expiry_ms(self.wall_origin_ms.saturating_add(expiry.0))
    }

    /// Locks every shard, in index order.
    fn lock_all(&self) -> Vec<MutexGuard<'_, CallbackTable>> {
        self.shards.iter().map(|shard| shard.lock()).collect()
    }

    /// Locks the shards of `fids`, in index order.
    fn lock_fids(&self, fids: &[Fid]) -> Locked<'_> {
        let mut indexes: Vec<usize> = fids.iter().map(|&fid| shard_of(fid)).collect();
        indexes.sort_unstable();
        indexes.dedup();
        Locked {
            shards: indexes
                .into_iter()
                .map(|index| (index, self.shards[index].lock()))
                .collect(),
        }
    }

    /// The clients and their connections these promises are for.
    pub fn sessions(&self) -> &Arc<Sessions> {
        &self.sessions
    }

    /// Installs the recovered callback state under this process's keys (`keys` maps the
    /// journal's). Unexpired promises are granted again; owed breaks are queued. Unless
    /// the state is `complete` (every grant was durable before its reply), a promise may
    /// be missing, so every recovered client is owed a reset instead.
    pub fn restore(
        &self,
        recovered: CallbackModel,
        keys: &HashMap<ClientKey, ClientKey>,
        complete: bool,
    ) {
        let (now, now_ms) = (self.now(), wall_ms());
        let mut shards = self.lock_all();
        let mut owing = self.owing.write();
        let mut promises = 0;
        let mut counts = [0; SHARDS];
        for &((fid, _), _) in recovered.promises.entries() {
            counts[shard_of(fid)] += 1;
        }
        for (shard, count) in shards.iter_mut().zip(counts) {
            shard.reserve(count);
        }
        for &((fid, old), expiry_ms) in recovered.promises.entries() {
            let Some(&key) = keys.get(&old) else {
                continue;
            };
            if expiry_ms <= now_ms {
                continue;
            }
            // A fresh lifetime from now outlasts what the client was told (unless the
            // table is under pressure, which shortens lifetimes). The snapshot the caller
            // takes next journals it.
            shards[shard_of(fid)].grant(fid, key, now);
            promises += 1;
        }
        drop(recovered.promises);
        let mut owed = 0;
        let owed_by = |old: &ClientKey| keys.get(old).copied();
        for (old, queue) in recovered.owed {
            let Some(key) = owed_by(&old) else {
                continue;
            };
            owed += 1;
            match queue {
                Owed::Reset => {
                    owing.delayed.push_reset(key);
                    owing.model.owed.insert(key, Owed::Reset);
                }
                Owed::Fids(fids) => {
                    owing.delayed.push(key, fids.iter().copied());
                    // Bounded as the queue is: replay does not bound, and more fids
                    // than the queue holds became a reset there.
                    owing.model.push(key, fids);
                }
            }
        }
        if !complete {
            for &key in keys.values() {
                owing.delayed.push_reset(key);
                owing.model.owed.insert(key, Owed::Reset);
            }
        }
        info!(promises, owed, complete, "callback state restored");
    }

    /// A cache manager connected: admit it and deliver what it is owed (a reset if it is
    /// new or restarted, its delayed breaks if it returns) before its requests run.
    /// Returns how it was admitted (`None`: refused, the connection is closed).
    pub fn connected(
        self: &Arc<Self>,
        connection: &Connection,
        client: ClientId,
        instance: InstanceNonce,
    ) -> Option<Admission> {
        let (admission, ready, owed) = {
            // Every shard first (the lock order), for a new instance's dropped promises.
            let mut shards = self.lock_all();
            let mut owing = self.owing.write();
            let (admission, ready) = match self.sessions.connect(connection, client, instance) {
                Ok(admitted) => admitted,
                Err(full) => {
                    drop((owing, shards));
                    warn!(%client, error = %full, "refusing a client: client table full");
                    connection.close();
                    return None;
                }
            };
            let key = admission.key();
            let owed = match admission {
                Admission::New(_) | Admission::Restarted(_) => {
                    for shard in &mut shards {
                        shard.drop_client(key);
                    }
                    let journal = &self.journal;
                    owing.emit(
                        journal,
                        StateRecord::ClientCallbacksDropped { client: key },
                        false,
                    );
                    if owing.delayed.take(key).is_some() {
                        owing.emit(journal, StateRecord::DelayedTaken { client: key }, false);
                    }
                    owing.emit(journal, StateRecord::ResetSent { client: key }, false);
                    Some(Pending::Reset)
                }
                Admission::Returning(_) => {
                    let owed = owing.delayed.take(key);
                    if owed.is_some() {
                        owing.emit(
                            &self.journal,
                            StateRecord::DelayedTaken { client: key },
                            false,
                        );
                    }
                    owed
                }
            };
            (admission, ready, owed)
        };
        info!(%client, ?admission, "cache manager connected");
        let this = self.clone();
        let connection = connection.clone();
        tokio::spawn(async move {
            if let Some(owed) = owed {
                this.deliver_owed(admission.key(), &connection, owed).await;
            }
            let _ = ready.send(true);
        });
        Some(admission)
    }

    async fn deliver_owed(&self, key: ClientKey, connection: &Connection, owed: Pending) {
        let delivered = match &owed {
            Pending::Reset => self.call(connection, Request::ResetCallbacks).await,
            Pending::Fids(fids) => {
                let mut result = true;
                for chunk in fids.chunks(FIDS_PER_BREAK_MAX) {
                    let request = Request::BreakCallbacks {
                        fids: chunk.to_vec(),
                    };
                    if !self.call(connection, request).await {
                        result = false;
                        break;
                    }
                }
                result
            }
        };
        let mut owing = self.owing.write();
        if delivered {
            let record = match &owed {
                Pending::Reset => StateRecord::ResetAcked { client: key },
                Pending::Fids(fids) => StateRecord::BreaksAcked {
                    client: key,
                    fids: fids.clone(),
                },
            };
            owing.emit(&self.journal, record, false);
            debug!(client = key.0, ?owed, "owed breaks delivered");
            return;
        }
        warn!(
            client = key.0,
            "could not deliver owed breaks; dropping the connection"
        );
        match owed {
            Pending::Reset => {
                owing.delayed.push_reset(key);
                owing.emit(
                    &self.journal,
                    StateRecord::DelayedReset { client: key },
                    false,
                );
            }
            Pending::Fids(fids) => {
                owing.delayed.push(key, fids.iter().copied());
                let record = StateRecord::DelayedQueued { client: key, fids };
                owing.emit(&self.journal, record, false);
            }
        }
        self.sessions.forget(key, connection);
    }

    async fn call(&self, connection: &Connection, request: Request) -> bool {
        connection
            .call(request, self.sessions.call_timeout())
            .await
            .is_ok()
    }

    /// Grants `client` a promise on `fid`, journaled (and in `Sync` mode durable) before
    /// it returns unless an earlier journaled promise already covers it. If the grant
    /// evicted another client's unexpired promise, its break is sent in the background.
    /// `None`: the journal failed, so no promise may be given.
    pub async fn grant(self: &Arc<Self>, client: ClientKey, fid: Fid) -> Option<CallbackGrant> {
        let (lifetime, durable) = self.record_grant(client, fid);
        if !durable.wait().await {
            return None;
        }
        Some(CallbackGrant {
            lifetime_ms: u64::try_from(lifetime.as_millis()).unwrap_or(u64::MAX),
        })
    }

    /// Journals a promise on `fid` to `client` and returns without waiting for it to
    /// be durable. A change that makes `fid` calls this in its transaction, before its
    /// own record is queued (`storage::Ahead`): one flush then makes both durable, and
    /// the `grant` that answers the request finds the promise journaled already and
    /// waits only for that flush.
    pub fn grant_ahead(self: &Arc<Self>, client: ClientKey, fid: Fid) {
        drop(self.record_grant(client, fid));
    }

    /// `grant` up to its wait: the promise's lifetime, and when its record is durable.
    fn record_grant(self: &Arc<Self>, client: ClientKey, fid: Fid) -> (Duration, Durable) {
        let now = self.now();
        let (grant, durable, evicted) = {
            let mut table = self.shards[shard_of(fid)].lock();
            table.expire(now);
            let grant = table.grant(fid, client, now);
            let expiry_ms = self.journaled_expiry_ms(grant.expiry);
            let covered = grant
                .previous
                .is_some_and(|previous| self.journaled_expiry_ms(previous) >= expiry_ms);
            let durable = if covered {
                // The promise rests on an earlier grant's record, which may still be on
                // its way to the disk, or lost.
                self.journal.barrier()
            } else {
                let record = StateRecord::CallbackGranted {
                    fid,
                    client,
                    expiry_ms,
                };
                // A grant changes no owed or in-flight break: the client lock is not needed.
                self.journal.record(&record, false)
            };
            let evicted = grant.evicted.map(|(evicted_fid, evicted_client)| {
                let record = StateRecord::BreaksSent {
                    client: evicted_client,
                    fids: vec![evicted_fid],
                };
                let sent = self.owing.write().emit(&self.journal, record, true);
                (evicted_fid, evicted_client, sent)
            });
            (grant, durable, evicted)
        };
        if let Some((evicted_fid, evicted_client, sent)) = evicted {
            let this = self.clone();
            tokio::spawn(async move {
                let mut owed = BTreeMap::new();
                owed.insert(evicted_client, vec![evicted_fid]);
                this.send_breaks(owed, vec![sent]).await;
            });
        }
        (grant.lifetime, durable)
    }

    pub fn give_up(&self, client: ClientKey, fids: &[Fid]) {
        let mut locked = self.lock_fids(fids);
        for &fid in fids {
            locked.table(fid).give_up(client, &[fid]);
        }
        let record = StateRecord::CallbacksGivenUp {
            client,
            fids: fids.to_vec(),
        };
        self.journal.record(&record, false);
    }

    /// Drops expired promises, a bounded batch per shard and call.
    pub fn expire(&self) -> usize {
        let now = self.now();
        self.shards
            .iter()
            .map(|shard| shard.lock().expire(now))
            .sum()
    }

    /// Calls `then` with the journal's view of the callback state while every shard and
    /// the client lock stay locked, so that no callback record can slip in before `then`
    /// hands it to the journal. The promises are a flat copy of the shards (memory
    /// speed); turning them into journal form happens when the snapshot is encoded, off
    /// the locks. Returns how long the locks were held.
    pub fn snapshot_with<R>(&self, then: impl FnOnce(CallbackModel) -> R) -> (R, Duration) {
        // Room for the copy is made (and its pages touched) before the long lock.
        let room: usize = self
            .shards
            .iter()
            .map(|shard| shard.lock().capture_room())
            .sum();
        let mut capture = CallbackCapture::with_room(room + room / 64 + 1024);
        let started = Instant::now();
        let shards = self.lock_all();
        for shard in &shards {
            shard.capture_into(&mut capture);
        }
        let owing = self.owing.read();
        let mut model = owing.model.clone();
        model.promises = Promises::captured(capture, self.wall_origin_ms);
        let answer = then(model);
        drop((owing, shards));
        (answer, started.elapsed())
    }

    /// The clients holding a promise on `fid`, and the journal's view of owed and
    /// in-flight breaks (for tests that compare them with a replay).
    #[cfg(test)]
    pub fn inspect(&self, fid: Fid) -> (Vec<ClientKey>, CallbackModel) {
        let holders = self.shards[shard_of(fid)].lock().holders(fid);
        (holders, self.owing.read().model.clone())
    }

    /// Breaks every holder's promise on `fids` except `except`'s, and returns once each
    /// holder acknowledged or was marked unreachable (its breaks then queue) and the
    /// breaks are journaled.
    pub async fn break_callbacks(self: &Arc<Self>, fids: &[Fid], except: Option<ClientKey>) {
        let mut owed: BTreeMap<ClientKey, Vec<Fid>> = BTreeMap::new();
        let mut journaled = Vec::new();
        {
            let mut locked = self.lock_fids(fids);
            for &fid in fids {
                for client in locked.table(fid).break_fid(fid, except) {
                    owed.entry(client).or_default().push(fid);
                }
            }
            let mut owing = self.owing.write();
            for (&client, fids) in &owed {
                let record = StateRecord::BreaksSent {
                    client,
                    fids: fids.clone(),
                };
                journaled.push(owing.emit(&self.journal, record, true));
            }
        }
        if owed.is_empty() {
            return;
        }
        let this = self.clone();
        // Detached, so that a request dropped mid-way still finishes or queues its breaks.
        let task = tokio::spawn(async move { this.send_breaks(owed, journaled).await });
        let _ = task.await;
    }

    async fn send_breaks(
        self: Arc<Self>,
        owed: BTreeMap<ClientKey, Vec<Fid>>,
        journaled: Vec<Durable>,
    ) {
        for durable in journaled {
            // A failed journal is logged by its writer; the breaks still go out.
            durable.wait().await;
        }
        let mut sends = tokio::task::JoinSet::new();
        {
            let mut owing = self.owing.write();
            for (client, fids) in owed {
                match self.sessions.connection(client) {
                    Some(connection) => {
                        let timeout = self.sessions.call_timeout();
                        sends.spawn(async move {
                            let mut delivered = true;
                            for chunk in fids.chunks(FIDS_PER_BREAK_MAX) {
                                let request = Request::BreakCallbacks {
                                    fids: chunk.to_vec(),
                                };
                                if let Err(e) = connection.call(request, timeout).await {
                                    debug!(client = client.0, error = %e, "break not acknowledged");
                                    delivered = false;
                                    break;
                                }
                            }
                            (client, connection, fids, delivered)
                        });
                    }
                    None => queue_breaks(&mut owing, &self.journal, client, fids),
                }
            }
        }
        while let Some(joined) = sends.join_next().await {
            let Ok((client, connection, fids, delivered)) = joined else {
                continue;
            };
            let mut owing = self.owing.write();
            if delivered {
                let record = StateRecord::BreaksAcked { client, fids };
                owing.emit(&self.journal, record, false);
                continue;
            }
            warn!(
                client = client.0,
                fids = fids.len(),
                "client unreachable for a callback break; queueing it"
            );
            queue_breaks(&mut owing, &self.journal, client, fids);
            self.sessions.forget(client, &connection);
        }
    }
}

/// Owes `client` the breaks on `fids` until it returns.
fn queue_breaks(owing: &mut Owing, journal: &StateJournal, client: ClientKey, fids: Vec<Fid>) {
    owing.delayed.push(client, fids.iter().copied());
    owing.emit(journal, StateRecord::DelayedQueued { client, fids }, false);
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};

    use proto::{ClientId, Fid, InstanceNonce, Uniquifier, VnodeId, VolumeId};
    use state::{ClientKey, JournalMode};

    use crate::restart::{TEST_DELAYED_PER_CLIENT_MAX, test_tables};
    use crate::state_journal::TestLog;
    use state::journaled::{CallbackModel, Owed};

    /// Replay does not bound the owed queues; a restore must bound its journaled view
    /// as it bounds the live queue, or the next snapshot would owe fids the client was
    /// sent a reset for.
    #[test]
    fn a_restored_queue_past_its_bound_is_a_reset_in_the_journaled_view_too() {
        let log = TestLog::new();
        let (_partition, journal, _) = log.open(JournalMode::None);
        let (callbacks, _locks) = test_tables(&journal);
        let key = callbacks
            .sessions()
            .recover(ClientId::random(), InstanceNonce(1))
            .unwrap();
        let fids: BTreeSet<Fid> = (0..=TEST_DELAYED_PER_CLIENT_MAX as u64)
            .map(|vnode| Fid {
                volume: VolumeId(1),
                vnode: VnodeId(vnode + 2),
                unique: Uniquifier(1),
            })
            .collect();
        let mut recovered = CallbackModel::new(0);
        let written_by = ClientKey(7);
        recovered.owed.insert(written_by, Owed::Fids(fids));
        callbacks.restore(recovered, &HashMap::from([(written_by, key)]), true);
        let (_, model) = callbacks.inspect(Fid::root(VolumeId(1)));
        assert_eq!(model.owed.get(&key), Some(&Owed::Reset));
    }
}
