//! The Holdfast cache manager: the AFS-style client that mounts a cell with FUSE and
//! answers from status and data cached under callback promises (`docs/cache-manager.md`).
//! Invariant: cached status and data are served only while a callback or the data version
//! says they are current, and a close succeeds only once its writes are durable.

pub mod chunk_index;
pub mod chunk_store;
pub mod control;
mod control_server;
pub mod error;
#[cfg(test)]
mod fake_cell;
pub mod figures;
mod fuse_fs;
pub mod held_locks;
pub mod identity;
pub mod inode;
pub mod invalidate;
pub mod listing;
pub mod lock_waits;
mod manager;
pub mod mount;
pub mod mount_access;
pub mod mountinfo;
pub mod passthrough;
pub mod readahead;
pub mod rights;
pub mod server_pool;
mod spare_files;
pub mod status;
pub mod tokens;
pub mod volume;

use std::path::PathBuf;
use std::time::Duration;

use proto::{CellConfig, Transport, VolumeName};

pub use control::{
    fs_checkservers, fs_counters, fs_examine, fs_flush, fs_lsmount, fs_mkmount, fs_whereis,
};
pub use error::CacheError;
pub use mount::run;

/// Default size of the chunk cache.
pub const CACHE_BYTES_MAX_DEFAULT: u64 = 1 << 30;
/// Default deadline of every RPC to a fileserver or the VLDB.
pub const RPC_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// Default time a call to a fileserver pair keeps trying its members before failing.
pub const FAILOVER_TIMEOUT_DEFAULT: Duration = Duration::from_secs(60);
/// Default interval of lease renewals while a lock is held or awaited: a third of the
/// fileservers' default 30 s lease, so two renewals can be lost before it lapses.
pub const LEASE_RENEW_INTERVAL_DEFAULT: Duration = Duration::from_secs(10);
/// The volume a mount shows at its root unless told otherwise.
pub const ROOT_VOLUME_DEFAULT: &str = "root.cell";

/// What a mount needs.
#[derive(Clone, Debug)]
pub struct Config {
    pub cell: CellConfig,
    /// How it reaches the servers: mutual TLS with the host's certificate.
    pub transport: Transport,
    /// Holds `client.id`, `chunks/` and `control.sock`.
    pub cache_dir: PathBuf,
    pub mountpoint: PathBuf,
    pub root_volume: VolumeName,
    pub cache_bytes_max: u64,
    pub rpc_timeout: Duration,
    /// How long a call to a fileserver pair keeps trying its members (a failover)
    /// before it fails; a single server gets one attempt within `rpc_timeout`.
    pub failover_timeout: Duration,
    /// How often the lock lease is renewed on servers where a lock is held or awaited;
    /// keep it well under the servers' lease (a third of it).
    pub lease_renew_interval: Duration,
    /// Mount over the empty read-only tmpfs `holdfast up` keeps at the mount point (its
    /// guard: while no cache manager serves the mount, nothing lands on local disk)
    /// instead of on a bare empty directory.
    pub over_guard: bool,
    /// Status entries kept for files the kernel no longer holds (AFS's `afsd -stat`);
    /// listings and idle inode numbers are bounded in proportion (`TableBudget`).
    pub status_entries_max: usize,
    /// Whether cached files are handed to the kernel for passthrough reads.
    pub passthrough: passthrough::PassthroughMode,
    /// Who may use the mount.
    pub access: mount_access::MountAccess,
}

impl Config {
    /// A config with the defaults: `root.cell`, 1 GiB of cache, 10 s RPC timeout, 60 s
    /// failover timeout, lease renewed every 10 s.
    pub fn new(
        cell: CellConfig,
        transport: Transport,
        cache_dir: PathBuf,
        mountpoint: PathBuf,
    ) -> Config {
        Config {
            cell,
            transport,
            cache_dir,
            mountpoint,
            root_volume: default_root_volume(),
            cache_bytes_max: CACHE_BYTES_MAX_DEFAULT,
            rpc_timeout: RPC_TIMEOUT_DEFAULT,
            failover_timeout: FAILOVER_TIMEOUT_DEFAULT,
            lease_renew_interval: LEASE_RENEW_INTERVAL_DEFAULT,
            over_guard: false,
            status_entries_max: status::STATUS_ENTRIES_MAX_DEFAULT,
            passthrough: passthrough::PassthroughMode::Auto,
            access: mount_access::MountAccess::Auto,
        }
    }
}

fn default_root_volume() -> VolumeName {
    match VolumeName::parse(ROOT_VOLUME_DEFAULT) {
        Ok(name) => name,
        Err(_) => unreachable!("the default root volume name is valid"),
    }
}
