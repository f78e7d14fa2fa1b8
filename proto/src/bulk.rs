//! `Bulk`: a message's bulk bytes (a fetch's reply, a store's data), carried raw as the
//! tail of its frame after the encoded message (protocol version 4); `bulk_messages`
//! says which messages have them.
//! Invariant: the encoded message holds the bytes' length only, and a decoded `Bulk`
//! takes its frame's tail only if it is exactly that long.

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::ProtoError;

/// Bytes that travel as the raw tail of their frame: the encoded message holds only
/// their length, so they are neither copied into the message on sending (the frame is
/// written as the message, then these bytes) nor out of it on receiving (they are a
/// slice of the received frame's buffer).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Bulk {
    bytes: Bytes,
    /// The length the encoded message announced: the bytes' length, except between
    /// decoding a frame's message and attaching its tail (`attach`).
    announced: u64,
}

impl Bulk {
    pub fn new(bytes: Bytes) -> Bulk {
        Bulk {
            announced: bytes.len() as u64,
            bytes,
        }
    }

    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Gives a decoded message its frame's tail: the `available` bytes after the
    /// message, taken by `tail` only if they are as many as announced.
    pub(crate) fn attach(
        &mut self,
        available: usize,
        tail: impl FnOnce() -> Bytes,
    ) -> Result<(), ProtoError> {
        if available as u64 != self.announced {
            return Err(ProtoError::Decode(postcard::Error::DeserializeBadEncoding));
        }
        self.bytes = tail();
        Ok(())
    }
}

impl From<Bytes> for Bulk {
    fn from(bytes: Bytes) -> Bulk {
        Bulk::new(bytes)
    }
}

impl From<Vec<u8>> for Bulk {
    fn from(bytes: Vec<u8>) -> Bulk {
        Bulk::new(Bytes::from(bytes))
    }
}

impl std::fmt::Debug for Bulk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bulk(<{} bytes>)", self.bytes.len())
    }
}

/// In the message: the length only (a varint); the bytes follow the message.
impl Serialize for Bulk {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(self.bytes.len() as u64)
    }
}

/// The announced length; the bytes are attached from the frame's tail.
impl<'de> Deserialize<'de> for Bulk {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Bulk, D::Error> {
        Ok(Bulk {
            bytes: Bytes::new(),
            announced: u64::deserialize(deserializer)?,
        })
    }
}
