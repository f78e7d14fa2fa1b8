//! Test only: a `Manager` started against a `FakeCell`, with the timeouts a test picks.
//! Invariant: each manager has its own cache directory, client id and connections.

use std::sync::Arc;
use std::time::Duration;

use proto::{
    CellConfig, ClientId, Hello, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN, PeerKind, VldbClient,
    VolumeName,
};

use super::{Manager, ManagerSettings};
use crate::fake_cell::{CELL, FakeCell};
use crate::invalidate::Invalidator;
use crate::server_pool::ServerPool;

pub(super) const WAIT_MAX: Duration = Duration::from_secs(10);

pub(super) async fn start_manager(cell: &FakeCell, dir: &std::path::Path) -> Arc<Manager> {
    start_manager_renewing(cell, dir, Duration::from_secs(10)).await
}

pub(super) async fn start_manager_renewing(
    cell: &FakeCell,
    dir: &std::path::Path,
    lease_renew_interval: Duration,
) -> Arc<Manager> {
    start_manager_with(cell, dir, lease_renew_interval, WAIT_MAX, WAIT_MAX).await
}

pub(super) async fn start_manager_with(
    cell: &FakeCell,
    dir: &std::path::Path,
    lease_renew_interval: Duration,
    rpc_timeout: Duration,
    failover_timeout: Duration,
) -> Arc<Manager> {
    let peer = PeerKind::CacheManager {
        client: ClientId::random(),
        instance: crate::identity::new_instance_nonce(),
    };
    let hello = Hello {
        version_min: PROTOCOL_VERSION_MIN,
        version_max: PROTOCOL_VERSION_MAX,
        cell: CELL.to_owned(),
        peer: peer.clone(),
    };
    let config = CellConfig {
        name: CELL.to_owned(),
        vlservers: vec![cell.address()],
        credentials: None,
    };
    let transport = cell.host_transport();
    let vldb = VldbClient::new(config, transport.clone(), peer, WAIT_MAX);
    let pool = ServerPool::new(hello, transport, rpc_timeout, failover_timeout);
    let settings = ManagerSettings {
        root_volume: VolumeName::parse("root.cell").unwrap(),
        chunk_dir: dir.join("chunks"),
        cache_bytes_max: 1 << 30,
        lease_renew_interval,
        table_budget: crate::status::TableBudget::default(),
    };
    Manager::start(settings, vldb, pool, Invalidator::start().unwrap())
        .await
        .unwrap()
}

/// `len` bytes counting up modulo `modulus`: a chunk's bytes say where they belong.
pub(super) fn pattern(len: u64, modulus: u64) -> Vec<u8> {
    (0..len).map(|i| (i % modulus) as u8).collect()
}
