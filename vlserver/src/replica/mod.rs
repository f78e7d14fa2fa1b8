//! `Replica`: one member of the VLDB's Raft group (openraft): its log, its state machine
//! (the tables), the network to its peers, bootstrap and membership.
//! Invariant: every change reaches the tables through the log, and a pair decision is
//! checked only by a leader that has applied every entry committed before its term.

mod log_store;
mod network;
mod state_machine;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::{
    AnyError, ChangeMembers, Config, LogId, Membership, ServerState, SnapshotMeta, SnapshotPolicy,
    StorageError, StorageIOError, StoredMembership,
};
use proto::{ErrorCode, RaftKind, VldbMember, VldbMemberStatus, VldbRole};
use state::Millis;
use tracing::{error, info, warn};

use crate::command::{Applied, Command, Outcome};
use crate::error::VldbError;
use crate::limits::StoreLimits;
use crate::store::Store;
use crate::tables::RAFT_CELL;
use log_store::{LogStore, PEERS};
use network::Network;
use state_machine::StateMachine;

pub use openraft::BasicNode as Node;

openraft::declare_raft_types!(
    /// The VLDB's Raft types: commands in, outcomes out, replicas named by number.
    pub TypeConfig:
        D = Command,
        R = Outcome,
        NodeId = u64,
        Node = Node,
        SnapshotData = Cursor<Vec<u8>>,
);

type Raft = openraft::Raft<TypeConfig>;

/// The database of the tables inside the data directory.
pub const DATABASE_FILE: &str = "vldb.redb";
/// The Raft log inside the data directory.
pub const LOG_FILE: &str = "raft-log.redb";

/// How often the leader heartbeats, and the election timeout's range: on loopback or a
/// LAN, a dead leader is replaced within about half a second.
const HEARTBEAT: Duration = Duration::from_millis(30);
const ELECTION_MIN: Duration = Duration::from_millis(100);
const ELECTION_MAX: Duration = Duration::from_millis(200);
/// A snapshot every this many entries bounds the log (a fifth of it is kept behind the
/// snapshot, for followers a little behind).
pub const SNAPSHOT_EVERY: u64 = 5_000;
/// The largest snapshot a replica receives: the tables at their limits (`StoreLimits`)
/// take well under a tenth of it.
const SNAPSHOT_BYTES_MAX: u64 = 512 << 20;
/// The log id a single VLDB's data is taken over at: after the bootstrap's membership
/// entry (index 0), so that a replica initialised from scratch is behind it and receives
/// it as a snapshot.
const TAKEOVER_INDEX: u64 = 1;

/// The replica's monotonic clock, in milliseconds since it started: pair leases expire on
/// it. Read when a request is handled or an entry applied, never before the member sent
/// the call.
#[derive(Clone, Debug)]
pub(crate) struct Clock {
    started: Instant,
}

impl Clock {
    pub(crate) fn now(&self) -> Millis {
        Millis(u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX))
    }
}

/// What a replica is started with.
#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    pub id: u64,
    /// Every replica of the bootstrap membership: id -> address. The lowest id bootstraps
    /// the group; the others wait to be contacted.
    pub peers: BTreeMap<u64, String>,
    pub data_dir: PathBuf,
    pub cell_name: String,
    /// A snapshot every this many applied entries (`SNAPSHOT_EVERY`).
    pub snapshot_every: u64,
    /// False for a group of one started without `--peers`: its address may change from
    /// one start to the next (an ephemeral port), so it is not held against it.
    pub peers_given: bool,
    /// How it reaches the other replicas.
    pub transport: proto::Transport,
}

/// A running replica.
pub struct Replica {
    raft: Raft,
    store: Arc<Store>,
    clock: Clock,
    id: u64,
    cell_name: String,
    transport: proto::Transport,
}

impl Replica {
    /// Opens the data directory, checks that it belongs to this cell and this membership,
    /// starts Raft, and bootstraps the group if this replica is the lowest id and nothing
    /// was bootstrapped yet.
    pub async fn start(config: ReplicaConfig) -> Result<Replica, VldbError> {
        let ReplicaConfig {
            id,
            peers,
            data_dir,
            cell_name,
            peers_given,
            snapshot_every,
            transport,
        } = config;
        if !peers.contains_key(&id) {
            return Err(VldbError::Config(format!(
                "--peers does not list this replica's --id {id}"
            )));
        }
        let (store, log) = {
            let data_dir = data_dir.clone();
            let peers = peers.clone();
            let cell_name = cell_name.clone();
            tokio::task::spawn_blocking(move || {
                open(&data_dir, id, &peers, peers_given, &cell_name)
            })
            .await
            .map_err(|e| VldbError::Task(e.to_string()))??
        };
        let store = Arc::new(store);
        let clock = Clock {
            started: Instant::now(),
        };
        let config = Config {
            cluster_name: cell_name.clone(),
            heartbeat_interval: millis(HEARTBEAT),
            election_timeout_min: millis(ELECTION_MIN),
            election_timeout_max: millis(ELECTION_MAX),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(snapshot_every.max(1)),
            max_in_snapshot_log_to_keep: snapshot_every / 5,
            // Well below the 4 MiB frame limit.
            snapshot_max_chunk_size: 1 << 20,
            ..Config::default()
        }
        .validate()
        .map_err(|e| VldbError::Config(e.to_string()))?;
        let network = Network {
            cell: cell_name.clone(),
            id,
            transport: transport.clone(),
            connections: Default::default(),
        };
        let state_machine = StateMachine::new(store.clone(), clock.clone());
        let pristine = log.is_pristine()?;
        let raft = Raft::new(id, Arc::new(config), network, log, state_machine)
            .await
            .map_err(|e| VldbError::Raft(e.to_string()))?;
        let bootstrapper = peers.keys().next() == Some(&id);
        if pristine && bootstrapper && !store.taken_over() {
            let members: BTreeMap<u64, Node> = peers
                .iter()
                .map(|(id, address)| (*id, Node::new(address.clone())))
                .collect();
            match raft.initialize(members).await {
                Ok(()) => info!(?peers, "VLDB group bootstrapped"),
                Err(e) => warn!(error = %e, "VLDB bootstrap skipped"),
            }
        }
        if peers.len() == 1 {
            // A group of one need not wait out an election timeout (clients meanwhile
            // hear `NotLeader` and retry within their deadline).
            if let Err(e) = raft.trigger().elect().await {
                warn!(error = %e, "could not start an election");
            }
        }
        tokio::spawn(log_roles(raft.metrics()));
        Ok(Replica {
            raft,
            store,
            clock,
            id,
            cell_name,
            transport,
        })
    }

    pub(crate) fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub(crate) fn now(&self) -> Millis {
        self.clock.now()
    }

    /// Proposes `command` and answers once it is committed and applied here.
    pub(crate) async fn write(&self, command: Command) -> Result<Applied, ErrorCode> {
        match self.raft.client_write(command).await {
            Ok(response) => response.data.0,
            Err(e) => Err(self.write_error(e)),
        }
    }

    /// Returns once this replica is the leader and has applied every entry committed
    /// before now, its own term's first entry included: then its tables, and the lease
    /// expiries it keeps, reflect every decision any earlier leader answered.
    pub(crate) async fn linearizable(&self) -> Result<(), ErrorCode> {
        match self.raft.ensure_linearizable().await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(forward))) => {
                Err(self.not_leader(Some(&forward)))
            }
            // A leader that cannot hear from a quorum may have been replaced.
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_))) => {
                Err(ErrorCode::NotLeader { leader: None })
            }
            Err(RaftError::Fatal(e)) => Err(stopped(&e)),
        }
    }

    /// Whether this replica may answer a read from its own tables. A leader must have
    /// heard from a quorum within the longest election timeout (else it may have been
    /// replaced); a follower must follow a leader, which it stops doing once its election
    /// timeout passes without a heartbeat. So an answer misses at most the changes
    /// committed in the last election timeout (200 ms) plus what is in flight to this
    /// replica; pair decisions never rely on it (`linearizable`).
    pub(crate) fn may_read(&self) -> Result<(), ErrorCode> {
        let watch = self.raft.metrics();
        let metrics = watch.borrow();
        if metrics.running_state.is_err() {
            return Err(ErrorCode::Internal("this VLDB replica has stopped".into()));
        }
        let fresh = match metrics.state {
            ServerState::Leader => metrics
                .millis_since_quorum_ack
                .is_some_and(|ms| ms <= millis(ELECTION_MAX)),
            ServerState::Follower | ServerState::Learner => metrics.current_leader.is_some(),
            ServerState::Candidate | ServerState::Shutdown => false,
        };
        if fresh {
            Ok(())
        } else {
            Err(ErrorCode::NotLeader { leader: None })
        }
    }

    /// Hands one Raft message from a peer to openraft; the answer is its `Result`, in
    /// postcard.
    pub(crate) async fn raft_message(
        &self,
        kind: RaftKind,
        payload: &[u8],
    ) -> Result<Vec<u8>, ErrorCode> {
        let bad = |e: postcard::Error| {
            warn!(error = %e, "undecodable Raft message from a peer");
            ErrorCode::InvalidArgument
        };
        let answer = match kind {
            RaftKind::AppendEntries => {
                let request: AppendEntriesRequest<TypeConfig> =
                    postcard::from_bytes(payload).map_err(bad)?;
                postcard::to_stdvec(&self.raft.append_entries(request).await)
            }
            RaftKind::Vote => {
                let request: VoteRequest<u64> = postcard::from_bytes(payload).map_err(bad)?;
                postcard::to_stdvec(&self.raft.vote(request).await)
            }
            RaftKind::InstallSnapshot => {
                let request: InstallSnapshotRequest<TypeConfig> =
                    postcard::from_bytes(payload).map_err(bad)?;
                // The chunk is written at its offset into a buffer in memory: a peer may
                // not make it larger than any snapshot the table limits allow.
                let end = request.offset.saturating_add(request.data.len() as u64);
                if end > SNAPSHOT_BYTES_MAX {
                    warn!(
                        offset = request.offset,
                        bytes = request.data.len(),
                        "refusing a snapshot chunk past the largest snapshot there can be"
                    );
                    return Err(ErrorCode::TooLarge);
                }
                postcard::to_stdvec(&self.raft.install_snapshot(request).await)
            }
        };
        answer.map_err(|e| ErrorCode::Internal(format!("cannot encode a Raft answer: {e}")))
    }

    /// This replica as `holdfast vldb status` shows it.
    pub(crate) fn status(&self) -> VldbMemberStatus {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let address_of = |id: u64| {
            membership
                .get_node(&id)
                .map_or_else(String::new, |n| n.addr.clone())
        };
        let role = match (&metrics.running_state, metrics.state) {
            (Err(_), _) | (_, ServerState::Shutdown) => VldbRole::Shutdown,
            (_, ServerState::Leader) => VldbRole::Leader,
            (_, ServerState::Candidate) => VldbRole::Candidate,
            (_, ServerState::Learner) => VldbRole::Learner,
            (_, ServerState::Follower) => VldbRole::Follower,
        };
        VldbMemberStatus {
            id: self.id,
            address: address_of(self.id),
            role,
            term: metrics.current_term,
            last_log_index: metrics.last_log_index,
            applied_index: metrics.last_applied.map(|l| l.index),
            leader: metrics.current_leader.map(|id| (id, address_of(id))),
            members: membership
                .nodes()
                .map(|(id, node)| VldbMember {
                    id: *id,
                    address: node.addr.clone(),
                    voter: voters.contains(id),
                })
                .collect(),
        }
    }

    /// Adds replica `id` at `address`: first as a learner, answered once it caught up,
    /// then as a voter by joint consensus.
    pub(crate) async fn add_member(&self, id: u64, address: String) -> Result<(), ErrorCode> {
        self.check_newcomer(id, &address).await?;
        self.raft
            .add_learner(id, Node::new(address.clone()), true)
            .await
            .map_err(|e| self.write_error(e))?;
        info!(id, %address, "VLDB learner caught up; making it a voter");
        let voters = BTreeSet::from([id]);
        self.raft
            .change_membership(ChangeMembers::AddVoterIds(voters), false)
            .await
            .map_err(|e| self.write_error(e))?;
        info!(id, %address, "VLDB replica added");
        Ok(())
    }

    /// Refuses to add a replica that is not there, answers to another id, or has a log of
    /// its own: one started with `--peers` naming only itself bootstrapped a group of its
    /// own, whose entries would clash with this group's.
    async fn check_newcomer(&self, id: u64, address: &str) -> Result<(), ErrorCode> {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        if membership.get_node(&id).is_some() {
            return Ok(());
        }
        let cell = proto::CellConfig {
            name: self.cell_name.clone(),
            vlservers: vec![address.to_owned()],
            credentials: None,
        };
        let client = proto::VldbClient::new(
            cell,
            self.transport.clone(),
            proto::PeerKind::VldbReplica { id: self.id },
            Duration::from_secs(2),
        );
        let refuse = |reason: String| {
            warn!(id, %address, %reason, "VLDB membership change refused");
            Err(ErrorCode::BadMembership { reason })
        };
        let status = match client.replica_status(address).await {
            Ok(status) => status,
            Err(e) => {
                return refuse(format!(
                    "cannot reach replica {id} at {address} ({e}): start it first, with an \
                     empty --data, --id {id} and --peers listing this group's replicas and itself"
                ));
            }
        };
        if status.id != id {
            return refuse(format!(
                "the replica at {address} is replica {}, not {id}",
                status.id
            ));
        }
        if status.last_log_index.is_some() || !status.members.is_empty() {
            return refuse(format!(
                "replica {id} at {address} already has a log of its own (was it started with \
                 --peers naming only itself?): start it again with an empty --data and --peers \
                 listing this group's replicas and itself"
            ));
        }
        Ok(())
    }

    /// Removes voter `id` by joint consensus; it no longer counts for a quorum.
    pub(crate) async fn remove_member(&self, id: u64) -> Result<(), ErrorCode> {
        self.raft
            .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
            .await
            .map_err(|e| self.write_error(e))?;
        info!(id, "VLDB replica removed");
        Ok(())
    }

    /// Resolves once the replica stopped on its own (its log or tables failed), with
    /// why.
    pub async fn stopped(&self) -> String {
        let mut metrics = self.raft.metrics();
        loop {
            if let Err(e) = &metrics.borrow().running_state {
                return e.to_string();
            }
            if metrics.changed().await.is_err() {
                return "the Raft core ended".into();
            }
        }
    }

    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            error!(error = %e, "VLDB replica did not shut down cleanly");
        }
    }

    fn write_error(&self, error: RaftError<u64, ClientWriteError<u64, Node>>) -> ErrorCode {
        match error {
            RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => {
                self.not_leader(Some(&forward))
            }
            RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
                info!(error = %e, "VLDB membership change refused");
                ErrorCode::InvalidArgument
            }
            RaftError::Fatal(e) => stopped(&e),
        }
    }

    fn not_leader(
        &self,
        forward: Option<&openraft::error::ForwardToLeader<u64, Node>>,
    ) -> ErrorCode {
        let leader = forward
            .and_then(|f| f.leader_node.as_ref())
            .map(|node| node.addr.clone());
        ErrorCode::NotLeader { leader }
    }
}

/// Runs blocking storage `work` off the async runtime, as openraft's storage traits
/// want it: a failure, or the task's panic, is a `StorageError` made by `error`.
async fn off_runtime<T: Send + 'static>(
    error: fn(AnyError) -> StorageIOError<u64>,
    work: impl FnOnce() -> Result<T, VldbError> + Send + 'static,
) -> Result<T, StorageError<u64>> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| VldbError::Task(e.to_string()))
        .and_then(|r| r)
        .map_err(|e| StorageError::from(error(AnyError::new(&e))))
}

/// Logs each change of role, term or leader, until the replica stops.
async fn log_roles(mut metrics: tokio::sync::watch::Receiver<openraft::RaftMetrics<u64, Node>>) {
    let mut seen = None;
    loop {
        let now = {
            let m = metrics.borrow_and_update();
            (m.state, m.current_term, m.current_leader)
        };
        if seen != Some(now) {
            let (state, term, leader) = now;
            info!(?state, term, ?leader, "VLDB replica role");
            seen = Some(now);
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// Decodes `bytes` as every kind of thing a replica reads from a peer or from its disk:
/// each Raft message, a log entry, an applied mark. For fuzzing: it must never panic.
pub fn decode_untrusted(bytes: &[u8]) {
    let _ = postcard::from_bytes::<AppendEntriesRequest<TypeConfig>>(bytes);
    let _ = postcard::from_bytes::<VoteRequest<u64>>(bytes);
    let _ = postcard::from_bytes::<InstallSnapshotRequest<TypeConfig>>(bytes);
    let _ = postcard::from_bytes::<openraft::Entry<TypeConfig>>(bytes);
    let _ = postcard::from_bytes::<state_machine::Mark>(bytes);
}

fn stopped(error: &openraft::error::Fatal<u64>) -> ErrorCode {
    ErrorCode::Internal(format!("this VLDB replica has stopped: {error}"))
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Opens the tables and the log, refusing another cell's data or another bootstrap
/// membership, and turns a single VLDB's tables into this replica's first snapshot.
fn open(
    data_dir: &Path,
    id: u64,
    peers: &BTreeMap<u64, String>,
    peers_given: bool,
    cell_name: &str,
) -> Result<(Store, LogStore), VldbError> {
    std::fs::create_dir_all(data_dir).map_err(|source| VldbError::CreateDir {
        path: data_dir.to_owned(),
        source,
    })?;
    let store = Store::open(&data_dir.join(DATABASE_FILE), StoreLimits::default())?;
    let log = LogStore::open(&data_dir.join(LOG_FILE))?;
    match store.raft_value(RAFT_CELL)? {
        Some(found) if found != cell_name.as_bytes() => {
            return Err(VldbError::OtherCell {
                path: data_dir.to_owned(),
                found: String::from_utf8_lossy(&found).into_owned(),
                expected: cell_name.to_owned(),
            });
        }
        Some(_) => {}
        None => store.set_raft_value(RAFT_CELL, cell_name.as_bytes())?,
    }
    // A log that holds nothing yet takes whatever --peers it is given now.
    let bootstrapped = !log.is_pristine()?;
    match log.meta::<BTreeMap<u64, String>>(PEERS)? {
        Some(found) if peers_given && bootstrapped && &found != peers => {
            return Err(VldbError::OtherPeers {
                path: data_dir.to_owned(),
                found: peers_text(&found),
                given: peers_text(peers),
            });
        }
        Some(found) if &found == peers || !peers_given || bootstrapped => {}
        _ => log.set_meta(PEERS, peers)?,
    }
    if store.taken_over() {
        take_over(&store, &log, id, peers)?;
    } else if log.is_pristine()?
        && let Some(applied) = state_machine::read_mark(&store)?.applied
    {
        // A takeover that stopped between the tables' snapshot and the log's purge point.
        log.set_purged(applied)?;
        info!(log = %applied, "finished taking over a single VLDB's tables");
    }
    Ok((store, log))
}

/// A single VLDB's tables become the group's state at `TAKEOVER_INDEX`, as a snapshot
/// with the bootstrap membership: the other replicas receive them as that snapshot.
fn take_over(
    store: &Store,
    log: &LogStore,
    id: u64,
    peers: &BTreeMap<u64, String>,
) -> Result<(), VldbError> {
    if peers.keys().next() != Some(&id) || !log.is_pristine()? {
        return Err(VldbError::Config(format!(
            "this data directory holds a single VLDB's database: start it as the replica with \
             the lowest --id ({}) of a new group",
            peers.keys().next().copied().unwrap_or(id)
        )));
    }
    let log_id = LogId::new(openraft::CommittedLeaderId::new(0, 0), TAKEOVER_INDEX);
    let nodes: BTreeMap<u64, Node> = peers
        .iter()
        .map(|(id, address)| (*id, Node::new(address.clone())))
        .collect();
    let voters: BTreeSet<u64> = peers.keys().copied().collect();
    let membership = StoredMembership::new(Some(log_id), Membership::new(vec![voters], nodes));
    let meta = SnapshotMeta {
        last_log_id: Some(log_id),
        last_membership: membership,
        snapshot_id: "takeover".to_owned(),
    };
    let (_, image) = store.image()?;
    state_machine::install(store, &meta, image)?;
    log.set_purged(log_id)?;
    info!(
        ?peers,
        "a single VLDB's tables are now this replica's first snapshot"
    );
    Ok(())
}

fn peers_text(peers: &BTreeMap<u64, String>) -> String {
    peers
        .iter()
        .map(|(id, address)| format!("{id}={address}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
    use proto::{ServerId, VolumeName};

    use super::TypeConfig;
    use crate::command::Command;

    /// What the fuzz target runs, on a few thousand mutations of a real entry's bytes.
    #[test]
    fn untrusted_bytes_never_panic_the_decoders() {
        let entry: Entry<TypeConfig> = Entry {
            log_id: LogId::new(CommittedLeaderId::new(2, 3), 7),
            payload: EntryPayload::Blank,
        };
        let bytes = postcard::to_stdvec(&entry).unwrap();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..5_000 {
            let mut mutated = bytes.clone();
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let at = (seed as usize) % mutated.len();
            mutated[at] = (seed >> 32) as u8;
            mutated.truncate(1 + (seed as usize >> 8) % mutated.len());
            super::decode_untrusted(&mutated);
        }
    }

    /// The bytes of a log entry as `raft-log.redb` holds them: the leader id (term, node),
    /// the index, then the payload, postcard throughout. An openraft upgrade that changed
    /// them would make an old log unreadable: this fails first.
    #[test]
    fn a_log_entry_keeps_its_bytes() {
        let entry: Entry<TypeConfig> = Entry {
            log_id: LogId::new(CommittedLeaderId::new(2, 3), 7),
            payload: EntryPayload::Normal(Command::CreateEntry {
                name: VolumeName::parse("a").unwrap(),
                server: ServerId(uuid::Uuid::from_u128(1)),
            }),
        };
        let bytes = postcard::to_stdvec(&entry).unwrap();
        let mut expected = vec![2, 3, 7]; // term 2, node 3, index 7
        expected.extend([1, 1]); // EntryPayload::Normal (after Blank), Command::CreateEntry
        expected.extend([1, b'a']); // the name
        expected.push(16); // the server's uuid: 16 bytes
        expected.extend(uuid::Uuid::from_u128(1).as_bytes());
        assert_eq!(bytes, expected);
        let back: Entry<TypeConfig> = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back.log_id, entry.log_id);
    }
}
