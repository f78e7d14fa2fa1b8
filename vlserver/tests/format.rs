//! The VLDB's on-disk format, pinned from outside `Store`: the table names, their key and
//! value types, and the golden bytes of every record kind a `Store` writes.

mod common;

use std::time::Duration;

use proto::{Epoch, PairName, ServerId, Timestamp, VolumeName};
use redb::{Database, ReadableDatabase, TableDefinition, TableHandle};
use state::Millis;
use uuid::Uuid;
use vlserver::{Store, StoreLimits, VOLUME_ID_FIRST};

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const VOLUMES: TableDefinition<u64, &[u8]> = TableDefinition::new("volumes");
const VOLUME_NAMES: TableDefinition<&str, u64> = TableDefinition::new("volume_names");
const VOLUME_IDS: TableDefinition<u64, u64> = TableDefinition::new("volume_ids");
const SERVERS: TableDefinition<&[u8; 16], &[u8]> = TableDefinition::new("servers");
const PAIRS: TableDefinition<&str, &[u8]> = TableDefinition::new("pairs");
const PAIR_SEQS: TableDefinition<&str, u64> = TableDefinition::new("pair_seqs");

const SERVER: ServerId = ServerId(Uuid::from_u128(0x0011_2233_4455_6677_8899_aabb_ccdd_eeff));
const PAIR_SERVER: ServerId = ServerId(Uuid::from_u128(0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10));
const REGISTERED: Timestamp = Timestamp {
    secs: 1_700_000_000,
    nanos: 5,
};
const A: &str = "127.0.0.1:4001";
const B: &str = "127.0.0.1:4002";

/// A server, a volume on it, and a pair whose lease A holds in epoch 1.
fn populate(store: &Store) {
    store
        .register_server(SERVER, vec!["127.0.0.1:7000".into()], REGISTERED)
        .unwrap();
    let name = VolumeName::parse("root.cell").unwrap();
    store.create_entry(&name, SERVER).unwrap();
    let pair = PairName::parse("p1").unwrap();
    store.join_pair(&pair, PAIR_SERVER, A, REGISTERED).unwrap();
    store.join_pair(&pair, PAIR_SERVER, B, REGISTERED).unwrap();
    let epoch = store
        .acquire_pair(&pair, A, Epoch(0), Duration::from_secs(2), Millis(0))
        .unwrap();
    assert_eq!(epoch, Epoch(1));
}

#[test]
fn the_tables_and_records_keep_their_names_and_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vldb.redb");
    populate(&Store::open(&path, StoreLimits::default()).unwrap());

    let db = Database::open(&path).unwrap();
    let txn = db.begin_read().unwrap();
    let mut names: Vec<String> = txn
        .list_tables()
        .unwrap()
        .map(|t| t.name().to_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "meta",
            "pair_seqs",
            "pairs",
            "pts_entries",
            "pts_groups",
            "pts_members",
            "pts_names",
            "raft",
            "servers",
            "volume_ids",
            "volume_names",
            "volumes"
        ]
    );

    let meta = txn.open_table(META).unwrap();
    assert_eq!(meta.get("format_version").unwrap().unwrap().value(), 3);
    let next = meta.get("next_volume_id").unwrap().unwrap().value();
    assert_eq!(next, VOLUME_ID_FIRST.0 + 3);

    let rw = VOLUME_ID_FIRST.0;
    let names = txn.open_table(VOLUME_NAMES).unwrap();
    assert_eq!(names.get("root.cell").unwrap().unwrap().value(), rw);
    let ids = txn.open_table(VOLUME_IDS).unwrap();
    assert_eq!(ids.get(rw).unwrap().unwrap().value(), rw);

    let volumes = txn.open_table(VOLUMES).unwrap();
    assert_eq!(
        volumes.get(rw).unwrap().unwrap().value(),
        volume_entry_bytes()
    );
    let servers = txn.open_table(SERVERS).unwrap();
    let server = |id: ServerId| servers.get(&id.0.into_bytes()).unwrap().unwrap();
    assert_eq!(server(SERVER).value(), server_entry_bytes());
    assert_eq!(server(PAIR_SERVER).value(), pair_server_entry_bytes());
    let pairs = txn.open_table(PAIRS).unwrap();
    assert_eq!(
        pairs.get("p1").unwrap().unwrap().value(),
        pair_record_bytes()
    );
    // One grant applied to p1.
    let seqs = txn.open_table(PAIR_SEQS).unwrap();
    assert_eq!(seqs.get("p1").unwrap().unwrap().value(), 1);
}

/// A single VLDB's file (format 1: no `pair_seqs`, no `raft`) is taken over as it is.
#[test]
fn a_single_vldb_file_is_taken_over_with_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vldb.redb");
    populate(&Store::open(&path, StoreLimits::default()).unwrap());
    common::as_single_vldb_file(&path);
    let store = Store::open(&path, StoreLimits::default()).unwrap();
    assert!(store.taken_over());
    assert_eq!(store.entries().unwrap().len(), 1);
    let pair = store
        .pair(&PairName::parse("p1").unwrap(), Millis(0))
        .unwrap();
    assert_eq!((pair.epoch, pair.active.as_deref()), (Epoch(1), Some(A)));
    drop(store);
    // Until a replica makes the tables its first snapshot, the file stays format 1, so an
    // interrupted or refused takeover starts over next time.
    assert!(
        Store::open(&path, StoreLimits::default())
            .unwrap()
            .taken_over()
    );
}

/// A postcard `Uuid`: its length, then its bytes.
fn uuid_bytes(id: ServerId) -> Vec<u8> {
    [&[16], id.0.as_bytes().as_slice()].concat()
}

/// The two member addresses, A then B, each prefixed by its length.
const MEMBERS: &[u8] = b"\x02\x0e127.0.0.1:4001\x0e127.0.0.1:4002";

/// `REGISTERED`: secs 1_700_000_000 as a zigzag varint, nanos 5.
const REGISTERED_BYTES: &[u8] = &[128, 196, 159, 213, 12, 5];

/// postcard `VolumeEntry`: name, rw_id, ro_id, backup_id, sites (server, kind).
fn volume_entry_bytes() -> Vec<u8> {
    let parts: [&[u8]; 6] = [
        b"\x09root.cell",
        &[128, 128, 128, 128, 2], // VOLUME_ID_FIRST as a varint
        &[0, 0],                  // no RO, no backup
        &[1],                     // one site:
        &uuid_bytes(SERVER),
        &[0], // ReadWrite
    ];
    parts.concat()
}

/// postcard `ServerEntry`: server, addresses, registered.
fn server_entry_bytes() -> Vec<u8> {
    let parts: [&[u8]; 3] = [
        &uuid_bytes(SERVER),
        b"\x01\x0e127.0.0.1:7000",
        REGISTERED_BYTES,
    ];
    parts.concat()
}

/// A pair's server entry lists its members, the active first.
fn pair_server_entry_bytes() -> Vec<u8> {
    let parts: [&[u8]; 3] = [&uuid_bytes(PAIR_SERVER), MEMBERS, REGISTERED_BYTES];
    parts.concat()
}

/// postcard pair record: server, members, epoch, active, successor, lease_ms.
fn pair_record_bytes() -> Vec<u8> {
    let parts: [&[u8]; 6] = [
        &uuid_bytes(PAIR_SERVER),
        MEMBERS,
        &[1],                      // epoch 1
        b"\x01\x0e127.0.0.1:4001", // active: Some(A)
        &[0],                      // no successor
        &[208, 15],                // lease_ms 2000 as a varint
    ];
    parts.concat()
}

/// The protection database's tables (format 3) and the log's commands for it.
#[test]
fn the_protection_database_keeps_its_names_and_bytes() {
    use vlserver::Command;

    const PTS_ENTRIES: TableDefinition<i32, &[u8]> = TableDefinition::new("pts_entries");
    const PTS_NAMES: TableDefinition<&str, i32> = TableDefinition::new("pts_names");
    const PTS_MEMBERS: TableDefinition<(i32, i32), ()> = TableDefinition::new("pts_members");
    const PTS_GROUPS: TableDefinition<(i32, i32), ()> = TableDefinition::new("pts_groups");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vldb.redb");
    let create_user = Command::PtsCreateUser {
        name: "alice".into(),
        id: None,
        password: Some("h".into()),
    };
    let commands = [
        create_user.clone(),
        Command::PtsCreateGroup {
            name: "alice:friends".into(),
            id: None,
        },
        Command::PtsAddUser {
            user: "alice".into(),
            group: "alice:friends".into(),
        },
    ];
    {
        let store = Store::open(&path, StoreLimits::default()).unwrap();
        for command in &commands {
            store.apply_alone(command).unwrap();
        }
    }
    // The log carries commands in postcard: variant 7 (after the pair commands), the
    // name, no id, the password's hash.
    assert_eq!(
        postcard::to_stdvec(&create_user).unwrap(),
        b"\x07\x05alice\x00\x01\x01h"
    );
    assert_eq!(
        postcard::to_stdvec(&commands[2]).unwrap(),
        b"\x0a\x05alice\x0dalice:friends"
    );

    let db = Database::open(&path).unwrap();
    let txn = db.begin_read().unwrap();
    let meta = txn.open_table(META).unwrap();
    assert_eq!(meta.get("pts_next_user_id").unwrap().unwrap().value(), 2);
    assert_eq!(meta.get("pts_next_group_id").unwrap().unwrap().value(), 206);
    let entries = txn.open_table(PTS_ENTRIES).unwrap();
    // postcard `PtsRecord`: name, owner (zigzag varint), password.
    assert_eq!(
        entries.get(1).unwrap().unwrap().value(),
        b"\x05alice\x97\x03\x01\x01h", // owner system:administrators (-204)
    );
    assert_eq!(
        entries.get(-205).unwrap().unwrap().value(),
        b"\x0dalice:friends\x02\x00", // owner alice (1), no password
    );
    let names = txn.open_table(PTS_NAMES).unwrap();
    assert_eq!(names.get("alice").unwrap().unwrap().value(), 1);
    assert_eq!(names.get("alice:friends").unwrap().unwrap().value(), -205);
    let members = txn.open_table(PTS_MEMBERS).unwrap();
    assert!(members.get((-205, 1)).unwrap().is_some());
    let groups = txn.open_table(PTS_GROUPS).unwrap();
    assert!(groups.get((1, -205)).unwrap().is_some());
}
