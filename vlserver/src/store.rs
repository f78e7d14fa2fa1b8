//! `Store`: the VLDB's durable state in one redb file — volume entries, the name and id
//! indexes, registered servers, the id counter and the fileserver pairs (`pairs.rs`).
//! Invariant: each mutation is one durable transaction that keeps the indexes consistent
//! with the entries; volume ids are handed out in ascending triples and never reused.
//! Boundary: operations take every nondeterministic input (the clock) as an argument, so
//! a replicated log can later apply the same operations in the same order on every node.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use proto::{
    ErrorCode, ServerEntry, ServerId, Timestamp, VolumeEntry, VolumeId, VolumeName, VolumeRef,
    VolumeSite, VolumeType,
};
use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table, TableDefinition,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{debug, info};

use crate::error::VldbError;
use crate::pairs::{self, Pair};

/// The layout version of the tables below; bumped on any incompatible change.
pub const FORMAT_VERSION: u64 = 1;

/// The first RW volume id, as in AFS.
pub const VOLUME_ID_FIRST: VolumeId = VolumeId(536_870_912);

/// Ids reserved per volume: RW, then RO (`rw + 1`), then backup (`rw + 2`).
pub const IDS_PER_VOLUME: u64 = 3;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const META_FORMAT_VERSION: &str = "format_version";
const META_NEXT_VOLUME_ID: &str = "next_volume_id";
/// RW volume id -> postcard `VolumeEntry`.
const VOLUMES: TableDefinition<u64, &[u8]> = TableDefinition::new("volumes");
/// Volume name -> RW volume id.
const VOLUME_NAMES: TableDefinition<&str, u64> = TableDefinition::new("volume_names");
/// Every id of an existing volume (RW, and RO/backup once they exist) -> RW volume id.
const VOLUME_IDS: TableDefinition<u64, u64> = TableDefinition::new("volume_ids");
/// Server UUID bytes -> postcard `ServerEntry`.
pub(crate) const SERVERS: TableDefinition<&[u8; 16], &[u8]> = TableDefinition::new("servers");

/// How much a peer can make the VLDB hold.
#[derive(Clone, Debug)]
pub struct StoreLimits {
    pub servers_max: u64,
    pub addresses_per_server_max: usize,
    pub address_bytes_max: usize,
    /// Keeps a full `VlListEntries` reply within the 4 MiB frame limit (about 100 bytes
    /// per entry at most) until listing is paged.
    pub volumes_max: u64,
    /// Fileserver pairs; each holds two short addresses, so this bounds memory, not frames.
    pub pairs_max: usize,
}

impl Default for StoreLimits {
    fn default() -> Self {
        StoreLimits {
            servers_max: 10_000,
            addresses_per_server_max: 16,
            address_bytes_max: 256,
            volumes_max: 32_768,
            pairs_max: 4_096,
        }
    }
}

/// The VLDB's tables. Methods block on disk I/O: call them off the async runtime.
pub struct Store {
    pub(crate) db: Database,
    pub(crate) limits: StoreLimits,
    /// Every pair, durable fields mirrored from the `pairs` table plus the lease expiry,
    /// which lives only here. Pair calls and server registrations hold this lock across
    /// their write transaction, so the two never interleave on a pair's server entry.
    pub(crate) pairs: Mutex<HashMap<String, Pair>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("limits", &self.limits)
            .finish()
    }
}

impl Store {
    /// Opens the database at `path`, creating it and its tables if it does not exist.
    pub fn open(path: &Path, limits: StoreLimits) -> Result<Store, VldbError> {
        let db = Database::create(path).map_err(|source| VldbError::Open {
            path: path.to_owned(),
            source,
        })?;
        let txn = db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let found = meta.get(META_FORMAT_VERSION)?.map(|v| v.value());
            match found {
                None => {
                    meta.insert(META_FORMAT_VERSION, FORMAT_VERSION)?;
                    meta.insert(META_NEXT_VOLUME_ID, VOLUME_ID_FIRST.0)?;
                    info!(path = %path.display(), "created a new VLDB");
                }
                Some(FORMAT_VERSION) => {}
                Some(found) => {
                    return Err(VldbError::FormatVersion {
                        path: PathBuf::from(path),
                        found,
                        expected: FORMAT_VERSION,
                    });
                }
            }
            // Create the other tables so that read transactions always find them.
            txn.open_table(VOLUMES)?;
            txn.open_table(VOLUME_NAMES)?;
            txn.open_table(VOLUME_IDS)?;
            txn.open_table(SERVERS)?;
            txn.open_table(pairs::PAIRS)?;
        }
        txn.commit()?;
        let pairs = Mutex::new(pairs::load(&db)?);
        Ok(Store { db, limits, pairs })
    }

    /// Records a fileserver, or replaces the addresses of one already known. An address
    /// belongs to one server only: the latest to register it takes it from any other
    /// (a fileserver whose partition was wiped comes back with a new id on the old address).
    pub fn register_server(
        &self,
        server: ServerId,
        addresses: Vec<String>,
        now: Timestamp,
    ) -> Result<ServerEntry, VldbError> {
        let addresses = self.check_addresses(addresses)?;
        let pairs = self.pairs.lock();
        // A pair's server entry lists its members, the active first, whatever a member
        // registers: clients find the pair through it.
        let addresses = match pairs.values().find(|p| p.server == server) {
            Some(pair) => pairs::ordered_addresses(&pair.lease, &addresses),
            None => addresses,
        };
        let txn = self.db.begin_write()?;
        let entry = {
            let mut servers = txn.open_table(SERVERS)?;
            let previous: Option<ServerEntry> = match servers.get(&server.0.into_bytes())? {
                Some(bytes) => Some(decode(SERVERS_NAME, server, bytes.value())?),
                None => None,
            };
            if previous.is_none() && servers.len()? >= self.limits.servers_max {
                debug!(%server, "server table full");
                return Err(VldbError::Refused(ErrorCode::InvalidArgument));
            }
            let entry = ServerEntry {
                server,
                addresses,
                registered: now,
            };
            put_server(&mut servers, &entry)?;
            match &previous {
                None => info!(%server, addresses = ?entry.addresses, "server registered"),
                Some(p) if p.addresses != entry.addresses => {
                    info!(%server, addresses = ?entry.addresses, "server addresses changed");
                }
                Some(_) => debug!(%server, "server registered again"),
            }
            entry
        };
        txn.commit()?;
        drop(pairs);
        Ok(entry)
    }

    pub fn servers(&self) -> Result<Vec<ServerEntry>, VldbError> {
        let txn = self.db.begin_read()?;
        let servers = txn.open_table(SERVERS)?;
        let mut out = Vec::new();
        for row in servers.iter()? {
            let (key, bytes) = row?;
            out.push(decode(
                SERVERS_NAME,
                ServerId(uuid_of(key.value())),
                bytes.value(),
            )?);
        }
        Ok(out)
    }

    /// Creates the entry of a new RW volume on `server`, allocating its three ids.
    pub fn create_entry(
        &self,
        name: &VolumeName,
        server: ServerId,
    ) -> Result<VolumeEntry, VldbError> {
        let txn = self.db.begin_write()?;
        let entry = {
            let mut names = txn.open_table(VOLUME_NAMES)?;
            if names.get(name.as_str())?.is_some() {
                return Err(VldbError::Refused(ErrorCode::VolumeExists));
            }
            if txn
                .open_table(SERVERS)?
                .get(&server.0.into_bytes())?
                .is_none()
            {
                return Err(VldbError::Refused(ErrorCode::NoSuchServer));
            }
            let mut volumes = txn.open_table(VOLUMES)?;
            if volumes.len()? >= self.limits.volumes_max {
                debug!(%name, "volume table full");
                return Err(VldbError::Refused(ErrorCode::InvalidArgument));
            }
            let mut meta = txn.open_table(META)?;
            let next = meta
                .get(META_NEXT_VOLUME_ID)?
                .map(|v| v.value())
                .ok_or_else(|| VldbError::Corrupt {
                    table: META_NAME,
                    key: META_NEXT_VOLUME_ID.into(),
                    reason: "missing".into(),
                })?;
            let after = next
                .checked_add(IDS_PER_VOLUME)
                .ok_or(VldbError::IdsExhausted { next })?;
            meta.insert(META_NEXT_VOLUME_ID, after)?;
            let entry = VolumeEntry {
                name: name.clone(),
                rw_id: VolumeId(next),
                ro_id: None,
                backup_id: None,
                sites: vec![VolumeSite {
                    server,
                    kind: VolumeType::ReadWrite,
                }],
            };
            volumes.insert(next, encode(&entry)?.as_slice())?;
            names.insert(name.as_str(), next)?;
            txn.open_table(VOLUME_IDS)?.insert(next, next)?;
            entry
        };
        txn.commit()?;
        info!(volume = %entry.name, id = %entry.rw_id, "volume entry created");
        Ok(entry)
    }

    /// Removes a volume's entry and every index pointing at it; its ids stay used.
    pub fn remove_entry(&self, volume: &VolumeRef) -> Result<VolumeEntry, VldbError> {
        let txn = self.db.begin_write()?;
        let entry = {
            let mut names = txn.open_table(VOLUME_NAMES)?;
            let mut ids = txn.open_table(VOLUME_IDS)?;
            let mut volumes = txn.open_table(VOLUMES)?;
            let rw_id = resolve(&names, &ids, volume)?;
            let entry = read_entry(&volumes, rw_id)?;
            volumes.remove(rw_id)?;
            names.remove(entry.name.as_str())?;
            for id in entry_ids(&entry) {
                ids.remove(id.0)?;
            }
            entry
        };
        txn.commit()?;
        info!(volume = %entry.name, id = %entry.rw_id, "volume entry removed");
        Ok(entry)
    }

    /// The entry of a volume named by its name or by any of its ids.
    pub fn entry(&self, volume: &VolumeRef) -> Result<VolumeEntry, VldbError> {
        let txn = self.db.begin_read()?;
        let names = txn.open_table(VOLUME_NAMES)?;
        let ids = txn.open_table(VOLUME_IDS)?;
        let rw_id = resolve(&names, &ids, volume)?;
        read_entry(&txn.open_table(VOLUMES)?, rw_id)
    }

    /// Every entry, sorted by name.
    pub fn entries(&self) -> Result<Vec<VolumeEntry>, VldbError> {
        let txn = self.db.begin_read()?;
        let names = txn.open_table(VOLUME_NAMES)?;
        let volumes = txn.open_table(VOLUMES)?;
        let mut out = Vec::new();
        for row in names.iter()? {
            let (_, rw_id) = row?;
            out.push(read_entry(&volumes, rw_id.value())?);
        }
        Ok(out)
    }

    /// Checks a server's address list against the limits and drops duplicates.
    pub(crate) fn check_addresses(&self, addresses: Vec<String>) -> Result<Vec<String>, VldbError> {
        let limits = &self.limits;
        let bad_count = addresses.is_empty() || addresses.len() > limits.addresses_per_server_max;
        let bad_address = addresses
            .iter()
            .any(|a| a.is_empty() || a.len() > limits.address_bytes_max);
        if bad_count || bad_address {
            debug!(count = addresses.len(), "refusing a server's address list");
            return Err(VldbError::Refused(ErrorCode::InvalidArgument));
        }
        let mut seen = HashSet::new();
        Ok(addresses
            .into_iter()
            .filter(|a| seen.insert(a.clone()))
            .collect())
    }
}

/// Writes a server's entry. An address belongs to one server only: the entry takes its
/// addresses from any other server that had them.
pub(crate) fn put_server(
    servers: &mut Table<&[u8; 16], &[u8]>,
    entry: &ServerEntry,
) -> Result<(), VldbError> {
    let key = entry.server.0.into_bytes();
    let claimed: HashSet<&str> = entry.addresses.iter().map(String::as_str).collect();
    let mut losers = Vec::new();
    for row in servers.iter()? {
        let (other_key, bytes) = row?;
        if other_key.value() == &key {
            continue;
        }
        let mut other: ServerEntry = decode(
            SERVERS_NAME,
            ServerId(uuid_of(other_key.value())),
            bytes.value(),
        )?;
        let before = other.addresses.len();
        other.addresses.retain(|a| !claimed.contains(a.as_str()));
        if other.addresses.len() != before {
            losers.push(other);
        }
    }
    for other in losers {
        info!(server = %other.server, remaining = ?other.addresses,
            taken_by = %entry.server, "address moved to another server");
        servers.insert(&other.server.0.into_bytes(), encode(&other)?.as_slice())?;
    }
    servers.insert(&key, encode(entry)?.as_slice())?;
    Ok(())
}

const META_NAME: &str = "meta";
const VOLUMES_NAME: &str = "volumes";
const VOLUME_NAMES_NAME: &str = "volume_names";
pub(crate) const SERVERS_NAME: &str = "servers";

/// Every id an entry holds in the id index.
fn entry_ids(entry: &VolumeEntry) -> impl Iterator<Item = VolumeId> {
    std::iter::once(entry.rw_id)
        .chain(entry.ro_id)
        .chain(entry.backup_id)
}

fn resolve(
    names: &impl ReadableTable<&'static str, u64>,
    ids: &impl ReadableTable<u64, u64>,
    volume: &VolumeRef,
) -> Result<u64, VldbError> {
    let found = match volume {
        VolumeRef::Name(name) => names.get(name.as_str())?.map(|v| v.value()),
        VolumeRef::Id(id) => ids.get(id.0)?.map(|v| v.value()),
    };
    found.ok_or(VldbError::Refused(ErrorCode::NoSuchVolume))
}

fn read_entry(
    volumes: &impl ReadableTable<u64, &'static [u8]>,
    rw_id: u64,
) -> Result<VolumeEntry, VldbError> {
    match volumes.get(rw_id)? {
        Some(bytes) => decode(VOLUMES_NAME, rw_id, bytes.value()),
        // An index names a volume that is not there: the indexes are broken.
        None => Err(VldbError::Corrupt {
            table: VOLUME_NAMES_NAME,
            key: rw_id.to_string(),
            reason: "index points to a missing volume entry".into(),
        }),
    }
}

fn uuid_of(bytes: &[u8; 16]) -> uuid::Uuid {
    uuid::Uuid::from_bytes(*bytes)
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, VldbError> {
    postcard::to_stdvec(value).map_err(VldbError::Encode)
}

pub(crate) fn decode<T: DeserializeOwned>(
    table: &'static str,
    key: impl std::fmt::Display,
    bytes: &[u8],
) -> Result<T, VldbError> {
    postcard::from_bytes(bytes).map_err(|e| VldbError::Corrupt {
        table,
        key: key.to_string(),
        reason: e.to_string(),
    })
}
