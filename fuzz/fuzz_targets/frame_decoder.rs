//! Feeds arbitrary bytes to the frame decoder and message decoder, as a hostile peer
//! would: they must return errors, never panic, and never buffer past the frame limit.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = proto::frame::decode_stream(data, 64 * 1024);
    let _ = proto::frame::decode_frame(data);
});
