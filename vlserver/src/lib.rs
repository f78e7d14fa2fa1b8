//! The Holdfast VLDB server: maps volume names and ids to sites, and records fileservers
//! and pairs; each server is one replica of a Raft group (`replica`).
//! Invariant: `run` binds nothing; every change goes through the replica's log, and all
//! state is behind `Store`, whose operations take the clock as an input.

mod command;
mod error;
mod limits;
mod login;
mod pairs;
mod pts;
mod replica;
mod service;
mod store;
mod tables;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use proto::TokenKey;
use proto::Transport;
use proto::server::{ServerLimits, serve};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info, warn};

pub use command::{Applied, Command, Outcome};
pub use error::VldbError;
pub use limits::StoreLimits;
pub use login::{FAILURE_DELAY, LOCALAUTH_ID, LOCALAUTH_USER, localauth_body};
pub use pts::{
    BUILT_IN_GROUPS, Credentials, GROUP_ID_FIRST, PRINCIPAL_NAME_BYTES_MAX, USER_ID_FIRST,
};
pub use replica::{
    DATABASE_FILE, LOG_FILE, Replica, ReplicaConfig, SNAPSHOT_EVERY, decode_untrusted,
};
pub use service::VldbService;
pub use store::{IDS_PER_VOLUME, Store, VOLUME_ID_FIRST};
pub use tables::FORMAT_VERSION;

#[derive(Clone, Debug)]
pub struct Config {
    /// Directory holding the tables and the Raft log; created if missing.
    pub data_dir: PathBuf,
    /// The cell this VLDB serves; connections naming another cell are refused.
    pub cell_name: String,
    /// This replica's id in `peers`.
    pub id: u64,
    /// The group's bootstrap membership, id -> address. Empty: a group of one, this
    /// replica as id 1 at the address it listens on.
    pub peers: BTreeMap<u64, String>,
    /// A snapshot every this many entries (`SNAPSHOT_EVERY`; tests use fewer).
    pub snapshot_every: u64,
    /// What a peer can make the replica hold: connection caps, hello, idle and frame
    /// timeouts, frame memory.
    pub connection_limits: ServerLimits,
    /// The cell's token-signing key file (`token.key`). With it the VLDB issues tokens
    /// (`Login`) and only administrators may change the cell. `holdfast vlserver` always
    /// gives one (the credentials directory's `token.key` by default); `None` is for
    /// in-process tests of other rules: no tokens, and no one is refused.
    pub token_key_file: Option<PathBuf>,
    /// The longest a token it issues lives.
    pub token_lifetime_max: Duration,
    /// How it serves and reaches the other replicas: mutual TLS with the host's server
    /// certificate.
    pub transport: Transport,
}

impl Config {
    /// A group of one: this replica alone, as id 1.
    pub fn single(data_dir: PathBuf, cell_name: String, transport: Transport) -> Config {
        Config {
            transport,
            data_dir,
            cell_name,
            id: 1,
            peers: BTreeMap::new(),
            snapshot_every: SNAPSHOT_EVERY,
            connection_limits: ServerLimits::default(),
            token_key_file: None,
            token_lifetime_max: proto::identity::TOKEN_LIFETIME_DEFAULT,
        }
    }
}

/// Serves the VLDB on `listener` until `shutdown` turns true, or until the replica stops
/// on its own (its disk failed): then it returns why.
pub async fn run(
    config: Config,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), VldbError> {
    let token_key = match &config.token_key_file {
        Some(path) => Some(TokenKey::load(path).map_err(|e| VldbError::Config(e.to_string()))?),
        None => None,
    };
    let local = listener
        .local_addr()
        .map_err(|e| VldbError::Config(format!("the listening socket has no address: {e}")))?;
    let peers = if config.peers.is_empty() {
        BTreeMap::from([(config.id, local.to_string())])
    } else {
        config.peers.clone()
    };
    let replica = Arc::new(
        Replica::start(ReplicaConfig {
            id: config.id,
            peers: peers.clone(),
            data_dir: config.data_dir.clone(),
            cell_name: config.cell_name.clone(),
            peers_given: !config.peers.is_empty(),
            snapshot_every: config.snapshot_every,
            transport: config.transport.clone(),
        })
        .await?,
    );
    info!(cell = %config.cell_name, data = %config.data_dir.display(), listen = %local,
        id = config.id, ?peers, "vlserver started");
    let mut service = VldbService::new(replica.clone(), config.cell_name);
    match token_key {
        Some(key) => {
            info!(
                key_id = key.key_id(),
                "issuing tokens; only administrators change the cell"
            );
            service = service.with_token_key(key, config.token_lifetime_max);
        }
        None => warn!("no --token-key: this VLDB issues no tokens and lets anyone change the cell"),
    }
    let service = Arc::new(service);
    let (stop_serving, serving_stopped) = watch::channel(false);
    let server = tokio::spawn(serve(
        listener,
        service,
        config.connection_limits,
        config.transport,
        serving_stopped,
    ));
    let outcome = tokio::select! {
        _ = shutdown.wait_for(|stop| *stop) => Ok(()),
        why = replica.stopped() => {
            error!(reason = %why, "VLDB replica stepped down: its log or tables failed; \
                fix the disk and start it again, the other replicas carry on");
            Err(VldbError::Stopped(why))
        }
    };
    let _ = stop_serving.send(true);
    let _ = server.await;
    replica.shutdown().await;
    info!("vlserver stopped");
    outcome
}
