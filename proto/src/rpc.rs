//! A duplex RPC connection: either side may send requests, many may be in flight, and
//! responses are matched to their calls by request id.
//! Invariant: every pending call ends, with its response, a timeout, or `Closed` when the
//! connection dies; the outgoing and the incoming queue are bounded.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::error::{ErrorCode, ProtoError};
use crate::frame::{
    FRAME_BYTES_MAX_DEFAULT, FRAME_HEADER_BYTES, FrameCodec, decode_frame, encode_frame,
    encode_request,
};
use crate::ids::RequestId;
use crate::message::{
    Frame, Hello, HelloReply, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN, Request, Response,
};

/// Limits one connection imposes on its peer.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest frame body accepted or sent.
    pub frame_bytes_max: usize,
    /// Requests from the peer queued before the reader stops reading (backpressure).
    pub incoming_queue_max: usize,
    /// Frames queued for sending before senders wait.
    pub outgoing_queue_max: usize,
    /// How long the handshake may take.
    pub handshake_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            frame_bytes_max: FRAME_BYTES_MAX_DEFAULT,
            incoming_queue_max: 256,
            outgoing_queue_max: 256,
            handshake_timeout: Duration::from_secs(5),
        }
    }
}

type Pending = Mutex<HashMap<u64, oneshot::Sender<Result<Response, ErrorCode>>>>;

struct Inner {
    outgoing: mpsc::Sender<Vec<u8>>,
    pending: Pending,
    next_id: AtomicU64,
    cancel: CancellationToken,
    peer_addr: SocketAddr,
    frame_bytes_max: usize,
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
    replier: Replier,
}

/// Sends the response to one incoming request.
pub struct Replier {
    id: RequestId,
    outgoing: mpsc::Sender<Vec<u8>>,
    frame_bytes_max: usize,
}

impl IncomingRequest {
    /// Splits the request into its body and the means to answer it.
    pub fn into_parts(self) -> (Request, Replier) {
        (self.body, self.replier)
    }
}

impl Replier {
    /// Sends the response; a connection that died meanwhile swallows it.
    pub async fn reply(self, body: Result<Response, ErrorCode>) {
        let frame = Frame::Response { id: self.id, body };
        let bytes = match encode_frame(&frame) {
            Ok(bytes) if bytes.len() <= self.frame_bytes_max => bytes,
            Ok(_) | Err(_) => {
                let refusal = Frame::Response {
                    id: self.id,
                    body: Err(ErrorCode::TooLarge),
                };
                match encode_frame(&refusal) {
                    Ok(bytes) => bytes,
                    Err(_) => return,
                }
            }
        };
        let _ = self.outgoing.send(bytes).await;
    }
}

/// Connects to `addr`, sends `hello` and waits for the reply.
pub async fn connect(
    addr: &str,
    hello: Hello,
    limits: &Limits,
) -> Result<(Connection, HelloReply, mpsc::Receiver<IncomingRequest>), ProtoError> {
    let stream = tokio::time::timeout(limits.handshake_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ProtoError::Timeout(limits.handshake_timeout))??;
    stream.set_nodelay(true)?;
    let peer_addr = stream.peer_addr()?;
    let (read, write) = stream.into_split();
    let mut reader = FramedRead::new(read, FrameCodec::new(limits.frame_bytes_max));
    let mut writer = BufWriter::new(write);
    write_frame(&mut writer, &encode_frame(&Frame::Hello(hello))?).await?;
    writer.flush().await?;
    let reply = tokio::time::timeout(limits.handshake_timeout, reader.next())
        .await
        .map_err(|_| ProtoError::Timeout(limits.handshake_timeout))?;
    let body = reply.ok_or(ProtoError::Closed)??;
    let reply = match decode_frame(&body)? {
        Frame::HelloReply(Ok(reply)) => reply,
        Frame::HelloReply(Err(code)) => return Err(ProtoError::Remote(code)),
        other => {
            return Err(ProtoError::Handshake(format!(
                "expected a hello reply, got {other:?}"
            )));
        }
    };
    let (connection, incoming) = start(reader, writer, peer_addr, limits);
    Ok((connection, reply, incoming))
}

/// Accepts the handshake on a fresh stream: reads `Hello`, asks `check` for the reply
/// and, if it accepts, starts the connection.
pub async fn accept(
    stream: TcpStream,
    limits: &Limits,
    check: impl FnOnce(&Hello) -> Result<HelloReply, ErrorCode>,
) -> Result<(Connection, Hello, mpsc::Receiver<IncomingRequest>), ProtoError> {
    stream.set_nodelay(true)?;
    let peer_addr = stream.peer_addr()?;
    let (read, write) = stream.into_split();
    let mut reader = FramedRead::new(read, FrameCodec::new(limits.frame_bytes_max));
    let mut writer = BufWriter::new(write);
    let first = tokio::time::timeout(limits.handshake_timeout, reader.next())
        .await
        .map_err(|_| ProtoError::Timeout(limits.handshake_timeout))?;
    let body = first.ok_or(ProtoError::Closed)??;
    let hello = match decode_frame(&body)? {
        Frame::Hello(hello) => hello,
        other => {
            return Err(ProtoError::Handshake(format!(
                "expected hello, got {other:?}"
            )));
        }
    };
    let verdict = check(&hello);
    write_frame(
        &mut writer,
        &encode_frame(&Frame::HelloReply(verdict.clone()))?,
    )
    .await?;
    writer.flush().await?;
    if let Err(code) = verdict {
        return Err(ProtoError::Handshake(code.to_string()));
    }
    let (connection, incoming) = start(reader, writer, peer_addr, limits);
    Ok((connection, hello, incoming))
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

async fn write_frame(writer: &mut BufWriter<OwnedWriteHalf>, body: &[u8]) -> std::io::Result<()> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    header[..4].copy_from_slice(&(body.len() as u32).to_le_bytes());
    header[4..].copy_from_slice(&crc32c::crc32c(body).to_le_bytes());
    writer.write_all(&header).await?;
    writer.write_all(body).await
}

fn start(
    reader: FramedRead<OwnedReadHalf, FrameCodec>,
    writer: BufWriter<OwnedWriteHalf>,
    peer_addr: SocketAddr,
    limits: &Limits,
) -> (Connection, mpsc::Receiver<IncomingRequest>) {
    let (outgoing_tx, outgoing_rx) = mpsc::channel(limits.outgoing_queue_max);
    let (incoming_tx, incoming_rx) = mpsc::channel(limits.incoming_queue_max);
    let inner = Arc::new(Inner {
        outgoing: outgoing_tx,
        pending: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(1),
        cancel: CancellationToken::new(),
        peer_addr,
        frame_bytes_max: limits.frame_bytes_max,
    });
    let frame_bytes_max = limits.frame_bytes_max;
    tokio::spawn(write_loop(
        writer,
        outgoing_rx,
        inner.cancel.clone(),
        frame_bytes_max,
    ));
    tokio::spawn(read_loop(
        reader,
        Arc::downgrade(&inner),
        incoming_tx,
        inner.cancel.clone(),
    ));
    (Connection { inner }, incoming_rx)
}

async fn write_loop(
    mut writer: BufWriter<OwnedWriteHalf>,
    mut outgoing: mpsc::Receiver<Vec<u8>>,
    cancel: CancellationToken,
    frame_bytes_max: usize,
) {
    loop {
        let body = tokio::select! {
            body = outgoing.recv() => body,
            () = cancel.cancelled() => None,
        };
        let Some(body) = body else { break };
        if body.len() > frame_bytes_max {
            debug!(bytes = body.len(), "dropping oversized outgoing frame");
            continue;
        }
        if write_frame(&mut writer, &body).await.is_err() {
            break;
        }
        // Flush only when nothing else is queued: one syscall for a burst of frames.
        if outgoing.is_empty() && writer.flush().await.is_err() {
            break;
        }
    }
    cancel.cancel();
    let _ = writer.shutdown().await;
}

async fn read_loop(
    mut reader: FramedRead<OwnedReadHalf, FrameCodec>,
    inner: std::sync::Weak<Inner>,
    incoming: mpsc::Sender<IncomingRequest>,
    cancel: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            next = reader.next() => next,
            () = cancel.cancelled() => None,
        };
        let body = match next {
            Some(Ok(body)) => body,
            Some(Err(e)) => {
                debug!(error = %e, "connection read failed");
                break;
            }
            None => break,
        };
        let frame = match decode_frame(&body) {
            Ok(frame) => frame,
            Err(e) => {
                debug!(error = %e, "undecodable frame; closing connection");
                break;
            }
        };
        match frame {
            Frame::Response { id, body } => {
                let Some(inner) = inner.upgrade() else { break };
                let waiter = inner.pending.lock().remove(&id.0);
                if let Some(waiter) = waiter {
                    let _ = waiter.send(body);
                }
            }
            Frame::Request { id, body } => {
                let Some(inner) = inner.upgrade() else { break };
                let request = IncomingRequest {
                    id,
                    body,
                    replier: Replier {
                        id,
                        outgoing: inner.outgoing.clone(),
                        frame_bytes_max: inner.frame_bytes_max,
                    },
                };
                drop(inner);
                let delivered = tokio::select! {
                    sent = incoming.send(request) => sent,
                    () = cancel.cancelled() => break,
                };
                if let Err(mpsc::error::SendError(request)) = delivered {
                    // Nobody serves requests on this side.
                    request.replier.reply(Err(ErrorCode::Unsupported)).await;
                }
            }
            Frame::Hello(_) | Frame::HelloReply(_) => {
                debug!("unexpected handshake frame after handshake; closing connection");
                break;
            }
        }
    }
    cancel.cancel();
    if let Some(inner) = inner.upgrade() {
        // Dropping the senders wakes every waiting call with `Closed`.
        inner.pending.lock().clear();
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
        if self.is_closed() {
            return Err(ProtoError::Closed);
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.inner.pending.lock().insert(id, tx);
        let bytes = match encode_request(RequestId(id), request) {
            Ok(bytes) => bytes,
            Err(e) => {
                self.inner.pending.lock().remove(&id);
                return Err(e);
            }
        };
        if bytes.len() > self.inner.frame_bytes_max {
            self.inner.pending.lock().remove(&id);
            return Err(ProtoError::FrameTooLarge {
                length: bytes.len(),
                limit: self.inner.frame_bytes_max,
            });
        }
        let outcome = tokio::time::timeout(timeout, async {
            self.inner
                .outgoing
                .send(bytes)
                .await
                .map_err(|_| ProtoError::Closed)?;
            rx.await.map_err(|_| ProtoError::Closed)
        })
        .await;
        match outcome {
            Ok(Ok(Ok(response))) => Ok(response),
            Ok(Ok(Err(code))) => Err(ProtoError::Remote(code)),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                self.inner.pending.lock().remove(&id);
                Err(ProtoError::Timeout(timeout))
            }
        }
    }

    pub fn peer_addr(&self) -> SocketAddr {
        self.inner.peer_addr
    }

    pub fn is_closed(&self) -> bool {
        self.inner.cancel.is_cancelled()
    }

    /// Resolves when the connection has died or was closed.
    pub async fn closed(&self) {
        self.inner.cancel.cancelled().await
    }

    /// Closes the connection; pending calls fail with `Closed`.
    pub fn close(&self) {
        self.inner.cancel.cancel();
        self.inner.pending.lock().clear();
    }

    /// True when both handles refer to the same connection.
    pub fn same(&self, other: &Connection) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}
