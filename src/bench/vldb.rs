//! `holdfast bench --suite vldb`: the VLDB group's figures on three real replica
//! processes: leader and follower kills under pair renewals, `vos create` latency,
//! lookups per second, and a mount's fsynced appends while the leader is killed.
//! Invariant: every figure starts from a whole group: a killed replica is started again
//! and has caught up before the next one is measured.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use proto::{
    CellConfig, Epoch, PairName, PeerKind, ServerId, Transport, VldbClient, VldbMemberStatus,
    VolumeName, VolumeRef,
};
use std::sync::Mutex;

use super::BenchDir;
use crate::cell::{LocalCell, Servers, replica_name};

const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a killed replica may take to be back and caught up.
const HEAL_LIMIT: Duration = Duration::from_secs(30);
const LEASE: Duration = Duration::from_secs(2);
/// How often the bench's pretend pair member renews.
const RENEW_EVERY: Duration = Duration::from_millis(20);
const KILLS: usize = 5;
const CREATES: usize = 200;
const VOS_CREATES: usize = 50;
/// The mount figure's writer: one line and an fsync this often.
const APPEND_EVERY: Duration = Duration::from_millis(50);

pub fn run(dir: &BenchDir, seconds: u64) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")?;
    println!("holdfast bench: vldb (three replicas)");
    println!("{:<64} {:>10}  target", "figure", "value");
    {
        let mut cell = LocalCell::start(
            &dir.path().join("vldb"),
            "bench.holdfast",
            Servers::None,
            &runtime,
        )?;
        runtime.block_on(await_whole_group(&cell.cell.vlservers, &cell.transport))?;
        kills_under_renewals(&mut cell, &runtime)?;
        create_and_lookup(&cell, &runtime, seconds)?;
    }
    appends_through_leader_kills(dir, &runtime)
}

/// Kill -9 of the leader (5 times) and of a follower, while a pretend pair member renews
/// its lease every `RENEW_EVERY`: how long until a renewal is accepted again.
fn kills_under_renewals(cell: &mut LocalCell, runtime: &tokio::runtime::Runtime) -> Result<()> {
    let client = Arc::new(VldbClient::new(
        cell.cell.clone(),
        cell.transport.clone(),
        PeerKind::Admin,
        CALL_TIMEOUT,
    ));
    let pair = PairName::parse("bench").context("pair name")?;
    let member = "127.0.0.1:1";
    let epoch = runtime.block_on(async {
        client.join_pair(&pair, ServerId::random(), member).await?;
        let (epoch, _) = client.acquire_pair(&pair, member, Epoch(0), LEASE).await?;
        anyhow::Ok(epoch)
    })?;
    let renewals = Renewals::start(runtime, client.clone(), pair.clone(), member, epoch);

    let mut leader_samples = Vec::new();
    for _ in 0..KILLS {
        let leader = runtime.block_on(leader_of(&cell.cell.vlservers, &cell.transport))?;
        let killed = Instant::now();
        cell.signal(&replica_name(leader), libc::SIGKILL)?;
        leader_samples.push(renewals.first_after(killed, HEAL_LIMIT)?);
        heal(cell, runtime)?;
    }
    let leader = runtime.block_on(leader_of(&cell.cell.vlservers, &cell.transport))?;
    let follower = cell
        .replicas
        .iter()
        .map(|(id, _)| *id)
        .find(|id| *id != leader)
        .context("a follower")?;
    let killed = Instant::now();
    cell.signal(&replica_name(follower), libc::SIGKILL)?;
    std::thread::sleep(Duration::from_secs(1));
    let follower_gap = renewals.longest_gap_since(killed);
    heal(cell, runtime)?;
    let failures = renewals.stop();
    if failures.lost_lease {
        bail!("the pretend member lost its lease: a renewal was refused");
    }
    leader_samples.sort();
    println!(
        "{:<64} {:>8}ms  <= 1000ms",
        format!("kill -9 of the leader -> a renewal accepted (median of {KILLS})"),
        leader_samples[leader_samples.len() / 2].as_millis()
    );
    println!(
        "{:<64} {:>10}",
        "  each (ms)",
        leader_samples
            .iter()
            .map(|d| d.as_millis().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "{:<64} {:>8}ms  (renewed every {}ms)",
        "kill -9 of a follower -> longest gap between renewals",
        follower_gap.as_millis(),
        RENEW_EVERY.as_millis()
    );
    Ok(())
}

/// `vos create`'s VLDB half (an entry committed by the group) and lookups from one client.
fn create_and_lookup(
    cell: &LocalCell,
    runtime: &tokio::runtime::Runtime,
    seconds: u64,
) -> Result<()> {
    let client = Arc::new(VldbClient::new(
        cell.cell.clone(),
        cell.transport.clone(),
        PeerKind::Admin,
        CALL_TIMEOUT,
    ));
    let (median, lookups) = runtime.block_on(async {
        let server = ServerId::random();
        client
            .register_server(server, vec!["127.0.0.1:2".into()])
            .await?;
        let mut samples = Vec::with_capacity(CREATES);
        for i in 0..CREATES {
            let name = VolumeName::parse(&format!("bench.{i}"))?;
            let started = Instant::now();
            client.create_entry(name, server).await?;
            samples.push(started.elapsed());
        }
        samples.sort();
        let median = samples[samples.len() / 2];
        // Lookups: 16 in flight on the one connection of one client.
        let deadline = Instant::now() + Duration::from_secs(seconds.max(1));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for t in 0..16 {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let mut done = 0u64;
                while Instant::now() < deadline {
                    let name = VolumeName::parse(&format!("bench.{}", (done * 16 + t) % 200))?;
                    client.get_entry(VolumeRef::Name(name)).await?;
                    done += 1;
                }
                anyhow::Ok(done)
            }));
        }
        let mut total = 0;
        for task in tasks {
            total += task.await??;
        }
        let rate = total as f64 / started.elapsed().as_secs_f64();
        anyhow::Ok((median, rate))
    })?;
    println!(
        "{:<64} {:>6.1}ms  <= 10ms",
        format!("volume entry created, committed by the group (median of {CREATES})"),
        median.as_secs_f64() * 1000.0
    );
    println!(
        "{:<64} {:>8.0}/s  >= 10000/s",
        "volume lookups from one client", lookups
    );
    Ok(())
}

/// A mount's writer appends a line and fsyncs every `APPEND_EVERY` while the VLDB leader
/// is killed `KILLS` times: errors, the longest stall, and every acknowledged line
/// present once.
fn appends_through_leader_kills(dir: &BenchDir, runtime: &tokio::runtime::Runtime) -> Result<()> {
    let dir = dir.path().join("vldb-mount");
    let mut cell = LocalCell::start(&dir, "bench.holdfast", Servers::Pair, runtime)?;
    vos_creates(&cell, runtime)?;
    let mountpoint = dir.join("mnt");
    cell.mount("mount", &mountpoint, &dir.join("cache"), &[])?;
    let path = mountpoint.join("appends");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let path = path.clone();
        std::thread::spawn(move || append_lines(&path, &stop))
    };
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..KILLS {
        let leader = runtime.block_on(leader_of(&cell.cell.vlservers, &cell.transport))?;
        cell.signal(&replica_name(leader), libc::SIGKILL)?;
        std::thread::sleep(Duration::from_millis(1_500));
        heal(&mut cell, runtime)?;
    }
    stop.store(true, Ordering::Relaxed);
    let outcome = writer
        .join()
        .map_err(|_| anyhow::anyhow!("the writer thread panicked"))??;
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let mut missing_or_repeated = 0;
    for line in 0..outcome.acked {
        let wanted = format!("line {line}");
        if text.lines().filter(|l| *l == wanted).count() != 1 {
            missing_or_repeated += 1;
        }
    }
    println!(
        "{:<64} {:>10}  0",
        format!("appends+fsync every 50ms, leader killed {KILLS}x: errors"),
        outcome.errors
    );
    println!(
        "{:<64} {:>8}ms  <= 1000ms",
        "  longest write stall",
        outcome.longest.as_millis()
    );
    println!(
        "{:<64} {:>10}  0",
        format!(
            "  acknowledged lines ({}) missing or repeated",
            outcome.acked
        ),
        missing_or_repeated
    );
    Ok(())
}

/// Whole `vos create`s: the entry committed by the group, then the volume on the pair's
/// active member.
fn vos_creates(cell: &LocalCell, runtime: &tokio::runtime::Runtime) -> Result<()> {
    let vos = vos::Vos::new(cell.cell.clone(), cell.transport.clone(), CALL_TIMEOUT);
    let mut samples = Vec::with_capacity(VOS_CREATES);
    runtime.block_on(async {
        for i in 0..VOS_CREATES {
            let started = Instant::now();
            vos.create(&format!("bench.vos.{i}"), None, 0).await?;
            samples.push(started.elapsed());
        }
        anyhow::Ok(())
    })?;
    samples.sort();
    println!(
        "{:<64} {:>6.1}ms  <= 10ms",
        format!("vos create on a three-replica VLDB and a pair (median of {VOS_CREATES})"),
        samples[samples.len() / 2].as_secs_f64() * 1000.0
    );
    Ok(())
}

struct Appended {
    acked: u64,
    errors: u64,
    longest: Duration,
}

fn append_lines(path: &Path, stop: &AtomicBool) -> Result<Appended> {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    let mut outcome = Appended {
        acked: 0,
        errors: 0,
        longest: Duration::ZERO,
    };
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let written = file
            .write_all(format!("line {}\n", outcome.acked).as_bytes())
            .and_then(|()| file.sync_all());
        outcome.longest = outcome.longest.max(started.elapsed());
        match written {
            Ok(()) => outcome.acked += 1,
            Err(e) => {
                outcome.errors += 1;
                eprintln!("append failed: {e}");
                // What was written may or may not be there: start a fresh file's count
                // would hide it, so stop counting instead.
                break;
            }
        }
        std::thread::sleep(APPEND_EVERY.saturating_sub(started.elapsed()));
    }
    Ok(outcome)
}

/// A pretend pair member renewing its lease in the background, recording when each
/// renewal was answered.
struct Renewals {
    answered: Arc<Mutex<Vec<Instant>>>,
    lost: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

struct RenewalOutcome {
    lost_lease: bool,
}

impl Renewals {
    fn start(
        runtime: &tokio::runtime::Runtime,
        client: Arc<VldbClient>,
        pair: PairName,
        member: &str,
        epoch: Epoch,
    ) -> Renewals {
        let answered = Arc::new(Mutex::new(Vec::new()));
        let lost = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let (answered, lost, stop) = (answered.clone(), lost.clone(), stop.clone());
            let member = member.to_owned();
            runtime.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match client.renew_pair(&pair, &member, epoch, LEASE).await {
                        Ok(_) => answered
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push(Instant::now()),
                        Err(e)
                            if e.remote().is_some_and(|c| {
                                matches!(c, proto::ErrorCode::LeaseLost { .. })
                            }) =>
                        {
                            lost.store(true, Ordering::Relaxed);
                            return;
                        }
                        Err(_) => {}
                    }
                    tokio::time::sleep(RENEW_EVERY).await;
                }
            })
        };
        Renewals {
            answered,
            lost,
            stop,
            task,
        }
    }

    /// How long after `since` the first renewal was answered.
    fn first_after(&self, since: Instant, limit: Duration) -> Result<Duration> {
        loop {
            if let Some(at) = self
                .answered
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .iter()
                .find(|at| **at > since)
            {
                return Ok(*at - since);
            }
            if self.lost.load(Ordering::Relaxed) {
                bail!("the pretend member lost its lease");
            }
            if since.elapsed() > limit {
                bail!("no renewal was accepted within {limit:?} of the kill");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The longest time between two answered renewals after `since`, until now.
    fn longest_gap_since(&self, since: Instant) -> Duration {
        let answered = self
            .answered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut previous = since;
        let mut longest = Duration::ZERO;
        for at in answered.iter().filter(|at| **at > since) {
            longest = longest.max(*at - previous);
            previous = *at;
        }
        longest.max(previous.elapsed())
    }

    fn stop(self) -> RenewalOutcome {
        self.stop.store(true, Ordering::Relaxed);
        self.task.abort();
        RenewalOutcome {
            lost_lease: self.lost.load(Ordering::Relaxed),
        }
    }
}

/// Starts again the killed replica and waits until the whole group follows one leader
/// and every replica has applied what the leader has.
fn heal(cell: &mut LocalCell, runtime: &tokio::runtime::Runtime) -> Result<()> {
    let deadline = Instant::now() + HEAL_LIMIT;
    while cell.restart_exited_replicas()?.is_empty() {
        if Instant::now() > deadline {
            bail!("the killed replica did not exit within {HEAL_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    runtime.block_on(await_whole_group(&cell.cell.vlservers, &cell.transport))
}

/// Waits until every replica answers, all follow the same leader, and each has applied
/// the leader's last entry.
async fn await_whole_group(addresses: &[String], transport: &Transport) -> Result<()> {
    let deadline = Instant::now() + HEAL_LIMIT;
    loop {
        let mut statuses = Vec::new();
        for address in addresses {
            statuses.push(status_of(address, transport).await.ok());
        }
        let whole = statuses.iter().all(Option::is_some) && {
            let statuses: Vec<&VldbMemberStatus> = statuses.iter().flatten().collect();
            let leader = statuses[0].leader.as_ref().map(|(id, _)| *id);
            let last = statuses
                .iter()
                .find(|s| Some(s.id) == leader)
                .and_then(|s| s.last_log_index);
            leader.is_some()
                && statuses
                    .iter()
                    .all(|s| s.leader.as_ref().map(|(id, _)| *id) == leader)
                && statuses.iter().all(|s| s.applied_index >= last)
        };
        if whole {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the VLDB group was not whole within {HEAL_LIMIT:?}: {statuses:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The id of the leader, as the first replica that knows one says.
async fn leader_of(addresses: &[String], transport: &Transport) -> Result<u64> {
    for address in addresses {
        if let Ok(status) = status_of(address, transport).await
            && let Some((id, _)) = status.leader
        {
            return Ok(id);
        }
    }
    bail!("no VLDB replica knows a leader")
}

/// One replica's own status, asked of it alone.
async fn status_of(address: &str, transport: &Transport) -> Result<VldbMemberStatus> {
    let cell = CellConfig {
        name: "bench.holdfast".into(),
        vlservers: vec![address.to_owned()],
        credentials: None,
    };
    let client = VldbClient::new(
        cell,
        transport.clone(),
        PeerKind::Admin,
        Duration::from_secs(1),
    );
    Ok(client.replica_status(address).await?)
}
