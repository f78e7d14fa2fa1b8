//! Framing: the codec that cuts a byte stream into checksummed frame bodies, and the
//! encoding of the `Frame` each body holds: the postcard-encoded message, then the raw
//! tail of its bulk bytes if it has any (`bulk`, protocol version 4).
//! Invariant: a length above `frame_bytes_max` is refused before any of its body is
//! buffered, no buffer is reserved from a header's length, and no body whose checksum did
//! not match is ever handed out. Connections read with `frame_reader`; this codec cuts
//! whole byte strings (the fuzz target, tests).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::error::ProtoError;
use serde::Serialize;

use crate::identity::SealedToken;
use crate::ids::RequestId;
use crate::message::{Frame, Request};

/// Bytes of header in front of every frame body.
pub const FRAME_HEADER_BYTES: usize = 8;
/// Default limit on one frame's body: room for a 1 MiB data chunk and its envelope.
/// Every server uses it (no flag changes it), and a cache manager's `StoreData` of
/// several chunks relies on it (checked at compile time there).
pub const FRAME_BYTES_MAX_DEFAULT: usize = 4 << 20;

/// Encodes and decodes frame bodies (`Bytes`), checking length and checksum. A frame is
/// `length (u32 LE) | CRC32C of body (u32 LE) | body`.
#[derive(Clone, Debug)]
pub struct FrameCodec {
    frame_bytes_max: usize,
}

impl FrameCodec {
    pub fn new(frame_bytes_max: usize) -> FrameCodec {
        FrameCodec { frame_bytes_max }
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(FRAME_BYTES_MAX_DEFAULT)
    }
}

impl Decoder for FrameCodec {
    type Item = Bytes;
    type Error = ProtoError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, ProtoError> {
        if src.len() < FRAME_HEADER_BYTES {
            return Ok(None);
        }
        let length = u32::from_le_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if length > self.frame_bytes_max {
            return Err(ProtoError::FrameTooLarge {
                length,
                limit: self.frame_bytes_max,
            });
        }
        if src.len() < FRAME_HEADER_BYTES + length {
            // Nothing is reserved from the header's word: the buffer grows as bytes arrive.
            return Ok(None);
        }
        let expected = u32::from_le_bytes([src[4], src[5], src[6], src[7]]);
        src.advance(FRAME_HEADER_BYTES);
        let body = src.split_to(length).freeze();
        let actual = crc32c::crc32c(&body);
        if actual != expected {
            return Err(ProtoError::Checksum { expected, actual });
        }
        Ok(Some(body))
    }
}

impl Encoder<&[u8]> for FrameCodec {
    type Error = ProtoError;

    fn encode(&mut self, body: &[u8], dst: &mut BytesMut) -> Result<(), ProtoError> {
        if body.len() > self.frame_bytes_max {
            return Err(ProtoError::FrameTooLarge {
                length: body.len(),
                limit: self.frame_bytes_max,
            });
        }
        dst.reserve(FRAME_HEADER_BYTES + body.len());
        dst.put_u32_le(body.len() as u32);
        dst.put_u32_le(crc32c::crc32c(body));
        dst.put_slice(body);
        Ok(())
    }
}

/// A frame's body as it goes out: the encoded message (`head`), then the message's bulk
/// bytes as they are (`tail`), written after it without being copied into it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EncodedFrame {
    pub head: Vec<u8>,
    pub tail: Bytes,
}

impl EncodedFrame {
    /// The body's length: what the frame header announces.
    pub fn len(&self) -> usize {
        self.head.len() + self.tail.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The CRC32C of the whole body, head and tail.
    pub fn checksum(&self) -> u32 {
        crc32c::crc32c_append(crc32c::crc32c(&self.head), &self.tail)
    }

    /// The body in one buffer (a copy of the tail): for handshakes and tests.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(self.len());
        body.extend_from_slice(&self.head);
        body.extend_from_slice(&self.tail);
        body
    }
}

/// Serializes a frame's body in one buffer (bulk bytes copied after the message).
pub fn encode_frame(frame: &Frame) -> Result<Vec<u8>, ProtoError> {
    Ok(encode_frame_parts(frame)?.to_vec())
}

/// Serializes a frame's message; its bulk bytes, if any, are the tail, not copied.
pub fn encode_frame_parts(frame: &Frame) -> Result<EncodedFrame, ProtoError> {
    Ok(EncodedFrame {
        head: postcard::to_stdvec(frame)?,
        tail: frame
            .bulk()
            .map(|bulk| bulk.bytes().clone())
            .unwrap_or_default(),
    })
}

/// Serializes `Frame::Request { id, body }` from a borrowed body, so a caller that may
/// send the same request again (a retry on another server) need not copy it first; its
/// bulk bytes, if any, are the tail.
pub fn encode_request(
    id: RequestId,
    token: Option<&SealedToken>,
    body: &Request,
) -> Result<EncodedFrame, ProtoError> {
    /// `Frame` with the request borrowed. Postcard encodes a variant by its index, so
    /// the variants before `Request` and `AuthRequest` stand in place (never built) to
    /// keep their indices.
    #[derive(Serialize)]
    #[allow(dead_code)]
    enum FrameRef<'a> {
        Hello(()),
        HelloReply(()),
        Request {
            id: RequestId,
            body: &'a Request,
        },
        Response(()),
        Goodbye,
        AuthRequest {
            id: RequestId,
            token: &'a SealedToken,
            body: &'a Request,
        },
    }
    let frame = match token {
        None => FrameRef::Request { id, body },
        Some(token) => FrameRef::AuthRequest { id, token, body },
    };
    Ok(EncodedFrame {
        head: postcard::to_stdvec(&frame)?,
        tail: body
            .bulk()
            .map(|bulk| bulk.bytes().clone())
            .unwrap_or_default(),
    })
}

/// Deserializes a frame's body, its bulk bytes copied out of it (for tools, the fuzz
/// target and tests; connections use `decode_frame_shared`). Bytes after the message
/// are an error unless they are the bulk bytes it announced.
pub fn decode_frame(body: &[u8]) -> Result<Frame, ProtoError> {
    decode_with(body, |start| Bytes::copy_from_slice(&body[start..]))
}

/// Deserializes a received frame's body; its bulk bytes are a slice of `body`, not a
/// copy. Bytes after the message are an error unless they are the bulk bytes it
/// announced.
pub fn decode_frame_shared(body: &Bytes) -> Result<Frame, ProtoError> {
    decode_with(body, |start| body.slice(start..))
}

/// Decodes the message at the start of `body`; `tail(start)` gives the bytes from
/// `start` on, which are the message's bulk bytes.
fn decode_with(body: &[u8], tail: impl FnOnce(usize) -> Bytes) -> Result<Frame, ProtoError> {
    let (mut frame, rest) = postcard::take_from_bytes::<Frame>(body)?;
    let start = body.len() - rest.len();
    match frame.bulk_mut() {
        Some(bulk) => bulk.attach(rest.len(), || tail(start))?,
        None if rest.is_empty() => {}
        None => return Err(ProtoError::Decode(postcard::Error::DeserializeBadEncoding)),
    }
    Ok(frame)
}

/// Decodes a whole byte stream of frames (for the fuzz target and tests): returns the
/// frames decoded before the first error or the end of complete frames.
pub fn decode_stream(bytes: &[u8], frame_bytes_max: usize) -> Result<Vec<Frame>, ProtoError> {
    let mut codec = FrameCodec::new(frame_bytes_max);
    let mut buffer = BytesMut::from(bytes);
    let mut frames = Vec::new();
    while let Some(body) = codec.decode(&mut buffer)? {
        frames.push(decode_frame(&body)?);
    }
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::RequestId;
    use crate::message::Request;

    fn roundtrip(frame: &Frame) -> Frame {
        let body = encode_frame(frame).unwrap();
        let mut buf = BytesMut::new();
        FrameCodec::default().encode(&body[..], &mut buf).unwrap();
        let mut codec = FrameCodec::default();
        let decoded = codec.decode(&mut buf).unwrap().unwrap();
        assert!(buf.is_empty());
        decode_frame(&decoded).unwrap()
    }

    #[test]
    fn ping_roundtrip() {
        let frame = Frame::Request {
            id: RequestId(7),
            body: Request::Ping,
        };
        assert_eq!(roundtrip(&frame), frame);
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let body = encode_frame(&Frame::Request {
            id: RequestId(1),
            body: Request::Ping,
        })
        .unwrap();
        let mut full = BytesMut::new();
        FrameCodec::default().encode(&body[..], &mut full).unwrap();
        let mut codec = FrameCodec::default();
        for cut in 0..full.len() {
            let mut partial = BytesMut::from(&full[..cut]);
            assert!(codec.decode(&mut partial).unwrap().is_none(), "cut {cut}");
        }
    }

    #[test]
    fn oversized_frame_is_refused_before_buffering() {
        let mut buf = BytesMut::new();
        buf.put_u32_le(1 << 30);
        buf.put_u32_le(0);
        let err = FrameCodec::new(1024).decode(&mut buf).unwrap_err();
        assert!(
            matches!(err, ProtoError::FrameTooLarge { length, limit: 1024 } if length == 1 << 30)
        );
    }

    fn bulk_reply(data: &'static [u8]) -> Frame {
        use crate::message::{FileKind, Response, VnodeStatus};
        let fid = crate::ids::Fid::root(crate::ids::VolumeId(1));
        let stamp = crate::time::Timestamp { secs: 0, nanos: 0 };
        Frame::Response {
            id: RequestId(3),
            body: Ok(Response::DataBulk {
                status: VnodeStatus {
                    fid,
                    kind: FileKind::File,
                    mode: 0o644,
                    link_count: 1,
                    size: data.len() as u64,
                    data_version: crate::ids::DataVersion(2),
                    uid: 0,
                    gid: 0,
                    atime: stamp,
                    mtime: stamp,
                    ctime: stamp,
                },
                callback: None,
                data: crate::bulk::Bulk::new(Bytes::from_static(data)),
            }),
        }
    }

    #[test]
    fn a_bulk_tail_is_a_slice_of_the_received_body() {
        let frame = bulk_reply(b"raw bytes after the message");
        let encoded = encode_frame_parts(&frame).unwrap();
        assert_eq!(&encoded.tail[..], b"raw bytes after the message");
        let body = Bytes::from(encoded.to_vec());
        let decoded = decode_frame_shared(&body).unwrap();
        assert_eq!(decoded, frame);
        let tail = decoded.bulk().unwrap().bytes();
        assert_eq!(
            tail.as_ptr(),
            body[encoded.head.len()..].as_ptr(),
            "not copied"
        );
        assert_eq!(decode_frame(&body).unwrap(), frame);
    }

    #[test]
    fn a_tail_of_another_length_than_announced_is_refused() {
        let encoded = encode_frame_parts(&bulk_reply(b"abcdef")).unwrap();
        let whole = encoded.to_vec();
        // Short by one, or one too many.
        assert!(decode_frame(&whole[..whole.len() - 1]).is_err());
        let mut longer = whole.clone();
        longer.push(0);
        assert!(decode_frame(&longer).is_err());
        // A message without a bulk field takes no tail at all.
        let mut ping = encode_frame(&Frame::Request {
            id: RequestId(1),
            body: Request::Ping,
        })
        .unwrap();
        ping.push(0);
        assert!(decode_frame(&ping).is_err());
    }

    #[test]
    fn an_encoded_frame_checksums_head_and_tail_together() {
        let encoded = encode_frame_parts(&bulk_reply(b"tail")).unwrap();
        assert_eq!(encoded.checksum(), crc32c::crc32c(&encoded.to_vec()));
        assert_eq!(encoded.len(), encoded.to_vec().len());
    }

    #[test]
    fn corrupted_body_fails_checksum() {
        let body = encode_frame(&Frame::Request {
            id: RequestId(1),
            body: Request::Ping,
        })
        .unwrap();
        let mut buf = BytesMut::new();
        FrameCodec::default().encode(&body[..], &mut buf).unwrap();
        let last = buf.len() - 1;
        buf[last] ^= 0xff;
        assert!(matches!(
            FrameCodec::default().decode(&mut buf),
            Err(ProtoError::Checksum { .. })
        ));
    }
}
