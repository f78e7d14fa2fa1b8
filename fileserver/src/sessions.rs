//! The cache managers this server knows: each client's key and instance (the client
//! table), its current connection, and whether what it was owed went out on it.
//! Invariant: a client has one current connection at most, replaced only when it connects
//! again, and a request on it runs only once the delivery of what it was owed ended.

use std::collections::HashMap;
use std::time::Duration;

use parking_lot::RwLock;
use proto::rpc::Connection;
use proto::{ClientId, InstanceNonce};
use state::{Admission, ClientKey, ClientTable, ClientTableFull};
use tokio::sync::watch;
use tracing::debug;

struct Session {
    connection: Connection,
    /// Turns true once the owed breaks (or reset) were delivered on `connection`.
    ready: watch::Receiver<bool>,
}

struct Known {
    clients: ClientTable,
    sessions: HashMap<ClientKey, Session>,
}

/// The known clients and their connections, behind one reader-writer lock that every
/// request takes shared. In the fileserver's lock order it comes after the callback
/// and lock tables' own locks.
pub struct Sessions {
    known: RwLock<Known>,
    /// How long a call from this server to a client (a break, a lock grant) may take.
    call_timeout: Duration,
}

impl Sessions {
    pub fn new(client_count_max: usize, call_timeout: Duration) -> Sessions {
        Sessions {
            known: RwLock::new(Known {
                clients: ClientTable::new(client_count_max),
                sessions: HashMap::new(),
            }),
            call_timeout,
        }
    }

    pub fn call_timeout(&self) -> Duration {
        self.call_timeout
    }

    /// Admits a client recovered from the state journal before it connects: when it
    /// returns with the same instance it is `Returning` and keeps its promises and locks.
    pub fn recover(&self, client: ClientId, instance: InstanceNonce) -> Option<ClientKey> {
        self.known
            .write()
            .clients
            .admit(client, instance)
            .ok()
            .map(Admission::key)
    }

    /// A client connected on `connection`: admits it and makes the connection its
    /// current one, not ready until the returned sender says what it was owed went out.
    pub fn connect(
        &self,
        connection: &Connection,
        client: ClientId,
        instance: InstanceNonce,
    ) -> Result<(Admission, watch::Sender<bool>), ClientTableFull> {
        let mut known = self.known.write();
        let admission = known.clients.admit(client, instance)?;
        let (ready_tx, ready) = watch::channel(false);
        known.sessions.insert(
            admission.key(),
            Session {
                connection: connection.clone(),
                ready,
            },
        );
        Ok((admission, ready_tx))
    }

    /// Waits until the client's owed breaks went out on this connection; returns its
    /// key (`None`: it is not admitted).
    pub async fn wait_ready(&self, connection: &Connection, client: ClientId) -> Option<ClientKey> {
        let (key, ready) = {
            let known = self.known.read();
            let key = known.clients.key(&client)?;
            let ready = known
                .sessions
                .get(&key)
                .filter(|session| session.connection.same(connection))
                .map(|session| session.ready.clone());
            (key, ready)
        };
        if let Some(mut ready) = ready {
            // An error means the delivery task ended without saying: serve anyway, the
            // connection was closed in that case.
            let _ = ready.wait_for(|ready| *ready).await;
        }
        Some(key)
    }

    /// The client's current connection, if it is reachable.
    pub fn connection(&self, key: ClientKey) -> Option<Connection> {
        self.known
            .read()
            .sessions
            .get(&key)
            .filter(|session| !session.connection.is_closed())
            .map(|session| session.connection.clone())
    }

    /// Marks `key` unreachable if `connection` is still its current one, and closes the
    /// connection so that the client reconnects and collects what it is owed first.
    pub fn forget(&self, key: ClientKey, connection: &Connection) {
        let mut known = self.known.write();
        if known
            .sessions
            .get(&key)
            .is_some_and(|session| session.connection.same(connection))
        {
            known.sessions.remove(&key);
        }
        connection.close();
    }

    /// The connection closed: the client stays known, but calls to it now fail at once.
    pub fn disconnected(&self, connection: &Connection, client: ClientId) {
        let key = self.known.read().clients.key(&client);
        if let Some(key) = key {
            self.forget(key, connection);
        }
        debug!(%client, "cache manager disconnected");
    }
}
