//! Mutual TLS at the handshake, over real loopback sockets: a peer without a certificate
//! of the cell's CA is refused there (no certificate, another CA's, plaintext), once in
//! the log per address per minute, while the server keeps serving others; a client
//! refuses a server that shows a host's certificate or another CA's; the accepting side
//! knows its peer's class, and a host certificate cannot say hello as a server.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use proto::rpc::{self, Connection, Limits};
use proto::server::{ServerLimits, Service, serve};
use proto::tls::authority::CellAuthority;
use proto::tls::{Credentials, credentials};
use proto::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const CELL: &str = "tls.test";
/// Hang guard: every refusal below is far quicker.
const PATIENCE: Duration = Duration::from_secs(10);
/// What the server logs about a peer refused at the handshake.
const REFUSED: &str = "refused a connection at the TLS handshake";

/// Answers Ping, and records the class of each peer it served.
#[derive(Default)]
struct Classes {
    seen: Mutex<Vec<Option<PeerClass>>>,
}

impl Service for Classes {
    fn hello(&self, hello: &Hello) -> Result<HelloReply, ErrorCode> {
        Ok(HelloReply {
            version: rpc::negotiate(hello, CELL)?,
            server: None,
        })
    }

    async fn handle(
        self: Arc<Self>,
        connection: Connection,
        _hello: Arc<Hello>,
        _caller: Arc<proto::Identity>,
        request: Request,
    ) -> Result<Response, ErrorCode> {
        self.seen.lock().push(connection.peer_class());
        match request {
            Request::Ping => Ok(Response::Pong),
            _ => Err(ErrorCode::Unsupported),
        }
    }
}

/// The lines a test's server logged, captured from a subscriber of its own.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// Routes this thread's log lines here (the tests run on one thread) until the guard
    /// drops.
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        let sink = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    /// The lines with `phrase` once there is at least one (the server may log its
    /// refusal a moment after the client saw the connection close), or none after 30 s
    /// (a bound for a starved test thread on a loaded machine, never waited out when
    /// the line comes).
    async fn await_lines_with(&self, phrase: &str) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let lines = self.lines_with(phrase);
            if !lines.is_empty() || tokio::time::Instant::now() > deadline {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn lines_with(&self, phrase: &str) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock())
            .lines()
            .filter(|line| line.contains(" WARN ") && line.contains(phrase))
            .map(str::to_owned)
            .collect()
    }
}

struct Server {
    address: String,
    service: Arc<Classes>,
    _stop: watch::Sender<bool>,
}

async fn start(transport: Transport) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let (stop, stop_rx) = watch::channel(false);
    let service = Arc::new(Classes::default());
    let limits = ServerLimits {
        shutdown_deadline: Duration::from_millis(100),
        ..ServerLimits::default()
    };
    tokio::spawn(serve(listener, service.clone(), limits, transport, stop_rx));
    Server {
        address,
        service,
        _stop: stop,
    }
}

fn hello(peer: PeerKind) -> Hello {
    Hello {
        version_min: PROTOCOL_VERSION_MIN,
        version_max: PROTOCOL_VERSION_MAX,
        cell: CELL.into(),
        peer,
    }
}

async fn ping_as(
    address: &str,
    transport: &Transport,
    peer: PeerKind,
) -> Result<Response, ProtoError> {
    let limits = Limits::default();
    let connecting = rpc::connect(address, hello(peer), &limits, transport);
    let (connection, _, _incoming) = tokio::time::timeout(PATIENCE, connecting)
        .await
        .expect("the handshake hung")?;
    connection.call(Request::Ping, PATIENCE).await
}

async fn ping(address: &str, transport: &Transport) -> Result<Response, ProtoError> {
    ping_as(address, transport, PeerKind::Admin).await
}

fn authority() -> CellAuthority {
    CellAuthority::generate(CELL).unwrap()
}

/// A TLS client that trusts the cell's CA but presents no certificate of its own.
#[allow(deprecated)] // ring, as the cell itself uses it
fn without_certificate(authority: &CellAuthority) -> tokio_rustls::TlsConnector {
    let ca = credentials::certificate(
        authority.cert_pem().as_bytes(),
        std::path::Path::new("ca.pem"),
    )
    .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

#[tokio::test]
async fn peers_without_a_certificate_of_the_cell_are_refused_at_the_handshake_and_logged_once() {
    let log = Captured::default();
    let _logging = log.install();
    let cell = authority();
    let server = start(cell.transport(PeerClass::Server, "fs").unwrap()).await;
    let host = cell.transport(PeerClass::Host, "client").unwrap();

    // No certificate at all: the TLS handshake ends in the server's alert, and nothing
    // of the protocol is answered.
    let tcp = TcpStream::connect(&server.address).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(tls::SERVER_NAME).unwrap();
    let refused = tokio::time::timeout(PATIENCE, async {
        let mut stream = without_certificate(&cell).connect(name, tcp).await?;
        let body = proto::frame::encode_frame(&Frame::Hello(hello(PeerKind::Admin))).unwrap();
        let mut bytes = (body.len() as u32).to_le_bytes().to_vec();
        bytes.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        bytes.extend_from_slice(&body);
        stream.write_all(&bytes).await?;
        stream.flush().await?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await.map(|_| reply)
    })
    .await
    .expect("a client without a certificate hung");
    assert!(
        refused.as_ref().is_err() || refused.as_ref().is_ok_and(|r| r.is_empty()),
        "a client without a certificate was answered: {refused:?}"
    );
    let lines = log.await_lines_with(REFUSED).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("presented no certificate"), "{lines:?}");
    assert!(lines[0].contains("peer=127.0.0.1:"), "{lines:?}");

    // A host certificate of another cell's CA: refused, and the client is told so.
    let stranger = authority().transport(PeerClass::Host, "stranger").unwrap();
    let error = ping(&server.address, &stranger).await.unwrap_err();
    assert!(matches!(error, ProtoError::Tls(_)), "{error:?}");
    // A client speaking plaintext: refused too.
    let error = ping(&server.address, &Transport::Plaintext)
        .await
        .unwrap_err();
    assert!(!matches!(error, ProtoError::Remote(_)), "{error:?}");
    // Within the minute, from the same address: no second line.
    assert_eq!(
        log.lines_with(REFUSED).len(),
        1,
        "{:?}",
        log.lines_with(REFUSED)
    );

    // Meanwhile the server serves the cell's own hosts.
    assert_eq!(ping(&server.address, &host).await.unwrap(), Response::Pong);
}

#[tokio::test]
async fn a_client_refuses_a_server_with_a_host_certificate_or_another_cas() {
    let cell = authority();
    let host = cell.transport(PeerClass::Host, "client").unwrap();

    let impostor = start(cell.transport(PeerClass::Host, "impostor").unwrap()).await;
    let error = ping(&impostor.address, &host).await.unwrap_err();
    let text = error.to_string();
    assert!(matches!(error, ProtoError::Tls(_)), "{error:?}");
    assert!(text.contains("not a server's"), "{text}");
    assert!(text.contains(&impostor.address), "{text}");
    assert!(impostor.service.seen.lock().is_empty());

    let stranger = start(authority().transport(PeerClass::Server, "fs").unwrap()).await;
    let error = ping(&stranger.address, &host).await.unwrap_err();
    assert!(
        error.to_string().contains("this cell's CA did not issue"),
        "{error}"
    );
    assert!(stranger.service.seen.lock().is_empty());
}

#[tokio::test]
async fn the_accepting_side_knows_its_peers_class_and_servers_need_a_server_certificate() {
    let cell = authority();
    let server = start(cell.transport(PeerClass::Server, "vldb").unwrap()).await;
    let host = cell.transport(PeerClass::Host, "client").unwrap();
    let other_server = cell.transport(PeerClass::Server, "fs").unwrap();

    assert_eq!(ping(&server.address, &host).await.unwrap(), Response::Pong);
    let as_server = PeerKind::FileServer {
        server: ServerId::random(),
    };
    assert_eq!(
        ping_as(&server.address, &other_server, as_server.clone())
            .await
            .unwrap(),
        Response::Pong
    );
    assert_eq!(
        *server.service.seen.lock(),
        [Some(PeerClass::Host), Some(PeerClass::Server)]
    );
    // A host certificate saying hello as a fileserver is turned away in the hello.
    let error = ping_as(&server.address, &host, as_server)
        .await
        .unwrap_err();
    assert_eq!(
        error.remote(),
        Some(&ErrorCode::PermissionDenied),
        "{error:?}"
    );
    let error = ping_as(&server.address, &host, PeerKind::VldbReplica { id: 2 })
        .await
        .unwrap_err();
    assert_eq!(
        error.remote(),
        Some(&ErrorCode::PermissionDenied),
        "{error:?}"
    );
    assert_eq!(server.service.seen.lock().len(), 2);

    // The connecting side does not classify its peer.
    let (connection, _, _incoming) = rpc::connect(
        &server.address,
        hello(PeerKind::Admin),
        &Limits::default(),
        &host,
    )
    .await
    .unwrap();
    assert_eq!(connection.peer_class(), None);
}

#[test]
fn credentials_load_from_a_directory_and_a_host_falls_back_to_the_server_files() {
    let dir = tempfile::tempdir().unwrap();
    let credentials_dir = dir.path().join("credentials");
    tls::authority::init(&credentials_dir, CELL, "host-1").unwrap();
    use std::os::unix::fs::PermissionsExt;
    for private in [
        credentials::CA_KEY_FILE,
        credentials::SERVER_KEY_FILE,
        credentials::HOST_KEY_FILE,
        credentials::TOKEN_KEY_FILE,
    ] {
        let mode = std::fs::metadata(credentials_dir.join(private))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{private}");
    }
    let token = std::fs::read(credentials_dir.join(tls::TOKEN_KEY_FILE)).unwrap();
    assert_eq!(token.len(), credentials::TOKEN_KEY_BYTES);
    // A CA is never made twice.
    let Err(again) = tls::authority::init(&credentials_dir, CELL, "host-1") else {
        panic!("a second CA was made over the first");
    };
    assert!(again.to_string().contains("exists already"), "{again}");

    // A new host's directory, issued where ca.key is.
    let loaded = CellAuthority::load(&credentials_dir, CELL).unwrap();
    let new_host = dir.path().join("new-host");
    loaded
        .issue_into(&new_host, PeerClass::Host, "host-2")
        .unwrap();
    assert!(Credentials::load(&new_host, PeerClass::Host).is_ok());
    assert!(!new_host.join(credentials::CA_KEY_FILE).exists());
    // The CA of another cell name cannot issue from this key.
    assert!(CellAuthority::load(&credentials_dir, "other.cell").is_err());

    // A server host without host.pem uses server.pem for its admin tools.
    std::fs::remove_file(credentials_dir.join(credentials::HOST_CERT_FILE)).unwrap();
    let server_as_host = Credentials::load(&credentials_dir, PeerClass::Host).unwrap();
    assert_eq!(tls::classify(&server_as_host.cert), Some(PeerClass::Server));

    // Missing credentials: one line naming the file and the command that makes them.
    let error = Credentials::load(&dir.path().join("nowhere"), PeerClass::Host).unwrap_err();
    let text = error.to_string();
    assert!(text.contains("nowhere/ca.pem"), "{text}");
    assert!(text.contains("holdfast cell init"), "{text}");
    assert!(!text.contains('\n'), "{text}");
}
