//! `Fileserver`: one administrative connection to a fileserver, tried at each of its
//! registered addresses in turn (for a pair, the member that says it is active).
//! Invariant: every call has a deadline and is never retried, since volume operations are
//! not idempotent; the connection closes when the value drops.

use std::time::Duration;

use proto::rpc::{self, Connection, Limits};
use proto::{
    CellConfig, ErrorCode, Hello, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN, PeerKind, ProtoError,
    Request, Response, SealedToken, ServerEntry, Transport,
};
use tracing::debug;

use crate::error::VosError;

pub(crate) struct Fileserver {
    address: String,
    connection: Connection,
    timeout: Duration,
    /// The token its calls are made with: a volume's creation and removal need an
    /// administrator's.
    token: Option<SealedToken>,
}

impl Fileserver {
    /// Connects to the first of `server`'s addresses that answers; for a pair (two
    /// addresses), to the member that says it is active, so a volume operation never
    /// lands on the passive.
    pub(crate) async fn connect(
        cell: &CellConfig,
        transport: &Transport,
        server: &ServerEntry,
        timeout: Duration,
    ) -> Result<Fileserver, VosError> {
        let mut failure = None;
        let pair = server.addresses.len() > 1;
        for address in &server.addresses {
            match Fileserver::connect_to(cell, transport, address, timeout).await {
                Ok(fileserver) if pair && !fileserver.is_active().await => {
                    debug!(%address, "pair member is not active; trying its partner");
                    failure = Some(VosError::Fileserver {
                        address: address.clone(),
                        code: ErrorCode::NotActive {
                            epoch: proto::Epoch(0),
                            hint: None,
                        },
                    });
                }
                Ok(fileserver) => return Ok(fileserver),
                Err(e @ VosError::Fileserver { .. }) => return Err(e),
                Err(e) => {
                    debug!(%address, error = %e, "fileserver address did not answer");
                    failure = Some(e);
                }
            }
        }
        Err(failure.unwrap_or_else(|| VosError::FileserverUnreachable {
            address: format!("server {} (no address registered)", server.server),
            source: ProtoError::Closed,
        }))
    }

    /// Connects to the fileserver at `address`, and no other.
    pub(crate) async fn connect_to(
        cell: &CellConfig,
        transport: &Transport,
        address: &str,
        timeout: Duration,
    ) -> Result<Fileserver, VosError> {
        let limits = Limits {
            handshake_timeout: timeout,
            ..Limits::default()
        };
        let hello = Hello {
            version_min: PROTOCOL_VERSION_MIN,
            version_max: PROTOCOL_VERSION_MAX,
            cell: cell.name.clone(),
            peer: PeerKind::Admin,
        };
        // A fileserver never calls an admin tool: dropping the incoming queue answers
        // anything it sends with `Unsupported`.
        match rpc::connect(address, hello, &limits, transport).await {
            Ok((connection, _reply, _incoming)) => Ok(Fileserver {
                address: address.to_owned(),
                connection,
                timeout,
                token: None,
            }),
            Err(ProtoError::Remote(code)) => Err(VosError::Fileserver {
                address: address.to_owned(),
                code,
            }),
            Err(source) => Err(VosError::FileserverUnreachable {
                address: address.to_owned(),
                source,
            }),
        }
    }

    /// True unless the server says it is a passive pair member.
    async fn is_active(&self) -> bool {
        !matches!(
            self.call(Request::MemberState).await,
            Ok(Response::MemberState(proto::MemberState {
                role: proto::MemberRole::Passive,
                ..
            })) | Err(VosError::Fileserver {
                code: ErrorCode::NotActive { .. },
                ..
            })
        )
    }

    /// Makes every call for the holder of `token`.
    pub(crate) fn with_token(mut self, token: Option<SealedToken>) -> Fileserver {
        self.token = token;
        self
    }

    pub(crate) fn address(&self) -> &str {
        &self.address
    }

    /// The protocol version the connection negotiated.
    pub(crate) fn version(&self) -> u16 {
        self.connection.version()
    }

    pub(crate) async fn call(&self, request: Request) -> Result<Response, VosError> {
        self.call_within(request, self.timeout).await
    }

    /// `call` with a deadline of its own, for requests that take long by design.
    pub(crate) async fn call_within(
        &self,
        request: Request,
        timeout: Duration,
    ) -> Result<Response, VosError> {
        self.connection
            .try_call_as(self.token.as_ref(), &request, timeout)
            .await
            .unwrap_or(Err(ProtoError::Closed))
            .map_err(|e| match e {
                ProtoError::Remote(code) => VosError::Fileserver {
                    address: self.address.clone(),
                    code,
                },
                source => VosError::FileserverUnreachable {
                    address: self.address.clone(),
                    source,
                },
            })
    }

    /// The error for an answer of the wrong kind: a fileserver bug.
    pub(crate) fn unexpected(&self, response: &Response) -> VosError {
        VosError::Fileserver {
            address: self.address.clone(),
            code: ErrorCode::Internal(format!("unexpected response {}", response.kind_name())),
        }
    }
}

impl Drop for Fileserver {
    fn drop(&mut self) {
        self.connection.close();
    }
}
