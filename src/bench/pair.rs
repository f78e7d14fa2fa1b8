//! `holdfast bench --suite pair`: failover figures of a fileserver pair on a local cell
//! of real processes, with cache managers played over loopback by this process.
//! Invariant: every figure starts from a whole pair: a killed member is started again and
//! has rejoined as passive before the next figure is measured.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use proto::rpc::{self, Connection, IncomingRequest, Limits};
use proto::{
    ByteRange, CellConfig, ClientId, ErrorCode, Fid, Hello, InstanceNonce, LockKind, LockOwnerId,
    PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN, PeerKind, Request, Response, Transport, VldbClient,
    VolumeName, VolumeRef,
};
use tokio::sync::mpsc;

use super::BenchDir;
use crate::cell::{LocalCell, MEMBERS, Servers, member_role};

const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const TAKEOVER_LIMIT: Duration = Duration::from_secs(30);

pub fn run(dir: &BenchDir, failovers: usize, clients: usize) -> Result<()> {
    raise_open_file_limit(clients as u64 + 512);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let dir = dir.path().join("pair");
    let mut cell = LocalCell::start(&dir, "bench.holdfast", Servers::Pair, &runtime)?;
    let mountpoint = dir.join("mnt");
    cell.mount("mount", &mountpoint, &dir.join("cache"), &[])?;
    eprintln!("bench pair up in {}; measuring...", dir.display());
    println!("holdfast bench: pair (default lease 1 s)");
    println!("{:<60} {:>10}  target", "figure", "value");

    let mut samples = Vec::new();
    for i in 0..failovers.max(1) {
        write_synced(&mountpoint.join("warm"))?;
        let active = active_member(&cell, &runtime)?;
        let killed = Instant::now();
        cell.signal(&active, libc::SIGKILL)?;
        write_synced(&mountpoint.join(format!("after-failover-{i}")))?;
        samples.push(killed.elapsed());
        rejoin(&mut cell, &active, &runtime)?;
    }
    let mut sorted = samples.clone();
    sorted.sort();
    println!(
        "{:<60} {:>8}ms  <= 1000ms",
        format!(
            "kill -9 of the active -> first fsynced write (median of {})",
            sorted.len()
        ),
        sorted[sorted.len() / 2].as_millis()
    );
    println!(
        "{:<60} {:>10}",
        "  each failover",
        samples
            .iter()
            .map(|d| format!("{}ms", d.as_millis()))
            .collect::<Vec<_>>()
            .join(" ")
    );

    let active = active_member(&cell, &runtime)?;
    let lock_after_reclaim =
        runtime.block_on(lock_after_last_reclaim(&cell, &active, &mountpoint))?;
    println!(
        "{:<60} {:>8.1}ms  <= 1000ms",
        "last reclaim -> first new conflicting lock granted",
        lock_after_reclaim.as_secs_f64() * 1000.0
    );
    rejoin(&mut cell, &active, &runtime)?;

    let active = active_member(&cell, &runtime)?;
    let figures = runtime.block_on(takeover_with_clients(&cell, &active, clients))?;
    println!(
        "{:<60} {:>8}ms",
        format!("takeover with {clients} clients holding callbacks: new active"),
        figures.active.as_millis()
    );
    println!(
        "{:<60} {:>8}ms  (callbacks kept {}/{})",
        "  every client reconnected and reclaimed",
        figures.reclaimed.as_millis(),
        figures.kept,
        clients
    );
    rejoin(&mut cell, &active, &runtime)?;
    cell.check_children()
}

/// Waits for a killed member to exit, starts it again, and waits until it is passive.
fn rejoin(cell: &mut LocalCell, member: &str, runtime: &tokio::runtime::Runtime) -> Result<()> {
    let deadline = Instant::now() + TAKEOVER_LIMIT;
    while !cell
        .restart_exited_members(runtime)?
        .iter()
        .any(|m| m == member)
    {
        if Instant::now() > deadline {
            bail!("the killed {member} did not exit");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let address = member_address(cell, member)?;
    let deadline = Instant::now() + TAKEOVER_LIMIT;
    while runtime.block_on(member_role(&cell.cell, &cell.transport, &address))
        != Some(proto::MemberRole::Passive)
    {
        if Instant::now() > deadline {
            bail!("the restarted {member} did not rejoin as passive");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn member_address(cell: &LocalCell, member: &str) -> Result<String> {
    cell.members
        .iter()
        .find(|(name, _)| name == member)
        .map(|(_, address)| address.clone())
        .with_context(|| format!("no pair member {member}"))
}

/// The name of the member that says it is active.
fn active_member(cell: &LocalCell, runtime: &tokio::runtime::Runtime) -> Result<String> {
    let deadline = Instant::now() + TAKEOVER_LIMIT;
    loop {
        for name in MEMBERS {
            let address = member_address(cell, name)?;
            if runtime.block_on(member_role(&cell.cell, &cell.transport, &address))
                == Some(proto::MemberRole::Active)
            {
                return Ok(name.to_owned());
            }
        }
        if Instant::now() > deadline {
            bail!("no member of the pair is active");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

async fn await_active_member(cell: &LocalCell, not: &str) -> Result<String> {
    let deadline = Instant::now() + TAKEOVER_LIMIT;
    loop {
        for (name, address) in &cell.members {
            if name != not
                && member_role(&cell.cell, &cell.transport, address).await
                    == Some(proto::MemberRole::Active)
            {
                return Ok(address.clone());
            }
        }
        if Instant::now() > deadline {
            bail!("the partner of {not} did not take over within {TAKEOVER_LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Writes a small file and fsyncs it; returns once the fileserver has it.
fn write_synced(path: &Path) -> Result<()> {
    use std::io::Write;
    let mut file =
        std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    file.write_all(b"failover bench\n")
        .and_then(|()| file.sync_all())
        .with_context(|| format!("write {}", path.display()))
}

/// A cache manager played by this process, so that a lock reclaim and many reconnecting
/// clients (`--takeover-clients`) can be timed exactly; it acknowledges every push
/// (breaks, resets, lock grants) as a real one would.
struct FakeClient {
    client: ClientId,
    connection: Connection,
    /// The cell administrator's: the root directory is theirs.
    token: proto::SealedToken,
}

impl FakeClient {
    async fn connect(
        cell: &CellConfig,
        transport: &Transport,
        token: &proto::SealedToken,
        address: &str,
        client: ClientId,
    ) -> Result<FakeClient> {
        let hello = Hello {
            version_min: PROTOCOL_VERSION_MIN,
            version_max: PROTOCOL_VERSION_MAX,
            cell: cell.name.clone(),
            peer: PeerKind::CacheManager {
                client,
                instance: InstanceNonce(1),
            },
        };
        let limits = Limits {
            handshake_timeout: CALL_TIMEOUT,
            ..Limits::default()
        };
        let (connection, _reply, incoming) = rpc::connect(address, hello, &limits, transport)
            .await
            .with_context(|| format!("connect to {address}"))?;
        tokio::spawn(acknowledge_pushes(incoming));
        Ok(FakeClient {
            client,
            connection,
            token: token.clone(),
        })
    }

    async fn call(&self, request: Request) -> Result<Response, proto::ProtoError> {
        self.connection
            .try_call_as(Some(&self.token), &request, CALL_TIMEOUT)
            .await
            .unwrap_or(Err(proto::ProtoError::Closed))
    }
}

async fn acknowledge_pushes(mut incoming: mpsc::Receiver<IncomingRequest>) {
    while let Some(request) = incoming.recv().await {
        let (_, _, replier) = request.into_parts();
        replier.reply(Ok(Response::Ok)).await;
    }
}

async fn root_dir(cell: &LocalCell) -> Result<Fid> {
    let vldb = VldbClient::new(
        cell.cell.clone(),
        cell.transport.clone(),
        PeerKind::Admin,
        CALL_TIMEOUT,
    );
    let name = VolumeName::parse("root.cell").map_err(anyhow::Error::new)?;
    let entry = vldb
        .get_entry(VolumeRef::Name(name))
        .await
        .context("look up root.cell")?;
    Ok(Fid::root(entry.rw_id))
}

fn whole_file_lock(fid: Fid, owner: LockOwnerId, wait: bool) -> Request {
    Request::SetLock {
        fid,
        owner,
        range: ByteRange::whole(),
        kind: LockKind::Exclusive,
        wait,
        pid: 1,
    }
}

/// Client A holds a lock when the active dies; B asks for a conflicting one during
/// grace; A reclaims, lets go and says it is done. Returns the time from A's last
/// reclaim to B's grant: a server that held new locks back for a fixed grace period
/// (NFSv4: 90 s) would show that period here.
async fn lock_after_last_reclaim(
    cell: &LocalCell,
    active_name: &str,
    mountpoint: &Path,
) -> Result<Duration> {
    let root = root_dir(cell).await?;
    let token = cell.admin_token()?;
    let active = member_address(cell, active_name)?;
    let a = FakeClient::connect(
        &cell.cell,
        &cell.transport,
        &token,
        &active,
        ClientId::random(),
    )
    .await?;
    let created = a
        .call(Request::Create {
            dir: root,
            name: format!("lock-bench-{}", std::process::id()),
            mode: 0o644,
            uid: 0,
            gid: 0,
            exclusive: false,
        })
        .await
        .context("create the lock bench file")?;
    let Response::Entry { status, .. } = created else {
        bail!("Create answered {}", created.kind_name());
    };
    let fid = status.fid;
    a.call(whole_file_lock(fid, LockOwnerId(1), false))
        .await
        .context("take A's lock")?;

    cell.signal(active_name, libc::SIGKILL)?;
    let successor = await_active_member(cell, active_name).await?;
    // The mount was a client of the old active too: it reconnects and reclaims.
    let mountpoint = mountpoint.to_owned();
    tokio::task::spawn_blocking(move || write_synced(&mountpoint.join("after-lock-failover")))
        .await??;

    let b = FakeClient::connect(
        &cell.cell,
        &cell.transport,
        &token,
        &successor,
        ClientId::random(),
    )
    .await?;
    match b.call(whole_file_lock(fid, LockOwnerId(2), false)).await {
        Err(e) if matches!(e.remote(), Some(ErrorCode::Grace { .. })) => {}
        other => bail!("B's conflicting lock during grace was answered {other:?}, not Grace"),
    }
    let a = FakeClient::connect(&cell.cell, &cell.transport, &token, &successor, a.client).await?;
    a.call(Request::ReclaimLock {
        fid,
        owner: LockOwnerId(1),
        range: ByteRange::whole(),
        kind: LockKind::Exclusive,
        pid: 1,
    })
    .await
    .context("A reclaims its lock")?;
    a.call(Request::ReleaseLock {
        fid,
        owner: LockOwnerId(1),
        range: ByteRange::whole(),
    })
    .await
    .context("A releases its lock")?;
    a.call(Request::ReclaimDone)
        .await
        .context("A's ReclaimDone")?;
    let reclaimed = Instant::now();
    loop {
        match b.call(whole_file_lock(fid, LockOwnerId(2), false)).await {
            Ok(_) => break,
            Err(e)
                if matches!(
                    e.remote(),
                    Some(ErrorCode::Grace { .. } | ErrorCode::WouldBlock)
                ) => {}
            Err(e) => return Err(e).context("B's lock after A's reclaim"),
        }
        if reclaimed.elapsed() > TAKEOVER_LIMIT {
            bail!("B's lock was not granted within {TAKEOVER_LIMIT:?} of the last reclaim");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let granted = reclaimed.elapsed();
    let _ = b
        .call(Request::ReleaseLock {
            fid,
            owner: LockOwnerId(2),
            range: ByteRange::whole(),
        })
        .await;
    Ok(granted)
}

/// Kills the active member while `count` fake cache managers hold callbacks, then
/// times the takeover and every client's reconnect and reclaim.
struct TakeoverFigures {
    active: Duration,
    reclaimed: Duration,
    kept: usize,
}

async fn takeover_with_clients(
    cell: &LocalCell,
    active: &str,
    count: usize,
) -> Result<TakeoverFigures> {
    let root = root_dir(cell).await?;
    let token = cell.admin_token()?;
    let address = member_address(cell, active)?;
    let mut clients = Vec::with_capacity(count);
    let mut data_version = proto::DataVersion(0);
    for _ in 0..count {
        let client = FakeClient::connect(
            &cell.cell,
            &cell.transport,
            &token,
            &address,
            ClientId::random(),
        )
        .await?;
        match client.call(Request::FetchStatus { fid: root }).await {
            Ok(Response::Status { status, .. }) => data_version = status.data_version,
            other => bail!("FetchStatus answered {other:?}"),
        }
        clients.push(client.client);
    }
    let killed = Instant::now();
    cell.signal(active, libc::SIGKILL)?;
    let successor = await_active_member(cell, active).await?;
    let became_active = killed.elapsed();
    let mut tasks = tokio::task::JoinSet::new();
    for client in clients {
        let (cell_config, successor) = (cell.cell.clone(), successor.clone());
        let transport = cell.transport.clone();
        let token = token.clone();
        tasks.spawn(async move {
            let client =
                FakeClient::connect(&cell_config, &transport, &token, &successor, client).await?;
            let answer = client
                .call(Request::ReclaimCallbacks {
                    fids: vec![(root, data_version)],
                })
                .await?;
            client.call(Request::ReclaimDone).await?;
            let kept = matches!(answer, Response::CallbacksReclaimed { ref broken, .. } if broken.is_empty());
            anyhow::Ok((kept, client))
        });
    }
    let mut kept = 0;
    let mut connected = Vec::with_capacity(count);
    while let Some(joined) = tasks.join_next().await {
        let (was_kept, client) = joined.context("reclaim task")??;
        kept += usize::from(was_kept);
        connected.push(client);
    }
    let reclaimed = killed.elapsed();
    drop(connected);
    Ok(TakeoverFigures {
        active: became_active,
        reclaimed,
        kept,
    })
}

/// Lets this process (and the cell it starts) hold `wanted` open files: a thousand
/// clients are a thousand sockets on each side.
fn raise_open_file_limit(wanted: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < wanted {
            limit.rlim_cur = wanted.min(limit.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
