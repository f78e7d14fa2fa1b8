//! What a peer can make a server hold, over real loopback sockets: hello, idle and
//! in-frame timeouts, the goodbye that lets clients reconnect without failing a call,
//! connection caps with eviction, and the shared frame-memory budget.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use proto::Identity;
use proto::flood::{Flood, Opened, Stall};
use proto::message::*;
use proto::rpc::{self, CloseReason, Connection, Limits};
use proto::server::{ServerLimits, Service, serve};
use proto::tls::Secured;
use proto::tls::authority::test_transport;
use proto::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

const CELL: &str = "limits.test";
/// Hang guard for conditions awaited below: far above every timeout the tests set.
const PATIENCE: Duration = Duration::from_secs(20);

/// This test's clients: a host certificate of the tests' CA.
fn host() -> Transport {
    test_transport(PeerClass::Host).unwrap()
}

fn hello() -> Hello {
    Hello {
        version_min: PROTOCOL_VERSION_MIN,
        version_max: PROTOCOL_VERSION_MAX,
        cell: CELL.into(),
        peer: PeerKind::Admin,
    }
}

/// Answers Ping at once, ListVolumes never, and anything else (a create) after `slow`;
/// counts connections open.
#[derive(Default)]
struct Counting {
    open: AtomicUsize,
    created: AtomicUsize,
    /// ListVolumes requests being handled (they never end).
    waiting: AtomicUsize,
}

const SLOW: Duration = Duration::from_millis(600);

impl Service for Counting {
    fn hello(&self, hello: &Hello) -> Result<HelloReply, ErrorCode> {
        Ok(HelloReply {
            version: rpc::negotiate(hello, CELL)?,
            server: None,
        })
    }

    fn connected(&self, _connection: &Connection, _hello: &Hello) {
        self.open.fetch_add(1, Ordering::SeqCst);
    }

    fn disconnected(&self, _connection: &Connection, _hello: &Hello) {
        self.open.fetch_sub(1, Ordering::SeqCst);
    }

    async fn handle(
        self: Arc<Self>,
        _connection: Connection,
        _hello: Arc<Hello>,
        _caller: Arc<Identity>,
        request: Request,
    ) -> Result<Response, ErrorCode> {
        match request {
            Request::Ping => Ok(Response::Pong),
            Request::ListVolumes => {
                self.waiting.fetch_add(1, Ordering::SeqCst);
                std::future::pending().await
            }
            Request::VlCreateEntry { .. } => {
                tokio::time::sleep(SLOW).await;
                self.created.fetch_add(1, Ordering::SeqCst);
                Ok(Response::Ok)
            }
            _ => Err(ErrorCode::Unsupported),
        }
    }
}

struct Server {
    address: String,
    service: Arc<Counting>,
    _stop: watch::Sender<bool>,
}

async fn start(limits: ServerLimits) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let (stop, stop_rx) = watch::channel(false);
    let service = Arc::new(Counting::default());
    let transport = test_transport(PeerClass::Server).unwrap();
    tokio::spawn(serve(listener, service.clone(), limits, transport, stop_rx));
    Server {
        address,
        service,
        _stop: stop,
    }
}

fn quick(limits: ServerLimits) -> ServerLimits {
    ServerLimits {
        shutdown_deadline: Duration::from_millis(100),
        ..limits
    }
}

async fn eventually(mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    condition()
}

async fn ping(address: &str) -> Result<Response, ProtoError> {
    let (connection, _, _incoming) =
        rpc::connect(address, hello(), &Limits::default(), &host()).await?;
    connection.call(Request::Ping, Duration::from_secs(5)).await
}

/// Reads until the server closes the stream; what it sent meanwhile.
async fn until_closed(stream: &mut (impl AsyncReadExt + Unpin)) -> Vec<u8> {
    let mut all = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut all)).await;
    all
}

/// A TLS connection that said hello and read the answer: what follows is the test's.
async fn hello_sent(address: &str) -> Secured {
    let tcp = TcpStream::connect(address).await.unwrap();
    let mut stream = host().connect(tcp).await.unwrap();
    let body = proto::frame::encode_frame(&Frame::Hello(hello())).unwrap();
    send(&mut stream, &frame_bytes(&body)).await;
    let mut header = [0u8; 8];
    stream.read.read_exact(&mut header).await.unwrap();
    let mut reply = vec![0u8; u32::from_le_bytes(header[..4].try_into().unwrap()) as usize];
    stream.read.read_exact(&mut reply).await.unwrap();
    stream
}

async fn send(stream: &mut Secured, bytes: &[u8]) {
    stream.write.write_all(bytes).await.unwrap();
    stream.write.flush().await.unwrap();
}

fn frame_bytes(body: &[u8]) -> Vec<u8> {
    let mut bytes = (body.len() as u32).to_le_bytes().to_vec();
    bytes.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
    bytes.extend_from_slice(body);
    bytes
}

#[tokio::test]
async fn a_peer_that_never_says_hello_is_closed_at_the_hello_timeout() {
    let hello_timeout = Duration::from_millis(300);
    let server = start(quick(ServerLimits {
        connection: Limits {
            handshake_timeout: hello_timeout,
            ..Limits::default()
        },
        ..ServerLimits::default()
    }))
    .await;
    // Not even the TLS handshake: the hello timeout covers it.
    let started = Instant::now();
    let mut silent = TcpStream::connect(&server.address).await.unwrap();
    assert!(until_closed(&mut silent).await.is_empty());
    assert!(started.elapsed() >= hello_timeout);
}

#[tokio::test]
async fn a_peer_stalled_inside_a_frame_is_closed_at_the_frame_timeout() {
    let frame_timeout = Duration::from_millis(400);
    let server = start(quick(ServerLimits {
        connection: Limits {
            frame_read_timeout: frame_timeout,
            ..Limits::default()
        },
        ..ServerLimits::default()
    }))
    .await;
    let mut stream = hello_sent(&server.address).await;
    // Half a header, then half a body: both count as inside the frame.
    send(&mut stream, &[0x00, 0x10]).await;
    let started = Instant::now();
    until_closed(&mut stream.read).await;
    assert!(started.elapsed() >= frame_timeout);
    let mut stream = hello_sent(&server.address).await;
    send(&mut stream, &(1000u32).to_le_bytes()).await;
    send(&mut stream, &[0u8; 4 + 500]).await;
    let started = Instant::now();
    until_closed(&mut stream.read).await;
    assert!(started.elapsed() >= frame_timeout);
    // The server itself is fine.
    assert_eq!(ping(&server.address).await.unwrap(), Response::Pong);
}

#[tokio::test]
async fn an_idle_connection_is_told_goodbye_and_the_next_call_goes_on_a_new_one() {
    let idle = Duration::from_millis(300);
    let server = start(quick(ServerLimits {
        idle_timeout: idle,
        ..ServerLimits::default()
    }))
    .await;
    let (connection, _, _incoming) =
        rpc::connect(&server.address, hello(), &Limits::default(), &host())
            .await
            .unwrap();
    assert_eq!(
        connection
            .call(Request::Ping, Duration::from_secs(5))
            .await
            .unwrap(),
        Response::Pong
    );
    connection.closed().await;
    assert_eq!(connection.close_reason(), Some(CloseReason::Peer));
    assert!(eventually(|| server.service.open.load(Ordering::SeqCst) == 0).await);
    // Refused before it was sent: safe to send anywhere, whatever the request.
    let create = Request::VlCreateEntry {
        name: VolumeName::parse("home.a").unwrap(),
        server: ServerId::random(),
    };
    assert_eq!(
        connection
            .try_call_ref(&create, Duration::from_secs(5))
            .await
            .unwrap_err(),
        rpc::NotSent
    );
}

#[tokio::test]
async fn a_connection_with_a_request_in_flight_is_not_idle() {
    let server = start(quick(ServerLimits {
        idle_timeout: SLOW / 3,
        ..ServerLimits::default()
    }))
    .await;
    let (connection, _, _incoming) =
        rpc::connect(&server.address, hello(), &Limits::default(), &host())
            .await
            .unwrap();
    let create = Request::VlCreateEntry {
        name: VolumeName::parse("home.a").unwrap(),
        server: ServerId::random(),
    };
    // The handler takes three idle timeouts; the connection stays up for its answer.
    assert_eq!(
        connection
            .call(create, Duration::from_secs(5))
            .await
            .unwrap(),
        Response::Ok
    );
}

#[tokio::test]
async fn the_vldb_client_reopens_a_connection_the_server_closed_while_idle() {
    let server = start(quick(ServerLimits {
        idle_timeout: Duration::from_millis(200),
        ..ServerLimits::default()
    }))
    .await;
    let cell = CellConfig {
        name: CELL.into(),
        vlservers: vec![server.address.clone()],
        credentials: None,
    };
    let client = VldbClient::new(cell, host(), PeerKind::Admin, Duration::from_secs(5));
    let create = || Request::VlCreateEntry {
        name: VolumeName::parse("home.a").unwrap(),
        server: ServerId::random(),
    };
    for _ in 0..3 {
        assert_eq!(client.call(create()).await.unwrap(), Response::Ok);
        // Idle past the server's timeout: it says goodbye and closes.
        assert!(eventually(|| server.service.open.load(Ordering::SeqCst) == 0).await);
    }
    // Not safe to resend, yet none failed: each went on a new connection.
    assert_eq!(server.service.created.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn over_the_peer_cap_a_newcomer_evicts_an_idle_connection() {
    let server = start(quick(ServerLimits {
        connections_per_peer_max: 8,
        ..ServerLimits::default()
    }))
    .await;
    let mut flood = Flood::new(host());
    let opened = flood.open(&server.address, CELL, 20, Stall::Idle, 4).await;
    // Each newcomer took an older one's place: all were welcomed, 8 remain.
    assert_eq!(
        opened,
        Opened {
            established: 20,
            turned_away: 0
        }
    );
    assert!(
        eventually(|| flood.open_now() == 8).await,
        "{}",
        flood.open_now()
    );
    assert_eq!(ping(&server.address).await.unwrap(), Response::Pong);
    assert!(eventually(|| flood.open_now() == 7).await);
    flood.close().await;
}

#[tokio::test]
async fn when_every_connection_is_busy_a_newcomer_is_refused_busy() {
    let server = start(quick(ServerLimits {
        connections_per_peer_max: 2,
        ..ServerLimits::default()
    }))
    .await;
    let mut busy = Vec::new();
    for _ in 0..2 {
        let (connection, _, incoming) =
            rpc::connect(&server.address, hello(), &Limits::default(), &host())
                .await
                .unwrap();
        let call = tokio::spawn({
            let connection = connection.clone();
            async move {
                connection
                    .call(Request::ListVolumes, Duration::from_secs(30))
                    .await
            }
        });
        busy.push((connection, incoming, call));
    }
    assert!(eventually(|| server.service.waiting.load(Ordering::SeqCst) == 2).await);
    let refused = ping(&server.address).await.unwrap_err();
    assert_eq!(refused.remote(), Some(&ErrorCode::Busy), "{refused}");
    assert!(
        busy.iter()
            .all(|(connection, _, _)| !connection.is_closed())
    );
}

#[tokio::test]
async fn stalled_frames_wait_for_memory_and_small_requests_pass_them() {
    // Room for two 200 KiB frames; six stall inside theirs.
    let server = start(quick(ServerLimits {
        connection: Limits {
            frame_bytes_max: 256 << 10,
            frame_read_timeout: Duration::from_secs(60),
            ..Limits::default()
        },
        frame_memory_bytes: 400 << 10,
        frame_stall_limit: Duration::from_millis(300),
        ..ServerLimits::default()
    }))
    .await;
    let mut flood = Flood::new(host());
    let stall = Stall::InsideFrame {
        declared: 200 << 10,
        sent: 100 << 10,
    };
    let opened = flood.open(&server.address, CELL, 6, stall, 6).await;
    assert_eq!(opened.established, 6);
    // While they hold and wait for the budget, a small request is answered at once.
    let started = Instant::now();
    assert_eq!(ping(&server.address).await.unwrap(), Response::Pong);
    assert!(started.elapsed() < Duration::from_secs(5));
    // Under that pressure, holders that send nothing are evicted long before their
    // frame timeout, each making room for one that waits: four go, and the last two
    // stay, with nobody waiting behind them.
    assert!(
        eventually(|| flood.open_now() == 2).await,
        "{}",
        flood.open_now()
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(flood.open_now(), 2);
    flood.close().await;
}

#[tokio::test]
async fn a_frame_larger_than_the_limit_closes_its_connection() {
    let server = start(quick(ServerLimits::default())).await;
    let mut stream = hello_sent(&server.address).await;
    send(&mut stream, &u32::MAX.to_le_bytes()).await;
    send(&mut stream, &[0u8; 4]).await;
    until_closed(&mut stream.read).await;
    assert_eq!(ping(&server.address).await.unwrap(), Response::Pong);
}
