//! The service on a fileserver's listener: the current term's file service behind the
//! fence, or `NotActive` while passive; also `MemberState` and `PairSwitchover`.
//! Invariant: an answer leaves only if the fence was open when its request was admitted
//! and still is, in the same term, once it was handled; otherwise it is `NotActive`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::RwLock;
use proto::Identity;
use proto::rpc::Connection;
use proto::server::Service;
use proto::{
    Epoch, ErrorCode, Hello, HelloReply, MemberRole, MemberState, PairName, PeerKind, Request,
    Response, ServerId,
};
use tokio::sync::{Notify, mpsc, oneshot};
use tracing::{debug, info};

use crate::config::Config;
use crate::fence::Fence;
use crate::history::{self, History};
use crate::service::FileService;

/// A switchover request handed to the member's role machine, answered when done.
pub type SwitchoverRequest = oneshot::Sender<Result<(), ErrorCode>>;

/// What the member is now.
#[derive(Clone)]
struct Role {
    kind: MemberRole,
    epoch: Epoch,
    /// Where the active member is, for `NotActive` answers.
    hint: Option<String>,
    /// The current term's file service (single or active).
    service: Option<Arc<FileService>>,
    /// Counts terms; a connection is registered with the term it met.
    term: u64,
}

struct Registered {
    connection: Connection,
    hello: Arc<Hello>,
    term: u64,
}

/// The listener's service, for single servers and pair members alike.
pub struct MemberService {
    cell: String,
    member: String,
    pair: Option<PairName>,
    server: ServerId,
    fence: Arc<Fence>,
    /// Read on every request (shared), written only on a change of role.
    role: RwLock<Role>,
    /// Connections registered with a term's file service, by peer address (unique
    /// among live TCP connections; `same` guards against a reused one).
    /// Looked up (shared) on every request; written once per connection and term.
    connections: RwLock<HashMap<SocketAddr, Registered>>,
    history: Option<History>,
    /// False while a switchover drains: new requests get `NotActive`.
    admitting: AtomicBool,
    in_flight: AtomicUsize,
    drained: Notify,
    switchover: Option<mpsc::Sender<SwitchoverRequest>>,
    /// The cell's token verifier; `serve` asks for it per new token.
    tokens: Option<proto::TokenVerifier>,
}

impl MemberService {
    /// A single server's: always serving `service`, fence always open.
    pub fn single(
        config: &Config,
        member: String,
        server: ServerId,
        fence: Arc<Fence>,
        history: Option<History>,
        service: Arc<FileService>,
    ) -> MemberService {
        let role = Role {
            kind: MemberRole::Single,
            epoch: Epoch(0),
            hint: None,
            service: Some(service),
            term: 1,
        };
        MemberService::new(config, member, server, fence, history, role, None)
    }

    /// A pair member's, passive until the role machine makes it active.
    pub fn member(
        config: &Config,
        member: String,
        server: ServerId,
        fence: Arc<Fence>,
        history: Option<History>,
        switchover: mpsc::Sender<SwitchoverRequest>,
    ) -> MemberService {
        let role = Role {
            kind: MemberRole::Passive,
            epoch: Epoch(0),
            hint: None,
            service: None,
            term: 0,
        };
        MemberService::new(
            config,
            member,
            server,
            fence,
            history,
            role,
            Some(switchover),
        )
    }

    fn new(
        config: &Config,
        member: String,
        server: ServerId,
        fence: Arc<Fence>,
        history: Option<History>,
        role: Role,
        switchover: Option<mpsc::Sender<SwitchoverRequest>>,
    ) -> MemberService {
        MemberService {
            cell: config.cell.name.clone(),
            member,
            pair: config.pair.as_ref().map(|p| p.name.clone()),
            server,
            fence,
            role: RwLock::new(role),
            connections: RwLock::new(HashMap::new()),
            history,
            admitting: AtomicBool::new(true),
            in_flight: AtomicUsize::new(0),
            drained: Notify::new(),
            switchover,
            tokens: config.tokens.0.clone(),
        }
    }

    /// Starts a term: `service` serves from now on (the fence is open already).
    pub fn become_active(&self, epoch: Epoch, service: Arc<FileService>) {
        let mut role = self.role.write();
        role.kind = MemberRole::Active;
        role.epoch = epoch;
        role.hint = Some(self.member.clone());
        role.service = Some(service);
        role.term += 1;
        self.admitting.store(true, Ordering::SeqCst);
        self.line(epoch, "active");
    }

    /// Ends the term (if any): passive at `epoch`, pointing at `hint`; every cache manager
    /// connection that met the old term is closed, so that no client keeps talking to a
    /// dead term. The caller closed the fence or closes it next.
    pub fn become_passive(&self, epoch: Epoch, hint: Option<String>) {
        let ended = {
            let mut role = self.role.write();
            let was_active = role.kind == MemberRole::Active;
            role.kind = MemberRole::Passive;
            role.epoch = role.epoch.max(epoch);
            role.hint = hint.filter(|h| *h != self.member);
            role.service = None;
            if was_active {
                role.term += 1;
                Some(role.term - 1)
            } else {
                None
            }
        };
        let Some(term) = ended else { return };
        let closed: Vec<Connection> = {
            let mut connections = self.connections.write();
            let mut closed = Vec::new();
            connections.retain(|_, registered| {
                let keep = registered.term != term;
                // Cache managers hold the term's callbacks and locks: they must notice
                // and reconnect. Admin connections hold nothing (and one of them may
                // be waiting for the switchover's answer).
                if !keep && matches!(registered.hello.peer, PeerKind::CacheManager { .. }) {
                    closed.push(registered.connection.clone());
                }
                keep
            });
            closed
        };
        for connection in &closed {
            connection.close();
        }
        info!(
            connections = closed.len(),
            "term ended: its connections are closed"
        );
    }

    /// Stops admitting requests (a switchover begins) and waits up to `limit` for those
    /// in flight; returns whether none is left.
    pub async fn drain(&self, limit: Duration) -> bool {
        self.admitting.store(false, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight.load(Ordering::SeqCst) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    /// Appends a role change or an acknowledged change to the history, if kept.
    pub fn line(&self, epoch: Epoch, what: &str) {
        if let Some(history) = &self.history {
            history.line(epoch, &self.member, what);
        }
    }

    fn not_active(&self) -> ErrorCode {
        let role = self.role.read();
        ErrorCode::NotActive {
            epoch: role.epoch,
            hint: role.hint.clone().filter(|h| *h != self.member),
        }
    }

    /// The term's service if the member serves now, counted in flight until dropped.
    fn admit(&self) -> Result<(Arc<FileService>, Epoch, u64, InFlight<'_>), ErrorCode> {
        let (service, epoch, term) = {
            let role = self.role.read();
            (role.service.clone(), role.epoch, role.term)
        };
        let service = match service {
            Some(service) if self.admitting.load(Ordering::SeqCst) && self.fence.is_open() => {
                service
            }
            _ => return Err(self.not_active()),
        };
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        Ok((service, epoch, term, InFlight(self)))
    }

    /// Registers `connection` with the term's service the first time it meets it.
    fn register(
        &self,
        connection: &Connection,
        hello: &Arc<Hello>,
        service: &FileService,
        term: u64,
    ) {
        let address = connection.peer_addr();
        {
            let connections = self.connections.read();
            if let Some(registered) = connections.get(&address)
                && registered.term == term
                && registered.connection.same(connection)
            {
                return;
            }
        }
        service.connected(connection, hello);
        self.connections.write().insert(
            address,
            Registered {
                connection: connection.clone(),
                hello: hello.clone(),
                term,
            },
        );
    }

    fn state(&self) -> MemberState {
        let role = self.role.read().clone();
        MemberState {
            member: self.member.clone(),
            pair: self.pair.clone(),
            role: role.kind,
            epoch: role.epoch,
            grace: role.service.and_then(|s| s.locks.grace_state()),
        }
    }

    async fn request_switchover(&self) -> Result<Response, ErrorCode> {
        let Some(switchover) = &self.switchover else {
            return Err(ErrorCode::Unsupported);
        };
        if self.role.read().kind != MemberRole::Active {
            return Err(self.not_active());
        }
        let (answer, answered) = oneshot::channel();
        switchover.try_send(answer).map_err(|_| ErrorCode::Busy)?;
        answered
            .await
            .unwrap_or(Err(ErrorCode::Internal("the member stopped".into())))?;
        Ok(Response::Ok)
    }
}

/// Counts a request in flight; the last one out wakes a draining switchover.
struct InFlight<'a>(&'a MemberService);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.drained.notify_waiters();
        }
    }
}

impl Service for MemberService {
    fn hello(&self, hello: &Hello) -> Result<HelloReply, ErrorCode> {
        let version = proto::rpc::negotiate(hello, &self.cell)?;
        Ok(HelloReply {
            version,
            server: Some(self.server),
        })
    }

    fn token_verifier(&self) -> Option<&proto::TokenVerifier> {
        self.tokens.as_ref()
    }

    fn connected(&self, connection: &Connection, hello: &Hello) {
        let (service, term) = {
            let role = self.role.read();
            (role.service.clone(), role.term)
        };
        if let Some(service) = service {
            self.register(connection, &Arc::new(hello.clone()), &service, term);
        }
    }

    async fn handle(
        self: Arc<Self>,
        connection: Connection,
        hello: Arc<Hello>,
        caller: Arc<Identity>,
        request: Request,
    ) -> Result<Response, ErrorCode> {
        match request {
            Request::MemberState => return Ok(Response::MemberState(self.state())),
            // A planned handover is the cell's administrators' (or a server's) to ask.
            Request::PairSwitchover if !caller.may_administer_cell() => {
                return Err(ErrorCode::AdministratorRequired);
            }
            Request::PairSwitchover => return self.request_switchover().await,
            _ => {}
        }
        let (service, epoch, term, in_flight) = match self.admit() {
            Ok(admitted) => admitted,
            Err(code) => {
                debug!(%code, "not serving");
                return Err(code);
            }
        };
        self.register(&connection, &hello, &service, term);
        let recorded = self
            .history
            .as_ref()
            .and_then(|_| history::is_recorded(&request).then(|| history::kind(&request)));
        let answer = service.handle(connection, hello, caller, request).await;
        // The last check: a member whose lease ran out (or that was demoted) while the
        // request ran must not acknowledge it.
        if !self.fence.is_open() || self.role.read().term != term {
            return Err(self.not_active());
        }
        if let (Ok(_), Some(kind)) = (&answer, recorded) {
            self.line(epoch, &kind);
        }
        drop(in_flight);
        answer
    }

    fn disconnected(&self, connection: &Connection, _hello: &Hello) {
        let registered = {
            let mut connections = self.connections.write();
            match connections.get(&connection.peer_addr()) {
                Some(r) if r.connection.same(connection) => {
                    connections.remove(&connection.peer_addr())
                }
                _ => None,
            }
        };
        let Some(registered) = registered else { return };
        let (service, term) = {
            let role = self.role.read();
            (role.service.clone(), role.term)
        };
        if let Some(service) = service
            && term == registered.term
        {
            service.disconnected(connection, &registered.hello);
        }
    }
}
