//! `Flood`: a misbehaving peer for the tests and figures that check a server's limits:
//! many connections that say hello and then nothing, or that stop inside a frame.
//! Invariant: it connects only to the address it is given, and every connection it
//! opened is closed once it is dropped or `close` returns.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::error::ProtoError;
use crate::frame::{FRAME_HEADER_BYTES, decode_frame, encode_frame};
use crate::message::{Frame, Hello, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN, PeerKind};
use crate::tls::{Secured, Transport};

/// How long one connection may take to connect and be answered its hello.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// What each flooding connection does after its hello.
#[derive(Clone, Copy, Debug)]
pub enum Stall {
    /// Nothing at all.
    Idle,
    /// Sends a frame header claiming `declared` bytes and `sent` bytes of its body, then
    /// nothing more.
    InsideFrame { declared: usize, sent: usize },
}

/// The connections of one flood.
pub struct Flood {
    /// How it connects: with a host certificate of the cell, so that it gets past TLS.
    transport: Transport,
    tasks: JoinSet<()>,
    stop: CancellationToken,
    /// Connections the server has not closed (counted once their hello was answered).
    open: Arc<AtomicUsize>,
}

/// How the connections of one `open` call fared.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Opened {
    /// Hello answered with a welcome.
    pub established: usize,
    /// Hello answered with an error (`Busy`), or the connection closed before an answer.
    pub turned_away: usize,
}

impl Flood {
    pub fn new(transport: Transport) -> Flood {
        Flood {
            transport,
            tasks: JoinSet::new(),
            stop: CancellationToken::new(),
            open: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Opens `count` connections to `address`, `parallel` at a time, each saying hello
    /// to cell `cell` and then stalling as `stall` says; returns once every hello was
    /// answered (or failed). The connections stay open until the server closes them or
    /// the flood ends.
    pub async fn open(
        &mut self,
        address: &str,
        cell: &str,
        count: usize,
        stall: Stall,
        parallel: usize,
    ) -> Opened {
        let setups = Arc::new(Semaphore::new(parallel.max(1)));
        let established = Arc::new(AtomicUsize::new(0));
        let turned_away = Arc::new(AtomicUsize::new(0));
        let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(count.max(1));
        for _ in 0..count {
            let address = address.to_owned();
            let cell = cell.to_owned();
            let setups = setups.clone();
            let stop = self.stop.clone();
            let open = self.open.clone();
            let established = established.clone();
            let turned_away = turned_away.clone();
            let done = done_tx.clone();
            let transport = self.transport.clone();
            self.tasks.spawn(async move {
                let permit = setups.acquire_owned().await;
                let setup = tokio::time::timeout(
                    SETUP_TIMEOUT,
                    connect_and_hello(&address, &cell, &transport),
                )
                .await;
                drop(permit);
                let stream = match setup {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(_)) | Err(_) => {
                        turned_away.fetch_add(1, Ordering::Relaxed);
                        let _ = done.send(()).await;
                        return;
                    }
                };
                established.fetch_add(1, Ordering::Relaxed);
                open.fetch_add(1, Ordering::Relaxed);
                let _ = done.send(()).await;
                tokio::select! {
                    () = hold(stream, stall) => {}
                    () = stop.cancelled() => {}
                }
                open.fetch_sub(1, Ordering::Relaxed);
            });
        }
        drop(done_tx);
        for _ in 0..count {
            if done_rx.recv().await.is_none() {
                break;
            }
        }
        Opened {
            established: established.load(Ordering::Relaxed),
            turned_away: turned_away.load(Ordering::Relaxed),
        }
    }

    /// Connections of this flood the server has not closed.
    pub fn open_now(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Closes every connection of the flood and waits until they are closed.
    pub async fn close(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Connects and has the hello answered with a welcome.
async fn connect_and_hello(
    address: &str,
    cell: &str,
    transport: &Transport,
) -> Result<Secured, ProtoError> {
    let mut stream = transport
        .connect(TcpStream::connect(address).await?)
        .await?;
    let hello = Frame::Hello(Hello {
        version_min: PROTOCOL_VERSION_MIN,
        version_max: PROTOCOL_VERSION_MAX,
        cell: cell.to_owned(),
        peer: PeerKind::Admin,
    });
    stream
        .write
        .write_all(&framed(&encode_frame(&hello)?))
        .await?;
    stream.write.flush().await?;
    let mut header = [0u8; FRAME_HEADER_BYTES];
    stream.read.read_exact(&mut header).await?;
    let length = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if length > 64 << 10 {
        return Err(ProtoError::FrameTooLarge {
            length,
            limit: 64 << 10,
        });
    }
    let mut body = vec![0u8; length];
    stream.read.read_exact(&mut body).await?;
    match decode_frame(&body)? {
        Frame::HelloReply(Ok(_)) => Ok(stream),
        Frame::HelloReply(Err(code)) => Err(ProtoError::Remote(code)),
        _ => Err(ProtoError::Handshake("expected a hello reply".into())),
    }
}

/// Stalls as told, then reads (and drops) whatever the server sends until it closes.
async fn hold(mut stream: Secured, stall: Stall) {
    if let Stall::InsideFrame { declared, sent } = stall {
        let mut start = Vec::with_capacity(FRAME_HEADER_BYTES);
        start.extend_from_slice(&(declared as u32).to_le_bytes());
        start.extend_from_slice(&0u32.to_le_bytes());
        if stream.write.write_all(&start).await.is_err() {
            return;
        }
        let chunk = vec![0u8; 64 << 10];
        let mut left = sent.min(declared);
        while left > 0 {
            let part = left.min(chunk.len());
            if stream.write.write_all(&chunk[..part]).await.is_err() {
                return;
            }
            left -= part;
        }
        if stream.write.flush().await.is_err() {
            return;
        }
    }
    let mut sink = [0u8; 256];
    while let Ok(read) = stream.read.read(&mut sink).await {
        if read == 0 {
            return;
        }
    }
}

fn framed(body: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(FRAME_HEADER_BYTES + body.len());
    bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
    bytes.extend_from_slice(body);
    bytes
}
