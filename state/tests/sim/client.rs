//! A client of the pair: one request at a time, sent to the member it believes active,
//! retried with the same seq until it is answered, following `NotActive` hints; after a
//! change of epoch it first reclaims the locks it holds.
//! Invariant: a seq names one operation; a retry never changes it.

use std::collections::BTreeMap;

use proto::LockKind;

use crate::sim::checker::Checker;
use crate::sim::disk::Slot;
use crate::sim::message::{Msg, Node, Op, Reply};
use crate::sim::rng::Rng;

/// Slots per file and files: few, so clients contend.
const SLOTS: u64 = 3;
const FILES: u64 = 2;
/// How long a client waits for an answer before trying the other member.
const RETRY_MS: (u64, u64) = (300, 600);
const THINK_MS: (u64, u64) = (20, 300);
const NOT_ACTIVE_PAUSE_MS: u64 = 30;

/// What the client does when its timer `attempt` fires.
#[derive(Clone, Copy, Debug)]
pub struct Timer {
    pub attempt: u64,
    /// No answer came: try the other member.
    pub switch: bool,
}

pub struct Client {
    pub index: usize,
    next_seq: u64,
    next_value: u64,
    target: usize,
    epoch_known: u64,
    /// Locks held, with the epoch whose active last confirmed them.
    held: BTreeMap<Slot, (LockKind, u64)>,
    /// The operation under way and its seq, kept until it is answered.
    op: Option<(u64, Op)>,
    /// The seq of the request in flight (the operation's, or a reclaim's).
    in_flight: Option<u64>,
    /// Only the timer of the latest attempt counts.
    attempt: u64,
}

impl Client {
    pub fn new(index: usize) -> Client {
        Client {
            index,
            next_seq: 1,
            next_value: 0,
            target: index % 2,
            epoch_known: 0,
            held: BTreeMap::new(),
            op: None,
            in_flight: None,
            attempt: 0,
        }
    }

    fn seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// Arms a timer and returns it; earlier timers are void from now on.
    fn arm(&mut self, switch: bool) -> Timer {
        self.attempt += 1;
        Timer {
            attempt: self.attempt,
            switch,
        }
    }

    fn choose(&mut self, rng: &mut Rng) -> Op {
        if rng.chance(500) {
            self.next_value += 1;
            return Op::Write {
                value: self.index as u64 * 1_000_000 + self.next_value,
            };
        }
        let slot = Slot {
            file: rng.between(0, FILES - 1),
            index: rng.between(0, SLOTS - 1),
        };
        if self.held.contains_key(&slot) {
            Op::Unlock { slot }
        } else {
            let kind = if rng.chance(500) {
                LockKind::Shared
            } else {
                LockKind::Exclusive
            };
            Op::Lock { slot, kind }
        }
    }

    /// A timer fired: returns the request to send and the timer to arm after `delay`.
    pub fn on_timer(&mut self, timer: Timer, rng: &mut Rng) -> Option<(Msg, u64, Timer)> {
        if timer.attempt != self.attempt {
            return None;
        }
        if timer.switch {
            self.target = 1 - self.target;
        }
        if self.op.is_none() {
            let op = self.choose(rng);
            let seq = self.seq();
            self.op = Some((seq, op));
        }
        let stale: Vec<(Slot, LockKind)> = self
            .held
            .iter()
            .filter(|(_, (_, epoch))| *epoch < self.epoch_known)
            .map(|(&slot, &(kind, _))| (slot, kind))
            .collect();
        let (seq, op) = if stale.is_empty() {
            self.op.clone()?
        } else {
            (self.seq(), Op::Reclaim { locks: stale })
        };
        self.in_flight = Some(seq);
        let msg = Msg::Request {
            client: self.index,
            seq,
            op,
        };
        Some((msg, rng.between(RETRY_MS.0, RETRY_MS.1), self.arm(true)))
    }

    pub fn target(&self) -> Node {
        Node::Member(self.target)
    }

    /// An answer: returns the timer to arm after the delay, unless the answer is stale.
    /// An answer that does not fit the operation (a wrong recorded outcome) is an error.
    pub fn on_reply(
        &mut self,
        seq: u64,
        epoch: u64,
        reply: Reply,
        checker: &mut Checker,
        rng: &mut Rng,
    ) -> Result<Option<(u64, Timer)>, String> {
        if self.in_flight != Some(seq) {
            return Ok(None);
        }
        self.in_flight = None;
        self.epoch_known = self.epoch_known.max(epoch);
        let op = self.op.clone().map(|(_, op)| op);
        match (reply, op) {
            (Reply::NotActive { hint }, _) => {
                self.target = hint.unwrap_or(1 - self.target);
                return Ok(Some((NOT_ACTIVE_PAUSE_MS, self.arm(false))));
            }
            (Reply::Grace { retry_ms }, _) => return Ok(Some((retry_ms, self.arm(false)))),
            (Reply::Reclaimed { lost }, _) => {
                for slot in lost {
                    self.held.remove(&slot);
                }
                for (_, held_in) in self.held.values_mut() {
                    *held_in = (*held_in).max(epoch);
                }
                return Ok(Some((0, self.arm(false))));
            }
            (Reply::Written, Some(Op::Write { value })) => {
                checker.write_acked(self.index as u32, seq, value);
            }
            (Reply::Granted, Some(Op::Lock { slot, kind })) => {
                self.held.insert(slot, (kind, epoch));
            }
            (Reply::Unlocked, Some(Op::Unlock { slot })) => {
                self.held.remove(&slot);
            }
            (Reply::Conflict, Some(Op::Lock { .. })) => {}
            (reply, op) => {
                return Err(format!("client {}: answer {reply:?} to {op:?}", self.index));
            }
        }
        self.op = None;
        Ok(Some((rng.between(THINK_MS.0, THINK_MS.1), self.arm(false))))
    }
}
