//! What travels between the simulated nodes. Members are named by index (`m0`, `m1` to
//! the VLDB); the reply to a lease call echoes the member's send time, which the member
//! would otherwise keep beside the call.

use proto::LockKind;
use state::{LeaseRefusal, Millis};

use crate::sim::disk::Slot;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Node {
    Vldb,
    Member(usize),
    Client(usize),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    Acquire,
    Renew,
}

#[derive(Clone, Debug)]
pub enum Op {
    Write {
        value: u64,
    },
    Lock {
        slot: Slot,
        kind: LockKind,
    },
    Unlock {
        slot: Slot,
    },
    /// After a takeover: the locks the client holds from an older epoch.
    Reclaim {
        locks: Vec<(Slot, LockKind)>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Written,
    Granted,
    Conflict,
    Unlocked,
    Reclaimed { lost: Vec<Slot> },
    Grace { retry_ms: u64 },
    NotActive { hint: Option<usize> },
}

#[derive(Clone, Debug)]
pub enum Msg {
    /// A member's lease call; `sent` is on the member's clock.
    Lease {
        call: Call,
        member: usize,
        incarnation: u64,
        epoch: u64,
        sent: Millis,
    },
    LeaseAnswer {
        call: Call,
        incarnation: u64,
        /// The epoch the call named.
        epoch: u64,
        sent: Millis,
        result: Result<u64, LeaseRefusal>,
    },
    Release {
        member: usize,
        epoch: u64,
        successor: usize,
    },
    Request {
        client: usize,
        seq: u64,
        op: Op,
    },
    Reply {
        seq: u64,
        epoch: u64,
        reply: Reply,
    },
}
