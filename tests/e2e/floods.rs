//! Servers bound what a peer can make them hold: idle and mid-frame floods from a test
//! client against a real fileserver and a real VLDB, with small limits: the caps hold,
//! frame memory stays within its budget and returns, WARN lines name the peer, and real
//! mounts keep working, a new one included.

use std::time::Duration;

use anyhow::{Context, Result};
use harness::TestCell;
use harness::flood::{await_memory_back, watch_peak_resident};
use harness::wait_until;
use proto::flood::{Flood, Stall};

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");
const PEER_CAP: usize = 48;
const FRAME_BYTES: usize = proto::frame::FRAME_BYTES_MAX_DEFAULT;
/// Small limits, so that the floods are quick: room for two largest frames, goodbyes to
/// idle connections after 4 s.
const LIMITS: &[&str] = &[
    "--connections-max",
    "96",
    "--connections-per-peer-max",
    "48",
    "--frame-memory-mib",
    "8",
    "--idle-timeout-secs",
    "4",
    "--hello-timeout-secs",
    "2",
    "--frame-timeout-secs",
    "4",
];
/// Hang guard for conditions awaited below.
const PATIENCE: Duration = Duration::from_secs(40);
/// What the stalled frames would hold without a budget: 20 frames of 4 MiB.
const STALLED: usize = 20;
/// Above the baseline, the peak may hold the frame budget (8 MiB), the connections at
/// the caps and the allocator's slack, far below the 80 MiB of the stalled frames.
const PEAK_ABOVE_BASELINE_MAX: u64 = 32 << 20;

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start a runtime")
}

/// Floods `process` (listening at `address`) with idle connections, then with frames
/// stalled half-way, while `mounted` keeps working and a new mount lists the root; checks
/// the caps, the memory and the WARN lines.
fn flood_and_check(cell: &mut TestCell, process: &str, address: &str) -> Result<()> {
    let runtime = runtime()?;
    let mounted = cell.mount("m1", &[])?;
    std::fs::write(mounted.join("before"), b"before the flood\n")?;
    let baseline = cell.settled_resident_bytes(process)?;
    let peak = watch_peak_resident(cell, process)?;

    // Ten times the cap of idle connections: each newcomer takes an idle one's place.
    let mut flood = Flood::new(cell.transport.clone());
    let opened = runtime.block_on(flood.open(address, "e2e.test", PEER_CAP * 10, Stall::Idle, 16));
    assert_eq!(opened.established, PEER_CAP * 10, "{opened:?}");
    assert!(
        wait_until(PATIENCE, || flood.open_now() <= PEER_CAP),
        "{} flood connections still open; the cap from one address is {PEER_CAP}",
        flood.open_now()
    );
    // The mount in use and a new one work meanwhile.
    std::fs::write(mounted.join("during"), b"during the flood\n")?;
    let fresh = cell.mount("m2", &[])?;
    let listed: Vec<String> = std::fs::read_dir(&fresh)?
        .map(|entry| Ok(entry?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    assert!(listed.contains(&"during".to_owned()), "{listed:?}");

    // Frames stalled just short of their end: only the budget's worth is held.
    let stall = Stall::InsideFrame {
        declared: FRAME_BYTES,
        sent: FRAME_BYTES - 1,
    };
    let mut stalled = Flood::new(cell.transport.clone());
    let opened = runtime.block_on(stalled.open(address, "e2e.test", STALLED, stall, STALLED));
    assert_eq!(opened.established, STALLED, "{opened:?}");
    assert_eq!(std::fs::read(fresh.join("before"))?, b"before the flood\n");
    // Each is closed: evicted for others waiting, or at its frame timeout.
    assert!(
        wait_until(PATIENCE, || stalled.open_now() == 0),
        "{} stalled connections still open",
        stalled.open_now()
    );
    runtime.block_on(stalled.close());
    runtime.block_on(flood.close());
    let peak = peak.stop();
    assert!(
        peak <= baseline + PEAK_ABOVE_BASELINE_MAX,
        "{process} peaked at {} KiB over a baseline of {} KiB",
        peak >> 10,
        baseline >> 10
    );
    await_memory_back(cell, process, baseline, 10, PATIENCE)?;

    // Goodbyes to idle connections are not warnings, and a mount idle past the timeout
    // simply reconnects.
    let mut idle = Flood::new(cell.transport.clone());
    runtime.block_on(idle.open(address, "e2e.test", 4, Stall::Idle, 4));
    assert!(wait_until(PATIENCE, || idle.open_now() == 0));
    runtime.block_on(idle.close());
    std::fs::write(mounted.join("after"), b"after the idle timeout\n")?;
    assert_eq!(
        std::fs::read(fresh.join("after"))?,
        b"after the idle timeout\n"
    );

    let evicted = cell.warnings_about(process, "127.0.0.1", "to make room");
    let stalled = cell.warnings_about(process, "127.0.0.1", "frame");
    assert!(
        !evicted.is_empty(),
        "no eviction WARN line:\n{}",
        cell.log(process)
    );
    assert!(
        !stalled.is_empty(),
        "no stalled-frame WARN line:\n{}",
        cell.log(process)
    );
    // Rate-limited: hundreds of evictions, a handful of lines.
    assert!(evicted.len() < 20, "{} eviction lines", evicted.len());
    assert!(cell.warnings_about(process, "", "idle").is_empty());
    Ok(())
}

#[test]
fn a_flooded_fileserver_holds_its_limits_and_serves_on() -> Result<()> {
    let mut cell = TestCell::start_with_flags(BIN, &[], LIMITS)?;
    let address = cell.fs_address.clone();
    flood_and_check(&mut cell, "fileserver", &address)
}

#[test]
fn a_flooded_vldb_holds_its_limits_and_serves_on() -> Result<()> {
    let mut cell = TestCell::start_with_flags(BIN, LIMITS, &[])?;
    let address = cell.vl_address.clone();
    flood_and_check(&mut cell, "vlserver", &address)
}
