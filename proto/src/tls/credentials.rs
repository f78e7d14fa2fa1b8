//! A host's credentials directory: the cell CA's certificate, this host's certificate and
//! key (a server's or a client host's), and on VLDB and server hosts the CA's key and the
//! cell's token-signing key; PEM in, PEM out.
//! Invariant: a private key is written with mode 0600 and never over an existing file;
//! what `load` returns was decoded from PEM, nothing guessed.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::{PeerClass, TlsError};

/// The cell CA's certificate: every host has it.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The cell CA's private key: on VLDB and server hosts only (0600).
pub const CA_KEY_FILE: &str = "ca.key";
/// A server's certificate and key.
pub const SERVER_CERT_FILE: &str = "server.pem";
pub const SERVER_KEY_FILE: &str = "server.key";
/// A client host's certificate and key.
pub const HOST_CERT_FILE: &str = "host.pem";
pub const HOST_KEY_FILE: &str = "host.key";
/// The cell's ed25519 token-signing key: 32 raw random bytes, on VLDB and server hosts
/// only (0600).
pub const TOKEN_KEY_FILE: &str = "token.key";
/// Bytes of the token-signing key.
pub const TOKEN_KEY_BYTES: usize = 32;

/// The files of one class's certificate and key.
pub fn files(class: PeerClass) -> (&'static str, &'static str) {
    match class {
        PeerClass::Server => (SERVER_CERT_FILE, SERVER_KEY_FILE),
        PeerClass::Host => (HOST_CERT_FILE, HOST_KEY_FILE),
    }
}

/// The CA's certificate and this host's certificate and key.
pub struct Credentials {
    pub ca: CertificateDer<'static>,
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").finish_non_exhaustive()
    }
}

impl Credentials {
    /// Loads `ca.pem` and the certificate and key of `class` from `dir`; a host without
    /// `host.pem` uses `server.pem` (a server host runs the admin tools too).
    pub fn load(dir: &Path, class: PeerClass) -> Result<Credentials, TlsError> {
        let class = match class {
            PeerClass::Host
                if !dir.join(HOST_CERT_FILE).exists() && dir.join(SERVER_CERT_FILE).exists() =>
            {
                PeerClass::Server
            }
            class => class,
        };
        let (cert_file, key_file) = files(class);
        let ca = read(&dir.join(CA_CERT_FILE))?;
        let cert = read(&dir.join(cert_file))?;
        let key = read(&dir.join(key_file))?;
        Ok(Credentials {
            ca: certificate(&ca, &dir.join(CA_CERT_FILE))?,
            cert: certificate(&cert, &dir.join(cert_file))?,
            key: private_key(&key, &dir.join(key_file))?,
        })
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::PermissionDenied => TlsError::NotPermitted {
            path: path.display().to_string(),
        },
        _ => TlsError::Read {
            path: path.display().to_string(),
            source,
        },
    })
}

/// The first certificate in PEM `bytes` (read from `path`, named in the error).
pub fn certificate(bytes: &[u8], path: &Path) -> Result<CertificateDer<'static>, TlsError> {
    CertificateDer::from_pem_slice(bytes).map_err(|e| TlsError::Pem {
        path: path.display().to_string(),
        what: "PEM certificate",
        message: e.to_string(),
    })
}

/// The first private key in PEM `bytes` (read from `path`, named in the error).
pub fn private_key(bytes: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(bytes).map_err(|e| TlsError::Pem {
        path: path.display().to_string(),
        what: "PEM private key",
        message: e.to_string(),
    })
}

/// The token-signing key in `bytes` (read from `path`): exactly 32 bytes.
pub fn token_key(bytes: &[u8], path: &Path) -> Result<[u8; TOKEN_KEY_BYTES], TlsError> {
    bytes.try_into().map_err(|_| TlsError::Pem {
        path: path.display().to_string(),
        what: "token key",
        message: format!(
            "it holds {} bytes; a token key is {TOKEN_KEY_BYTES} raw bytes",
            bytes.len()
        ),
    })
}

/// Writes a new file `dir/name` (never over an existing one), private ones with mode
/// 0600, public ones 0644.
pub(crate) fn write_new(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    private: bool,
) -> Result<PathBuf, TlsError> {
    let path = dir.join(name);
    let failed = |source| TlsError::Write {
        path: path.display().to_string(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&path)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => TlsError::Exists {
                path: path.display().to_string(),
            },
            _ => failed(source),
        })?;
    file.write_all(bytes).map_err(failed)?;
    file.sync_all().map_err(failed)?;
    Ok(path)
}
