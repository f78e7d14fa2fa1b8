//! Feeds arbitrary bytes to the journal segment decoder and the snapshot decoder, as a
//! damaged disk would: they must return errors, never panic, and never hand back a record
//! that lies outside the bytes they were given.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(scan) = state::journal::segment::scan_segment(data) {
        assert!(scan.valid_bytes as usize <= data.len());
        for record in &scan.records {
            assert!(record.payload.end <= data.len());
        }
    }
    if let Ok((header, payload)) = state::journal::snapshot::decode(data) {
        assert_eq!(header.payload_bytes, payload.len() as u64);
    }
});
