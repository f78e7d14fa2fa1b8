//! `Store`: the VLDB in one redb file: volume entries and their indexes, servers, the id
//! counter, pairs, and the protection database (`pts`).
//! Invariant: every durable change is one redb transaction that keeps the indexes true;
//! volume ids are never handed out twice.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::{
    Epoch, ErrorCode, PairEntry, PairName, PtsEntry, ServerEntry, ServerId, Timestamp, VolumeEntry,
    VolumeId, VolumeName, VolumeRef, VolumeSite, VolumeType,
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
use crate::pts::{self, Credentials, PtsTables};
use crate::tables::{
    FORMAT_VERSION, FORMAT_VERSION_BEFORE_PTS, FORMAT_VERSION_SINGLE, META, META_FORMAT_VERSION,
    META_NAME, META_NEXT_VOLUME_ID, META_PTS_NEXT_GROUP_ID, META_PTS_NEXT_USER_ID, PAIR_SEQS,
    PAIRS, PTS_ENTRIES, PTS_GROUPS, PTS_MEMBERS, PTS_NAMES, RAFT, RAFT_APPLIED, RAFT_SNAPSHOT,
    RAFT_SNAPSHOT_INDEX, SERVERS, SERVERS_NAME, VOLUME_IDS, VOLUME_NAMES, VOLUME_NAMES_NAME,
    VOLUMES, VOLUMES_NAME, decode, encode, get_server, put_server, server_id_of,
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

/// Every table's rows: a snapshot's payload (format 3: `ImageBeforePts` and then the
/// protection database).
#[derive(Serialize, Deserialize)]
struct Image {
    next_volume_id: u64,
    volumes: Vec<(u64, Vec<u8>)>,
    volume_names: Vec<(String, u64)>,
    volume_ids: Vec<(u64, u64)>,
    servers: Vec<([u8; 16], Vec<u8>)>,
    pairs: Vec<(String, Vec<u8>)>,
    pair_seqs: Vec<(String, u64)>,
    pts_next_user_id: Option<u64>,
    pts_next_group_id: Option<u64>,
    pts_entries: Vec<(i32, Vec<u8>)>,
    /// (group, member); `pts_groups` is rebuilt from it.
    pts_members: Vec<(i32, i32)>,
}

/// A snapshot's payload as format 2 wrote it: read, never written, so that a snapshot
/// kept or sent before the upgrade still installs.
#[derive(Serialize, Deserialize)]
struct ImageBeforePts {
    next_volume_id: u64,
    volumes: Vec<(u64, Vec<u8>)>,
    volume_names: Vec<(String, u64)>,
    volume_ids: Vec<(u64, u64)>,
    servers: Vec<([u8; 16], Vec<u8>)>,
    pairs: Vec<(String, Vec<u8>)>,
    pair_seqs: Vec<(String, u64)>,
}

impl Image {
    /// Decodes a format 3 image, or a format 2 one. Each must use every byte, and a
    /// format 3 image has more fields than a format 2 one, so no bytes decode as both.
    fn decode(bytes: &[u8]) -> Result<Image, VldbError> {
        let whole = |result: Result<(Image, &[u8]), postcard::Error>| match result {
            Ok((image, [])) => Some(image),
            _ => None,
        };
        if let Some(image) = whole(postcard::take_from_bytes(bytes)) {
            return Ok(image);
        }
        let old: ImageBeforePts = match postcard::take_from_bytes(bytes) {
            Ok((old, [])) => old,
            _ => {
                return Err(VldbError::Corrupt {
                    table: "snapshot",
                    key: "image".into(),
                    reason: "neither a format 3 nor a format 2 image".into(),
                });
            }
        };
        Ok(Image {
            next_volume_id: old.next_volume_id,
            volumes: old.volumes,
            volume_names: old.volume_names,
            volume_ids: old.volume_ids,
            servers: old.servers,
            pairs: old.pairs,
            pair_seqs: old.pair_seqs,
            pts_next_user_id: None,
            pts_next_group_id: None,
            pts_entries: Vec::new(),
            pts_members: Vec::new(),
        })
    }
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
                Some(FORMAT_VERSION_BEFORE_PTS) => {
                    // The protection database's tables are created below, empty.
                    meta.insert(META_FORMAT_VERSION, FORMAT_VERSION)?;
                    info!(path = %path.display(), "VLDB format 2 upgraded to 3: a protection database");
                }
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
            txn.open_table(PTS_ENTRIES)?;
            txn.open_table(PTS_NAMES)?;
            txn.open_table(PTS_MEMBERS)?;
            txn.open_table(PTS_GROUPS)?;
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
            Command::PtsCreateUser { name, id, password } => self
                .write(mark, |txn| {
                    pts::create_user(txn, &self.limits, name, *id, password.as_deref())
                })
                .map(Applied::PtsEntry),
            Command::PtsSetPassword { user, password } => self
                .write(mark, |txn| pts::set_password(txn, user, password))
                .map(|()| Applied::Done),
            Command::PtsCreateGroup { name, id } => self
                .write(mark, |txn| pts::create_group(txn, &self.limits, name, *id))
                .map(Applied::PtsEntry),
            Command::PtsAddUser { user, group } => self
                .write(mark, |txn| pts::add_user(txn, &self.limits, user, group))
                .map(|()| Applied::Done),
            Command::PtsRemoveUser { user, group } => self
                .write(mark, |txn| pts::remove_user(txn, user, group))
                .map(|()| Applied::Done),
            Command::PtsDelete { name } => self
                .write(mark, |txn| pts::delete(txn, name))
                .map(|_| Applied::Done),
        }
    }

    /// Carries `command` out at once, as a single decider would (no log): for tests and
    /// tools that drive the tables directly. The commit is synced.
    pub fn apply_alone(&self, command: &Command) -> Result<Applied, VldbError> {
        self.execute(command, None, Millis(0))
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
            pts_next_user_id: {
                let meta = txn.open_table(META)?;
                meta.get(META_PTS_NEXT_USER_ID)?.map(|v| v.value())
            },
            pts_next_group_id: {
                let meta = txn.open_table(META)?;
                meta.get(META_PTS_NEXT_GROUP_ID)?.map(|v| v.value())
            },
            pts_entries: rows(&txn.open_table(PTS_ENTRIES)?, |k, v: &[u8]| (k, v.to_vec()))?,
            pts_members: rows(&txn.open_table(PTS_MEMBERS)?, |k: (i32, i32), ()| k)?,
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
        let image = Image::decode(image)?;
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
            for (key, value) in [
                (META_PTS_NEXT_USER_ID, image.pts_next_user_id),
                (META_PTS_NEXT_GROUP_ID, image.pts_next_group_id),
            ] {
                match value {
                    Some(value) => meta.insert(key, value)?,
                    None => meta.remove(key)?,
                };
            }
            let mut entries = txn.open_table(PTS_ENTRIES)?;
            entries.retain(|_, _| false)?;
            let mut names = txn.open_table(PTS_NAMES)?;
            names.retain(|_, _| false)?;
            for (id, bytes) in &image.pts_entries {
                let record: pts::PtsRecord = decode("snapshot", id, bytes)?;
                entries.insert(*id, bytes.as_slice())?;
                names.insert(record.name.as_str(), *id)?;
            }
            let mut members = txn.open_table(PTS_MEMBERS)?;
            members.retain(|_, _| false)?;
            let mut groups = txn.open_table(PTS_GROUPS)?;
            groups.retain(|_, _| false)?;
            for (group, member) in &image.pts_members {
                members.insert((*group, *member), ())?;
                groups.insert((*member, *group), ())?;
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

    /// Runs `read` on the protection database's tables in one read transaction.
    fn pts_read<T>(
        &self,
        read: impl FnOnce(
            &PtsTables<
                redb::ReadOnlyTable<i32, &'static [u8]>,
                redb::ReadOnlyTable<&'static str, i32>,
                redb::ReadOnlyTable<(i32, i32), ()>,
                redb::ReadOnlyTable<(i32, i32), ()>,
            >,
        ) -> Result<T, VldbError>,
    ) -> Result<T, VldbError> {
        let txn = self.db.begin_read()?;
        let tables = PtsTables {
            entries: txn.open_table(PTS_ENTRIES)?,
            names: txn.open_table(PTS_NAMES)?,
            members: txn.open_table(PTS_MEMBERS)?,
            groups: txn.open_table(PTS_GROUPS)?,
        };
        read(&tables)
    }

    /// A user's groups, or a group's members.
    pub fn pts_membership(&self, name: &str) -> Result<Vec<PtsEntry>, VldbError> {
        self.pts_read(|tables| tables.membership(name))
    }

    /// Every user and group, the built-in groups first.
    pub fn pts_entries(&self) -> Result<Vec<PtsEntry>, VldbError> {
        self.pts_read(|tables| tables.list())
    }

    /// What a login needs of `user`, if it is a user.
    pub fn pts_credentials(&self, user: &str) -> Result<Option<Credentials>, VldbError> {
        self.pts_read(|tables| tables.credentials(user))
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
            Command::PtsCreateUser { name, .. } => pts::check_user_name(name),
            Command::PtsCreateGroup { name, .. } => pts::check_group_name(name).map(|_| ()),
            Command::PtsSetPassword { user, .. } => pts::check_user_name(user),
            Command::PtsAddUser { user, group } | Command::PtsRemoveUser { user, group } => {
                pts::check_user_name(user)?;
                check_existing_name(group)
            }
            Command::PtsDelete { name } => check_existing_name(name),
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

/// A name of an existing user or group may be at most as long as any: a longer one is
/// refused before it enters the log.
fn check_existing_name(name: &str) -> Result<(), VldbError> {
    if name.is_empty() || name.len() > pts::PRINCIPAL_NAME_BYTES_MAX {
        return Err(VldbError::Refused(ErrorCode::NoSuchPrincipal {
            name: name.chars().take(pts::PRINCIPAL_NAME_BYTES_MAX).collect(),
        }));
    }
    Ok(())
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
