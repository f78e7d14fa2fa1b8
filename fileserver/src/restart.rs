//! Restart from the state journal, and the snapshots that keep its replay short: replayed
//! state installed under this process's client keys, live state captured consistently.
//! Invariant: a snapshot fixes its journal position while holding every lock records are
//! handed over under, so it sits exactly between two records.

use std::collections::HashMap;
use std::time::Duration;

use state::journaled::{LockEntry, StateSnapshot};
use state::{ClientKey, GraceConfig, JournalMode};
use tracing::{debug, warn};

use crate::callbacks::Callbacks;
use crate::locks::{self, Locks};
use crate::state_journal::Durable;
use crate::stats::Stats;

/// Installs `recovered` and starts grace over its locks, unless the journal ends with a
/// clean handover (then the locks stay with their owners, no grace). Returns whether
/// anything was recovered, in which case the caller snapshots at once: the records on
/// disk name the previous process's client keys.
pub fn restore(
    callbacks: &Callbacks,
    locks: &Locks,
    recovered: StateSnapshot,
    grace: GraceConfig,
    mode: JournalMode,
) -> bool {
    let grace = (!recovered.clean_handover).then_some(grace);
    if recovered.clients.is_empty() {
        return false;
    }
    // Every grant and release was durable before its reply only in `Sync` mode.
    let complete = mode == JournalMode::Sync;
    // The journal's client keys to this process's.
    let mut keys: HashMap<ClientKey, ClientKey> = HashMap::new();
    let mut clients = Vec::new();
    for entry in recovered.clients {
        match callbacks.sessions().recover(entry.client, entry.instance) {
            Some(key) => {
                keys.insert(entry.key, key);
                clients.push((key, entry.client, entry.instance));
            }
            None => {
                warn!(client = %entry.client, "client table full: a recovered client is dropped")
            }
        }
    }
    callbacks.restore(recovered.callbacks, &keys, complete);
    let mut held = Vec::new();
    for LockEntry { fid, mut lock, pid } in recovered.locks {
        let (Some(&client), Ok(_)) = (keys.get(&lock.owner.client), lock.range.checked()) else {
            continue;
        };
        lock.owner.client = client;
        held.push((fid, lock, pid));
    }
    locks.recover(clients, held, grace, complete);
    true
}

/// Snapshots the journaled state now; the copies happen under each table's own locks,
/// into buffers made beforehand, the encoding and writing on the journal's snapshot
/// thread. The answer resolves once the snapshot is durable. The pause recorded is the
/// longer of the two tables' holds: a request waits on one table's locks.
pub fn snapshot(callbacks: &Callbacks, locks: &Locks, stats: &Stats) -> Durable {
    let room = locks.snapshot_room();
    let (written, callbacks_held, locks_held) = snapshot_into(callbacks, locks, room);
    let pause_us = u64::try_from(callbacks_held.max(locks_held).as_micros()).unwrap_or(u64::MAX);
    stats.record_snapshot_pause(pause_us);
    debug!(
        callbacks_held_us = callbacks_held.as_micros() as u64,
        locks_held_us = locks_held.as_micros() as u64,
        "state snapshot captured"
    );
    written
}

/// The callbacks' locks are held while the promises are copied and until the lock
/// table's are taken and the journal position fixed (`Locks::freeze`); then the lock
/// table's alone while its state is copied. Each table's records are handed over only
/// under its own locks, so both copies are the state at that one position. Returns the
/// snapshot's answer and how long each table's locks were held.
pub fn snapshot_into(
    callbacks: &Callbacks,
    locks: &Locks,
    room: locks::SnapshotRoom,
) -> (Durable, Duration, Duration) {
    let ((frozen, written), callbacks_held) = callbacks.snapshot_with(|model| locks.freeze(model));
    let locks_held = frozen.capture(room);
    (written, callbacks_held, locks_held)
}

/// The delayed-break queue bound of `test_tables`.
#[cfg(test)]
pub(crate) const TEST_DELAYED_PER_CLIENT_MAX: usize = 5;

/// Callback and lock tables on `journal`, without a server: room to spare, a small
/// delayed-break queue (so that breaks overflow into resets) and a lease no test
/// outlives.
#[cfg(test)]
pub(crate) fn test_tables(
    journal: &std::sync::Arc<crate::state_journal::StateJournal>,
) -> (std::sync::Arc<Callbacks>, std::sync::Arc<Locks>) {
    use std::sync::Arc;
    let sessions = Arc::new(crate::sessions::Sessions::new(16, Duration::from_secs(1)));
    let callbacks = Arc::new(Callbacks::new(
        1000,
        TEST_DELAYED_PER_CLIENT_MAX,
        sessions.clone(),
        journal.clone(),
    ));
    let lease = Duration::from_secs(600);
    let locks = Arc::new(Locks::new(sessions, journal.clone(), lease));
    (callbacks, locks)
}

#[cfg(test)]
mod crash_tests;

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use proptest::prelude::*;
    use proto::{
        ByteRange, ClientId, Fid, InstanceNonce, LockKind, LockOwnerId, Uniquifier, VnodeId,
        VolumeId,
    };
    use state::{ClientKey, JournalMode};

    use super::{TEST_DELAYED_PER_CLIENT_MAX, test_tables};
    use crate::state_journal::TestLog;
    use state::journaled::{CallbackModel, LockEntry, Owed};

    #[derive(Clone, Debug)]
    enum Op {
        Lock {
            client: u8,
            owner: u8,
            file: u8,
            start: u8,
            len: u8,
            exclusive: bool,
        },
        Unlock {
            client: u8,
            owner: u8,
            file: u8,
            start: u8,
            len: u8,
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
            files: Vec<u8>,
        },
        Break {
            files: Vec<u8>,
            except: Option<u8>,
        },
    }

    /// Files the callback operations use (the lock operations use the first three).
    const FILES: u8 = 12;

    fn op() -> impl Strategy<Value = Op> {
        let client = 0u8..3;
        prop_oneof![
            (
                client.clone(),
                0u8..2,
                0u8..3,
                0u8..20,
                1u8..10,
                any::<bool>()
            )
                .prop_map(|(client, owner, file, start, len, exclusive)| Op::Lock {
                    client,
                    owner,
                    file,
                    start,
                    len,
                    exclusive
                }),
            (client.clone(), 0u8..2, 0u8..3, 0u8..20, 1u8..10).prop_map(
                |(client, owner, file, start, len)| Op::Unlock {
                    client,
                    owner,
                    file,
                    start,
                    len
                }
            ),
            client
                .clone()
                .prop_map(|client| Op::ReleaseClient { client }),
            // Callbacks on more files than locks, several per call: they fall in
            // different shards of the callback table.
            (client.clone(), 0..FILES).prop_map(|(client, file)| Op::Grant { client, file }),
            (client.clone(), proptest::collection::vec(0..FILES, 1..4))
                .prop_map(|(client, files)| Op::GiveUp { client, files }),
            (
                proptest::collection::vec(0..FILES, 1..4),
                proptest::option::of(client)
            )
                .prop_map(|(files, except)| Op::Break { files, except }),
        ]
    }

    fn fid(file: u8) -> Fid {
        Fid {
            volume: VolumeId(1),
            vnode: VnodeId(u64::from(file) + 2),
            unique: Uniquifier(1),
        }
    }

    fn range(start: u8, len: u8) -> ByteRange {
        ByteRange::new(u64::from(start), u64::from(start) + u64::from(len)).unwrap()
    }

    /// Runs `ops` on live tables that journal to `log`, then reopens the partition: the
    /// replayed state must equal the live one (the replayed promises exactly the live
    /// callback table's, each journaled to last at least as long).
    async fn replay_equals_live(log: &TestLog, ops: Vec<Op>, snapshot_at: usize) {
        let started_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let (partition, journal, _) = log.open(JournalMode::None);
        let (callbacks, locks) = test_tables(&journal);
        let mut keys = Vec::new();
        for _ in 0..3 {
            let (id, instance) = (ClientId::random(), InstanceNonce(1));
            let key = callbacks.sessions().recover(id, instance).unwrap();
            locks.admitted(key, id, instance);
            keys.push(key);
        }
        let key = |client: u8| keys[usize::from(client)];
        for (index, op) in ops.into_iter().enumerate() {
            if index == snapshot_at {
                super::snapshot(&callbacks, &locks, &crate::stats::Stats::default());
            }
            match op {
                Op::Lock {
                    client,
                    owner,
                    file,
                    start,
                    len,
                    exclusive,
                } => {
                    let kind = if exclusive {
                        LockKind::Exclusive
                    } else {
                        LockKind::Shared
                    };
                    let owner = LockOwnerId(u64::from(owner));
                    let _ = locks
                        .set(
                            key(client),
                            fid(file),
                            owner,
                            range(start, len),
                            kind,
                            false,
                            7,
                        )
                        .await;
                }
                Op::Unlock {
                    client,
                    owner,
                    file,
                    start,
                    len,
                } => {
                    let owner = LockOwnerId(u64::from(owner));
                    let _ = locks
                        .release(key(client), fid(file), owner, range(start, len))
                        .await;
                }
                Op::ReleaseClient { client } => {
                    locks.release_client(key(client));
                }
                Op::Grant { client, file } => {
                    assert!(callbacks.grant(key(client), fid(file)).await.is_some());
                }
                Op::GiveUp { client, files } => {
                    let fids: Vec<Fid> = files.into_iter().map(fid).collect();
                    callbacks.give_up(key(client), &fids);
                }
                Op::Break { files, except } => {
                    let fids: Vec<Fid> = files.into_iter().map(fid).collect();
                    callbacks.break_callbacks(&fids, except.map(key)).await;
                }
            }
        }
        let live_locks = locks.state();
        let mut held = BTreeSet::new();
        for file in 0..FILES {
            let (holders, _) = callbacks.inspect(fid(file));
            held.extend(holders.into_iter().map(|holder| (fid(file), holder)));
        }
        let (_, mut live_model) = callbacks.inspect(fid(0));
        // The live view keeps no copy of the promises: the table is the only one.
        assert!(live_model.promises.entries().is_empty());
        live_model.finish_replay();
        drop((callbacks, locks));
        Arc::into_inner(journal).unwrap().close();
        drop(partition);

        let (_partition, journal, replayed) = log.open(JournalMode::None);
        journal.close();
        assert_eq!(sorted(replayed.locks.clone()), sorted(live_locks.locks));
        let replayed_promises: BTreeSet<(Fid, ClientKey)> =
            replayed.callbacks.promises.keys().copied().collect();
        assert_eq!(replayed_promises, held);
        // Every grant told its client an hour; the journal must not say less.
        let hour_from_start = started_ms + 3_600_000;
        assert!(
            replayed
                .callbacks
                .promises
                .entries()
                .iter()
                .all(|&(_, expiry_ms)| expiry_ms >= hour_from_start)
        );
        // Replay does not bound the owed queues; a restore bounds them as the live
        // queues are bounded (more fids than that become a reset).
        let mut bounded = CallbackModel::new(TEST_DELAYED_PER_CLIENT_MAX);
        for (client, owed) in replayed.callbacks.owed {
            match owed {
                Owed::Reset => {
                    bounded.owed.insert(client, Owed::Reset);
                }
                Owed::Fids(fids) => bounded.push(client, fids),
            }
        }
        assert_eq!(bounded.owed, live_model.owed);
        assert_eq!(replayed.clients.len(), 3);
    }

    /// A snapshot's answer comes once the snapshot is on disk: a restarted server waits
    /// for it before serving, so that what it restored is durable in its own terms.
    #[tokio::test]
    async fn a_snapshot_answers_once_it_is_on_disk() {
        let log = TestLog::new();
        let (_partition, journal, _) = log.open(JournalMode::Sync);
        let (callbacks, locks) = test_tables(&journal);
        let (id, instance) = (ClientId::random(), InstanceNonce(1));
        let key = callbacks.sessions().recover(id, instance).unwrap();
        // A snapshot sits at the last record handed over: give it one.
        locks.admitted(key, id, instance);
        let snapshots = || {
            let dir = log.root().join(crate::storage::metadata_log::LOG_DIR);
            crate::storage::disk::Disk::list(&log.disk, &dir)
                .unwrap()
                .iter()
                .filter(|name| name.ends_with(".snap"))
                .count()
        };
        assert_eq!(snapshots(), 0);
        let written = super::snapshot(&callbacks, &locks, &crate::stats::Stats::default());
        assert!(written.wait().await);
        assert_eq!(snapshots(), 1);
        drop((callbacks, locks));
        Arc::into_inner(journal).unwrap().close();
    }

    /// Snapshots taken while requests of several clients run on other threads: each
    /// table is copied under its own locks, so the replay of the last snapshot and the
    /// records after it must still rebuild exactly the live locks and promises. The
    /// last snapshot is taken near the end of the run, while requests still run, so that
    /// few later changes cover what it may have missed; in a few rounds.
    #[test]
    fn snapshots_taken_under_concurrent_requests_replay_to_the_live_tables() {
        for round in 0..4 {
            snapshots_under_concurrent_requests(round);
        }
    }

    fn snapshots_under_concurrent_requests(round: u64) {
        const CLIENTS: usize = 4;
        const OPS: u64 = 3000;
        let log = TestLog::new();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (partition, journal, _) = log.open(JournalMode::None);
        let (callbacks, locks) = test_tables(&journal);
        let keys: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let (id, instance) = (ClientId::random(), InstanceNonce(1));
                let key = callbacks.sessions().recover(id, instance).unwrap();
                locks.admitted(key, id, instance);
                key
            })
            .collect();
        // Operations done so far by all clients; the snapshots stop shortly before the end.
        let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let total = CLIENTS as u64 * OPS;
        let stop_at = total - total / (16 << round);
        let snapshotter = {
            let (callbacks, locks, progress) = (callbacks.clone(), locks.clone(), progress.clone());
            std::thread::spawn(move || {
                let mut taken = 0;
                while progress.load(std::sync::atomic::Ordering::Acquire) < stop_at {
                    super::snapshot(&callbacks, &locks, &crate::stats::Stats::default());
                    taken += 1;
                }
                taken
            })
        };
        runtime.block_on(async {
            let workers: Vec<_> = keys
                .iter()
                .enumerate()
                .map(|(index, &key)| {
                    let (callbacks, locks) = (callbacks.clone(), locks.clone());
                    let progress = progress.clone();
                    tokio::spawn(async move {
                        // A small deterministic generator per client.
                        let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ (index as u64 + 8 * round);
                        let mut next = move |below: u64| {
                            seed = seed
                                .wrapping_mul(6_364_136_223_846_793_005)
                                .wrapping_add(1_442_695_040_888_963_407);
                            (seed >> 33) % below
                        };
                        for _ in 0..OPS {
                            let file = next(u64::from(FILES)) as u8;
                            let (start, len) = (next(40) as u8, 1 + next(20) as u8);
                            match next(5) {
                                0 | 1 => {
                                    let kind = if next(2) == 0 {
                                        LockKind::Shared
                                    } else {
                                        LockKind::Exclusive
                                    };
                                    let _ = locks
                                        .set(
                                            key,
                                            fid(file),
                                            LockOwnerId(next(3)),
                                            range(start, len),
                                            kind,
                                            false,
                                            7,
                                        )
                                        .await;
                                }
                                2 => {
                                    let _ = locks
                                        .release(
                                            key,
                                            fid(file),
                                            LockOwnerId(next(3)),
                                            range(start, len),
                                        )
                                        .await;
                                }
                                3 => assert!(callbacks.grant(key, fid(file)).await.is_some()),
                                _ => callbacks.give_up(key, &[fid(file)]),
                            }
                            progress.fetch_add(1, std::sync::atomic::Ordering::Release);
                            tokio::task::yield_now().await;
                        }
                    })
                })
                .collect();
            for worker in workers {
                worker.await.unwrap();
            }
        });
        let taken = snapshotter.join().unwrap();
        assert!(taken > 0);
        let live_locks = locks.state();
        let mut held = BTreeSet::new();
        for file in 0..FILES {
            let (holders, _) = callbacks.inspect(fid(file));
            held.extend(holders.into_iter().map(|holder| (fid(file), holder)));
        }
        drop((callbacks, locks));
        Arc::into_inner(journal).unwrap().close();
        drop(partition);

        let (_partition, journal, replayed) = log.open(JournalMode::None);
        journal.close();
        assert_eq!(sorted(replayed.locks), sorted(live_locks.locks));
        let replayed_promises: BTreeSet<(Fid, ClientKey)> =
            replayed.callbacks.promises.keys().copied().collect();
        assert_eq!(replayed_promises, held);
    }

    fn sorted(mut locks: Vec<LockEntry>) -> Vec<LockEntry> {
        locks.sort_unstable_by_key(|l| (l.fid, l.lock.owner, l.lock.range));
        locks
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn journal_replay_equals_live_tables(
            ops in proptest::collection::vec(op(), 0..60),
            snapshot_at in 0usize..80,
        ) {
            let log = TestLog::new();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(replay_equals_live(&log, ops, snapshot_at));
        }
    }
}
