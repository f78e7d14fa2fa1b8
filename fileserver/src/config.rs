//! The fileserver's configuration, as the binary or a test builds it.
//! Invariant: `Config::new` gives every limit and timing its default, and `pair` alone
//! decides whether `run` serves as a single server or as a pair member.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use proto::server::ServerLimits;
use proto::{CellConfig, PairName, TokenVerifier, Transport};
use state::JournalMode;

use crate::stats::Stats;

/// Everything `run` needs besides the listener.
#[derive(Clone, Debug)]
pub struct Config {
    /// The partition directory: `server.id` and one directory per volume.
    pub partition: PathBuf,
    pub cell: CellConfig,
    /// How it serves and connects: mutual TLS with the host's server certificate.
    pub transport: Transport,
    /// Addresses registered in the VLDB, where clients reach this server.
    pub advertise: Vec<String>,
    /// Most callback promises held at once.
    pub callback_count_max: usize,
    /// Most clients known at once.
    pub client_count_max: usize,
    /// How long a client may take to acknowledge a break before it counts as unreachable.
    pub break_timeout: Duration,
    /// Most breaks queued for one unreachable client before it is told to reset instead.
    pub delayed_breaks_per_client_max: usize,
    /// How long a client keeps its locks without a request; a lapsed client's locks
    /// are released and its waiters woken.
    pub lease: Duration,
    /// How long after a restart recovered locks wait for their owners to reclaim them.
    pub grace: Duration,
    /// When journaled lock, callback and client changes (records of the partition's
    /// metadata log, `PARTITION/log/`) are waited for. `Sync`: every one before the
    /// reply; a grace period then knows every lock. `Group`: lock changes before the
    /// reply, the rest with the log's next flush. `None`: none waited for.
    pub journal_mode: JournalMode,
    /// Deadline of each VLDB call.
    pub vldb_timeout: Duration,
    /// Counters the caller can read while the server runs.
    pub stats: Arc<Stats>,
    /// Run as a member of this pair (sharing the partition with its partner) instead of
    /// as a single server.
    pub pair: Option<PairConfig>,
    /// Append a line per acknowledged change and per role change here (an audit trail
    /// for failover tests).
    pub history: Option<PathBuf>,
    /// What a peer can make the server hold: connection caps, hello, idle and frame
    /// timeouts, frame memory (`docs/fileserver.md`, "Limits on peers").
    pub connection_limits: ServerLimits,
    /// Verifies the cell's tokens (`--token-key`). Without it every token is refused and
    /// every request acts for `system:anyuser`: checks are made all the same.
    pub tokens: Tokens,
    /// Bench-only: skip the access checks (`holdfast bench --suite identity --figure
    /// access` measures their cost). Never set by default or by `up`.
    pub skip_access_checks: bool,
}

/// The cell's token verifier, if the server was given the key.
#[derive(Clone, Default)]
pub struct Tokens(pub Option<TokenVerifier>);

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Tokens(verifier)"
        } else {
            "Tokens(none)"
        })
    }
}

/// A pair member's settings.
#[derive(Clone, Debug)]
pub struct PairConfig {
    pub name: PairName,
    /// The lease the member asks the VLDB for; it renews every quarter of it and stops
    /// acting a fifth of it before the lease ends.
    pub lease: Duration,
}

impl Config {
    /// A configuration with the default limits.
    pub fn new(
        partition: PathBuf,
        cell: CellConfig,
        transport: Transport,
        advertise: Vec<String>,
    ) -> Config {
        Config {
            partition,
            cell,
            transport,
            advertise,
            callback_count_max: 1_000_000,
            client_count_max: 100_000,
            break_timeout: Duration::from_secs(2),
            delayed_breaks_per_client_max: state::delayed_breaks::FIDS_PER_CLIENT_MAX_DEFAULT,
            lease: state::lock_table::LEASE_DEFAULT,
            grace: state::lock_table::LEASE_DEFAULT,
            journal_mode: JournalMode::Sync,
            vldb_timeout: Duration::from_secs(5),
            stats: Arc::new(Stats::default()),
            pair: None,
            history: None,
            connection_limits: ServerLimits::default(),
            tokens: Tokens::default(),
            skip_access_checks: false,
        }
    }
}
