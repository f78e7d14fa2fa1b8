//! A duplex RPC connection over mutual TLS (`tls::Transport`): either side may send
//! requests, many may be in flight, and responses are matched to their calls by request
//! id; a `Goodbye` closes it gently.
//! Invariant: every pending call ends, with its response, a timeout, or `Closed` when the
//! connection dies; a call refused as `NotSent` never reached the socket; the outgoing and
//! the incoming queue are bounded.

use std::collections::HashMap;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::activity::{Activity, Eviction, InFlight, Stage};
use crate::budget::{Charge, Intake};
use crate::error::{ErrorCode, ProtoError};
use crate::frame::{
    EncodedFrame, FRAME_BYTES_MAX_DEFAULT, FRAME_HEADER_BYTES, decode_frame, decode_frame_shared,
    encode_frame, encode_frame_parts, encode_request,
};
use crate::frame_reader::{FrameReader, ReadFailure};
use crate::identity::SealedToken;
use crate::ids::RequestId;
use crate::message::{
    Frame, Hello, HelloReply, PROTOCOL_VERSION_GOODBYE_AND_CONDITIONAL_STORES,
    PROTOCOL_VERSION_IDENTITY, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN, Request, Response,
};
use crate::tls::{PeerClass, Transport};

/// The byte stream frames are written to.
type ByteWriter = Box<dyn AsyncWrite + Send + Unpin>;

/// The largest first frame a server reads from a peer that has not said hello yet.
pub const HELLO_BYTES_MAX: usize = 16 << 10;
/// Frames at most this large are gathered into one write.
const WRITE_GATHER_BYTES: usize = 64 << 10;

/// Limits one connection imposes on its peer.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest frame body accepted or sent.
    pub frame_bytes_max: usize,
    /// Requests from the peer queued before the reader stops reading (backpressure).
    pub incoming_queue_max: usize,
    /// Frames queued for sending before senders wait.
    pub outgoing_queue_max: usize,
    /// How long the handshake may take, TLS and hello (a server's hello timeout).
    pub handshake_timeout: Duration,
    /// How long a frame may take to arrive from its first byte, and a frame's write may
    /// wait for the peer to read; a peer that stalls longer is closed.
    pub frame_read_timeout: Duration,
}

/// Default `Limits::frame_read_timeout`.
pub const FRAME_READ_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);

impl Default for Limits {
    fn default() -> Self {
        Limits {
            frame_bytes_max: FRAME_BYTES_MAX_DEFAULT,
            incoming_queue_max: 256,
            outgoing_queue_max: 256,
            handshake_timeout: Duration::from_secs(5),
            frame_read_timeout: FRAME_READ_TIMEOUT_DEFAULT,
        }
    }
}

/// Why a connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// This side closed it (`close`, after its goodbye, or at shutdown).
    Local,
    /// The peer closed it between frames, or after a goodbye.
    Peer,
    /// The peer broke the protocol: what it did.
    Malformed(String),
    /// The peer stalled inside a frame, or did not read what it was sent: how.
    Stalled(String),
    /// The server closed it from outside to make room.
    Evicted(Eviction),
    /// The socket failed.
    Io(String),
}

impl From<ReadFailure> for CloseReason {
    fn from(failure: ReadFailure) -> CloseReason {
        match failure {
            ReadFailure::Io(e) => CloseReason::Io(e.to_string()),
            ReadFailure::EndedInsideFrame => CloseReason::Peer,
            ReadFailure::Evicted => CloseReason::Local,
            ReadFailure::TooLarge { .. } | ReadFailure::Checksum { .. } => {
                CloseReason::Malformed(failure.to_string())
            }
            ReadFailure::NoMemory(crate::budget::BudgetError::TooLarge { .. }) => {
                CloseReason::Malformed(failure.to_string())
            }
            ReadFailure::Stalled(_) | ReadFailure::NoMemory(_) => {
                CloseReason::Stalled(failure.to_string())
            }
        }
    }
}

/// A call refused before anything was sent: the connection was closing or closed. The
/// request may go again on another connection, whatever it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotSent;

type Waiter = oneshot::Sender<Result<Response, ErrorCode>>;

/// The calls waiting for their answer, and whether new ones are still taken.
#[derive(Default)]
struct Calls {
    waiters: HashMap<u64, Waiter>,
    /// A goodbye went one way or the other: no new call starts here.
    closing: bool,
}

struct Inner {
    outgoing: mpsc::Sender<EncodedFrame>,
    calls: Mutex<Calls>,
    next_id: AtomicU64,
    cancel: CancellationToken,
    peer_addr: SocketAddr,
    frame_bytes_max: usize,
    activity: Arc<Activity>,
    close_reason: Mutex<Option<CloseReason>>,
    /// The protocol version both sides agreed on in the handshake.
    version: u16,
    /// What the peer's certificate says it is (the accepting side, with TLS).
    peer_class: Option<PeerClass>,
}

impl Inner {
    /// Ends the connection for `reason` (the first reason given is kept); pending calls
    /// fail with `Closed`. Holds the calls' lock, so no call can start after it.
    fn end(&self, reason: CloseReason) {
        self.close_reason.lock().get_or_insert(reason);
        let mut calls = self.calls.lock();
        calls.closing = true;
        self.cancel.cancel();
        // Dropping the senders wakes every waiting call with `Closed`.
        calls.waiters.clear();
    }
}

/// One side of an established connection. Cloning shares the connection. Duplex because
/// the fileserver pushes callback breaks to a cache manager over the connection the cache
/// manager opened.
#[derive(Clone)]
pub struct Connection {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.inner.peer_addr)
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// A request that arrived from the peer; answer it with `reply`.
pub struct IncomingRequest {
    pub id: RequestId,
    pub body: Request,
    /// The token the request was made with (`Frame::AuthRequest`), not yet verified.
    pub token: Option<SealedToken>,
    replier: Replier,
}

/// Sends the response to one incoming request. Until it is dropped it holds the
/// request's frame memory and counts the request as in flight.
pub struct Replier {
    id: RequestId,
    outgoing: mpsc::Sender<EncodedFrame>,
    frame_bytes_max: usize,
    /// The connection's version: what the answer may hold (`Response::as_sent_to`).
    version: u16,
    _charge: Charge,
    _in_flight: InFlight,
}

impl IncomingRequest {
    /// Splits the request into its body, its token and the means to answer it.
    pub fn into_parts(self) -> (Request, Option<SealedToken>, Replier) {
        (self.body, self.token, self.replier)
    }
}

impl Replier {
    /// Sends the response, as the connection's version has it (bulk bytes raw after
    /// the message from version 4 on); a connection that died meanwhile swallows it.
    pub async fn reply(self, body: Result<Response, ErrorCode>) {
        let body = body.map(|response| response.as_sent_to(self.version));
        let frame = Frame::Response { id: self.id, body };
        let encoded = match encode_frame_parts(&frame) {
            Ok(encoded) if encoded.len() <= self.frame_bytes_max => encoded,
            Ok(_) | Err(_) => {
                let refusal = Frame::Response {
                    id: self.id,
                    body: Err(ErrorCode::TooLarge),
                };
                match encode_frame_parts(&refusal) {
                    Ok(encoded) => encoded,
                    Err(_) => return,
                }
            }
        };
        let _ = self.outgoing.send(encoded).await;
    }
}

/// Connects to `addr` over `transport` (the peer must show a server certificate of the
/// cell's CA), sends `hello` and waits for the reply.
pub async fn connect(
    addr: &str,
    hello: Hello,
    limits: &Limits,
    transport: &Transport,
) -> Result<(Connection, HelloReply, mpsc::Receiver<IncomingRequest>), ProtoError> {
    connect_to(addr, hello, limits, transport)
        .await
        .map_err(|e| match e {
            ProtoError::Tls(what) => ProtoError::Tls(format!("at {addr} {what}")),
            e => e,
        })
}

async fn connect_to(
    addr: &str,
    hello: Hello,
    limits: &Limits,
    transport: &Transport,
) -> Result<(Connection, HelloReply, mpsc::Receiver<IncomingRequest>), ProtoError> {
    let secured = tokio::time::timeout(limits.handshake_timeout, async {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let peer_addr = stream.peer_addr()?;
        Ok::<_, ProtoError>((transport.connect(stream).await?, peer_addr))
    })
    .await
    .map_err(|_| ProtoError::Timeout(limits.handshake_timeout))?;
    let (secured, peer_addr) = secured?;
    let mut writer = secured.write;
    let mut reader = FrameReader::new(
        secured.read,
        limits.frame_bytes_max,
        limits.handshake_timeout,
        Intake::unbounded(),
    );
    let hello = framed(&encode_frame(&Frame::Hello(hello))?);
    let sent = async {
        writer.write_all(&hello).await?;
        writer.flush().await
    };
    sent.await.map_err(crate::tls::from_io_error)?;
    let reply = tokio::time::timeout(limits.handshake_timeout, reader.next())
        .await
        .map_err(|_| ProtoError::Timeout(limits.handshake_timeout))?;
    let received = match reply {
        Ok(Some(received)) => received,
        Ok(None) => return Err(ProtoError::Closed),
        // A server that refused this side's certificate says so in an alert here.
        Err(ReadFailure::Io(e)) => return Err(crate::tls::from_io_error(e)),
        Err(failure) => return Err(failure.into()),
    };
    let reply = match decode_frame(&received.body)? {
        Frame::HelloReply(Ok(reply)) => reply,
        Frame::HelloReply(Err(code)) => return Err(ProtoError::Remote(code)),
        other => {
            return Err(ProtoError::Handshake(format!(
                "expected a hello reply, got {other:?}"
            )));
        }
    };
    reader.set_frame_read_timeout(limits.frame_read_timeout);
    let (connection, incoming) = start(reader, writer, peer_addr, limits, reply.version, None);
    Ok((connection, reply, incoming))
}

/// Accepts the handshake on a fresh stream: the TLS handshake over `transport` (the peer
/// must show a certificate of the cell's CA), then `Hello` (at most `HELLO_BYTES_MAX`),
/// all within the handshake timeout; asks `check` for the reply and, if it accepts,
/// starts the connection, its frames taking their memory from `intake`. A peer saying
/// hello as a server must show a server certificate.
pub async fn accept(
    stream: TcpStream,
    transport: &Transport,
    limits: &Limits,
    intake: Intake,
    check: impl FnOnce(&Hello) -> Result<HelloReply, ErrorCode>,
) -> Result<(Connection, Hello, mpsc::Receiver<IncomingRequest>), ProtoError> {
    let deadline = Instant::now() + limits.handshake_timeout;
    let timed_out = || ProtoError::Timeout(limits.handshake_timeout);
    stream.set_nodelay(true)?;
    let peer_addr = stream.peer_addr()?;
    let secured = tokio::select! {
        secured = tokio::time::timeout_at(deadline, transport.accept(stream)) => {
            secured.map_err(|_| timed_out())??
        }
        // Made room for a newcomer while still in its handshake.
        () = intake.activity.evicted() => return Err(ProtoError::Closed),
    };
    let peer_class = secured.peer_class;
    let mut writer = secured.write;
    let mut reader = FrameReader::new(
        secured.read,
        limits.frame_bytes_max.min(HELLO_BYTES_MAX),
        limits.handshake_timeout,
        intake,
    );
    let first = tokio::time::timeout_at(deadline, reader.next())
        .await
        .map_err(|_| timed_out())?;
    let received = first.map_err(ProtoError::from)?.ok_or(ProtoError::Closed)?;
    let hello = match decode_frame(&received.body)? {
        Frame::Hello(hello) => hello,
        other => {
            return Err(ProtoError::Handshake(format!(
                "expected hello, got {}",
                frame_kind(&other)
            )));
        }
    };
    drop(received);
    let needed = PeerClass::required_for(&hello.peer);
    let wrong_class = needed.is_some() && peer_class.is_some() && peer_class != needed;
    let verdict = match wrong_class {
        true => Err(ErrorCode::PermissionDenied),
        false => check(&hello),
    };
    let reply = framed(&encode_frame(&Frame::HelloReply(verdict.clone()))?);
    tokio::time::timeout_at(deadline, async {
        writer.write_all(&reply).await?;
        writer.flush().await
    })
    .await
    .map_err(|_| timed_out())??;
    if wrong_class {
        return Err(ProtoError::Tls(format!(
            "said hello as {:?} with a host certificate; servers need a server certificate",
            hello.peer
        )));
    }
    let version = match verdict {
        Ok(reply) => reply.version,
        Err(code) => return Err(ProtoError::Handshake(format!("refused its hello: {code}"))),
    };
    reader.intake().activity.reached(Stage::Established);
    reader.frame_bytes_max = limits.frame_bytes_max;
    reader.set_frame_read_timeout(limits.frame_read_timeout);
    let (connection, incoming) = start(reader, writer, peer_addr, limits, version, peer_class);
    Ok((connection, hello, incoming))
}

/// A frame's name for a log line, without its contents.
fn frame_kind(frame: &Frame) -> &'static str {
    match frame {
        Frame::Hello(_) => "a hello",
        Frame::HelloReply(_) => "a hello reply",
        Frame::Request { .. } | Frame::AuthRequest { .. } => "a request",
        Frame::Response { .. } => "a response",
        Frame::Goodbye => "a goodbye",
    }
}

/// The version check every server makes on a `Hello`, plus the cell name.
pub fn negotiate(hello: &Hello, cell: &str) -> Result<u16, ErrorCode> {
    if hello.cell != cell {
        return Err(ErrorCode::WrongCell {
            expected: cell.to_owned(),
        });
    }
    let version = hello.version_max.min(PROTOCOL_VERSION_MAX);
    if version < hello.version_min.max(PROTOCOL_VERSION_MIN) {
        return Err(ErrorCode::VersionMismatch {
            min: PROTOCOL_VERSION_MIN,
            max: PROTOCOL_VERSION_MAX,
        });
    }
    Ok(version)
}

/// A frame's header and body, ready for the socket.
fn framed(body: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(FRAME_HEADER_BYTES + body.len());
    push_header(&mut bytes, body.len(), crc32c::crc32c(body));
    bytes.extend_from_slice(body);
    bytes
}

fn push_header(bytes: &mut Vec<u8>, length: usize, checksum: u32) {
    bytes.extend_from_slice(&(length as u32).to_le_bytes());
    bytes.extend_from_slice(&checksum.to_le_bytes());
}

/// Writes `first`, then `second`, in as few writes as the stream allows: one vectored
/// write on a plain socket, while TLS takes them in turn (it encrypts in user space, so
/// nothing can go from a file to the socket without passing through it).
async fn write_both(writer: &mut ByteWriter, first: &[u8], second: &[u8]) -> std::io::Result<()> {
    if !writer.is_write_vectored() {
        writer.write_all(first).await?;
        return writer.write_all(second).await;
    }
    let mut slices = [IoSlice::new(first), IoSlice::new(second)];
    let mut left = &mut slices[..];
    IoSlice::advance_slices(&mut left, 0);
    while !left.is_empty() {
        let written = writer.write_vectored(left).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut left, written);
    }
    Ok(())
}

fn start(
    reader: FrameReader,
    writer: ByteWriter,
    peer_addr: SocketAddr,
    limits: &Limits,
    version: u16,
    peer_class: Option<PeerClass>,
) -> (Connection, mpsc::Receiver<IncomingRequest>) {
    let (outgoing_tx, outgoing_rx) = mpsc::channel(limits.outgoing_queue_max);
    let (incoming_tx, incoming_rx) = mpsc::channel(limits.incoming_queue_max);
    let inner = Arc::new(Inner {
        outgoing: outgoing_tx,
        calls: Mutex::new(Calls::default()),
        next_id: AtomicU64::new(1),
        cancel: CancellationToken::new(),
        peer_addr,
        frame_bytes_max: limits.frame_bytes_max,
        activity: reader.intake().activity.clone(),
        close_reason: Mutex::new(None),
        version,
        peer_class,
    });
    tokio::spawn(write_loop(
        writer,
        outgoing_rx,
        Arc::downgrade(&inner),
        inner.cancel.clone(),
        limits.frame_read_timeout,
    ));
    tokio::spawn(read_loop(
        reader,
        Arc::downgrade(&inner),
        incoming_tx,
        inner.cancel.clone(),
    ));
    (Connection { inner }, incoming_rx)
}

/// Writes queued frames, gathering small ones into one write; a large frame's bulk bytes
/// (or its whole large body) go after its header as they are, never copied into the
/// gathered bytes. A peer that reads nothing for the frame read timeout is closed.
async fn write_loop(
    mut writer: ByteWriter,
    mut outgoing: mpsc::Receiver<EncodedFrame>,
    inner: std::sync::Weak<Inner>,
    cancel: CancellationToken,
    write_timeout: Duration,
) {
    let mut gathered = Vec::new();
    let reason = loop {
        let frame = tokio::select! {
            frame = outgoing.recv() => frame,
            () = cancel.cancelled() => None,
        };
        let Some(mut frame) = frame else {
            break CloseReason::Local;
        };
        gathered.clear();
        let mut large = Bytes::new();
        loop {
            push_header(&mut gathered, frame.len(), frame.checksum());
            if frame.len() > WRITE_GATHER_BYTES {
                large = if frame.tail.is_empty() {
                    Bytes::from(frame.head)
                } else {
                    gathered.extend_from_slice(&frame.head);
                    frame.tail
                };
                break;
            }
            gathered.extend_from_slice(&frame.head);
            gathered.extend_from_slice(&frame.tail);
            if gathered.len() >= WRITE_GATHER_BYTES {
                break;
            }
            match outgoing.try_recv() {
                Ok(next) => frame = next,
                Err(_) => break,
            }
        }
        let written = tokio::time::timeout(write_timeout, async {
            write_both(&mut writer, &gathered, &large).await?;
            // TLS holds what the socket did not take yet.
            writer.flush().await
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => break CloseReason::Io(e.to_string()),
            Err(_) => {
                break CloseReason::Stalled(format!(
                    "read none of what it was sent for {} s",
                    write_timeout.as_secs_f64()
                ));
            }
        }
        if gathered.capacity() > WRITE_GATHER_BYTES * 2 {
            gathered = Vec::new();
        }
    };
    if let Some(inner) = inner.upgrade() {
        inner.end(reason);
    } else {
        cancel.cancel();
    }
    let _ = writer.shutdown().await;
}

async fn read_loop(
    mut reader: FrameReader,
    inner: std::sync::Weak<Inner>,
    incoming: mpsc::Sender<IncomingRequest>,
    cancel: CancellationToken,
) {
    let reason = loop {
        let next = tokio::select! {
            next = reader.next() => next,
            () = cancel.cancelled() => break CloseReason::Local,
        };
        let received = match next {
            Ok(Some(received)) => received,
            Ok(None) => break CloseReason::Peer,
            Err(ReadFailure::Evicted) => {
                let why = reader.intake().activity.eviction();
                break why.map_or(CloseReason::Local, CloseReason::Evicted);
            }
            Err(failure) => break CloseReason::from(failure),
        };
        let frame = match decode_frame_shared(&received.body) {
            Ok(frame) => frame,
            Err(e) => break CloseReason::Malformed(format!("sent an undecodable frame: {e}")),
        };
        let Some(inner) = inner.upgrade() else {
            break CloseReason::Local;
        };
        match frame {
            Frame::Response { id, body } => {
                let mut calls = inner.calls.lock();
                if let Some(waiter) = calls.waiters.remove(&id.0) {
                    let _ = waiter.send(body);
                }
                if calls.closing && calls.waiters.is_empty() {
                    break CloseReason::Peer;
                }
            }
            frame @ (Frame::Request { .. } | Frame::AuthRequest { .. }) => {
                let (id, body, token) = match frame {
                    Frame::AuthRequest { id, token, body } => (id, body, Some(token)),
                    Frame::Request { id, body } => (id, body, None),
                    _ => break CloseReason::Local,
                };
                let activity = &reader.intake().activity;
                activity.reached(Stage::Served);
                let request = IncomingRequest {
                    id,
                    body,
                    token,
                    replier: Replier {
                        id,
                        outgoing: inner.outgoing.clone(),
                        frame_bytes_max: inner.frame_bytes_max,
                        version: inner.version,
                        _charge: received.charge,
                        _in_flight: activity.begin(),
                    },
                };
                drop(inner);
                let delivered = tokio::select! {
                    sent = incoming.send(request) => sent,
                    () = cancel.cancelled() => break CloseReason::Local,
                };
                if let Err(mpsc::error::SendError(request)) = delivered {
                    // Nobody serves requests on this side.
                    request.replier.reply(Err(ErrorCode::Unsupported)).await;
                }
            }
            Frame::Goodbye => {
                let mut calls = inner.calls.lock();
                calls.closing = true;
                if calls.waiters.is_empty() {
                    break CloseReason::Peer;
                }
                debug!(peer = %inner.peer_addr, calls = calls.waiters.len(),
                    "peer said goodbye; closing once the calls in flight are answered");
            }
            Frame::Hello(_) | Frame::HelloReply(_) => {
                break CloseReason::Malformed("sent a handshake frame after the handshake".into());
            }
        }
    };
    match inner.upgrade() {
        Some(inner) => inner.end(reason),
        None => cancel.cancel(),
    }
}

impl Connection {
    /// Sends a request and waits for its response, at most `timeout`.
    pub async fn call(&self, request: Request, timeout: Duration) -> Result<Response, ProtoError> {
        self.call_ref(&request, timeout).await
    }

    /// `call` with the request borrowed: a caller that may retry it elsewhere keeps it
    /// without copying it (a store carries up to a MiB).
    pub async fn call_ref(
        &self,
        request: &Request,
        timeout: Duration,
    ) -> Result<Response, ProtoError> {
        self.try_call_ref(request, timeout)
            .await
            .unwrap_or(Err(ProtoError::Closed))
    }

    /// `call_ref`, telling a call that was never sent (`NotSent`: the connection was
    /// closing or closed, say after the server's goodbye to an idle connection) from one
    /// that was sent and failed: the first may go again on a new connection, whatever it is.
    pub async fn try_call_ref(
        &self,
        request: &Request,
        timeout: Duration,
    ) -> Result<Result<Response, ProtoError>, NotSent> {
        self.try_call_as(None, request, timeout).await
    }

    /// `try_call_ref` made for the holder of `token` (`None`: for `system:anyuser`, or
    /// for this side's server certificate).
    pub async fn try_call_as(
        &self,
        token: Option<&SealedToken>,
        request: &Request,
        timeout: Duration,
    ) -> Result<Result<Response, ProtoError>, NotSent> {
        // A request with bulk bytes goes to an older peer as the message it stands for.
        let request = request.as_sent_to(self.inner.version);
        let mut needed = request.version_min();
        if token.is_some() {
            needed = needed.max(PROTOCOL_VERSION_IDENTITY);
        }
        if needed > self.inner.version {
            return Ok(Err(ProtoError::PeerTooOld {
                peer: self.inner.version,
                needed,
            }));
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let encoded = match encode_request(RequestId(id), token, &request) {
            Ok(encoded) => encoded,
            Err(e) => return Ok(Err(e)),
        };
        drop(request);
        if encoded.len() > self.inner.frame_bytes_max {
            return Ok(Err(ProtoError::FrameTooLarge {
                length: encoded.len(),
                limit: self.inner.frame_bytes_max,
            }));
        }
        let (tx, rx) = oneshot::channel();
        {
            let mut calls = self.inner.calls.lock();
            if calls.closing {
                return Err(NotSent);
            }
            calls.waiters.insert(id, tx);
        }
        let _in_flight = self.inner.activity.begin();
        let outcome = tokio::time::timeout(timeout, async {
            self.inner
                .outgoing
                .send(encoded)
                .await
                .map_err(|_| ProtoError::Closed)?;
            rx.await.map_err(|_| ProtoError::Closed)
        })
        .await;
        Ok(match outcome {
            Ok(Ok(Ok(response))) => Ok(response),
            Ok(Ok(Err(code))) => Err(ProtoError::Remote(code)),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                self.inner.calls.lock().waiters.remove(&id);
                Err(ProtoError::Timeout(timeout))
            }
        })
    }

    pub fn peer_addr(&self) -> SocketAddr {
        self.inner.peer_addr
    }

    /// True once no new call can start here: the connection died, was closed, or one
    /// side said goodbye. A pool then opens another.
    pub fn is_closed(&self) -> bool {
        self.inner.cancel.is_cancelled() || self.inner.calls.lock().closing
    }

    /// Resolves when the connection has died or was closed.
    pub async fn closed(&self) {
        self.inner.cancel.cancelled().await
    }

    /// Closes the connection; pending calls fail with `Closed`.
    pub fn close(&self) {
        self.inner.end(CloseReason::Local);
    }

    /// Says goodbye: no new call starts on this side, and the peer is told to send
    /// nothing new. Answers to requests already sent still go out. False if a goodbye
    /// was said or heard before, or the connection is closed.
    pub fn goodbye(&self) -> bool {
        if self.inner.version < PROTOCOL_VERSION_GOODBYE_AND_CONDITIONAL_STORES {
            // A version-1 peer cannot read a goodbye: it is only closed (a server says
            // goodbye to a connection with nothing in flight, so nothing is cut short).
            if self.inner.cancel.is_cancelled() {
                return false;
            }
            self.close();
            return true;
        }
        {
            let mut calls = self.inner.calls.lock();
            if calls.closing || self.inner.cancel.is_cancelled() {
                return false;
            }
            calls.closing = true;
        }
        match encode_frame_parts(&Frame::Goodbye) {
            Ok(encoded) => self.inner.outgoing.try_send(encoded).is_ok(),
            Err(_) => false,
        }
    }

    /// The protocol version agreed on in the handshake.
    pub fn version(&self) -> u16 {
        self.inner.version
    }

    /// What the peer's certificate says it is: known on the accepting side of a TLS
    /// connection; `None` on the connecting side and in plaintext.
    pub fn peer_class(&self) -> Option<PeerClass> {
        self.inner.peer_class
    }

    /// Why the connection ended; `None` while it is open.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.inner.close_reason.lock().clone()
    }

    /// The connection's traffic, as its reader saw it.
    pub fn activity(&self) -> &Arc<Activity> {
        &self.inner.activity
    }

    /// True when both handles refer to the same connection.
    pub fn same(&self, other: &Connection) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}
