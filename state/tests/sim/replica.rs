//! One replica of the replicated VLDB: a small Raft whose state machine is the real
//! `PairLease`, each entry applied on the replica's own clock.
//! Invariant (`Decider::Correct`): a leader decides about the pair only once it has applied
//! every entry before its term's first, and answers only what it committed and applied.

use std::collections::BTreeMap;

use state::{LeaseRefusal, Millis, PairLease};

use crate::sim::checker::Checker;
use crate::sim::member::{self, LEASE, RATE_PPM};
use crate::sim::message::{Append, Call, Command, Entry, Msg, Node, Raft};
use crate::sim::rng::Rng;

pub const REPLICAS: usize = 3;
const MAJORITY: usize = REPLICAS / 2 + 1;
/// The leader's heartbeat, which also carries entries to followers that lag.
pub const HEARTBEAT_MS: u64 = 100;
/// A follower that hears no leader for this long (drawn anew each time) stands.
const ELECTION_MS: (u64, u64) = (400, 800);
const BATCH_MAX: usize = 64;
/// A replica writes its vote and appended entries to disk before it answers for them.
const SYNC_MS: (u64, u64) = (1, 30);

/// How the leader decides and the replicas apply. The broken variants exist to show that
/// the checker catches what they do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(
    dead_code,
    reason = "pair_sim's build of this module never replicates the VLDB"
)]
pub enum Decider {
    /// The design: the leader decides once it has applied up to its term's first entry,
    /// on its own clock; every replica applies with the `seq` the decision saw.
    Correct,
    /// A new leader decides at once and believes every lease expired the moment it is
    /// elected, as if it had loaded the pairs without their expiries.
    GrantsAtOnce,
    /// The apply compares the pair's own `seq` with itself: an acquire decided before a
    /// renewal was applied still succeeds after it.
    IgnoresSeq,
}

/// What a replica's handlers need from the world.
pub struct Ctx<'a> {
    pub now: u64,
    pub out: Vec<(Node, Msg)>,
    /// Sent once what they answer for is on disk: `Replica::sync_ms` later.
    pub synced: Vec<(Node, Msg)>,
    pub checker: &'a mut Checker,
    pub rng: &'a mut Rng,
}

/// A member's call the leader proposed: answered when its entry is applied.
struct Pending {
    call: Call,
    member: usize,
    incarnation: u64,
    epoch: u64,
    sent: Millis,
}

enum Role {
    Follower,
    Candidate { votes: Vec<usize> },
    Leader(Box<Leading>),
}

struct Leading {
    next: [u64; REPLICAS],
    matched: [u64; REPLICAS],
    /// The index of this term's first entry: no pair decision before it is applied.
    start: u64,
    /// Entry index -> the call it answers. Dropped when leadership is lost.
    pending: BTreeMap<u64, Pending>,
}

pub struct Replica {
    pub index: usize,
    pub up: bool,
    /// Bumped at each crash: timers of a dead process are dropped.
    pub incarnation: u64,
    /// While `now < paused_until` the process is stopped (SIGSTOP): its events wait.
    pub paused_until: u64,
    decider: Decider,
    /// The replica's monotonic clock: `offset + now * rate_ppm / 1e6`; a restart draws a
    /// new offset, as a new process would.
    rate_ppm: u64,
    offset: u64,
    /// How long this replica's disk takes to make its term, vote and log durable.
    pub sync_ms: u64,
    // Durable: term, vote and log, and the state machine as of the last applied entry.
    term: u64,
    voted_for: Option<usize>,
    log: Vec<Entry>,
    saved: (PairLease, u64),
    initial: PairLease,
    // Volatile.
    role: Role,
    leader: Option<usize>,
    commit: u64,
    applied: u64,
    pair: PairLease,
    election_due: u64,
}

impl Replica {
    /// `pair` is the state every replica starts from: the members joined, epoch 0.
    pub fn new(index: usize, decider: Decider, pair: PairLease, rng: &mut Rng) -> Replica {
        Replica {
            index,
            up: true,
            incarnation: 0,
            paused_until: 0,
            decider,
            rate_ppm: rng.between(RATE_PPM.0, RATE_PPM.1),
            offset: rng.between(0, 1_000_000),
            sync_ms: rng.between(SYNC_MS.0, SYNC_MS.1),
            term: 0,
            voted_for: None,
            log: Vec::new(),
            saved: (pair.clone(), 0),
            initial: pair.clone(),
            role: Role::Follower,
            leader: None,
            commit: 0,
            applied: 0,
            pair,
            election_due: rng.between(ELECTION_MS.0, ELECTION_MS.1),
        }
    }

    fn local(&self, now: u64) -> Millis {
        Millis(self.offset + now * self.rate_ppm / 1_000_000)
    }

    /// The term, if this replica believes it leads.
    pub fn leads(&self) -> Option<u64> {
        matches!(self.role, Role::Leader(_)).then_some(self.term)
    }

    fn last_index(&self) -> u64 {
        self.log.len() as u64
    }

    fn term_at(&self, index: u64) -> u64 {
        match index {
            0 => 0,
            i => self.log[(i - 1) as usize].term,
        }
    }

    fn election_timeout(&self, ctx: &mut Ctx) -> u64 {
        ctx.now + ctx.rng.between(ELECTION_MS.0, ELECTION_MS.1)
    }

    pub fn crash(&mut self) {
        self.up = false;
        self.paused_until = 0;
        self.incarnation += 1;
        self.role = Role::Follower;
        self.leader = None;
    }

    /// Term, vote and log survive. The state machine is either loaded as of the last
    /// applied entry, with each holder given one whole lease from now (`restarted`), or
    /// rebuilt from the log as the commit index becomes known again.
    pub fn restart(&mut self, ctx: &mut Ctx) {
        self.up = true;
        self.offset = ctx.rng.between(0, 1_000_000);
        self.election_due = self.election_timeout(ctx);
        if ctx.rng.chance(500) {
            let (pair, applied) = self.saved.clone();
            self.pair = pair;
            self.pair.restarted(LEASE, self.local(ctx.now));
            self.applied = applied;
        } else {
            self.pair = self.initial.clone();
            self.applied = 0;
        }
        self.commit = self.applied;
        ctx.checker.stats.replica_restarts += 1;
    }

    /// The periodic tick: a leader sends heartbeats (with any entries a follower lacks);
    /// anyone else stands for election once it has heard no leader for a timeout.
    pub fn tick(&mut self, ctx: &mut Ctx) {
        if matches!(self.role, Role::Leader(_)) {
            self.broadcast(ctx);
        } else if ctx.now >= self.election_due {
            self.term += 1;
            self.voted_for = Some(self.index);
            self.role = Role::Candidate {
                votes: vec![self.index],
            };
            self.leader = None;
            self.election_due = self.election_timeout(ctx);
            let vote = Raft::Vote {
                term: self.term,
                candidate: self.index,
                last_index: self.last_index(),
                last_term: self.term_at(self.last_index()),
            };
            for peer in self.peers() {
                ctx.out.push((Node::Replica(peer), Msg::Raft(vote.clone())));
            }
        }
    }

    fn peers(&self) -> impl Iterator<Item = usize> + use<> {
        let me = self.index;
        (0..REPLICAS).filter(move |&r| r != me)
    }

    fn broadcast(&mut self, ctx: &mut Ctx) {
        for peer in self.peers() {
            self.send_append(ctx, peer);
        }
    }

    fn send_append(&self, ctx: &mut Ctx, peer: usize) {
        let Role::Leader(leading) = &self.role else {
            return;
        };
        let prev_index = leading.next[peer] - 1;
        let end = self.log.len().min(prev_index as usize + BATCH_MAX);
        let append = Raft::Append(Append {
            term: self.term,
            leader: self.index,
            prev_index,
            prev_term: self.term_at(prev_index),
            entries: self.log[prev_index as usize..end].to_vec(),
            commit: self.commit,
        });
        ctx.out.push((Node::Replica(peer), Msg::Raft(append)));
    }

    /// A newer term seen anywhere: adopt it and follow (whom, the next append says).
    fn observe(&mut self, term: u64) {
        if term > self.term {
            self.term = term;
            self.voted_for = None;
            self.role = Role::Follower;
            self.leader = None;
        }
    }

    pub fn on_raft(&mut self, ctx: &mut Ctx, msg: Raft) -> Result<(), String> {
        match msg {
            Raft::Vote {
                term,
                candidate,
                last_index,
                last_term,
            } => {
                self.observe(term);
                let mine = (self.term_at(self.last_index()), self.last_index());
                let granted = term == self.term
                    && self.voted_for.is_none_or(|v| v == candidate)
                    && (last_term, last_index) >= mine;
                if granted {
                    self.voted_for = Some(candidate);
                    self.election_due = self.election_timeout(ctx);
                }
                let answer = Raft::VoteAnswer {
                    term: self.term,
                    from: self.index,
                    granted,
                };
                ctx.synced
                    .push((Node::Replica(candidate), Msg::Raft(answer)));
                Ok(())
            }
            Raft::VoteAnswer {
                term,
                from,
                granted,
            } => {
                self.observe(term);
                if let Role::Candidate { votes } = &mut self.role
                    && term == self.term
                    && granted
                    && !votes.contains(&from)
                {
                    votes.push(from);
                    if votes.len() >= MAJORITY {
                        self.lead(ctx)?;
                    }
                }
                Ok(())
            }
            Raft::Append(append) => self.on_append(ctx, append),
            Raft::AppendAnswer {
                term,
                from,
                index,
                success,
            } => {
                self.observe(term);
                if term != self.term {
                    return Ok(());
                }
                let Role::Leader(leading) = &mut self.role else {
                    return Ok(());
                };
                if success {
                    leading.matched[from] = leading.matched[from].max(index);
                    leading.next[from] = leading.next[from].max(index + 1);
                    self.advance_commit(ctx)?;
                    if index < self.last_index() {
                        self.send_append(ctx, from);
                    }
                } else {
                    let back = (leading.next[from] - 1).min(index + 1);
                    leading.next[from] = back.max(leading.matched[from] + 1);
                    self.send_append(ctx, from);
                }
                Ok(())
            }
        }
    }

    /// Won the election: append this term's first entry (a blank one) and announce it.
    fn lead(&mut self, ctx: &mut Ctx) -> Result<(), String> {
        ctx.checker.leader_elected(self.term, self.index)?;
        self.log.push(Entry {
            term: self.term,
            command: None,
        });
        let start = self.last_index();
        let mut matched = [0; REPLICAS];
        matched[self.index] = start;
        self.role = Role::Leader(Box::new(Leading {
            next: [start; REPLICAS],
            matched,
            start,
            pending: BTreeMap::new(),
        }));
        self.leader = Some(self.index);
        if self.decider == Decider::GrantsAtOnce {
            self.pair.expires = Millis(0);
        }
        self.broadcast(ctx);
        Ok(())
    }

    fn on_append(&mut self, ctx: &mut Ctx, append: Append) -> Result<(), String> {
        let Append {
            term,
            leader,
            prev_index,
            prev_term,
            entries,
            commit,
        } = append;
        self.observe(term);
        let answer = |replica: &Replica, index: u64, success: bool| {
            let answer = Raft::AppendAnswer {
                term: replica.term,
                from: replica.index,
                index,
                success,
            };
            (Node::Replica(leader), Msg::Raft(answer))
        };
        if term < self.term {
            ctx.out.push(answer(self, self.last_index(), false));
            return Ok(());
        }
        if matches!(self.role, Role::Leader(_)) {
            return Err(format!(
                "r{} leads term {term} and got an append from r{leader} in it",
                self.index
            ));
        }
        self.role = Role::Follower;
        self.leader = Some(leader);
        self.election_due = self.election_timeout(ctx);
        if prev_index > self.last_index() || self.term_at(prev_index) != prev_term {
            let back = self.last_index().min(prev_index.saturating_sub(1));
            ctx.out.push(answer(self, back, false));
            return Ok(());
        }
        let matched = prev_index + entries.len() as u64;
        for (index, entry) in (prev_index + 1..).zip(entries) {
            if index <= self.last_index() {
                if self.term_at(index) == entry.term {
                    continue;
                }
                if index <= self.commit {
                    return Err(format!(
                        "r{} would truncate its committed entry {index}",
                        self.index
                    ));
                }
                ctx.checker.stats.truncated += self.last_index() - index + 1;
                self.log.truncate((index - 1) as usize);
            }
            self.log.push(entry);
        }
        self.commit = self.commit.max(commit.min(matched));
        self.apply(ctx)?;
        ctx.synced.push(answer(self, matched, true));
        Ok(())
    }

    /// Commits the newest entry of this term that a majority holds (Raft §5.4.2: an
    /// older term's entry is committed only beneath one of the current term).
    fn advance_commit(&mut self, ctx: &mut Ctx) -> Result<(), String> {
        let Role::Leader(leading) = &mut self.role else {
            return Ok(());
        };
        leading.matched[self.index] = self.log.len() as u64;
        let majority = (self.commit + 1..=self.log.len() as u64).rev().find(|&n| {
            self.log[(n - 1) as usize].term == self.term
                && leading.matched.iter().filter(|&&m| m >= n).count() >= MAJORITY
        });
        if let Some(n) = majority {
            self.commit = n;
            self.apply(ctx)?;
        }
        Ok(())
    }

    /// Applies the committed entries in order, each on this replica's clock now, and
    /// answers the calls this leader proposed.
    fn apply(&mut self, ctx: &mut Ctx) -> Result<(), String> {
        while self.applied < self.commit {
            self.applied += 1;
            let index = self.applied;
            let entry = self.log[(index - 1) as usize].clone();
            let now = self.local(ctx.now);
            let result = entry
                .command
                .map(|command| self.apply_command(command, now));
            ctx.checker
                .applied(self.index, index, entry.term, &self.pair)?;
            self.saved = (self.pair.clone(), index);
            let Role::Leader(leading) = &mut self.role else {
                continue;
            };
            let (Some(pending), Some(result)) = (leading.pending.remove(&index), result) else {
                continue;
            };
            if entry.term != self.term {
                return Err(format!(
                    "r{} answers entry {index} of term {} in term {}",
                    self.index, entry.term, self.term
                ));
            }
            match (pending.call, &result) {
                (Call::Acquire, Ok(epoch)) => ctx.checker.vldb_told(*epoch, pending.member)?,
                (Call::Renew, Ok(_)) => ctx.checker.stats.renewals += 1,
                _ => {}
            }
            self.answer(ctx, &pending, result);
        }
        Ok(())
    }

    fn apply_command(&mut self, command: Command, now: Millis) -> Result<u64, LeaseRefusal> {
        match command {
            Command::Acquire {
                member,
                epoch,
                seq,
                lease,
            } => {
                let seq = match self.decider {
                    Decider::IgnoresSeq => self.pair.seq,
                    _ => seq,
                };
                self.pair
                    .apply_acquire(&member::name(member), epoch, seq, lease, now)
            }
            Command::Renew {
                member,
                epoch,
                lease,
            } => self
                .pair
                .apply_renew(&member::name(member), epoch, lease, now)
                .map(|()| epoch),
            Command::Release {
                member,
                epoch,
                successor,
            } => {
                let successor = member::name(successor);
                self.pair
                    .apply_release(&member::name(member), epoch, Some(&successor), now)
                    .map(|()| epoch)
            }
        }
    }

    fn answer(&self, ctx: &mut Ctx, pending: &Pending, result: Result<u64, LeaseRefusal>) {
        let answer = Msg::LeaseAnswer {
            call: pending.call,
            incarnation: pending.incarnation,
            epoch: pending.epoch,
            sent: pending.sent,
            result,
        };
        ctx.out.push((Node::Member(pending.member), answer));
    }

    /// Whether this replica may decide about the pair now: it leads, and (unless broken)
    /// has applied every entry up to its term's first. Otherwise it turns the call away.
    fn ready(&mut self, ctx: &mut Ctx, member: usize, incarnation: u64) -> bool {
        let hint = match &self.role {
            Role::Leader(leading)
                if self.applied >= leading.start || self.decider == Decider::GrantsAtOnce =>
            {
                return true;
            }
            Role::Leader(_) => {
                ctx.checker.stats.unready += 1;
                Some(self.index)
            }
            _ => self.leader,
        };
        let answer = Msg::NotLeader {
            from: self.index,
            incarnation,
            hint,
        };
        ctx.out.push((Node::Member(member), answer));
        false
    }

    /// A member's acquire or renewal: the leader checks it on its own clock and proposes
    /// it; a refusal is answered at once (a refusal only ever makes a member stop).
    pub fn on_lease(
        &mut self,
        ctx: &mut Ctx,
        call: Call,
        member: usize,
        incarnation: u64,
        epoch: u64,
        sent: Millis,
    ) {
        if !self.ready(ctx, member, incarnation) {
            return;
        }
        let now = self.local(ctx.now);
        let name = member::name(member);
        let checked = match call {
            Call::Acquire => self
                .pair
                .check_acquire(&name, epoch, LEASE, now)
                .map(|seq| Command::Acquire {
                    member,
                    epoch,
                    seq,
                    lease: LEASE,
                }),
            Call::Renew => {
                self.pair
                    .check_renew(&name, epoch, LEASE, now)
                    .map(|()| Command::Renew {
                        member,
                        epoch,
                        lease: LEASE,
                    })
            }
        };
        let pending = Pending {
            call,
            member,
            incarnation,
            epoch,
            sent,
        };
        match checked {
            Ok(command) => self.propose(ctx, command, Some(pending)),
            Err(refusal) => self.answer(ctx, &pending, Err(refusal)),
        }
    }

    /// A planned switchover's release: proposed if the caller holds the lease; never
    /// answered (the releasing member stopped acting before it sent it).
    pub fn on_release(&mut self, ctx: &mut Ctx, member: usize, epoch: u64, successor: usize) {
        let ready = match &self.role {
            Role::Leader(leading) => {
                self.applied >= leading.start || self.decider == Decider::GrantsAtOnce
            }
            _ => false,
        };
        let now = self.local(ctx.now);
        if ready && self.pair.holds(&member::name(member), epoch, now) {
            let release = Command::Release {
                member,
                epoch,
                successor,
            };
            self.propose(ctx, release, None);
        }
    }

    fn propose(&mut self, ctx: &mut Ctx, command: Command, pending: Option<Pending>) {
        self.log.push(Entry {
            term: self.term,
            command: Some(command),
        });
        let index = self.last_index();
        if let (Role::Leader(leading), Some(pending)) = (&mut self.role, pending) {
            leading.pending.insert(index, pending);
        }
        self.broadcast(ctx);
    }
}
