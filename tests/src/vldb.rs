//! The VLDB as a Raft group of three replica processes (`vl-1`..`vl-3`) in end-to-end
//! tests: their status, kills and restarts, and proxies that cut one replica off.
//! Invariant: a replica always starts on its own address, data directory and --peers,
//! every address on 127.0.0.1.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use proto::frame::{FRAME_BYTES_MAX_DEFAULT, FRAME_HEADER_BYTES, decode_frame};
use proto::tls::Secured;
use proto::{
    CellConfig, Frame, Hello, PairEntry, PairName, PeerClass, PeerKind, Request, Response,
    Transport, VldbClient, VldbMemberStatus, VldbRole,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::pair::{self, CELL, PAIR};
use crate::{TestCell, log_len};

/// What serves a test cell's VLDB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VldbKind {
    /// One `vlserver` process: a group of one.
    #[default]
    Single,
    /// `REPLICAS` replicas, `vl-1`.., each on an address and a data directory of its own.
    Replicated,
    /// `Replicated`, every connection to a replica going through a proxy of its own (its
    /// address in --peers and in the cell file), so that `cut_replica` can cut it off.
    ReplicatedBehindProxies,
}

/// What a replica's Raft library logs at ERROR, among other lines, when a Raft message to
/// a peer fails in transport: the peer refused or closed the connection, at once or in
/// the middle of a call. A replica killed, stopped or cut off causes these in the others.
pub const PEER_DOWN: [&str; 2] = [
    "Unreachable node: proto::error::ProtoError",
    "NetworkError: proto::error::ProtoError",
];

/// What a replica says when its port is taken.
const ADDRESS_TAKEN: &str = "Address already in use";
/// How many times `start_replicas` tries new ports when one of them was taken.
const START_ATTEMPTS: u32 = 5;

/// How many replicas a replicated VLDB runs: a majority survives any one of them.
pub const REPLICAS: u64 = 3;

/// One replica of a test cell's VLDB group.
#[derive(Clone, Debug)]
pub struct VldbReplica {
    pub id: u64,
    /// Its address in --peers and in the cell file: where the other replicas and the
    /// cell's clients reach it.
    pub address: String,
    /// Where it listens: `address` itself, or the port behind its proxy.
    pub listen: String,
    /// Its data directory, in the cell's.
    pub data: PathBuf,
}

/// The name replica `id` runs under (its log is `<name>.log`).
pub fn replica_name(id: u64) -> String {
    format!("vl-{id}")
}

/// What the VLDB replica at `address` says of itself (`VlStatus`).
pub fn vldb_status(transport: &Transport, address: &str) -> Result<VldbMemberStatus> {
    match pair::call(transport, address, None, Request::VlStatus) {
        Ok(Response::VlStatus(status)) => Ok(status),
        Ok(other) => bail!("{address} answered VlStatus with {}", other.kind_name()),
        Err(e) => Err(e).with_context(|| format!("ask the VLDB replica at {address}")),
    }
}

/// Runs `future` to completion on a runtime of its own.
pub fn block_on<F: std::future::Future>(future: F) -> Result<F::Output> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start a runtime")?;
    Ok(runtime.block_on(future))
}

impl TestCell {
    /// Starts the `REPLICAS` replicas of a new group on addresses reserved here, each
    /// with a data directory `vl-N.data` in the cell's; writes the cell file naming them.
    pub(crate) fn start_replicas(&mut self, kind: VldbKind) -> Result<()> {
        if kind == VldbKind::ReplicatedBehindProxies {
            let credentials = PathBuf::from(self.credentials_arg());
            let transport = Transport::from_dir(&credentials, PeerClass::Server)?;
            self.replica_proxies = Some(ReplicaProxies::new(transport).add_all(REPLICAS)?);
        }
        for id in 1..=REPLICAS {
            // Stopped together, a replica may find a peer gone before it goes itself.
            for pattern in PEER_DOWN {
                self.tripwire
                    .expect_while_stopping(&replica_name(id), pattern);
            }
        }
        let mut attempt = 1;
        while let AddressTaken::Yes(id) = self.start_new_group()? {
            if attempt == START_ATTEMPTS {
                bail!("{ADDRESS_TAKEN}: replica {id}'s port, {attempt} times");
            }
            // Another process took a reserved port before its replica bound it: a new
            // group, on new ports.
            attempt += 1;
            let names: Vec<String> = self.replicas.iter().map(|r| replica_name(r.id)).collect();
            let (started, others) = std::mem::take(&mut self.procs)
                .into_iter()
                .partition(|p| names.contains(&p.name));
            self.procs = others;
            self.stop_procs_together(started);
            for replica in self.replicas.drain(..) {
                let _ = std::fs::remove_dir_all(&replica.data);
            }
        }
        self.vl_address = self.replicas[0].address.clone();
        let addresses: Vec<String> = self
            .replicas
            .iter()
            .map(|r| format!("{:?}", r.address))
            .collect();
        std::fs::write(
            &self.cell_file,
            format!(
                "name = \"{CELL}\"\nvlservers = [{}]\n",
                addresses.join(", ")
            ),
        )?;
        Ok(())
    }

    /// One attempt of `start_replicas`: reserves the replicas' ports and starts them.
    fn start_new_group(&mut self) -> Result<AddressTaken> {
        let listen = reserve_addresses(REPLICAS as usize)?;
        for (id, listen) in (1..=REPLICAS).zip(listen) {
            let address = match self.replica_proxies.as_ref() {
                Some(proxies) => proxies.aim(id, &listen)?,
                None => listen.clone(),
            };
            let data = self.dir.path().join(format!("vl-{id}.data"));
            self.replicas.push(VldbReplica {
                id,
                address,
                listen,
                data,
            });
        }
        // The lowest id bootstraps the group and at once asks the others for votes: they
        // listen first, so that no vote request finds a port closed.
        for id in (1..=REPLICAS).rev() {
            let from = log_len(&self.log_path(&replica_name(id)));
            if let Err(e) = self.restart_replica(id) {
                let log = std::fs::read(self.log_path(&replica_name(id))).unwrap_or_default();
                let started = log.get(from as usize..).unwrap_or_default();
                if String::from_utf8_lossy(started).contains(ADDRESS_TAKEN) {
                    return Ok(AddressTaken::Yes(id));
                }
                return Err(e);
            }
        }
        Ok(AddressTaken::No)
    }

    /// Declares that every replica may log `PEER_DOWN` lines: the test kills, stops or
    /// cuts off a replica.
    pub fn expect_peers_down(&self) {
        for replica in &self.replicas {
            for pattern in PEER_DOWN {
                self.expect_error_from(&replica_name(replica.id), pattern);
            }
        }
    }

    /// Replica `id` of the cell's VLDB group.
    pub fn replica(&self, id: u64) -> Result<&VldbReplica> {
        self.replicas
            .iter()
            .find(|r| r.id == id)
            .with_context(|| format!("no VLDB replica {id}"))
    }

    /// Starts replica `id` again — on its address, in its data directory, with the
    /// group's --peers — once it was killed, stopped or exited on its own; waits until
    /// it listens.
    pub fn restart_replica(&mut self, id: u64) -> Result<()> {
        let replica = self.replica(id)?.clone();
        let name = replica_name(id);
        if let Some(index) = self.procs.iter().rposition(|p| p.name == name) {
            if self.procs[index].child.try_wait()?.is_none() {
                bail!("{name} still runs");
            }
            self.procs.remove(index);
        }
        let peers: Vec<String> = self
            .replicas
            .iter()
            .map(|r| format!("{}={}", r.id, r.address))
            .collect();
        let data = replica.data.to_string_lossy().into_owned();
        let id_arg = id.to_string();
        let peers = peers.join(",");
        let credentials = self.credentials_arg();
        self.spawn_ready(
            &name,
            &[
                "vlserver",
                "--data",
                &data,
                "--listen",
                &replica.listen,
                "--cell-name",
                CELL,
                "--credentials",
                &credentials,
                "--id",
                &id_arg,
                "--peers",
                &peers,
            ],
        )?;
        Ok(())
    }

    /// Kills replica `id` with SIGKILL and reaps it.
    pub fn kill_replica(&mut self, id: u64) -> Result<()> {
        let name = replica_name(id);
        self.signal(&name, libc::SIGKILL)?;
        self.await_exit(&name, Duration::from_secs(10))
            .with_context(|| format!("{name} did not exit after SIGKILL"))?;
        Ok(())
    }

    /// Stops replica `id` as an admin would (SIGTERM, then SIGKILL).
    pub fn stop_replica(&mut self, id: u64) {
        self.stop(&replica_name(id));
    }

    /// Stops every replica together (SIGTERM to each, then waits for each), as a
    /// machine's shutdown would.
    pub fn stop_replicas(&mut self) {
        let names: Vec<String> = self.replicas.iter().map(|r| replica_name(r.id)).collect();
        let (replicas, others) = std::mem::take(&mut self.procs)
            .into_iter()
            .partition(|p| names.contains(&p.name));
        self.procs = others;
        self.stop_procs_together(replicas);
    }

    /// What replica `id` says of itself, asked where it listens (past its proxy).
    pub fn replica_status(&self, id: u64) -> Result<VldbMemberStatus> {
        vldb_status(&self.transport, &self.replica(id)?.listen)
    }

    /// The leader every replica that answers agrees on, waiting up to `limit` for a
    /// majority of the group to answer and name one.
    pub fn vldb_leader(&self, limit: Duration) -> Result<u64> {
        let ids: Vec<u64> = self.replicas.iter().map(|r| r.id).collect();
        self.vldb_leader_among(&ids, limit)
    }

    /// The leader that the replicas `ids` that answer agree on — one of them, saying it
    /// leads — waiting up to `limit` for a majority of the group among them to answer.
    pub fn vldb_leader_among(&self, ids: &[u64], limit: Duration) -> Result<u64> {
        let deadline = Instant::now() + limit;
        loop {
            let answers: Vec<VldbMemberStatus> = ids
                .iter()
                .filter_map(|id| self.replica_status(*id).ok())
                .filter(|s| s.role != VldbRole::Shutdown)
                .collect();
            if let Some(leader) = agreed_leader(&answers)
                && answers.len() as u64 > REPLICAS / 2
            {
                return Ok(leader);
            }
            if Instant::now() > deadline {
                bail!("replicas {ids:?} agreed on no leader within {limit:?}: {answers:#?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `limit` until the whole group is whole: every replica answers, all
    /// follow one leader, and each has applied the leader's last log index.
    pub fn await_whole_group(&self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let whole = self.group_is_whole();
            match whole {
                Ok(true) => return Ok(()),
                Ok(false) | Err(_) if Instant::now() <= deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    let statuses: Vec<_> = self
                        .replicas
                        .iter()
                        .map(|r| (r.id, self.replica_status(r.id)))
                        .collect();
                    bail!(
                        "the VLDB group was not whole within {limit:?} ({whole:?}): {statuses:#?}"
                    );
                }
            }
        }
    }

    /// One look at the group: the leader's last index first, then every replica's
    /// applied index against it.
    fn group_is_whole(&self) -> Result<bool> {
        let answers = self
            .replicas
            .iter()
            .map(|r| self.replica_status(r.id))
            .collect::<Result<Vec<_>>>()?;
        let Some(leader) = agreed_leader(&answers) else {
            return Ok(false);
        };
        let last = self.replica_status(leader)?.last_log_index;
        for replica in &self.replicas {
            let status = self.replica_status(replica.id)?;
            let follows = status.leader.as_ref().map(|(id, _)| *id) == Some(leader);
            if !follows || status.role == VldbRole::Shutdown || status.applied_index < last {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// A VLDB client of the cell's, as an admin tool is.
    pub fn vldb_client(&self, timeout: Duration) -> Result<VldbClient> {
        let config = CellConfig::load(&self.cell_file)?;
        Ok(VldbClient::new(
            config,
            self.transport.clone(),
            PeerKind::Admin,
            timeout,
        ))
    }

    /// A VLDB client that shows the cell's server certificate, as a fileserver (a pair
    /// member) does.
    pub fn vldb_client_as_server(&self, timeout: Duration) -> Result<VldbClient> {
        let config = CellConfig::load(&self.cell_file)?;
        let credentials = config.credentials_dir();
        Ok(VldbClient::new(
            config,
            proto::Transport::from_dir(&credentials, proto::PeerClass::Server)?,
            PeerKind::Admin,
            timeout,
        ))
    }

    /// The pair `PAIR` as the VLDB's leader records it.
    pub fn pair_entry(&self) -> Result<PairEntry> {
        let client = self.vldb_client(Duration::from_secs(10))?;
        let pair = PairName::parse(PAIR)?;
        block_on(client.get_pair(&pair))?.context("ask the VLDB for the pair")
    }

    /// Cuts replica `id` off: its proxy closes every connection, open or new, and the
    /// other replicas' proxies close every connection it dials. Only the port it listens
    /// on still reaches it.
    pub fn cut_replica(&self, id: u64) -> Result<()> {
        self.replica_proxies
            .as_ref()
            .context("the VLDB replicas are not behind proxies")?
            .cut(id);
        Ok(())
    }

    /// Ends `cut_replica(id)`: new connections from and to it go through again.
    pub fn heal_replica(&self, id: u64) -> Result<()> {
        self.replica_proxies
            .as_ref()
            .context("the VLDB replicas are not behind proxies")?
            .heal(id);
        Ok(())
    }
}

/// Whether a replica found its reserved port taken when it started, and which.
enum AddressTaken {
    No,
    Yes(u64),
}

/// The leader `answers` all name, if it is among them and says it leads.
fn agreed_leader(answers: &[VldbMemberStatus]) -> Option<u64> {
    let (leader, _) = answers.first()?.leader.clone()?;
    let all_follow = answers
        .iter()
        .all(|s| s.leader.as_ref().map(|(id, _)| *id) == Some(leader));
    let leads = answers
        .iter()
        .any(|s| s.id == leader && s.role == VldbRole::Leader);
    (all_follow && leads).then_some(leader)
}

/// `count` distinct addresses on 127.0.0.1 free right now: for replicas that must know
/// each other's addresses before any of them listens.
fn reserve_addresses(count: usize) -> Result<Vec<String>> {
    let listeners = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .context("reserve a port on 127.0.0.1")?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.to_string()))
        .collect()
}

/// One loopback proxy in front of each replica. Each ends the TLS of every connection it
/// accepts and reads its first frame — the `Hello` — to learn whether another replica
/// dialled it, so that cutting replica N closes its own proxy's connections and those N
/// dialled; it goes on to the replica over TLS of its own, with the cell's server
/// certificate.
pub(crate) struct ReplicaProxies {
    /// Both of the proxy's TLS ends: the server certificate of the test cell.
    transport: Transport,
    /// Each proxy's address, by the id of the replica behind it.
    addresses: BTreeMap<u64, String>,
    state: Arc<Mutex<ProxyState>>,
    stop: Arc<AtomicBool>,
    acceptors: Vec<JoinHandle<()>>,
}

#[derive(Default)]
struct ProxyState {
    /// Where each replica listens, by id.
    targets: BTreeMap<u64, SocketAddr>,
    /// The replicas cut off.
    cut: BTreeSet<u64>,
    /// The connections forwarded now, by a number of their own.
    open: HashMap<u64, Forwarded>,
    next: u64,
}

/// One forwarded connection: to replica `to`, dialled by replica `from` if a replica
/// dialled it; its client and server streams.
struct Forwarded {
    to: u64,
    from: Option<u64>,
    streams: [TcpStream; 2],
}

impl Forwarded {
    fn shutdown(&self) {
        for stream in &self.streams {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

impl ReplicaProxies {
    fn new(transport: Transport) -> ReplicaProxies {
        ReplicaProxies {
            transport,
            addresses: BTreeMap::new(),
            state: Arc::default(),
            stop: Arc::default(),
            acceptors: Vec::new(),
        }
    }

    /// Starts a proxy in front of each of replicas 1..=`count`; it listens from now on,
    /// so that its address stays the replica's.
    fn add_all(mut self, count: u64) -> Result<ReplicaProxies> {
        for id in 1..=count {
            self.add(id)?;
        }
        Ok(self)
    }

    /// Starts the proxy in front of replica `id`.
    fn add(&mut self, id: u64) -> Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        self.addresses
            .insert(id, listener.local_addr()?.to_string());
        let (state, stop) = (self.state.clone(), self.stop.clone());
        let transport = self.transport.clone();
        self.acceptors.push(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let state = state.clone();
                        let transport = transport.clone();
                        std::thread::spawn(move || forward(client, id, &state, &transport));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => {}
                }
            }
        }));
        Ok(())
    }

    /// Points the proxy in front of replica `id` at `target`, where it listens; returns
    /// the proxy's address.
    fn aim(&self, id: u64, target: &str) -> Result<String> {
        let address = self
            .addresses
            .get(&id)
            .with_context(|| format!("no proxy for replica {id}"))?;
        lock(&self.state).targets.insert(id, target.parse()?);
        Ok(address.clone())
    }

    fn cut(&self, id: u64) {
        let mut state = lock(&self.state);
        state.cut.insert(id);
        state.open.retain(|_, forwarded| {
            let through = forwarded.to == id || forwarded.from == Some(id);
            if through {
                forwarded.shutdown();
            }
            !through
        });
    }

    fn heal(&self, id: u64) {
        lock(&self.state).cut.remove(&id);
    }
}

impl Drop for ReplicaProxies {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for (_, forwarded) in lock(&self.state).open.drain() {
            forwarded.shutdown();
        }
        for acceptor in self.acceptors.drain(..) {
            let _ = acceptor.join();
        }
    }
}

/// Forwards one connection accepted in front of replica `to` to where it listens, unless
/// a replica cut off is at either end.
fn forward(client: TcpStream, to: u64, state: &Mutex<ProxyState>, transport: &Transport) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let (Ok(runtime), Ok(client_end)) = (runtime, client.try_clone()) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let key = runtime.block_on(async {
        let Some((mut client, hello, from)) = accept_hello(client, transport).await else {
            let _ = client_end.shutdown(Shutdown::Both);
            return None;
        };
        let target = {
            let state = lock(state);
            match state.targets.get(&to) {
                Some(target) if !is_cut(&state, to, from) => *target,
                _ => {
                    let _ = client_end.shutdown(Shutdown::Both);
                    return None;
                }
            }
        };
        let Some((mut server, server_end)) = connect_with(target, &hello, transport).await else {
            let _ = client_end.shutdown(Shutdown::Both);
            return None;
        };
        let key = {
            let mut state = lock(state);
            let forwarded = Forwarded {
                to,
                from,
                streams: [client_end, server_end],
            };
            // Checked again under the lock that `cut` takes: a cut meanwhile is not missed.
            if is_cut(&state, to, from) {
                forwarded.shutdown();
                return None;
            }
            state.next += 1;
            let key = state.next;
            state.open.insert(key, forwarded);
            key
        };
        // The Hello went ahead; the rest flows both ways until either end closes.
        tokio::join!(
            pipe(&mut client.read, &mut server.write),
            pipe(&mut server.read, &mut client.write),
        );
        Some(key)
    });
    if let Some(key) = key
        && let Some(forwarded) = lock(state).open.remove(&key)
    {
        forwarded.shutdown();
    }
}

/// True when a replica at either end of a connection is cut off.
fn is_cut(state: &ProxyState, to: u64, from: Option<u64>) -> bool {
    state.cut.contains(&to) || from.is_some_and(|from| state.cut.contains(&from))
}

/// Copies until `from` ends, then ends `to`.
async fn pipe(from: &mut (impl AsyncReadExt + Unpin), to: &mut (impl AsyncWriteExt + Unpin)) {
    let _ = tokio::io::copy(from, to).await;
    let _ = to.shutdown().await;
}

/// Accepts the TLS of `client` and reads its first frame, whole; returns the stream, the
/// frame's bytes and the replica that sent it, if a replica did. `None` if it is not a
/// frame within a few seconds.
async fn accept_hello(
    client: TcpStream,
    transport: &Transport,
) -> Option<(Secured, Vec<u8>, Option<u64>)> {
    client.set_nonblocking(true).ok()?;
    let client = tokio::net::TcpStream::from_std(client).ok()?;
    let reading = async {
        let mut client = transport.accept(client).await.ok()?;
        let mut frame = vec![0u8; FRAME_HEADER_BYTES];
        client.read.read_exact(&mut frame).await.ok()?;
        let length = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
        if length > FRAME_BYTES_MAX_DEFAULT {
            return None;
        }
        frame.resize(FRAME_HEADER_BYTES + length, 0);
        client
            .read
            .read_exact(&mut frame[FRAME_HEADER_BYTES..])
            .await
            .ok()?;
        Some((client, frame))
    };
    let (client, frame) = tokio::time::timeout(Duration::from_secs(5), reading)
        .await
        .ok()??;
    let from = match decode_frame(&frame[FRAME_HEADER_BYTES..]) {
        Ok(Frame::Hello(Hello {
            peer: PeerKind::VldbReplica { id },
            ..
        })) => Some(id),
        _ => None,
    };
    Some((client, frame, from))
}

/// Connects to `target` over TLS and sends `hello` on; returns the stream and a handle on
/// its socket for `cut`.
async fn connect_with(
    target: SocketAddr,
    hello: &[u8],
    transport: &Transport,
) -> Option<(Secured, TcpStream)> {
    let connecting = async {
        let server = tokio::net::TcpStream::connect(target).await.ok()?;
        let handle = server.into_std().ok()?;
        let server_end = handle.try_clone().ok()?;
        let server = tokio::net::TcpStream::from_std(handle).ok()?;
        let mut server = transport.connect(server).await.ok()?;
        server.write.write_all(hello).await.ok()?;
        server.write.flush().await.ok()?;
        Some((server, server_end))
    };
    tokio::time::timeout(Duration::from_secs(2), connecting)
        .await
        .ok()?
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
