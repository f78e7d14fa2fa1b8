//! Mutual TLS inside a cell: every connection is TLS 1.3 where both sides present a
//! certificate of the cell's own CA; a server's names `server.holdfast.invalid`, a client
//! host's `host.holdfast.invalid`, and a connection knows which class its peer is.
//! Invariant: without `PLAINTEXT_ENV` set to `1`, no connection is made or accepted
//! without a verified peer certificate of the cell's CA; a client accepts only a server
//! certificate.

pub mod authority;
pub mod credentials;

use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::warn;

use crate::cell::CellConfig;
use crate::error::ProtoError;
use crate::message::PeerKind;
pub use credentials::{Credentials, TOKEN_KEY_FILE};

/// The DNS name (SAN) on every server certificate, and the name a client connects to.
pub const SERVER_NAME: &str = "server.holdfast.invalid";
/// The DNS name (SAN) on every client host's certificate.
pub const HOST_NAME: &str = "host.holdfast.invalid";
/// Set to `1` in the environment of every process of a cell, it turns TLS off: for
/// benchmarks that compare against plaintext only, never in a real cell.
pub const PLAINTEXT_ENV: &str = "HOLDFAST_PLAINTEXT_FOR_BENCHMARKS";

/// What a verified peer certificate says its holder is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PeerClass {
    /// A fileserver or VLDB server of the cell (`server.pem`).
    Server,
    /// A client host: a cache manager or an administrator's tools (`host.pem`).
    Host,
}

impl PeerClass {
    /// The SAN DNS name a certificate of this class carries.
    pub fn dns_name(self) -> &'static str {
        match self {
            PeerClass::Server => SERVER_NAME,
            PeerClass::Host => HOST_NAME,
        }
    }

    /// The class a peer saying hello as `kind` must hold: servers talking to servers
    /// (registration, pair partners, Raft) need a server certificate.
    pub fn required_for(kind: &PeerKind) -> Option<PeerClass> {
        match kind {
            PeerKind::FileServer { .. } | PeerKind::VldbReplica { .. } => Some(PeerClass::Server),
            PeerKind::CacheManager { .. } | PeerKind::Admin => None,
        }
    }
}

impl std::fmt::Display for PeerClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PeerClass::Server => "server",
            PeerClass::Host => "host",
        })
    }
}

/// Why credentials could not be loaded, made or used.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error(
        "cannot read {path}: {source}; make the cell's credentials with `holdfast cell init`, \
         or a new host's with `holdfast cell issue` where the cell's ca.key is"
    )]
    Read { path: String, source: io::Error },
    /// The host's private key is root's: an ordinary user reaches the cell through its
    /// mount (`holdfast login`), not with the host's certificate.
    #[error(
        "cannot read {path}: only root may use this host's certificate; run this as root \
         (administrators: with your token, or --localauth on a server host). An ordinary \
         user reaches the cell through its mount: `holdfast login`"
    )]
    NotPermitted { path: String },
    #[error("{path} holds no valid {what}: {message}")]
    Pem {
        path: String,
        what: &'static str,
        message: String,
    },
    #[error("the credentials in {dir} do not fit together: {message}")]
    Mismatch { dir: String, message: String },
    #[error("{path} exists already; refusing to overwrite it")]
    Exists { path: String },
    #[error("cannot write {path}: {source}")]
    Write { path: String, source: io::Error },
    #[error("cannot make a certificate: {0}")]
    Issue(String),
    #[error("{PLAINTEXT_ENV}={0:?}: set it to 1 (benchmarks only) or unset it")]
    PlaintextValue(String),
}

/// How this process's connections are secured.
#[derive(Clone)]
pub enum Transport {
    /// Mutual TLS under the cell's CA.
    Tls(Arc<Tls>),
    /// No TLS: only when `PLAINTEXT_ENV` is set (benchmarks), and in tests of the framing.
    Plaintext,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transport::Tls(_) => f.write_str("Transport::Tls"),
            Transport::Plaintext => f.write_str("Transport::Plaintext"),
        }
    }
}

/// The TLS configurations of one set of credentials: the same certificate serves and
/// connects.
pub struct Tls {
    connector: TlsConnector,
    acceptor: TlsAcceptor,
}

/// Both halves of a connection's byte stream, TLS or not, and what the peer is: what
/// `rpc` frames, and what `flood` misbehaves on.
pub struct Secured {
    pub read: Box<dyn AsyncRead + Send + Unpin>,
    pub write: Box<dyn AsyncWrite + Send + Unpin>,
    /// The accepting side's view of the peer's certificate; `None` when connecting or
    /// in plaintext.
    pub peer_class: Option<PeerClass>,
}

impl Transport {
    /// This process's transport in `cell`: the credentials of `class` from the cell's
    /// credentials directory (a host's falling back to the server's), or plaintext when
    /// `PLAINTEXT_ENV` is `1`.
    pub fn for_cell(cell: &CellConfig, class: PeerClass) -> Result<Transport, TlsError> {
        Transport::from_dir(&cell.credentials_dir(), class)
    }

    /// `for_cell` with the credentials directory given.
    pub fn from_dir(dir: &Path, class: PeerClass) -> Result<Transport, TlsError> {
        if let Some(value) = std::env::var_os(PLAINTEXT_ENV) {
            if value != "1" {
                return Err(TlsError::PlaintextValue(
                    value.to_string_lossy().into_owned(),
                ));
            }
            warn!(
                "{PLAINTEXT_ENV} is set: this process's connections are neither encrypted nor \
                 authenticated (for benchmarks only)"
            );
            return Ok(Transport::Plaintext);
        }
        let credentials = Credentials::load(dir, class)?;
        Ok(Transport::Tls(Arc::new(Tls::new(&credentials).map_err(
            |message| TlsError::Mismatch {
                dir: dir.display().to_string(),
                message,
            },
        )?)))
    }

    /// Connects over `tcp`: the server must show a server certificate of the cell's CA.
    /// The byte stream only: `rpc::connect` says hello over it.
    pub async fn connect(&self, tcp: TcpStream) -> Result<Secured, ProtoError> {
        match self {
            Transport::Plaintext => Ok(plain(tcp)),
            Transport::Tls(tls) => {
                let name = ServerName::try_from(SERVER_NAME)
                    .map_err(|e| ProtoError::Tls(format!("bad server name: {e}")))?;
                let stream = tls
                    .connector
                    .connect(name, tcp)
                    .await
                    .map_err(from_io_error)?;
                let (read, write) = tokio::io::split(stream);
                Ok(Secured {
                    read: Box::new(read),
                    write: Box::new(write),
                    peer_class: None,
                })
            }
        }
    }

    /// Accepts over `tcp`: the peer must show a certificate of the cell's CA. The byte
    /// stream only: `rpc::accept` reads the hello over it.
    pub async fn accept(&self, tcp: TcpStream) -> Result<Secured, ProtoError> {
        match self {
            Transport::Plaintext => Ok(plain(tcp)),
            Transport::Tls(tls) => {
                let stream = tls.acceptor.accept(tcp).await.map_err(from_io_error)?;
                let certificate = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first());
                let Some(class) = certificate.and_then(classify) else {
                    return Err(ProtoError::Tls(format!(
                        "presented a certificate of this cell's CA naming neither \
                         {SERVER_NAME} nor {HOST_NAME}"
                    )));
                };
                let (read, write) = tokio::io::split(stream);
                Ok(Secured {
                    read: Box::new(read),
                    write: Box::new(write),
                    peer_class: Some(class),
                })
            }
        }
    }
}

fn plain(tcp: TcpStream) -> Secured {
    let (read, write) = tcp.into_split();
    Secured {
        read: Box::new(read),
        write: Box::new(write),
        peer_class: None,
    }
}

impl Tls {
    /// The server and client configurations of `credentials`: TLS 1.3 with ring, client
    /// certificates required and verified against the CA, no session resumption (every
    /// connection verifies the whole certificate).
    pub fn new(credentials: &Credentials) -> Result<Tls, String> {
        let provider = Arc::new(provider());
        let mut roots = RootCertStore::empty();
        roots
            .add(credentials.ca.clone())
            .map_err(|e| format!("the CA certificate is not usable: {e}"))?;
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| format!("the CA certificate is not usable: {e}"))?;
        let chain = vec![credentials.cert.clone()];
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), credentials.key.clone_key())
            .map_err(|e| format!("the certificate and its key do not fit: {e}"))?;
        server.session_storage = Arc::new(NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, credentials.key.clone_key())
            .map_err(|e| format!("the certificate and its key do not fit: {e}"))?;
        client.resumption = Resumption::disabled();
        Ok(Tls {
            connector: TlsConnector::from(Arc::new(client)),
            acceptor: TlsAcceptor::from(Arc::new(server)),
        })
    }
}

/// The class a certificate (already verified against the CA) names, by its SAN.
pub fn classify(certificate: &CertificateDer<'_>) -> Option<PeerClass> {
    let certificate = webpki::EndEntityCert::try_from(certificate).ok()?;
    [PeerClass::Server, PeerClass::Host]
        .into_iter()
        .find(|class| {
            ServerName::try_from(class.dns_name())
                .is_ok_and(|name| certificate.verify_is_valid_for_subject_name(&name).is_ok())
        })
}

/// A handshake's I/O error: a TLS refusal becomes `ProtoError::Tls` saying what the peer
/// presented, anything else stays I/O.
pub(crate) fn from_io_error(error: io::Error) -> ProtoError {
    let tls = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match tls {
        Some(tls) => ProtoError::Tls(describe(tls)),
        None => ProtoError::Io(error),
    }
}

fn describe(error: &rustls::Error) -> String {
    use rustls::{CertificateError, Error};
    match error {
        Error::NoCertificatesPresented => "presented no certificate".into(),
        Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => "presented a certificate that this cell's CA did not issue".into(),
        Error::InvalidCertificate(
            CertificateError::NotValidForName
            | CertificateError::NotValidForNameContext { .. }
            | CertificateError::InvalidPurpose
            | CertificateError::InvalidPurposeContext { .. },
        ) => format!("presented a certificate that is not a server's (it must name {SERVER_NAME})"),
        Error::InvalidCertificate(other) => format!("presented an invalid certificate: {other}"),
        Error::AlertReceived(alert) => {
            format!("refused this side's certificate in the TLS handshake ({alert:?})")
        }
        other => format!("failed the TLS handshake: {other}"),
    }
}

/// The crypto of every connection: ring (no aws-lc in the tree). rustls deprecates it
/// for its lack of post-quantum key exchange, which a cell's own network can forgo for
/// now (`docs/security.md`).
#[allow(deprecated)]
pub(crate) fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}
