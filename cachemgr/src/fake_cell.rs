//! Test only: a VLDB and a fileserver in one loopback service, holding one volume with
//! one file, that records how the cache manager talks to it (stores in flight, syncs,
//! fetches per chunk, lock and reclaim calls), answers lock requests as a test scripts
//! them, and can push `LockGranted` and drop its connections as a restart would. Lets the
//! manager be tested without real servers.
//! Invariant: every store moves the file's data version by exactly one, as a real
//! fileserver's does.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use proto::rpc::Connection;
use proto::server::{ServerLimits, Service, serve};
use proto::{
    CallbackGrant, DataVersion, ErrorCode, Fid, FileKind, Hello, HelloReply, LockHolder, Request,
    Response, ServerEntry, ServerId, Timestamp, Uniquifier, VnodeId, VnodeStatus, VolumeEntry,
    VolumeId, VolumeName, VolumeSite, VolumeType,
};
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
    /// Stores started.
    pub stores: usize,
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
}

pub struct FakeCell {
    server: ServerId,
    address: String,
    files: Mutex<HashMap<Fid, (Vec<u8>, DataVersion)>>,
    pub record: Mutex<Record>,
    /// Answers to the next `SetLock` requests; `Ok` once empty.
    pub lock_answers: Mutex<VecDeque<Result<Response, ErrorCode>>>,
    /// What `TestLock` reports.
    pub test_holder: Mutex<Option<LockHolder>>,
    /// Connections of cache managers, for pushes and simulated restarts.
    connections: Mutex<Vec<Connection>>,
    /// Stores wait until this many are in flight at once (or until `stores_expected`
    /// have started), so a test can prove the client overlaps them.
    pub stores_to_overlap: usize,
    pub stores_expected: usize,
    changed: watch::Sender<()>,
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
        let (changed, _) = watch::channel(());
        let cell = Arc::new(FakeCell {
            server: ServerId::random(),
            address,
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
        });
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(serve(
            listener,
            cell.clone(),
            ServerLimits::default(),
            stopped,
        ));
        (cell, stop)
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
        for connection in self.connections.lock().drain(..) {
            connection.close();
        }
    }

    /// Pushes `LockGranted` to the most recent cache manager connection.
    pub async fn push_grant(&self, wait: u64, fid: Fid) -> Result<Response, proto::ProtoError> {
        let connection = self
            .connections
            .lock()
            .last()
            .cloned()
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

    async fn store(&self, offset: u64, bytes: &[u8]) -> VnodeStatus {
        let started = {
            let mut record = self.record.lock();
            record.stores_in_flight += 1;
            record.stores_in_flight_peak =
                record.stores_in_flight_peak.max(record.stores_in_flight);
            record.stores += 1;
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

impl Service for FakeCell {
    fn hello(&self, hello: &Hello) -> Result<HelloReply, ErrorCode> {
        let version = proto::rpc::negotiate(hello, CELL)?;
        Ok(HelloReply {
            version,
            server: Some(self.server),
        })
    }

    async fn handle(
        self: Arc<Self>,
        connection: Connection,
        _hello: Arc<Hello>,
        request: Request,
    ) -> Result<Response, ErrorCode> {
        if !matches!(request, Request::VlGetEntry { .. } | Request::VlListServers) {
            let mut connections = self.connections.lock();
            if !connections.iter().any(|c| c.same(&connection)) {
                connections.push(connection);
            }
        }
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
            Request::VlListServers => Ok(Response::Servers(vec![ServerEntry {
                server: self.server,
                addresses: vec![self.address.clone()],
                registered: Timestamp::default(),
            }])),
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
            } => {
                let status = self.store(offset, data).await;
                Ok(Response::Status {
                    status,
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
