//! Bulk bytes over real loopback connections: raw after the message from version 4 on,
//! as the older messages they stand for to a peer of version 3, and refused before
//! sending when the frame would pass the limit.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use proto::Identity;
use proto::message::*;
use proto::rpc::{self, Connection, Limits};
use proto::server::{ServerLimits, Service, serve};
use proto::tls::authority::test_transport;
use proto::*;
use tokio::net::TcpListener;
use tokio::sync::watch;

const CELL: &str = "test.cell";

/// Answers a store with its own bytes as a fetch reply, noting which shape it got.
#[derive(Default)]
struct Mirror {
    received: Mutex<Vec<&'static str>>,
}

impl Service for Mirror {
    fn hello(&self, hello: &Hello) -> Result<HelloReply, ErrorCode> {
        Ok(HelloReply {
            version: rpc::negotiate(hello, CELL)?,
            server: None,
        })
    }

    async fn handle(
        self: Arc<Self>,
        _connection: Connection,
        _hello: Arc<Hello>,
        _caller: Arc<Identity>,
        request: Request,
    ) -> Result<Response, ErrorCode> {
        let Request::Sequenced { request, .. } = request else {
            return Err(ErrorCode::InvalidArgument);
        };
        let data = match *request {
            Request::StoreDataBulk { data, .. } => {
                self.received.lock().push("StoreDataBulk");
                data.into_bytes()
            }
            Request::StoreDataIf { data, .. } => {
                self.received.lock().push("StoreDataIf");
                Bytes::from(data)
            }
            _ => return Err(ErrorCode::Unsupported),
        };
        Ok(Response::DataBulk {
            status: status(data.len() as u64),
            callback: None,
            data: Bulk::new(data),
        })
    }
}

fn status(size: u64) -> VnodeStatus {
    let stamp = Timestamp { secs: 0, nanos: 0 };
    VnodeStatus {
        fid: Fid::root(VolumeId(1)),
        kind: FileKind::File,
        mode: 0o644,
        link_count: 1,
        size,
        data_version: DataVersion(2),
        uid: 0,
        gid: 0,
        atime: stamp,
        mtime: stamp,
        ctime: stamp,
    }
}

fn store(data: Bytes) -> Request {
    Request::Sequenced {
        seq: 1,
        request: Box::new(Request::StoreDataBulk {
            fid: Fid::root(VolumeId(1)),
            offset: 0,
            base: DataVersion(1),
            write_back: WriteBackId(1),
            data: Bulk::new(data),
        }),
    }
}

fn pattern(bytes: usize) -> Bytes {
    (0..bytes)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

async fn start() -> (String, watch::Sender<bool>, Arc<Mirror>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mirror = Arc::new(Mirror::default());
    tokio::spawn(serve(
        listener,
        mirror.clone(),
        ServerLimits {
            shutdown_deadline: Duration::from_millis(200),
            ..ServerLimits::default()
        },
        test_transport(PeerClass::Server).unwrap(),
        stop_rx,
    ));
    (address, stop_tx, mirror)
}

async fn connect(address: &str, version_max: u16) -> Connection {
    let hello = Hello {
        version_min: PROTOCOL_VERSION_MIN,
        version_max,
        cell: CELL.into(),
        peer: PeerKind::Admin,
    };
    let host = test_transport(PeerClass::Host).unwrap();
    let (connection, reply, _incoming) = rpc::connect(address, hello, &Limits::default(), &host)
        .await
        .unwrap();
    assert_eq!(reply.version, version_max);
    connection
}

#[tokio::test]
async fn bulk_bytes_travel_raw_both_ways_from_version_four() {
    let (address, _stop, mirror) = start().await;
    let connection = connect(&address, PROTOCOL_VERSION_DATA_PATH).await;
    // A store as large as a cache manager's, and an empty one.
    for bytes in [(2 << 20) + 17, 0] {
        let data = pattern(bytes);
        let reply = connection
            .call(store(data.clone()), Duration::from_secs(10))
            .await
            .unwrap();
        let Response::DataBulk { data: echoed, .. } = &reply else {
            panic!("expected a bulk reply, got {}", reply.kind_name());
        };
        assert!(echoed.bytes() == &data, "{bytes} bytes came back whole");
        assert!(reply.into_fetched().unwrap().data == data);
    }
    assert_eq!(*mirror.received.lock(), ["StoreDataBulk"; 2]);
}

#[tokio::test]
async fn a_version_three_peer_gets_the_messages_bulk_bytes_stand_for() {
    let (address, _stop, mirror) = start().await;
    let connection = connect(&address, PROTOCOL_VERSION_IDENTITY).await;
    let data = pattern(100_000);
    let reply = connection
        .call(store(data.clone()), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        reply.kind_name(),
        "Data",
        "the server answered as version 3"
    );
    assert!(reply.into_fetched().unwrap().data == data);
    assert_eq!(*mirror.received.lock(), ["StoreDataIf"]);
}

#[tokio::test]
async fn a_bulk_store_past_the_frame_limit_is_refused_before_it_is_sent() {
    let (address, _stop, mirror) = start().await;
    let connection = connect(&address, PROTOCOL_VERSION_DATA_PATH).await;
    let limit = Limits::default().frame_bytes_max;
    let err = connection
        .call(store(pattern(limit)), Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ProtoError::FrameTooLarge { length, limit: l } if length > limit && l == limit),
        "{err}"
    );
    // The connection is still good, and the server never saw the store.
    let small = connection
        .call(store(pattern(10)), Duration::from_secs(10))
        .await
        .unwrap();
    assert!(small.into_fetched().unwrap().data == pattern(10));
    assert_eq!(*mirror.received.lock(), ["StoreDataBulk"]);
}
