//! Fileserver pairs: the active member dies, hangs or is cut off from the VLDB, the
//! passive takes over, and applications on the mounts carry on — every fsynced record
//! kept exactly once, locks held, no two members acknowledging changes at once.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use harness::pair::{self, HistoryEvent, read_history};
use harness::{PairOptions, TestCell, flock, flock_n_succeeds, wait_until};
use proto::{ClientId, Fid, Request, VolumeName, VolumeRef};

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");
/// Long enough for any takeover: a mount keeps retrying for this long.
const FAILOVER: &[&str] = &["--failover-timeout", "30"];
const TAKEOVER_LIMIT: Duration = Duration::from_secs(20);

/// A thread appending numbered records to one file with an fsync after each.
struct Writer {
    /// Record numbers whose fsync returned, and when.
    acked: Arc<Mutex<Vec<(u64, Instant)>>>,
    error: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    fn start(path: PathBuf) -> Writer {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let error = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (acked, error, stop) = (acked.clone(), error.clone(), stop.clone());
            std::thread::spawn(move || {
                let result = (|| -> std::io::Result<()> {
                    let mut file = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&path)?;
                    let mut k = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        file.write_all(format!("{k:08}\n").as_bytes())?;
                        file.sync_all()?;
                        acked.lock().unwrap().push((k, Instant::now()));
                        k += 1;
                    }
                    Ok(())
                })();
                if let Err(e) = result {
                    *error.lock().unwrap() = Some(e.to_string());
                }
            })
        };
        Writer {
            acked,
            error,
            stop,
            thread: Some(thread),
        }
    }

    fn count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    fn failed(&self) -> bool {
        self.error.lock().unwrap().is_some()
    }

    /// Stops the writer; returns the acknowledged records and the longest wait for one.
    fn finish(mut self) -> (Vec<u64>, Duration) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("writer thread");
        }
        if let Some(error) = self.error.lock().unwrap().take() {
            panic!("a writer saw an error instead of a stall: {error}");
        }
        let acked = self.acked.lock().unwrap();
        let longest = acked
            .windows(2)
            .map(|w| w[1].1 - w[0].1)
            .max()
            .unwrap_or_default();
        (acked.iter().map(|(k, _)| *k).collect(), longest)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Waits until `writer` acknowledged `count` records (or failed).
fn await_records(writer: &Writer, count: usize) {
    assert!(
        wait_until(Duration::from_secs(60), || writer.count() >= count
            || writer.failed()),
        "the writer acknowledged only {} of {count} records",
        writer.count()
    );
}

/// Checks that `file` holds each record 0.. exactly once, in order, and every acked one.
fn check_records(file: &Path, acked: &[u64]) {
    let text = std::fs::read_to_string(file).unwrap();
    let records: Vec<u64> = text
        .lines()
        .map(|line| {
            line.parse()
                .unwrap_or_else(|_| panic!("bad record line {line:?}"))
        })
        .collect();
    for (i, record) in records.iter().enumerate() {
        assert_eq!(
            *record as usize,
            i,
            "{}: record {i} is {record}: lost, duplicated or out of order",
            file.display()
        );
    }
    let last_acked = acked.last().copied().unwrap_or(0) as usize;
    assert!(
        records.len() > last_acked,
        "{}: {} records on the server but record {last_acked} was acknowledged",
        file.display(),
        records.len()
    );
}

fn other(name: &str) -> &'static str {
    if name == "fs-a" { "fs-b" } else { "fs-a" }
}

#[test]
fn fsynced_records_survive_a_kill_of_the_active_exactly_once_and_in_order() {
    let mut cell = TestCell::start_pair(BIN, PairOptions::default()).unwrap();
    let a = cell.mount("ws-a", FAILOVER).unwrap();
    let b = cell.mount("ws-b", FAILOVER).unwrap();
    let writers = [
        Writer::start(a.join("log-a")),
        Writer::start(b.join("log-b")),
    ];
    for writer in &writers {
        await_records(writer, 20);
    }

    let active = cell.active_member().expect("an active member");
    let at_kill: Vec<usize> = writers.iter().map(Writer::count).collect();
    cell.signal(&active, libc::SIGKILL).unwrap();
    let killed = Instant::now();
    cell.await_active(other(&active), TAKEOVER_LIMIT).unwrap();
    eprintln!("takeover seen after {:?}", killed.elapsed());
    for (writer, before) in writers.iter().zip(&at_kill) {
        await_records(writer, before + 20);
    }

    let [writer_a, writer_b] = writers;
    for (writer, file) in [(writer_a, a.join("log-a")), (writer_b, b.join("log-b"))] {
        let (acked, longest) = writer.finish();
        eprintln!(
            "{}: {} records acknowledged, longest stall {longest:?}",
            file.display(),
            acked.len()
        );
        check_records(&file, &acked);
    }
    // A third workstation reads both files from the new active, not from a cache.
    let c = cell.mount("ws-c", FAILOVER).unwrap();
    for name in ["log-a", "log-b"] {
        let records = std::fs::read_to_string(c.join(name)).unwrap();
        assert_eq!(
            records,
            std::fs::read_to_string(a.join(name)).unwrap(),
            "{name} differs between workstations"
        );
    }
}

#[test]
fn a_lock_held_through_a_failover_stays_held_and_a_conflict_waits_for_its_release() {
    let mut cell = TestCell::start_pair(BIN, PairOptions::default()).unwrap();
    let a = cell.mount("ws-a", FAILOVER).unwrap();
    let b = cell.mount("ws-b", FAILOVER).unwrap();
    std::fs::write(a.join("locked"), b"data").unwrap();
    let held = std::fs::File::open(a.join("locked")).unwrap();
    flock(&held, libc::LOCK_EX | libc::LOCK_NB).unwrap();
    assert!(!flock_n_succeeds(&b.join("locked")));

    let active = cell.active_member().expect("an active member");
    let successor = other(&active);
    cell.signal(&active, libc::SIGKILL).unwrap();
    cell.await_active(successor, TAKEOVER_LIMIT).unwrap();

    // During grace and after it, B cannot take A's lock.
    assert!(
        !flock_n_succeeds(&b.join("locked")),
        "B took the lock A holds right after the takeover"
    );
    assert!(
        wait_until(Duration::from_secs(20), || cell
            .log(successor)
            .contains("grace ended")),
        "grace did not end on the new active:\n{}",
        cell.log(successor)
    );
    assert!(
        cell.log(successor).contains("early"),
        "grace should end early once A reclaimed:\n{}",
        cell.log(successor)
    );
    assert!(
        !flock_n_succeeds(&b.join("locked")),
        "B took the lock A still holds after grace"
    );

    // A blocking request from B waits, and is granted once A releases.
    let path = b.join("locked");
    let mut waiter = std::process::Command::new("flock")
        .args([&path.to_string_lossy() as &str, "-c", "true"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        waiter.try_wait().unwrap().is_none(),
        "B's blocking flock returned while A held the lock"
    );
    flock(&held, libc::LOCK_UN).unwrap();
    let granted = wait_until(Duration::from_secs(10), || {
        waiter.try_wait().unwrap().is_some()
    });
    if !granted {
        let _ = waiter.kill();
    }
    let status = waiter.wait().unwrap();
    assert!(
        granted && status.success(),
        "B's flock after A's release: {status}"
    );
}

/// The root volume's root directory.
fn root_dir(cell: &TestCell) -> Fid {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let config = proto::CellConfig::load(&cell.cell_file).unwrap();
    let vldb = proto::VldbClient::new(
        config,
        cell.transport.clone(),
        proto::PeerKind::Admin,
        Duration::from_secs(5),
    );
    let entry = runtime
        .block_on(vldb.get_entry(VolumeRef::Name(VolumeName::parse("root.cell").unwrap())))
        .unwrap();
    Fid::root(entry.rw_id)
}

fn acks(events: &[HistoryEvent]) -> impl Iterator<Item = &HistoryEvent> {
    events
        .iter()
        .filter(|e| e.what != "active" && e.what != "fenced")
}

#[test]
fn a_hung_active_loses_its_lease_and_answers_no_change_when_it_resumes() {
    let mut cell = TestCell::start_pair(BIN, PairOptions::default()).unwrap();
    let a = cell.mount("ws-a", FAILOVER).unwrap();
    std::fs::write(a.join("before"), b"1").unwrap();
    let dir = root_dir(&cell);

    let hung = cell.active_member().expect("an active member");
    let successor = other(&hung);
    cell.signal(&hung, libc::SIGSTOP).unwrap();
    // The mount carries on: this write stalls until the partner took over.
    let mut file = std::fs::File::create(a.join("during")).unwrap();
    file.write_all(b"written while the active hung").unwrap();
    file.sync_all().unwrap();
    drop(file);
    cell.await_active(successor, TAKEOVER_LIMIT).unwrap();
    let took_over = std::time::SystemTime::now();

    // Resumed, the old active must not answer a single change.
    cell.signal(&hung, libc::SIGCONT).unwrap();
    let hung_address = cell.member_address(&hung).unwrap();
    let client = ClientId::random();
    for i in 0..50 {
        let answer = pair::call(
            &cell.transport,
            &hung_address,
            Some(client),
            Request::Create {
                dir,
                name: format!("from-the-old-active-{i}"),
                mode: 0o644,
                uid: 0,
                gid: 0,
                exclusive: true,
            },
        );
        match answer {
            Err(e) if pair::is_not_active(&e) || e.is_transport() => {}
            other => panic!("the resumed old active answered a create: {other:?}"),
        }
    }
    assert!(
        wait_until(Duration::from_secs(10), || pair::member_state(
            &cell.transport,
            &hung_address
        )
        .is_ok_and(|s| s.role == proto::MemberRole::Passive)),
        "the old active did not rejoin as passive:\n{}",
        cell.log(&hung)
    );
    let names: Vec<String> = std::fs::read_dir(&a)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.starts_with("from-the-old-active")),
        "a create sent to the old active exists: {names:?}"
    );
    assert_eq!(
        std::fs::read(a.join("during")).unwrap(),
        b"written while the active hung"
    );

    // Its history shows no acknowledgement after the partner's takeover.
    let took_over_micros = took_over
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    let old = read_history(&cell.history_path(&hung)).unwrap();
    let new = read_history(&cell.history_path(successor)).unwrap();
    let new_active_since = new
        .iter()
        .rfind(|e| e.what == "active")
        .map(|e| e.micros)
        .unwrap_or(took_over_micros);
    for event in acks(&old) {
        assert!(
            event.micros < new_active_since,
            "the old active acknowledged {event:?} after its partner became active at {new_active_since}"
        );
    }
}

#[test]
fn an_active_cut_off_from_the_vldb_fences_itself_before_the_passive_takes_over() {
    let options = PairOptions {
        vldb_proxy_for_a: true,
        ..PairOptions::default()
    };
    let mut cell = TestCell::start_pair(BIN, options).unwrap();
    assert_eq!(cell.active_member().as_deref(), Some("fs-a"));
    let a = cell.mount("ws-a", FAILOVER).unwrap();
    let writer = Writer::start(a.join("log"));
    await_records(&writer, 20);

    cell.vldb_proxy.as_ref().unwrap().cut();
    let before = writer.count();
    cell.await_active("fs-b", TAKEOVER_LIMIT).unwrap();
    await_records(&writer, before + 20);
    let (acked, longest) = writer.finish();
    eprintln!(
        "{} records acknowledged, longest stall {longest:?}",
        acked.len()
    );
    check_records(&a.join("log"), &acked);

    // From both histories: every acknowledgement of fs-a precedes every one of fs-b in
    // a later epoch, and fs-a fenced itself before fs-b became active.
    let history_a = read_history(&cell.history_path("fs-a")).unwrap();
    let history_b = read_history(&cell.history_path("fs-b")).unwrap();
    let fenced = history_a
        .iter()
        .find(|e| e.what == "fenced")
        .expect("fs-a records that it fenced itself");
    let active_b = history_b
        .iter()
        .find(|e| e.what == "active")
        .expect("fs-b records that it became active");
    assert!(
        fenced.micros < active_b.micros,
        "fs-a fenced at {} but fs-b was active from {}",
        fenced.micros,
        active_b.micros
    );
    let last_a = acks(&history_a).map(|e| e.micros).max().unwrap_or(0);
    let first_b = acks(&history_b)
        .map(|e| e.micros)
        .min()
        .expect("fs-b acknowledged the writes after the takeover");
    assert!(
        last_a < first_b,
        "fs-a acknowledged a change at {last_a}, after fs-b's first at {first_b}"
    );
    assert!(acks(&history_b).all(|e| e.epoch > fenced.epoch));
}
