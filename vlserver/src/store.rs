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
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, WriteTransaction,
};
use serde::{Deserialize, Serialize};
use state::Millis;
use tracing::{debug, info};

use crate::command::{Applied, Command, Outcome};
use crate::error::VldbError;
use crate::limits::StoreLimits;
use crate::pairs::{PairUpdate, Pairs};
use crate::tables::{
    FORMAT_VERSION, FORMAT_VERSION_SINGLE, META, META_FORMAT_VERSION, META_NAME,
    META_NEXT_VOLUME_ID, PAIR_SEQS, PAIRS, RAFT, RAFT_APPLIED, RAFT_SNAPSHOT, RAFT_SNAPSHOT_INDEX,
    SERVERS, SERVERS_NAME, VOLUME_IDS, VOLUME_NAMES, VOLUME_NAMES_NAME, VOLUMES, VOLUMES_NAME,
    decode, encode, get_server, put_server, server_id_of,
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
    /// The leader checks pair decisions here (`VldbService`) before it proposes them.
    pub(crate) pairs: Pairs,
    taken_over: bool,
}

/// Every table's rows: a snapshot's payload.
#[derive(Serialize, Deserialize)]
struct Image {
    next_volume_id: u64,
    volumes: Vec<(u64, Vec<u8>)>,
    volume_names: Vec<(String, u64)>,
    volume_ids: Vec<(u64, u64)>,
    servers: Vec<([u8; 16], Vec<u8>)>,
    pairs: Vec<(String, Vec<u8>)>,
    pair_seqs: Vec<(String, u64)>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("limits", &self.limits)
            .finish()
    }
}

impl Store {
    /// Opens the database at `path`, creating it and its tables if it does not exist. A
    /// single VLDB's file (format 1) is upgraded in place: its tables stay as they are,
    /// and `taken_over` says so, for the replica to make them its first snapshot.
    pub fn open(path: &Path, limits: StoreLimits) -> Result<Store, VldbError> {
        let db = crate::tables::open_checked(path)?;
        let txn = db.begin_write()?;
        let mut taken_over = false;
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
                Some(FORMAT_VERSION_SINGLE) => {
                    // Upgraded to format 2 only with the snapshot that takes it over, in
                    // one transaction (`install_image`): until then it stays a single
                    // VLDB's file, and a start that is interrupted or refused takes it
                    // over again next time.
                    taken_over = true;
                    info!(path = %path.display(),
                        "taking over a single VLDB's database as a replica's state");
                }
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
            txn.open_table(PAIR_SEQS)?;
            txn.open_table(RAFT)?;
        }
        txn.commit()?;
        let pairs = Pairs::load(&db, limits.clone())?;
        Ok(Store {
            db,
            limits,
            pairs,
            taken_over,
        })
    }

    /// True when `open` upgraded a single VLDB's file: its tables hold data that no log
    /// entry describes.
    pub fn taken_over(&self) -> bool {
        self.taken_over
    }

    /// Applies one command from the log, with `mark` (the replica's applied log id and
    /// membership) written in the same transaction, so that a restart neither loses nor
    /// repeats a change. A refusal is an answer (`Outcome`), and its mark is written too.
    /// Commits are not synced: the log is durable, and a replica that crashes applies
    /// again from the last durable mark (a snapshot's synced commit makes every earlier
    /// one durable before the log behind it is purged).
    pub fn apply(&self, command: &Command, mark: &[u8], now: Millis) -> Result<Outcome, VldbError> {
        match self.execute(command, Some(mark), now) {
            Ok(applied) => Ok(Outcome(Ok(applied))),
            Err(VldbError::Refused(code)) => Ok(Outcome(Err(code))),
            Err(e) => Err(e),
        }
    }

    /// Carries `command` out in one transaction, with `mark` if it comes from the log;
    /// without one (a single decider, as the tests drive it) the commit is synced.
    fn execute(
        &self,
        command: &Command,
        mark: Option<&[u8]>,
        now: Millis,
    ) -> Result<Applied, VldbError> {
        match command {
            Command::RegisterServer {
                server,
                addresses,
                registered,
            } => self
                .write(mark, |txn| {
                    let addresses = self.check_addresses(addresses.clone())?;
                    let addresses = self.pairs.server_addresses(*server, addresses);
                    Self::put_registered_server(&self.limits, txn, *server, addresses, *registered)
                })
                .map(Applied::Server),
            Command::CreateEntry { name, server } => self
                .write(mark, |txn| self.create_entry_in(txn, name, *server))
                .map(Applied::VolumeEntry),
            Command::RemoveEntry { volume } => self
                .write(mark, |txn| Self::remove_entry_in(txn, volume))
                .map(Applied::VolumeEntry),
            Command::JoinPair {
                pair,
                server,
                member,
                registered,
            } => self
                .write_pair(mark, |txn| {
                    self.pairs.join(txn, pair, *server, member, *registered)
                })
                .map(|_| Applied::Done),
            Command::AcquirePair {
                pair,
                member,
                epoch,
                seq,
                lease_ms,
            } => {
                let lease = Duration::from_millis(*lease_ms);
                self.write_pair(mark, |txn| {
                    self.pairs
                        .acquire(txn, pair, member, *epoch, *seq, lease, now)
                })
                .map(Applied::Epoch)
            }
            Command::RenewPair {
                pair,
                member,
                epoch,
                lease_ms,
            } => {
                let lease = Duration::from_millis(*lease_ms);
                self.write_pair(mark, |txn| {
                    self.pairs.renew(txn, pair, member, *epoch, lease, now)
                })
                .map(Applied::Epoch)
            }
            Command::ReleasePair {
                pair,
                member,
                epoch,
                successor,
            } => self
                .write_pair(mark, |txn| {
                    self.pairs
                        .release(txn, pair, member, *epoch, successor.as_deref(), now)
                })
                .map(|_| Applied::Done),
        }
    }

    /// Writes `mark` alone, unsynced: an entry that changes no table (blank, membership),
    /// or one that was refused.
    pub fn write_mark(&self, mark: &[u8]) -> Result<(), VldbError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::None)
            .map_err(|e| VldbError::Storage(e.into()))?;
        txn.open_table(RAFT)?.insert(RAFT_APPLIED, mark)?;
        txn.commit()?;
        Ok(())
    }

    /// The last mark written, if any.
    pub fn applied_mark(&self) -> Result<Option<Vec<u8>>, VldbError> {
        self.raft_value(RAFT_APPLIED)
    }

    /// Keeps `snapshot` (of log index `index`) as the current one, durably, unless a newer
    /// one is kept already (an install may have overtaken a build). Returns whether it
    /// was kept. Its synced commit, made either way, makes every unsynced commit before
    /// it durable too: the marks the snapshot covers are, before openraft purges the log
    /// behind it.
    pub fn keep_snapshot(&self, snapshot: &[u8], index: u64) -> Result<bool, VldbError> {
        let txn = self.db.begin_write()?;
        let kept = {
            let mut raft = txn.open_table(RAFT)?;
            let stored = raft
                .get(RAFT_SNAPSHOT_INDEX)?
                .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
                .map(u64::from_le_bytes);
            if stored.is_some_and(|stored| stored > index) {
                false
            } else {
                raft.insert(RAFT_SNAPSHOT, snapshot)?;
                raft.insert(RAFT_SNAPSHOT_INDEX, index.to_le_bytes().as_slice())?;
                true
            }
        };
        txn.commit()?;
        Ok(kept)
    }

    /// One of the replica's own values (`RAFT_SNAPSHOT`, `RAFT_CELL`...).
    pub fn raft_value(&self, key: &str) -> Result<Option<Vec<u8>>, VldbError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(RAFT)?;
        Ok(table.get(key)?.map(|v| v.value().to_vec()))
    }

    /// Writes one of the replica's own values, durably.
    pub fn set_raft_value(&self, key: &str, value: &[u8]) -> Result<(), VldbError> {
        let txn = self.db.begin_write()?;
        txn.open_table(RAFT)?.insert(key, value)?;
        txn.commit()?;
        Ok(())
    }

    /// The applied mark and every table's rows, for a snapshot: read in one transaction,
    /// so the image is the state the mark names.
    pub fn image(&self) -> Result<(Option<Vec<u8>>, Vec<u8>), VldbError> {
        let txn = self.db.begin_read()?;
        let mark = txn
            .open_table(RAFT)?
            .get(RAFT_APPLIED)?
            .map(|v| v.value().to_vec());
        let image = Image {
            next_volume_id: txn
                .open_table(META)?
                .get(META_NEXT_VOLUME_ID)?
                .map_or(VOLUME_ID_FIRST.0, |v| v.value()),
            volumes: rows(&txn.open_table(VOLUMES)?, |k, v: &[u8]| (k, v.to_vec()))?,
            volume_names: rows(&txn.open_table(VOLUME_NAMES)?, |k: &str, v| {
                (k.to_owned(), v)
            })?,
            volume_ids: rows(&txn.open_table(VOLUME_IDS)?, |k, v| (k, v))?,
            servers: rows(&txn.open_table(SERVERS)?, |k: &[u8; 16], v: &[u8]| {
                (*k, v.to_vec())
            })?,
            pairs: rows(&txn.open_table(PAIRS)?, |k: &str, v: &[u8]| {
                (k.to_owned(), v.to_vec())
            })?,
            pair_seqs: rows(&txn.open_table(PAIR_SEQS)?, |k: &str, v| (k.to_owned(), v))?,
        };
        Ok((mark, encode(&image)?))
    }

    /// Replaces every table with `image`, and writes `mark` and `snapshot` (the snapshot
    /// as stored, of log index `index`), durably, in one transaction, which also makes
    /// the file format 2; the pairs are read again (each holder keeps one whole lease
    /// from its first call).
    pub fn install_image(
        &self,
        image: &[u8],
        mark: &[u8],
        snapshot: &[u8],
        index: u64,
    ) -> Result<(), VldbError> {
        let image: Image = decode("snapshot", "image", image)?;
        let txn = self.db.begin_write()?;
        {
            txn.open_table(META)?
                .insert(META_FORMAT_VERSION, FORMAT_VERSION)?;
            let mut raft = txn.open_table(RAFT)?;
            raft.insert(RAFT_SNAPSHOT, snapshot)?;
            raft.insert(RAFT_SNAPSHOT_INDEX, index.to_le_bytes().as_slice())?;
        }
        {
            let mut meta = txn.open_table(META)?;
            meta.insert(META_NEXT_VOLUME_ID, image.next_volume_id)?;
            let mut volumes = txn.open_table(VOLUMES)?;
            volumes.retain(|_, _| false)?;
            for (k, v) in &image.volumes {
                volumes.insert(*k, v.as_slice())?;
            }
            let mut names = txn.open_table(VOLUME_NAMES)?;
            names.retain(|_, _| false)?;
            for (k, v) in &image.volume_names {
                names.insert(k.as_str(), *v)?;
            }
            let mut ids = txn.open_table(VOLUME_IDS)?;
            ids.retain(|_, _| false)?;
            for (k, v) in &image.volume_ids {
                ids.insert(*k, *v)?;
            }
            let mut servers = txn.open_table(SERVERS)?;
            servers.retain(|_, _| false)?;
            for (k, v) in &image.servers {
                servers.insert(k, v.as_slice())?;
            }
            let mut pairs = txn.open_table(PAIRS)?;
            pairs.retain(|_, _| false)?;
            for (k, v) in &image.pairs {
                pairs.insert(k.as_str(), v.as_slice())?;
            }
            let mut seqs = txn.open_table(PAIR_SEQS)?;
            seqs.retain(|_, _| false)?;
            for (k, v) in &image.pair_seqs {
                seqs.insert(k.as_str(), *v)?;
            }
            txn.open_table(RAFT)?.insert(RAFT_APPLIED, mark)?;
        }
        txn.commit()?;
        self.pairs.reload(&self.db)
    }

    /// Runs `op` in one write transaction and commits it with `mark`, unsynced. A refused
    /// `op` leaves nothing behind; its mark is still written, alone.
    fn write<T>(
        &self,
        mark: Option<&[u8]>,
        op: impl FnOnce(&WriteTransaction) -> Result<T, VldbError>,
    ) -> Result<T, VldbError> {
        let mut txn = self.db.begin_write()?;
        if mark.is_some() {
            txn.set_durability(Durability::None)
                .map_err(|e| VldbError::Storage(e.into()))?;
        }
        let value = match op(&txn) {
            Ok(value) => value,
            Err(e) => {
                txn.abort()?;
                if let (Some(mark), VldbError::Refused(_)) = (mark, &e) {
                    self.write_mark(mark)?;
                }
                return Err(e);
            }
        };
        if let Some(mark) = mark {
            txn.open_table(RAFT)?.insert(RAFT_APPLIED, mark)?;
        }
        txn.commit()?;
        Ok(value)
    }

    /// `write` for a pair change: the pair's new state is installed in memory once the
    /// transaction committed. Returns the pair's epoch after it.
    fn write_pair(
        &self,
        mark: Option<&[u8]>,
        op: impl FnOnce(&WriteTransaction) -> Result<PairUpdate, VldbError>,
    ) -> Result<Epoch, VldbError> {
        let update = self.write(mark, op)?;
        Ok(self.pairs.install(update))
    }

    /// Records a fileserver, or replaces the addresses of one already known. An address
    /// belongs to one server only: the latest to register it takes it from any other
    /// (a fileserver whose partition was wiped comes back with a new id on the old address).
    pub fn register_server(
        &self,
        server: ServerId,
        addresses: Vec<String>,
        registered: Timestamp,
    ) -> Result<ServerEntry, VldbError> {
        let command = Command::RegisterServer {
            server,
            addresses,
            registered,
        };
        match self.execute(&command, None, Millis(0))? {
            Applied::Server(entry) => Ok(entry),
            other => Err(unexpected(&command, &other)),
        }
    }

    /// The write of `register_server`, with the addresses as the entry lists them.
    fn put_registered_server(
        limits: &StoreLimits,
        txn: &WriteTransaction,
        server: ServerId,
        addresses: Vec<String>,
        now: Timestamp,
    ) -> Result<ServerEntry, VldbError> {
        let entry = {
            let mut servers = txn.open_table(SERVERS)?;
            let previous = get_server(&servers, server)?;
            if previous.is_none() && servers.len()? >= limits.servers_max {
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
        let command = Command::CreateEntry {
            name: name.clone(),
            server,
        };
        self.execute_for_entry(&command)
    }

    fn create_entry_in(
        &self,
        txn: &WriteTransaction,
        name: &VolumeName,
        server: ServerId,
    ) -> Result<VolumeEntry, VldbError> {
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
        info!(volume = %entry.name, id = %entry.rw_id, "volume entry created");
        Ok(entry)
    }

    /// Removes a volume's entry and every index pointing at it; its ids stay used.
    pub fn remove_entry(&self, volume: &VolumeRef) -> Result<VolumeEntry, VldbError> {
        let command = Command::RemoveEntry {
            volume: volume.clone(),
        };
        self.execute_for_entry(&command)
    }

    fn execute_for_entry(&self, command: &Command) -> Result<VolumeEntry, VldbError> {
        match self.execute(command, None, Millis(0))? {
            Applied::VolumeEntry(entry) => Ok(entry),
            other => Err(unexpected(command, &other)),
        }
    }

    fn remove_entry_in(
        txn: &WriteTransaction,
        volume: &VolumeRef,
    ) -> Result<VolumeEntry, VldbError> {
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
        let command = Command::JoinPair {
            pair: pair.clone(),
            server,
            member: member.to_owned(),
            registered,
        };
        self.execute(&command, None, Millis(0)).map(|_| ())
    }

    /// Compare-and-set of a pair's lease, checked and applied at once as a single
    /// decider would; the new epoch is durable when this returns it.
    pub fn acquire_pair(
        &self,
        pair: &PairName,
        member: &str,
        epoch: Epoch,
        lease: Duration,
        now: Millis,
    ) -> Result<Epoch, VldbError> {
        let seq = self.pairs.check_acquire(pair, member, epoch, lease, now)?;
        let command = Command::AcquirePair {
            pair: pair.clone(),
            member: member.to_owned(),
            epoch,
            seq,
            lease_ms: millis(lease),
        };
        self.execute_for_epoch(&command, now)
    }

    /// The active extends its lease (checked and applied at once).
    pub fn renew_pair(
        &self,
        pair: &PairName,
        member: &str,
        epoch: Epoch,
        lease: Duration,
        now: Millis,
    ) -> Result<Epoch, VldbError> {
        self.pairs.check_renew(pair, member, epoch, lease, now)?;
        let command = Command::RenewPair {
            pair: pair.clone(),
            member: member.to_owned(),
            epoch,
            lease_ms: millis(lease),
        };
        self.execute_for_epoch(&command, now)
    }

    /// The active gives its lease up at once, optionally to `successor` (checked and
    /// applied at once).
    pub fn release_pair(
        &self,
        pair: &PairName,
        member: &str,
        epoch: Epoch,
        successor: Option<&str>,
        now: Millis,
    ) -> Result<(), VldbError> {
        self.pairs.check_holder(pair, member, epoch, now)?;
        let command = Command::ReleasePair {
            pair: pair.clone(),
            member: member.to_owned(),
            epoch,
            successor: successor.map(str::to_owned),
        };
        self.execute(&command, None, now).map(|_| ())
    }

    fn execute_for_epoch(&self, command: &Command, now: Millis) -> Result<Epoch, VldbError> {
        match self.execute(command, None, now)? {
            Applied::Epoch(epoch) => Ok(epoch),
            other => Err(unexpected(command, &other)),
        }
    }

    pub fn pair(&self, pair: &PairName, now: Millis) -> Result<PairEntry, VldbError> {
        self.pairs.entry(pair, now)
    }

    /// The checks a command must pass before the leader proposes it: the same limits its
    /// apply enforces on sizes, so that no oversized entry enters the log (one too large
    /// for a frame would stall replication behind it).
    pub fn check_proposal(&self, command: &Command) -> Result<(), VldbError> {
        match command {
            Command::RegisterServer { addresses, .. } => {
                self.check_addresses(addresses.clone()).map(|_| ())
            }
            Command::JoinPair { member, .. }
            | Command::AcquirePair { member, .. }
            | Command::RenewPair { member, .. }
            | Command::ReleasePair { member, .. }
                if member.is_empty() || member.len() > self.limits.address_bytes_max =>
            {
                Err(VldbError::Refused(ErrorCode::InvalidArgument))
            }
            Command::ReleasePair {
                successor: Some(successor),
                ..
            } if successor.len() > self.limits.address_bytes_max => {
                Err(VldbError::Refused(ErrorCode::InvalidArgument))
            }
            _ => Ok(()),
        }
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

/// Every row of `table`, mapped by `row`.
fn rows<K, V, T>(
    table: &impl ReadableTable<K, V>,
    row: impl Fn(K::SelfType<'_>, V::SelfType<'_>) -> T,
) -> Result<Vec<T>, VldbError>
where
    K: redb::Key + 'static,
    V: redb::Value + 'static,
{
    let mut out = Vec::new();
    for entry in table.iter()? {
        let (key, value) = entry?;
        out.push(row(key.value(), value.value()));
    }
    Ok(out)
}

/// An outcome that does not fit its command: a bug, reported rather than trusted.
fn unexpected(command: &Command, applied: &Applied) -> VldbError {
    VldbError::Task(format!("{command:?} applied to {applied:?}"))
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
