//! Property tests: frames round-trip through the codec, with or without a raw bulk tail,
//! and arbitrary bytes never make the decoder panic or buffer past its limit.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use proto::frame::{
    FrameCodec, decode_frame, decode_frame_shared, decode_stream, encode_frame, encode_frame_parts,
};
use proto::message::{Frame, Request};
use proto::*;
use tokio_util::codec::{Decoder, Encoder};

fn arb_fid() -> impl Strategy<Value = Fid> {
    (any::<u64>(), any::<u64>(), any::<u32>()).prop_map(|(v, n, u)| Fid {
        volume: VolumeId(v),
        vnode: VnodeId(n),
        unique: Uniquifier(u),
    })
}

fn arb_request() -> impl Strategy<Value = Request> {
    prop_oneof![
        Just(Request::Ping),
        arb_fid().prop_map(|fid| Request::FetchStatus { fid }),
        (
            arb_fid(),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..512),
            any::<Option<u64>>()
        )
            .prop_map(|(fid, offset, data, truncate_to)| Request::StoreData {
                fid,
                offset,
                data,
                truncate_to
            }),
        (arb_fid(), ".{0,40}").prop_map(|(dir, name)| Request::Lookup { dir, name }),
        proptest::collection::vec(arb_fid(), 0..20)
            .prop_map(|fids| Request::BreakCallbacks { fids }),
    ]
}

fn arb_status() -> impl Strategy<Value = VnodeStatus> {
    (arb_fid(), any::<u64>(), any::<u64>()).prop_map(|(fid, size, version)| VnodeStatus {
        fid,
        kind: FileKind::File,
        mode: 0o600,
        link_count: 1,
        size,
        data_version: DataVersion(version),
        uid: 1,
        gid: 2,
        atime: Timestamp { secs: 1, nanos: 0 },
        mtime: Timestamp { secs: 2, nanos: 0 },
        ctime: Timestamp { secs: 3, nanos: 0 },
    })
}

/// Frames whose message has a bulk field: stores (plain, sequenced, with a token) and
/// fetch replies, with tails from empty to several KiB.
fn arb_bulk_frame() -> impl Strategy<Value = Frame> {
    let data = proptest::collection::vec(any::<u8>(), 0..8192).prop_map(Bulk::from);
    let store = (
        arb_fid(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        data.clone(),
    )
        .prop_map(
            |(fid, offset, base, write_back, data)| Request::StoreDataBulk {
                fid,
                offset,
                base: DataVersion(base),
                write_back: WriteBackId(write_back),
                data,
            },
        );
    let request = (store, any::<Option<u64>>()).prop_map(|(store, seq)| match seq {
        None => store,
        Some(seq) => Request::Sequenced {
            seq,
            request: Box::new(store),
        },
    });
    let request = request.boxed();
    let reply = (arb_status(), any::<Option<u64>>(), data).prop_map(|(status, lifetime, data)| {
        Response::DataBulk {
            status,
            callback: lifetime.map(|lifetime_ms| CallbackGrant { lifetime_ms }),
            data,
        }
    });
    prop_oneof![
        (any::<u64>(), request.clone()).prop_map(|(id, body)| Frame::Request {
            id: RequestId(id),
            body
        }),
        (
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..64),
            request
        )
            .prop_map(|(id, token, body)| Frame::AuthRequest {
                id: RequestId(id),
                token: SealedToken(token),
                body
            }),
        (any::<u64>(), reply).prop_map(|(id, body)| Frame::Response {
            id: RequestId(id),
            body: Ok(body)
        }),
    ]
}

proptest! {
    #[test]
    fn frames_with_raw_tails_roundtrip(frame in arb_bulk_frame(), cut in any::<prop::sample::Index>()) {
        let encoded = encode_frame_parts(&frame).unwrap();
        prop_assert_eq!(&encoded.tail, frame.bulk().unwrap().bytes());
        let mut wire = BytesMut::new();
        FrameCodec::default().encode(&encoded.to_vec()[..], &mut wire).unwrap();
        let body = FrameCodec::default().decode(&mut wire).unwrap().unwrap();
        let decoded = decode_frame_shared(&body).unwrap();
        // The tail is the received buffer's own bytes.
        let tail: &Bytes = decoded.bulk().unwrap().bytes();
        prop_assert_eq!(tail.as_ptr(), body[encoded.head.len()..].as_ptr());
        prop_assert_eq!(&decoded, &frame);
        prop_assert_eq!(decode_frame(&body).unwrap(), frame);
        // Any shorter body is refused: a tail shorter than announced, or a cut message.
        let short = cut.index(body.len().max(1));
        prop_assert!(decode_frame(&body[..short]).is_err());
    }

    #[test]
    fn frames_roundtrip(id in any::<u64>(), body in arb_request()) {
        let frame = Frame::Request { id: RequestId(id), body };
        let encoded = encode_frame(&frame).unwrap();
        let mut wire = BytesMut::new();
        FrameCodec::default().encode(&encoded[..], &mut wire).unwrap();
        let decoded_body = FrameCodec::default().decode(&mut wire).unwrap().unwrap();
        prop_assert_eq!(decode_frame(&decoded_body).unwrap(), frame);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode_stream(&bytes, 1024);
    }
}
