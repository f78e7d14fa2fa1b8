//! `Store`: the VLDB in one redb file: volume entries and their indexes, servers, the id
//! counter and pairs.
//! Invariant: every durable change is one redb transaction that keeps the indexes true;
//! volume ids are never handed out twice.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::{
    Epoch, ErrorCode, PairEntry, PairName, ServerEntry, ServerId, Timestamp, VolumeEntry, VolumeId,
    VolumeName, VolumeRef, VolumeSite, VolumeType,
};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata};
use state::Millis;
use tracing::{debug, info};

use crate::error::VldbError;
use crate::limits::StoreLimits;
use crate::pairs::Pairs;
use crate::tables::{
    FORMAT_VERSION, META, META_FORMAT_VERSION, META_NAME, META_NEXT_VOLUME_ID, PAIRS, SERVERS,
    SERVERS_NAME, VOLUME_IDS, VOLUME_NAMES, VOLUME_NAMES_NAME, VOLUMES, VOLUMES_NAME, decode,
    encode, get_server, put_server, server_id_of,
};

/// The first RW volume id, as in AFS.
pub const VOLUME_ID_FIRST: VolumeId = VolumeId(536_870_912);

/// Ids reserved per volume: RW, then RO (`rw + 1`), then backup (`rw + 2`).
pub const IDS_PER_VOLUME: u64 = 3;

/// The VLDB's tables. Methods block on disk I/O: call them off the async runtime. They
/// take every nondeterministic input (the clock) as an argument, so that a replicated log
/// can later apply the same operations in the same order on every node.
pub struct Store {
    db: Database,
    limits: StoreLimits,
    pairs: Pairs,
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
            txn.open_table(PAIRS)?;
        }
        txn.commit()?;
        let pairs = Pairs::load(&db, limits.clone())?;
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
        self.pairs
            .write_server_entry(server, addresses, |addresses| {
                self.put_registered_server(server, addresses, now)
            })
    }

    /// The write of `register_server`, with the addresses as the entry lists them.
    fn put_registered_server(
        &self,
        server: ServerId,
        addresses: Vec<String>,
        now: Timestamp,
    ) -> Result<ServerEntry, VldbError> {
        let txn = self.db.begin_write()?;
        let entry = {
            let mut servers = txn.open_table(SERVERS)?;
            let previous = get_server(&servers, server)?;
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
                server_id_of(key.value()),
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

    /// `member` (an address) joins `pair`, serving the partition of `server`; the pair is
    /// created by its first member, and the server entry of `server` lists the members.
    pub fn join_pair(
        &self,
        pair: &PairName,
        server: ServerId,
        member: &str,
        registered: Timestamp,
    ) -> Result<(), VldbError> {
        self.pairs.join(&self.db, pair, server, member, registered)
    }

    /// Compare-and-set of a pair's lease; the new epoch is durable when this returns it.
    pub fn acquire_pair(
        &self,
        pair: &PairName,
        member: &str,
        epoch: Epoch,
        lease: Duration,
        now: Millis,
    ) -> Result<Epoch, VldbError> {
        self.pairs
            .acquire(&self.db, pair, member, epoch, lease, now)
    }

    /// The active extends its lease.
    pub fn renew_pair(
        &self,
        pair: &PairName,
        member: &str,
        epoch: Epoch,
        lease: Duration,
        now: Millis,
    ) -> Result<Epoch, VldbError> {
        self.pairs.renew(&self.db, pair, member, epoch, lease, now)
    }

    /// The active gives its lease up at once, optionally to `successor`.
    pub fn release_pair(
        &self,
        pair: &PairName,
        member: &str,
        epoch: Epoch,
        successor: Option<&str>,
        now: Millis,
    ) -> Result<(), VldbError> {
        self.pairs
            .release(&self.db, pair, member, epoch, successor, now)
    }

    pub fn pair(&self, pair: &PairName, now: Millis) -> Result<PairEntry, VldbError> {
        self.pairs.entry(pair, now)
    }

    /// Checks a server's address list against the limits and drops duplicates.
    fn check_addresses(&self, addresses: Vec<String>) -> Result<Vec<String>, VldbError> {
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
