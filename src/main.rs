//! `holdfast`, the one binary: a subcommand parses its flags, sets up logging, binds what
//! it serves on and calls a library crate; `up` and `bench` run the others as children.
//! Invariant: a failure ends the process with one line, `holdfast: <what>: <cause>`, and
//! exit status 1.

mod acl;
mod bench;
mod cell;
mod cell_admin;
mod cell_init;
mod guard;
mod login;
mod process;
mod pts;
mod tokens;
mod up;
mod vldb;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use proto::{CellConfig, PeerClass, Transport};
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(
    name = "holdfast",
    version,
    about = "Holdfast: a callback-coherent distributed filesystem in the AFS style",
    long_about = None
)]
struct Cli {
    /// The cell file (TOML: name, vlservers, credentials). Defaults to $HOLDFAST_CELL.
    #[arg(long, global = true, value_name = "FILE")]
    cell: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a whole local cell: three VLDB replicas, a fileserver pair, the root volume and a mount at DIR/mnt.
    ///
    /// Writes DIR/cell.toml, prints how to add a second mount, and runs until SIGINT or
    /// SIGTERM, then unmounts and stops everything it started. A process of the cell that
    /// dies is started again (with a growing delay if it keeps dying); meanwhile the
    /// mount point fails (EROFS) rather than take files onto local disk. Running it again
    /// on the same DIR keeps the data and the addresses, so the cell file stays valid.
    Up {
        /// Where the cell keeps its data, cache, cell file and mount point.
        #[arg(long, default_value = "holdfast-cell")]
        dir: PathBuf,
        /// The cell's name (used when DIR has no cell file yet).
        #[arg(long, default_value = "local.holdfast")]
        cell_name: String,
        /// Write the mount point's path to this file once the cell is up.
        #[arg(long, value_name = "FILE")]
        ready_file: Option<PathBuf>,
    },
    /// Run the volume location server (VLDB).
    Vlserver {
        /// Directory of the VLDB's database.
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// Address to listen on (use 127.0.0.1:0 for an ephemeral port).
        #[arg(long, value_name = "ADDR")]
        listen: String,
        /// The cell's name; defaults to the name in the cell file.
        #[arg(long)]
        cell_name: Option<String>,
        /// Write the bound address to this file once listening.
        #[arg(long, value_name = "FILE")]
        ready_file: Option<PathBuf>,
        /// This replica's id in --peers (a group of one is id 1).
        #[arg(long, value_name = "N", default_value_t = 1)]
        id: u64,
        /// The VLDB group's replicas as ID=ADDR,ID=ADDR,... (three or five). The lowest id
        /// bootstraps the group the first time; starting again with the same list is a
        /// no-op, and another list is refused (use `holdfast vldb add`/`remove`).
        /// Without it, the VLDB is a group of one at the address it listens on.
        #[arg(long, value_name = "ID=ADDR,...", value_parser = parse_peers, requires = "id")]
        peers: Option<BTreeMap<u64, String>>,
        /// The cell's token-signing key (32 bytes, raw or as 64 hex digits; mode 0600;
        /// default: `token.key` in the credentials directory). The VLDB issues tokens
        /// with it (`holdfast login`); every replica needs the same key.
        #[arg(long, value_name = "FILE")]
        token_key: Option<PathBuf>,
        /// The cell's credentials directory (server.pem, server.key, ca.pem); defaults to
        /// the cell file's.
        #[arg(long, value_name = "DIR")]
        credentials: Option<PathBuf>,
        #[command(flatten)]
        peer_limits: PeerLimitFlags,
    },
    /// Run a fileserver on a partition directory; it registers with the cell's VLDB.
    Fileserver {
        /// Directory holding the server's volumes.
        #[arg(long, value_name = "DIR")]
        partition: PathBuf,
        /// Address to listen on (use 127.0.0.1:0 for an ephemeral port).
        #[arg(long, value_name = "ADDR")]
        listen: String,
        /// Address clients should use, registered in the VLDB (default: the bound address).
        #[arg(long, value_name = "ADDR")]
        advertise: Option<String>,
        /// Most callback promises held at once.
        #[arg(long, default_value_t = 1_000_000)]
        callback_count_max: usize,
        /// When callback and lock records are durable: `sync` (before the reply),
        /// `group` (locks before the reply, callbacks within a short delay) or `none`
        /// (only a snapshot at clean shutdown).
        #[arg(long, default_value = "sync")]
        journal_mode: state::JournalMode,
        /// Seconds a client's locks outlive its last request.
        #[arg(long, default_value_t = 30.0)]
        lease_secs: f64,
        /// Seconds of grace after a restart for lock reclaims (default: one lease).
        #[arg(long)]
        grace_secs: Option<f64>,
        /// Write the bound address to this file once listening.
        #[arg(long, value_name = "FILE")]
        ready_file: Option<PathBuf>,
        /// Serve as a member of the fileserver pair NAME: the partner runs on the same
        /// partition, the one holding the pair's lease in the VLDB serves, the other
        /// takes over when that lease runs out (or on `holdfast pair switchover`).
        #[arg(long, value_name = "NAME")]
        pair: Option<String>,
        /// Milliseconds of the pair lease: renewed every quarter of it; a member that
        /// cannot renew stops serving a fifth of it before the lease ends.
        #[arg(long, value_name = "N", default_value_t = 1000, requires = "pair")]
        pair_lease_ms: u64,
        /// Append a line per acknowledged change and per role change to FILE (an audit
        /// trail: `<unix micros> <epoch> <member> <what>`).
        #[arg(long, value_name = "FILE")]
        history: Option<PathBuf>,
        /// The cell's token key, to verify users' tokens (default:
        /// `credentials/token.key` beside the cell file).
        #[arg(long, value_name = "FILE")]
        token_key: Option<PathBuf>,
        /// Bench only: skip the access checks, to measure what they cost.
        #[arg(long, hide = true)]
        bench_skip_access_checks: bool,
        #[command(flatten)]
        peer_limits: PeerLimitFlags,
    },
    /// Mount the cell at MOUNTPOINT (foreground; unmounts cleanly on SIGINT/SIGTERM).
    Mount {
        /// The cache directory (status and chunk cache, client identity, control socket).
        #[arg(long, value_name = "DIR")]
        cache: PathBuf,
        /// Existing empty directory to mount on.
        mountpoint: PathBuf,
        /// The volume shown at the mount's root.
        #[arg(long, default_value = "root.cell")]
        root_volume: String,
        /// Cache size limit in MiB.
        #[arg(long, default_value_t = 1024)]
        cache_mib: u64,
        /// Seconds a fileserver may take to answer before a call fails.
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
        /// Seconds a call to a fileserver pair keeps trying its members (riding out a
        /// failover) before it fails.
        #[arg(long, value_name = "SECS", default_value_t = 60.0)]
        failover_timeout: f64,
        /// Write this file once the mount is live.
        #[arg(long, value_name = "FILE")]
        ready_file: Option<PathBuf>,
        /// Mount over the empty read-only tmpfs that `holdfast up` keeps on MOUNTPOINT
        /// (its guard: while no cache manager serves the mount, creating a file there
        /// fails with EROFS instead of landing on local disk).
        #[arg(long)]
        over_guard: bool,
        /// Status entries kept for files the kernel no longer holds (AFS's `afsd -stat`);
        /// cached listings and idle inode numbers are bounded in proportion.
        #[arg(long, value_name = "N", default_value_t = cachemgr::status::STATUS_ENTRIES_MAX_DEFAULT as u64,
              value_parser = clap::value_parser!(u64).range(1..=1 << 32))]
        stat_entries: u64,
        /// Hand wholly cached files to the kernel to read at local-disk speed (FUSE
        /// passthrough; needs CAP_SYS_ADMIN and Linux 6.9): auto, or off.
        #[arg(long, value_name = "MODE", default_value = "auto")]
        passthrough: cachemgr::passthrough::PassthroughMode,
        /// Who may use the mount: auto (every user where FUSE permits it: root, or
        /// user_allow_other in /etc/fuse.conf; else only you), all, or owner.
        #[arg(long, value_name = "WHO", default_value = "auto")]
        access: cachemgr::mount_access::MountAccess,
    },
    /// Talk to the cache manager of a mount: mount points, cache state, servers.
    Fs {
        #[command(subcommand)]
        command: FsCommand,
    },
    /// Administer volumes.
    Vos {
        #[command(subcommand)]
        command: VosCommand,
        /// Seconds to wait for a server before giving up.
        #[arg(long, global = true, default_value_t = 10.0)]
        timeout: f64,
        #[command(flatten)]
        auth: tokens::AuthFlags,
    },
    /// Users and groups (the protection database in the VLDB), as AFS's `pts`.
    Pts {
        #[command(subcommand)]
        command: pts::PtsCommand,
        /// Seconds to wait for the VLDB before giving up.
        #[arg(long, global = true, default_value_t = 10.0)]
        timeout: f64,
        #[command(flatten)]
        auth: tokens::AuthFlags,
    },
    /// Get a token for USER from the VLDB with USER's password, as AFS's `klog`/`aklog`.
    ///
    /// The password is the first line of --password-file, else typed at the terminal
    /// (without echo), else the first line of standard input. The token is kept in
    /// $HOLDFAST_TOKEN_DIR (default /tmp/holdfast-UID, mode 0700) and sent by `vos`,
    /// `pts`, `pair` and `vldb`; `holdfast tokens` lists it, `holdfast unlog` drops it.
    Login {
        user: String,
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
        /// Hours the token lives (at most the VLDB's maximum, 25 by default).
        #[arg(long, value_name = "HOURS")]
        lifetime_hours: Option<f64>,
        /// Seconds to wait for the VLDB before giving up.
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
    },
    /// List your tokens: user, id, cell and expiry.
    Tokens,
    /// Drop your tokens: the one for the cell given with --cell, else all of them.
    Unlog,
    /// Inspect and operate fileserver pairs.
    ///
    /// A pair is two fileservers started with the same `--pair NAME` on one shared
    /// partition: one active, one passive, seen by clients as one server with two
    /// addresses. The VLDB's lease and epoch decide which one is active.
    Pair {
        #[command(subcommand)]
        command: PairCommand,
        /// Seconds to wait for the VLDB or a member before giving up (a switchover has
        /// its own 30 s deadline).
        #[arg(long, global = true, default_value_t = 10.0)]
        timeout: f64,
        #[command(flatten)]
        auth: tokens::AuthFlags,
    },
    /// Inspect and change the VLDB's replicas (its Raft group).
    Vldb {
        #[command(subcommand)]
        command: vldb::VldbCommand,
        /// Seconds to wait for the VLDB before giving up (for `add`, the new replica's
        /// catch-up included).
        #[arg(long, global = true, default_value_t = 10.0)]
        timeout: f64,
        #[command(flatten)]
        auth: tokens::AuthFlags,
    },
    /// Look into a fileserver's journaled callback and lock state.
    State {
        #[command(subcommand)]
        command: StateCommand,
    },
    /// Measure throughput through a real local cell and print figures as ratios.
    Bench(bench::BenchArgs),
    /// Make a cell's CA and credentials, or a new host's certificate.
    Cell {
        #[command(subcommand)]
        command: cell_init::CellCommand,
    },
}

/// What a peer can make a server hold: the fileserver's and the vlserver's flags
/// (`docs/fileserver.md`, "Limits on peers").
#[derive(clap::Args)]
struct PeerLimitFlags {
    /// Seconds a connection with nothing in flight may send nothing before the server
    /// says goodbye and closes it (clients reconnect on their next call).
    #[arg(long, value_name = "SECS", default_value_t = 120.0)]
    idle_timeout_secs: f64,
    /// Seconds a new connection has to say hello.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    hello_timeout_secs: f64,
    /// Seconds a frame may take to arrive from its first byte, and a peer to start
    /// reading what it is sent; a peer that stalls longer is closed.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    frame_timeout_secs: f64,
    /// Connections open at once; a newcomer over it takes the place of the idlest
    /// (one still in its handshake first), or is refused when every one is busy.
    #[arg(long, value_name = "N", default_value_t = proto::server::CONNECTIONS_MAX_DEFAULT)]
    connections_max: usize,
    /// Connections open at once from one IP address, with the same eviction.
    #[arg(long, value_name = "N", default_value_t = proto::server::CONNECTIONS_PER_PEER_MAX_DEFAULT)]
    connections_per_peer_max: usize,
    /// MiB of frames held at once across all connections (received, not yet answered);
    /// a frame that gets none within --frame-timeout-secs closes its connection.
    #[arg(long, value_name = "MIB", default_value_t = proto::server::FRAME_MEMORY_BYTES_DEFAULT >> 20)]
    frame_memory_mib: usize,
}

impl PeerLimitFlags {
    fn limits(&self) -> Result<proto::server::ServerLimits> {
        let defaults = proto::server::ServerLimits::default();
        if self.connections_max == 0 || self.connections_per_peer_max == 0 {
            anyhow::bail!("--connections-max and --connections-per-peer-max must be at least 1");
        }
        let frame_bytes_max = defaults.connection.frame_bytes_max;
        if self.frame_memory_mib.saturating_mul(1 << 20) < frame_bytes_max {
            anyhow::bail!(
                "--frame-memory-mib must hold at least one largest frame ({} MiB), got {}",
                frame_bytes_max >> 20,
                self.frame_memory_mib
            );
        }
        Ok(proto::server::ServerLimits {
            connection: proto::rpc::Limits {
                handshake_timeout: seconds(self.hello_timeout_secs, "--hello-timeout-secs")?,
                frame_read_timeout: seconds(self.frame_timeout_secs, "--frame-timeout-secs")?,
                ..defaults.connection
            },
            idle_timeout: seconds(self.idle_timeout_secs, "--idle-timeout-secs")?,
            connections_max: self.connections_max,
            connections_per_peer_max: self.connections_per_peer_max,
            frame_memory_bytes: self.frame_memory_mib.saturating_mul(1 << 20),
            ..defaults
        })
    }
}

#[derive(Subcommand)]
enum PairCommand {
    /// Show a pair's epoch, active member and lease, and each member's own state.
    ///
    /// The first line is the VLDB's record; then one line per member, the active first,
    /// with what it says of itself: active or passive, and while a grace period runs
    /// after a takeover, how long it has left and how many clients and locks are back.
    /// A member that does not answer is shown as unreachable, not an error.
    Status {
        /// The name given to `holdfast fileserver --pair`.
        name: String,
    },
    /// Planned failover: hand the pair from its active member to the passive one.
    ///
    /// Asks the active member to hand its volumes, callbacks and locks over to its
    /// partner, waits (up to 30 s) until the VLDB names the partner active, and prints
    /// the new active, the new epoch and how long it took.
    Switchover {
        /// The name given to `holdfast fileserver --pair`.
        name: String,
    },
}

#[derive(Subcommand)]
enum StateCommand {
    /// Print what a partition's state holds: epoch, journal span, snapshot position,
    /// counts, and each client with its locks and callbacks. Read-only: safe on the
    /// partition of a running fileserver.
    Inspect {
        /// The fileserver's partition directory.
        dir: PathBuf,
        /// Print JSON for tools instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum FsCommand {
    /// Make DIR a mount point for VOLUME (DIR must not exist yet).
    Mkmount { dir: PathBuf, volume: String },
    /// Say which volume the mount point DIR shows.
    Lsmount { dir: PathBuf },
    /// Say which volume and fileserver hold PATH.
    Whereis { path: PathBuf },
    /// Drop PATH's cached data and status so the next access fetches it again.
    Flush { path: PathBuf },
    /// Check whether the fileservers this mount uses answer.
    Checkservers {
        /// A path inside the mount to ask (default: the current directory or the only mount).
        path: Option<PathBuf>,
    },
    /// Print PATH's fid, data version, callback state and your rights there, and the
    /// mount's cache and passthrough counters.
    Examine { path: PathBuf },
    /// Give PRINCIPAL (a name such as system:anyuser, or a numeric id) RIGHTS (letters
    /// of rlidwka, or read, write, all, none) on directory DIR.
    Setacl {
        dir: PathBuf,
        principal: String,
        rights: String,
        /// Set a negative entry: rights taken away.
        #[arg(long)]
        negative: bool,
    },
    /// Print directory DIR's access list.
    Listacl { dir: PathBuf },
    /// Remove the entries of principals that no longer exist from DIR's access list.
    Cleanacl { dir: PathBuf },
    /// Give directory TO the access list of directory FROM.
    Copyacl { from: PathBuf, to: PathBuf },
    /// Print where the mount holding PATH spends its time: cache hits and misses,
    /// passthrough opens and fallbacks, and each FUSE operation's latency (p50, p90,
    /// p99, max).
    Counters { path: PathBuf },
}

#[derive(Subcommand)]
enum VosCommand {
    /// Create a read-write volume.
    Create {
        name: String,
        /// The fileserver to place it on (required when the cell has several).
        #[arg(long, value_name = "ADDR")]
        server: Option<String>,
        /// Quota in MiB (0: none).
        #[arg(long, default_value_t = 0)]
        quota: u64,
    },
    /// Remove a volume and its VLDB entry.
    Remove { volume: String },
    /// Show a volume's VLDB entry and its status on its fileserver.
    Examine { volume: String },
    /// List the VLDB's entries.
    Listvldb,
    /// List the volumes on one fileserver (or on every one).
    Listvol {
        #[arg(long, value_name = "ADDR")]
        server: Option<String>,
    },
    /// Print a fileserver's counters (data fetched, snapshot pauses...) and where its
    /// time goes: latency by request kind, storage commits, the log's fsyncs and groups.
    Counters {
        /// The fileserver (required when the cell has several).
        #[arg(long, value_name = "ADDR")]
        server: Option<String>,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Err(error) = run(cli) {
        // One line: what went wrong, with its causes, and no backtrace.
        let mut line = error.to_string();
        for cause in error.chain().skip(1) {
            // Library errors often quote their source already; say each thing once.
            let cause = cause.to_string();
            if !line.contains(&cause) {
                line.push_str(": ");
                line.push_str(&cause);
            }
        }
        eprintln!("holdfast: {line}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let cell_path = cli.cell;
    match cli.command {
        Command::Up {
            dir,
            cell_name,
            ready_file,
        } => {
            // `up` speaks to the user itself; its children log to DIR/logs.
            process::init_tracing("warn");
            up::run(&dir, &cell_name, ready_file.as_deref())
        }
        Command::Vlserver {
            data,
            listen,
            cell_name,
            ready_file,
            id,
            peers,
            token_key,
            credentials,
            peer_limits,
        } => {
            // Memory freed after a flood goes back only without glibc's thread caches;
            // this runs the process again (same PID) with them off, unless set already.
            let restart_failed = proto::resources::restart_without_thread_caches();
            process::init_tracing("info");
            if let Some(why) = restart_failed {
                tracing::warn!("{why}; memory freed after a flood may stay with the process");
            }
            // Before the runtime's threads exist: glibc fixes its arena count at the first.
            proto::resources::tune_allocator();
            let connection_limits = peer_limits.limits()?;
            let cell = match (&cell_name, &credentials) {
                (Some(_), Some(_)) => None,
                _ => Some(CellConfig::locate(cell_path.as_deref()).context(
                    "find the cell's name and credentials (or pass --cell-name and --credentials)",
                )?),
            };
            let (cell_name, credentials) = match (cell_name, credentials, cell) {
                (Some(name), Some(dir), _) => (name, dir),
                (name, dir, Some(cell)) => (
                    name.unwrap_or_else(|| cell.name.clone()),
                    dir.unwrap_or_else(|| cell.credentials_dir()),
                ),
                (_, _, None) => unreachable!("the cell file is read unless both flags are given"),
            };
            let transport = Transport::from_dir(&credentials, PeerClass::Server)?;
            let token_key =
                token_key.unwrap_or_else(|| credentials.join(proto::tls::TOKEN_KEY_FILE));
            if !token_key.exists() {
                bail!(
                    "no token key at {}: every VLDB replica needs the cell's key (copy it from \
                     another replica, mode 0600, or make a cell with `holdfast cell init`), or \
                     pass --token-key FILE",
                    token_key.display()
                );
            }
            runtime()?.block_on(async {
                let listener = bind(&listen).await?;
                let address = listener.local_addr()?.to_string();
                tracing::info!(%address, cell = %cell_name, "vlserver listening");
                process::write_ready_file(ready_file.as_deref(), &address)?;
                let shutdown = process::shutdown_on_signals()?;
                let config = vlserver::Config {
                    data_dir: data,
                    cell_name,
                    id,
                    peers: peers.unwrap_or_default(),
                    snapshot_every: vlserver::SNAPSHOT_EVERY,
                    connection_limits,
                    token_key_file: Some(token_key),
                    token_lifetime_max: proto::identity::TOKEN_LIFETIME_DEFAULT,
                    transport,
                };
                vlserver::run(config, listener, shutdown)
                    .await
                    .context("run the vlserver")
            })
        }
        Command::Fileserver {
            partition,
            listen,
            advertise,
            callback_count_max,
            journal_mode,
            lease_secs,
            grace_secs,
            ready_file,
            pair,
            pair_lease_ms,
            history,
            token_key,
            bench_skip_access_checks,
            peer_limits,
        } => {
            // Memory freed after a flood goes back only without glibc's thread caches;
            // this runs the process again (same PID) with them off, unless set already.
            let restart_failed = proto::resources::restart_without_thread_caches();
            process::init_tracing("info");
            if let Some(why) = restart_failed {
                tracing::warn!("{why}; memory freed after a flood may stay with the process");
            }
            // Before the runtime's threads exist: glibc fixes its arena count at the first.
            proto::resources::tune_allocator();
            let connection_limits = peer_limits.limits()?;
            let pair = pair
                .map(|name| pair_config(&name, pair_lease_ms))
                .transpose()?;
            let cell = CellConfig::locate(cell_path.as_deref()).context("find the cell")?;
            let transport = Transport::for_cell(&cell, PeerClass::Server)?;
            let tokens = token_verifier(&cell, token_key.as_deref())?;
            runtime()?.block_on(async {
                let listener = bind(&listen).await?;
                let address = listener.local_addr()?.to_string();
                let advertise = advertise.unwrap_or_else(|| address.clone());
                tracing::info!(%address, partition = %partition.display(), "fileserver listening");
                let mut config =
                    fileserver::Config::new(partition, cell, transport, vec![advertise]);
                config.callback_count_max = callback_count_max;
                config.journal_mode = journal_mode;
                config.lease = seconds(lease_secs, "--lease-secs")?;
                config.grace = seconds(grace_secs.unwrap_or(lease_secs), "--grace-secs")?;
                config.pair = pair;
                config.history = history;
                config.connection_limits = connection_limits;
                config.tokens = fileserver::Tokens(Some(tokens));
                config.skip_access_checks = bench_skip_access_checks;
                process::write_ready_file(ready_file.as_deref(), &address)?;
                let shutdown = process::shutdown_on_signals()?;
                fileserver::run(config, listener, shutdown)
                    .await
                    .context("run the fileserver")
            })
        }
        Command::Mount {
            cache,
            mountpoint,
            root_volume,
            cache_mib,
            timeout,
            failover_timeout,
            ready_file,
            over_guard,
            stat_entries,
            passthrough,
            access,
        } => {
            process::init_tracing("info");
            let cell = CellConfig::locate(cell_path.as_deref()).context("find the cell")?;
            let root_volume = proto::VolumeName::parse(&root_volume)
                .map_err(|e| anyhow::anyhow!("--root-volume {root_volume:?}: {e}"))?;
            let rpc_timeout = seconds(timeout, "--timeout")?;
            let failover_timeout = seconds(failover_timeout, "--failover-timeout")?;
            let transport = Transport::for_cell(&cell, PeerClass::Host)?;
            let config = cachemgr::Config {
                cell,
                transport,
                cache_dir: cache,
                mountpoint,
                root_volume,
                cache_bytes_max: cache_mib.saturating_mul(1 << 20),
                rpc_timeout,
                failover_timeout,
                lease_renew_interval: cachemgr::LEASE_RENEW_INTERVAL_DEFAULT,
                over_guard,
                status_entries_max: usize::try_from(stat_entries).unwrap_or(usize::MAX),
                passthrough,
                access,
            };
            let shutdown = process::shutdown_on_signals_blocking()?;
            let mountpoint = config.mountpoint.clone();
            cachemgr::run(config, shutdown, move || {
                tracing::info!(mountpoint = %mountpoint.display(), "mounted");
                if let Err(e) =
                    process::write_ready_file(ready_file.as_deref(), &mountpoint.to_string_lossy())
                {
                    tracing::warn!(error = %e, "cannot write the ready file");
                }
            })
            .context("run the cache manager")
        }
        Command::Fs { command } => {
            process::init_tracing("warn");
            let text = match command {
                FsCommand::Mkmount { dir, volume } => cachemgr::fs_mkmount(&dir, &volume),
                FsCommand::Lsmount { dir } => cachemgr::fs_lsmount(&dir),
                FsCommand::Whereis { path } => cachemgr::fs_whereis(&path),
                FsCommand::Flush { path } => cachemgr::fs_flush(&path),
                FsCommand::Checkservers { path } => cachemgr::fs_checkservers(path.as_deref()),
                FsCommand::Examine { path } => cachemgr::fs_examine(&path),
                FsCommand::Counters { path } => cachemgr::fs_counters(&path),
                FsCommand::Setacl {
                    dir,
                    principal,
                    rights,
                    negative,
                } => {
                    let principals = acl_principals(cell_path.as_deref(), &principal)?;
                    print_text(&acl::setacl(
                        &principals,
                        &dir,
                        &principal,
                        &rights,
                        negative,
                    )?);
                    return Ok(());
                }
                FsCommand::Listacl { dir } => {
                    let principals = acl_principals(cell_path.as_deref(), "")?;
                    print_text(&acl::listacl(&principals, &dir)?);
                    return Ok(());
                }
                FsCommand::Cleanacl { dir } => {
                    let principals = acl_principals(cell_path.as_deref(), "")?;
                    print_text(&acl::cleanacl(&principals, &dir)?);
                    return Ok(());
                }
                FsCommand::Copyacl { from, to } => {
                    print_text(&acl::copyacl(&from, &to)?);
                    return Ok(());
                }
            }?;
            print_text(&text);
            Ok(())
        }
        Command::Vos {
            command,
            timeout,
            auth,
        } => {
            process::init_tracing("warn");
            let vos = admin_vos(cell_path.as_deref(), &auth, timeout)?;
            let text = runtime()?.block_on(async {
                Ok::<_, vos::VosError>(match command {
                    VosCommand::Create {
                        name,
                        server,
                        quota,
                    } => {
                        let entry = vos.create(&name, server.as_deref(), quota).await?;
                        format!("Volume {} created as {}\n", entry.rw_id, entry.name)
                    }
                    VosCommand::Remove { volume } => {
                        vos.remove(&volume).await?;
                        format!("Volume {volume} removed\n")
                    }
                    VosCommand::Examine { volume } => {
                        let (entry, info) = vos.examine(&volume).await?;
                        vos::format_examine(&entry, info.as_ref(), &vos.servers().await?)
                    }
                    VosCommand::Listvldb => {
                        vos::format_listvldb(&vos.listvldb().await?, &vos.servers().await?)
                    }
                    VosCommand::Counters { server } => {
                        let (entry, figures) = vos.server_figures(server.as_deref()).await?;
                        vos::format_figures(&entry, &figures)
                    }
                    VosCommand::Listvol { server } => {
                        vos::format_listvol(&vos.listvol(server.as_deref()).await?)
                    }
                })
            })?;
            print_text(&text);
            Ok(())
        }
        Command::Pts {
            command,
            timeout,
            auth,
        } => {
            process::init_tracing("warn");
            let cell = CellConfig::locate(cell_path.as_deref()).context("find the cell")?;
            let token = tokens::for_command(cell_path.as_deref(), &cell, &auth)?;
            let timeout = seconds(timeout, "--timeout")?;
            let transport = Transport::for_cell(&cell, PeerClass::Host)?;
            let client = proto::VldbClient::new(cell, transport, proto::PeerKind::Admin, timeout)
                .with_token(token);
            let text = runtime()?.block_on(pts::run(&client, command))?;
            print_text(&text);
            Ok(())
        }
        Command::Login {
            user,
            password_file,
            lifetime_hours,
            timeout,
        } => {
            process::init_tracing("warn");
            let cell = CellConfig::locate(cell_path.as_deref()).context("find the cell")?;
            let lifetime = lifetime_hours
                .map(|hours| seconds(hours * 3600.0, "--lifetime-hours"))
                .transpose()?;
            let password = login::read_password(
                password_file.as_deref(),
                &format!("Password for {user}: "),
                false,
            )?;
            let token = runtime()?.block_on(login::login(
                &cell,
                &user,
                password,
                lifetime,
                seconds(timeout, "--timeout")?,
            ))?;
            let body = token
                .unverified_body()
                .context("the VLDB answered with a token that does not decode")?;
            tokens::store(&cell.name, &token)?;
            println!(
                "Token for {} (id {}) in cell {}, valid until {}",
                body.user,
                body.id,
                body.cell,
                tokens::local_time(body.expiry)
            );
            for mount in tokens::give_to_mounts(&token) {
                println!(
                    "The mount at {} acts for you as {}",
                    mount.display(),
                    body.user
                );
            }
            Ok(())
        }
        Command::Tokens => {
            print_text(&tokens::render(&tokens::list()?));
            print_text(&tokens::render_mounts());
            Ok(())
        }
        Command::Unlog => {
            let cell = match cell_path.as_deref() {
                Some(path) => Some(CellConfig::load(path).context("find the cell")?.name),
                None => None,
            };
            for cell in tokens::remove(cell.as_deref())? {
                println!("Token for cell {cell} dropped");
            }
            for mount in tokens::drop_from_mounts() {
                println!(
                    "The mount at {} acts for you as system:anyuser",
                    mount.display()
                );
            }
            Ok(())
        }
        Command::Pair {
            command,
            timeout,
            auth,
        } => {
            process::init_tracing("warn");
            let vos = admin_vos(cell_path.as_deref(), &auth, timeout)?;
            let text = runtime()?.block_on(async {
                Ok::<_, vos::VosError>(match command {
                    PairCommand::Status { name } => {
                        vos::format_pair_status(&vos.pair_status(&name).await?)
                    }
                    PairCommand::Switchover { name } => {
                        vos::format_switchover(&vos.pair_switchover(&name).await?)
                    }
                })
            })?;
            print_text(&text);
            Ok(())
        }
        Command::Vldb {
            command,
            timeout,
            auth,
        } => vldb::run(
            cell_path.as_deref(),
            command,
            seconds(timeout, "--timeout")?,
            &auth,
        ),
        Command::State {
            command: StateCommand::Inspect { dir, json },
        } => {
            process::init_tracing("warn");
            let report = fileserver::inspect::inspect(&dir)
                .with_context(|| format!("inspect {}", dir.display()))?;
            if json {
                let text = serde_json::to_string_pretty(&report).context("encode the report")?;
                println!("{text}");
            } else {
                print_text(&fileserver::inspect::render_text(&report));
            }
            Ok(())
        }
        Command::Cell { command } => {
            process::init_tracing("warn");
            cell_init::run(cell_path.as_deref(), command)
        }
        Command::Bench(args) => {
            // The in-process fileservers of the state figures run without a VLDB.
            process::init_tracing("error");
            bench::run(args)
        }
    }
}

/// The protection database for an `fs` access-list command: read from the cell when
/// one is given (`--cell` or HOLDFAST_CELL); without one, a `system:` name or a numeric
/// `principal` still works.
fn acl_principals(cell_path: Option<&Path>, principal: &str) -> Result<acl::Principals> {
    let cell = match CellConfig::locate(cell_path) {
        Ok(cell) => Some(cell),
        Err(proto::CellError::NotGiven) => None,
        Err(e) => return Err(e).context("find the cell"),
    };
    // A principal that needs no lookup needs no VLDB either.
    let numeric = principal.starts_with("system:") || principal.parse::<i32>().is_ok();
    if numeric {
        return acl::Principals::load(None);
    }
    acl::Principals::load(cell.as_ref())
}

/// The volume and pair administration of the cell, acting with the caller's token (or
/// `--localauth`'s).
fn admin_vos(cell_path: Option<&Path>, auth: &tokens::AuthFlags, timeout: f64) -> Result<vos::Vos> {
    let cell = CellConfig::locate(cell_path).context("find the cell")?;
    let token = tokens::for_command(cell_path, &cell, auth)?;
    let transport = Transport::for_cell(&cell, PeerClass::Host)?;
    Ok(vos::Vos::new(cell, transport, seconds(timeout, "--timeout")?).with_token(token))
}

fn print_text(text: &str) {
    if text.ends_with('\n') || text.is_empty() {
        print!("{text}");
    } else {
        println!("{text}");
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")
}

async fn bind(address: &str) -> Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .with_context(|| format!("listen on {address}"))
}

/// `--pair NAME` and `--pair-lease-ms N`, checked before anything starts.
/// The verifier of the cell's tokens, from `--token-key` or `credentials/token.key`
/// beside the cell file; a missing key stops the fileserver with how to make one.
fn token_verifier(cell: &CellConfig, token_key: Option<&Path>) -> Result<proto::TokenVerifier> {
    let path = match token_key {
        Some(path) => path.to_owned(),
        None => cell.credentials_dir().join(proto::tls::TOKEN_KEY_FILE),
    };
    if !path.exists() {
        bail!(
            "no token key at {}: make the cell's credentials with `holdfast cell init`, or pass --token-key FILE",
            path.display()
        );
    }
    proto::TokenVerifier::load(&cell.name, &path).context("load the token key")
}

fn pair_config(name: &str, lease_ms: u64) -> anyhow::Result<fileserver::PairConfig> {
    let name = proto::PairName::parse(name).map_err(|e| anyhow::anyhow!("--pair {name:?}: {e}"))?;
    let lease = std::time::Duration::from_millis(lease_ms);
    let allowed = state::pair_lease::LEASE_MIN..=state::pair_lease::LEASE_MAX;
    if !allowed.contains(&lease) {
        anyhow::bail!(
            "--pair-lease-ms {lease_ms}: the lease must be {} to {} ms",
            allowed.start().as_millis(),
            allowed.end().as_millis()
        );
    }
    Ok(fileserver::PairConfig { name, lease })
}

/// `--peers 1=ADDR,2=ADDR,3=ADDR`: each id once, each address once.
fn parse_peers(text: &str) -> Result<BTreeMap<u64, String>, String> {
    let mut peers = BTreeMap::new();
    for part in text.split(',').filter(|p| !p.trim().is_empty()) {
        let (id, address) = part.split_once('=').ok_or_else(|| {
            format!("`{part}` is not ID=ADDR: list the replicas as 1=HOST:PORT,2=HOST:PORT,...")
        })?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| format!("`{id}` is not a replica id: use a number, as in 1=HOST:PORT"))?;
        let address = address.trim();
        if address.is_empty() {
            return Err(format!("replica {id} has no address"));
        }
        if peers.values().any(|a| a == address) {
            return Err(format!("{address} is listed twice"));
        }
        if peers.insert(id, address.to_owned()).is_some() {
            return Err(format!("replica id {id} is listed twice"));
        }
    }
    if peers.is_empty() {
        return Err("no replica listed: use 1=HOST:PORT,2=HOST:PORT,3=HOST:PORT".into());
    }
    Ok(peers)
}

fn seconds(value: f64, flag: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| format!("{flag} must be a positive number of seconds, got {value}"))
}
