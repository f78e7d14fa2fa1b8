//! Feeds arbitrary bytes to the frame decoder and message decoder, as a hostile peer
//! would: they must return errors, never panic, and never buffer past the frame limit.
//! Bodies are decoded both as tools do (bulk bytes copied out) and as connections do
//! (bulk bytes a slice of the received body), which must agree.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = proto::frame::decode_stream(data, 64 * 1024);
    let copied = proto::frame::decode_frame(data);
    let shared = proto::frame::decode_frame_shared(&bytes::Bytes::copy_from_slice(data));
    match (copied, shared) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(_), Err(_)) => {}
        (a, b) => panic!("the two decoders disagree: {a:?} / {b:?}"),
    }
});
