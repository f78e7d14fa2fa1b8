//! The `access` figure of the identity suite: what the fileserver's access checks cost
//! 4 KiB creates through a mount, and what a token adds to a request.
//! Invariant: each figure is a ratio or difference against a baseline measured in the
//! same run; the cells it starts are stopped when it ends.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use proto::rpc::{self, Limits};
use proto::{Hello, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN, PeerKind, Request, Response};

use crate::cell::{LocalCell, Servers, ensure_root_volume};

/// The figure's name for `--figure`.
pub const FIGURE: &str = "access";

/// Pings per measured block, with and without a token in turn.
const PINGS_PER_BLOCK: usize = 500;
/// Pairs of blocks: the figure is the median of their differences, so that a burst of
/// load on the machine spoils one pair, not the figure.
const BLOCKS: usize = 21;

/// Prints the figures for a cell in `dir` with `files` creates per measurement.
pub fn run(dir: &Path, files: usize) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let unchecked = creates(
        &dir.join("unchecked"),
        files,
        &["--bench-skip-access-checks"],
        &runtime,
    )?;
    let checked = creates(&dir.join("checked"), files, &[], &runtime)?;
    let (without, added) = ping_costs(&dir.join("pings"), &runtime)?;
    println!("holdfast bench: identity (access), {files} files of 4 KiB");
    println!("{:<52} {:>12}  target", "figure", "value");
    println!(
        "{:<52} {:>10.0}/s",
        "creates, access checks skipped (baseline)", unchecked
    );
    println!("{:<52} {:>10.0}/s", "creates, access checks made", checked);
    println!(
        "{:<52} {:>12.2}  >= 0.9",
        "creates with checks / without",
        checked / unchecked
    );
    println!(
        "{:<52} {:>9.1} µs",
        "Ping without a token (baseline)",
        micros(without)
    );
    println!(
        "{:<52} {:>9.1} µs  <= 5 µs",
        "token added per request (median of pairs)",
        micros(added)
    );
    Ok(())
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Creates per second through a mount of a cell whose fileserver runs with `flags`.
fn creates(
    dir: &Path,
    files: usize,
    flags: &[&str],
    runtime: &tokio::runtime::Runtime,
) -> Result<f64> {
    let mut cell = LocalCell::start(dir, "bench.holdfast", Servers::None, runtime)?;
    cell.fs_address = cell.start_fileserver("fileserver", "127.0.0.1:0", flags)?;
    let admin = cell.admin_token()?;
    runtime.block_on(ensure_root_volume(
        &cell.cell,
        &cell.transport,
        &cell.fs_address,
        &admin,
    ))?;
    let mount = dir.join("mnt");
    cell.mount("mount", &mount, &dir.join("cache"), &[])?;
    let rate = super::create_files(&mount.join("creates"), files)?;
    cell.check_children()?;
    Ok(rate)
}

/// The median time of a `Ping` on one connection without a token, and the median of
/// what a token added, from adjacent blocks of each, so the machine's drift falls on
/// both alike.
fn ping_costs(dir: &Path, runtime: &tokio::runtime::Runtime) -> Result<(Duration, Duration)> {
    let mut cell = LocalCell::start(dir, "bench.holdfast", Servers::None, runtime)?;
    cell.fs_address = cell.start_fileserver("fileserver", "127.0.0.1:0", &[])?;
    let token = cell.admin_token()?;
    let hello = Hello {
        version_min: PROTOCOL_VERSION_MIN,
        version_max: PROTOCOL_VERSION_MAX,
        cell: cell.cell.name.clone(),
        peer: PeerKind::Admin,
    };
    runtime.block_on(async {
        let (connection, _, _) =
            rpc::connect(&cell.fs_address, hello, &Limits::default(), &cell.transport)
                .await
                .context("connect to the fileserver")?;
        let timeout = Duration::from_secs(5);
        let (mut without, mut added) = (Vec::new(), Vec::new());
        for block in 0..=BLOCKS {
            let mut pair = [0.0f64; 2];
            for (slot, token) in [None, Some(&token)].into_iter().enumerate() {
                let started = Instant::now();
                for _ in 0..PINGS_PER_BLOCK {
                    match connection.try_call_as(token, &Request::Ping, timeout).await {
                        Ok(Ok(Response::Pong)) => {}
                        other => bail!("Ping answered {other:?}"),
                    }
                }
                pair[slot] = started.elapsed().as_secs_f64() / PINGS_PER_BLOCK as f64;
            }
            // The first pair warms the connection and the token's verification.
            if block > 0 {
                without.push(pair[0]);
                added.push(pair[1] - pair[0]);
            }
        }
        connection.close();
        Ok((
            Duration::from_secs_f64(median(&mut without)),
            Duration::from_secs_f64(median(&mut added).max(0.0)),
        ))
    })
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
