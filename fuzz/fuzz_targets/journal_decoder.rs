//! Feeds arbitrary bytes to the journal segment decoder, the snapshot decoder and the
//! replay of a record and of a snapshot payload, as a damaged disk would: they must return
//! errors, never panic, and never hand back a record that lies outside the bytes they were
//! given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use state::journal::{Recovered, RecoveredSnapshot};
use state::{Lsn, journaled};

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
    let as_record = Recovered {
        snapshot: None,
        records: vec![(Lsn(1), data.to_vec())],
    };
    let _ = journaled::replay(&as_record);
    let as_snapshot = Recovered {
        snapshot: Some(RecoveredSnapshot {
            lsn: Lsn(1),
            epoch: proto::Epoch(1),
            payload: data.to_vec(),
        }),
        records: Vec::new(),
    };
    let _ = journaled::replay(&as_snapshot);
});
