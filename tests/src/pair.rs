//! Fileserver pairs in end-to-end tests: asking a member what it is, the members' history
//! files, and a loopback proxy that can cut a member off from the VLDB.
//! Invariant: the proxy's threads end when it drops; it never listens beyond 127.0.0.1.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use proto::rpc::{self, Limits};
use proto::{
    ClientId, ErrorCode, Hello, InstanceNonce, MemberRole, MemberState, PROTOCOL_VERSION_MAX,
    PROTOCOL_VERSION_MIN, PeerKind, ProtoError, Request, Response, Transport,
};

/// The pair every pair test runs.
pub const PAIR: &str = "e2e-pair";
/// The cell name of every test cell.
pub const CELL: &str = "e2e.test";

/// Sends one request to the fileserver at `address` over `transport` (the cell's
/// `TestCell::transport`), as a cache manager of its own (`client`) or as an admin, and
/// returns the answer.
pub fn call(
    transport: &Transport,
    address: &str,
    client: Option<ClientId>,
    request: Request,
) -> Result<Response, ProtoError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ProtoError::Io)?;
    runtime.block_on(async {
        let peer = match client {
            Some(client) => PeerKind::CacheManager {
                client,
                instance: InstanceNonce(1),
            },
            None => PeerKind::Admin,
        };
        let hello = Hello {
            version_min: PROTOCOL_VERSION_MIN,
            version_max: PROTOCOL_VERSION_MAX,
            cell: CELL.to_owned(),
            peer,
        };
        let limits = Limits {
            handshake_timeout: Duration::from_secs(2),
            ..Limits::default()
        };
        let (connection, _reply, _incoming) =
            rpc::connect(address, hello, &limits, transport).await?;
        // A cache manager's file requests are the administrator's; an admin's (VLDB,
        // pair and volume requests) carry no token.
        let token = client.map(|_| crate::identity::admin_token(CELL));
        let answer = connection
            .try_call_as(token.as_ref(), &request, Duration::from_secs(5))
            .await
            .unwrap_or(Err(ProtoError::Closed));
        connection.close();
        answer
    })
}

/// What the member at `address` says it is.
pub fn member_state(transport: &Transport, address: &str) -> Result<MemberState> {
    match call(transport, address, None, Request::MemberState) {
        Ok(Response::MemberState(state)) => Ok(state),
        Ok(other) => bail!("MemberState answered {}", other.kind_name()),
        Err(e) => Err(e).with_context(|| format!("ask {address} for its state")),
    }
}

/// True when the member at `address` answers that it is active.
pub fn is_active(transport: &Transport, address: &str) -> bool {
    member_state(transport, address).is_ok_and(|s| s.role == MemberRole::Active)
}

/// True when `error` is the answer of a member that does not serve.
pub fn is_not_active(error: &ProtoError) -> bool {
    matches!(error.remote(), Some(ErrorCode::NotActive { .. }))
}

/// One line of a member's `--history` file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryEvent {
    pub micros: u64,
    pub epoch: u64,
    pub member: String,
    /// `active`, `fenced`, or the kind of an acknowledged change.
    pub what: String,
}

/// Reads a `--history` file: `<unix micros> <epoch> <member> <what>` per line.
pub fn read_history(path: &std::path::Path) -> Result<Vec<HistoryEvent>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [micros, epoch, member, what, ..] = fields[..] else {
                bail!("history line with fewer than 4 fields: {line:?}");
            };
            Ok(HistoryEvent {
                micros: micros
                    .parse()
                    .with_context(|| format!("time in {line:?}"))?,
                epoch: epoch
                    .parse()
                    .with_context(|| format!("epoch in {line:?}"))?,
                member: member.to_owned(),
                what: what.to_owned(),
            })
        })
        .collect()
}

/// A TCP proxy on 127.0.0.1 that forwards to `target` until `cut`, after which it
/// closes every connection, open or new.
pub struct Proxy {
    pub address: String,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    streams: OpenStreams,
    acceptor: Option<JoinHandle<()>>,
}

impl Proxy {
    pub fn start(target: &str) -> Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?.to_string();
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let streams = OpenStreams::default();
        let acceptor = {
            let (cut, stop, streams, target) = (
                cut.clone(),
                stop.clone(),
                streams.clone(),
                target.to_owned(),
            );
            std::thread::spawn(move || accept_loop(listener, &target, &cut, &stop, &streams))
        };
        Ok(Proxy {
            address,
            cut,
            stop,
            streams,
            acceptor: Some(acceptor),
        })
    }

    /// Drops the path: open connections are shut down, new ones closed at once.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.streams.shutdown_all();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.streams.shutdown_all();
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    target: &str,
    cut: &AtomicBool,
    stop: &AtomicBool,
    streams: &OpenStreams,
) {
    while !stop.load(Ordering::SeqCst) {
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(_) => continue,
        };
        if cut.load(Ordering::SeqCst) {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let Ok(server) = TcpStream::connect(target) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let _ = client.set_nonblocking(false);
        for (from, to) in [(&client, &server), (&server, &client)] {
            let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
                continue;
            };
            std::thread::spawn(move || pipe(&from, &to));
        }
        streams.add(client);
        streams.add(server);
    }
}

/// Copies `from` to `to` until either fails or ends, then shuts both down.
fn pipe(mut from: &TcpStream, mut to: &TcpStream) {
    let mut buffer = [0u8; 16 * 1024];
    while let Ok(n) = from.read(&mut buffer) {
        if n == 0 || to.write_all(&buffer[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// The proxy's open streams, so `cut` can shut them down.
#[derive(Clone, Default)]
struct OpenStreams(Arc<std::sync::Mutex<Vec<TcpStream>>>);

impl OpenStreams {
    fn add(&self, stream: TcpStream) {
        if let Ok(mut streams) = self.0.lock() {
            streams.push(stream);
        }
    }

    fn shutdown_all(&self) {
        if let Ok(mut streams) = self.0.lock() {
            for stream in streams.drain(..) {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
    }
}
