//! `holdfast up` as a supervisor: each child killed in turn while a writer appends, a second
//! run on the same DIR, and the refusals a person has to act on.
//! Invariant: every fsynced append is in the cell, nothing lands in the mount point's own
//! directory, `up` outlives every child it runs, and the cell file stays valid across runs.

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use harness::pair::member_state;
use harness::up::Up;
use harness::{vldb_status, wait_until};
use proto::Transport;
use proto::{MemberRole, VldbRole};

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");
/// A hang guard for a restart, an election or a failover; each takes about a second.
const SETTLE_LIMIT: Duration = Duration::from_secs(30);
/// How many more appends must be acknowledged after each kill.
const APPENDS_AFTER_EACH_KILL: usize = 5;
/// The writer's pause between appends (and after a failed one).
const APPEND_EVERY: Duration = Duration::from_millis(20);

/// A thread appending `append N` lines to one file in the mount, each followed by an
/// fsync; a failed append or fsync drops the file, which is opened again (with
/// `O_CREAT`, as an application would) for the next.
struct Writer {
    acked: Arc<Mutex<Vec<u64>>>,
    /// The errno of every failed open, append or fsync, in order.
    errors: Arc<Mutex<Vec<i32>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    fn start(path: PathBuf) -> Writer {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (acked, errors, stop) = (acked.clone(), errors.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut file = None;
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(APPEND_EVERY);
                    let open = match file.take() {
                        Some(open) => Ok(open),
                        None => OpenOptions::new().create(true).append(true).open(&path),
                    };
                    seq += 1;
                    let appended = open.and_then(|mut open: std::fs::File| {
                        open.write_all(format!("append {seq}\n").as_bytes())?;
                        open.sync_all()?;
                        Ok(open)
                    });
                    match appended {
                        Ok(open) => {
                            acked.lock().unwrap().push(seq);
                            file = Some(open);
                        }
                        Err(e) => errors.lock().unwrap().push(e.raw_os_error().unwrap_or(0)),
                    }
                }
            })
        };
        Writer {
            acked,
            errors,
            stop,
            thread: Some(thread),
        }
    }

    fn acked_count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    fn errors(&self) -> Vec<i32> {
        self.errors.lock().unwrap().clone()
    }

    /// Waits until `more` appends beyond `from` are acknowledged.
    fn await_acked(&self, from: usize, more: usize, after: &str) {
        assert!(
            wait_until(SETTLE_LIMIT, || self.acked_count() >= from + more),
            "appends did not continue after {after}: {} acknowledged, errors {:?}",
            self.acked_count(),
            self.errors()
        );
    }

    fn stop(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
        self.acked.lock().unwrap().clone()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Kills the child `name` with SIGKILL while `writer` appends, and waits until `up` runs
/// it again and the appends went on; fails if `up` itself stopped.
fn kill_and_await(up: &Up, name: &str, writer: &Writer) {
    let before = writer.acked_count();
    let pid = up.signal_child(name, libc::SIGKILL).unwrap();
    up.await_restarted(name, pid, SETTLE_LIMIT).unwrap();
    writer.await_acked(
        before,
        APPENDS_AFTER_EACH_KILL,
        &format!("the {name} was killed"),
    );
    let said = format!("The {name} (pid {pid}) died (signal: 9 (SIGKILL))");
    assert!(
        up.output().contains(&said),
        "no line `{said}`:\n{}",
        up.output()
    );
}

/// The id of the replica every replica names as its leader, once they all agree.
fn agreed_leader(transport: &Transport, replicas: &[(u64, String)]) -> Option<u64> {
    let mut leaders = BTreeSet::new();
    for (_, address) in replicas {
        let status = vldb_status(transport, address).ok()?;
        leaders.insert(status.leader?.0);
    }
    (leaders.len() == 1)
        .then(|| leaders.into_iter().next())
        .flatten()
}

/// Waits until the VLDB's three replicas follow one leader again.
fn await_whole_group(transport: &Transport, replicas: &[(u64, String)]) -> u64 {
    let mut leader = None;
    assert!(
        wait_until(SETTLE_LIMIT, || {
            leader = agreed_leader(transport, replicas);
            leader.is_some()
        }),
        "the VLDB replicas did not agree on a leader again"
    );
    let leader = leader.unwrap();
    let (_, address) = replicas.iter().find(|(id, _)| *id == leader).unwrap();
    assert_eq!(
        vldb_status(transport, address).unwrap().role,
        VldbRole::Leader
    );
    leader
}

/// Waits until one member is active and the other passive; returns (active, passive).
fn await_pair(transport: &Transport, members: &[(String, String)]) -> (String, String) {
    let mut roles = Vec::new();
    let settled = wait_until(SETTLE_LIMIT, || {
        roles = members
            .iter()
            .map(|(name, address)| {
                let role = member_state(transport, address).map(|s| s.role).ok();
                (name.clone(), role)
            })
            .collect();
        roles.iter().any(|(_, r)| *r == Some(MemberRole::Active))
            && roles.iter().any(|(_, r)| *r == Some(MemberRole::Passive))
    });
    assert!(settled, "the pair did not settle again: {roles:?}");
    let find = |role| {
        roles
            .iter()
            .find(|(_, r)| *r == Some(role))
            .map(|(name, _)| name.clone())
            .unwrap()
    };
    (find(MemberRole::Active), find(MemberRole::Passive))
}

/// Every acknowledged append is a line of `file`.
fn assert_all_acked_in(file: &Path, acked: &[u64]) {
    let text = std::fs::read_to_string(file).unwrap();
    let lines: BTreeSet<&str> = text.lines().collect();
    let missing: Vec<u64> = acked
        .iter()
        .copied()
        .filter(|seq| !lines.contains(format!("append {seq}").as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged appends are missing from the cell: {missing:?}",
        missing.len(),
        acked.len()
    );
}

#[test]
fn each_child_of_up_killed_in_turn_while_a_writer_appends() {
    let mut up = Up::new(BIN).unwrap();
    up.expect_peers_down();
    up.start().unwrap();
    let cell_file = std::fs::read_to_string(up.dir().join("cell.toml")).unwrap();
    let file = up.mountpoint().join("appends.log");
    let writer = Writer::start(file.clone());
    writer.await_acked(0, APPENDS_AFTER_EACH_KILL, "the start");

    // Every VLDB replica, the leader first; the group is whole again before the next.
    let transport = up.transport().unwrap();
    let replicas = up.replica_addresses().unwrap();
    let leader = await_whole_group(&transport, &replicas);
    let mut order: Vec<u64> = vec![leader];
    order.extend(
        replicas
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| *id != leader),
    );
    for id in order {
        kill_and_await(&up, &format!("vlserver-{id}"), &writer);
        await_whole_group(&transport, &replicas);
    }

    // The active member (its partner takes over), then the passive one.
    let members = up.member_addresses().unwrap();
    let (active, _) = await_pair(&transport, &members);
    kill_and_await(&up, &active, &writer);
    let (_, passive) = await_pair(&transport, &members);
    kill_and_await(&up, &passive, &writer);
    await_pair(&transport, &members);
    assert_eq!(
        writer.errors(),
        Vec::<i32>::new(),
        "appends failed while a server was killed"
    );

    // The mount itself: appends fail until it is back, and none succeeds on local disk.
    kill_and_await(&up, "mount", &writer);
    let errors = writer.errors();
    assert!(
        errors.contains(&libc::EROFS),
        "while the mount was down, creates did not meet the read-only guard: errnos {errors:?}"
    );
    let acked = writer.stop();
    assert_all_acked_in(&file, &acked);
    assert!(up.is_running(), "up stopped:\n{}", up.output());

    up.stop().unwrap();
    let stray: Vec<_> = std::fs::read_dir(up.mountpoint())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        stray.is_empty(),
        "files landed in the mount point's own directory: {stray:?}"
    );

    // A second run on the same DIR: the same addresses, the same data.
    up.start().unwrap();
    let again = std::fs::read_to_string(up.dir().join("cell.toml")).unwrap();
    assert_eq!(again, cell_file, "the cell file changed between runs of up");
    assert_all_acked_in(&file, &acked);
    up.stop().unwrap();
}

#[test]
fn a_mount_point_that_is_not_empty_is_named_with_what_it_holds() {
    let up = Up::new(BIN).unwrap();
    std::fs::create_dir_all(up.mountpoint()).unwrap();
    for name in ["stray-1", "stray-2", "stray-3", "stray-4"] {
        std::fs::write(up.mountpoint().join(name), b"landed on local disk").unwrap();
    }
    let output = up.run_to_completion().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert_eq!(
        stderr.trim_end(),
        format!(
            "holdfast: mount point {} is not empty: it holds 4 entries (stray-1, stray-2, \
             stray-3, ...); move them out of the way and try again",
            up.mountpoint().display()
        )
    );
    assert!(!harness::is_mounted(&up.mountpoint()));
}

#[test]
fn a_kept_port_taken_by_another_process_is_named() {
    let up = Up::new(BIN).unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_address = taken.local_addr().unwrap().to_string();
    let free: Vec<String> = (0..2)
        .map(|_| {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().to_string()
        })
        .collect();
    std::fs::create_dir_all(up.dir()).unwrap();
    let replicas_file = up.dir().join("vldb-replicas");
    std::fs::write(
        &replicas_file,
        format!("1={}\n2={taken_address}\n3={}\n", free[0], free[1]),
    )
    .unwrap();
    let output = up.run_to_completion().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    let port = taken_address.rsplit(':').next().unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "port {port} of VLDB replica 2 ({taken_address}, kept in {}",
            replicas_file.display()
        )) && stderr.contains("is taken by another process"),
        "{stderr}"
    );
    assert!(!harness::is_mounted(&up.mountpoint()));
}
