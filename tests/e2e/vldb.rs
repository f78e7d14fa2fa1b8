//! The VLDB as three replica processes: the leader killed under a mount's fsynced appends,
//! all restarted at once, a follower on a full disk, a leader cut off from the others.
//! Invariant: every acknowledged line, volume and pair is kept, the majority serves while
//! one replica is down, and a leader cut off from it grants no pair lease.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use harness::pair::{self, read_history};
use harness::vldb::block_on;
use harness::{PairOptions, TestCell, Tmpfs, VldbKind, replica_name, wait_until};
use proto::{Epoch, ErrorCode, PairName, Request, Response, ServerId, VolumeName, VolumeRef};

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");
/// Long enough for any election and catch-up on a loaded machine; a hang takes longer.
const GROUP_LIMIT: Duration = Duration::from_secs(20);
/// The pair's lease (the fileserver's default): a failover cannot happen sooner.
const PAIR_LEASE: Duration = Duration::from_secs(1);
/// The lease the test's pretend pair member asks for: long enough that it never runs out
/// while the test looks at who grants it.
const PRETEND_LEASE: Duration = Duration::from_secs(30);
/// The writer appends a line and fsyncs this often.
const APPEND_EVERY: Duration = Duration::from_millis(50);

/// What a full disk makes the replicas log at ERROR, besides the line that says the replica
/// stepped down; every such line names the disk's error. The replica on that disk logs
/// its Raft library's failed flush, its Raft core quitting and the calls in flight
/// failing; the others, its failure as its answer to their Raft messages.
const DISK_FULL: &str = "No space left on device (os error 28)";

/// A cell whose VLDB is a group of three, with a fileserver pair.
fn replicated_pair() -> TestCell {
    let options = PairOptions {
        vldb: VldbKind::Replicated,
        ..PairOptions::default()
    };
    TestCell::start_pair(BIN, options).unwrap()
}

/// A thread appending `line N` and fsyncing every `APPEND_EVERY`, recording how long
/// each append and fsync took.
struct Appender {
    acked: Arc<Mutex<u64>>,
    longest: Arc<Mutex<Duration>>,
    error: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Appender {
    fn start(path: PathBuf) -> Appender {
        let acked = Arc::new(Mutex::new(0));
        let longest = Arc::new(Mutex::new(Duration::ZERO));
        let error = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (acked, longest, error, stop) =
                (acked.clone(), longest.clone(), error.clone(), stop.clone());
            std::thread::spawn(move || {
                let appended = (|| -> std::io::Result<()> {
                    let mut file = OpenOptions::new().create(true).append(true).open(&path)?;
                    let mut line = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        let started = Instant::now();
                        file.write_all(format!("line {line}\n").as_bytes())?;
                        file.sync_all()?;
                        let took = started.elapsed();
                        line += 1;
                        *acked.lock().unwrap() = line;
                        let mut longest = longest.lock().unwrap();
                        *longest = (*longest).max(took);
                        drop(longest);
                        std::thread::sleep(APPEND_EVERY.saturating_sub(took));
                    }
                    Ok(())
                })();
                if let Err(e) = appended {
                    *error.lock().unwrap() = Some(e.to_string());
                }
            })
        };
        Appender {
            acked,
            longest,
            error,
            stop,
            thread: Some(thread),
        }
    }

    fn acked(&self) -> u64 {
        *self.acked.lock().unwrap()
    }

    /// Waits until `count` lines are acknowledged; fails if an append failed first.
    fn await_acked(&self, count: u64) {
        let reached = wait_until(GROUP_LIMIT, || {
            self.acked() >= count || self.error.lock().unwrap().is_some()
        });
        if let Some(error) = self.error.lock().unwrap().as_ref() {
            panic!("an append or fsync failed: {error}");
        }
        assert!(
            reached,
            "only {} of {count} lines acknowledged",
            self.acked()
        );
    }

    /// Stops after the append in progress; returns how many lines were acknowledged and
    /// the longest append and fsync.
    fn finish(mut self) -> (u64, Duration) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("the appender thread");
        }
        if let Some(error) = self.error.lock().unwrap().take() {
            panic!("an append or fsync failed: {error}");
        }
        (self.acked(), *self.longest.lock().unwrap())
    }
}

impl Drop for Appender {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Checks that `file` holds `line 0` to `line {acked - 1}`, each once and in order.
fn check_lines(file: &Path, acked: u64) {
    let text = std::fs::read_to_string(file).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(
            *line,
            format!("line {i}"),
            "{}: line {i} lost, repeated or out of order",
            file.display()
        );
    }
    assert_eq!(
        lines.len() as u64,
        acked,
        "{}: {} lines, {acked} acknowledged",
        file.display(),
        lines.len()
    );
}

/// The replica ids other than `id`.
fn others(cell: &TestCell, id: u64) -> Vec<u64> {
    cell.replicas
        .iter()
        .map(|r| r.id)
        .filter(|other| *other != id)
        .collect()
}

#[test]
fn the_leader_killed_during_fsynced_appends_loses_nothing() {
    let mut cell = replicated_pair();
    cell.expect_peers_down();
    let ws = cell.mount("ws-a", &[]).unwrap();
    let pair_before = cell.pair_entry().unwrap();
    let active_before = cell.active_member().expect("an active member");
    let appender = Appender::start(ws.join("appends"));
    appender.await_acked(10);

    for round in 0..3 {
        let leader = cell.vldb_leader(GROUP_LIMIT).unwrap();
        let acked = appender.acked();
        cell.kill_replica(leader).unwrap();
        let successor = cell
            .vldb_leader_among(&others(&cell, leader), GROUP_LIMIT)
            .unwrap();
        eprintln!("round {round}: killed leader {leader}, {successor} leads now");
        // The appends carry on while the killed replica is down.
        appender.await_acked(acked + 10);
        cell.restart_replica(leader).unwrap();
        cell.await_whole_group(GROUP_LIMIT).unwrap();
    }
    let acked = appender.acked();
    appender.await_acked(acked + 10);
    let (acked, longest) = appender.finish();
    eprintln!("{acked} lines acknowledged; longest append and fsync {longest:?}");

    // Read back through a mount with a cold cache: every acknowledged line once.
    let check = cell.mount("ws-check", &[]).unwrap();
    check_lines(&check.join("appends"), acked);
    // The pair never failed over: same active, same epoch, nobody fenced.
    let pair_after = cell.pair_entry().unwrap();
    assert_eq!(
        (pair_after.active.as_ref(), pair_after.epoch),
        (pair_before.active.as_ref(), pair_before.epoch),
        "the pair's active or epoch changed: {pair_before:?} -> {pair_after:?}"
    );
    assert_eq!(cell.active_member().as_deref(), Some(&*active_before));
    for member in ["fs-a", "fs-b"] {
        let history = read_history(&cell.history_path(member)).unwrap_or_default();
        let roles: Vec<_> = history
            .iter()
            .filter(|e| e.what == "active" || e.what == "fenced")
            .collect();
        let expected = usize::from(member == active_before);
        assert_eq!(roles.len(), expected, "{member}'s role changes: {roles:?}");
    }
    // A failover takes the lease's length at least; no append waited that long.
    assert!(
        longest < PAIR_LEASE,
        "an append and fsync took {longest:?}, as long as a failover"
    );
}

/// `holdfast vos ARGS`, which must succeed; its standard output.
fn vos(cell: &TestCell, args: &[&str]) -> String {
    let mut command = vec!["vos"];
    command.extend_from_slice(args);
    let out = cell.holdfast(&command).unwrap();
    assert!(
        out.status.success(),
        "holdfast {}: {}",
        command.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn all_three_replicas_restarted_together_keep_every_volume_and_pair() {
    let mut cell = replicated_pair();
    cell.expect_peers_down();
    let ws = cell.mount("ws-a", &["--failover-timeout", "30"]).unwrap();
    std::fs::write(ws.join("before"), b"written before the restart\n").unwrap();
    let volumes = ["vol.one", "vol.two", "vol.three"];
    for volume in volumes {
        vos(&cell, &["create", volume]);
    }
    let listed = vos(&cell, &["listvldb"]);
    for volume in volumes {
        assert!(listed.contains(volume), "{volume} not listed:\n{listed}");
    }
    let pair_before = cell.pair_entry().unwrap();

    cell.stop_replicas();
    // Down for longer than the pair's lease: the active cannot renew, and fences itself.
    assert!(
        wait_until(GROUP_LIMIT, || cell.active_member().is_none()),
        "the active member still serves without a VLDB"
    );
    for id in 1..=3 {
        cell.restart_replica(id).unwrap();
    }
    cell.await_whole_group(GROUP_LIMIT).unwrap();

    assert_eq!(vos(&cell, &["listvldb"]), listed);
    let pair_after = cell.pair_entry().unwrap();
    assert_eq!(
        (&pair_after.name, pair_after.server, &pair_after.members),
        (&pair_before.name, pair_before.server, &pair_before.members),
        "the pair changed: {pair_before:?} -> {pair_after:?}"
    );
    // A member takes the lease again, in a later epoch.
    assert!(
        wait_until(GROUP_LIMIT, || cell.active_member().is_some()),
        "no member of the pair is active again"
    );
    let pair_after = cell.pair_entry().unwrap();
    assert!(
        pair_after.epoch > pair_before.epoch,
        "the pair's epoch did not move on: {pair_before:?} -> {pair_after:?}"
    );
    // The file written before reads back, on the old mount and on a cold one.
    let check = cell.mount("ws-check", &[]).unwrap();
    for mount in [&ws, &check] {
        assert_eq!(
            std::fs::read(mount.join("before")).unwrap(),
            b"written before the restart\n"
        );
    }
}

/// Copies the files of directory `from` into directory `to`.
fn copy_files(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn a_replica_on_a_full_disk_steps_down_and_the_others_carry_on() {
    let mut cell = replicated_pair();
    cell.expect_peers_down();
    let leader = cell.vldb_leader(GROUP_LIMIT).unwrap();
    let follower = *others(&cell, leader).last().unwrap();
    let name = replica_name(follower);
    // The follower's data directory moves onto a small disk of its own.
    cell.stop_replica(follower);
    let data = cell.replica(follower).unwrap().data.clone();
    let moved = cell.path_of("moved.data");
    std::fs::rename(&data, &moved).unwrap();
    let disk = Tmpfs::mount(&data, 8 << 20).unwrap();
    copy_files(&moved, &data);
    cell.restart_replica(follower).unwrap();
    cell.await_whole_group(GROUP_LIMIT).unwrap();
    assert_ne!(cell.vldb_leader(GROUP_LIMIT).unwrap(), follower);

    let filler = disk.fill().unwrap();
    cell.expect_error_from(&name, "VLDB replica stepped down");
    for replica in &cell.replicas {
        cell.expect_error_from(&replica_name(replica.id), DISK_FULL);
    }
    // Volumes are created until the follower finds no room for them.
    let mut created = Vec::new();
    let status = loop {
        if let Some(status) = cell.await_exit(&name, Duration::ZERO) {
            break status;
        }
        assert!(created.len() < 1000, "{name} still runs on a full disk");
        let volume = format!("vol.full.{}", created.len());
        vos(&cell, &["create", &volume]);
        created.push(volume);
    };
    eprintln!("{name} exited ({status}) after {} volumes", created.len());
    assert!(!status.success(), "{name} exited with {status}");
    let log = cell.log(&name);
    assert!(log.contains("VLDB replica stepped down"), "{log}");

    // The other two carry on.
    for i in 0..3 {
        let volume = format!("vol.after.{i}");
        vos(&cell, &["create", &volume]);
        created.push(volume);
    }
    let listed = vos(&cell, &["listvldb"]);
    for volume in &created {
        assert!(
            listed.contains(&format!("{volume}\n")),
            "{volume} not listed:\n{listed}"
        );
    }

    // With room again it starts, and catches up: the group is whole once it has applied
    // the leader's last entry.
    std::fs::remove_file(filler).unwrap();
    cell.restart_replica(follower).unwrap();
    cell.await_whole_group(GROUP_LIMIT).unwrap();
    // The cell goes first, so the replica stops before its disk goes; its directory can
    // only be removed once that disk is unmounted.
    let dir = cell.dir.path().to_owned();
    drop(cell);
    drop(disk);
    let _ = std::fs::remove_dir_all(dir);
}

/// How a replica answered a pair decision.
#[derive(Debug)]
enum Decision {
    Granted(Epoch),
    NotLeader,
    /// Any other answer or failure, shown in a failure's message.
    Other(#[allow(dead_code)] String),
}

/// Sends `request` (a pair decision) to the replica listening at `address`, and only it.
/// A pair decision asked of the replica at `address`, as a pair member asks it (with
/// the cell's server certificate).
fn decide_at(cell: &TestCell, address: &str, request: Request) -> Decision {
    let config = proto::CellConfig::load(&cell.cell_file).unwrap();
    let server =
        proto::Transport::from_dir(&config.credentials_dir(), proto::PeerClass::Server).unwrap();
    match pair::call(&server, address, None, request) {
        Ok(Response::PairLease { epoch, .. }) => Decision::Granted(epoch),
        Ok(Response::Pair(entry)) => Decision::Granted(entry.epoch),
        Ok(other) => Decision::Other(other.kind_name().to_owned()),
        Err(e) if matches!(e.remote(), Some(ErrorCode::NotLeader { .. })) => Decision::NotLeader,
        Err(e) => Decision::Other(e.to_string()),
    }
}

#[test]
fn a_stale_leader_cut_off_from_the_majority_stops_granting() {
    let mut cell = TestCell::start_vldb_as(BIN, VldbKind::ReplicatedBehindProxies).unwrap();
    cell.expect_peers_down();
    cell.start_fileserver().unwrap();
    cell.create_root_volume().unwrap();
    // A pretend pair member holds a lease, renewing it at the leader itself.
    let client = cell.vldb_client_as_server(Duration::from_secs(10)).unwrap();
    let pair = PairName::parse("stale").unwrap();
    let member = "127.0.0.1:1";
    let (epoch, _) = block_on(async {
        client.join_pair(&pair, ServerId::random(), member).await?;
        client
            .acquire_pair(&pair, member, Epoch(0), PRETEND_LEASE)
            .await
    })
    .unwrap()
    .unwrap();
    let renew = Request::VlRenewPair {
        pair: pair.clone(),
        member: member.to_owned(),
        epoch,
        lease_ms: PRETEND_LEASE.as_millis() as u64,
    };
    let stale = cell.vldb_leader(GROUP_LIMIT).unwrap();
    let stale_address = cell.replica(stale).unwrap().listen.clone();
    match decide_at(&cell, &stale_address, renew.clone()) {
        Decision::Granted(granted) => assert_eq!(granted, epoch),
        other => panic!("the leader answered a renewal with {other:?}"),
    }

    cell.cut_replica(stale).unwrap();
    let cut = Instant::now();
    // From now on the stale leader grants nothing; it soon says it does not lead.
    let mut answers = Vec::new();
    let refused = loop {
        let answer = decide_at(&cell, &stale_address, renew.clone());
        let at = cut.elapsed();
        assert!(
            !matches!(answer, Decision::Granted(_)),
            "the cut-off leader granted a renewal {at:?} after the cut: {answers:?}"
        );
        let not_leader = matches!(answer, Decision::NotLeader);
        answers.push((at, answer));
        if not_leader {
            break at;
        }
        assert!(
            at < GROUP_LIMIT,
            "no NotLeader from the cut-off leader: {answers:?}"
        );
    };
    eprintln!("the cut-off leader refused after {refused:?}: {answers:?}");
    // It asks a quorum before each decision: the first one after the cut is refused.
    // A bound of an election timeout and a lease tells that from a hang.
    assert!(
        refused < PAIR_LEASE,
        "the cut-off leader took {refused:?} to refuse: {answers:?}"
    );
    let get = Request::VlGetPair { pair: pair.clone() };
    let answer = decide_at(&cell, &stale_address, get);
    assert!(
        matches!(answer, Decision::NotLeader),
        "the cut-off leader answered VlGetPair with {answer:?}"
    );

    // The other two elect a leader of their own, and serve.
    let majority = others(&cell, stale);
    let leader = cell.vldb_leader_among(&majority, GROUP_LIMIT).unwrap();
    assert_ne!(leader, stale);
    let fileserver = cell.fs_address.clone();
    vos(&cell, &["create", "vol.majority", "--server", &fileserver]);
    let (renewed, _) = block_on(client.renew_pair(&pair, member, epoch, PRETEND_LEASE))
        .unwrap()
        .unwrap();
    assert_eq!(renewed, epoch);
    // Nor does it answer lookups from its tables, which miss what the majority did:
    // once no quorum has heard it for an election timeout, it says it does not lead.
    let lookup = Request::VlGetEntry {
        volume: VolumeRef::Name(VolumeName::parse("vol.majority").unwrap()),
    };
    match pair::call(&cell.transport, &stale_address, None, lookup) {
        Err(e) if matches!(e.remote(), Some(ErrorCode::NotLeader { .. })) => {}
        other => panic!("the cut-off leader answered a lookup with {other:?}"),
    }
    // Still cut off, the stale leader still grants nothing.
    let answer = decide_at(&cell, &stale_address, renew);
    assert!(
        matches!(answer, Decision::NotLeader),
        "the cut-off leader answered a renewal with {answer:?}"
    );

    // Healed, it follows the new leader and catches up.
    cell.heal_replica(stale).unwrap();
    cell.await_whole_group(GROUP_LIMIT).unwrap();
    let status = cell.replica_status(stale).unwrap();
    assert_ne!(
        status.leader.as_ref().map(|(id, _)| *id),
        Some(stale),
        "{status:?}"
    );
    assert!(vos(&cell, &["listvldb"]).contains("vol.majority\n"));
}
