//! `VldbService`: answers VLDB requests on connections accepted by
//! `proto::server::serve`: changes through the replica's log, reads from its tables, and
//! Raft messages from its peers.
//! Invariant: store errors become `ErrorCode`s here, and storage failures are logged
//! here, once.

use std::sync::Arc;
use std::time::Duration;

use proto::Identity;
use proto::rpc::{self, Connection};
use proto::server::Service;
use proto::{ErrorCode, Hello, HelloReply, PairName, PeerKind, Request, Response, Timestamp};
use tracing::{debug, error};

use crate::command::{Applied, Command};
use crate::error::VldbError;
use crate::replica::Replica;
use crate::store::Store;

pub struct VldbService {
    replica: Arc<Replica>,
    cell_name: String,
}

impl VldbService {
    pub fn new(replica: Arc<Replica>, cell_name: String) -> VldbService {
        VldbService { replica, cell_name }
    }

    /// Runs a blocking store operation off the async runtime.
    async fn with_store<T: Send + 'static>(
        &self,
        operation: impl FnOnce(&Store) -> Result<T, VldbError> + Send + 'static,
    ) -> Result<T, ErrorCode> {
        let store = self.replica.store().clone();
        let outcome = tokio::task::spawn_blocking(move || operation(&store))
            .await
            .unwrap_or_else(|e| Err(VldbError::Task(e.to_string())));
        outcome.map_err(|e| {
            if !matches!(e, VldbError::Refused(_)) {
                error!(error = %e, "VLDB request failed");
            }
            e.code()
        })
    }

    /// A read from this replica's tables, if it follows a leader.
    async fn read<T: Send + 'static>(
        &self,
        operation: impl FnOnce(&Store) -> Result<T, VldbError> + Send + 'static,
    ) -> Result<T, ErrorCode> {
        self.replica.may_read()?;
        self.with_store(operation).await
    }

    /// Proposes `command` once it passed the size checks its apply would make (in
    /// memory: no disk is read).
    async fn propose(&self, command: Command) -> Result<Applied, ErrorCode> {
        self.replica
            .store()
            .check_proposal(&command)
            .map_err(|e| e.code())?;
        self.replica.write(command).await
    }

    /// A pair decision: the leader checks it on its clock, after applying everything
    /// committed before, then proposes it; `check` (on the pairs in memory) returns the
    /// command to propose.
    async fn decide(
        &self,
        check: impl FnOnce(&Store, state::Millis) -> Result<Command, VldbError>,
    ) -> Result<Applied, ErrorCode> {
        self.replica.linearizable().await?;
        let command = check(self.replica.store(), self.replica.now()).map_err(|e| e.code())?;
        self.propose(command).await
    }
}

impl Service for VldbService {
    fn hello(&self, hello: &Hello) -> Result<HelloReply, ErrorCode> {
        let version = rpc::negotiate(hello, &self.cell_name)?;
        Ok(HelloReply {
            version,
            server: None,
        })
    }

    async fn handle(
        self: Arc<Self>,
        connection: Connection,
        hello: Arc<Hello>,
        _caller: Arc<Identity>,
        request: Request,
    ) -> Result<Response, ErrorCode> {
        // Raft messages only from a replica, membership changes only from an admin:
        // a cache manager or a fileserver can do neither.
        let allowed = match (&request, &hello.peer) {
            (Request::VlRaft { .. }, PeerKind::VldbReplica { .. }) => true,
            (Request::VlRaft { .. }, _) => false,
            (Request::VlAddMember { .. } | Request::VlRemoveMember { .. }, peer) => {
                matches!(peer, PeerKind::Admin)
            }
            _ => true,
        };
        if !allowed {
            debug!(peer = %connection.peer_addr(), kind = ?hello.peer, "refusing a request this peer may not make");
            return Err(ErrorCode::PermissionDenied);
        }
        if !matches!(request, Request::VlRaft { .. }) {
            debug!(peer = %connection.peer_addr(), ?request, "VLDB request");
        }
        match request {
            Request::Ping => Ok(Response::Pong),
            Request::VlRaft { kind, payload } => self
                .replica
                .raft_message(kind, &payload)
                .await
                .map(Response::VlRaft),
            Request::VlStatus => Ok(Response::VlStatus(self.replica.status())),
            Request::VlAddMember { id, address } => self
                .replica
                .add_member(id, address)
                .await
                .map(|()| Response::Ok),
            Request::VlRemoveMember { id } => {
                self.replica.remove_member(id).await.map(|()| Response::Ok)
            }
            Request::VlRegisterServer { server, addresses } => {
                let command = Command::RegisterServer {
                    server,
                    addresses,
                    registered: Timestamp::now(),
                };
                match self.propose(command).await? {
                    Applied::Server(entry) => Ok(Response::Server(entry)),
                    other => Err(unexpected(&other)),
                }
            }
            Request::VlListServers => self.read(|s| s.servers()).await.map(Response::Servers),
            Request::VlCreateEntry { name, server } => {
                match self.propose(Command::CreateEntry { name, server }).await? {
                    Applied::VolumeEntry(entry) => Ok(Response::VolumeEntry(entry)),
                    other => Err(unexpected(&other)),
                }
            }
            Request::VlRemoveEntry { volume } => self
                .propose(Command::RemoveEntry { volume })
                .await
                .map(|_| Response::Ok),
            Request::VlGetEntry { volume } => self
                .read(move |s| s.entry(&volume))
                .await
                .map(Response::VolumeEntry),
            Request::VlListEntries => self
                .read(|s| s.entries())
                .await
                .map(Response::VolumeEntries),
            Request::VlJoinPair {
                pair,
                server,
                member,
            } => {
                let command = Command::JoinPair {
                    pair,
                    server,
                    member,
                    registered: Timestamp::now(),
                };
                self.propose(command).await.map(|_| Response::Ok)
            }
            Request::VlAcquirePair {
                pair,
                member,
                epoch,
                lease_ms,
            } => {
                let lease = Duration::from_millis(lease_ms);
                let applied = self
                    .decide(move |s, now| {
                        let seq = s.pairs.check_acquire(&pair, &member, epoch, lease, now)?;
                        Ok(Command::AcquirePair {
                            pair,
                            member,
                            epoch,
                            seq,
                            lease_ms,
                        })
                    })
                    .await?;
                lease_answer(applied, lease_ms)
            }
            Request::VlRenewPair {
                pair,
                member,
                epoch,
                lease_ms,
            } => {
                let lease = Duration::from_millis(lease_ms);
                let applied = self
                    .decide(move |s, now| {
                        s.pairs.check_renew(&pair, &member, epoch, lease, now)?;
                        Ok(Command::RenewPair {
                            pair,
                            member,
                            epoch,
                            lease_ms,
                        })
                    })
                    .await?;
                lease_answer(applied, lease_ms)
            }
            Request::VlReleasePair {
                pair,
                member,
                epoch,
                successor,
            } => self
                .decide(move |s, now| {
                    s.pairs.check_holder(&pair, &member, epoch, now)?;
                    Ok(Command::ReleasePair {
                        pair,
                        member,
                        epoch,
                        successor,
                    })
                })
                .await
                .map(|_| Response::Ok),
            Request::VlGetPair { pair } => self.pair(pair).await.map(Response::Pair),
            _ => Err(ErrorCode::Unsupported),
        }
    }
}

impl VldbService {
    /// A pair as the leader sees it: its lease's remaining time is the leader's.
    async fn pair(&self, pair: PairName) -> Result<proto::PairEntry, ErrorCode> {
        self.replica.linearizable().await?;
        self.replica
            .store()
            .pair(&pair, self.replica.now())
            .map_err(|e| e.code())
    }
}

fn lease_answer(applied: Applied, lease_ms: u64) -> Result<Response, ErrorCode> {
    match applied {
        Applied::Epoch(epoch) => Ok(Response::PairLease { epoch, lease_ms }),
        other => Err(unexpected(&other)),
    }
}

/// An outcome that does not fit its command: a bug, reported rather than trusted.
fn unexpected(applied: &Applied) -> ErrorCode {
    error!(?applied, "a VLDB command applied to an unexpected outcome");
    ErrorCode::Internal("unexpected VLDB outcome".into())
}
