//! `FrameReader`: reads frames off a connection's byte stream (TLS, or a plain socket in
//! benchmarks), growing each body's buffer as
//! its bytes arrive, with memory charged to the connection's `Intake` from the header on,
//! and each frame due within the frame read timeout of its first byte.
//! Invariant: an idle connection holds no read buffer; a body never holds more memory
//! than twice what has arrived of it (and at least its first 64 KiB) unless it is a
//! buffer of the data path's pool, already held; no body whose length passed the limit
//! or whose checksum failed is handed out.

use std::io;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

use crate::budget::{BudgetError, Charge, Intake};
use crate::frame::FRAME_HEADER_BYTES;

/// Bytes read ahead at once while frames arrive: several small frames per system call.
const READ_AHEAD_BYTES: usize = 8 << 10;
/// A large body's first buffer; it then doubles as its bytes arrive.
const BODY_FIRST_BYTES: usize = 64 << 10;
/// An idle connection waits for its next bytes in this much of its task's own memory,
/// and takes a read-ahead buffer only once they came: a small request fits whole.
const FIRST_READ_BYTES: usize = 512;

/// The byte stream frames are read from.
pub type ByteReader = Box<dyn AsyncRead + Send + Unpin>;

/// Why no frame could be read.
#[derive(Debug)]
pub enum ReadFailure {
    Io(io::Error),
    /// The peer closed the connection inside a frame.
    EndedInsideFrame,
    TooLarge {
        length: usize,
        limit: usize,
    },
    Checksum {
        expected: u32,
        actual: u32,
    },
    /// The frame did not arrive within the read timeout of its first byte.
    Stalled(Duration),
    /// The frame got no memory within its read timeout.
    NoMemory(BudgetError),
    /// The connection was evicted.
    Evicted,
}

impl std::fmt::Display for ReadFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadFailure::Io(e) => write!(f, "read failed: {e}"),
            ReadFailure::EndedInsideFrame => f.write_str("closed inside a frame"),
            ReadFailure::TooLarge { length, limit } => {
                write!(f, "sent a frame of {length} bytes; the limit is {limit}")
            }
            ReadFailure::Checksum { expected, actual } => write!(
                f,
                "sent a frame whose checksum failed (expected {expected:#010x}, got {actual:#010x})"
            ),
            ReadFailure::Stalled(timeout) => write!(
                f,
                "stalled inside a frame: it was not complete {} s after its first byte",
                timeout.as_secs_f64()
            ),
            ReadFailure::NoMemory(BudgetError::TooLarge { bytes, budget }) => write!(
                f,
                "sent a frame of {bytes} bytes, more than the server's whole frame memory ({budget})"
            ),
            ReadFailure::NoMemory(_) => {
                f.write_str("waited for frame memory past its frame timeout")
            }
            ReadFailure::Evicted => f.write_str("evicted"),
        }
    }
}

impl From<ReadFailure> for crate::error::ProtoError {
    fn from(failure: ReadFailure) -> Self {
        use crate::error::ProtoError;
        match failure {
            ReadFailure::Io(e) => ProtoError::Io(e),
            ReadFailure::EndedInsideFrame | ReadFailure::Evicted => ProtoError::Closed,
            ReadFailure::TooLarge { length, limit } => ProtoError::FrameTooLarge { length, limit },
            ReadFailure::Checksum { expected, actual } => ProtoError::Checksum { expected, actual },
            ReadFailure::Stalled(timeout) => ProtoError::Timeout(timeout),
            ReadFailure::NoMemory(BudgetError::TooLarge { bytes, budget }) => {
                ProtoError::FrameTooLarge {
                    length: bytes,
                    limit: budget,
                }
            }
            ReadFailure::NoMemory(_) => ProtoError::Closed,
        }
    }
}

/// One frame's body and the memory it holds until it is answered.
#[derive(Debug)]
pub struct Received {
    pub body: Bytes,
    pub charge: Charge,
}

/// Reads frames from one connection.
pub struct FrameReader {
    read: ByteReader,
    /// Bytes read but not yet consumed; empty (and unallocated) between bursts.
    ahead: BytesMut,
    pub frame_bytes_max: usize,
    frame_read_timeout: Duration,
    intake: Intake,
}

impl FrameReader {
    pub fn new(
        read: ByteReader,
        frame_bytes_max: usize,
        frame_read_timeout: Duration,
        intake: Intake,
    ) -> FrameReader {
        FrameReader {
            read,
            ahead: BytesMut::new(),
            frame_bytes_max,
            frame_read_timeout,
            intake,
        }
    }

    pub fn intake(&self) -> &Intake {
        &self.intake
    }

    /// From the next frame on, each must arrive within `timeout` of its first byte.
    pub fn set_frame_read_timeout(&mut self, timeout: Duration) {
        self.frame_read_timeout = timeout;
    }

    /// The next frame; `None` when the peer closed the connection between frames.
    pub async fn next(&mut self) -> Result<Option<Received>, ReadFailure> {
        if self.ahead.is_empty() && self.fill_ahead(None).await? == 0 {
            return Ok(None);
        }
        let deadline = Instant::now() + self.frame_read_timeout;
        while self.ahead.len() < FRAME_HEADER_BYTES {
            if self.fill_ahead(Some(deadline)).await? == 0 {
                return Err(ReadFailure::EndedInsideFrame);
            }
        }
        let header = &self.ahead[..FRAME_HEADER_BYTES];
        let length = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let expected = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if length > self.frame_bytes_max {
            return Err(ReadFailure::TooLarge {
                length,
                limit: self.frame_bytes_max,
            });
        }
        self.ahead.advance(FRAME_HEADER_BYTES);
        let charge = tokio::select! {
            charged = self.intake.charge(length, deadline) => charged.map_err(ReadFailure::NoMemory)?,
            () = self.intake.activity.evicted() => return Err(ReadFailure::Evicted),
        };
        let body = if self.ahead.len() >= length {
            self.ahead.split_to(length).freeze()
        } else {
            self.read_body(length, deadline).await?
        };
        if self.ahead.is_empty() {
            // Give the read-ahead back between bursts: an idle connection holds none.
            self.ahead = BytesMut::new();
        }
        let actual = crc32c::crc32c(&body);
        if actual != expected {
            return Err(ReadFailure::Checksum { expected, actual });
        }
        charge.received();
        Ok(Some(Received { body, charge }))
    }

    /// Reads the rest of a body of `length` bytes, of which `ahead` holds the start,
    /// into a buffer that doubles as the bytes arrive.
    async fn read_body(&mut self, length: usize, deadline: Instant) -> Result<Bytes, ReadFailure> {
        // A pooled buffer is memory held already (and its length charged), so it is
        // taken whole; a body it cannot hold grows as its bytes arrive.
        let mut body = crate::buffer_pool::take_pooled(length)
            .unwrap_or_else(|| Vec::with_capacity(first_capacity(length, self.ahead.len())));
        body.extend_from_slice(&self.ahead);
        self.ahead = BytesMut::new();
        while body.len() < length {
            if body.len() == body.capacity() {
                body.reserve_exact(grown_capacity(body.capacity(), length) - body.len());
            }
            let room = body.capacity().min(length) - body.len();
            let read = self
                .read_body_some(&mut (&mut body).limit(room), deadline)
                .await?;
            if read == 0 {
                return Err(ReadFailure::EndedInsideFrame);
            }
        }
        // Back to the pool once the last slice of it (a store's bytes, a fetched
        // chunk) is dropped.
        Ok(crate::buffer_pool::into_bytes(body))
    }

    /// Reads what is available into the read-ahead, allocating it only once bytes are
    /// there; 0 at the end of the stream.
    async fn fill_ahead(&mut self, deadline: Option<Instant>) -> Result<usize, ReadFailure> {
        let FrameReader {
            read,
            ahead,
            intake,
            frame_read_timeout,
            ..
        } = self;
        if ahead.is_empty() {
            let mut first = [0u8; FIRST_READ_BYTES];
            let count = read_some(
                read,
                intake,
                *frame_read_timeout,
                &mut &mut first[..],
                deadline,
            )
            .await?;
            if count > 0 {
                ahead.reserve(READ_AHEAD_BYTES.max(count));
                ahead.extend_from_slice(&first[..count]);
            }
            return Ok(count);
        }
        if ahead.capacity() == ahead.len() {
            ahead.reserve(READ_AHEAD_BYTES);
        }
        read_some(read, intake, *frame_read_timeout, ahead, deadline).await
    }

    async fn read_body_some(
        &mut self,
        buffer: &mut impl BufMut,
        deadline: Instant,
    ) -> Result<usize, ReadFailure> {
        read_some(
            &mut self.read,
            &self.intake,
            self.frame_read_timeout,
            buffer,
            Some(deadline),
        )
        .await
    }
}

/// A body's first buffer: its first 64 KiB, or what already arrived of it if more.
fn first_capacity(length: usize, arrived: usize) -> usize {
    length.min(BODY_FIRST_BYTES.max(arrived))
}

/// The next buffer once a body's buffer of `capacity` is full: twice as large, at most
/// the body.
fn grown_capacity(capacity: usize, length: usize) -> usize {
    (capacity * 2).min(length)
}

/// One read into `buffer`, within `deadline`; notes the bytes as activity.
async fn read_some(
    read: &mut ByteReader,
    intake: &Intake,
    frame_read_timeout: Duration,
    buffer: &mut impl BufMut,
    deadline: Option<Instant>,
) -> Result<usize, ReadFailure> {
    let reading = async { read.read_buf(buffer).await.map_err(ReadFailure::Io) };
    let count = bounded(intake, frame_read_timeout, deadline, reading).await?;
    if count > 0 {
        intake.activity.received();
    }
    Ok(count)
}

/// Runs `work` until it ends, the deadline passes (`Stalled`) or the connection is
/// evicted.
async fn bounded<T>(
    intake: &Intake,
    frame_read_timeout: Duration,
    deadline: Option<Instant>,
    work: impl Future<Output = Result<T, ReadFailure>>,
) -> Result<T, ReadFailure> {
    let timeout = async {
        match deadline {
            Some(deadline) => tokio::time::sleep_until(deadline).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        done = work => done,
        () = timeout => Err(ReadFailure::Stalled(frame_read_timeout)),
        () = intake.activity.evicted() => Err(ReadFailure::Evicted),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::activity::Activity;
    use crate::budget::FrameBudget;
    use crate::bulk::Bulk;
    use crate::frame::encode_frame_parts;
    use crate::ids::{DataVersion, Fid, RequestId, VolumeId, WriteBackId};
    use crate::message::{Frame, Request};

    #[tokio::test]
    async fn a_frame_whose_bulk_tail_passes_the_limit_is_refused_before_any_memory() {
        let limit = 64 << 10;
        let frame = Frame::Request {
            id: RequestId(1),
            body: Request::StoreDataBulk {
                fid: Fid::root(VolumeId(1)),
                offset: 0,
                base: DataVersion(1),
                write_back: WriteBackId(1),
                data: Bulk::new(vec![7u8; limit].into()),
            },
        };
        let encoded = encode_frame_parts(&frame).unwrap();
        assert!(encoded.len() > limit && encoded.head.len() < 64);
        // The header and the message arrive; the tail would follow.
        let mut wire = Vec::new();
        wire.extend_from_slice(&(encoded.len() as u32).to_le_bytes());
        wire.extend_from_slice(&encoded.checksum().to_le_bytes());
        wire.extend_from_slice(&encoded.head);
        let (mut peer, ours) = tokio::io::duplex(1 << 20);
        tokio::io::AsyncWriteExt::write_all(&mut peer, &wire)
            .await
            .unwrap();
        let budget = FrameBudget::new(16 << 20, Duration::from_secs(60));
        let intake = Intake::bounded(Arc::new(Activity::new()), 0, budget.clone());
        let mut reader = FrameReader::new(Box::new(ours), limit, Duration::from_secs(5), intake);
        let refused = reader.next().await.unwrap_err();
        assert!(
            matches!(refused, ReadFailure::TooLarge { length, limit: l } if length == encoded.len() && l == limit),
            "{refused}"
        );
        // Nothing was charged, and no buffer was sized from the header's length.
        assert_eq!(budget.take_high_water(), 0);
        assert!(reader.ahead.capacity() < limit);
    }

    #[test]
    fn a_body_buffer_starts_small_and_doubles_up_to_the_body() {
        let length = 4 << 20;
        // A header claiming 4 MiB gets 64 KiB until more arrives.
        assert_eq!(first_capacity(length, 100), 64 << 10);
        assert_eq!(first_capacity(1000, 100), 1000);
        assert_eq!(first_capacity(length, 100 << 10), 100 << 10);
        let mut capacity = first_capacity(length, 0);
        let mut steps = Vec::new();
        while capacity < length {
            capacity = grown_capacity(capacity, length);
            steps.push(capacity >> 10);
        }
        assert_eq!(steps, [128, 256, 512, 1024, 2048, 4096]);
        assert_eq!(grown_capacity(3 << 20, length), length);
    }
}
