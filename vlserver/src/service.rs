//! `VldbService`: answers VLDB requests on connections accepted by
//! `proto::server::serve`: changes through the replica's log, reads from its tables, and
//! Raft messages from its peers.
//! Invariant: store errors become `ErrorCode`s here, and storage failures are logged
//! here, once; with a token key, every change to the cell but a fileserver's own
//! registration and pair lease calls is refused to a caller that may not administer it.

use std::sync::Arc;
use std::time::Duration;

use proto::rpc::{self, Connection};
use proto::server::Service;
use proto::{ErrorCode, Hello, HelloReply, PairName, PeerKind, Request, Response, Timestamp};
use proto::{Identity, TokenKey, TokenVerifier};
use tracing::{debug, error};

use crate::command::{Applied, Command};
use crate::error::VldbError;
use crate::login::Logins;
use crate::replica::Replica;
use crate::store::Store;

pub struct VldbService {
    replica: Arc<Replica>,
    cell_name: String,
    logins: Logins,
    verifier: Option<TokenVerifier>,
}

impl VldbService {
    /// A VLDB without a token key: it issues no tokens and, for now, lets any caller
    /// change the cell.
    pub fn new(replica: Arc<Replica>, cell_name: String) -> VldbService {
        let logins = Logins::new(
            None,
            cell_name.clone(),
            proto::identity::TOKEN_LIFETIME_DEFAULT,
        );
        VldbService {
            replica,
            cell_name,
            logins,
            verifier: None,
        }
    }

    /// Issues tokens signed with `key`, living at most `lifetime_max`, verifies them on
    /// requests, and lets only administrators change the cell.
    pub fn with_token_key(mut self, key: TokenKey, lifetime_max: Duration) -> VldbService {
        self.logins = Logins::new(Some(key), self.cell_name.clone(), lifetime_max);
        self.verifier = self.logins.verifier();
        self
    }

    /// Whether `caller` may make `request`: with a token key, a change to the cell needs
    /// an administrator (a user may set its own password); lookups, and a fileserver's
    /// registration and pair lease calls, are open to all.
    fn permitted(&self, caller: &Identity, request: &Request) -> Result<(), ErrorCode> {
        if self.verifier.is_none() || caller.may_administer_cell() {
            return Ok(());
        }
        match request {
            Request::PtsSetPassword { user, .. } if caller.user.as_deref() == Some(user) => Ok(()),
            Request::VlCreateEntry { .. }
            | Request::VlRemoveEntry { .. }
            | Request::VlAddMember { .. }
            | Request::VlRemoveMember { .. }
            | Request::PtsCreateUser { .. }
            | Request::PtsSetPassword { .. }
            | Request::PtsCreateGroup { .. }
            | Request::PtsAddUser { .. }
            | Request::PtsRemoveUser { .. }
            | Request::PtsDelete { .. }
            // A fileserver's own calls: made with its server certificate.
            | Request::VlRegisterServer { .. }
            | Request::VlJoinPair { .. }
            | Request::VlAcquirePair { .. }
            | Request::VlRenewPair { .. }
            | Request::VlReleasePair { .. } => Err(ErrorCode::AdministratorRequired),
            _ => Ok(()),
        }
    }

    async fn pts_change(&self, command: Command) -> Result<Response, ErrorCode> {
        match self.propose(command).await? {
            Applied::PtsEntry(entry) => Ok(Response::PtsEntry(entry)),
            Applied::Done => Ok(Response::Ok),
            other => Err(unexpected(&other)),
        }
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
    fn token_verifier(&self) -> Option<&TokenVerifier> {
        self.verifier.as_ref()
    }

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
        caller: Arc<Identity>,
        request: Request,
    ) -> Result<Response, ErrorCode> {
        let started = tokio::time::Instant::now();
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
            debug!(peer = %connection.peer_addr(), caller = caller.name(), ?request, "VLDB request");
        }
        if let Err(refused) = self.permitted(&caller, &request) {
            debug!(peer = %connection.peer_addr(), caller = caller.name(),
                "refusing a change to the cell: not an administrator");
            return Err(refused);
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
            Request::PtsCreateUser { name, id, password } => {
                // Hashed here, on the replica that proposes: the log carries the hash.
                let password = match password {
                    Some(password) => Some(self.logins.hash(password.0).await?),
                    None => None,
                };
                self.pts_change(Command::PtsCreateUser { name, id, password })
                    .await
            }
            Request::PtsSetPassword { user, password } => {
                let password = self.logins.hash(password.0).await?;
                self.pts_change(Command::PtsSetPassword { user, password })
                    .await
            }
            Request::PtsCreateGroup { name, id } => {
                self.pts_change(Command::PtsCreateGroup { name, id }).await
            }
            Request::PtsAddUser { user, group } => {
                self.pts_change(Command::PtsAddUser { user, group }).await
            }
            Request::PtsRemoveUser { user, group } => {
                self.pts_change(Command::PtsRemoveUser { user, group })
                    .await
            }
            Request::PtsDelete { name } => self.pts_change(Command::PtsDelete { name }).await,
            Request::PtsMembership { name } => self
                .read(move |s| s.pts_membership(&name))
                .await
                .map(Response::PtsEntries),
            Request::PtsListEntries => self
                .read(|s| s.pts_entries())
                .await
                .map(Response::PtsEntries),
            Request::Login {
                user,
                password,
                lifetime_secs,
            } => {
                let name = user.clone();
                let credentials = self.read(move |s| s.pts_credentials(&name)).await?;
                self.logins
                    .login(
                        &user,
                        password.0,
                        credentials,
                        lifetime_secs.map(Duration::from_secs),
                        connection.peer_addr(),
                        started,
                    )
                    .await
                    .map(Response::Token)
            }
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
