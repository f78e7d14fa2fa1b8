//! A test client that speaks the fileserver protocol as a cache manager would, so a test
//! can send requests in an order of its choosing (a store made late, a retry).
//! Invariant: every callback break the server pushes is answered at once, so one test
//! client never holds up another's change.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use proto::rpc::{self, Connection, Limits};
use proto::{
    ClientId, Fid, Hello, InstanceNonce, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN, PeerKind,
    Request, Response, Transport, VolumeId,
};

/// How long one request of a test client may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A cache manager's connection to a fileserver, with its own client identity.
pub struct ProtocolClient {
    pub connection: Connection,
    pub client: ClientId,
    next_seq: u64,
    /// Its requests are an administrator's (`identity::admin_token`).
    token: proto::SealedToken,
}

impl ProtocolClient {
    /// Connects to the fileserver at `address` of cell `cell` over `transport` as a new
    /// client instance.
    pub async fn connect(
        transport: &Transport,
        address: &str,
        cell: &str,
    ) -> Result<ProtocolClient> {
        let client = ClientId::random();
        let hello = Hello {
            version_min: PROTOCOL_VERSION_MIN,
            version_max: PROTOCOL_VERSION_MAX,
            cell: cell.to_owned(),
            peer: PeerKind::CacheManager {
                client,
                instance: InstanceNonce(1),
            },
        };
        let (connection, _, mut pushed) =
            rpc::connect(address, hello, &Limits::default(), transport)
                .await
                .with_context(|| format!("connect to the fileserver at {address}"))?;
        tokio::spawn(async move {
            while let Some(request) = pushed.recv().await {
                let (_, _, replier) = request.into_parts();
                replier.reply(Ok(Response::Ok)).await;
            }
        });
        Ok(ProtocolClient {
            connection,
            client,
            next_seq: 1,
            token: crate::identity::admin_token(cell),
        })
    }

    /// Sends `request` as it is.
    pub async fn call(&self, request: Request) -> Result<Response, proto::ProtoError> {
        self.connection
            .try_call_as(Some(&self.token), &request, CALL_TIMEOUT)
            .await
            .unwrap_or(Err(proto::ProtoError::Closed))
    }

    /// Wraps `request` as `Sequenced` with the next sequence number; returns it with
    /// that number, so that a test can send the same one again.
    pub fn sequenced(&mut self, request: Request) -> Request {
        let seq = self.next_seq;
        self.next_seq += 1;
        Request::Sequenced {
            seq,
            request: Box::new(request),
        }
    }

    /// The id of the one volume the fileserver holds.
    pub async fn only_volume(&self) -> Result<VolumeId> {
        match self.call(Request::ListVolumes).await? {
            Response::Volumes(volumes) if volumes.len() == 1 => Ok(volumes[0].id),
            other => bail!("expected one volume, got {other:?}"),
        }
    }

    /// Creates the file `name` in the root of `volume`; returns its fid.
    pub async fn create(&mut self, volume: VolumeId, name: &str) -> Result<Fid> {
        let request = self.sequenced(Request::Create {
            dir: Fid::root(volume),
            name: name.to_owned(),
            mode: 0o644,
            uid: 0,
            gid: 0,
            exclusive: true,
        });
        match self.call(request).await? {
            Response::Entry { status, .. } => Ok(status.fid),
            other => bail!("create {name}: unexpected {other:?}"),
        }
    }
}
