//! `Network`: openraft's messages between VLDB replicas, in postcard inside
//! `Request::VlRaft` on the cell's ordinary framed connections, one per peer.
//! Invariant: a peer that cannot be reached is reported `Unreachable` (openraft backs off),
//! a connection that failed in transport is never used again, by any `Peer`, and at most
//! one connection attempt per peer address is under way, whatever the calls' deadlines.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use proto::rpc::{self, Connection, Limits};
use proto::{
    Hello, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN, PeerKind, ProtoError, RaftKind, Request,
    Response,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Node, TypeConfig};

/// How long a connection attempt to a peer may take. It runs in a task of its own: a
/// heartbeat's deadline (tens of milliseconds) may end before a TLS handshake does, and
/// the next call then finds the connection made instead of starting over.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Makes a `Peer` for each replica openraft replicates to. openraft makes a new one for
/// each replication stream and each quorum check, so the connections live here, one per
/// address, and every `Peer` to that address shares it.
pub(crate) struct Network {
    pub(crate) cell: String,
    pub(crate) id: u64,
    pub(crate) transport: proto::Transport,
    pub(crate) connections: Connections,
}

/// The open connection to each peer address.
pub(crate) type Connections = Arc<Mutex<HashMap<String, Attempt>>>;

/// A peer address's connection, or the attempt under way to make it: its outcome once
/// known (`None` until then).
pub(crate) type Attempt = watch::Receiver<Option<Result<Connection, String>>>;

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: u64, node: &Node) -> Peer {
        Peer {
            cell: self.cell.clone(),
            id: self.id,
            transport: self.transport.clone(),
            target,
            address: node.addr.clone(),
            connections: self.connections.clone(),
        }
    }
}

/// One replica, reached at its membership address.
pub(crate) struct Peer {
    cell: String,
    id: u64,
    transport: proto::Transport,
    target: u64,
    address: String,
    connections: Connections,
}

/// How a call failed: before anything was sent (the peer is unreachable) or after.
enum Failure {
    Unreachable(ProtoError),
    Network(ProtoError),
}

impl Peer {
    /// The open connection to the peer, or the one an attempt under way makes, waiting at
    /// most `timeout` for it; starts an attempt if none is open or under way.
    async fn connection(&mut self, timeout: Duration) -> Result<Connection, ProtoError> {
        let mut attempt = {
            let mut connections = self.connections.lock();
            let usable =
                connections
                    .get(&self.address)
                    .is_some_and(|attempt| match &*attempt.borrow() {
                        None => true,
                        Some(Ok(connection)) => !connection.is_closed(),
                        Some(Err(_)) => false,
                    });
            if !usable {
                connections.insert(self.address.clone(), self.start_attempt());
            }
            match connections.get(&self.address) {
                Some(attempt) => attempt.clone(),
                None => return Err(ProtoError::Closed),
            }
        };
        let outcome = tokio::time::timeout(timeout, attempt.wait_for(Option::is_some))
            .await
            .map_err(|_| ProtoError::Timeout(timeout))?
            .map_err(|_| ProtoError::Closed)?;
        match &*outcome {
            Some(Ok(connection)) => Ok(connection.clone()),
            Some(Err(why)) => Err(ProtoError::Io(std::io::Error::other(why.clone()))),
            None => Err(ProtoError::Closed),
        }
    }

    /// Connects to the peer in a task of its own, within `CONNECT_TIMEOUT`.
    fn start_attempt(&self) -> Attempt {
        let (outcome, attempt) = watch::channel(None);
        let hello = Hello {
            version_min: PROTOCOL_VERSION_MIN,
            version_max: PROTOCOL_VERSION_MAX,
            cell: self.cell.clone(),
            peer: PeerKind::VldbReplica { id: self.id },
        };
        let limits = Limits {
            handshake_timeout: CONNECT_TIMEOUT,
            ..Limits::default()
        };
        let (address, transport) = (self.address.clone(), self.transport.clone());
        tokio::spawn(async move {
            // Nothing is called back on this connection: dropping the incoming queue
            // answers anything the peer sends with `Unsupported`.
            let connected = rpc::connect(&address, hello, &limits, &transport).await;
            let _ = outcome.send(Some(
                connected
                    .map(|(connection, _reply, _incoming)| connection)
                    .map_err(|e| format!("{address}: {e}")),
            ));
        });
        attempt
    }

    /// Sends one Raft message and decodes the peer's `Result` for it.
    async fn send<Req: Serialize, Resp: DeserializeOwned>(
        &mut self,
        kind: RaftKind,
        message: &Req,
        option: &RPCOption,
    ) -> Result<Resp, Failure> {
        let timeout = option.hard_ttl();
        let payload =
            postcard::to_stdvec(message).map_err(|e| Failure::Network(ProtoError::Decode(e)))?;
        let connection = self
            .connection(timeout)
            .await
            .map_err(Failure::Unreachable)?;
        let answer = connection
            .call(Request::VlRaft { kind, payload }, timeout)
            .await;
        let bytes = match answer {
            Ok(Response::VlRaft(bytes)) => bytes,
            Ok(other) => {
                return Err(Failure::Network(ProtoError::Handshake(format!(
                    "a VLDB replica answered a Raft message with {}",
                    other.kind_name()
                ))));
            }
            Err(e) => {
                // A call that timed out leaves the connection sound: other streams to
                // this peer (heartbeats, a snapshot) share it, and the answer may still
                // come. Only a broken connection is dropped.
                if e.is_transport() && !matches!(e, ProtoError::Timeout(_)) {
                    connection.close();
                    let mut connections = self.connections.lock();
                    let broken = connections.get(&self.address).is_some_and(
                        |attempt| matches!(&*attempt.borrow(), Some(Ok(c)) if c.is_closed()),
                    );
                    if broken {
                        connections.remove(&self.address);
                    }
                }
                return Err(Failure::Network(e));
            }
        };
        postcard::from_bytes(&bytes).map_err(|e| Failure::Network(ProtoError::Decode(e)))
    }

    fn failed<E: std::error::Error>(&self, failure: Failure) -> RPCError<u64, Node, E> {
        match failure {
            Failure::Unreachable(e) => RPCError::Unreachable(Unreachable::new(&e)),
            Failure::Network(e) => RPCError::Network(NetworkError::new(&e)),
        }
    }

    fn remote<E: std::error::Error>(&self, error: E) -> RPCError<u64, Node, E> {
        RPCError::RemoteError(RemoteError::new(self.target, error))
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, Node, RaftError<u64>>> {
        let answer: Result<AppendEntriesResponse<u64>, RaftError<u64>> = self
            .send(RaftKind::AppendEntries, &rpc, &option)
            .await
            .map_err(|f| self.failed(f))?;
        answer.map_err(|e| self.remote(e))
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, Node, RaftError<u64, InstallSnapshotError>>,
    > {
        let answer: Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>> =
            self.send(RaftKind::InstallSnapshot, &rpc, &option)
                .await
                .map_err(|f| self.failed(f))?;
        answer.map_err(|e| self.remote(e))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, Node, RaftError<u64>>> {
        let answer: Result<VoteResponse<u64>, RaftError<u64>> = self
            .send(RaftKind::Vote, &rpc, &option)
            .await
            .map_err(|f| self.failed(f))?;
        answer.map_err(|e| self.remote(e))
    }
}
