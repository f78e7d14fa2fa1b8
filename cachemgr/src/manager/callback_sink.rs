//! The callback sink: what fileserver connections report to the manager (breaks, resets,
//! lock grants, lost connections) and what they ask of it (a reclaim, new addresses).
//! Invariant: a break voids the status and listing before it is acknowledged; the kernel
//! is told afterwards, off the connection's path.

use std::time::{Duration, Instant};

use proto::{ErrorCode, Fid, ProtoError, ServerId, WaitId};
use tracing::debug;

use super::Manager;
use crate::invalidate::Invalidation;
use crate::server_pool::{CallbackSink, ReclaimFuture, RelocateFuture};

impl CallbackSink for Manager {
    fn break_callbacks(&self, fids: &[Fid]) {
        let mut work = Vec::new();
        {
            let mut state = self.state.lock();
            for fid in fids {
                self.rights.drop_dir(*fid);
                let broken = state.statuses.break_callback(*fid);
                if let Some(ino) = state.inodes.ino(*fid) {
                    work.push(Invalidation::Inode(ino));
                    work.extend(
                        broken
                            .names
                            .into_iter()
                            .map(|name| Invalidation::Entry { parent: ino, name }),
                    );
                }
            }
        }
        for invalidation in work {
            self.invalidator.push(invalidation);
        }
    }

    fn lock_granted(&self, server: ServerId, wait: WaitId, fid: Fid) -> bool {
        debug!(%server, %wait, %fid, "queued lock granted");
        self.lock_waits.granted(server, wait)
    }

    fn connection_lost(&self, server: ServerId) {
        self.on_connection_lost(server);
    }

    fn holds_promises(&self, server: ServerId) -> bool {
        let volumes = self.volumes_of(server);
        if volumes.is_empty() {
            return false;
        }
        let now = Instant::now();
        let callbacks = self
            .state
            .lock()
            .statuses
            .with_callback(now)
            .any(|fid| volumes.contains(&fid.volume));
        callbacks || !self.locks_on(&volumes).is_empty() || self.lock_waits.waiting_on(server)
    }

    fn reclaim<'a>(
        &'a self,
        server: ServerId,
        connection: &'a proto::rpc::Connection,
        timeout: Duration,
    ) -> ReclaimFuture<'a> {
        Box::pin(self.reclaim_on(server, connection, timeout))
    }

    fn relocate(&self, server: ServerId) -> RelocateFuture<'_> {
        Box::pin(async move {
            let servers = self.vldb.list_servers().await?;
            let entry = servers
                .into_iter()
                .find(|s| s.server == server && !s.addresses.is_empty())
                .ok_or(ProtoError::Remote(ErrorCode::NoSuchServer))?;
            self.volumes.relocate(server, &entry.addresses);
            Ok(entry.addresses)
        })
    }

    fn reset_callbacks(&self, server: ServerId) {
        let volumes: Vec<_> = self.volumes_of(server).into_iter().collect();
        self.rights.drop_volumes(&volumes);
        let reset = self.reset_callbacks_from(server);
        debug!(%server, count = reset.len(), "callbacks reset; cached data will be revalidated");
    }

    fn server_silent(&self, server: ServerId) {
        self.on_server_silent(server);
    }
}
