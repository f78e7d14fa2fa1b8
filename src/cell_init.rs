//! `holdfast cell init` and `holdfast cell issue`: a new cell's file and credentials (its
//! CA, a server and a host certificate, the token-signing key), and a new host's
//! certificate signed where the CA's key is.
//! Invariant: neither command overwrites a file: a cell file, a CA, a certificate or a key
//! that exists stays as it was, and the command says so.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use proto::tls::authority::{self, CellAuthority};
use proto::tls::credentials;
use proto::{CellConfig, PeerClass};

#[derive(Subcommand)]
pub enum CellCommand {
    /// Make a new cell: DIR/cell.toml, and DIR/credentials with the cell's CA (ca.pem,
    /// ca.key), a server and a host certificate for this host, and the token-signing key.
    ///
    /// Copy DIR/credentials to the cell's VLDB and server hosts as it is (keep ca.key and
    /// token.key private: mode 0600); give a client host its own certificate with
    /// `holdfast cell issue --kind host`.
    Init {
        /// Where to write cell.toml and credentials/.
        #[arg(long, value_name = "DIR", default_value = ".")]
        dir: PathBuf,
        /// The cell's name.
        #[arg(long)]
        name: String,
        /// The VLDB servers' addresses, HOST:PORT,HOST:PORT,...
        #[arg(long, value_name = "ADDR,...", value_delimiter = ',', required = true)]
        vlservers: Vec<String>,
        /// This host's name, for the certificates' common name (default: the hostname).
        #[arg(long, value_name = "NAME")]
        host: Option<String>,
    },
    /// Sign a certificate for a new host: run it where the cell's ca.key is (the cell
    /// file's credentials directory); it writes the certificate, its key and a copy of
    /// ca.pem into OUT, the new host's credentials directory.
    Issue {
        /// `server` for a fileserver or VLDB host, `host` for a client host.
        #[arg(long, value_enum)]
        kind: Kind,
        /// The new host's name (the certificate's common name, shown in logs).
        #[arg(long, value_name = "NAME")]
        name: String,
        /// The directory to write into (created if missing; existing files are kept).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Kind {
    Server,
    Host,
}

impl From<Kind> for PeerClass {
    fn from(kind: Kind) -> PeerClass {
        match kind {
            Kind::Server => PeerClass::Server,
            Kind::Host => PeerClass::Host,
        }
    }
}

pub fn run(cell_path: Option<&Path>, command: CellCommand) -> Result<()> {
    match command {
        CellCommand::Init {
            dir,
            name,
            vlservers,
            host,
        } => init(&dir, &name, vlservers, host),
        CellCommand::Issue { kind, name, out } => issue(cell_path, kind.into(), &name, &out),
    }
}

fn init(dir: &Path, name: &str, vlservers: Vec<String>, host: Option<String>) -> Result<()> {
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        bail!("--name {name:?}: a cell name is one word without spaces");
    }
    let vlservers: Vec<String> = vlservers
        .into_iter()
        .map(|a| a.trim().to_owned())
        .filter(|a| !a.is_empty())
        .collect();
    if vlservers.is_empty() {
        bail!("--vlservers names no address: list the VLDB servers as HOST:PORT,...");
    }
    let cell_file = dir.join("cell.toml");
    if cell_file.exists() {
        bail!(
            "{} exists already; refusing to overwrite it (a cell is made once)",
            cell_file.display()
        );
    }
    let host = host.unwrap_or_else(hostname);
    let credentials_dir = dir.join(proto::cell::CREDENTIALS_DIR_DEFAULT);
    authority::init(&credentials_dir, name, &host).with_context(|| {
        format!(
            "make the cell's credentials in {}",
            credentials_dir.display()
        )
    })?;
    let cell = CellConfig {
        name: name.to_owned(),
        vlservers,
        credentials: None,
    };
    std::fs::write(&cell_file, cell.to_toml())
        .with_context(|| format!("write {}", cell_file.display()))?;
    println!(
        "Cell {name}: wrote {} and the credentials in {}:\n  \
         {ca} (the CA), {ca_key} and {token} (private, mode 0600: only for VLDB and server hosts),\n  \
         {server}/{server_key} (this host as a server), {host_cert}/{host_key} (this host as a client).\n\
         A new client host gets its own certificate with\n  \
         holdfast cell issue --cell {} --kind host --name HOSTNAME --out DIR",
        cell_file.display(),
        credentials_dir.display(),
        cell_file.display(),
        ca = credentials::CA_CERT_FILE,
        ca_key = credentials::CA_KEY_FILE,
        token = credentials::TOKEN_KEY_FILE,
        server = credentials::SERVER_CERT_FILE,
        server_key = credentials::SERVER_KEY_FILE,
        host_cert = credentials::HOST_CERT_FILE,
        host_key = credentials::HOST_KEY_FILE,
    );
    Ok(())
}

fn issue(cell_path: Option<&Path>, class: PeerClass, name: &str, out: &Path) -> Result<()> {
    if name.is_empty() {
        bail!("--name is empty: name the new host");
    }
    let cell = CellConfig::locate(cell_path).context("find the cell")?;
    let dir = cell.credentials_dir();
    let authority = CellAuthority::load(&dir, &cell.name).with_context(|| {
        format!(
            "load the cell's CA from {} (run this where the cell's ca.key is)",
            dir.display()
        )
    })?;
    authority
        .issue_into(out, class, name)
        .with_context(|| format!("write the new certificate into {}", out.display()))?;
    let (cert, key) = credentials::files(class);
    println!(
        "Wrote {cert}, {key} and {ca} for {class} {name} into {out}. Copy that directory to \
         the host as `credentials` beside its cell file (or name it there: credentials = \
         \"DIR\"); keep {key} private.",
        ca = credentials::CA_CERT_FILE,
        out = out.display(),
    );
    Ok(())
}

/// This host's name, for a certificate's common name.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}
