//! The lock table against a naive per-byte model: random lock, unlock, cancel and release
//! sequences from several owners on two files, checked after every step (see `run`).

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;
use proto::{ByteRange, Fid, LockKind, LockOwnerId, Uniquifier, VnodeId, VolumeId, WaitId};
use state::{ClientKey, Effect, Lock, LockOutcome, LockOwner, LockTable, LockTableConfig};

/// Bytes 0..16 one by one, and everything from 16 to EOF as one cell: every range the
/// tests draw ends at or below 16 or at EOF.
const CELLS: usize = 17;
type Cells = [Option<LockKind>; CELLS];

fn fid(n: u64) -> Fid {
    Fid {
        volume: VolumeId(1),
        vnode: VnodeId(n),
        unique: Uniquifier(1),
    }
}

fn cells(range: ByteRange) -> std::ops::Range<usize> {
    let end = if range.end() == ByteRange::EOF {
        CELLS
    } else {
        range.end() as usize
    };
    range.start() as usize..end
}

fn conflicting(a: LockKind, b: LockKind) -> bool {
    a == LockKind::Exclusive || b == LockKind::Exclusive
}

/// The naive model: per owner, the kind it holds on each cell of each file.
#[derive(Default)]
struct Model {
    held: HashMap<(Fid, LockOwner), Cells>,
    pending: BTreeMap<WaitId, (Fid, Lock)>,
}

impl Model {
    /// Whether another owner holds a byte of `lock` in a conflicting kind.
    fn blocked(&self, fid: Fid, lock: &Lock) -> bool {
        self.held.iter().any(|(&(at, owner), bytes)| {
            at == fid
                && owner != lock.owner
                && cells(lock.range)
                    .any(|cell| bytes[cell].is_some_and(|kind| conflicting(kind, lock.kind)))
        })
    }

    fn set(&mut self, fid: Fid, owner: LockOwner, range: ByteRange, kind: Option<LockKind>) {
        let bytes = self.held.entry((fid, owner)).or_insert([None; CELLS]);
        for cell in cells(range) {
            bytes[cell] = kind;
        }
    }

    /// Applies a woken grant after checking it was due and justified.
    fn woken(&mut self, effect: Effect) -> Result<(), TestCaseError> {
        let Effect::Granted {
            wait,
            fid,
            owner,
            range,
            kind,
        } = effect;
        let lock = Lock { owner, range, kind };
        prop_assert_eq!(self.pending.remove(&wait), Some((fid, lock)));
        prop_assert!(
            !self.blocked(fid, &lock),
            "woken into a conflict: {:?}",
            lock
        );
        self.set(fid, owner, range, Some(kind));
        Ok(())
    }
}

/// The table's locks as the model's cells, checking one owner's locks are disjoint
/// and merged where adjacent and of one kind.
fn table_cells(table: &LockTable) -> Result<HashMap<(Fid, LockOwner), Cells>, TestCaseError> {
    let mut held: HashMap<(Fid, LockOwner), Cells> = HashMap::new();
    let mut locks: Vec<(Fid, Lock)> = table.iter().collect();
    locks.sort_by_key(|(fid, lock)| (*fid, lock.owner, lock.range));
    for pair in locks.windows(2) {
        let ((fid_a, a), (fid_b, b)) = (pair[0], pair[1]);
        if fid_a == fid_b && a.owner == b.owner {
            prop_assert!(a.range.end() <= b.range.start(), "overlap {:?} {:?}", a, b);
            prop_assert!(
                a.range.end() < b.range.start() || a.kind != b.kind,
                "unmerged {:?} {:?}",
                a,
                b
            );
        }
    }
    prop_assert_eq!(locks.len(), table.len());
    for (fid, lock) in locks {
        let bytes = held.entry((fid, lock.owner)).or_insert([None; CELLS]);
        for cell in cells(lock.range) {
            bytes[cell] = Some(lock.kind);
        }
    }
    Ok(held)
}

#[derive(Clone, Debug)]
enum Op {
    Lock {
        fid: u64,
        owner: LockOwner,
        range: ByteRange,
        kind: LockKind,
        wait: bool,
    },
    Unlock {
        fid: u64,
        owner: LockOwner,
        range: ByteRange,
    },
    Cancel(usize),
    Release(u32),
}

fn owner() -> impl Strategy<Value = LockOwner> {
    (0..3u32, 0..2u64).prop_map(|(client, owner)| LockOwner {
        client: ClientKey(client),
        owner: LockOwnerId(owner),
    })
}

fn range() -> impl Strategy<Value = ByteRange> {
    (0..16u64, 1..=17u64).prop_map(|(start, length)| {
        let end = if start + length > 16 {
            ByteRange::EOF
        } else {
            start + length
        };
        ByteRange::new(start, end).expect("length is at least one")
    })
}

fn kind() -> impl Strategy<Value = LockKind> {
    prop_oneof![Just(LockKind::Shared), Just(LockKind::Exclusive)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..2u64, owner(), range(), kind(), any::<bool>()).prop_map(
            |(fid, owner, range, kind, wait)| Op::Lock { fid, owner, range, kind, wait }
        ),
        3 => (0..2u64, owner(), range()).prop_map(|(fid, owner, range)| Op::Unlock {
            fid,
            owner,
            range
        }),
        1 => any::<usize>().prop_map(Op::Cancel),
        1 => (0..3u32).prop_map(Op::Release),
    ]
}

/// Runs `ops` on a table and the model. Checked after every step: the table holds
/// exactly the model's locks, no two owners hold conflicting bytes, every grant
/// (immediate or woken) was justified when made, every refusal names a real obstacle,
/// and, with room to spare, no queued request is left waiting that nothing holds back.
fn run(config: LockTableConfig, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let roomy = config.lock_count_max >= 1000 && config.waiter_count_max >= 1000;
    let (lock_count_max, waiter_count_max) = (config.lock_count_max, config.waiter_count_max);
    let mut table = LockTable::new(config);
    let mut model = Model::default();
    for op in ops {
        let effects = match op {
            Op::Lock {
                fid: n,
                owner,
                range,
                kind,
                wait,
            } => {
                let request = Lock { owner, range, kind };
                let obstacle = table.test(fid(n), owner, range, kind);
                let reply = table.lock(fid(n), owner, range, kind, wait);
                match reply.outcome {
                    LockOutcome::Granted => {
                        prop_assert_eq!(obstacle, None);
                        prop_assert!(!model.blocked(fid(n), &request));
                        model.set(fid(n), owner, range, Some(kind));
                    }
                    LockOutcome::Conflict { holder } => {
                        prop_assert!(!wait);
                        prop_assert_eq!(obstacle, Some(holder));
                        prop_assert!(holder.conflicts(&request));
                        let is_held =
                            model
                                .held
                                .get(&(fid(n), holder.owner))
                                .is_some_and(|bytes| {
                                    cells(holder.range).all(|c| bytes[c] == Some(holder.kind))
                                });
                        let is_queued = model.pending.values().any(|q| *q == (fid(n), holder));
                        prop_assert!(is_held || is_queued, "phantom holder {:?}", holder);
                    }
                    LockOutcome::Queued(id) => {
                        prop_assert!(wait);
                        prop_assert!(obstacle.is_some());
                        prop_assert!(model.pending.insert(id, (fid(n), request)).is_none());
                    }
                    LockOutcome::TooMany => prop_assert!(!roomy),
                }
                reply.effects
            }
            Op::Unlock {
                fid: n,
                owner,
                range,
            } => match table.unlock(fid(n), owner, range) {
                Ok(effects) => {
                    model.set(fid(n), owner, range, None);
                    effects
                }
                Err(_) => {
                    prop_assert!(!roomy);
                    Vec::new()
                }
            },
            Op::Cancel(index) => {
                let Some(&id) = model.pending.keys().nth(index % model.pending.len().max(1)) else {
                    continue;
                };
                model.pending.remove(&id);
                table.cancel_wait(id)
            }
            Op::Release(client) => {
                model.held.retain(|(_, owner), _| owner.client.0 != client);
                model
                    .pending
                    .retain(|_, (_, lock)| lock.owner.client.0 != client);
                table.release_client(ClientKey(client))
            }
        };
        for effect in effects {
            model.woken(effect)?;
        }

        // The table holds exactly what the model says, and nothing conflicts.
        model
            .held
            .retain(|_, bytes| bytes.iter().any(Option::is_some));
        prop_assert_eq!(&table_cells(&table)?, &model.held);
        for (&(fid, owner), bytes) in &model.held {
            for (&(other_fid, other), other_bytes) in &model.held {
                if fid != other_fid || owner == other {
                    continue;
                }
                for cell in 0..CELLS {
                    if let (Some(a), Some(b)) = (bytes[cell], other_bytes[cell]) {
                        prop_assert!(!conflicting(a, b), "{owner:?} and {other:?} at {cell}");
                    }
                }
            }
        }
        prop_assert!(table.len() <= lock_count_max);
        prop_assert!(table.waiter_count() <= waiter_count_max);
        let queued: BTreeMap<WaitId, (Fid, Lock)> = table
            .waiters()
            .map(|(fid, wait, lock)| (wait, (fid, lock)))
            .collect();
        prop_assert_eq!(&queued, &model.pending);

        // With room to spare, every queued request is held back by a conflicting
        // lock, or by a conflicting request ahead of it that does not wait on it.
        if roomy {
            let mut ahead: Vec<(WaitId, Fid, Lock)> = Vec::new();
            let mut waiters: Vec<(Fid, WaitId, Lock)> = table.waiters().collect();
            waiters.sort_by_key(|&(fid, wait, _)| (fid, wait));
            for (fid, wait, lock) in waiters {
                let by_lock = model.blocked(fid, &lock);
                let by_queue = ahead.iter().any(|(_, at, earlier)| {
                    *at == fid
                        && earlier.conflicts(&lock)
                        && !table.iter().any(|(f, held)| {
                            f == fid && held.owner == lock.owner && held.conflicts(earlier)
                        })
                });
                prop_assert!(by_lock || by_queue, "{wait:?} {lock:?} left waiting");
                ahead.push((wait, fid, lock));
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_sequences_match_the_model(ops in proptest::collection::vec(op(), 1..120)) {
        run(LockTableConfig::default(), ops)?;
    }

    #[test]
    fn random_sequences_stay_within_tight_bounds(
        lock_count_max in 1..8usize,
        lock_count_per_fid_max in 1..6usize,
        waiter_count_max in 0..4usize,
        waiter_count_per_fid_max in 0..3usize,
        ops in proptest::collection::vec(op(), 1..120),
    ) {
        run(
            LockTableConfig {
                lock_count_max,
                lock_count_per_fid_max,
                waiter_count_max,
                waiter_count_per_fid_max,
            },
            ops,
        )?;
    }
}
