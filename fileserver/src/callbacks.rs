//! Callback breaking: the I/O side of the pure tables in the `state` crate. Holds the
//! tables behind one short lock, knows each client's current connection, sends breaks in
//! parallel with a deadline, and delivers owed breaks before a returning client is served.
//! Invariant: a promise removed from the table is either acknowledged by its client or
//! queued as a delayed break (a detached task finishes delivery even if the request
//! that caused it goes away); a client is served only after what it is owed was
//! delivered on its current connection.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use proto::rpc::Connection;
use proto::{CallbackGrant, ClientId, Fid, InstanceNonce, Request};
use state::{
    Admission, CallbackTable, CallbackTableConfig, ClientKey, ClientTable, DelayedBreaks, Millis,
    Pending,
};
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// Most fids in one `BreakCallbacks` request, well within the frame limit.
const FIDS_PER_BREAK_MAX: usize = 8192;

struct Session {
    connection: Connection,
    /// Turns true once the owed breaks (or reset) were delivered on `connection`.
    ready: watch::Receiver<bool>,
}

struct Tables {
    clients: ClientTable,
    promises: CallbackTable,
    delayed: DelayedBreaks,
    sessions: HashMap<ClientKey, Session>,
}

/// The server's callback state and the machinery to break callbacks.
pub struct Callbacks {
    tables: Mutex<Tables>,
    origin: Instant,
    break_timeout: Duration,
}

impl Callbacks {
    pub fn new(
        promise_count_max: usize,
        client_count_max: usize,
        delayed_per_client_max: usize,
        break_timeout: Duration,
    ) -> Callbacks {
        Callbacks {
            tables: Mutex::new(Tables {
                clients: ClientTable::new(client_count_max),
                promises: CallbackTable::new(CallbackTableConfig {
                    promise_count_max: promise_count_max.max(1),
                    ..CallbackTableConfig::default()
                }),
                delayed: DelayedBreaks::new(delayed_per_client_max),
                sessions: HashMap::new(),
            }),
            origin: Instant::now(),
            break_timeout,
        }
    }

    fn now(&self) -> Millis {
        Millis(u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    /// A cache manager connected: admit it and deliver what it is owed (a reset if it is
    /// new or restarted, its delayed breaks if it returns) before its requests run.
    pub fn connected(
        self: &Arc<Self>,
        connection: &Connection,
        client: ClientId,
        instance: InstanceNonce,
    ) {
        let (ready_tx, ready_rx) = watch::channel(false);
        let admission = {
            let mut tables = self.tables.lock();
            let admission = match tables.clients.admit(client, instance) {
                Ok(admission) => admission,
                Err(full) => {
                    drop(tables);
                    warn!(%client, error = %full, "refusing a client: client table full");
                    connection.close();
                    return;
                }
            };
            let key = admission.key();
            let owed = match admission {
                Admission::New(_) | Admission::Restarted(_) => {
                    tables.promises.drop_client(key);
                    tables.delayed.take(key);
                    Some(Pending::Reset)
                }
                Admission::Returning(_) => tables.delayed.take(key),
            };
            tables.sessions.insert(
                key,
                Session {
                    connection: connection.clone(),
                    ready: ready_rx,
                },
            );
            (admission, owed)
        };
        let (admission, owed) = admission;
        info!(%client, ?admission, "cache manager connected");
        let this = self.clone();
        let connection = connection.clone();
        tokio::spawn(async move {
            if let Some(owed) = owed {
                this.deliver_owed(admission.key(), &connection, owed).await;
            }
            let _ = ready_tx.send(true);
        });
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
        if delivered {
            debug!(client = key.0, ?owed, "owed breaks delivered");
            return;
        }
        warn!(
            client = key.0,
            "could not deliver owed breaks; dropping the connection"
        );
        let mut tables = self.tables.lock();
        match owed {
            Pending::Reset => tables.delayed.push_reset(key),
            Pending::Fids(fids) => tables.delayed.push(key, fids),
        }
        forget_session(&mut tables, key, connection);
    }

    async fn call(&self, connection: &Connection, request: Request) -> bool {
        connection.call(request, self.break_timeout).await.is_ok()
    }

    /// Waits until the client's owed breaks went out on this connection.
    pub async fn wait_ready(&self, connection: &Connection, client: ClientId) {
        let ready = {
            let tables = self.tables.lock();
            tables
                .clients
                .key(&client)
                .and_then(|key| tables.sessions.get(&key))
                .filter(|session| session.connection.same(connection))
                .map(|session| session.ready.clone())
        };
        if let Some(mut ready) = ready {
            // An error means the delivery task ended without saying: serve anyway, the
            // connection was closed in that case.
            let _ = ready.wait_for(|ready| *ready).await;
        }
    }

    /// The connection closed: the client's promises stay, but breaks for it now queue.
    pub fn disconnected(&self, connection: &Connection, client: ClientId) {
        let mut tables = self.tables.lock();
        if let Some(key) = tables.clients.key(&client) {
            forget_session(&mut tables, key, connection);
        }
        debug!(%client, "cache manager disconnected");
    }

    pub fn key(&self, client: ClientId) -> Option<ClientKey> {
        self.tables.lock().clients.key(&client)
    }

    /// Grants `client` a promise on `fid`. If that evicted another client's unexpired
    /// promise, its break is sent in the background.
    pub fn grant(self: &Arc<Self>, client: ClientKey, fid: Fid) -> CallbackGrant {
        let now = self.now();
        let grant = {
            let mut tables = self.tables.lock();
            tables.promises.expire(now);
            tables.promises.grant(fid, client, now)
        };
        if let Some((evicted_fid, evicted_client)) = grant.evicted {
            let this = self.clone();
            tokio::spawn(async move {
                let mut owed = BTreeMap::new();
                owed.insert(evicted_client, vec![evicted_fid]);
                this.send_breaks(owed).await;
            });
        }
        CallbackGrant {
            lifetime_ms: u64::try_from(grant.lifetime.as_millis()).unwrap_or(u64::MAX),
        }
    }

    pub fn give_up(&self, client: ClientKey, fids: &[Fid]) {
        self.tables.lock().promises.give_up(client, fids);
    }

    /// Drops expired promises, a bounded batch per call.
    pub fn expire(&self) -> usize {
        let now = self.now();
        self.tables.lock().promises.expire(now)
    }

    /// Breaks every holder's promise on `fids` except `except`'s, and returns once each
    /// holder acknowledged or was marked unreachable (its breaks then queue).
    pub async fn break_callbacks(self: &Arc<Self>, fids: &[Fid], except: Option<ClientKey>) {
        let mut owed: BTreeMap<ClientKey, Vec<Fid>> = BTreeMap::new();
        {
            let mut tables = self.tables.lock();
            for &fid in fids {
                for client in tables.promises.break_fid(fid, except) {
                    owed.entry(client).or_default().push(fid);
                }
            }
        }
        if owed.is_empty() {
            return;
        }
        let this = self.clone();
        // Detached, so that a request dropped mid-way still finishes or queues its breaks.
        let task = tokio::spawn(async move { this.send_breaks(owed).await });
        let _ = task.await;
    }

    async fn send_breaks(self: Arc<Self>, owed: BTreeMap<ClientKey, Vec<Fid>>) {
        let mut sends = tokio::task::JoinSet::new();
        {
            let mut tables = self.tables.lock();
            for (client, fids) in owed {
                match tables.sessions.get(&client) {
                    Some(session) if !session.connection.is_closed() => {
                        let connection = session.connection.clone();
                        let timeout = self.break_timeout;
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
                    _ => tables.delayed.push(client, fids),
                }
            }
        }
        while let Some(joined) = sends.join_next().await {
            let Ok((client, connection, fids, delivered)) = joined else {
                continue;
            };
            if delivered {
                continue;
            }
            warn!(
                client = client.0,
                fids = fids.len(),
                "client unreachable for a callback break; queueing it"
            );
            let mut tables = self.tables.lock();
            tables.delayed.push(client, fids);
            forget_session(&mut tables, client, &connection);
        }
    }
}

/// Marks `key` unreachable if `connection` is still its current one, and closes the
/// connection so that the client reconnects and collects its delayed breaks first.
fn forget_session(tables: &mut Tables, key: ClientKey, connection: &Connection) {
    if tables
        .sessions
        .get(&key)
        .is_some_and(|s| s.connection.same(connection))
    {
        tables.sessions.remove(&key);
    }
    connection.close();
}
