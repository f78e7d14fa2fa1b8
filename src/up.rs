//! `holdfast up`: a whole local cell in one command (three VLDB replicas, a fileserver
//! pair, `root.cell` and a mount at DIR/mnt), until SIGINT or SIGTERM.
//! Invariant: however it ends (a signal, a component that died, an error), everything it
//! started is unmounted and stopped.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::cell::{LocalCell, Servers};

pub fn run(dir: &Path, cell_name: &str) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let mut shutdown = runtime.block_on(async { crate::process::shutdown_on_signals() })?;
    let mut cell = LocalCell::start(dir, cell_name, Servers::Pair, &runtime)?;
    let mountpoint = cell.layout.dir.join("mnt");
    let cache = cell.layout.dir.join("cache");
    cell.mount("mount", &mountpoint, &cache, &[])?;

    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("holdfast"));
    let second = cell.layout.dir.join("ws2");
    println!(
        "Holdfast cell '{name}' is up.\n\
         \x20 mount:       {mnt}\n\
         \x20 cell file:   {cellfile}\n\
         \x20 VLDB:        {vl}\n\
         \x20 fileservers: pair '{pair}', {members} (partition {partition})\n\
         \x20 logs:        {logs}\n\
         \n\
         A second workstation on this machine (its own cache, same cell):\n\
         \x20 mkdir -p {second}/mnt && {exe} mount --cell {cellfile} --cache {second}/cache {second}/mnt\n\
         Administer volumes:  HOLDFAST_CELL={cellfile} {exe} vos listvldb\n\
         The pair:            HOLDFAST_CELL={cellfile} {exe} pair status {pair}\n\
         The VLDB group:      HOLDFAST_CELL={cellfile} {exe} vldb status\n\
         Try a failover: kill -9 the active member's pid; the mount stalls\n\
         for a moment and carries on, and the killed member is started again as passive.\n\
         Kill -9 any one VLDB replica (the leader too): nothing stops, and it is started again.\n\
         \n\
         Press Ctrl-C to unmount and stop the cell.",
        name = cell.cell.name,
        mnt = mountpoint.display(),
        cellfile = cell.layout.cell_file.display(),
        vl = cell
            .replicas
            .iter()
            .map(|(id, address)| {
                let pid = cell
                    .pid(&crate::cell::replica_name(*id))
                    .unwrap_or_default();
                format!("replica {id} {address} pid {pid}")
            })
            .collect::<Vec<_>>()
            .join(", "),
        pair = crate::cell::PAIR,
        members = cell
            .members
            .iter()
            .map(|(name, address)| {
                let pid = cell.pid(name).unwrap_or_default();
                format!("{name} {address} pid {pid}")
            })
            .collect::<Vec<_>>()
            .join(", "),
        partition = cell.layout.partition.display(),
        logs = cell.layout.logs.display(),
        second = second.display(),
        exe = exe.display(),
    );

    // Run until a signal, or until a component dies on its own.
    loop {
        let stop = runtime.block_on(async {
            tokio::time::timeout(Duration::from_millis(250), shutdown.wait_for(|stop| *stop))
                .await
                .is_ok()
        });
        if stop {
            println!("Stopping the cell...");
            drop(cell);
            println!("Stopped; the data stays in {}.", dir.display());
            return Ok(());
        }
        cell.restart_exited_replicas()?;
        cell.restart_exited_members(&runtime)?;
        cell.check_children()?;
    }
}
