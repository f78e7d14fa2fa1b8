//! The messages that carry bulk bytes (`Bulk`), where a frame's codec finds them, and how
//! they travel to a peer that speaks an older version.
//! Invariant: a frame holds at most one bulk field, and nothing with one is sent on a
//! connection below `PROTOCOL_VERSION_DATA_PATH` (it goes as the older message it stands
//! for).

use std::borrow::Cow;

use bytes::Bytes;

use crate::bulk::Bulk;
use crate::message::{
    CallbackGrant, Frame, PROTOCOL_VERSION_DATA_PATH, Request, Response, VnodeStatus,
};

impl Frame {
    /// The frame's bulk field, if its message has one.
    pub fn bulk(&self) -> Option<&Bulk> {
        match self {
            Frame::Request { body, .. } | Frame::AuthRequest { body, .. } => body.bulk(),
            Frame::Response { body: Ok(body), .. } => body.bulk(),
            _ => None,
        }
    }

    pub(crate) fn bulk_mut(&mut self) -> Option<&mut Bulk> {
        match self {
            Frame::Request { body, .. } | Frame::AuthRequest { body, .. } => body.bulk_mut(),
            Frame::Response { body: Ok(body), .. } => body.bulk_mut(),
            _ => None,
        }
    }
}

impl Request {
    /// The request's bulk field, if it has one.
    pub fn bulk(&self) -> Option<&Bulk> {
        match self {
            Request::StoreDataBulk { data, .. } => Some(data),
            Request::Sequenced { request, .. } => request.bulk(),
            _ => None,
        }
    }

    fn bulk_mut(&mut self) -> Option<&mut Bulk> {
        match self {
            Request::StoreDataBulk { data, .. } => Some(data),
            Request::Sequenced { request, .. } => request.bulk_mut(),
            _ => None,
        }
    }

    /// This request as it goes to a peer speaking `version`: before version 4 a
    /// `StoreDataBulk` goes as the `StoreDataIf` it stands for, its bytes copied into
    /// the message (which that version's peer still decodes whole).
    pub fn as_sent_to(&self, version: u16) -> Cow<'_, Request> {
        if version >= PROTOCOL_VERSION_DATA_PATH || self.bulk().is_none() {
            return Cow::Borrowed(self);
        }
        Cow::Owned(self.clone().without_bulk())
    }

    fn without_bulk(self) -> Request {
        match self {
            Request::StoreDataBulk {
                fid,
                offset,
                base,
                write_back,
                data,
            } => Request::StoreDataIf {
                fid,
                offset,
                data: data.bytes().to_vec(),
                base,
                write_back,
            },
            Request::Sequenced { seq, request } => Request::Sequenced {
                seq,
                request: Box::new(request.without_bulk()),
            },
            other => other,
        }
    }
}

/// A fetch's answer, as the client takes it from `Response::DataBulk` or, from a peer
/// older than version 4, `Response::Data`.
#[derive(Clone, Debug, PartialEq)]
pub struct Fetched {
    pub status: VnodeStatus,
    pub callback: Option<CallbackGrant>,
    pub data: Bytes,
}

impl Response {
    /// The response's bulk field, if it has one.
    pub fn bulk(&self) -> Option<&Bulk> {
        match self {
            Response::DataBulk { data, .. } => Some(data),
            _ => None,
        }
    }

    fn bulk_mut(&mut self) -> Option<&mut Bulk> {
        match self {
            Response::DataBulk { data, .. } => Some(data),
            _ => None,
        }
    }

    /// This response as it goes to a peer speaking `version`: before version 4 a
    /// `DataBulk` goes as `Data`, its bytes copied into the message, and as that
    /// version decodes a `Data` (`Response::for_version`).
    pub fn as_sent_to(self, version: u16) -> Response {
        match self {
            Response::DataBulk {
                status,
                callback,
                data,
            } if version < PROTOCOL_VERSION_DATA_PATH => Response::Data {
                status,
                callback,
                data: data.bytes().to_vec(),
            }
            .for_version(version),
            other => other,
        }
    }

    /// The answer to a `FetchData`, in either of its shapes; any other response is
    /// handed back.
    pub fn into_fetched(self) -> Result<Fetched, Box<Response>> {
        match self {
            Response::DataBulk {
                status,
                callback,
                data,
            } => Ok(Fetched {
                status,
                callback,
                data: data.into_bytes(),
            }),
            Response::Data {
                status,
                callback,
                data,
            } => Ok(Fetched {
                status,
                callback,
                data: Bytes::from(data),
            }),
            other => Err(Box::new(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{DataVersion, Fid, WriteBackId};

    fn store(data: &'static [u8]) -> Request {
        Request::StoreDataBulk {
            fid: Fid::root(crate::ids::VolumeId(1)),
            offset: 7,
            base: DataVersion(3),
            write_back: WriteBackId(2),
            data: Bulk::new(Bytes::from_static(data)),
        }
    }

    #[test]
    fn a_bulk_store_goes_to_an_older_peer_as_the_conditional_store_it_stands_for() {
        let sequenced = Request::Sequenced {
            seq: 9,
            request: Box::new(store(b"abc")),
        };
        assert!(matches!(
            sequenced.as_sent_to(PROTOCOL_VERSION_DATA_PATH),
            Cow::Borrowed(_)
        ));
        let old = sequenced.as_sent_to(PROTOCOL_VERSION_DATA_PATH - 1);
        let Request::Sequenced { seq: 9, request } = old.as_ref() else {
            panic!("still sequenced: {old:?}");
        };
        assert!(
            matches!(request.as_ref(), Request::StoreDataIf { data, offset: 7, .. } if data == b"abc")
        );
        assert_eq!(old.bulk(), None);
    }
}
