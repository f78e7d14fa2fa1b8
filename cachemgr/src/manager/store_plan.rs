//! `StorePlan`: which dirty chunks go in which `StoreData`, how many bytes of them are in
//! flight at once, and whether the `Fsync` follows.
//! Invariant: a plan ends exactly once, only when no store is in flight, starts no store
//! after a failure, and never has more than `STORE_WINDOW_BYTES` (nor
//! `STORES_IN_FLIGHT_MAX` stores) in flight.

use std::collections::VecDeque;
use std::ops::Range;

use proto::DataVersion;

use super::fs_error::{FsError, FsResult};
use crate::chunk_index::CHUNK_BYTES;

/// Most bytes one `StoreData` carries: whole chunks. The server commits every store's
/// metadata durably on its own (or shares a commit with the stores queued behind it),
/// so fewer, larger stores mean fewer commits: profiled on a 256 MiB write-back, stores
/// of one chunk cost ~160 commits of `meta.redb`, most of the write-back's time. It
/// must fit in a frame.
pub(super) const STORE_BYTES_MAX: u64 = 2 * CHUNK_BYTES;
/// Bytes of one write-back's stores in flight at once: the window its data streams to
/// the server through, so the next stores are on the wire and queued at the server
/// while it writes one, and the disk (which the server starts writing each store to at
/// once) never waits for the network. Bounded, because the `--timeout` of the last
/// store counts the sending of those ahead of it on the one connection, and callback
/// breaks and lock pushes wait behind them: 8 MiB take a few milliseconds.
pub(super) const STORE_WINDOW_BYTES: u64 = 4 * STORE_BYTES_MAX;
/// Stores in flight at once however small they are (scattered short chunks): each is a
/// request the server queues and a task here.
pub(super) const STORES_IN_FLIGHT_MAX: usize = 8;
const _: () = assert!(
    STORE_BYTES_MAX >= CHUNK_BYTES
        && STORE_BYTES_MAX + 64 * 1024 <= proto::frame::FRAME_BYTES_MAX_DEFAULT as u64
        && STORE_WINDOW_BYTES >= STORE_BYTES_MAX
);

/// One `StoreData`: the dirty chunks at `chunks` in the plan's list, which hold the
/// file's bytes `offset..offset + bytes`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Store {
    pub chunks: Range<usize>,
    pub offset: u64,
    pub bytes: u64,
}

/// What follows the stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Then {
    /// Nothing: the stores are acknowledged, not yet durable (a truncation, or a cache
    /// full of unstored writes, stores ahead of the close).
    Return,
    /// The one `Fsync` of a close or fsync: when this write-back stores anything, or
    /// `unsynced` says an earlier one stored something no `Fsync` has made durable.
    Sync { unsynced: bool },
}

/// What the data path does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect<R> {
    /// Read the chunks and send them as one `StoreData`, then tell the plan `sent`, or
    /// `not_sent` when they could not be read. Several may be asked for before any
    /// answer (the window), and answered in any order.
    Store(Store),
    /// A store's chunks are on the server at `version`: they are clean.
    MarkClean {
        chunks: Range<usize>,
        version: DataVersion,
    },
    /// The stores are over: `reply`, the answer with the highest version, is the file
    /// after `changes` stores of this client's own (every store moves the version by one).
    Absorb { changes: u64, reply: R },
    /// Every dirty chunk was stored.
    AllStored,
    /// Send the one `Fsync`; its answer ends the write-back.
    Fsync,
    /// The write-back ends here, with its first failure if one happened.
    Done(FsResult<()>),
}

/// The write-back of one file, fed the outcome of each store it asks for. `R` is a
/// store's answer, kept only to be handed back in `Effect::Absorb`. Pure (no I/O, clock
/// or task), so it is tested by the exact effects it emits.
#[derive(Debug)]
pub struct StorePlan<R> {
    pending: VecDeque<Store>,
    planned: usize,
    in_flight: usize,
    bytes_in_flight: u64,
    changes: u64,
    highest: Option<(DataVersion, R)>,
    failure: Option<FsError>,
    then: Then,
}

impl<R> StorePlan<R> {
    /// Plans the stores of a file's dirty chunks, given as `(index, len)` in index order.
    pub fn new(dirty: &[(u64, u64)], then: Then) -> StorePlan<R> {
        let pending: VecDeque<Store> = store_runs(dirty)
            .into_iter()
            .map(|run| Store {
                offset: dirty[run.start].0 * CHUNK_BYTES,
                bytes: dirty[run.clone()].iter().map(|&(_, len)| len).sum(),
                chunks: run,
            })
            .collect();
        StorePlan {
            planned: pending.len(),
            pending,
            in_flight: 0,
            bytes_in_flight: 0,
            changes: 0,
            highest: None,
            failure: None,
            then,
        }
    }

    /// No store to send: the plan can only end (with the `Fsync` an earlier write-back
    /// left owed, or without).
    pub fn is_empty(&self) -> bool {
        self.planned == 0
    }

    pub fn start(&mut self) -> Vec<Effect<R>> {
        self.next()
    }

    /// The store last asked for is on its way.
    pub fn sent(&mut self) -> Vec<Effect<R>> {
        self.next()
    }

    /// `store`, the one last asked for, could not be read, so it was not sent.
    pub fn not_sent(&mut self, store: &Store, error: FsError) -> Vec<Effect<R>> {
        self.failed(store, error)
    }

    /// `store` was answered: the file is at `version`.
    pub fn stored(&mut self, store: &Store, version: DataVersion, reply: R) -> Vec<Effect<R>> {
        self.landed(store);
        self.changes += 1;
        if self.highest.as_ref().is_none_or(|(h, _)| *h < version) {
            self.highest = Some((version, reply));
        }
        let mut effects = vec![Effect::MarkClean {
            chunks: store.chunks.clone(),
            version,
        }];
        effects.extend(self.next());
        effects
    }

    /// `store`, in flight, failed. No store starts after a failure; those in flight are
    /// awaited, so none is still travelling when the caller goes on (to truncate).
    pub fn failed(&mut self, store: &Store, error: FsError) -> Vec<Effect<R>> {
        self.landed(store);
        self.failure.get_or_insert(error);
        self.next()
    }

    fn landed(&mut self, store: &Store) {
        self.in_flight -= 1;
        self.bytes_in_flight -= store.bytes;
    }

    /// The next store while the window has room for it, or the end once none is in
    /// flight.
    fn next(&mut self) -> Vec<Effect<R>> {
        if self.failure.is_none()
            && self.in_flight < STORES_IN_FLIGHT_MAX
            && let Some(store) = self.pending.front()
            && self.bytes_in_flight + store.bytes <= STORE_WINDOW_BYTES
            && let Some(store) = self.pending.pop_front()
        {
            self.in_flight += 1;
            self.bytes_in_flight += store.bytes;
            return vec![Effect::Store(store)];
        }
        if self.in_flight > 0 {
            return Vec::new();
        }
        self.end()
    }

    fn end(&mut self) -> Vec<Effect<R>> {
        let mut effects = Vec::new();
        if let Some((_, reply)) = self.highest.take() {
            effects.push(Effect::Absorb {
                changes: self.changes,
                reply,
            });
        }
        if let Some(error) = self.failure {
            effects.push(Effect::Done(Err(error)));
            return effects;
        }
        if self.planned > 0 {
            effects.push(Effect::AllStored);
        }
        effects.push(match self.then {
            Then::Sync { unsynced } if unsynced || self.planned > 0 => Effect::Fsync,
            Then::Return | Then::Sync { .. } => Effect::Done(Ok(())),
        });
        effects
    }
}

/// Splits a file's dirty chunks, given as `(index, len)` in index order, into the runs
/// one `StoreData` each carries: adjacent chunks of which all but the last are full (so
/// the run is one contiguous range of the file), at most `STORE_BYTES_MAX` in all.
fn store_runs(chunks: &[(u64, u64)]) -> Vec<Range<usize>> {
    let mut runs = Vec::new();
    let mut start = 0;
    for i in 1..=chunks.len() {
        let ends_run = match chunks.get(i) {
            None => true,
            Some(&(index, _)) => {
                let (previous_index, previous_len) = chunks[i - 1];
                index != previous_index + 1
                    || previous_len != CHUNK_BYTES
                    || (i + 1 - start) as u64 * CHUNK_BYTES > STORE_BYTES_MAX
            }
        };
        if ends_run {
            runs.push(start..i);
            start = i;
        }
    }
    runs
}

#[cfg(test)]
mod tests;
