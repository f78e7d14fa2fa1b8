//! A local cell run as separate processes — three VLDB replicas, one fileserver or an active/passive
//! pair on one partition, `root.cell`, mounts — for `holdfast up` and `holdfast bench`.
//! Invariant: every process started here is stopped by its PID, and every mount made
//! here is gone, when the `LocalCell` drops — also when start-up fails half-way; the
//! cell's credentials are made once, in DIR/credentials, and kept.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use proto::tls::authority;
use proto::{CellConfig, PeerClass, PeerKind, Transport, VldbClient};

use crate::process::{Supervised, await_ready_file, log_tail};

const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The name of a local cell's fileserver pair.
pub const PAIR: &str = "local";
/// How long an exited pair member waits for its partner to take over before it is
/// started again anyway (the partner may be gone too).
pub const RESTART_WAIT_MAX: Duration = Duration::from_secs(10);
/// The pair members' process names.
pub const MEMBERS: [&str; 2] = ["fileserver-a", "fileserver-b"];
/// How many VLDB replicas a local cell runs: a majority survives any one dying.
pub const VLDB_REPLICAS: u64 = 3;

/// What serves the cell's partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Servers {
    /// No fileserver: the VLDB replicas alone.
    None,
    /// One fileserver.
    Single,
    /// An active/passive pair sharing the partition.
    Pair,
}

/// Where a local cell keeps its pieces under its directory.
pub struct Layout {
    pub dir: PathBuf,
    pub cell_file: PathBuf,
    pub vldb: PathBuf,
    pub partition: PathBuf,
    pub run: PathBuf,
    pub logs: PathBuf,
    /// The cell's credentials: its CA, a server and a host certificate, the token key.
    pub credentials: PathBuf,
    /// Ports this run chose, held bound until their server starts (`reserve_port`).
    reserved: std::sync::Mutex<HashMap<String, socket2::Socket>>,
}

impl Layout {
    pub fn new(dir: &Path) -> Result<Layout> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let dir = dir
            .canonicalize()
            .with_context(|| format!("resolve {}", dir.display()))?;
        let layout = Layout {
            cell_file: dir.join("cell.toml"),
            vldb: dir.join("vldb"),
            partition: dir.join("partition"),
            run: dir.join("run"),
            logs: dir.join("logs"),
            credentials: dir.join(proto::cell::CREDENTIALS_DIR_DEFAULT),
            dir,
            reserved: std::sync::Mutex::new(HashMap::new()),
        };
        for sub in [&layout.vldb, &layout.partition, &layout.run, &layout.logs] {
            std::fs::create_dir_all(sub).with_context(|| format!("create {}", sub.display()))?;
        }
        for entry in std::fs::read_dir(&layout.run)? {
            let _ = std::fs::remove_file(entry?.path());
        }
        Ok(layout)
    }

    pub fn ready_file(&self, name: &str) -> PathBuf {
        self.run.join(format!("{name}.ready"))
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.logs.join(format!("{name}.log"))
    }

    /// The cell's credentials, made the first time (the cell file names none: they are
    /// the default `credentials` beside it); this host's transport under them.
    fn credentials(&self, cell_name: &str) -> Result<Transport> {
        let ca = self.credentials.join(proto::tls::credentials::CA_CERT_FILE);
        if !ca.exists() {
            authority::init(&self.credentials, cell_name, "localhost").with_context(|| {
                format!(
                    "make the cell's credentials in {}",
                    self.credentials.display()
                )
            })?;
        }
        Transport::from_dir(&self.credentials, PeerClass::Host)
            .context("load the cell's credentials")
    }

    /// Where the pair members' addresses are kept between runs: the VLDB knows a pair's
    /// members by address, so a restarted cell must listen where it did before.
    fn members_file(&self) -> PathBuf {
        self.dir.join("pair-members")
    }

    /// Where the VLDB replicas' addresses are kept between runs (`ID=ADDR` lines): the
    /// group's membership names them.
    fn replicas_file(&self) -> PathBuf {
        self.dir.join("vldb-replicas")
    }

    /// The VLDB replicas' (id, address): those of the last run, or new ones chosen now and
    /// kept for the next.
    fn kept_replica_addresses(&self) -> Result<Vec<(u64, String)>> {
        let file = self.replicas_file();
        let kept: Vec<(u64, String)> = std::fs::read_to_string(&file)
            .map(|text| {
                text.lines()
                    .filter_map(|line| line.split_once('='))
                    .filter_map(|(id, address)| Some((id.parse().ok()?, address.to_owned())))
                    .collect()
            })
            .unwrap_or_default();
        if !kept.is_empty() {
            return Ok(kept);
        }
        let chosen: Vec<(u64, String)> = (1..=VLDB_REPLICAS)
            .map(|id| Ok((id, self.reserve_port()?)))
            .collect::<Result<_>>()?;
        let lines: Vec<String> = chosen
            .iter()
            .map(|(id, address)| format!("{id}={address}"))
            .collect();
        std::fs::write(&file, lines.join("\n"))
            .with_context(|| format!("write {}", file.display()))?;
        Ok(chosen)
    }

    /// The pair members' addresses, in `MEMBERS` order: those of the last run, or new ones
    /// chosen now (before either starts) and kept for the next.
    fn kept_member_addresses(&self) -> Result<Vec<String>> {
        let file = self.members_file();
        let mut addresses: Vec<String> = std::fs::read_to_string(&file)
            .map(|text| text.lines().map(str::to_owned).collect())
            .unwrap_or_default();
        addresses.truncate(MEMBERS.len());
        if addresses.len() == MEMBERS.len() {
            return Ok(addresses);
        }
        while addresses.len() < MEMBERS.len() {
            addresses.push(self.reserve_port()?);
        }
        std::fs::write(&file, addresses.join("\n"))
            .with_context(|| format!("write {}", file.display()))?;
        Ok(addresses)
    }

    /// An address on 127.0.0.1 free now, for a server started later in this run: a
    /// replica must know its peers' addresses before they listen, and every address is
    /// kept. The port stays bound here (not listening: a peer dialling it early is
    /// refused, as by a server not yet up) until `release_port` just before its server
    /// starts; let go at once, it could meanwhile become the local port of any outgoing
    /// connection (this run's own to the VLDB among them), and the server could not
    /// listen.
    fn reserve_port(&self) -> Result<String> {
        let reserve = || -> std::io::Result<(socket2::Socket, std::net::SocketAddr)> {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            let any = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
            socket.bind(&any.into())?;
            let bound = socket.local_addr()?.as_socket().unwrap_or(any);
            Ok((socket, bound))
        };
        let (socket, bound) = reserve().context("find a free port for the cell")?;
        let address = bound.to_string();
        self.reserved_ports().insert(address.clone(), socket);
        Ok(address)
    }

    /// Whether this run holds `address` for a server of its own.
    fn holds_port(&self, address: &str) -> bool {
        self.reserved_ports().contains_key(address)
    }

    /// Lets `address` go for the server about to listen there, if this run held it.
    fn release_port(&self, address: &str) {
        self.reserved_ports().remove(address);
    }

    fn reserved_ports(&self) -> std::sync::MutexGuard<'_, HashMap<String, socket2::Socket>> {
        // Only inserts and removes run under it: a panic there leaves the map whole.
        self.reserved
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Replica `id`'s data directory. Replica 1's is `vldb/`, where a single VLDB kept
    /// its database: it takes that database over.
    pub fn replica_dir(&self, id: u64) -> PathBuf {
        match id {
            1 => self.vldb.clone(),
            id => self.dir.join(format!("vldb-{id}")),
        }
    }
}

/// A VLDB replica's process name.
pub fn replica_name(id: u64) -> String {
    format!("vlserver-{id}")
}

/// A running local cell.
pub struct LocalCell {
    pub layout: Layout,
    pub cell: CellConfig,
    /// How this process reaches the cell's servers (the host certificate).
    pub transport: Transport,
    /// The VLDB replicas' (id, address).
    pub replicas: Vec<(u64, String)>,
    pub fs_address: String,
    /// The pair members' (process name, address), when the cell runs a pair.
    pub members: Vec<(String, String)>,
    /// When each exited pair member was noticed, until it is started again.
    exited_at: HashMap<String, Instant>,
    /// Mount points, in the order they were made.
    pub mounts: Vec<PathBuf>,
    /// Stopped newest first: mounts before the servers they flush to.
    children: Vec<Supervised>,
    /// Each mount's cache directory, by process name (its control socket is there).
    mount_caches: HashMap<String, PathBuf>,
    /// The admin's password file, when this start made the admin user.
    pub admin_password_made: Option<PathBuf>,
}

impl LocalCell {
    /// Starts the VLDB and the fileserver(s), and creates `root.cell` if the VLDB lacks it.
    pub fn start(
        dir: &Path,
        cell_name: &str,
        servers: Servers,
        runtime: &tokio::runtime::Runtime,
    ) -> Result<LocalCell> {
        let layout = Layout::new(dir)?;
        // Keep the cell's name across runs: volumes and caches belong to it.
        let cell_name = match CellConfig::load(&layout.cell_file) {
            Ok(previous) => previous.name,
            Err(_) => cell_name.to_owned(),
        };
        let transport = layout.credentials(&cell_name)?;
        let mut cell = LocalCell {
            cell: CellConfig {
                name: cell_name.clone(),
                vlservers: Vec::new(),
                credentials: None,
            },
            transport,
            layout,
            replicas: Vec::new(),
            fs_address: String::new(),
            members: Vec::new(),
            exited_at: HashMap::new(),
            mounts: Vec::new(),
            children: Vec::new(),
            mount_caches: HashMap::new(),
            admin_password_made: None,
        };
        cell.replicas = cell.layout.kept_replica_addresses()?;
        let member_addresses = match servers {
            Servers::Pair => cell.layout.kept_member_addresses()?,
            Servers::None | Servers::Single => Vec::new(),
        };
        // Every kept port before anything starts: a taken one is a person's to free.
        for (id, address) in &cell.replicas {
            let what = format!("VLDB replica {id}");
            if !cell.layout.holds_port(address) {
                check_port_free(address, &what, &cell.layout.replicas_file())?;
            }
        }
        for (name, address) in MEMBERS.iter().zip(&member_addresses) {
            let what = format!("pair member {name}");
            if !cell.layout.holds_port(address) {
                check_port_free(address, &what, &cell.layout.members_file())?;
            }
        }
        // Every replica needs the cell's key (a directory made before keys had none).
        proto::tls::authority::ensure_token_key(&cell.layout.credentials)
            .context("make the cell's token key")?;
        cell.start_vldb()?;
        std::fs::write(&cell.layout.cell_file, cell.cell.to_toml())
            .with_context(|| format!("write {}", cell.layout.cell_file.display()))?;
        let localauth = cell.localauth_token()?;
        cell.admin_password_made = runtime.block_on(crate::cell_admin::ensure_admin_user(
            &cell.cell,
            &cell.transport,
            localauth,
            &cell.layout.dir,
        ))?;
        match servers {
            Servers::None => return Ok(cell),
            Servers::Single => {
                cell.fs_address = cell.start_fileserver("fileserver", "127.0.0.1:0", &[])?;
            }
            Servers::Pair => cell.start_pair(&member_addresses, runtime)?,
        }
        let admin = cell.admin_token()?;
        runtime.block_on(ensure_root_volume(
            &cell.cell,
            &cell.transport,
            &cell.fs_address,
            &admin,
        ))?;
        Ok(cell)
    }

    /// Starts the VLDB replicas on their kept addresses; the cell file lists them all.
    fn start_vldb(&mut self) -> Result<()> {
        self.cell.vlservers = self.replicas.iter().map(|(_, a)| a.clone()).collect();
        for (id, _) in self.replicas.clone() {
            self.start_replica(id)?;
        }
        Ok(())
    }

    /// Starts VLDB replica `id` on its address, in its data directory.
    fn start_replica(&mut self, id: u64) -> Result<String> {
        let address = self
            .replicas
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, a)| a.clone())
            .with_context(|| format!("no VLDB replica {id}"))?;
        let peers = self
            .replicas
            .iter()
            .map(|(id, address)| format!("{id}={address}"))
            .collect::<Vec<_>>()
            .join(",");
        let data = path_arg(&self.layout.replica_dir(id));
        let id_arg = id.to_string();
        let cell_name = self.cell.name.clone();
        let credentials = path_arg(&self.layout.credentials);
        let args = [
            "vlserver",
            "--data",
            &data,
            "--listen",
            &address,
            "--cell-name",
            &cell_name,
            "--credentials",
            &credentials,
            "--id",
            &id_arg,
            "--peers",
            &peers,
        ];
        self.start_child(&replica_name(id), &args).with_context(|| {
            format!(
                "start VLDB replica {id} on {address} (the replicas keep their addresses \
                     between runs; {} lists them)",
                self.layout.replicas_file().display()
            )
        })
    }

    /// Starts again every VLDB replica that exited on its own; the others carry on
    /// meanwhile, and it catches up from the leader. Returns the names restarted.
    pub fn restart_exited_replicas(&mut self) -> Result<Vec<String>> {
        let mut restarted = Vec::new();
        for (id, _) in self.replicas.clone() {
            let name = replica_name(id);
            let Some(index) = self.children.iter().rposition(|c| c.name == name) else {
                continue;
            };
            let Some(status) = self.children[index].exited() else {
                continue;
            };
            self.children.remove(index);
            println!("The {name} stopped ({status}); starting it again.");
            self.start_replica(id)?;
            restarted.push(name);
        }
        Ok(restarted)
    }

    /// Starts both members of the pair on the partition, on their kept `addresses`; the
    /// first becomes active before the second starts, so `fs_address` names the active.
    fn start_pair(
        &mut self,
        addresses: &[String],
        runtime: &tokio::runtime::Runtime,
    ) -> Result<()> {
        let members_file = self.layout.members_file();
        for (i, (name, listen)) in MEMBERS.iter().zip(addresses).enumerate() {
            let address = self
                .start_fileserver(name, listen, &["--pair", PAIR])
                .with_context(|| {
                    format!(
                        "start pair member {name} on {listen} (the pair's members keep their \
                         addresses between runs; {} lists them)",
                        members_file.display()
                    )
                })?;
            if i == 0 {
                runtime.block_on(await_active(&self.cell, &self.transport, &address))?;
                self.fs_address = address.clone();
            }
            self.members.push(((*name).to_owned(), address));
        }
        Ok(())
    }

    /// Starts a fileserver on the cell's partition; returns its address.
    pub fn start_fileserver(&mut self, name: &str, listen: &str, extra: &[&str]) -> Result<String> {
        let cell_file = path_arg(&self.layout.cell_file);
        let partition = path_arg(&self.layout.partition);
        let mut args = vec![
            "fileserver",
            "--cell",
            &cell_file,
            "--partition",
            &partition,
            "--listen",
            listen,
        ];
        args.extend_from_slice(extra);
        self.start_child(name, &args)
    }

    /// The PID of the child started under `name`.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.children
            .iter()
            .rev()
            .find(|c| c.name == name)
            .map(|c| c.pid())
    }

    /// Sends `signal` to the child started under `name`.
    pub fn signal(&self, name: &str, signal: i32) -> Result<()> {
        let child = self
            .children
            .iter()
            .rev()
            .find(|c| c.name == name)
            .with_context(|| format!("no process named {name}"))?;
        child.signal(signal)
    }

    /// The child started under `name`, for a supervisor that watches it and starts it
    /// again (`Supervised::respawn`, after removing its ready file).
    pub fn child_mut(&mut self, name: &str) -> Option<&mut Supervised> {
        self.children.iter_mut().rev().find(|c| c.name == name)
    }

    /// The names of the children, in the order they were started.
    pub fn child_names(&self) -> Vec<String> {
        self.children.iter().map(|c| c.name.clone()).collect()
    }

    /// A token of the cell's administrator, sealed with its key.
    pub fn admin_token(&self) -> Result<proto::SealedToken> {
        Ok(admin_token(&self.token_key()?, &self.cell.name))
    }

    /// The cell's token-signing key, from its credentials.
    fn token_key(&self) -> Result<proto::TokenKey> {
        let path = self.layout.credentials.join(proto::tls::TOKEN_KEY_FILE);
        proto::TokenKey::load(&path).context("load the token key")
    }

    /// A `--localauth` token: what root on a server host acts with, sealed with the
    /// cell's key.
    fn localauth_token(&self) -> Result<proto::SealedToken> {
        let key = self.token_key()?;
        Ok(key.seal(vlserver::localauth_body(
            &self.cell.name,
            Duration::from_secs(3600),
        )))
    }

    /// After child `name` was started again and is ready: a mount starts with no
    /// tokens, so the invoking user's administrator token is handed in again.
    pub fn child_ready(&self, name: &str) -> Result<()> {
        let Some(cache) = self.mount_caches.get(name) else {
            return Ok(());
        };
        self.give_admin_token(name, cache)
    }

    /// Gives every mount, and the invoking user's command-line tools (its token file),
    /// a fresh administrator token: `up` calls it at start and well before one expires.
    pub fn renew_admin_tokens(&self) -> Result<()> {
        for (name, cache) in &self.mount_caches {
            self.give_admin_token(name, cache)?;
        }
        crate::tokens::store(&self.cell.name, &self.admin_token()?)?;
        Ok(())
    }

    fn give_admin_token(&self, name: &str, cache: &Path) -> Result<()> {
        let token = self.admin_token()?;
        let socket = cache.join(cachemgr::mount::CONTROL_SOCKET);
        cachemgr::control::give_token(&socket, &token)
            .with_context(|| format!("give the administrator's token to {name}"))
    }

    /// Mounts the cell at `mountpoint` with its own cache directory.
    pub fn mount(
        &mut self,
        name: &str,
        mountpoint: &Path,
        cache: &Path,
        extra: &[&str],
    ) -> Result<()> {
        clear_stale_mount(mountpoint)?;
        std::fs::create_dir_all(mountpoint)
            .with_context(|| format!("create {}", mountpoint.display()))?;
        let cell_file = path_arg(&self.layout.cell_file);
        let cache = path_arg(cache);
        let target = path_arg(mountpoint);
        let mut args = vec!["mount", "--cell", &cell_file, "--cache", &cache];
        args.extend_from_slice(extra);
        args.push(&target);
        self.start_child(name, &args)?;
        self.mounts.push(mountpoint.to_owned());
        // The invoking user administers the local cell: their processes act with an
        // administrator's token on this mount.
        self.mount_caches
            .insert(name.to_owned(), PathBuf::from(&cache));
        self.give_admin_token(name, Path::new(&cache))
    }

    /// Starts one component and waits for its ready file; returns what it wrote there.
    fn start_child(&mut self, name: &str, args: &[&str]) -> Result<String> {
        let ready = self.layout.ready_file(name);
        let log = self.layout.log(name);
        let mut args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        args.push("--ready-file".into());
        args.push(path_arg(&ready));
        if let Some(listen) = args
            .iter()
            .position(|a| a == "--listen")
            .and_then(|i| args.get(i + 1))
        {
            self.layout.release_port(listen);
        }
        self.children
            .push(Supervised::spawn_self(name, &args, &log)?);
        let child = self.children.last_mut().context("child just started")?;
        await_ready_file(&ready, child, READY_TIMEOUT, &log)
    }

    /// Starts again every pair member that exited on its own, on its old address, once
    /// its partner has taken over (or after `RESTART_WAIT_MAX`), so the partner — not
    /// the restarted process — is the one that shows the takeover; it rejoins as the
    /// passive. Returns the names restarted.
    pub fn restart_exited_members(
        &mut self,
        runtime: &tokio::runtime::Runtime,
    ) -> Result<Vec<String>> {
        let mut restarted = Vec::new();
        for (name, address) in self.members.clone() {
            let Some(index) = self.children.iter().rposition(|c| c.name == name) else {
                continue;
            };
            let Some(status) = self.children[index].exited() else {
                continue;
            };
            let noticed = *self
                .exited_at
                .entry(name.clone())
                .or_insert_with(Instant::now);
            if !self.partner_active(&name, runtime) && noticed.elapsed() < RESTART_WAIT_MAX {
                continue;
            }
            self.exited_at.remove(&name);
            self.children.remove(index);
            println!("The {name} stopped ({status}); starting it again as the passive member.");
            self.start_fileserver(&name, &address, &["--pair", PAIR])?;
            restarted.push(name);
        }
        Ok(restarted)
    }

    /// True when the other member of the pair than `member` says it is active.
    pub fn partner_active(&self, member: &str, runtime: &tokio::runtime::Runtime) -> bool {
        self.members.iter().any(|(other, partner)| {
            other != member
                && runtime.block_on(member_role(&self.cell, &self.transport, partner))
                    == Some(proto::MemberRole::Active)
        })
    }

    /// The first child that exited on its own, with its log tail. Pair members and VLDB
    /// replicas are not counted: `restart_exited_members` and `restart_exited_replicas`
    /// start them again.
    pub fn check_children(&mut self) -> Result<()> {
        let mut restartable: Vec<String> = self.members.iter().map(|(n, _)| n.clone()).collect();
        restartable.extend(self.replicas.iter().map(|(id, _)| replica_name(*id)));
        for child in &mut self.children {
            if restartable.contains(&child.name) {
                continue;
            }
            if let Some(status) = child.exited() {
                bail!(
                    "the {} stopped unexpectedly ({status}); its last log lines:\n{}",
                    child.name,
                    log_tail(&self.layout.log(&child.name), 10)
                );
            }
        }
        Ok(())
    }
}

impl Drop for LocalCell {
    fn drop(&mut self) {
        while let Some(mut child) = self.children.pop() {
            child.stop(Duration::from_secs(20));
        }
        for mountpoint in &self.mounts {
            if is_holdfast_on_top(mountpoint) {
                tracing::warn!(mountpoint = %mountpoint.display(), "mount still present; detaching it");
                let _ = cachemgr::mount::detach(mountpoint);
            }
        }
    }
}

/// Fails with one line naming the port when `address`, kept in `kept_in` for `what`, is
/// taken: the cell file and the VLDB name it, so a new one would not do.
fn check_port_free(address: &str, what: &str, kept_in: &Path) -> Result<()> {
    match std::net::TcpListener::bind(address) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let port = address.rsplit(':').next().unwrap_or(address);
            bail!(
                "port {port} of {what} ({address}, kept in {} so that the cell file stays \
                 valid) is taken by another process; stop that process (`ss -ltnp \
                 'sport = :{port}'` names it) and start the cell again",
                kept_in.display()
            )
        }
        Err(e) => bail!(
            "cannot listen on {address} for {what} (kept in {}): {e}",
            kept_in.display()
        ),
    }
}

/// Waits until the fileserver at `address` says it is the active member of its pair.
pub async fn await_active(cell: &CellConfig, transport: &Transport, address: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        if member_role(cell, transport, address).await == Some(proto::MemberRole::Active) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the fileserver at {address} did not become active within {READY_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The role the fileserver at `address` reports, if it answers.
pub async fn member_role(
    cell: &CellConfig,
    transport: &Transport,
    address: &str,
) -> Option<proto::MemberRole> {
    let hello = proto::Hello {
        version_min: proto::PROTOCOL_VERSION_MIN,
        version_max: proto::PROTOCOL_VERSION_MAX,
        cell: cell.name.clone(),
        peer: PeerKind::Admin,
    };
    let limits = proto::rpc::Limits {
        handshake_timeout: Duration::from_secs(2),
        ..proto::rpc::Limits::default()
    };
    let (connection, _, _) = proto::rpc::connect(address, hello, &limits, transport)
        .await
        .ok()?;
    let answer = connection
        .call(proto::Request::MemberState, Duration::from_secs(2))
        .await;
    connection.close();
    match answer {
        Ok(proto::Response::MemberState(state)) => Some(state.role),
        _ => None,
    }
}

/// Creates `root.cell` on our fileserver unless the VLDB already has it.
pub async fn ensure_root_volume(
    cell: &CellConfig,
    transport: &Transport,
    fs_address: &str,
    admin: &proto::SealedToken,
) -> Result<()> {
    let vldb = VldbClient::new(
        cell.clone(),
        transport.clone(),
        PeerKind::Admin,
        Duration::from_secs(5),
    );
    // The fileserver registers itself in the background: wait for it.
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        let servers = vldb
            .list_servers()
            .await
            .context("ask the VLDB for its fileservers")?;
        if servers
            .iter()
            .any(|s| s.addresses.iter().any(|a| a == fs_address))
        {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "the fileserver at {fs_address} did not register with the VLDB within {READY_TIMEOUT:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let root = proto::VolumeName::parse("root.cell").map_err(anyhow::Error::new)?;
    match vldb.get_entry(proto::VolumeRef::Name(root)).await {
        Ok(_) => Ok(()),
        Err(e) if e.remote() == Some(&proto::ErrorCode::NoSuchVolume) => {
            let vos = vos::Vos::new(cell.clone(), transport.clone(), Duration::from_secs(10))
                .with_token(Some(admin.clone()));
            let entry = vos
                .create("root.cell", Some(fs_address), 0)
                .await
                .context("create the root.cell volume")?;
            crate::cell_admin::set_root_acl(
                cell,
                transport,
                fs_address,
                entry.rw_id,
                admin,
                crate::cell_admin::root_cell_acl(),
            )
            .await?;
            println!(
                "Created volume root.cell (system:administrators rlidwka, system:anyuser rl)."
            );
            Ok(())
        }
        Err(e) => Err(e).context("look up root.cell"),
    }
}

/// A mount left by a crashed earlier run answers ENOTCONN: detach it before reuse. Only
/// holdfast mounts are taken off; anything else there (`up`'s guard) the cache manager
/// judges.
pub fn clear_stale_mount(mountpoint: &Path) -> Result<()> {
    if is_holdfast_on_top(mountpoint) {
        println!(
            "{} is still mounted from an earlier run; detaching it.",
            mountpoint.display()
        );
        let _ = cachemgr::mount::detach(mountpoint);
        if is_holdfast_on_top(mountpoint) {
            bail!(
                "{} is mounted and cannot be detached; unmount it with `umount -l {}`",
                mountpoint.display(),
                mountpoint.display()
            );
        }
    }
    Ok(())
}

/// True when the mount a path at `mountpoint` reaches (the last one there) is a holdfast
/// mount.
fn is_holdfast_on_top(mountpoint: &Path) -> bool {
    // The parent resolved, not the mount point: a dead mount answers ENOTCONN.
    let (Some(parent), Some(name)) = (mountpoint.parent(), mountpoint.file_name()) else {
        return false;
    };
    let Ok(parent) = parent.canonicalize() else {
        return false;
    };
    let mountpoint = parent.join(name);
    cachemgr::mountinfo::read()
        .unwrap_or_default()
        .iter()
        .rfind(|m| m.mount_point == mountpoint)
        .is_some_and(|m| m.is_holdfast())
}

pub fn path_arg(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// A token for the local cell's administrator (`admin`, id 1, in
/// `system:administrators`), sealed with `key`.
fn admin_token(key: &proto::TokenKey, cell_name: &str) -> proto::SealedToken {
    let now = proto::Timestamp::now();
    let expiry = proto::Timestamp {
        secs: now.secs + proto::identity::TOKEN_LIFETIME_DEFAULT.as_secs() as i64,
        nanos: 0,
    };
    key.seal(proto::TokenBody {
        cell: cell_name.to_owned(),
        user: crate::cell_admin::ADMIN_USER.into(),
        id: crate::cell_admin::ADMIN_ID,
        groups: vec![proto::PrincipalId::ADMINISTRATORS],
        issued: now,
        expiry,
        key_id: 0,
    })
}
