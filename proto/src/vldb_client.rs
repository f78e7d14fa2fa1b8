//! A client of the VLDB: one connection to the first of the cell's vlservers that
//! answers, replaced on the next call after a transport failure.
//! Invariant: a call is never retried here (each caller owns its retry policy), and a
//! connection that failed in transport is never used again.

use std::time::Duration;

use tokio::sync::Mutex;

use crate::cell::CellConfig;
use crate::error::{ErrorCode, ProtoError};
use crate::ids::{Epoch, ServerId};
use crate::message::{
    Hello, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN, PairEntry, PeerKind, Request, Response,
    ServerEntry, VolumeEntry, VolumeRef,
};
use crate::name::{PairName, VolumeName};
use crate::rpc::{self, Connection, Limits};

/// Talks to the VLDB of one cell.
pub struct VldbClient {
    cell: CellConfig,
    peer: PeerKind,
    timeout: Duration,
    connection: Mutex<Option<Connection>>,
}

impl VldbClient {
    /// `timeout` bounds each call, and each connection attempt.
    pub fn new(cell: CellConfig, peer: PeerKind, timeout: Duration) -> VldbClient {
        VldbClient {
            cell,
            peer,
            timeout,
            connection: Mutex::new(None),
        }
    }

    pub fn cell(&self) -> &CellConfig {
        &self.cell
    }

    async fn connection(&self) -> Result<Connection, ProtoError> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(connection.clone());
        }
        let limits = Limits {
            handshake_timeout: self.timeout,
            ..Limits::default()
        };
        let mut last_error = ProtoError::Closed;
        for address in &self.cell.vlservers {
            let hello = Hello {
                version_min: PROTOCOL_VERSION_MIN,
                version_max: PROTOCOL_VERSION_MAX,
                cell: self.cell.name.clone(),
                peer: self.peer.clone(),
            };
            match rpc::connect(address, hello, &limits).await {
                // The VLDB never calls us: dropping the incoming queue answers
                // anything it sends with `Unsupported`.
                Ok((connection, _reply, _incoming)) => {
                    *slot = Some(connection.clone());
                    return Ok(connection);
                }
                Err(ProtoError::Remote(code)) => return Err(ProtoError::Remote(code)),
                Err(e) => last_error = e,
            }
        }
        Err(last_error)
    }

    /// Sends one request; a transport failure drops the connection so the next call
    /// reconnects (possibly to another vlserver).
    pub async fn call(&self, request: Request) -> Result<Response, ProtoError> {
        let connection = self.connection().await?;
        let result = connection.call(request, self.timeout).await;
        if let Err(e) = &result
            && e.is_transport()
        {
            connection.close();
            *self.connection.lock().await = None;
        }
        result
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
