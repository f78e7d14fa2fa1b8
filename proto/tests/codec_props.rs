//! Property tests: frames round-trip through the codec, and arbitrary bytes never make
//! the decoder panic or buffer past its limit.

use bytes::BytesMut;
use proptest::prelude::*;
use proto::frame::{FrameCodec, decode_frame, decode_stream, encode_frame};
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

proptest! {
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
