//! Known clients: each cache manager's `ClientId` interned to a small `ClientKey`, and
//! told apart as new, restarted or returning by its instance nonce.
//! Invariant: at most `clients_max` clients; a key names one client from its admission
//! until `remove`, and only then can it be given to another.

use std::collections::HashMap;

use proto::{ClientId, InstanceNonce};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A client's index in the server's tables (and in the journal of the process that
/// admitted it). Small so that the callback table stores 4 bytes per promise instead of
/// a 16-byte UUID.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ClientKey(pub u32);

/// How a connecting client relates to what the server knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// First seen since this server started: its cached callbacks are unknown here,
    /// so it must reset them.
    New(ClientKey),
    /// Known client with a new instance nonce: it restarted, its promises are void.
    Restarted(ClientKey),
    /// Known client, same instance: a reconnect. Its delayed breaks are owed to it.
    Returning(ClientKey),
}

impl Admission {
    pub fn key(self) -> ClientKey {
        match self {
            Admission::New(key) | Admission::Restarted(key) | Admission::Returning(key) => key,
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("client table full ({clients_max} clients)")]
pub struct ClientTableFull {
    pub clients_max: usize,
}

#[derive(Clone, Copy, Debug)]
struct ClientRecord {
    id: ClientId,
    instance: InstanceNonce,
}

/// The bounded table of clients.
#[derive(Debug)]
pub struct ClientTable {
    keys: HashMap<ClientId, ClientKey>,
    records: Vec<Option<ClientRecord>>,
    free: Vec<ClientKey>,
    clients_max: usize,
}

impl ClientTable {
    pub fn new(clients_max: usize) -> ClientTable {
        ClientTable {
            keys: HashMap::new(),
            records: Vec::new(),
            free: Vec::new(),
            clients_max,
        }
    }

    /// Records a connecting client and says whether it is new, restarted or returning.
    pub fn admit(
        &mut self,
        id: ClientId,
        instance: InstanceNonce,
    ) -> Result<Admission, ClientTableFull> {
        if let Some(&key) = self.keys.get(&id) {
            let slot = &mut self.records[key.0 as usize];
            let record = slot.get_or_insert(ClientRecord { id, instance });
            if record.instance == instance {
                return Ok(Admission::Returning(key));
            }
            record.instance = instance;
            return Ok(Admission::Restarted(key));
        }
        if self.keys.len() >= self.clients_max {
            return Err(ClientTableFull {
                clients_max: self.clients_max,
            });
        }
        let key = match self.free.pop() {
            Some(key) => key,
            None => {
                // `clients_max` is far below u32::MAX, so the cast cannot truncate.
                self.records.push(None);
                ClientKey((self.records.len() - 1) as u32)
            }
        };
        self.records[key.0 as usize] = Some(ClientRecord { id, instance });
        self.keys.insert(id, key);
        Ok(Admission::New(key))
    }

    pub fn key(&self, id: &ClientId) -> Option<ClientKey> {
        self.keys.get(id).copied()
    }

    pub fn client(&self, key: ClientKey) -> Option<(ClientId, InstanceNonce)> {
        self.records
            .get(key.0 as usize)
            .copied()
            .flatten()
            .map(|r| (r.id, r.instance))
    }

    /// Forgets a client; the caller has dropped its promises and delayed breaks.
    pub fn remove(&mut self, key: ClientKey) {
        if let Some(slot) = self.records.get_mut(key.0 as usize)
            && let Some(record) = slot.take()
        {
            self.keys.remove(&record.id);
            self.free.push(key);
        }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_returning_restarted() {
        let mut table = ClientTable::new(2);
        let id = ClientId::random();
        let a = table.admit(id, InstanceNonce(7)).unwrap();
        assert!(matches!(a, Admission::New(_)));
        assert_eq!(
            table.admit(id, InstanceNonce(7)),
            Ok(Admission::Returning(a.key()))
        );
        assert_eq!(
            table.admit(id, InstanceNonce(8)),
            Ok(Admission::Restarted(a.key()))
        );
        assert_eq!(
            table.admit(id, InstanceNonce(8)),
            Ok(Admission::Returning(a.key()))
        );
    }

    #[test]
    fn bounded_and_keys_reused_after_remove() {
        let mut table = ClientTable::new(2);
        let (one, two, three) = (ClientId::random(), ClientId::random(), ClientId::random());
        let a = table.admit(one, InstanceNonce(1)).unwrap().key();
        table.admit(two, InstanceNonce(1)).unwrap();
        assert_eq!(
            table.admit(three, InstanceNonce(1)),
            Err(ClientTableFull { clients_max: 2 })
        );
        table.remove(a);
        assert_eq!(table.admit(three, InstanceNonce(1)), Ok(Admission::New(a)));
        assert_eq!(table.client(a).map(|c| c.0), Some(three));
        assert_eq!(table.key(&one), None);
        assert_eq!(table.len(), 2);
    }
}
