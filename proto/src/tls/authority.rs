//! The cell's certificate authority: `holdfast cell init` makes it with a first server
//! and host certificate and the token-signing key, `holdfast cell issue` signs a new
//! host's certificate where `ca.key` is.
//! Invariant: an existing CA is never overwritten, and every certificate issued is
//! checked against the CA's certificate before it is written.

use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::RootCertStore;
use rustls::pki_types::UnixTime;
use rustls::server::WebPkiClientVerifier;

use super::credentials::{
    self, CA_CERT_FILE, CA_KEY_FILE, Credentials, TOKEN_KEY_BYTES, TOKEN_KEY_FILE, write_new,
};
use super::{PeerClass, Tls, TlsError, Transport};

/// The cell CA: its certificate and its signing key.
pub struct CellAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

/// A certificate and its private key, in PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CellAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CellAuthority").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").finish_non_exhaustive()
    }
}

fn issue_error(e: rcgen::Error) -> TlsError {
    TlsError::Issue(e.to_string())
}

/// The CA's subject, the same each time for one cell: an issued certificate names it as
/// its issuer, so the CA loaded from disk issues exactly as the one generated did.
fn ca_params(cell: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "Holdfast cell CA");
    name.push(DnType::OrganizationName, cell);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

impl CellAuthority {
    /// A new CA for `cell`.
    pub fn generate(cell: &str) -> Result<CellAuthority, TlsError> {
        let key = KeyPair::generate().map_err(issue_error)?;
        let params = ca_params(cell);
        let cert_pem = params.self_signed(&key).map_err(issue_error)?.pem();
        Ok(CellAuthority {
            issuer: Issuer::new(params, key),
            cert_pem,
        })
    }

    /// The CA of `cell` from `dir` (`ca.pem` and `ca.key`).
    pub fn load(dir: &Path, cell: &str) -> Result<CellAuthority, TlsError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| TlsError::Read {
                path: path.display().to_string(),
                source,
            })
        };
        let cert_pem = read(CA_CERT_FILE)?;
        let key = KeyPair::from_pem(&read(CA_KEY_FILE)?).map_err(|e| TlsError::Pem {
            path: dir.join(CA_KEY_FILE).display().to_string(),
            what: "PEM private key",
            message: e.to_string(),
        })?;
        let authority = CellAuthority {
            issuer: Issuer::new(ca_params(cell), key),
            cert_pem,
        };
        // A CA key that is not ca.pem's, or a cell name that is not the CA's, would
        // issue certificates nobody accepts: find out now.
        authority.issue(PeerClass::Host, "check")?;
        Ok(authority)
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A new certificate of `class` for the host `name` (its common name, for logs),
    /// checked against the CA.
    pub fn issue(&self, class: PeerClass, name: &str) -> Result<Issued, TlsError> {
        let key = KeyPair::generate().map_err(issue_error)?;
        let mut params = CertificateParams::default();
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, name);
        params.distinguished_name = subject;
        let dns = class.dns_name().try_into().map_err(issue_error)?;
        params.subject_alt_names = vec![SanType::DnsName(dns)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match class {
            // A server also connects: to the VLDB, to its partner, to other replicas.
            PeerClass::Server => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            PeerClass::Host => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).map_err(issue_error)?;
        let issued = Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        self.check(&issued)?;
        Ok(issued)
    }

    /// Checks that `issued` verifies against this CA's certificate, as a peer will.
    fn check(&self, issued: &Issued) -> Result<(), TlsError> {
        let here = Path::new("(issued)");
        let ca = credentials::certificate(self.cert_pem.as_bytes(), Path::new(CA_CERT_FILE))?;
        let cert = credentials::certificate(issued.cert_pem.as_bytes(), here)?;
        let mut roots = RootCertStore::empty();
        roots
            .add(ca)
            .map_err(|e| TlsError::Issue(format!("the CA certificate is not usable: {e}")))?;
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(super::provider()),
        )
        .build()
        .map_err(|e| TlsError::Issue(format!("the CA certificate is not usable: {e}")))?;
        verifier
            .verify_client_cert(&cert, &[], UnixTime::now())
            .map_err(|e| {
                TlsError::Issue(format!(
                    "the new certificate does not verify against ca.pem ({e}): is ca.key the \
                     key of ca.pem, and the cell name the CA's?"
                ))
            })?;
        Ok(())
    }

    /// A transport with a new certificate of `class`, held in memory: for tests that run
    /// a cell inside one process.
    pub fn transport(&self, class: PeerClass, name: &str) -> Result<Transport, TlsError> {
        let issued = self.issue(class, name)?;
        let credentials = Credentials {
            ca: credentials::certificate(self.cert_pem.as_bytes(), Path::new(CA_CERT_FILE))?,
            cert: credentials::certificate(issued.cert_pem.as_bytes(), Path::new("(issued)"))?,
            key: credentials::private_key(issued.key_pem.as_bytes(), Path::new("(issued)"))?,
        };
        let tls = Tls::new(&credentials).map_err(TlsError::Issue)?;
        Ok(Transport::Tls(Arc::new(tls)))
    }

    /// Writes a new certificate of `class` for `name` into `out` (created if missing)
    /// with a copy of `ca.pem`: what a new host needs.
    pub fn issue_into(&self, out: &Path, class: PeerClass, name: &str) -> Result<(), TlsError> {
        create_dir(out)?;
        let issued = self.issue(class, name)?;
        let (cert_file, key_file) = credentials::files(class);
        match std::fs::read_to_string(out.join(CA_CERT_FILE)) {
            Ok(existing) if existing == self.cert_pem => {}
            Ok(_) => {
                return Err(TlsError::Exists {
                    path: out.join(CA_CERT_FILE).display().to_string(),
                });
            }
            Err(_) => {
                write_new(out, CA_CERT_FILE, self.cert_pem.as_bytes(), false)?;
            }
        }
        write_new(out, key_file, issued.key_pem.as_bytes(), true)?;
        write_new(out, cert_file, issued.cert_pem.as_bytes(), false)?;
        Ok(())
    }
}

/// Makes a cell's credentials in `dir`: a new CA (`ca.pem`, `ca.key`), a server and a
/// host certificate named `host`, and the token-signing key. Refuses a directory that
/// holds a CA already.
pub fn init(dir: &Path, cell: &str, host: &str) -> Result<CellAuthority, TlsError> {
    create_dir(dir)?;
    for existing in [CA_CERT_FILE, CA_KEY_FILE] {
        if dir.join(existing).exists() {
            return Err(TlsError::Exists {
                path: dir.join(existing).display().to_string(),
            });
        }
    }
    let authority = CellAuthority::generate(cell)?;
    write_new(
        dir,
        CA_KEY_FILE,
        authority.issuer.key().serialize_pem().as_bytes(),
        true,
    )?;
    write_new(dir, CA_CERT_FILE, authority.cert_pem.as_bytes(), false)?;
    authority.issue_into(dir, PeerClass::Server, host)?;
    authority.issue_into(dir, PeerClass::Host, host)?;
    if !ensure_token_key(dir)? {
        return Err(TlsError::Exists {
            path: dir.join(TOKEN_KEY_FILE).display().to_string(),
        });
    }
    Ok(authority)
}

/// Writes a new token key into the credentials directory `dir` unless it holds one (a
/// directory made before cells had keys); true if it wrote one.
pub fn ensure_token_key(dir: &Path) -> Result<bool, TlsError> {
    if dir.join(TOKEN_KEY_FILE).exists() {
        return Ok(false);
    }
    let token_key: [u8; TOKEN_KEY_BYTES] = rand::random();
    write_new(dir, TOKEN_KEY_FILE, &token_key, true)?;
    Ok(true)
}

fn create_dir(dir: &Path) -> Result<(), TlsError> {
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.display().to_string(),
        source,
    })
}

/// A transport of `class` under one CA made once per process: for tests that run servers
/// and their clients in one process.
pub fn test_transport(class: PeerClass) -> Result<Transport, TlsError> {
    static AUTHORITY: std::sync::OnceLock<Result<CellAuthority, String>> =
        std::sync::OnceLock::new();
    let authority = AUTHORITY
        .get_or_init(|| CellAuthority::generate("test.holdfast").map_err(|e| e.to_string()));
    match authority {
        Ok(authority) => authority.transport(class, "test"),
        Err(e) => Err(TlsError::Issue(e.clone())),
    }
}
