//! Big files through two mounts: a file written and closed on one is read cold on the
//! other with every byte exact, and the mount's raised readahead makes the kernel ask for
//! a sequential reader's pages a whole chunk at a time, not in 128 KiB requests.

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use harness::TestCell;

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");

/// A chunk is 1 MiB; several, and a tail, so the reader runs past the readahead window.
const FILE_BYTES: usize = (24 << 20) + 4321;

fn content(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251) as u8 ^ (i >> 20) as u8)
        .collect()
}

/// The count of one `fuse OP` row of `holdfast fs counters` on `mount`.
fn fuse_count(cell: &TestCell, mount: &Path, op: &str) -> u64 {
    let output = cell
        .holdfast(&["fs", "counters", &mount.to_string_lossy()])
        .unwrap();
    assert!(output.status.success(), "fs counters: {output:?}");
    let text = String::from_utf8_lossy(&output.stdout);
    let row = format!("fuse {op} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&row))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|count| count.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_big_file_written_on_one_mount_reads_cold_and_exact_on_the_other_in_whole_chunks() {
    let mut cell = TestCell::start(BIN).unwrap();
    let a = cell.mount("ws-a", &[]).unwrap();
    let b = cell.mount("ws-b", &["--passthrough", "off"]).unwrap();
    let device = std::fs::metadata(&b).unwrap().dev();
    let read_ahead = std::fs::read_to_string(format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(device),
        libc::minor(device)
    ))
    .unwrap();
    assert_eq!(
        read_ahead.trim(),
        "4096",
        "the mount's readahead is four chunks"
    );

    let data = content(FILE_BYTES);
    let mut file = std::fs::File::create(a.join("big")).unwrap();
    for piece in data.chunks(1 << 20) {
        file.write_all(piece).unwrap();
    }
    file.sync_all().unwrap();
    drop(file);

    let reads_before = fuse_count(&cell, &b, "read");
    let mut read = Vec::with_capacity(FILE_BYTES);
    let mut file = std::fs::File::open(b.join("big")).unwrap();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).unwrap();
        if n == 0 {
            break;
        }
        read.extend_from_slice(&buffer[..n]);
    }
    assert!(read == data, "the cold read returns every byte written");
    let reads = fuse_count(&cell, &b, "read") - reads_before;
    // 25 chunks; in 128 KiB requests they would take 193.
    let chunks = FILE_BYTES.div_ceil(1 << 20) as u64;
    assert!(
        reads <= 2 * chunks,
        "{reads} FUSE reads for {chunks} chunks: the readahead was not raised"
    );
}
