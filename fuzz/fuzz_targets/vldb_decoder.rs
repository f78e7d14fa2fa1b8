//! Fuzzes what a VLDB replica decodes from its peers and its disk: Raft messages, log
//! entries and applied marks.
//! Invariant: no input panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vlserver::decode_untrusted(data);
});
