//! Test only: a VLDB and a fileserver (or a pair of members) in one loopback service,
//! which records how the cache manager talks to it and plays the faults a test scripts.
//! Invariant: every store moves the file's data version by exactly one, as a real
//! fileserver's does, and only the active member serves.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use proto::rpc::Connection;
use proto::server::{ServerLimits, Service, serve};
use proto::tls::authority::CellAuthority;
use proto::{
    CallbackGrant, DataVersion, Epoch, ErrorCode, Fid, FileKind, Hello, HelloReply, LockHolder,
    Request, Response, ServerEntry, ServerId, Timestamp, Uniquifier, VnodeId, VnodeStatus,
    VolumeEntry, VolumeId, VolumeName, VolumeSite, VolumeType,
};
use proto::{PeerClass, Transport};
use tokio::sync::watch;

use crate::chunk_index::CHUNK_BYTES;

pub const CELL: &str = "fake.test";
pub const VOLUME: VolumeId = VolumeId(7);
pub const FILE: Fid = Fid {
    volume: VOLUME,
    vnode: VnodeId(2),
    unique: Uniquifier(1),
};
/// A second file, empty until a test sets its content.
pub const FILE2: Fid = Fid {
    volume: VOLUME,
    vnode: VnodeId(3),
    unique: Uniquifier(1),
};

/// What the fake saw.
#[derive(Debug, Default)]
pub struct Record {
    pub stores_in_flight: usize,
    pub stores_in_flight_peak: usize,
    /// Bytes of the stores in flight, now and at most.
    pub store_bytes_in_flight: usize,
    pub store_bytes_in_flight_peak: usize,
    /// Stores started.
    pub stores: usize,
    /// Bytes of the largest store.
    pub store_bytes_peak: usize,
    /// Each store's offset and length, in arrival order.
    pub store_ranges: Vec<(u64, usize)>,
    pub stores_answered: usize,
    /// Stores answered when each `Fsync` arrived.
    pub fsyncs_after_stores: Vec<usize>,
    /// `FetchData` requests per chunk index.
    pub fetches: HashMap<u64, usize>,
    /// `FetchData` requests per file.
    pub fetches_by_fid: HashMap<Fid, usize>,
    /// `FetchStatus` requests per fid.
    pub status_fetches: HashMap<Fid, usize>,
    /// Lock, lease and reclaim requests, in arrival order.
    pub lock_calls: Vec<Request>,
    /// Every fileserver request with the member it reached, in arrival order
    /// (`Sequenced` ones by the kind they carry).
    pub requests: Vec<(usize, &'static str)>,
    /// The `seq` of every `Sequenced` request with the member it reached.
    pub sequenced: Vec<(usize, u64)>,
    /// `NotActive` answers given, by member.
    pub not_active: Vec<usize>,
    /// `VlListServers` requests answered.
    pub server_lists: usize,
    /// Fileserver requests that found the server down (`set_down`).
    pub refused_while_down: usize,
}

/// A call the fake never answers: when `member` gets a request of `kind`, it closes its
/// connections and the other member becomes active, as when an active dies mid-call.
#[derive(Clone, Copy, Debug)]
pub struct CutOff {
    pub member: usize,
    pub kind: &'static str,
}

/// The kind of a request, for the record.
fn kind(request: &Request) -> &'static str {
    match request {
        Request::Ping => "Ping",
        Request::FetchStatus { .. } => "FetchStatus",
        Request::FetchData { .. } => "FetchData",
        Request::StoreData { .. } | Request::StoreDataIf { .. } | Request::StoreDataBulk { .. } => {
            "StoreData"
        }
        Request::SetAttr { .. } => "SetAttr",
        Request::Fsync { .. } => "Fsync",
        Request::Remove { .. } => "Remove",
        Request::SetLock { .. } => "SetLock",
        Request::ReleaseLock { .. } => "ReleaseLock",
        Request::RenewLease => "RenewLease",
        Request::ReclaimCallbacks { .. } => "ReclaimCallbacks",
        Request::ReclaimLock { .. } => "ReclaimLock",
        Request::ReclaimDone => "ReclaimDone",
        Request::GiveUpCallbacks { .. } => "GiveUpCallbacks",
        _ => "other",
    }
}

/// Lets the manager be tested without real servers. Holds one volume: `FILE` and `FILE2`,
/// and any other fid as an empty directory (the root among them). Records how the cache
/// manager talks to it (`Record`: stores in flight, syncs, fetches per chunk, lock and
/// reclaim calls), answers lock requests as a test scripts them (`lock_answers`), and
/// can push `LockGranted` (`push_grant`), drop its connections as a restart would
/// (`drop_connections`), die (`set_down`), stop as SIGSTOP stops a process (`set_stopped`)
/// or fence itself with no takeover (`set_fenced`).
pub struct FakeCell {
    server: ServerId,
    /// Where the VLDB answers (and, for a single server, the fileserver too).
    address: String,
    /// The fileserver's members' addresses: one, or two for a pair.
    members: Vec<String>,
    /// The member that serves; the other answers `NotActive`.
    active: Mutex<usize>,
    /// Every member answers `NotActive` with no hint: the pair fenced itself and no
    /// partner took over.
    fenced: AtomicBool,
    /// The fileserver is down: every connection it gets is closed unanswered, as the
    /// kernel's refusal of a dead process's port would end it (the VLDB still answers).
    down: AtomicBool,
    /// Per member, whether it is stopped: its connections carry no byte either way.
    stopped: Vec<watch::Sender<bool>>,
    /// The addresses the VLDB lists for the server; `None`: the members, active first.
    pub listed: Mutex<Option<Vec<String>>>,
    /// The next call to cut off.
    pub cut_off: Mutex<Option<CutOff>>,
    /// Requests of this kind are never answered (the server hangs).
    pub hang_on: Mutex<Option<&'static str>>,
    /// The next store at this offset is refused with this error, storing nothing.
    pub refuse_store: Mutex<Option<(u64, ErrorCode)>>,
    files: Mutex<HashMap<Fid, (Vec<u8>, DataVersion)>>,
    pub record: Mutex<Record>,
    /// Answers to the next `SetLock` requests; `Ok` once empty.
    pub lock_answers: Mutex<VecDeque<Result<Response, ErrorCode>>>,
    /// What `TestLock` reports.
    pub test_holder: Mutex<Option<LockHolder>>,
    /// Connections of cache managers with the member they reached, for pushes and
    /// simulated restarts.
    connections: Mutex<Vec<(usize, Connection)>>,
    /// Stores wait until this many are in flight at once (or until `stores_expected`
    /// have started), so a test can prove the client overlaps them.
    pub stores_to_overlap: usize,
    pub stores_expected: usize,
    changed: watch::Sender<()>,
    /// The fake cell's CA: its servers serve with a server certificate of it.
    authority: CellAuthority,
}

impl FakeCell {
    /// Serves on a fresh loopback port until the returned sender says stop.
    pub async fn start(
        content: Vec<u8>,
        stores_to_overlap: usize,
        stores_expected: usize,
    ) -> (Arc<FakeCell>, watch::Sender<bool>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let cell = Self::new(
            content,
            address.clone(),
            vec![address],
            stores_to_overlap,
            stores_expected,
        );
        let (stop, stopped) = watch::channel(false);
        cell.serve(listener, Some(0), stopped);
        (cell, stop)
    }

    /// Serves a pair: the VLDB and members 0 and 1 each on a fresh loopback port,
    /// member 0 active. The members are one server (one id, one shared state); the
    /// passive one answers `NotActive` with the active's address, and a call can be cut
    /// off at a member mid-flight (`cut_off`), as a dying active would.
    pub async fn start_pair(content: Vec<u8>) -> (Arc<FakeCell>, watch::Sender<bool>) {
        let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
        let (vldb, zero, one) = (
            bind().await.unwrap(),
            bind().await.unwrap(),
            bind().await.unwrap(),
        );
        let address = |l: &tokio::net::TcpListener| l.local_addr().unwrap().to_string();
        let members = vec![address(&zero), address(&one)];
        let cell = Self::new(content, address(&vldb), members, 0, 0);
        let (stop, stopped) = watch::channel(false);
        cell.serve(vldb, None, stopped.clone());
        cell.serve(zero, Some(0), stopped.clone());
        cell.serve(one, Some(1), stopped);
        (cell, stop)
    }

    fn new(
        content: Vec<u8>,
        address: String,
        members: Vec<String>,
        stores_to_overlap: usize,
        stores_expected: usize,
    ) -> Arc<FakeCell> {
        let (changed, _) = watch::channel(());
        let stopped = members.iter().map(|_| watch::channel(false).0).collect();
        Arc::new(FakeCell {
            server: ServerId::random(),
            address,
            members,
            active: Mutex::new(0),
            fenced: AtomicBool::new(false),
            down: AtomicBool::new(false),
            stopped,
            listed: Mutex::new(None),
            cut_off: Mutex::new(None),
            hang_on: Mutex::new(None),
            refuse_store: Mutex::new(None),
            files: Mutex::new(HashMap::from([
                (FILE, (content, DataVersion(1))),
                (FILE2, (Vec::new(), DataVersion(1))),
            ])),
            record: Mutex::new(Record::default()),
            lock_answers: Mutex::new(VecDeque::new()),
            test_holder: Mutex::new(None),
            connections: Mutex::new(Vec::new()),
            stores_to_overlap,
            stores_expected,
            changed,
            authority: CellAuthority::generate(CELL).unwrap(),
        })
    }

    /// A client host's transport under the fake cell's CA.
    pub fn host_transport(&self) -> Transport {
        self.authority
            .transport(PeerClass::Host, "fake-client")
            .unwrap()
    }

    /// Serves `listener` as the VLDB (`member` None) or as a member; a member's
    /// connections pass through `stoppable`, so `set_stopped` can freeze them.
    fn serve(
        self: &Arc<Self>,
        listener: tokio::net::TcpListener,
        member: Option<usize>,
        stop: watch::Receiver<bool>,
    ) {
        let endpoint = Arc::new(Endpoint {
            cell: self.clone(),
            member,
        });
        let transport = self
            .authority
            .transport(PeerClass::Server, "fake-server")
            .unwrap();
        let Some(index) = member else {
            tokio::spawn(serve(
                listener,
                endpoint,
                ServerLimits::default(),
                transport,
                stop,
            ));
            return;
        };
        let inner = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        inner.set_nonblocking(true).unwrap();
        let behind = inner.local_addr().unwrap();
        let inner = tokio::net::TcpListener::from_std(inner).unwrap();
        tokio::spawn(serve(
            inner,
            endpoint,
            ServerLimits::default(),
            transport,
            stop.clone(),
        ));
        tokio::spawn(stoppable(
            listener,
            behind,
            self.stopped[index].subscribe(),
            stop,
        ));
    }

    pub fn server(&self) -> ServerId {
        self.server
    }

    /// The address of member `index`.
    pub fn member(&self, index: usize) -> String {
        self.members[index].clone()
    }

    /// Makes member `index` the active one.
    pub fn set_active(&self, index: usize) {
        *self.active.lock() = index;
    }

    pub fn address(&self) -> String {
        self.address.clone()
    }

    pub fn content(&self) -> (Vec<u8>, DataVersion) {
        self.files.lock()[&FILE].clone()
    }

    /// Changes a file behind the clients' backs (no break), moving its version.
    pub fn set_content(&self, fid: Fid, content: Vec<u8>) {
        let mut files = self.files.lock();
        let file = files.entry(fid).or_insert((Vec::new(), DataVersion(0)));
        file.0 = content;
        file.1 = file.1.next();
    }

    /// Closes every cache manager connection, as a fileserver restart does.
    pub fn drop_connections(&self) {
        for (_, connection) in self.connections.lock().drain(..) {
            connection.close();
        }
    }

    /// Takes the fileserver down (its connections closed, new ones closed unanswered)
    /// or brings it back.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            self.drop_connections();
        }
    }

    /// Stops member `index` as SIGSTOP stops a process, or continues it: meanwhile its
    /// connections carry nothing either way and are never closed, and a new one is
    /// accepted (the kernel would) but its `Hello` answered only once it continues.
    pub fn set_stopped(&self, index: usize, stopped: bool) {
        self.stopped[index].send_replace(stopped);
    }

    /// Fences the pair (both members answer `NotActive`, their connections closed, as
    /// a member closes them when its term ends) or lets member `active` serve again.
    pub fn set_fenced(&self, fenced: bool) {
        self.fenced.store(fenced, Ordering::SeqCst);
        if fenced {
            self.drop_connections();
        }
    }

    /// Closes the cache manager connections member `index` accepted.
    fn drop_member_connections(&self, index: usize) {
        self.connections.lock().retain(|(member, connection)| {
            if *member == index {
                connection.close();
            }
            *member != index
        });
    }

    /// Pushes `LockGranted` to the most recent cache manager connection of the active.
    pub async fn push_grant(
        &self,
        wait: proto::WaitId,
        fid: Fid,
    ) -> Result<Response, proto::ProtoError> {
        let active = *self.active.lock();
        let connection = self
            .connections
            .lock()
            .iter()
            .rev()
            .find(|(member, _)| *member == active)
            .map(|(_, connection)| connection.clone())
            .ok_or(proto::ProtoError::Closed)?;
        connection
            .call(Request::LockGranted { wait, fid }, Duration::from_secs(10))
            .await
    }

    /// Waits until the lock calls satisfy `done`.
    pub async fn wait_for_lock_calls(&self, done: impl Fn(&[Request]) -> bool) {
        self.wait_for(Duration::from_secs(10), |r| done(&r.lock_calls))
            .await;
    }

    /// Waits until `done` holds for the record; panics after `limit`.
    pub async fn wait_for(&self, limit: Duration, done: impl Fn(&Record) -> bool) {
        let mut changed = self.changed.subscribe();
        let wait = async {
            while !done(&self.record.lock()) {
                if changed.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(limit, wait)
            .await
            .expect("the fake cell never saw what the test waits for");
    }

    fn status(&self, fid: Fid) -> VnodeStatus {
        let (kind, size, data_version) = if let Some(data) = self.files.lock().get(&fid) {
            (FileKind::File, data.0.len() as u64, data.1)
        } else {
            (FileKind::Directory, 0, DataVersion(1))
        };
        VnodeStatus {
            fid,
            kind,
            mode: 0o755,
            link_count: 1,
            size,
            data_version,
            uid: 0,
            gid: 0,
            atime: Timestamp::default(),
            mtime: Timestamp::default(),
            ctime: Timestamp::default(),
        }
    }

    fn grant() -> Option<CallbackGrant> {
        Some(CallbackGrant {
            lifetime_ms: 60_000,
        })
    }

    /// Lands in `FILE` whichever fid the store names: the tests write no other file.
    async fn store(&self, offset: u64, bytes: &[u8]) -> VnodeStatus {
        let started = {
            let mut record = self.record.lock();
            record.stores_in_flight += 1;
            record.stores_in_flight_peak =
                record.stores_in_flight_peak.max(record.stores_in_flight);
            record.store_bytes_in_flight += bytes.len();
            record.store_bytes_in_flight_peak = record
                .store_bytes_in_flight_peak
                .max(record.store_bytes_in_flight);
            record.stores += 1;
            record.store_bytes_peak = record.store_bytes_peak.max(bytes.len());
            record.store_ranges.push((offset, bytes.len()));
            record.stores
        };
        self.changed.send_replace(());
        let mut changed = self.changed.subscribe();
        while self.record.lock().stores_in_flight_peak < self.stores_to_overlap
            && started < self.stores_expected
        {
            if changed.changed().await.is_err() {
                break;
            }
        }
        let status = {
            let mut files = self.files.lock();
            let Some(data) = files.get_mut(&FILE) else {
                unreachable!("the fake always holds FILE")
            };
            let end = offset as usize + bytes.len();
            if data.0.len() < end {
                data.0.resize(end, 0);
            }
            data.0[offset as usize..end].copy_from_slice(bytes);
            data.1 = data.1.next();
            drop(files);
            self.status(FILE)
        };
        {
            let mut record = self.record.lock();
            record.stores_in_flight -= 1;
            record.store_bytes_in_flight -= bytes.len();
            record.stores_answered += 1;
        }
        self.changed.send_replace(());
        status
    }
}

impl FakeCell {
    fn answer_lock_call(&self, request: &Request) -> Result<Response, ErrorCode> {
        match request {
            Request::SetLock { .. } => self
                .lock_answers
                .lock()
                .pop_front()
                .unwrap_or(Ok(Response::Ok)),
            Request::TestLock { .. } => Ok(Response::LockTest {
                holder: self.test_holder.lock().clone(),
            }),
            Request::ReclaimCallbacks { fids } => {
                // As a real server: re-grant what did not change, break the rest.
                let broken = fids
                    .iter()
                    .filter(|(fid, version)| self.status(*fid).data_version != *version)
                    .map(|(fid, _)| *fid)
                    .collect();
                Ok(Response::CallbacksReclaimed {
                    broken,
                    callback: CallbackGrant {
                        lifetime_ms: 60_000,
                    },
                })
            }
            _ => Ok(Response::Ok),
        }
    }
}

/// Accepts on a member's public port and relays each connection to the member's own
/// server at `behind`, byte for byte, except while `stopped` says so.
async fn stoppable(
    listener: tokio::net::TcpListener,
    behind: std::net::SocketAddr,
    stopped: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.changed() => return,
        };
        let Ok((client, _)) = accepted else {
            continue;
        };
        let stopped = stopped.clone();
        tokio::spawn(async move {
            let Ok(server) = tokio::net::TcpStream::connect(behind).await else {
                return;
            };
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::join!(
                relay(client_read, server_write, stopped.clone()),
                relay(server_read, client_write, stopped),
            );
        });
    }
}

/// Copies `from` to `to` until either ends; bytes read while stopped are held until
/// the member continues.
async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut stopped: watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buffer).await {
        if stopped.wait_for(|stopped| !stopped).await.is_err() || n == 0 {
            break;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// One listening port of the fake: the VLDB (`member` None), or a fileserver member.
struct Endpoint {
    cell: Arc<FakeCell>,
    member: Option<usize>,
}

impl Service for Endpoint {
    fn hello(&self, hello: &Hello) -> Result<HelloReply, ErrorCode> {
        let version = proto::rpc::negotiate(hello, CELL)?;
        Ok(HelloReply {
            version,
            server: Some(self.cell.server),
        })
    }

    async fn handle(
        self: Arc<Self>,
        connection: Connection,
        _hello: Arc<Hello>,
        _caller: Arc<proto::Identity>,
        request: Request,
    ) -> Result<Response, ErrorCode> {
        self.cell
            .clone()
            .handle_at(self.member, connection, request)
            .await
    }
}

impl FakeCell {
    fn listed_servers(&self) -> Vec<ServerEntry> {
        let addresses = self.listed.lock().clone().unwrap_or_else(|| {
            let active = *self.active.lock();
            let mut members = self.members.clone();
            members.swap(0, active);
            members
        });
        vec![ServerEntry {
            server: self.server,
            addresses,
            registered: Timestamp::default(),
        }]
    }

    /// What a member does with a request before serving it: `None` serves it.
    async fn intercept(
        &self,
        member: usize,
        connection: &Connection,
        request: &Request,
    ) -> Option<Result<Response, ErrorCode>> {
        let (kind, seq) = match request {
            Request::Sequenced { seq, request } => (kind(request), Some(*seq)),
            other => (kind(other), None),
        };
        if self.down.load(Ordering::SeqCst) {
            self.record.lock().refused_while_down += 1;
            self.changed.send_replace(());
            connection.close();
            // Never answered: the caller sees only the connection end.
            return Some(std::future::pending().await);
        }
        let active = *self.active.lock();
        let fenced = self.fenced.load(Ordering::SeqCst);
        {
            let mut record = self.record.lock();
            record.requests.push((member, kind));
            if let Some(seq) = seq {
                record.sequenced.push((member, seq));
            }
            if member != active || fenced {
                record.not_active.push(member);
            }
        }
        self.changed.send_replace(());
        if fenced {
            return Some(Err(ErrorCode::NotActive {
                epoch: Epoch(1),
                hint: None,
            }));
        }
        if member != active {
            return Some(Err(ErrorCode::NotActive {
                epoch: Epoch(1),
                hint: Some(self.members[active].clone()),
            }));
        }
        let cut = self
            .cut_off
            .lock()
            .take_if(|cut| cut.member == member && cut.kind == kind);
        if cut.is_some() {
            self.set_active((member + 1) % self.members.len());
            self.drop_member_connections(member);
            // Never answered: the caller sees only the connection end.
            return Some(std::future::pending().await);
        }
        if *self.hang_on.lock() == Some(kind) {
            connection.closed().await;
            return Some(Err(ErrorCode::Unsupported));
        }
        None
    }

    async fn handle_at(
        self: Arc<Self>,
        member: Option<usize>,
        connection: Connection,
        request: Request,
    ) -> Result<Response, ErrorCode> {
        let vldb = matches!(request, Request::VlGetEntry { .. } | Request::VlListServers);
        if !vldb {
            let Some(member) = member else {
                return Err(ErrorCode::Unsupported);
            };
            {
                let mut connections = self.connections.lock();
                if !connections.iter().any(|(_, c)| c.same(&connection)) {
                    connections.push((member, connection.clone()));
                }
            }
            if let Some(answer) = self.intercept(member, &connection, &request).await {
                return answer;
            }
        }
        let request = match request {
            Request::Sequenced { request, .. } => *request,
            other => other,
        };
        match request {
            Request::VlGetEntry { .. } => Ok(Response::VolumeEntry(VolumeEntry {
                name: VolumeName::parse("root.cell").map_err(|_| ErrorCode::Unsupported)?,
                rw_id: VOLUME,
                ro_id: None,
                backup_id: None,
                sites: vec![VolumeSite {
                    server: self.server,
                    kind: VolumeType::ReadWrite,
                }],
            })),
            Request::VlListServers => {
                let servers = self.listed_servers();
                self.record.lock().server_lists += 1;
                self.changed.send_replace(());
                Ok(Response::Servers(servers))
            }
            Request::Remove { dir, .. } => Ok(Response::Removed {
                dir: self.status(dir),
                target: None,
            }),
            Request::FetchStatus { fid } => {
                *self.record.lock().status_fetches.entry(fid).or_default() += 1;
                Ok(Response::Status {
                    status: self.status(fid),
                    callback: Self::grant(),
                })
            }
            Request::FetchData {
                fid,
                offset,
                length,
            } => {
                {
                    let mut record = self.record.lock();
                    *record.fetches.entry(offset / CHUNK_BYTES).or_default() += 1;
                    *record.fetches_by_fid.entry(fid).or_default() += 1;
                }
                self.changed.send_replace(());
                let data = self
                    .files
                    .lock()
                    .get(&fid)
                    .map(|f| f.0.clone())
                    .unwrap_or_default();
                let start = (offset as usize).min(data.len());
                let end = (start + length as usize).min(data.len());
                Ok(Response::Data {
                    status: self.status(fid),
                    callback: Self::grant(),
                    data: data[start..end].to_vec(),
                })
            }
            Request::StoreData {
                offset, ref data, ..
            }
            | Request::StoreDataIf {
                offset, ref data, ..
            } => {
                let refused = self.refuse_store.lock().take_if(|(at, _)| *at == offset);
                if let Some((_, code)) = refused {
                    return Err(code);
                }
                let status = self.store(offset, data).await;
                Ok(Response::Status {
                    status,
                    callback: Self::grant(),
                })
            }
            Request::StoreDataBulk {
                offset, ref data, ..
            } => {
                let refused = self.refuse_store.lock().take_if(|(at, _)| *at == offset);
                if let Some((_, code)) = refused {
                    return Err(code);
                }
                let status = self.store(offset, data.bytes()).await;
                Ok(Response::Status {
                    status,
                    callback: Self::grant(),
                })
            }
            Request::SetAttr { fid, attrs } => {
                {
                    let mut files = self.files.lock();
                    let Some(file) = files.get_mut(&fid) else {
                        return Err(ErrorCode::NoSuchEntry);
                    };
                    if let Some(size) = attrs.size {
                        file.0.resize(size as usize, 0);
                    }
                    file.1 = file.1.next();
                }
                Ok(Response::Status {
                    status: self.status(fid),
                    callback: Self::grant(),
                })
            }
            Request::Fsync { fid } => {
                let mut record = self.record.lock();
                let answered = record.stores_answered;
                record.fsyncs_after_stores.push(answered);
                drop(record);
                Ok(Response::Status {
                    status: self.status(fid),
                    callback: None,
                })
            }
            Request::GiveUpCallbacks { .. } => Ok(Response::Ok),
            Request::Ping => Ok(Response::Pong),
            Request::SetLock { .. }
            | Request::ReleaseLock { .. }
            | Request::TestLock { .. }
            | Request::CancelLockWait { .. }
            | Request::RenewLease
            | Request::ReclaimCallbacks { .. }
            | Request::ReclaimLock { .. }
            | Request::ReclaimDone => {
                let answer = self.answer_lock_call(&request);
                self.record.lock().lock_calls.push(request);
                self.changed.send_replace(());
                answer
            }
            _ => Err(ErrorCode::Unsupported),
        }
    }
}
