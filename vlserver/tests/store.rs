//! `Store` on a temporary directory: entries, indexes, id allocation, limits, reopening.

use proto::{
    ErrorCode, ServerId, Timestamp, VolumeEntry, VolumeId, VolumeName, VolumeRef, VolumeType,
};
use vlserver::{IDS_PER_VOLUME, Store, StoreLimits, VOLUME_ID_FIRST, VldbError};

fn name(text: &str) -> VolumeName {
    VolumeName::parse(text).unwrap()
}

fn refused(result: Result<impl std::fmt::Debug, VldbError>) -> ErrorCode {
    match result {
        Err(VldbError::Refused(code)) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn open(dir: &tempfile::TempDir) -> Store {
    Store::open(&dir.path().join("vldb.redb"), StoreLimits::default()).unwrap()
}

fn with_server(store: &Store) -> ServerId {
    let server = ServerId::random();
    store
        .register_server(server, vec!["127.0.0.1:7000".into()], Timestamp::now())
        .unwrap();
    server
}

fn id(n: u64) -> VolumeId {
    VolumeId(VOLUME_ID_FIRST.0 + n * IDS_PER_VOLUME)
}

#[test]
fn create_get_list_remove() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let server = with_server(&store);

    let zeta = store.create_entry(&name("zeta"), server).unwrap();
    assert_eq!(zeta.rw_id, VOLUME_ID_FIRST);
    assert_eq!((zeta.ro_id, zeta.backup_id), (None, None));
    assert_eq!(zeta.sites.len(), 1);
    assert_eq!(zeta.sites[0].server, server);
    assert_eq!(zeta.sites[0].kind, VolumeType::ReadWrite);
    let alpha = store.create_entry(&name("alpha"), server).unwrap();
    assert_eq!(alpha.rw_id, id(1));

    let names: Vec<String> = store
        .entries()
        .unwrap()
        .into_iter()
        .map(|e| e.name.to_string())
        .collect();
    assert_eq!(names, ["alpha", "zeta"]);

    assert_eq!(store.entry(&VolumeRef::Name(name("zeta"))).unwrap(), zeta);
    assert_eq!(store.entry(&VolumeRef::Id(id(1))).unwrap(), alpha);
    // The RO id is reserved but no RO volume exists yet.
    let ro_id = VolumeId(alpha.rw_id.0 + 1);
    assert_eq!(
        refused(store.entry(&VolumeRef::Id(ro_id))),
        ErrorCode::NoSuchVolume
    );

    assert_eq!(
        store.remove_entry(&VolumeRef::Id(zeta.rw_id)).unwrap(),
        zeta
    );
    assert_eq!(
        refused(store.entry(&VolumeRef::Name(name("zeta")))),
        ErrorCode::NoSuchVolume
    );
    assert_eq!(
        refused(store.remove_entry(&VolumeRef::Name(name("zeta")))),
        ErrorCode::NoSuchVolume
    );
    // A new volume of the same name gets fresh ids.
    let again = store.create_entry(&name("zeta"), server).unwrap();
    assert_eq!(again.rw_id, id(2));
}

#[test]
fn create_refuses_taken_names_and_unknown_servers() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let server = with_server(&store);
    store.create_entry(&name("root.cell"), server).unwrap();
    assert_eq!(
        refused(store.create_entry(&name("root.cell"), server)),
        ErrorCode::VolumeExists
    );
    assert_eq!(
        refused(store.create_entry(&name("other"), ServerId::random())),
        ErrorCode::NoSuchServer
    );
    // Refused creations allocate nothing.
    let next = store.create_entry(&name("next"), server).unwrap();
    assert_eq!(next.rw_id, id(1));
}

#[test]
fn reopen_keeps_entries_servers_and_the_id_counter() {
    let dir = tempfile::tempdir().unwrap();
    let (server, kept) = {
        let store = open(&dir);
        let server = with_server(&store);
        let kept = store.create_entry(&name("kept"), server).unwrap();
        let gone = store.create_entry(&name("gone"), server).unwrap();
        store.remove_entry(&VolumeRef::Id(gone.rw_id)).unwrap();
        (server, kept)
    };
    let store = open(&dir);
    assert_eq!(store.entries().unwrap(), vec![kept]);
    let servers = store.servers().unwrap();
    assert_eq!(servers.len(), 1);
    assert_eq!(servers[0].server, server);
    // The removed volume's ids are not handed out again, even after a restart.
    let fresh: VolumeEntry = store.create_entry(&name("fresh"), server).unwrap();
    assert_eq!(fresh.rw_id, id(2));
}

#[test]
fn reopen_refuses_an_unknown_format_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vldb.redb");
    drop(open(&dir));
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let meta: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
            let mut meta = txn.open_table(meta).unwrap();
            meta.insert("format_version", 99).unwrap();
        }
        txn.commit().unwrap();
    }
    match Store::open(&path, StoreLimits::default()) {
        Err(VldbError::FormatVersion { found: 99, .. }) => {}
        other => panic!("expected a format version error, got {other:?}"),
    }
}

#[test]
fn register_updates_addresses_and_moves_taken_ones() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let old = ServerId::random();
    let new = ServerId::random();
    let now = Timestamp::now();
    store
        .register_server(old, vec!["a:1".into(), "b:1".into()], now)
        .unwrap();
    let updated = store
        .register_server(old, vec!["a:1".into(), "a:1".into(), "c:1".into()], now)
        .unwrap();
    assert_eq!(updated.addresses, ["a:1", "c:1"]);
    store.register_server(new, vec!["a:1".into()], now).unwrap();
    let mut servers = store.servers().unwrap();
    servers.sort_by_key(|s| s.server != old);
    assert_eq!(servers.len(), 2);
    assert_eq!(servers[0].addresses, ["c:1"]);
    assert_eq!(servers[1].addresses, ["a:1"]);
}

#[test]
fn register_enforces_limits() {
    let dir = tempfile::tempdir().unwrap();
    let limits = StoreLimits {
        servers_max: 2,
        ..StoreLimits::default()
    };
    let store = Store::open(&dir.path().join("vldb.redb"), limits).unwrap();
    let now = Timestamp::now();
    let register = |server, addresses: Vec<String>| store.register_server(server, addresses, now);

    assert_eq!(
        refused(register(ServerId::random(), vec![])),
        ErrorCode::InvalidArgument
    );
    let too_many = (0..17).map(|i| format!("h:{i}")).collect();
    assert_eq!(
        refused(register(ServerId::random(), too_many)),
        ErrorCode::InvalidArgument
    );
    let too_long = vec!["h".repeat(257)];
    assert_eq!(
        refused(register(ServerId::random(), too_long)),
        ErrorCode::InvalidArgument
    );
    let sixteen = (0..16)
        .map(|i| format!("{}:{i}", "h".repeat(250)))
        .collect();
    let first = ServerId::random();
    register(first, sixteen).unwrap();

    register(ServerId::random(), vec!["x:1".into()]).unwrap();
    assert_eq!(
        refused(register(ServerId::random(), vec!["y:1".into()])),
        ErrorCode::InvalidArgument
    );
    // A known server may still re-register when the table is full.
    register(first, vec!["z:1".into()]).unwrap();
}

#[test]
fn create_enforces_the_volume_limit() {
    let dir = tempfile::tempdir().unwrap();
    let limits = StoreLimits {
        volumes_max: 1,
        ..StoreLimits::default()
    };
    let store = Store::open(&dir.path().join("vldb.redb"), limits).unwrap();
    let server = with_server(&store);
    store.create_entry(&name("one"), server).unwrap();
    assert_eq!(
        refused(store.create_entry(&name("two"), server)),
        ErrorCode::InvalidArgument
    );
}

#[test]
fn a_file_damaged_at_rest_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vldb.redb");
    {
        let store = open(&dir);
        let server = with_server(&store);
        for i in 0..200 {
            store.create_entry(&name(&format!("v{i}")), server).unwrap();
        }
    }
    // Scribble over every page but the header.
    let mut bytes = std::fs::read(&path).unwrap();
    for at in (4096..bytes.len()).step_by(4096) {
        let end = (at + 64).min(bytes.len());
        bytes[at..end].fill(0xa5);
    }
    std::fs::write(&path, bytes).unwrap();
    match Store::open(&path, StoreLimits::default()) {
        Err(e @ (VldbError::CorruptFile { .. } | VldbError::Open { .. })) => {
            assert!(e.to_string().contains("vldb.redb"), "{e}");
        }
        other => panic!("expected the file to be refused, got {other:?}"),
    }
}
