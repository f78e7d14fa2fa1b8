//! Crash images of the state journal on the partition's metadata log: a seeded workload
//! on the real `Locks` and `Callbacks` over a partition on a `MemDisk` whose power is cut
//! after each mutation in turn (log segments, state snapshots, releases of segments).
//! Invariant: every image recovers the live state as it stood after some operation
//! between the last one acknowledged durable and the first one told the journal failed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use proto::{
    ByteRange, ClientId, Epoch, ErrorCode, Fid, InstanceNonce, LockKind, LockOwnerId, Uniquifier,
    VnodeId, VolumeId,
};
use state::{ClientKey, JournalMode};

use state::journaled::StateSnapshot;

use crate::callbacks::Callbacks;
use crate::fence::Fence;
use crate::locks::{Locks, SetLockReply};
use crate::restart::{self, test_tables};
use crate::state_journal::{JournalStop, StateJournal, StateJournalError, open_on};
use crate::stats::Stats;
use crate::storage::Partition;
use crate::storage::mem_disk::{Kept, MemDisk};
use crate::test_rng::Rng;

const CLIENTS: u8 = 3;
const OWNERS: u8 = 2;
const FILES: u8 = 2;
/// Lock ranges fall inside `[0, RANGE_END)`, so that they overlap, merge and split often.
const RANGE_END: u64 = 24;
const OPS: usize = 48;
const SEEDS: [u64; 6] = [1, 2, 3, 4, 5, 6];

#[derive(Clone, Copy, Debug)]
enum Op {
    Lock {
        client: u8,
        owner: u8,
        file: u8,
        start: u64,
        end: u64,
        exclusive: bool,
    },
    Unlock {
        client: u8,
        owner: u8,
        file: u8,
        start: u64,
        end: u64,
    },
    ReleaseClient {
        client: u8,
    },
    Grant {
        client: u8,
        file: u8,
    },
    GiveUp {
        client: u8,
        file: u8,
    },
    Snapshot,
}

/// What the caller was told about an operation's durability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ack {
    /// Returned success after its record was durable.
    Durable,
    /// Returned the journal's failure.
    Failed,
    /// Not acknowledged as durable: nothing was waited for (or nothing changed).
    Unacknowledged,
}

/// Mostly lock traffic, some callback traffic, rare whole-client releases, and two
/// snapshots (the second one replaces the first) a third and two thirds of the way.
fn workload(seed: u64) -> Vec<Op> {
    let mut rng = Rng(seed);
    let mut ops = Vec::with_capacity(OPS + 2);
    for index in 0..OPS {
        if index == OPS / 3 || index == 2 * OPS / 3 {
            ops.push(Op::Snapshot);
        }
        let (client, owner, file) = (rng.small(CLIENTS), rng.small(OWNERS), rng.small(FILES));
        let start = rng.below(RANGE_END - 1);
        let end = start + 1 + rng.below(RANGE_END - start - 1).min(7);
        let op = match rng.below(20) {
            0..=8 => Op::Lock {
                client,
                owner,
                file,
                start,
                end,
                exclusive: rng.below(2) == 0,
            },
            9..=12 => Op::Unlock {
                client,
                owner,
                file,
                start,
                end,
            },
            13 => Op::ReleaseClient { client },
            14..=17 => Op::Grant { client, file },
            _ => Op::GiveUp { client, file },
        };
        ops.push(op);
    }
    ops
}

fn fid(file: u8) -> Fid {
    Fid {
        volume: VolumeId(1),
        vnode: VnodeId(u64::from(file) + 2),
        unique: Uniquifier(1),
    }
}

fn client_id(client: u8) -> ClientId {
    ClientId(uuid::Uuid::from_u128(0x5eed_0000 + u128::from(client)))
}

/// The journaled state the live tables hold at one moment, in comparable form.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Point {
    /// (fid, client key, owner, start, end, exclusive, pid).
    locks: BTreeSet<(Fid, u32, u64, u64, u64, bool, u32)>,
    /// (fid, client key).
    promises: BTreeSet<(Fid, u32)>,
}

impl Point {
    fn recovered(state: &StateSnapshot) -> Point {
        Point {
            locks: state
                .locks
                .iter()
                .map(|l| {
                    let (owner, range) = (l.lock.owner, l.lock.range);
                    let exclusive = l.lock.kind == LockKind::Exclusive;
                    let (client, owner) = (owner.client.0, owner.owner.0);
                    (
                        l.fid,
                        client,
                        owner,
                        range.start(),
                        range.end(),
                        exclusive,
                        l.pid,
                    )
                })
                .collect(),
            promises: state
                .callbacks
                .promises
                .keys()
                .map(|&(fid, key)| (fid, key.0))
                .collect(),
        }
    }

    fn live(locks: &Locks, callbacks: &Callbacks) -> Point {
        let mut point = Point::recovered(&locks.state());
        for file in 0..FILES {
            let (holders, _) = callbacks.inspect(fid(file));
            point
                .promises
                .extend(holders.into_iter().map(|key| (fid(file), key.0)));
        }
        point
    }

    /// Per byte of each owner's locks: (fid, client key, owner, byte) -> exclusive.
    fn bytes(&self) -> BTreeMap<(Fid, u32, u64, u64), bool> {
        let mut bytes = BTreeMap::new();
        for &(fid, client, owner, start, end, exclusive, _) in &self.locks {
            for byte in start..end {
                let previous = bytes.insert((fid, client, owner, byte), exclusive);
                assert!(previous.is_none(), "overlapping locks of one owner");
            }
        }
        bytes
    }
}

/// One run of the workload until its end or the power cut.
struct Run {
    ops: Vec<Op>,
    /// `history[i]`: the live state after `i` operations.
    history: Vec<Point>,
    /// `acks[i]`: what operation `i + 1` was told.
    acks: Vec<Ack>,
    /// The clients admitted before any operation: (journal key, id, instance).
    clients: Vec<(ClientKey, ClientId, InstanceNonce)>,
}

impl Run {
    /// The operations whose effect may or may not be recovered (as history indexes):
    /// from the last one acknowledged durable to the first one told of a failure, both
    /// included.
    ///
    /// Why that window: the journal is a log, so a durable acknowledgement covers every
    /// record handed over before it; records handed over after it may or may not have
    /// reached the disk (written but unsynced, torn, or inside a snapshot written before
    /// the failing sync); and once the writer saw a failure it appends nothing more. So a
    /// lock or promise may go either way exactly when an operation inside that window
    /// changed it: a grant or release whose acknowledgement failed, a whole-client release
    /// or give-up (never acknowledged), or a callback grant in `group` mode (answered
    /// without a sync), each only if no later durable acknowledgement covers it.
    fn window(&self) -> (usize, usize) {
        let lower = self
            .acks
            .iter()
            .rposition(|ack| *ack == Ack::Durable)
            .map_or(0, |index| index + 1);
        let upper = self
            .acks
            .iter()
            .position(|ack| *ack == Ack::Failed)
            .map_or(self.history.len() - 1, |index| index + 1);
        (lower, upper)
    }

    fn describe(&self) -> String {
        let mut text = String::new();
        for (index, (op, ack)) in self.ops.iter().zip(&self.acks).enumerate() {
            let _ = writeln!(text, "  op {}: {op:?} -> {ack:?}", index + 1);
        }
        text
    }
}

async fn run_workload(disk: &MemDisk, root: &Path, mode: JournalMode, ops: &[Op]) -> Run {
    let mut run = Run {
        ops: Vec::new(),
        history: vec![Point::default()],
        acks: Vec::new(),
        clients: Vec::new(),
    };
    let opened = open_on(disk, root, mode, Arc::new(Fence::open()), Epoch(1));
    let Ok((partition, journal, _)) = opened else {
        return run;
    };
    let journal = Arc::new(journal);
    let (callbacks, locks) = test_tables(&journal);
    let mut keys = Vec::new();
    for client in 0..CLIENTS {
        let (id, instance) = (client_id(client), InstanceNonce(u64::from(client) + 1));
        let key = callbacks.sessions().recover(id, instance).unwrap();
        locks.admitted(key, id, instance);
        run.clients.push((key, id, instance));
        keys.push(key);
    }
    let key = |client: u8| keys[usize::from(client)];
    let stats = Stats::default();
    for &op in ops {
        let ack = apply(&partition, &locks, &callbacks, &stats, mode, key, op).await;
        run.ops.push(op);
        run.acks.push(ack);
        run.history.push(Point::live(&locks, &callbacks));
    }
    drop((locks, callbacks));
    // Closing joins the snapshot threads and dropping the partition the log's flusher,
    // so the image below is final.
    Arc::into_inner(journal)
        .expect("the tables were dropped")
        .close();
    drop(partition);
    run
}

async fn apply(
    partition: &Partition,
    locks: &Arc<Locks>,
    callbacks: &Arc<Callbacks>,
    stats: &Stats,
    mode: JournalMode,
    key: impl Fn(u8) -> ClientKey,
    op: Op,
) -> Ack {
    let lock_ack = |result: Result<(), ErrorCode>| match result {
        Ok(()) => Ack::Durable,
        Err(ErrorCode::Internal(_)) => Ack::Failed,
        // Refused: nothing changed, nothing was journaled.
        Err(ErrorCode::WouldBlock) => Ack::Unacknowledged,
        Err(other) => panic!("unexpected lock error {other:?}"),
    };
    match op {
        Op::Lock {
            client,
            owner,
            file,
            start,
            end,
            exclusive,
        } => {
            let kind = if exclusive {
                LockKind::Exclusive
            } else {
                LockKind::Shared
            };
            let range = ByteRange::new(start, end).unwrap();
            let pid = 100 * u32::from(client) + u32::from(owner);
            let result = locks
                .set(
                    key(client),
                    fid(file),
                    LockOwnerId(owner.into()),
                    range,
                    kind,
                    false,
                    pid,
                )
                .await;
            assert!(!matches!(result, Ok(SetLockReply::Queued(_))));
            lock_ack(result.map(|_| ()))
        }
        Op::Unlock {
            client,
            owner,
            file,
            start,
            end,
        } => {
            let range = ByteRange::new(start, end).unwrap();
            lock_ack(
                locks
                    .release(key(client), fid(file), LockOwnerId(owner.into()), range)
                    .await,
            )
        }
        Op::ReleaseClient { client } => {
            locks.release_client(key(client));
            Ack::Unacknowledged
        }
        Op::Grant { client, file } => {
            // A grant of a promise already held waits for the earlier grant's record (a
            // journal barrier), so it counts as acknowledged durable as well.
            match callbacks.grant(key(client), fid(file)).await {
                None => Ack::Failed,
                // Only `sync` mode waits for a callback grant's record.
                Some(_) if mode == JournalMode::Sync => Ack::Durable,
                Some(_) => Ack::Unacknowledged,
            }
        }
        Op::GiveUp { client, file } => {
            callbacks.give_up(key(client), &[fid(file)]);
            Ack::Unacknowledged
        }
        Op::Snapshot => {
            // Then the log lets go of what the snapshot and the (empty) volumes cover.
            if restart::snapshot(callbacks, locks, stats).wait().await {
                let _ = partition.checkpoint();
            }
            Ack::Unacknowledged
        }
    }
}

/// Opens the partition and its journal on `image`, as the restarted server would, and
/// returns the state.
fn recover(
    image: &MemDisk,
    root: &Path,
    mode: JournalMode,
) -> Result<StateSnapshot, StateJournalError> {
    let (partition, journal, state) =
        open_on(image, root, mode, Arc::new(Fence::open()), Epoch(2))?;
    journal.close();
    drop(partition);
    Ok(state)
}

/// Checks the state recovered from `image` against what `run` was told: every
/// acknowledged change is back, and nothing that never happened.
fn check(run: &Run, recovered: &StateSnapshot, context: &str) {
    let (lower, upper) = run.window();
    let fail = |what: String| -> ! {
        panic!(
            "{context}: {what}\n  durable window: after op {lower} ..= after op {upper}\n{}",
            run.describe()
        )
    };
    if lower > upper {
        fail(format!(
            "op {lower} was acknowledged durable after op {upper} was told the journal failed"
        ));
    }
    let window = &run.history[lower..=upper];

    // Clients: only those admitted, and all of them once any later record is durable.
    for entry in &recovered.clients {
        if !run
            .clients
            .contains(&(entry.key, entry.client, entry.instance))
        {
            fail(format!("invented client {entry:?}"));
        }
    }
    if lower > 0 && recovered.clients.len() != run.clients.len() {
        fail(format!(
            "{} clients recovered, {} admitted before acknowledged records",
            recovered.clients.len(),
            run.clients.len()
        ));
    }

    // Per byte of each owner's locks, and per promise: the recovered value must be one
    // the live state had inside the window. Unchanged inside the window (an acknowledged
    // grant not released since, an acknowledged release, something never granted) it is
    // exactly that value.
    let point = Point::recovered(recovered);
    let recovered_bytes = point.bytes();
    let window_bytes: Vec<_> = window.iter().map(Point::bytes).collect();
    let mut keys: BTreeSet<_> = recovered_bytes.keys().copied().collect();
    for bytes in &window_bytes {
        keys.extend(bytes.keys().copied());
    }
    for byte in keys {
        let got = recovered_bytes.get(&byte);
        if !window_bytes.iter().any(|bytes| bytes.get(&byte) == got) {
            let allowed: BTreeSet<_> = window_bytes.iter().map(|b| b.get(&byte)).collect();
            let (fid, client, owner, offset) = byte;
            fail(format!(
                "byte {offset} of {fid:?} for client {client} owner {owner}: recovered \
                 exclusive={got:?}, allowed {allowed:?} (None: unlocked)"
            ));
        }
    }
    let mut promises: BTreeSet<_> = point.promises.clone();
    for live in window {
        promises.extend(live.promises.iter().copied());
    }
    for promise in promises {
        let got = point.promises.contains(&promise);
        if !window
            .iter()
            .any(|live| live.promises.contains(&promise) == got)
        {
            let what = if got { "invented" } else { "lost" };
            fail(format!("{what} callback promise {promise:?}"));
        }
    }

    // The whole state at once: the live state after one operation of the window.
    if !window.contains(&point) {
        fail(format!(
            "the recovered state is no live state of the window: {point:?}"
        ));
    }
}

/// What a power cut keeps of the bytes written but not synced.
#[derive(Clone, Copy, Debug)]
enum Tail {
    /// Only what was synced.
    Lost,
    /// Everything written.
    Kept,
    /// A torn tail: part of the unsynced bytes.
    Torn,
}

impl Tail {
    /// Of a file's `unsynced` changes (writes and length changes, in order).
    fn keep(self, unsynced: usize) -> Kept {
        match self {
            Tail::Lost => Kept::default(),
            Tail::Kept => Kept {
                changes: unsynced,
                torn_bytes: 0,
            },
            Tail::Torn => Kept {
                changes: unsynced / 2,
                torn_bytes: 2000,
            },
        }
    }
}

async fn crash_at(root: &Path, mode: JournalMode, seed: u64, ops: &[Op], k: u64, tails: &[Tail]) {
    let disk = MemDisk::new();
    disk.crash_after(k);
    let run = run_workload(&disk, root, mode, ops).await;
    for &tail in tails {
        let context = format!("{mode:?}, seed {seed}, power cut after {k} mutations, {tail:?}");
        let image = disk.crash_image(&mut |_, unsynced| tail.keep(unsynced));
        let recovered = recover(&image, root, mode)
            .unwrap_or_else(|e| panic!("{context}: recovery failed: {e}"));
        check(&run, &recovered, &context);
        // Recovery repaired the image for good: a second restart finds the same state.
        let again = recover(&image, root, mode)
            .unwrap_or_else(|e| panic!("{context}: second recovery failed: {e}"));
        assert_eq!(again, recovered, "{context}: second recovery differs");
    }
}

/// Mutations the workload makes without a power cut, after checking that a clean close
/// recovers the final state exactly.
async fn total_mutations(root: &Path, mode: JournalMode, seed: u64, ops: &[Op]) -> u64 {
    let disk = MemDisk::new();
    let run = run_workload(&disk, root, mode, ops).await;
    assert!(run.acks.iter().all(|ack| *ack != Ack::Failed));
    let total = disk.mutations();
    let recovered = recover(&disk, root, mode).unwrap();
    assert_eq!(
        Point::recovered(&recovered),
        run.history[ops.len()],
        "{mode:?}, seed {seed}: a clean close loses nothing"
    );
    total
}

fn crash_at_every_mutation(mode: JournalMode) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    runtime.block_on(async {
        for seed in SEEDS {
            let ops = workload(seed);
            let total = total_mutations(root, mode, seed, &ops).await;
            assert!(total > OPS as u64, "{mode:?}, seed {seed}: {total}");
            for k in 0..=total {
                let tails = [Tail::Lost, Tail::Kept, Tail::Torn];
                crash_at(root, mode, seed, &ops, k, &tails).await;
            }
        }
    });
}

#[test]
fn crash_images_sync_mode_keep_every_acknowledged_change() {
    crash_at_every_mutation(JournalMode::Sync);
}

#[test]
fn crash_images_group_mode_keep_every_acknowledged_lock_change() {
    crash_at_every_mutation(JournalMode::Group);
}

/// The check itself must notice a lost acknowledged lock: a recovery that drops the
/// journal's last durable lock record is caught.
#[test]
fn a_lost_acknowledged_lock_is_caught() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ops = [Op::Lock {
        client: 0,
        owner: 0,
        file: 0,
        start: 0,
        end: 4,
        exclusive: true,
    }];
    let disk = MemDisk::new();
    let root = tempfile::tempdir().unwrap();
    let run = runtime.block_on(run_workload(&disk, root.path(), JournalMode::Sync, &ops));
    assert_eq!(run.acks, [Ack::Durable]);
    let mut recovered = recover(&disk, root.path(), JournalMode::Sync).unwrap();
    check(&run, &recovered, "intact");
    recovered.locks.clear();
    let caught = std::panic::catch_unwind(|| check(&run, &recovered, "lock dropped"));
    assert!(caught.is_err(), "a lost acknowledged lock went unnoticed");
}

/// A `sync` journal on a partition on `disk` behind `fence` with one admitted client.
struct Failing {
    journal: Arc<StateJournal>,
    locks: Arc<Locks>,
    key: ClientKey,
    _partition: Partition,
    _root: tempfile::TempDir,
}

fn failing_setup(disk: &MemDisk, fence: &Arc<Fence>) -> Failing {
    let root = tempfile::tempdir().unwrap();
    let (partition, journal, _) = open_on(
        disk,
        root.path(),
        JournalMode::Sync,
        fence.clone(),
        Epoch(1),
    )
    .unwrap();
    let journal = Arc::new(journal);
    let (callbacks, locks) = test_tables(&journal);
    let (id, instance) = (client_id(0), InstanceNonce(1));
    let key = callbacks.sessions().recover(id, instance).unwrap();
    locks.admitted(key, id, instance);
    Failing {
        journal,
        locks,
        key,
        _partition: partition,
        _root: root,
    }
}

async fn lock_whole_file(locks: &Arc<Locks>, key: ClientKey) -> Result<SetLockReply, ErrorCode> {
    let range = ByteRange::new(0, 10).unwrap();
    locks
        .set(
            key,
            fid(0),
            LockOwnerId(1),
            range,
            LockKind::Exclusive,
            false,
            7,
        )
        .await
}

#[tokio::test]
async fn a_journal_that_fails_closes_the_fence_for_good_and_says_why() {
    let disk = MemDisk::new();
    let fence = Arc::new(Fence::open());
    // Every field bound: the partition and its directory live to the end.
    let Failing {
        journal,
        locks,
        key,
        _partition,
        _root,
    } = failing_setup(&disk, &fence);
    let stopped = journal.stopped();
    assert!(lock_whole_file(&locks, key).await.is_ok());
    assert!(fence.is_open());

    disk.crash_after(0);
    let refused = lock_whole_file(&locks, key).await;
    assert!(
        matches!(refused, Err(ErrorCode::Internal(_))),
        "{refused:?}"
    );
    // Closed by the time the refusal is told: nothing more is answered or written.
    assert!(!fence.is_open());
    let why = tokio::time::timeout(std::time::Duration::from_secs(10), stopped)
        .await
        .expect("the failure is published");
    let JournalStop::Failed(reason) = why else {
        panic!("a failed disk taken for a fence: {why:?}");
    };
    assert!(reason.contains("simulated power loss"), "{reason}");
    assert!(fence.is_closed_for_good());
    fence.open_until(crate::fence::now().saturating_add(std::time::Duration::from_secs(60)));
    assert!(!fence.is_open(), "a renewal must not reopen it");
}

#[tokio::test]
async fn a_fenced_journal_is_no_failure() {
    let disk = MemDisk::new();
    let fence = Arc::new(Fence::open());
    // Every field bound: the partition and its directory live to the end.
    let Failing {
        journal,
        locks,
        key,
        _partition,
        _root,
    } = failing_setup(&disk, &fence);
    // The lease is lost: the member closes the fence, and the disk refuses writes too.
    fence.close();
    disk.crash_after(0);
    assert!(lock_whole_file(&locks, key).await.is_err());
    assert_eq!(journal.stop_reason(), Some(JournalStop::Fenced));
    assert!(!fence.is_closed_for_good());
    // A fence closed for a lost lease opens again at the next grant.
    fence.open_until(crate::fence::now().saturating_add(std::time::Duration::from_secs(60)));
    assert!(fence.is_open());
}

#[tokio::test]
async fn an_abandoned_journal_appends_nothing_even_behind_an_open_fence() {
    let disk = MemDisk::new();
    let fence = Arc::new(Fence::open());
    // Every field bound: the partition and its directory live to the end.
    let Failing {
        journal,
        locks,
        key,
        _partition,
        _root,
    } = failing_setup(&disk, &fence);
    // What the setup handed over is on disk first.
    assert!(journal.barrier().wait().await);
    // The term ended; the fence is open again for a later one.
    journal.abandon();
    let before = disk.mutations();
    assert!(lock_whole_file(&locks, key).await.is_err());
    assert_eq!(disk.mutations(), before, "the old term's writer wrote");
    assert_eq!(journal.stop_reason(), Some(JournalStop::Fenced));
    assert!(fence.is_open());
}
