//! In-process benchmarks behind `holdfast bench`: real fileservers on scratch partitions
//! driven over RPC, or the server's recovery and snapshot code on a generated state.
//! Invariant: a benchmark only measures: it prints and asserts nothing, and stops the
//! server it started and removes its scratch partition even when it fails.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use proto::rpc::{self, Connection, Limits};
use proto::tls::TlsError;
use proto::tls::authority::CellAuthority;
use proto::{
    ByteRange, CellConfig, ClientId, Fid, Hello, InstanceNonce, LockKind, LockOwnerId,
    PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN, PeerClass, PeerKind, ProtoError, Request, Response,
    Transport, Uniquifier, VnodeId, VolumeId, VolumeName,
};
use state::journaled::{
    CallbackModel, ClientEntry, LockEntry, Promises, StateRecord, StateSnapshot,
};
use state::{ClientKey, GraceConfig, JournalMode, Lock, LockOwner, LockTableConfig};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::callbacks::Callbacks;
use crate::error::FileServerError;
use crate::locks::Locks;
use crate::restart;
use crate::sessions::Sessions;
use crate::state_journal::{StateJournal, StateJournalError};
use crate::storage::Partition;
use crate::storage::metadata_log::LOG_DIR;
use crate::{Config, Stats};

const CELL: &str = "bench.cell";
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections the lock owners are spread over.
const LOCK_CONNECTIONS_MAX: usize = 8;
const FETCH_CLIENTS: usize = 4;
/// Requests each fetching client keeps in flight.
const FETCH_TASKS_PER_CLIENT: usize = 4;
const FETCH_FILES: usize = 32;
const VOLUME: VolumeId = VolumeId(1);
/// Recovered promises must outlive the benchmark, or restore skips them.
const PROMISE_LIFETIME: Duration = Duration::from_secs(3600);

/// Why a benchmark could not produce its figure.
#[derive(Debug, Error)]
pub enum BenchError {
    #[error("bench: {op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("bench: fileserver: {0}")]
    Server(#[from] FileServerError),
    #[error("bench: fileserver task failed: {0}")]
    Task(String),
    #[error("bench: {op}: {source}")]
    Rpc {
        op: &'static str,
        #[source]
        source: ProtoError,
    },
    #[error("bench: {op}: unexpected reply {reply}")]
    Unexpected { op: &'static str, reply: String },
    #[error("bench: {0}")]
    Journal(#[from] StateJournalError),
}

fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> BenchError {
    move |source| BenchError::Io { op, source }
}

fn tls_error(e: TlsError) -> BenchError {
    BenchError::Task(format!("make the bench's certificates: {e}"))
}

fn rpc_error(op: &'static str) -> impl FnOnce(ProtoError) -> BenchError {
    move |source| BenchError::Rpc { op, source }
}

/// Lock-and-release pairs per second: `owners` lock owners spread over up to 8 cache
/// manager connections, each looping `SetLock` (exclusive, whole file, a fid of its own)
/// then `ReleaseLock` for `duration`. Every grant and release is journaled per `mode`.
pub async fn lock_pairs_per_second(
    mode: JournalMode,
    owners: usize,
    duration: Duration,
) -> Result<f64, BenchError> {
    let server = BenchServer::start(mode).await?;
    let result = lock_pairs(&server.address, &server.client, owners.max(1), duration).await;
    server.stop().await?;
    result
}

async fn lock_pairs(
    address: &str,
    transport: &Transport,
    owners: usize,
    duration: Duration,
) -> Result<f64, BenchError> {
    let mut connections = Vec::new();
    for _ in 0..owners.min(LOCK_CONNECTIONS_MAX) {
        connections.push(connect_client(address, transport).await?);
    }
    let pairs = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = JoinSet::new();
    for owner in 0..owners {
        let connection = connections[owner % connections.len()].clone();
        let pairs = pairs.clone();
        tasks.spawn(async move {
            let owner_id = LockOwnerId(owner as u64);
            let fid = bench_fid(owner);
            while Instant::now() < deadline {
                let set = Request::SetLock {
                    fid,
                    owner: owner_id,
                    range: ByteRange::whole(),
                    kind: LockKind::Exclusive,
                    wait: false,
                    pid: 1,
                };
                expect_ok(&connection, set, "SetLock").await?;
                let release = Request::ReleaseLock {
                    fid,
                    owner: owner_id,
                    range: ByteRange::whole(),
                };
                expect_ok(&connection, release, "ReleaseLock").await?;
                pairs.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<(), BenchError>(())
        });
    }
    join_all(tasks).await?;
    let elapsed = started.elapsed().as_secs_f64();
    for connection in &connections {
        connection.close();
    }
    Ok(pairs.load(Ordering::Relaxed) as f64 / elapsed)
}

/// `FetchStatus` calls per second on 32 existing files from 4 concurrent cache managers
/// (4 requests in flight each) for `duration`. Each call grants a callback; the journal
/// writes a record only when a promise's rounded expiry moves, so `mode` should barely
/// matter: compare `Sync` against `None`.
pub async fn fetch_status_per_second(
    mode: JournalMode,
    duration: Duration,
) -> Result<f64, BenchError> {
    let server = BenchServer::start(mode).await?;
    let result = fetch_status(&server.address, &server.client, duration).await;
    server.stop().await?;
    result
}

async fn fetch_status(
    address: &str,
    transport: &Transport,
    duration: Duration,
) -> Result<f64, BenchError> {
    create_volume(address, transport).await?;
    let mut clients = Vec::new();
    for _ in 0..FETCH_CLIENTS {
        clients.push(connect_client(address, transport).await?);
    }
    let mut fids = Vec::new();
    for index in 0..FETCH_FILES {
        let create = Request::Create {
            dir: Fid::root(VOLUME),
            name: format!("file-{index}"),
            mode: 0o644,
            uid: 0,
            gid: 0,
            exclusive: true,
        };
        let reply = clients[0]
            .call(create, CALL_TIMEOUT)
            .await
            .map_err(rpc_error("Create"))?;
        match reply {
            Response::Status { status, .. } | Response::Entry { status, .. } => {
                fids.push(status.fid)
            }
            other => return Err(unexpected("Create", &other)),
        }
    }
    let fids: Arc<[Fid]> = fids.into();
    let calls = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = JoinSet::new();
    for (index, connection) in clients
        .iter()
        .flat_map(|c| std::iter::repeat_n(c, FETCH_TASKS_PER_CLIENT))
        .enumerate()
    {
        let (connection, fids, calls) = (connection.clone(), fids.clone(), calls.clone());
        tasks.spawn(async move {
            let mut next = index;
            while Instant::now() < deadline {
                let fid = fids[next % fids.len()];
                next += 1;
                let reply = connection
                    .call(Request::FetchStatus { fid }, CALL_TIMEOUT)
                    .await
                    .map_err(rpc_error("FetchStatus"))?;
                if !matches!(reply, Response::Status { .. }) {
                    return Err(unexpected("FetchStatus", &reply));
                }
                calls.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        });
    }
    join_all(tasks).await?;
    let elapsed = started.elapsed().as_secs_f64();
    for connection in &clients {
        connection.close();
    }
    Ok(calls.load(Ordering::Relaxed) as f64 / elapsed)
}

/// What [`recovery`] measured.
#[derive(Clone, Debug)]
pub struct RecoveryFigures {
    /// The state actually built (locks are capped at the lock table's limit).
    pub callbacks: usize,
    pub locks: usize,
    pub clients: usize,
    /// Generating the state and writing it as a snapshot (not part of recovery).
    pub build: Duration,
    pub snapshot_bytes: u64,
    /// Opening the journal, decoding and replaying it, and installing the tables: what
    /// `run` does before it serves.
    pub recovery: Duration,
    /// How long the tables stayed locked while the start-up snapshot was captured.
    pub snapshot_pause_max: Duration,
    /// Encoding and writing that snapshot, off the tables' locks.
    pub snapshot_write: Duration,
    /// Resident memory per promise of the callback state alone: the same promises and
    /// the clients holding them, no locks. Measured on a recovery of its own, before
    /// (and torn down before) the whole state's, since one resident-memory figure
    /// cannot be split between tables. Counts what the tables hold: free memory the
    /// allocator kept (the decoded snapshot) is returned first, see `resident_bytes`.
    /// The process's other threads (a test harness) add noise.
    pub callback_bytes_per_promise: f64,
    /// The same over the whole recovered state (promises, locks and clients, and
    /// grace's list of the recovered locks), divided by the promise count.
    pub state_bytes_per_promise: f64,
}

/// Builds a state of `callbacks` promises, `locks` whole-file locks and `clients`
/// clients, writes it as a snapshot through the server's own journal types (no RPCs; the
/// fids are made up: recovery does not check vnodes, so none exist), then times the
/// server's start-up recovery of it, the table pause of the snapshot it takes right
/// after, and the memory the recovered tables take; the memory of the callback state
/// alone is measured on a recovery of that state without the locks, done first.
/// Blocking; a million promises take tens of seconds in a debug build.
pub fn recovery(
    callbacks: usize,
    locks: usize,
    clients: usize,
) -> Result<RecoveryFigures, BenchError> {
    let clients = clients.max(1);
    let locks = locks.min(LockTableConfig::default().lock_count_max);
    let alone = Recovered::build(callbacks, 0, clients)?;
    let callback_grown = alone.resident_grown;
    alone.close();

    let whole = Recovered::build(callbacks, locks, clients)?;
    let stats = Stats::default();
    restart::snapshot(&whole.callbacks, &whole.locks, &stats);
    let snapshot_pause_max = Duration::from_micros(stats.snapshot_pause_max_us());
    let (build, snapshot_bytes, recovery) = (whole.build, whole.snapshot_bytes, whole.recovery);
    let state_grown = whole.resident_grown;
    // Closing waits for the snapshot thread to finish writing.
    let snapshot_write = whole.close();
    let per_promise = |grown: u64| grown as f64 / callbacks.max(1) as f64;
    Ok(RecoveryFigures {
        callbacks,
        locks,
        clients,
        build,
        snapshot_bytes,
        recovery,
        snapshot_pause_max,
        snapshot_write,
        callback_bytes_per_promise: per_promise(callback_grown),
        state_bytes_per_promise: per_promise(state_grown),
    })
}

/// Live tables recovered from a generated state on a scratch partition, and what
/// building and recovering them took.
struct Recovered {
    journal: Arc<StateJournal>,
    callbacks: Arc<Callbacks>,
    locks: Locks,
    build: Duration,
    snapshot_bytes: u64,
    recovery: Duration,
    /// Growth of resident memory over the recovery.
    resident_grown: u64,
    /// The partition whose log the journal appends to.
    _partition: Partition,
    /// Declared last: removed after the journal living in it is dropped.
    _scratch: ScratchDir,
}

impl Recovered {
    fn build(callbacks: usize, locks: usize, clients: usize) -> Result<Recovered, BenchError> {
        let scratch = ScratchDir::new()?;
        let build_started = Instant::now();
        write_state(scratch.path(), callbacks, locks, clients)?;
        let build = build_started.elapsed();
        let snapshot_bytes = snapshot_bytes(&scratch.path().join(LOG_DIR))?;

        let resident_before = resident_bytes();
        let started = Instant::now();
        let (partition, journal, recovered) =
            StateJournal::open_partition(scratch.path(), JournalMode::Sync)?;
        let journal = Arc::new(journal);
        let sessions = Arc::new(Sessions::new(clients, Duration::from_secs(2)));
        let callback_tables = Arc::new(Callbacks::new(
            callbacks.max(1),
            state::delayed_breaks::FIDS_PER_CLIENT_MAX_DEFAULT,
            sessions.clone(),
            journal.clone(),
        ));
        let lock_tables = Locks::new(sessions, journal.clone(), state::lock_table::LEASE_DEFAULT);
        restart::restore(
            &callback_tables,
            &lock_tables,
            recovered,
            GraceConfig::default(),
            JournalMode::Sync,
        );
        let recovery = started.elapsed();
        let resident_after = resident_bytes();
        Ok(Recovered {
            journal,
            callbacks: callback_tables,
            locks: lock_tables,
            build,
            snapshot_bytes,
            recovery,
            resident_grown: resident_after.saturating_sub(resident_before),
            _partition: partition,
            _scratch: scratch,
        })
    }

    /// Closes the journal, drops the tables and removes the scratch partition; returns
    /// how long the close waited for snapshots still being written.
    fn close(self) -> Duration {
        let started = Instant::now();
        self.journal.close();
        started.elapsed()
    }
}

/// Writes the generated state as the snapshot at the journal's first record.
fn write_state(
    partition: &Path,
    callbacks: usize,
    locks: usize,
    clients: usize,
) -> Result<(), BenchError> {
    let client_key = |index: usize| ClientKey((index % clients) as u32);
    let snapshot_clients: Vec<ClientEntry> = (0..clients)
        .map(|index| ClientEntry {
            key: ClientKey(index as u32),
            client: ClientId::random(),
            instance: InstanceNonce(1),
        })
        .collect();
    let lock_entries: Vec<LockEntry> = (0..locks)
        .map(|index| LockEntry {
            fid: bench_fid(index),
            lock: Lock {
                owner: LockOwner {
                    client: client_key(index),
                    owner: LockOwnerId(index as u64),
                },
                range: ByteRange::whole(),
                kind: LockKind::Exclusive,
            },
            pid: 1,
        })
        .collect();
    let expiry_ms = wall_ms() + PROMISE_LIFETIME.as_millis() as u64;
    let model = CallbackModel {
        promises: Promises::from(
            (0..callbacks)
                .map(|index| ((bench_fid(index), client_key(index)), expiry_ms))
                .collect::<Vec<_>>(),
        ),
        ..CallbackModel::default()
    };
    let (_partition, journal, _) = StateJournal::open_partition(partition, JournalMode::None)?;
    // A snapshot sits at the last record handed over; give it one to sit at.
    let first = &snapshot_clients[0];
    let admitted = StateRecord::ClientAdmitted {
        key: first.key,
        client: first.client,
        instance: first.instance,
    };
    let _ = journal.record(&admitted, false);
    journal.snapshot(Box::new(move || {
        Some(StateSnapshot {
            clients: snapshot_clients,
            locks: lock_entries,
            callbacks: model,
            ..StateSnapshot::default()
        })
    }));
    journal.close();
    Ok(())
}

fn snapshot_bytes(dir: &Path) -> Result<u64, BenchError> {
    let mut bytes = 0;
    for entry in std::fs::read_dir(dir).map_err(io("list the state directory"))? {
        let entry = entry.map_err(io("list the state directory"))?;
        if entry.file_name().to_string_lossy().ends_with(".snap") {
            bytes += entry.metadata().map_err(io("stat the snapshot"))?.len();
        }
    }
    Ok(bytes)
}

/// Resident memory of this process, from `/proc/self/statm`; 0 where unavailable. With
/// glibc, the free memory its allocator keeps for reuse is returned to the system first,
/// so that the figure is what is live rather than what was freed lately.
fn resident_bytes() -> u64 {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only hands free pages of glibc's heaps back to the kernel; it
    // takes the allocator's own locks and touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
    let Ok(statm) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|field| field.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf only reads a configuration value.
    let page_bytes = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page_bytes).unwrap_or(4096)
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}

/// A made-up fid per index (vnodes from 2: vnode 1 is a volume root).
fn bench_fid(index: usize) -> Fid {
    Fid {
        volume: VolumeId(2),
        vnode: VnodeId(index as u64 + 2),
        unique: Uniquifier(1),
    }
}

fn unexpected(op: &'static str, reply: &Response) -> BenchError {
    BenchError::Unexpected {
        op,
        reply: format!("{reply:?}"),
    }
}

async fn expect_ok(
    connection: &Connection,
    request: Request,
    op: &'static str,
) -> Result<(), BenchError> {
    match connection
        .call(request, CALL_TIMEOUT)
        .await
        .map_err(rpc_error(op))?
    {
        Response::Ok => Ok(()),
        other => Err(unexpected(op, &other)),
    }
}

async fn join_all(mut tasks: JoinSet<Result<(), BenchError>>) -> Result<(), BenchError> {
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        let result = joined
            .map_err(|e| BenchError::Task(e.to_string()))
            .and_then(|r| r);
        if let Err(e) = result {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

fn hello(peer: PeerKind) -> Hello {
    Hello {
        version_min: PROTOCOL_VERSION_MIN,
        version_max: PROTOCOL_VERSION_MAX,
        cell: CELL.into(),
        peer,
    }
}

/// A cache manager connection that acknowledges every push (breaks, resets, grants).
async fn connect_client(address: &str, transport: &Transport) -> Result<Connection, BenchError> {
    let peer = PeerKind::CacheManager {
        client: ClientId::random(),
        instance: InstanceNonce(1),
    };
    let (connection, _, mut incoming) =
        rpc::connect(address, hello(peer), &Limits::default(), transport)
            .await
            .map_err(rpc_error("connect"))?;
    tokio::spawn(async move {
        while let Some(request) = incoming.recv().await {
            let (_, _, replier) = request.into_parts();
            replier.reply(Ok(Response::Ok)).await;
        }
    });
    Ok(connection)
}

async fn create_volume(address: &str, transport: &Transport) -> Result<(), BenchError> {
    let (admin, _, _) = rpc::connect(
        address,
        hello(PeerKind::Admin),
        &Limits::default(),
        transport,
    )
    .await
    .map_err(rpc_error("connect as admin"))?;
    let name = VolumeName::parse("root.cell").map_err(|e| BenchError::Unexpected {
        op: "name the volume",
        reply: format!("{e:?}"),
    })?;
    let request = Request::CreateVolume {
        id: VOLUME,
        name,
        quota_bytes: 0,
    };
    let reply = admin
        .try_call_as(Some(&admin_token()), &request, CALL_TIMEOUT)
        .await
        .unwrap_or(Err(ProtoError::Closed))
        .map_err(rpc_error("CreateVolume"))?;
    if let Err(e) = open_to_anyone(&admin).await {
        admin.close();
        return Err(e);
    }
    admin.close();
    match reply {
        Response::Volume(_) => Ok(()),
        other => Err(unexpected("CreateVolume", &other)),
    }
}

/// The key of the bench servers' tokens: fixed, as the servers live in this process on
/// scratch partitions and nothing outside sees them.
fn bench_token_key() -> proto::TokenKey {
    proto::TokenKey::from_secret([7; 32])
}

/// Gives `system:anyuser` every right on the volume's root, as its administrator: the
/// figures measure the protocol, with the access checks made as always.
/// The bench cell's administrator's token.
fn admin_token() -> proto::SealedToken {
    let now = proto::Timestamp::now();
    bench_token_key().seal(proto::TokenBody {
        cell: CELL.into(),
        user: "admin".into(),
        id: proto::PrincipalId(1),
        groups: vec![proto::PrincipalId::ADMINISTRATORS],
        issued: now,
        expiry: proto::Timestamp {
            secs: now.secs + 24 * 3600,
            nanos: 0,
        },
        key_id: 0,
    })
}

async fn open_to_anyone(admin: &Connection) -> Result<(), BenchError> {
    let token = admin_token();
    let mut acl = proto::AccessList::for_new_volume();
    acl.set(proto::PrincipalId::ANYUSER, proto::Rights::ALL, false);
    let request = Request::StoreAcl {
        dir: Fid::root(VOLUME),
        acl,
    };
    match admin
        .try_call_as(Some(&token), &request, CALL_TIMEOUT)
        .await
        .unwrap_or(Err(proto::ProtoError::Closed))
        .map_err(rpc_error("StoreAcl"))?
    {
        Response::Status { .. } => Ok(()),
        other => Err(unexpected("StoreAcl", &other)),
    }
}

/// A fileserver on a scratch partition and 127.0.0.1:0.
struct BenchServer {
    address: String,
    /// A client host's transport under the server's CA.
    client: Transport,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), FileServerError>>,
    _partition: ScratchDir,
}

impl BenchServer {
    async fn start(mode: JournalMode) -> Result<BenchServer, BenchError> {
        let partition = ScratchDir::new()?;
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(io("bind 127.0.0.1:0"))?;
        let address = listener
            .local_addr()
            .map_err(io("read the bound address"))?
            .to_string();
        // No VLDB listens there: registration retries in the background, harmlessly.
        let cell = CellConfig {
            name: CELL.into(),
            vlservers: vec!["127.0.0.1:1".into()],
            credentials: None,
        };
        let authority = CellAuthority::generate(CELL).map_err(tls_error)?;
        let server = authority
            .transport(PeerClass::Server, "bench-fileserver")
            .map_err(tls_error)?;
        let client = authority
            .transport(PeerClass::Host, "bench-client")
            .map_err(tls_error)?;
        let mut config = Config::new(
            partition.path().to_owned(),
            cell,
            server,
            vec![address.clone()],
        );
        config.journal_mode = mode;
        config.tokens = crate::Tokens(Some(bench_token_key().verifier(CELL)));
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(crate::run(config, listener, shutdown));
        Ok(BenchServer {
            address,
            client,
            stop,
            task,
            _partition: partition,
        })
    }

    async fn stop(self) -> Result<(), BenchError> {
        // The server may have stopped on its own (an error); its result says why.
        let _ = self.stop.send(true);
        self.task
            .await
            .map_err(|e| BenchError::Task(e.to_string()))??;
        Ok(())
    }
}

/// A partition directory under the system's temporary directory, removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> Result<ScratchDir, BenchError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "holdfast-bench-{}-{}-{}",
            std::process::id(),
            wall_ms(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::env::temp_dir().join(name);
        std::fs::create_dir(&path).map_err(io("create a scratch partition"))?;
        Ok(ScratchDir(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        // Best effort: a leftover scratch directory in /tmp harms nothing.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
