//! A client of the VLDB's Raft group: follows `NotLeader` hints to the leader, tries the
//! cell's other replicas in turn, and keeps the connection that answered for later calls.
//! Invariant: a call ends within the client's timeout, retries included; a request goes
//! again after a transport failure only if `Request::safe_to_resend`, and never on that
//! connection; one that was never sent (the replica had closed the connection while it
//! was idle) goes on a new connection, whatever it is.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;
use tracing::debug;

use crate::cell::CellConfig;
use crate::error::{ErrorCode, ProtoError};
use crate::identity::SealedToken;
use crate::ids::{Epoch, ServerId};
use crate::message::{
    Hello, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN, PairEntry, PeerKind, Request, Response,
    ServerEntry, VldbMemberStatus, VolumeEntry, VolumeRef,
};
use crate::name::{PairName, VolumeName};
use crate::rpc::{self, Connection, Limits};
use crate::tls::Transport;

/// The pause after a round of attempts that reached no leader: short, since an election
/// takes a few hundred milliseconds, and doubling so that a long one is not polled hard.
const BACKOFF_FIRST: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_millis(40);

/// Talks to the VLDB of one cell.
pub struct VldbClient {
    cell: CellConfig,
    transport: Transport,
    peer: PeerKind,
    timeout: Duration,
    /// The replica the last call reached (the leader, after any write).
    current: Mutex<Option<Replica>>,
    /// The cell address the next attempt without a leader hint tries. It outlives a call,
    /// so that a dead replica costs one attempt per client rather than one per call.
    next_address: AtomicUsize,
    /// The token every call carries (`with_token`); none: calls act for
    /// `system:anyuser`, or for this side's server certificate.
    token: Option<SealedToken>,
}

#[derive(Clone)]
struct Replica {
    address: String,
    connection: Connection,
}

impl VldbClient {
    /// `timeout` bounds each call as a whole: connecting, following the leader, backing
    /// off while there is none, and resending. A connection attempt gets at most half of
    /// it, so that one replica that swallows packets leaves time to try another.
    pub fn new(
        cell: CellConfig,
        transport: Transport,
        peer: PeerKind,
        timeout: Duration,
    ) -> VldbClient {
        VldbClient {
            cell,
            transport,
            peer,
            timeout,
            current: Mutex::new(None),
            next_address: AtomicUsize::new(0),
            token: None,
        }
    }

    /// Makes every call of this client for the holder of `token` (`holdfast login`'s, or
    /// one signed with `--localauth`).
    pub fn with_token(mut self, token: Option<SealedToken>) -> VldbClient {
        self.token = token;
        self
    }

    pub fn cell(&self) -> &CellConfig {
        &self.cell
    }

    /// Sends one request to the leader, or to any replica that answers it. `NotLeader`
    /// is followed to the replica it names, or else to the cell's next address, backing
    /// off after each round of the cell's addresses; after a transport failure the
    /// request is sent again only if it is safe to (`Request::safe_to_resend`). When the
    /// timeout passes, the error of the last attempt is returned.
    pub async fn call(&self, request: Request) -> Result<Response, ProtoError> {
        if self.cell.vlservers.is_empty() {
            return Err(ProtoError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("the cell {} names no vlserver", self.cell.name),
            )));
        }
        let deadline = Instant::now() + self.timeout;
        let mut last_error = None;
        let outcome =
            tokio::time::timeout_at(deadline, self.attempts(&request, deadline, &mut last_error))
                .await;
        // Cut off while waiting for the slot, a connection or an answer: the last
        // definite failure says more than the deadline does.
        outcome.unwrap_or_else(|_| Err(last_error.unwrap_or(ProtoError::Timeout(self.timeout))))
    }

    /// The attempts of one call, each recording its failure in `last_error`.
    async fn attempts(
        &self,
        request: &Request,
        deadline: Instant,
        last_error: &mut Option<ProtoError>,
    ) -> Result<Response, ProtoError> {
        let round = self.cell.vlservers.len();
        let mut attempts_in_round = 0;
        let mut backoff = BACKOFF_FIRST;
        let mut leader_hint: Option<String> = None;
        loop {
            if attempts_in_round == round {
                attempts_in_round = 0;
                tokio::time::sleep_until((Instant::now() + backoff).min(deadline)).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            if Instant::now() >= deadline {
                return Err(last_error
                    .take()
                    .unwrap_or(ProtoError::Timeout(self.timeout)));
            }
            attempts_in_round += 1;
            let replica = match self.replica(leader_hint.take(), deadline).await {
                Ok(replica) => replica,
                Err(e) if e.is_transport() => {
                    debug!(error = %e, "VLDB replica unreachable; trying another");
                    *last_error = Some(self.whole_call(e, deadline));
                    continue;
                }
                Err(e) => return Err(e),
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            let Ok(answer) = replica
                .connection
                .try_call_as(self.token.as_ref(), request, remaining)
                .await
            else {
                // The replica closed this connection (it was idle, or made room) before
                // the request went out: nothing was sent, so a new connection takes it.
                debug!(replica = %replica.address, "VLDB connection closed while idle; reconnecting");
                self.forget(&replica.connection).await;
                leader_hint = Some(replica.address);
                attempts_in_round -= 1;
                continue;
            };
            match answer {
                Err(ProtoError::Remote(ErrorCode::NotLeader { leader })) => {
                    debug!(replica = %replica.address, ?leader, "VLDB replica is not the leader");
                    // Nothing was applied. The connection stays open for the calls
                    // already on it, and closes when the last of them is done.
                    self.forget(&replica.connection).await;
                    leader_hint = leader.clone().filter(|hint| *hint != replica.address);
                    *last_error = Some(ProtoError::Remote(ErrorCode::NotLeader { leader }));
                }
                Err(e) if e.is_transport() => {
                    replica.connection.close();
                    self.forget(&replica.connection).await;
                    let e = self.whole_call(e, deadline);
                    if !request.safe_to_resend() {
                        return Err(e);
                    }
                    debug!(replica = %replica.address, error = %e, "VLDB call failed; resending");
                    *last_error = Some(e);
                }
                result => return result,
            }
        }
    }

    /// The replica to try next: the one `leader_hint` names, else the one the last call
    /// reached while its connection lives, else the cell's next address.
    async fn replica(
        &self,
        leader_hint: Option<String>,
        deadline: Instant,
    ) -> Result<Replica, ProtoError> {
        // Held while connecting, so that concurrent calls share one new connection.
        let mut slot = self.current.lock().await;
        if let Some(current) = slot.as_ref().filter(|current| {
            !current.connection.is_closed()
                && leader_hint
                    .as_ref()
                    .is_none_or(|hint| *hint == current.address)
        }) {
            return Ok(current.clone());
        }
        let address = match leader_hint {
            Some(hint) => hint,
            None => {
                let next = self.next_address.fetch_add(1, Ordering::Relaxed);
                self.cell.vlservers[next % self.cell.vlservers.len()].clone()
            }
        };
        let budget = deadline
            .saturating_duration_since(Instant::now())
            .min(self.timeout / 2);
        let connection = self.connect(&address, budget).await?;
        let replica = Replica {
            address,
            connection,
        };
        *slot = Some(replica.clone());
        Ok(replica)
    }

    /// Stops offering `connection` to later calls.
    async fn forget(&self, connection: &Connection) {
        let mut slot = self.current.lock().await;
        if slot
            .as_ref()
            .is_some_and(|current| current.connection.same(connection))
        {
            *slot = None;
        }
    }

    /// Connects to `address` within `budget`. An I/O error names the address.
    async fn connect(&self, address: &str, budget: Duration) -> Result<Connection, ProtoError> {
        let limits = Limits {
            handshake_timeout: budget,
            ..Limits::default()
        };
        let hello = Hello {
            version_min: PROTOCOL_VERSION_MIN,
            version_max: PROTOCOL_VERSION_MAX,
            cell: self.cell.name.clone(),
            peer: self.peer.clone(),
        };
        match rpc::connect(address, hello, &limits, &self.transport).await {
            // The VLDB never calls us: dropping the incoming queue answers anything it
            // sends with `Unsupported`.
            Ok((connection, _reply, _incoming)) => Ok(connection),
            Err(ProtoError::Io(e)) => Err(ProtoError::Io(std::io::Error::new(
                e.kind(),
                format!("{address}: {e}"),
            ))),
            Err(e) => Err(e),
        }
    }

    /// An attempt that timed out at the call's deadline reports the call's timeout, not
    /// the part of it that was left for the attempt.
    fn whole_call(&self, error: ProtoError, deadline: Instant) -> ProtoError {
        match error {
            ProtoError::Timeout(_) if Instant::now() >= deadline => {
                ProtoError::Timeout(self.timeout)
            }
            other => other,
        }
    }

    /// Asks the replica at `address`, and only it, for its status: no leader following
    /// and no retry, on a connection of its own that is closed afterwards, within the
    /// client's timeout.
    pub async fn replica_status(&self, address: &str) -> Result<VldbMemberStatus, ProtoError> {
        let deadline = Instant::now() + self.timeout;
        let asked = tokio::time::timeout_at(deadline, async {
            let connection = self.connect(address, self.timeout).await?;
            let remaining = deadline.saturating_duration_since(Instant::now());
            let answer = connection.call(Request::VlStatus, remaining).await;
            connection.close();
            answer
        })
        .await
        .unwrap_or(Err(ProtoError::Timeout(self.timeout)));
        match asked.map_err(|e| self.whole_call(e, deadline))? {
            Response::VlStatus(status) => Ok(status),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn register_server(
        &self,
        server: ServerId,
        addresses: Vec<String>,
    ) -> Result<(), ProtoError> {
        match self
            .call(Request::VlRegisterServer { server, addresses })
            .await?
        {
            Response::Ok | Response::Server(_) => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn list_servers(&self) -> Result<Vec<ServerEntry>, ProtoError> {
        match self.call(Request::VlListServers).await? {
            Response::Servers(servers) => Ok(servers),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn create_entry(
        &self,
        name: VolumeName,
        server: ServerId,
    ) -> Result<VolumeEntry, ProtoError> {
        match self.call(Request::VlCreateEntry { name, server }).await? {
            Response::VolumeEntry(entry) => Ok(entry),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn remove_entry(&self, volume: VolumeRef) -> Result<(), ProtoError> {
        match self.call(Request::VlRemoveEntry { volume }).await? {
            Response::Ok => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn get_entry(&self, volume: VolumeRef) -> Result<VolumeEntry, ProtoError> {
        match self.call(Request::VlGetEntry { volume }).await? {
            Response::VolumeEntry(entry) => Ok(entry),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn list_entries(&self) -> Result<Vec<VolumeEntry>, ProtoError> {
        match self.call(Request::VlListEntries).await? {
            Response::VolumeEntries(entries) => Ok(entries),
            other => Err(unexpected(&other)),
        }
    }

    /// Joins `pair` as the member reachable at `member`, serving the partition of
    /// `server`; joining again is a no-op.
    pub async fn join_pair(
        &self,
        pair: &PairName,
        server: ServerId,
        member: &str,
    ) -> Result<(), ProtoError> {
        let request = Request::VlJoinPair {
            pair: pair.clone(),
            server,
            member: member.to_owned(),
        };
        match self.call(request).await? {
            Response::Ok => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Asks for the lease of epoch `epoch + 1`; returns the granted epoch and lease. The
    /// caller measures the lease from before this call, never from the answer.
    pub async fn acquire_pair(
        &self,
        pair: &PairName,
        member: &str,
        epoch: Epoch,
        lease: Duration,
    ) -> Result<(Epoch, Duration), ProtoError> {
        let request = Request::VlAcquirePair {
            pair: pair.clone(),
            member: member.to_owned(),
            epoch,
            lease_ms: duration_ms(lease),
        };
        lease_answer(self.call(request).await?)
    }

    /// Extends the lease of `epoch` by `lease` from when the VLDB handles the call.
    pub async fn renew_pair(
        &self,
        pair: &PairName,
        member: &str,
        epoch: Epoch,
        lease: Duration,
    ) -> Result<(Epoch, Duration), ProtoError> {
        let request = Request::VlRenewPair {
            pair: pair.clone(),
            member: member.to_owned(),
            epoch,
            lease_ms: duration_ms(lease),
        };
        lease_answer(self.call(request).await?)
    }

    /// Gives the lease of `epoch` up at once, to `successor` if named.
    pub async fn release_pair(
        &self,
        pair: &PairName,
        member: &str,
        epoch: Epoch,
        successor: Option<&str>,
    ) -> Result<(), ProtoError> {
        let request = Request::VlReleasePair {
            pair: pair.clone(),
            member: member.to_owned(),
            epoch,
            successor: successor.map(str::to_owned),
        };
        match self.call(request).await? {
            Response::Ok => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn get_pair(&self, pair: &PairName) -> Result<PairEntry, ProtoError> {
        match self.call(Request::VlGetPair { pair: pair.clone() }).await? {
            Response::Pair(entry) => Ok(entry),
            other => Err(unexpected(&other)),
        }
    }
    /// The status of the replica this client reaches: the leader after any write.
    pub async fn status(&self) -> Result<VldbMemberStatus, ProtoError> {
        match self.call(Request::VlStatus).await? {
            Response::VlStatus(status) => Ok(status),
            other => Err(unexpected(&other)),
        }
    }

    /// Adds replica `id` at `address` to the VLDB's group: as a learner that catches up
    /// first, then as a voter. Answered once the new membership is committed.
    pub async fn add_member(&self, id: u64, address: &str) -> Result<(), ProtoError> {
        let request = Request::VlAddMember {
            id,
            address: address.to_owned(),
        };
        match self.call(request).await? {
            Response::Ok | Response::VlStatus(_) => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Removes replica `id` from the voters (joint consensus); removing the leader makes
    /// another replica lead.
    pub async fn remove_member(&self, id: u64) -> Result<(), ProtoError> {
        match self.call(Request::VlRemoveMember { id }).await? {
            Response::Ok | Response::VlStatus(_) => Ok(()),
            other => Err(unexpected(&other)),
        }
    }
}

fn lease_answer(response: Response) -> Result<(Epoch, Duration), ProtoError> {
    match response {
        Response::PairLease { epoch, lease_ms } => Ok((epoch, Duration::from_millis(lease_ms))),
        other => Err(unexpected(&other)),
    }
}

fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The error for a response of the wrong kind: a peer bug, reported as internal.
pub fn unexpected(response: &Response) -> ProtoError {
    ProtoError::Remote(ErrorCode::Internal(format!(
        "unexpected response {}",
        response.kind_name()
    )))
}
