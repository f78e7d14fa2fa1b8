//! Restart from the state journal, and the snapshots that keep its replay short: installs
//! the replayed callback, lock and client state in the live tables under this process's
//! client keys, and captures the live state consistently for a snapshot.
//! Invariant: a snapshot is captured with the callback tables and then the lock tables
//! locked (the one lock order; nothing takes them the other way round), and every
//! record is handed to the journal under one of those two locks, so the snapshot sits
//! exactly between two records.

use std::collections::HashMap;

use state::{ByteRange, GraceConfig, JournalMode, Lock, LockOwner};
use tracing::{debug, warn};

use crate::callbacks::Callbacks;
use crate::locks::{self, Locks};
use crate::state_journal::{Durable, StateSnapshot};
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
    let mut keys = HashMap::new();
    let mut clients = Vec::new();
    for entry in recovered.clients {
        match callbacks.recover(entry.client, entry.instance) {
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
    for entry in recovered.locks {
        let (Some(&client), Ok(range)) = (
            keys.get(&entry.client),
            ByteRange::new(entry.start, entry.end),
        ) else {
            continue;
        };
        let lock = Lock {
            owner: LockOwner {
                client,
                owner: entry.owner,
            },
            range,
            kind: locks::state_kind(entry.kind),
        };
        held.push((entry.fid, lock, entry.pid));
    }
    locks.recover(clients, held, grace, complete);
    true
}

/// Snapshots the journaled state now; the copy happens under the tables' locks, into
/// buffers made beforehand, the encoding and writing on the journal's snapshot thread.
/// The answer resolves once the snapshot is durable.
pub fn snapshot(callbacks: &Callbacks, locks: &Locks, stats: &Stats) -> Durable {
    let room = locks.snapshot_room();
    let (written, pause) = callbacks.snapshot_with(|model| locks.snapshot(model, room));
    let pause_us = u64::try_from(pause.as_micros()).unwrap_or(u64::MAX);
    stats.record_snapshot_pause(pause_us);
    debug!(pause_us, "state snapshot captured");
    written
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use proptest::prelude::*;
    use proto::{ClientId, Fid, InstanceNonce, Uniquifier, VnodeId, VolumeId};
    use state::{ByteRange, JournalMode, LockKind};

    use crate::locks::test_tables;
    use crate::state_journal::{LockEntry, StateJournal};

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

    /// Runs `ops` on live tables that journal to `dir`, then reopens the journal: the
    /// replayed state must equal the live one (the replayed promises exactly the live
    /// callback table's, each journaled to last at least as long).
    async fn replay_equals_live(dir: &std::path::Path, ops: Vec<Op>, snapshot_at: usize) {
        let started_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let (journal, _) = StateJournal::open(dir, JournalMode::None).unwrap();
        let journal = Arc::new(journal);
        let (callbacks, locks) = test_tables(&journal);
        let mut keys = Vec::new();
        for _ in 0..3 {
            let (id, instance) = (ClientId::random(), InstanceNonce(1));
            let key = callbacks.recover(id, instance).unwrap();
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
                    let owner = u64::from(owner);
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
                    let owner = u64::from(owner);
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
            held.extend(holders.into_iter().map(|holder| (fid(file), holder.0)));
        }
        let (_, mut live_model) = callbacks.inspect(fid(0));
        // The live view keeps no copy of the promises: the table is the only one.
        assert!(live_model.promises.entries().is_empty());
        live_model.finish_replay();
        drop((callbacks, locks));
        Arc::into_inner(journal).unwrap().close();

        let (journal, replayed) = StateJournal::open(dir, JournalMode::None).unwrap();
        journal.close();
        assert_eq!(sorted(replayed.locks.clone()), sorted(live_locks.locks));
        let replayed_promises: BTreeSet<(Fid, u32)> =
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
        assert_eq!(replayed.callbacks.owed, live_model.owed);
        assert_eq!(replayed.clients.len(), 3);
    }

    /// A snapshot's answer comes once the snapshot is on disk: a restarted server waits
    /// for it before serving, so that what it restored is durable in its own terms.
    #[tokio::test]
    async fn a_snapshot_answers_once_it_is_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = StateJournal::open(dir.path(), JournalMode::Sync).unwrap();
        let journal = Arc::new(journal);
        let (callbacks, locks) = test_tables(&journal);
        let (id, instance) = (ClientId::random(), InstanceNonce(1));
        let key = callbacks.recover(id, instance).unwrap();
        // A snapshot sits at the last record handed over: give it one.
        locks.admitted(key, id, instance);
        let snapshots = || {
            std::fs::read_dir(dir.path().join(crate::state_journal::STATE_DIR))
                .unwrap()
                .filter(|entry| {
                    let name = entry.as_ref().unwrap().file_name();
                    name.to_string_lossy().ends_with(".snap")
                })
                .count()
        };
        assert_eq!(snapshots(), 0);
        let written = super::snapshot(&callbacks, &locks, &crate::stats::Stats::default());
        assert!(written.wait().await);
        assert_eq!(snapshots(), 1);
        drop((callbacks, locks));
        Arc::into_inner(journal).unwrap().close();
    }

    fn sorted(mut locks: Vec<LockEntry>) -> Vec<LockEntry> {
        locks.sort_unstable_by_key(|l| (l.fid, l.client, l.owner, l.start));
        locks
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn journal_replay_equals_live_tables(
            ops in proptest::collection::vec(op(), 0..60),
            snapshot_at in 0usize..80,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(replay_equals_live(dir.path(), ops, snapshot_at));
        }
    }
}
