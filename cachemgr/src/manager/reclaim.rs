//! The reclaim after a lost connection: callbacks by data version, then locks, then
//! `ReclaimDone`, on the new connection before anyone else uses it; and the one task per
//! server that probes it while a reclaim is owed there or the pool marks it silent.
//! Invariant: a callback is renewed only where the server confirmed the version cached;
//! the others stay void until revalidated.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use proto::rpc::Connection;
use proto::{DataVersion, ErrorCode, Fid, ProtoError, Request, Response, ServerId, VolumeId};
use tracing::{debug, info, warn};

use super::Manager;
use crate::server_pool::CallbackSink;

/// Fids per `ReclaimCallbacks` (the server takes up to 8192; each is ~30 bytes).
const RECLAIM_BATCH: usize = 4096;
/// First and longest pause between probes of a server owed a reclaim or marked silent:
/// the longest bounds how long a server that is back goes unnoticed (calls to a silent
/// one fail at once until a probe gets an answer) and how long a restarted server waits
/// for this client to collect its delayed breaks. A probe of a dead server costs one
/// refused connect; of a stopped one, a connection left in its backlog.
const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(100);
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A passive pair member answered: the reclaim belongs on the active one.
fn not_active(e: &ProtoError) -> bool {
    matches!(e, ProtoError::Remote(ErrorCode::NotActive { .. }))
}

/// Reconnecting to a fileserver after its restart (or a lost connection) throws no cache
/// away. A lost connection leaves every callback from that server valid until it expires,
/// so cached files stay readable while the server is unreachable (the soundness argument
/// is in `docs/cache-manager.md`, "While a server is unreachable"); they are also owed
/// for reclaim, and the first new connection reclaims them with the data versions
/// cached, then the locks held, then says done. Every fid the server reports broken is
/// broken here too (status invalid, listing dropped, kernel caches invalidated). A
/// reclaim that fails on the transport, or reaches a pair member that is not active
/// (`NotActive`), leaves everything owed for the next connection.
impl Manager {
    /// The connection to `server` ended: the callbacks held from it stay valid and become
    /// owed for reclaim, its queued lock requests are woken to ask again, and a task
    /// reconnects by itself. A connection that held nothing (one the server closed as
    /// idle, say) is simply reopened by the next call that needs it.
    pub(super) fn on_connection_lost(&self, server: ServerId) {
        self.lock_waits.connection_lost(server);
        let volumes = self.volumes_of(server);
        let held = self.callbacks_held_on(&volumes);
        let locks = self.locks_on(&volumes).len();
        if held.is_empty() && locks == 0 && !self.reclaim_owed.lock().contains_key(&server) {
            debug!(%server, "fileserver connection closed; nothing is held there");
            return;
        }
        let owed = {
            let mut owed = self.reclaim_owed.lock();
            let set = owed.entry(server).or_default();
            set.extend(held);
            set.len()
        };
        info!(%server, callbacks = owed, locks, "fileserver connection lost; cached files stay readable under their callbacks, reclaiming on reconnect");
        self.spawn_reconnect(server);
    }

    /// Drops every callback held from `server` (the cached data stays, to be revalidated
    /// by data version); returns the fids that lost theirs.
    pub(super) fn reset_callbacks_from(&self, server: ServerId) -> Vec<Fid> {
        let volumes = self.volumes_of(server);
        self.state
            .lock()
            .statuses
            .reset_callbacks(|fid| volumes.contains(&fid.volume))
    }

    pub(super) fn volumes_of(&self, server: ServerId) -> HashSet<VolumeId> {
        self.volumes.volumes_on(server).into_iter().collect()
    }

    /// The fids of `volumes` whose callback holds now.
    pub(super) fn callbacks_held_on(&self, volumes: &HashSet<VolumeId>) -> Vec<Fid> {
        self.state
            .lock()
            .statuses
            .with_callback(Instant::now())
            .filter(|fid| volumes.contains(&fid.volume))
            .collect()
    }

    pub(super) fn locks_on(
        &self,
        volumes: &HashSet<VolumeId>,
    ) -> Vec<(Fid, crate::held_locks::HeldLock)> {
        self.held_locks
            .lock()
            .all()
            .into_iter()
            .filter(|(fid, _)| volumes.contains(&fid.volume))
            .collect()
    }

    /// The pool marked `server` silent: calls to it fail at once until a probe gets an
    /// answer, so probe it even when nothing is owed there.
    pub(super) fn on_server_silent(&self, server: ServerId) {
        debug!(%server, "fileserver marked silent; probing it");
        self.spawn_reconnect(server);
    }

    /// Probes `server` (a connect, the reclaim, a ping, each within the pool's short
    /// probe timeout) at once and then with growing pauses, while a reclaim is owed there
    /// or the pool marks it silent: locks are reclaimed within grace, delayed breaks
    /// collected and a silent server found again even when nothing else calls. One task
    /// per server at a time; it decides to end under the `reconnecting` lock, which the
    /// one starting it takes too, so a mark made as it ends is never left unprobed.
    fn spawn_reconnect(&self, server: ServerId) {
        if !self.reconnecting.lock().insert(server) {
            return;
        }
        let this = self.this.clone();
        self.runtime.spawn(async move {
            let mut pause = Duration::ZERO;
            loop {
                tokio::time::sleep(pause).await;
                let Some(manager) = this.upgrade() else {
                    return;
                };
                let Some(addresses) = manager.still_to_probe(server) else {
                    return;
                };
                let timeout = manager.pool.probe_timeout();
                if manager.pool.probe(server, &addresses, timeout).await {
                    let mut reconnecting = manager.reconnecting.lock();
                    if !manager.pool.is_silent(server) {
                        reconnecting.remove(&server);
                        return;
                    }
                }
                debug!(%server, ?pause, "fileserver still unreachable");
                pause = (pause * 2).clamp(RECONNECT_BACKOFF_MIN, RECONNECT_BACKOFF_MAX);
            }
        });
    }

    /// The addresses to probe `server` at, while a reclaim is owed there or the pool
    /// marks it silent; otherwise `None`, and the probing task for it ends.
    fn still_to_probe(&self, server: ServerId) -> Option<Vec<String>> {
        let mut reconnecting = self.reconnecting.lock();
        let wanted = self.reclaim_owed.lock().contains_key(&server) || self.pool.is_silent(server);
        let addresses = self
            .volumes
            .servers()
            .into_iter()
            .find(|(s, _)| *s == server)
            .map(|(_, addresses)| addresses)
            .filter(|_| wanted);
        if addresses.is_none() {
            reconnecting.remove(&server);
        }
        addresses
    }

    /// Reclaims over the new `connection` what this client held on `server`.
    pub(super) async fn reclaim_on(
        &self,
        server: ServerId,
        connection: &Connection,
        timeout: Duration,
    ) -> Result<(), ProtoError> {
        let volumes = self.volumes_of(server);
        let owed: Vec<Fid> = self
            .reclaim_owed
            .lock()
            .get(&server)
            .map(|set| set.iter().copied().collect())
            .unwrap_or_default();
        let locks = self.locks_on(&volumes);
        if owed.is_empty() && locks.is_empty() {
            self.reclaim_owed.lock().remove(&server);
            return Ok(());
        }
        let (mut kept, mut broken) = (0usize, 0usize);
        for batch in owed.chunks(RECLAIM_BATCH) {
            let fids: Vec<(Fid, DataVersion)> = {
                let state = self.state.lock();
                batch
                    .iter()
                    .filter_map(|fid| {
                        state
                            .statuses
                            .get(*fid)
                            .map(|e| (*fid, e.status.data_version))
                    })
                    .collect()
            };
            if fids.is_empty() {
                continue;
            }
            let sent_at = Instant::now();
            let request = Request::ReclaimCallbacks { fids: fids.clone() };
            match connection.call(request, timeout).await {
                Ok(Response::CallbacksReclaimed {
                    broken: gone,
                    callback,
                }) => {
                    let gone: HashSet<Fid> = gone.into_iter().collect();
                    let until = sent_at + Duration::from_millis(callback.lifetime_ms);
                    {
                        let mut state = self.state.lock();
                        for (fid, version) in &fids {
                            if gone.contains(fid) {
                                continue;
                            }
                            if let Some(entry) = state.statuses.get_mut(*fid)
                                && entry.status.data_version == *version
                            {
                                entry.callback_until =
                                    Some(entry.callback_until.map_or(until, |u| u.max(until)));
                                kept += 1;
                            }
                        }
                    }
                    broken += gone.len();
                    let gone: Vec<Fid> = gone.into_iter().collect();
                    self.break_callbacks(&gone);
                }
                Ok(other) => {
                    warn!(%server, response = other.kind_name(), "unexpected answer to a callback reclaim");
                }
                Err(e) if not_active(&e) => return Err(e),
                Err(ProtoError::Remote(code)) => {
                    // Nothing confirmed: void them. The statuses stay, to be revalidated
                    // by version on use.
                    debug!(%server, %code, "fileserver refused the callback reclaim");
                    let refused: Vec<Fid> = fids.iter().map(|(fid, _)| *fid).collect();
                    broken += refused.len();
                    self.break_callbacks(&refused);
                }
                Err(e) => return Err(e),
            }
        }
        self.reclaim_owed.lock().remove(&server);
        let mut lost = 0usize;
        for (fid, lock) in &locks {
            let request = Request::ReclaimLock {
                fid: *fid,
                owner: lock.owner,
                range: lock.range,
                kind: lock.kind,
                pid: lock.pid,
            };
            match connection.call(request, timeout).await {
                Ok(_) => {}
                Err(e) if not_active(&e) => return Err(e),
                Err(ProtoError::Remote(code)) => {
                    // Kept: if the server did not restart it still holds the lock, and a
                    // release of a lock it does not hold is harmless.
                    lost += 1;
                    warn!(%fid, owner = lock.owner.0, "lock could not be reclaimed ({code}); it may have been lost");
                }
                Err(e) => return Err(e),
            }
        }
        match connection.call(Request::ReclaimDone, timeout).await {
            Err(e) if not_active(&e) => return Err(e),
            Ok(_) | Err(ProtoError::Remote(_)) => {}
            Err(e) => return Err(e),
        }
        info!(%server, kept, broken, locks = locks.len(), locks_refused = lost, "reclaimed after reconnecting");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proto::{ByteRange, LockKind, LockOwnerId};

    use std::sync::Arc;

    use super::*;
    use crate::chunk_index::CHUNK_BYTES;
    use crate::fake_cell::{FILE, FILE2, FakeCell};
    use crate::inode::Ino;
    use crate::manager::test_support::{WAIT_MAX, start_manager, start_manager_with};
    use crate::manager::{FsError, FsResult, LockRequest};
    use crate::server_pool::KEEPALIVE_IDLE;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restarted_server_gets_callbacks_and_locks_reclaimed_and_only_changes_refetched() {
        let content: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let (cell, _stop) = FakeCell::start(content.clone(), 0, 0).await;
        cell.set_content(FILE2, b"old".to_vec());
        let dir = tempfile::tempdir().unwrap();
        let manager = start_manager(&cell, dir.path()).await;
        let (one, two) = {
            let mut state = manager.state.lock();
            (state.inodes.ino_for(FILE), state.inodes.ino_for(FILE2))
        };
        assert_eq!(manager.read(one, 0, 4096).await.unwrap(), content);
        assert_eq!(manager.read(two, 0, 4096).await.unwrap(), b"old");
        let lock = LockRequest {
            owner: LockOwnerId(5),
            range: ByteRange::whole(),
            kind: Some(LockKind::Exclusive),
            pid: 42,
        };
        manager.setlk(one, lock, false).await.unwrap();

        // The server restarts; meanwhile FILE2 changed and no break could reach us.
        cell.set_content(FILE2, b"new content".to_vec());
        let (one_version, two_version) = (cell.content().1, DataVersion(2));
        cell.drop_connections();
        // Nobody calls: the client reconnects and reclaims by itself.
        cell.wait_for_lock_calls(|calls| calls.contains(&Request::ReclaimDone))
            .await;
        let (calls, fetched, statuses) = {
            let record = cell.record.lock();
            (
                record.lock_calls.clone(),
                record.fetches_by_fid.clone(),
                record.status_fetches.clone(),
            )
        };
        let [
            Request::SetLock { .. },
            Request::ReclaimCallbacks { fids },
            reclaim_lock,
            Request::ReclaimDone,
        ] = &calls[..]
        else {
            panic!("unexpected lock calls: {calls:?}");
        };
        assert!(fids.contains(&(FILE, one_version)), "{fids:?}");
        assert!(fids.contains(&(FILE2, two_version)), "{fids:?}");
        assert_eq!(
            reclaim_lock,
            &Request::ReclaimLock {
                fid: FILE,
                owner: LockOwnerId(5),
                range: ByteRange::whole(),
                kind: LockKind::Exclusive,
                pid: 42,
            }
        );
        assert!(
            !manager
                .reclaim_owed
                .lock()
                .contains_key(&cell_server(&manager))
        );

        // The unchanged file is served from the cache with no RPC at all.
        assert_eq!(manager.read(one, 0, 4096).await.unwrap(), content);
        // The changed one is revalidated and refetched.
        assert_eq!(manager.read(two, 0, 4096).await.unwrap(), b"new content");
        let record = cell.record.lock();
        assert_eq!(record.fetches_by_fid.get(&FILE), fetched.get(&FILE));
        assert_eq!(record.status_fetches.get(&FILE), statuses.get(&FILE));
        assert_eq!(
            record.fetches_by_fid.get(&FILE2).copied(),
            fetched.get(&FILE2).map(|n| n + 1)
        );
    }

    /// Waits (polling: the manager hears of a closed connection from its own task)
    /// until `done` holds; panics after `WAIT_MAX`.
    async fn eventually(mut done: impl FnMut() -> bool) {
        let waited = tokio::time::timeout(WAIT_MAX, async {
            while !done() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(waited.is_ok(), "the condition never held");
    }

    /// Starts a manager whose calls time out after `RPC_TIMEOUT`, reads `FILE` into its
    /// cache, and takes the server down once the manager has noticed.
    async fn cached_then_down(
        cell: &FakeCell,
        dir: &std::path::Path,
        content: &[u8],
    ) -> (Arc<Manager>, Ino) {
        let manager = start_manager_with(cell, dir, WAIT_MAX, RPC_TIMEOUT, WAIT_MAX).await;
        let ino = manager.state.lock().inodes.ino_for(FILE);
        assert_eq!(manager.read(ino, 0, 4096).await.unwrap(), content);
        cell.set_down(true);
        let server = cell_server(&manager);
        eventually(|| manager.reclaim_owed.lock().contains_key(&server)).await;
        (manager, ino)
    }

    const RPC_TIMEOUT: Duration = Duration::from_millis(500);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_server_leaves_cached_files_readable_and_the_rest_fails_with_etimedout() {
        let content = b"cached before the server died".to_vec();
        let (cell, _stop) = FakeCell::start(content.clone(), 0, 0).await;
        let dir = tempfile::tempdir().unwrap();
        let (manager, one) = cached_then_down(&cell, dir.path(), &content).await;
        let asked = cell.record.lock().requests.len();

        // Under their callbacks: data, attributes, the root's listing, with no RPC.
        assert_eq!(manager.read(one, 0, 4096).await.unwrap(), content);
        let attr = manager.getattr(one).await.unwrap();
        assert_eq!(attr.attr.size, content.len() as u64);
        assert!(attr.ttl > Duration::ZERO, "the kernel may cache it too");
        manager.getattr(Ino::ROOT).await.unwrap();
        manager.open(one).await.unwrap();
        assert_eq!(cell.record.lock().requests.len(), asked);

        // What is not cached needs the server, and says it cannot be reached.
        let two = manager.state.lock().inodes.ino_for(FILE2);
        assert_eq!(manager.read(two, 0, 4096).await, Err(FsError::ETIMEDOUT));
        // A write lands in the cache; storing it fails, and it is kept for later.
        manager.write(one, 0, b"C").await.unwrap();
        assert_eq!(manager.flush(one).await, Err(FsError::ETIMEDOUT));

        // Back: the reconnect by itself reclaims, and the unstored write is stored.
        cell.set_down(false);
        cell.wait_for_lock_calls(|calls| calls.contains(&Request::ReclaimDone))
            .await;
        manager.flush(one).await.unwrap();
        assert!(
            cell.content().0.starts_with(b"Cached"),
            "{:?}",
            cell.content()
        );
        assert_eq!(manager.read(two, 0, 4096).await.unwrap(), b"");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_change_made_while_unreachable_is_seen_once_the_reclaim_reports_it() {
        let content = b"old".to_vec();
        let (cell, _stop) = FakeCell::start(content.clone(), 0, 0).await;
        let dir = tempfile::tempdir().unwrap();
        let (manager, one) = cached_then_down(&cell, dir.path(), &content).await;
        // Another client changed it; no break could reach this one.
        cell.set_content(FILE, b"new".to_vec());
        assert_eq!(manager.read(one, 0, 4096).await.unwrap(), b"old");
        cell.set_down(false);
        cell.wait_for_lock_calls(|calls| calls.contains(&Request::ReclaimDone))
            .await;
        let reclaimed = cell.record.lock().lock_calls.iter().any(|call| {
            matches!(call, Request::ReclaimCallbacks { fids } if fids.contains(&(FILE, DataVersion(1))))
        });
        assert!(
            reclaimed,
            "the callback kept meanwhile was reclaimed by version"
        );
        assert_eq!(manager.read(one, 0, 4096).await.unwrap(), b"new");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_expired_callback_is_not_served_while_the_server_is_unreachable() {
        let content = b"cached".to_vec();
        let (cell, _stop) = FakeCell::start(content.clone(), 0, 0).await;
        let dir = tempfile::tempdir().unwrap();
        let (manager, one) = cached_then_down(&cell, dir.path(), &content).await;
        if let Some(entry) = manager.state.lock().statuses.get_mut(FILE) {
            entry.callback_until = Some(Instant::now());
        }
        assert_eq!(manager.read(one, 0, 4096).await, Err(FsError::ETIMEDOUT));
        assert_eq!(
            manager.getattr(one).await.map(|_| ()),
            Err(FsError::ETIMEDOUT)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_idle_connections_holding_callbacks_are_kept_alive() {
        let (cell, _stop) = FakeCell::start(b"x".to_vec(), 0, 0).await;
        let dir = tempfile::tempdir().unwrap();
        let manager = start_manager(&cell, dir.path()).await;
        let pings = || {
            let record = cell.record.lock();
            record.requests.iter().filter(|(_, k)| *k == "Ping").count()
        };
        // The root's status came with a callback: the connection is kept alive, but
        // only once it has been idle.
        assert_eq!(manager.pool.ping_idle(KEEPALIVE_IDLE).await, 0);
        assert_eq!(manager.pool.ping_idle(Duration::ZERO).await, 1);
        assert_eq!(pings(), 1);
        // Nothing held: left to the server's idle timeout.
        manager.reset_callbacks(cell_server(&manager));
        assert_eq!(manager.pool.ping_idle(Duration::ZERO).await, 0);
        assert_eq!(pings(), 1);
        // Closed by the server then, it is reopened by the next call, with nothing
        // to reclaim.
        cell.drop_connections();
        let one = manager.state.lock().inodes.ino_for(FILE);
        assert_eq!(manager.read(one, 0, 10).await.unwrap(), b"x");
        let record = cell.record.lock();
        let reclaims = record
            .lock_calls
            .iter()
            .filter(|c| matches!(c, Request::ReclaimCallbacks { .. }));
        assert_eq!(reclaims.count(), 0, "{:?}", record.lock_calls);
    }

    /// Long enough that a call failing at once is told apart from one that waited.
    const SILENT_RPC_TIMEOUT: Duration = Duration::from_secs(2);
    /// Chunks of `FILE2`, each read by a reader of its own.
    const READERS: u64 = 4;

    /// A manager holding `FILE` under a callback and nothing of `FILE2` (four chunks),
    /// and the fake's fileserver stopped: connections stay open, nothing answers.
    async fn cached_then_stopped(cell: &FakeCell, dir: &std::path::Path) -> (Arc<Manager>, Ino) {
        cell.set_content(
            FILE2,
            crate::manager::test_support::pattern(READERS * CHUNK_BYTES, 251),
        );
        let manager = start_manager_with(cell, dir, WAIT_MAX, SILENT_RPC_TIMEOUT, WAIT_MAX).await;
        let one = manager.state.lock().inodes.ino_for(FILE);
        assert_eq!(manager.read(one, 0, 4096).await.unwrap(), cell.content().0);
        cell.set_stopped(0, true);
        (manager, one)
    }

    /// Reads a page of each chunk of `FILE2` at once; how each ended and how long it took.
    async fn parallel_uncached_reads(manager: &Arc<Manager>) -> Vec<(FsResult<()>, Duration)> {
        let two = manager.state.lock().inodes.ino_for(FILE2);
        let readers: Vec<_> = (0..READERS)
            .map(|index| {
                let manager = Arc::clone(manager);
                tokio::spawn(async move {
                    let began = Instant::now();
                    let read = manager.read(two, index * CHUNK_BYTES, 4096).await;
                    (read.map(|_| ()), began.elapsed())
                })
            })
            .collect();
        let mut outcomes = Vec::new();
        for reader in readers {
            outcomes.push(reader.await.unwrap());
        }
        outcomes
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stopped_server_costs_one_timeout_then_calls_fail_at_once_and_the_first_after_it_continues_succeeds()
     {
        let (cell, _stop) = FakeCell::start(b"cached".to_vec(), 0, 0).await;
        let dir = tempfile::tempdir().unwrap();
        let (manager, one) = cached_then_stopped(&cell, dir.path()).await;
        let server = cell_server(&manager);

        // The first readers wait out their timeout together; the server is marked silent.
        for (outcome, took) in parallel_uncached_reads(&manager).await {
            assert_eq!(outcome, Err(FsError::ETIMEDOUT));
            assert!(took >= SILENT_RPC_TIMEOUT / 2, "{took:?}");
            assert!(took < SILENT_RPC_TIMEOUT * 2, "{took:?}");
        }
        assert!(manager.pool.is_silent(server));
        // The kernel asks for the same pages again: those calls fail without a timeout
        // of their own, while cached data still answers.
        for (outcome, took) in parallel_uncached_reads(&manager).await {
            assert_eq!(outcome, Err(FsError::ETIMEDOUT));
            assert!(took < SILENT_RPC_TIMEOUT / 2, "{took:?}");
        }
        assert_eq!(manager.read(one, 0, 4096).await.unwrap(), b"cached");

        // Continued: the very next call is answered, not refused by the mark.
        cell.set_stopped(0, false);
        let two = manager.state.lock().inodes.ino_for(FILE2);
        let read = manager.read(two, 0, 4096).await.unwrap();
        assert_eq!(read, crate::manager::test_support::pattern(4096, 251));
        assert!(!manager.pool.is_silent(server));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_server_is_probed_until_it_answers_with_nobody_calling_and_checkservers_agrees()
     {
        let (cell, _stop) = FakeCell::start(b"cached".to_vec(), 0, 0).await;
        let dir = tempfile::tempdir().unwrap();
        let (manager, _) = cached_then_stopped(&cell, dir.path()).await;
        let server = cell_server(&manager);
        let two = manager.state.lock().inodes.ino_for(FILE2);
        assert_eq!(manager.read(two, 0, 4096).await, Err(FsError::ETIMEDOUT));
        assert!(manager.pool.is_silent(server));
        let states = manager.check_servers().await;
        assert!(states.iter().all(|state| !state.up), "{states:?}");
        // Probes that time out keep it marked.
        assert!(manager.pool.is_silent(server));

        let pings = || {
            let record = cell.record.lock();
            record.requests.iter().filter(|(_, k)| *k == "Ping").count()
        };
        let pinged = pings();
        cell.set_stopped(0, false);
        eventually(|| !manager.pool.is_silent(server)).await;
        eventually(|| pings() > pinged).await;
        let states = manager.check_servers().await;
        assert!(states.iter().all(|state| state.up), "{states:?}");
        assert!(manager.read(two, 0, 4096).await.is_ok());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refusing_server_is_not_silent_and_each_call_tries_it() {
        let (cell, _stop) = FakeCell::start(b"cached".to_vec(), 0, 0).await;
        let dir = tempfile::tempdir().unwrap();
        let (manager, _) = cached_then_down(&cell, dir.path(), b"cached").await;
        let server = cell_server(&manager);
        let two = manager.state.lock().inodes.ino_for(FILE2);
        assert_eq!(manager.read(two, 0, 4096).await, Err(FsError::ETIMEDOUT));
        assert!(!manager.pool.is_silent(server));
        let refused = cell.record.lock().refused_while_down;
        assert_eq!(manager.read(two, 0, 4096).await, Err(FsError::ETIMEDOUT));
        // The call itself got as far as the server, which a silent mark would have saved.
        assert!(cell.record.lock().refused_while_down > refused);
    }

    fn cell_server(manager: &Manager) -> ServerId {
        match manager.volumes.servers()[..] {
            [(server, _)] => server,
            _ => panic!("the fake cell has one server"),
        }
    }
}
