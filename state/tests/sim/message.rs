//! What travels between the simulated nodes. Members are named by index (`m0`, `m1` to
//! the VLDB); the reply to a lease call echoes the member's send time, which the member
//! would otherwise keep beside the call.

use std::time::Duration;

use proto::LockKind;
use state::{LeaseRefusal, Millis};

use crate::sim::disk::Slot;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Node {
    /// The single VLDB.
    Vldb,
    /// One replica of the replicated VLDB.
    Replica(usize),
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
    /// A replica that does not lead, or leads but has not yet applied its predecessors'
    /// entries, turns a lease call away; `hint` is the replica it believes leads.
    NotLeader {
        from: usize,
        incarnation: u64,
        hint: Option<usize>,
    },
    /// Between the replicas of the replicated VLDB.
    Raft(Raft),
}

/// A pair decision as the replicated VLDB's log carries it: the leader checked it on its
/// clock; every replica applies it on its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Acquire {
        member: usize,
        epoch: u64,
        /// The `PairLease::seq` the leader's check saw.
        seq: u64,
        lease: Duration,
    },
    Renew {
        member: usize,
        epoch: u64,
        lease: Duration,
    },
    Release {
        member: usize,
        epoch: u64,
        successor: usize,
    },
}

/// One log entry; a leader's first entry of its term carries no command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub term: u64,
    pub command: Option<Command>,
}

/// A leader's append: `entries` follow `prev_index`, which must hold `prev_term`.
#[derive(Clone, Debug)]
pub struct Append {
    pub term: u64,
    pub leader: usize,
    pub prev_index: u64,
    pub prev_term: u64,
    pub entries: Vec<Entry>,
    /// The leader's commit index.
    pub commit: u64,
}

/// The Raft messages, as in the paper's figure 2 (no snapshots: the log is never
/// compacted). Indexes count from 1; index 0 is the empty log's.
#[derive(Clone, Debug)]
pub enum Raft {
    Vote {
        term: u64,
        candidate: usize,
        last_index: u64,
        last_term: u64,
    },
    VoteAnswer {
        term: u64,
        from: usize,
        granted: bool,
    },
    Append(Append),
    AppendAnswer {
        term: u64,
        from: usize,
        /// On success the index the follower's log now matches up to; on failure its
        /// last index, so the leader skips back at once.
        index: u64,
        success: bool,
    },
}
