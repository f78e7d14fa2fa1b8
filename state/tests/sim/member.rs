//! One member of the pair: the real `MemberLease` decides when it may act, the real
//! `Journal`, `LockTable` and `Grace` hold what it does while active.
//! Invariant (`Correct` variant): before every reply and write the member checks its
//! lease on its own clock and, if it is gone, demotes itself without writing anything.

use std::time::Duration;

use state::{
    ClientKey, Grace, GraceCheck, GraceConfig, Journal, LeaseRefusal, Lock, LockOutcome,
    MemberLease, Millis,
};

use crate::sim::checker::Checker;
use crate::sim::disk::{self, Outcome, Record, Replayed, Slot, owner};
use crate::sim::message::{Call, Msg, Node, Op, Reply};
use crate::sim::rng::Rng;
use state::journal::MemVfs;

pub const LEASE: Duration = Duration::from_millis(2000);
const MARGIN: Duration = Duration::from_millis(400);
/// The period of renewals (active) and of acquire attempts (passive).
pub const TICK_MS: u64 = 500;
/// Every simulated clock (members' and VLDB replicas') runs within 3% of true rate:
/// two of them differ by at most about 6%, inside the design's margin / lease = 20%.
pub const RATE_PPM: (u64, u64) = (970_000, 1_030_000);
/// How many not-leader hints a member follows between two ticks.
const HOPS_MAX: u32 = 3;
const GRACE: Duration = Duration::from_millis(3000);
const GRACE_RETRY: Duration = Duration::from_millis(200);

/// How the member treats its lease. The broken variants exist to show that the checker
/// catches what they do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// The design: margin lease/5, the lease counted from the call's send time, and the
    /// fence check before every reply and write.
    Correct,
    /// No fence check: the member acts until the VLDB refuses a renewal, so after a
    /// pause it answers with its stale view.
    NoFenceCheck,
    /// Margin 0 and the lease counted from when the answer arrived: the member outlives
    /// the VLDB's expiry by the answer's delay and its clock's slowness.
    TrustReceiveTime,
    /// Not broken, lenient: past its deadline the member stops acting but keeps its term
    /// and renews, and a renewal granted late reopens its fence. The fileserver can do
    /// this much when a renewal's answer races its deadline (`serve_term`'s `select!`);
    /// here it always does, so a VLDB whose "renewed" is not a true promise is caught.
    LateRenewal,
}

/// What a member's handlers need from the world.
pub struct Ctx<'a> {
    pub now: u64,
    pub out: Vec<(Node, Msg)>,
    pub checker: &'a mut Checker,
    pub vfs: &'a MemVfs,
    /// Set by a passive told how long the lease still runs: call again after this many
    /// ms, as the fileserver looks again exactly when the lease can have run out.
    pub retry_after: Option<u64>,
}

pub struct Member {
    pub index: usize,
    /// Bumped at each crash: answers to calls of a dead process are dropped.
    pub incarnation: u64,
    pub up: bool,
    /// While `now < paused_until` the process is stopped (SIGSTOP): its events wait.
    pub paused_until: u64,
    /// The member's monotonic clock: `offset + now * rate_ppm / 1e6`.
    rate_ppm: u64,
    offset: u64,
    variant: Variant,
    lease: MemberLease,
    role: Role,
    /// The newest epoch and active the VLDB told this member about.
    epoch_seen: u64,
    active_seen: Option<usize>,
    route: Route,
}

/// Where a member sends its lease calls: the single VLDB, or the replica it believes
/// leads the replicated one. It follows not-leader hints, and moves on to the next
/// replica when a tick finds its last call unanswered.
struct Route {
    /// 0 for the single VLDB.
    replicas: usize,
    leader: usize,
    answered: bool,
    /// Hints followed since the last tick.
    hops: u32,
}

impl Route {
    fn node(&self) -> Node {
        if self.replicas == 0 {
            Node::Vldb
        } else {
            Node::Replica(self.leader)
        }
    }

    fn next(&self) -> usize {
        (self.leader + 1) % self.replicas.max(1)
    }
}

enum Role {
    Passive,
    Active(Box<Acting>),
}

struct Acting {
    epoch: u64,
    journal: Journal,
    tables: Replayed,
    grace: Grace,
}

pub fn name(index: usize) -> String {
    format!("m{index}")
}

fn index_of(name: &str) -> Option<usize> {
    name.strip_prefix('m')?.parse().ok()
}

impl Member {
    /// `replicas` is 0 for the single VLDB, else the replicated VLDB's size.
    pub fn new(index: usize, variant: Variant, replicas: usize, rng: &mut Rng) -> Member {
        Member {
            index,
            incarnation: 0,
            up: true,
            paused_until: 0,
            rate_ppm: rng.between(RATE_PPM.0, RATE_PPM.1),
            offset: rng.between(0, 1_000_000),
            variant,
            lease: new_lease(variant),
            role: Role::Passive,
            epoch_seen: 0,
            active_seen: None,
            route: Route {
                replicas,
                leader: index % replicas.max(1),
                answered: true,
                hops: 0,
            },
        }
    }

    fn local(&self, now: u64) -> Millis {
        Millis(self.offset + now * self.rate_ppm / 1_000_000)
    }

    /// The epoch this member believes it may act in at `now`.
    pub fn acting(&self, now: u64) -> Option<u64> {
        match &self.role {
            Role::Active(acting) if self.lease.is_valid(self.local(now)) => Some(acting.epoch),
            _ => None,
        }
    }

    /// The fence check: an active whose lease ran out demotes itself (`LateRenewal`: it
    /// only stops acting until a renewal comes).
    fn fence(&mut self, ctx: &mut Ctx) {
        if !matches!(self.variant, Variant::NoFenceCheck | Variant::LateRenewal)
            && matches!(self.role, Role::Active(_))
            && !self.lease.is_valid(self.local(ctx.now))
        {
            ctx.checker.stats.fences += 1;
            self.demote();
        }
    }

    /// Drops the journal and tables without writing and becomes passive.
    fn demote(&mut self) {
        self.role = Role::Passive;
        self.lease.lost();
    }

    pub fn crash(&mut self) {
        self.demote();
        self.up = false;
        self.paused_until = 0;
        self.incarnation += 1;
    }

    pub fn restart(&mut self) {
        self.up = true;
        self.lease = new_lease(self.variant);
        self.epoch_seen = 0;
        self.active_seen = None;
    }

    /// The periodic tick: an active ends grace when due and renews; a passive tries to
    /// acquire the epoch it last saw.
    pub fn tick(&mut self, ctx: &mut Ctx) -> Result<(), String> {
        self.fence(ctx);
        let local = self.local(ctx.now);
        let fenced = self.variant == Variant::LateRenewal && !self.lease.is_valid(local);
        if let Role::Active(acting) = &mut self.role
            && !fenced
        {
            acting.end_grace(ctx, self.index, local)?;
        }
        if !self.route.answered {
            self.route.leader = self.route.next();
        }
        self.route.answered = false;
        self.route.hops = 0;
        self.call(ctx);
        Ok(())
    }

    /// Renews (active) or tries to acquire the epoch last seen (passive).
    fn call(&mut self, ctx: &mut Ctx) {
        let local = self.local(ctx.now);
        let (call, epoch) = match &self.role {
            Role::Active(acting) => (Call::Renew, acting.epoch),
            Role::Passive => (Call::Acquire, self.epoch_seen),
        };
        ctx.out.push((
            self.route.node(),
            Msg::Lease {
                call,
                member: self.index,
                incarnation: self.incarnation,
                epoch,
                sent: local,
            },
        ));
    }

    /// A replica turned the call away: follow its hint (or try the next replica) and
    /// call again at once, unless the hint names the replica that answered, which leads
    /// but is not ready yet; the next tick retries then.
    pub fn on_not_leader(&mut self, ctx: &mut Ctx, from: usize, hint: Option<usize>) {
        self.route.answered = true;
        self.fence(ctx);
        let to = hint.unwrap_or_else(|| self.route.next());
        if to == from || self.route.hops >= HOPS_MAX {
            return;
        }
        self.route.leader = to;
        self.route.hops += 1;
        self.call(ctx);
    }

    /// The lease a passive was told about can have run out: try to acquire it now.
    pub fn retry(&mut self, ctx: &mut Ctx) {
        self.fence(ctx);
        if matches!(self.role, Role::Passive) {
            self.call(ctx);
        }
    }

    /// A planned switchover: stop acting first, then hand the lease to the partner.
    pub fn switchover(&mut self, ctx: &mut Ctx) {
        self.fence(ctx);
        if let Role::Active(acting) = &self.role {
            let epoch = acting.epoch;
            self.demote();
            ctx.out.push((
                self.route.node(),
                Msg::Release {
                    member: self.index,
                    epoch,
                    successor: 1 - self.index,
                },
            ));
        }
    }

    pub fn on_lease_answer(
        &mut self,
        ctx: &mut Ctx,
        call: Call,
        asked: u64,
        sent: Millis,
        result: Result<u64, LeaseRefusal>,
    ) -> Result<(), String> {
        self.route.answered = true;
        self.fence(ctx);
        let local = self.local(ctx.now);
        let from = match self.variant {
            Variant::TrustReceiveTime => local,
            _ => sent,
        };
        match (call, result) {
            (Call::Acquire, Ok(epoch)) => {
                self.epoch_seen = self.epoch_seen.max(epoch);
                self.active_seen = Some(self.index);
                if let Role::Active(acting) = &self.role {
                    if acting.epoch >= epoch {
                        // A late answer: a deposed leader of the replicated VLDB learnt
                        // of the commit after this member had moved on.
                        return Ok(());
                    }
                    return Err(format!(
                        "m{}: granted epoch {epoch} while active in epoch {}",
                        self.index, acting.epoch
                    ));
                }
                self.lease.granted(epoch, from);
                if self.lease.is_valid(local) {
                    self.take_over(ctx, epoch, local)?;
                }
            }
            (Call::Renew, Ok(epoch)) => {
                if let Role::Active(acting) = &self.role
                    && acting.epoch == epoch
                {
                    self.lease.granted(epoch, from);
                }
            }
            (
                _,
                Err(LeaseRefusal::Held {
                    epoch,
                    active,
                    left,
                }),
            ) => {
                self.epoch_seen = self.epoch_seen.max(epoch);
                self.active_seen = active.as_deref().and_then(index_of);
                if let Role::Active(acting) = &self.role
                    && acting.epoch < epoch
                {
                    self.demote();
                }
                let left_ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX);
                if matches!(self.role, Role::Passive) && left_ms > 0 && left_ms < TICK_MS {
                    ctx.retry_after = Some(left_ms + 1);
                }
            }
            (_, Err(LeaseRefusal::Lost { epoch })) => {
                self.epoch_seen = self.epoch_seen.max(epoch);
                if let Role::Active(acting) = &self.role
                    && acting.epoch == asked
                {
                    self.demote();
                }
            }
            (_, Err(other)) => {
                return Err(format!("m{}: unexpected refusal {other:?}", self.index));
            }
        }
        Ok(())
    }

    /// Opens the shared disk, rebuilds the tables from it and starts grace.
    fn take_over(&mut self, ctx: &mut Ctx, epoch: u64, local: Millis) -> Result<(), String> {
        let (journal, tables) = disk::open(ctx.vfs, epoch)?;
        ctx.checker.takeover(self.index, epoch, &tables.writes)?;
        let config = GraceConfig {
            length: GRACE,
            retry: GRACE_RETRY,
        };
        let grace = Grace::new(config, tables.table.iter(), true, local);
        self.role = Role::Active(Box::new(Acting {
            epoch,
            journal,
            tables,
            grace,
        }));
        Ok(())
    }

    pub fn on_request(
        &mut self,
        ctx: &mut Ctx,
        client: usize,
        seq: u64,
        op: Op,
    ) -> Result<(), String> {
        self.fence(ctx);
        let local = self.local(ctx.now);
        let fenced = self.variant == Variant::LateRenewal && !self.lease.is_valid(local);
        let (epoch, reply) = match &mut self.role {
            Role::Active(acting) if fenced => (acting.epoch, Reply::NotActive { hint: None }),
            Role::Passive => {
                let hint = self.active_seen.filter(|&m| m != self.index);
                (self.epoch_seen, Reply::NotActive { hint })
            }
            Role::Active(acting) => {
                let reply = acting.serve(ctx, self.index, client, seq, op, local)?;
                ctx.checker.ack(ctx.now, self.index, acting.epoch)?;
                (acting.epoch, reply)
            }
        };
        ctx.out
            .push((Node::Client(client), Msg::Reply { seq, epoch, reply }));
        Ok(())
    }
}

fn new_lease(variant: Variant) -> MemberLease {
    match variant {
        Variant::TrustReceiveTime => MemberLease::new(LEASE, Duration::ZERO),
        _ => MemberLease::new(LEASE, MARGIN),
    }
}

impl Acting {
    fn append(&self, record: Record) -> Result<(), String> {
        self.journal
            .append(&record.encode())
            .map(drop)
            .map_err(|e| format!("append to the shared journal: {e}"))
    }

    /// Grace is over: the locks nobody reclaimed are released, durably.
    fn end_grace(&mut self, ctx: &mut Ctx, member: usize, local: Millis) -> Result<(), String> {
        let Some(end) = self.grace.tick(local) else {
            return Ok(());
        };
        for (fid, lock) in end.dropped {
            let slot = Slot::of(fid, lock.range)
                .ok_or_else(|| format!("m{member}: recovered a lock on no slot: {lock:?}"))?;
            let client = lock.owner.client.0;
            self.tables
                .table
                .unlock(fid, lock.owner, lock.range)
                .map_err(|e| e.to_string())?;
            self.append(Record::Drop { client, slot })?;
            ctx.checker.lock_released(slot, client);
        }
        Ok(())
    }

    fn serve(
        &mut self,
        ctx: &mut Ctx,
        member: usize,
        client: usize,
        seq: u64,
        op: Op,
        local: Millis,
    ) -> Result<Reply, String> {
        let c = u32::try_from(client).map_err(|e| e.to_string())?;
        if let Some(&outcome) = self.tables.done.get(&(c, seq)) {
            if let (Op::Lock { slot, kind }, Outcome::Granted) = (&op, outcome) {
                // The client never heard of this grant, so it cannot reclaim it: the
                // recorded answer is its reclaim.
                let lock = Lock {
                    owner: owner(c),
                    range: slot.range(),
                    kind: *kind,
                };
                let _ = self.grace.reclaim(slot.fid(), lock);
            }
            return Ok(match outcome {
                Outcome::Written => Reply::Written,
                Outcome::Granted => Reply::Granted,
                Outcome::Unlocked => Reply::Unlocked,
            });
        }
        match op {
            Op::Write { value } => {
                self.append(Record::Write {
                    client: c,
                    seq,
                    value,
                })?;
                self.tables.writes.push((c, seq, value));
                self.tables.done.insert((c, seq), Outcome::Written);
                Ok(Reply::Written)
            }
            Op::Lock { slot, kind } => {
                let check =
                    self.grace
                        .check_new_lock(slot.fid(), owner(c), slot.range(), kind, local);
                if let GraceCheck::Wait { retry } = check {
                    let retry_ms = u64::try_from(retry.as_millis()).unwrap_or(u64::MAX);
                    return Ok(Reply::Grace { retry_ms });
                }
                let reply = self
                    .tables
                    .table
                    .lock(slot.fid(), owner(c), slot.range(), kind, false);
                if reply.outcome != LockOutcome::Granted {
                    return Ok(Reply::Conflict);
                }
                self.append(Record::Lock {
                    client: c,
                    seq,
                    slot,
                    kind,
                })?;
                ctx.checker.lock_granted(ctx.now, member, slot, c, kind)?;
                self.tables.done.insert((c, seq), Outcome::Granted);
                Ok(Reply::Granted)
            }
            Op::Unlock { slot } => {
                self.tables
                    .table
                    .unlock(slot.fid(), owner(c), slot.range())
                    .map_err(|e| e.to_string())?;
                self.append(Record::Unlock {
                    client: c,
                    seq,
                    slot,
                })?;
                ctx.checker.lock_released(slot, c);
                self.tables.done.insert((c, seq), Outcome::Unlocked);
                Ok(Reply::Unlocked)
            }
            Op::Reclaim { locks } => {
                let mut lost = Vec::new();
                for (slot, kind) in locks {
                    let lock = Lock {
                        owner: owner(c),
                        range: slot.range(),
                        kind,
                    };
                    let held = self
                        .tables
                        .table
                        .locks_of(ClientKey(c))
                        .iter()
                        .any(|&(fid, l)| fid == slot.fid() && l == lock);
                    // Reclaimed now, or already (an earlier copy of this reclaim).
                    if self.grace.reclaim(slot.fid(), lock).is_err() && !held {
                        lost.push(slot);
                    }
                }
                self.grace.client_done(ClientKey(c));
                Ok(Reply::Reclaimed { lost })
            }
        }
    }
}
