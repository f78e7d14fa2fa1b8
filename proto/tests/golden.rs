//! Golden bytes: pins the postcard encoding of every message shape, so a reordered enum
//! variant or a changed field type fails here before it breaks a peer in the field.

use proto::message::*;
use proto::*;
use uuid::Uuid;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn fid() -> Fid {
    Fid {
        volume: VolumeId(536870912),
        vnode: VnodeId(5),
        unique: Uniquifier(1),
    }
}

fn status() -> VnodeStatus {
    VnodeStatus {
        fid: fid(),
        kind: FileKind::File,
        mode: 0o644,
        link_count: 1,
        size: 12,
        data_version: DataVersion(3),
        uid: 0,
        gid: 0,
        atime: Timestamp { secs: 1, nanos: 2 },
        mtime: Timestamp { secs: 3, nanos: 4 },
        ctime: Timestamp { secs: 5, nanos: 6 },
    }
}

/// Each case: a frame and the exact bytes of its body.
fn cases() -> Vec<(&'static str, Frame, &'static str)> {
    let client = ClientId(Uuid::from_u128(0x0011_2233_4455_6677_8899_aabb_ccdd_eeff));
    vec![
        (
            "hello",
            Frame::Hello(Hello {
                version_min: 1,
                version_max: 1,
                cell: "example.test".into(),
                peer: PeerKind::CacheManager {
                    client,
                    instance: InstanceNonce(42),
                },
            }),
            "0001010c6578616d706c652e7465737400100011223344556677\
             8899aabbccddeeff2a",
        ),
        (
            "hello_reply_wrong_cell",
            Frame::HelloReply(Err(ErrorCode::WrongCell {
                expected: "a".into(),
            })),
            "0101120161",
        ),
        (
            "ping",
            Frame::Request {
                id: RequestId(1),
                body: Request::Ping,
            },
            "020100",
        ),
        (
            "fetch_data",
            Frame::Request {
                id: RequestId(300),
                body: Request::FetchData {
                    fid: fid(),
                    offset: 4096,
                    length: 65536,
                },
            },
            "02ac0202808080800205018020808004",
        ),
        (
            "store_data",
            Frame::Request {
                id: RequestId(2),
                body: Request::StoreData {
                    fid: fid(),
                    offset: 0,
                    data: b"hi".to_vec(),
                    truncate_to: Some(2),
                },
            },
            "020203808080800205010002686901 02",
        ),
        (
            "break_callbacks",
            Frame::Request {
                id: RequestId(9),
                body: Request::BreakCallbacks { fids: vec![fid()] },
            },
            "02091101808080800205 01",
        ),
        (
            "status_response",
            Frame::Response {
                id: RequestId(1),
                body: Ok(Response::Status {
                    status: status(),
                    callback: Some(CallbackGrant {
                        lifetime_ms: 3_600_000,
                    }),
                }),
            },
            "030100028080808002050100a403010c03000002 02060 40a06 0180dddb01",
        ),
        (
            "not_active",
            Frame::Response {
                id: RequestId(4),
                body: Err(ErrorCode::NotActive {
                    epoch: Epoch(7),
                    hint: Some("x".into()),
                }),
            },
            "03040116070101 78",
        ),
        (
            "grace",
            Frame::Response {
                id: RequestId(5),
                body: Err(ErrorCode::Grace { retry_ms: 250 }),
            },
            "03050117fa01",
        ),
        (
            "set_lock",
            Frame::Request {
                id: RequestId(6),
                body: Request::SetLock {
                    fid: fid(),
                    owner: LockOwnerId(9),
                    range: ByteRange::whole(),
                    kind: LockKind::Exclusive,
                    wait: true,
                    pid: 4242,
                },
            },
            "02061e808080800205010900ffffffffffffffffff0101019221",
        ),
        (
            "release_lock",
            Frame::Request {
                id: RequestId(6),
                body: Request::ReleaseLock {
                    fid: fid(),
                    owner: LockOwnerId(9),
                    range: ByteRange::new(10, 20).unwrap(),
                },
            },
            "02061f80808080020501090a14",
        ),
        (
            "test_lock",
            Frame::Request {
                id: RequestId(6),
                body: Request::TestLock {
                    fid: fid(),
                    owner: LockOwnerId(9),
                    range: ByteRange::new(10, 20).unwrap(),
                    kind: LockKind::Shared,
                },
            },
            "02062080808080020501090a1400",
        ),
        (
            "cancel_lock_wait",
            Frame::Request {
                id: RequestId(6),
                body: Request::CancelLockWait { wait: WaitId(300) },
            },
            "020621ac02",
        ),
        (
            "lock_granted",
            Frame::Request {
                id: RequestId(6),
                body: Request::LockGranted {
                    wait: WaitId(300),
                    fid: fid(),
                },
            },
            "020623ac0280808080020501",
        ),
        (
            "reclaim_lock",
            Frame::Request {
                id: RequestId(6),
                body: Request::ReclaimLock {
                    fid: fid(),
                    owner: LockOwnerId(9),
                    range: ByteRange::new(10, 20).unwrap(),
                    kind: LockKind::Exclusive,
                    pid: 4242,
                },
            },
            "02062580808080020501090a14019221",
        ),
        (
            "lock_queued_response",
            Frame::Response {
                id: RequestId(7),
                body: Ok(Response::LockQueued { wait: WaitId(300) }),
            },
            "0307000fac02",
        ),
        (
            "lock_test_response",
            Frame::Response {
                id: RequestId(7),
                body: Ok(Response::LockTest {
                    holder: Some(LockHolder {
                        client: ClientId(Uuid::from_u128(1)),
                        owner: LockOwnerId(2),
                        range: ByteRange::new(3, 4).unwrap(),
                        kind: LockKind::Shared,
                        pid: 5,
                    }),
                }),
            },
            "030700100110000000000000000000000000000000010203040005",
        ),
        (
            "sequenced_remove",
            Frame::Request {
                id: RequestId(8),
                body: Request::Sequenced {
                    seq: 300,
                    request: Box::new(Request::Remove {
                        dir: fid(),
                        name: "a".into(),
                    }),
                },
            },
            "02082fac0209808080800205010161",
        ),
        (
            "acquire_pair",
            Frame::Request {
                id: RequestId(9),
                body: Request::VlAcquirePair {
                    pair: PairName::parse("p").unwrap(),
                    member: "m".into(),
                    epoch: Epoch(3),
                    lease_ms: 2000,
                },
            },
            "0209290170016d03d00f",
        ),
        (
            "lease_held",
            Frame::Response {
                id: RequestId(10),
                body: Err(ErrorCode::LeaseHeld {
                    epoch: Epoch(4),
                    active: Some("m".into()),
                    lease_left_ms: 1500,
                }),
            },
            "030a01240401016ddc0b",
        ),
        (
            "store_data_if",
            Frame::Request {
                id: RequestId(11),
                body: Request::StoreDataIf {
                    fid: fid(),
                    offset: 4096,
                    data: b"hi".to_vec(),
                    base: DataVersion(7),
                    write_back: WriteBackId(3),
                },
            },
            "020b34 8080808002050180 20 026869 07 03",
        ),
        (
            "store_outdated",
            Frame::Response {
                id: RequestId(12),
                body: Err(ErrorCode::StoreOutdated {
                    current: DataVersion(9),
                }),
            },
            "030c01 28 09",
        ),
        ("goodbye", Frame::Goodbye, "04"),
        (
            "auth_request",
            Frame::AuthRequest {
                id: RequestId(13),
                token: proto::SealedToken(vec![0xaa, 0xbb]),
                body: Request::Ping,
            },
            "050d 02aabb 00",
        ),
        (
            "bad_token",
            Frame::Response {
                id: RequestId(14),
                body: Err(ErrorCode::BadToken { reason: "x".into() }),
            },
            "030e01 29 0178",
        ),
        (
            "not_permitted",
            Frame::Response {
                id: RequestId(15),
                body: Err(ErrorCode::NotPermitted),
            },
            "030f01 2a",
        ),
        (
            "administrator_required",
            Frame::Response {
                id: RequestId(16),
                body: Err(ErrorCode::AdministratorRequired),
            },
            "031001 2b",
        ),
        (
            "fetch_acl",
            Frame::Request {
                id: RequestId(17),
                body: Request::FetchAcl { dir: fid() },
            },
            "0211 35 808080800205 01",
        ),
        (
            "store_acl",
            Frame::Request {
                id: RequestId(18),
                body: Request::StoreAcl {
                    dir: fid(),
                    acl: proto::AccessList {
                        positive: vec![proto::AclEntry {
                            principal: proto::PrincipalId::ANYUSER,
                            rights: proto::Rights(3),
                        }],
                        negative: vec![proto::AclEntry {
                            principal: proto::PrincipalId(1001),
                            rights: proto::Rights(8),
                        }],
                    },
                },
            },
            "0212 36 808080800205 01 01c90103 01d20f08",
        ),
        (
            "fetch_rights",
            Frame::Request {
                id: RequestId(19),
                body: Request::FetchRights { fid: fid() },
            },
            "0213 37 808080800205 01",
        ),
        (
            "acl",
            Frame::Response {
                id: RequestId(20),
                body: Ok(Response::Acl(proto::AccessList::default())),
            },
            "031400 18 0000",
        ),
        (
            "rights",
            Frame::Response {
                id: RequestId(21),
                body: Ok(Response::Rights {
                    rights: proto::Rights(127),
                    dir: status(),
                    callback: None,
                }),
            },
            "031500 19 7f 8080808002050100a403010c030000020206040a0600",
        ),
        (
            "make_node",
            Frame::Request {
                id: RequestId(13),
                body: Request::MakeNode {
                    dir: fid(),
                    name: "tty".into(),
                    kind: FileKind::CharDevice { rdev: 0x0504 },
                    mode: 0o620,
                    uid: 0,
                    gid: 5,
                },
            },
            // Variant 65; the kind's variant 6 and its rdev; mode, uid, gid.
            "020d41 8080808002050103747479 06 840a 9003 00 05",
        ),
        (
            "status_of_each_special_kind",
            Frame::Response {
                id: RequestId(14),
                body: Ok(Response::DirPage {
                    dir: status(),
                    callback: None,
                    entries: [
                        FileKind::Fifo,
                        FileKind::Socket,
                        FileKind::CharDevice { rdev: 1 },
                        FileKind::BlockDevice { rdev: 0x0801 },
                    ]
                    .into_iter()
                    .map(|kind| DirEntry {
                        name: "n".into(),
                        fid: fid(),
                        kind,
                    })
                    .collect(),
                    more: false,
                }),
            },
            // Kinds 4 (FIFO), 5 (socket), 6 (char device, rdev 1), 7 (block, rdev 0x801).
            "030e00078080808002050100a403010c030000020206040a0600\
             04016e80808080020501 04\
             016e80808080020501 05\
             016e80808080020501 06 01\
             016e80808080020501 07 8110\
             00",
        ),
        (
            "block_device_status",
            Frame::Response {
                id: RequestId(15),
                body: Ok(Response::Status {
                    status: VnodeStatus {
                        kind: FileKind::BlockDevice { rdev: 0x0801 },
                        mode: 0o660,
                        size: 0,
                        ..status()
                    },
                    callback: None,
                }),
            },
            "030f0002 80808080020501 07 8110 b003 01 00 03 00 00 020206040a0600",
        ),
        (
            "pts_create_user",
            Frame::Request {
                id: RequestId(22),
                body: Request::PtsCreateUser {
                    name: "alice".into(),
                    id: Some(proto::PrincipalId(1001)),
                    password: Some(proto::Password("pw".into())),
                },
            },
            "0216 38 05616c696365 01d20f 01027077",
        ),
        (
            "pts_set_password",
            Frame::Request {
                id: RequestId(23),
                body: Request::PtsSetPassword {
                    user: "alice".into(),
                    password: proto::Password("pw".into()),
                },
            },
            "0217 39 05616c696365 027077",
        ),
        (
            "pts_create_group",
            Frame::Request {
                id: RequestId(24),
                body: Request::PtsCreateGroup {
                    name: "alice:friends".into(),
                    id: None,
                },
            },
            "0218 3a 0d616c6963653a667269656e6473 00",
        ),
        (
            "pts_add_user",
            Frame::Request {
                id: RequestId(25),
                body: Request::PtsAddUser {
                    user: "alice".into(),
                    group: "g".into(),
                },
            },
            "0219 3b 05616c696365 0167",
        ),
        (
            "pts_remove_user",
            Frame::Request {
                id: RequestId(26),
                body: Request::PtsRemoveUser {
                    user: "alice".into(),
                    group: "g".into(),
                },
            },
            "021a 3c 05616c696365 0167",
        ),
        (
            "pts_delete",
            Frame::Request {
                id: RequestId(27),
                body: Request::PtsDelete { name: "g".into() },
            },
            "021b 3d 0167",
        ),
        (
            "pts_membership",
            Frame::Request {
                id: RequestId(28),
                body: Request::PtsMembership { name: "g".into() },
            },
            "021c 3e 0167",
        ),
        (
            "pts_list_entries",
            Frame::Request {
                id: RequestId(29),
                body: Request::PtsListEntries,
            },
            "021d 3f",
        ),
        (
            "login",
            Frame::Request {
                id: RequestId(30),
                body: Request::Login {
                    user: "alice".into(),
                    password: proto::Password("pw".into()),
                    lifetime_secs: Some(3600),
                },
            },
            "021e 40 05616c696365 027077 01901c",
        ),
        (
            "pts_entry",
            Frame::Response {
                id: RequestId(31),
                body: Ok(Response::PtsEntry(proto::PtsEntry {
                    name: "alice".into(),
                    id: proto::PrincipalId(1001),
                    owner: proto::PrincipalId::ADMINISTRATORS,
                })),
            },
            "031f00 1a 05616c696365 d20f 9703",
        ),
        (
            "pts_entries",
            Frame::Response {
                id: RequestId(32),
                body: Ok(Response::PtsEntries(vec![proto::PtsEntry {
                    name: "g".into(),
                    id: proto::PrincipalId(-205),
                    owner: proto::PrincipalId::ADMINISTRATORS,
                }])),
            },
            "032000 1b 01 0167 9903 9703",
        ),
        (
            "token",
            Frame::Response {
                id: RequestId(33),
                body: Ok(Response::Token(proto::SealedToken(vec![0xaa, 0xbb]))),
            },
            "032100 1c 02aabb",
        ),
        (
            "pts_refused",
            Frame::Response {
                id: RequestId(34),
                body: Err(ErrorCode::PtsRefused { reason: "x".into() }),
            },
            "032201 2c 0178",
        ),
        (
            "no_such_principal",
            Frame::Response {
                id: RequestId(35),
                body: Err(ErrorCode::NoSuchPrincipal { name: "x".into() }),
            },
            "032301 2d 0178",
        ),
        (
            "create_with_data",
            Frame::Request {
                id: RequestId(43),
                body: Request::CreateWithData {
                    dir: fid(),
                    name: "f".into(),
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                    data: b"abc".to_vec(),
                },
            },
            // Variant 68; the directory; name, mode, uid, gid; the bytes, length first.
            "022b44 8080808002050101 66 a403 00 00 03616263",
        ),
        (
            "principal_exists",
            Frame::Response {
                id: RequestId(36),
                body: Err(ErrorCode::PrincipalExists { name: "x".into() }),
            },
            "032401 2e 0178",
        ),
        (
            "server_figures",
            Frame::Request {
                id: RequestId(37),
                body: Request::ServerFigures,
            },
            "0225 42",
        ),
        (
            "figures",
            Frame::Response {
                id: RequestId(38),
                body: Ok(Response::Figures(proto::histogram::Figures {
                    counters: vec![("c".into(), 2)],
                    histograms: vec![proto::histogram::NamedHistogram {
                        name: "h".into(),
                        unit: proto::histogram::FigureUnit::Count,
                        histogram: proto::histogram::HistogramSnapshot {
                            buckets: vec![(9, 3)],
                            sum: 27,
                            max: 9,
                        },
                    }],
                })),
            },
            "032600 1d 01 0163 02 01 0168 01 01 0903 1b 09",
        ),
        // Version 4: bulk bytes raw after the message, which announces their length.
        (
            "store_data_bulk",
            Frame::Request {
                id: RequestId(39),
                body: Request::StoreDataBulk {
                    fid: fid(),
                    offset: 4096,
                    base: DataVersion(7),
                    write_back: WriteBackId(3),
                    data: Bulk::new(bytes::Bytes::from_static(b"hi")),
                },
            },
            "0227 43 8080808002050180 20 07 03 02 6869",
        ),
        (
            "sequenced_store_data_bulk",
            Frame::AuthRequest {
                id: RequestId(40),
                token: proto::SealedToken(vec![0xaa]),
                body: Request::Sequenced {
                    seq: 5,
                    request: Box::new(Request::StoreDataBulk {
                        fid: fid(),
                        offset: 0,
                        base: DataVersion(1),
                        write_back: WriteBackId(2),
                        data: Bulk::new(bytes::Bytes::from_static(b"xyz")),
                    }),
                },
            },
            "0528 01aa 2f 05 43 8080808002050100 01 02 03 78797a",
        ),
        (
            "data_bulk",
            Frame::Response {
                id: RequestId(41),
                body: Ok(Response::DataBulk {
                    status: status(),
                    callback: Some(CallbackGrant { lifetime_ms: 1000 }),
                    data: Bulk::new(bytes::Bytes::from_static(b"hello")),
                }),
            },
            "032900 1e 8080808002050100a403010c030000020206040a06 01e807 05 68656c6c6f",
        ),
        (
            "data_bulk_empty",
            Frame::Response {
                id: RequestId(42),
                body: Ok(Response::DataBulk {
                    status: status(),
                    callback: None,
                    data: Bulk::default(),
                }),
            },
            "032a00 1e 8080808002050100a403010c030000020206040a06 00 00",
        ),
        (
            "store_new_file",
            Frame::Request {
                id: RequestId(44),
                body: Request::StoreNewFile {
                    fid: fid(),
                    base: DataVersion(1),
                    attrs: SetAttrs {
                        mode: Some(0o644),
                        ..SetAttrs::default()
                    },
                    data: b"ab".to_vec(),
                },
            },
            // Variant 69; the file; its base; the attributes (a mode, nothing else);
            // the bytes, length first.
            "022c45 80808080020501 01 01a403 00 00 00 00 00 02 6162",
        ),
    ]
}

#[test]
fn a_borrowed_request_encodes_as_the_owned_frame() {
    for (name, frame, _) in cases() {
        let borrowed = match &frame {
            Frame::Request { id, body } => proto::frame::encode_request(*id, None, body),
            Frame::AuthRequest { id, token, body } => {
                proto::frame::encode_request(*id, Some(token), body)
            }
            _ => continue,
        };
        assert_eq!(
            borrowed.unwrap().to_vec(),
            proto::frame::encode_frame(&frame).unwrap(),
            "{name}"
        );
    }
}

#[test]
fn golden_bytes() {
    let mut failures = Vec::new();
    for (name, frame, expected) in cases() {
        let expected: String = expected
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect::<String>()
            .to_lowercase();
        let actual = hex(&proto::frame::encode_frame(&frame).unwrap());
        if actual != expected {
            failures.push(format!(
                "{name}: expected {expected}\n{name}:   actual {actual}"
            ));
        }
        // And every golden body decodes back to the same frame.
        let decoded =
            proto::frame::decode_frame(&proto::frame::encode_frame(&frame).unwrap()).unwrap();
        assert_eq!(decoded, frame, "{name}");
    }
    assert!(
        failures.is_empty(),
        "encoding changed:\n{}",
        failures.join("\n")
    );
}

#[test]
fn an_older_peer_sees_special_files_as_files_and_no_unlinked_status() {
    let fifo = VnodeStatus {
        kind: FileKind::Fifo,
        ..status()
    };
    let gone = VnodeStatus {
        link_count: 0,
        ..status()
    };
    let removed = Response::Removed {
        dir: status(),
        target: Some(gone.clone()),
    };
    assert_eq!(
        removed.clone().for_version(PROTOCOL_VERSION_IDENTITY),
        removed
    );
    assert_eq!(
        removed.for_version(2),
        Response::Removed {
            dir: status(),
            target: None
        }
    );
    let entry = Response::Entry {
        status: fifo.clone(),
        callback: None,
        dir: status(),
    };
    let Response::Entry { status: old, .. } = entry.clone().for_version(2) else {
        panic!("not an entry");
    };
    assert_eq!(old.kind, FileKind::File);
    assert_eq!(entry.clone().for_version(3), entry);
    assert_eq!(
        Request::MakeNode {
            dir: fid(),
            name: "p".into(),
            kind: FileKind::Fifo,
            mode: 0o644,
            uid: 0,
            gid: 0,
        }
        .version_min(),
        PROTOCOL_VERSION_IDENTITY
    );
}

#[test]
fn a_file_created_with_its_bytes_is_sequenced_and_needs_the_data_path_version() {
    let request = Request::CreateWithData {
        dir: fid(),
        name: "f".into(),
        mode: 0o644,
        uid: 0,
        gid: 0,
        data: Vec::new(),
    };
    assert_eq!(request.version_min(), PROTOCOL_VERSION_DATA_PATH);
    assert!(request.needs_sequence());
    assert!(request.changes_volume());
}

#[test]
fn a_new_file_filled_at_its_close_is_sequenced_and_needs_the_data_path_version() {
    let request = Request::StoreNewFile {
        fid: fid(),
        base: DataVersion(1),
        attrs: SetAttrs::default(),
        data: Vec::new(),
    };
    assert_eq!(request.version_min(), PROTOCOL_VERSION_DATA_PATH);
    assert!(request.needs_sequence());
    assert!(request.changes_volume());
}
