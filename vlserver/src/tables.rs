//! The VLDB's redb tables: their names, key and value types, postcard values, and
//! `put_server`.
//! Invariant: names and encodings change only with `FORMAT_VERSION`; an address is in one
//! server entry at most.

use std::collections::HashSet;

use std::path::Path;

use proto::{ServerEntry, ServerId};
use redb::{Database, ReadableTable, Table, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{info, warn};

use crate::error::VldbError;

/// The layout version of the tables below; bumped on any incompatible change. Version 1
/// was the single VLDB's; version 2 adds `pair_seqs` and `raft`, and is opened as the
/// state machine of a replica (a version 1 file is taken over: see `Store::open`);
/// version 3 adds the protection database (`pts_*`, and its counters in `meta`).
pub const FORMAT_VERSION: u64 = 3;
/// The single VLDB's format, which `Store::open` upgrades in place.
pub const FORMAT_VERSION_SINGLE: u64 = 1;
/// The replicated format before the protection database: `Store::open` upgrades it in
/// place (its `pts_*` tables start empty).
pub const FORMAT_VERSION_BEFORE_PTS: u64 = 2;

pub(crate) const META_NAME: &str = "meta";
/// Settings and counters by key.
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new(META_NAME);
pub(crate) const META_FORMAT_VERSION: &str = "format_version";
pub(crate) const META_NEXT_VOLUME_ID: &str = "next_volume_id";

/// The next user id to allocate (format 3; absent means `pts::USER_ID_FIRST`).
pub(crate) const META_PTS_NEXT_USER_ID: &str = "pts_next_user_id";
/// The magnitude of the next group id to allocate, downwards (format 3; absent means
/// `-pts::GROUP_ID_FIRST`).
pub(crate) const META_PTS_NEXT_GROUP_ID: &str = "pts_next_group_id";

pub(crate) const VOLUMES_NAME: &str = "volumes";
/// RW volume id -> postcard `VolumeEntry`.
pub(crate) const VOLUMES: TableDefinition<u64, &[u8]> = TableDefinition::new(VOLUMES_NAME);

pub(crate) const VOLUME_NAMES_NAME: &str = "volume_names";
/// Volume name -> RW volume id.
pub(crate) const VOLUME_NAMES: TableDefinition<&str, u64> = TableDefinition::new(VOLUME_NAMES_NAME);

/// Every id of an existing volume (RW, and RO/backup once they exist) -> RW volume id.
pub(crate) const VOLUME_IDS: TableDefinition<u64, u64> = TableDefinition::new("volume_ids");

pub(crate) const SERVERS_NAME: &str = "servers";
/// Server UUID bytes -> postcard `ServerEntry`.
pub(crate) const SERVERS: TableDefinition<&[u8; 16], &[u8]> = TableDefinition::new(SERVERS_NAME);

pub(crate) const PAIRS_NAME: &str = "pairs";
/// Pair name -> postcard `PairRecord` (`pairs.rs`).
pub(crate) const PAIRS: TableDefinition<&str, &[u8]> = TableDefinition::new(PAIRS_NAME);

/// Pair name -> how many grants, renewals and releases were applied (`PairLease::seq`),
/// which an acquire decided by the leader compares. Added in format 2; absent means 0.
pub(crate) const PAIR_SEQS: TableDefinition<&str, u64> = TableDefinition::new("pair_seqs");

pub(crate) const PTS_ENTRIES_NAME: &str = "pts_entries";
/// Principal id (users positive, groups negative) -> postcard `PtsRecord` (format 3).
pub(crate) const PTS_ENTRIES: TableDefinition<i32, &[u8]> = TableDefinition::new(PTS_ENTRIES_NAME);
/// User or group name -> its id (format 3). The built-in groups are not stored.
pub(crate) const PTS_NAMES: TableDefinition<&str, i32> = TableDefinition::new("pts_names");
/// (group id, member user id) for every stored membership (format 3).
pub(crate) const PTS_MEMBERS: TableDefinition<(i32, i32), ()> = TableDefinition::new("pts_members");
/// (user id, group id): `PTS_MEMBERS` the other way round, for a user's groups.
pub(crate) const PTS_GROUPS: TableDefinition<(i32, i32), ()> = TableDefinition::new("pts_groups");

/// The replica's Raft bookkeeping, written in the same transaction as what it describes
/// (format 2): `RAFT_APPLIED`, `RAFT_SNAPSHOT`, `RAFT_CELL`; values in `replica`'s
/// encoding, opaque to the tables.
pub(crate) const RAFT: TableDefinition<&str, &[u8]> = TableDefinition::new("raft");
/// The last log id applied and the membership it left.
pub(crate) const RAFT_APPLIED: &str = "applied";
/// The current snapshot: its metadata and the image of every table.
pub(crate) const RAFT_SNAPSHOT: &str = "snapshot";
/// The log index of the current snapshot, `u64` little-endian.
pub(crate) const RAFT_SNAPSHOT_INDEX: &str = "snapshot_index";
/// The cell this replica's data belongs to.
pub(crate) const RAFT_CELL: &str = "cell";

thread_local! {
    /// Panics on this thread are caught and reported by the caller (`quiet_panics`).
    static QUIET_PANICS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the messages of panics on this thread kept quiet. The process's panic
/// hook is wrapped once, for good, rather than swapped for the call: a swap is global,
/// and would silence, or outlive, every other thread's panics meanwhile.
fn quiet_panics<T>(f: impl FnOnce() -> T) -> T {
    static WRAPPED: std::sync::Once = std::sync::Once::new();
    WRAPPED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET_PANICS.get() {
                previous(info);
            }
        }));
    });
    QUIET_PANICS.set(true);
    let result = f();
    QUIET_PANICS.set(false);
    result
}

/// Opens (creating if missing) the redb file at `path` and checks every page's checksum,
/// so a file damaged at rest is refused here, naming it, rather than met half-way through
/// a transaction. redb repairs what a crash left torn (its last commit stands); a file it
/// cannot repair, or that makes it panic, is `Corrupt`.
pub(crate) fn open_checked(path: &Path) -> Result<Database, VldbError> {
    // redb may panic on pages it cannot make sense of; that is reported below as a
    // corrupt file, so the panic's own message is kept quiet meanwhile, on this thread
    // only: a panic anywhere else (another replica of a test process, a failing test)
    // still says why.
    let opened = quiet_panics(|| {
        std::panic::catch_unwind(|| {
            let mut db = Database::create(path)?;
            let intact = db.check_integrity()?;
            Ok::<_, redb::DatabaseError>((db, intact))
        })
    });
    let corrupt = |reason: String| VldbError::CorruptFile {
        path: path.to_owned(),
        reason,
    };
    match opened {
        Ok(Ok((db, true))) => Ok(db),
        Ok(Ok((db, false))) => {
            warn!(path = %path.display(), "repaired a VLDB file a crash left torn");
            Ok(db)
        }
        Ok(Err(redb::DatabaseError::Storage(redb::StorageError::Corrupted(reason)))) => {
            Err(corrupt(reason))
        }
        Ok(Err(source)) => Err(VldbError::Open {
            path: path.to_owned(),
            source,
        }),
        Err(_) => Err(corrupt("redb could not read its pages".into())),
    }
}

/// The entry of `server`, if it has one.
pub(crate) fn get_server(
    servers: &impl ReadableTable<&'static [u8; 16], &'static [u8]>,
    server: ServerId,
) -> Result<Option<ServerEntry>, VldbError> {
    match servers.get(&server.0.into_bytes())? {
        Some(bytes) => Ok(Some(decode(SERVERS_NAME, server, bytes.value())?)),
        None => Ok(None),
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
        let mut other: ServerEntry =
            decode(SERVERS_NAME, server_id_of(other_key.value()), bytes.value())?;
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

/// The server a key of the servers table names.
pub(crate) fn server_id_of(key: &[u8; 16]) -> ServerId {
    ServerId(uuid::Uuid::from_bytes(*key))
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, VldbError> {
    postcard::to_stdvec(value).map_err(VldbError::Encode)
}

/// Decodes a value read from `table` at `key`; bytes that do not decode are corruption.
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
