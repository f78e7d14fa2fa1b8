//! The simulated world: an event queue in simulated time, a lossy network with cuts, the
//! VLDB (one process, or three Raft replicas), members, clients and faults, all drawn
//! from one seeded generator.
//! Invariant: a run is a pure function of (seed, config); every event is followed by the
//! checks that can be made at that instant.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;

use state::journal::MemVfs;
use state::{Millis, PairLease};

use crate::sim::checker::{Checker, Stats};
use crate::sim::client::{Client, Timer};
use crate::sim::disk;
use crate::sim::member::{self, Ctx, LEASE, Member, TICK_MS, Variant};
use crate::sim::message::{Call, Msg, Node};
use crate::sim::replica::{self, Decider, HEARTBEAT_MS, REPLICAS, Replica};
use crate::sim::rng::Rng;

const CLIENTS: usize = 3;
const MEMBERS: usize = 2;

/// The knobs of one run.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub variant: Variant,
    pub vldb: Vldb,
    /// Simulated length of the run.
    pub run_ms: u64,
}

/// Which VLDB decides about the pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(
    dead_code,
    reason = "pair_sim's build of this module never replicates the VLDB"
)]
pub enum Vldb {
    /// One process: `PairLease` checks and applies at once.
    Single,
    /// `REPLICAS` replicas running Raft, the pair lease their state machine.
    Replicated(Decider),
}

/// A broken invariant, with what it takes to see it again.
#[derive(Debug)]
pub struct Violation {
    pub seed: u64,
    pub config: Config,
    pub now: u64,
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let test = match self.config.vldb {
            Vldb::Single => "pair_sim",
            Vldb::Replicated(_) => "vldb_sim",
        };
        write!(
            f,
            "seed {} ({:?}, {:?}), at {} ms: {}\nreplay with: HOLDFAST_SIM_SEED={} cargo test -p state --test {test}",
            self.seed, self.config.variant, self.config.vldb, self.now, self.message, self.seed
        )
    }
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Cut the link between two nodes for a while.
    Partition(Node, Node, u64),
    Crash(usize, u64),
    /// SIGSTOP for a while: the member's events wait, its view goes stale.
    Pause(usize, u64),
    VldbRestart(u64),
    Switchover,
    ReplicaCrash(usize, u64),
    /// Cut a replica from the other replicas (not from the members) for a while: a
    /// leader so cut goes on believing it leads, in a minority.
    Isolate(usize, u64),
    /// Delay everything between a replica and the others by `extra` ms for a while: a
    /// leader so slowed commits late, or loses its followers to an election.
    Slow(usize, u64, u64),
    /// SIGSTOP a replica for a while: a leader so stopped wakes up believing it leads.
    ReplicaPause(usize, u64),
}

#[derive(Debug)]
enum Event {
    Deliver {
        to: Node,
        msg: Msg,
    },
    MemberTick {
        member: usize,
        incarnation: u64,
    },
    /// A passive's extra acquire, when the lease it was told about can have run out.
    MemberRetry {
        member: usize,
        incarnation: u64,
    },
    ClientTimer {
        client: usize,
        timer: Timer,
    },
    Fault,
    MemberRestart(usize),
    VldbUp,
    ReplicaTick {
        replica: usize,
        incarnation: u64,
    },
    ReplicaUp(usize),
}

struct Scheduled {
    at: u64,
    seq: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// The network's character for one run, drawn from the seed.
struct Network {
    loss_per_mille: u64,
    slow_per_mille: u64,
    /// Cut links and when they heal.
    cuts: Vec<(Node, Node, u64)>,
    /// Congested links: (a, b, until, extra delay).
    slow: Vec<(Node, Node, u64, u64)>,
}

impl Network {
    fn cut(&self, a: Node, b: Node, now: u64) -> bool {
        self.cuts
            .iter()
            .any(|&(x, y, until)| now < until && ((x, y) == (a, b) || (x, y) == (b, a)))
    }

    fn extra_delay(&self, a: Node, b: Node, now: u64) -> u64 {
        self.slow
            .iter()
            .filter(|&&(x, y, until, _)| now < until && ((x, y) == (a, b) || (x, y) == (b, a)))
            .map(|&(_, _, _, extra)| extra)
            .max()
            .unwrap_or(0)
    }
}

/// The single VLDB.
struct SingleVldb {
    pair: PairLease,
    up: bool,
}

pub struct World {
    config: Config,
    now: u64,
    next_seq: u64,
    queue: BinaryHeap<Reverse<Scheduled>>,
    rng: Rng,
    network: Network,
    vldb: SingleVldb,
    /// The replicated VLDB; empty with the single one.
    replicas: Vec<Replica>,
    members: Vec<Member>,
    clients: Vec<Client>,
    checker: Checker,
    vfs: MemVfs,
}

/// Runs one seed to the end or to the first broken invariant.
pub fn run(seed: u64, config: Config) -> Result<Stats, Violation> {
    let mut world = World::new(seed, config);
    world.run().map_err(|message| Violation {
        seed,
        config,
        now: world.now,
        message,
    })?;
    Ok(world.checker.stats)
}

impl World {
    fn new(seed: u64, config: Config) -> World {
        let mut rng = Rng::new(seed);
        let network = Network {
            loss_per_mille: rng.between(0, 50),
            slow_per_mille: rng.between(0, 50),
            cuts: Vec::new(),
            slow: Vec::new(),
        };
        let mut pair = PairLease::default();
        let replicas = match config.vldb {
            Vldb::Single => 0,
            Vldb::Replicated(_) => REPLICAS,
        };
        let members: Vec<Member> = (0..MEMBERS)
            .map(|index| Member::new(index, config.variant, replicas, &mut rng))
            .collect();
        for index in 0..MEMBERS {
            pair.join(&member::name(index))
                .expect("two members fit a pair");
        }
        let replicas = match config.vldb {
            Vldb::Single => Vec::new(),
            Vldb::Replicated(decider) => (0..REPLICAS)
                .map(|index| Replica::new(index, decider, pair.clone(), &mut rng))
                .collect(),
        };
        World {
            config,
            now: 0,
            next_seq: 0,
            queue: BinaryHeap::new(),
            rng,
            network,
            vldb: SingleVldb { pair, up: true },
            replicas,
            members,
            clients: (0..CLIENTS).map(Client::new).collect(),
            checker: Checker::default(),
            vfs: MemVfs::new(),
        }
    }

    fn schedule(&mut self, after: u64, event: Event) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.queue.push(Reverse(Scheduled {
            at: self.now + after,
            seq,
            event,
        }));
    }

    /// Sends `msg` `after` ms from now, through the network's loss, cuts and delays.
    fn send(&mut self, from: Node, to: Node, msg: Msg, after: u64) {
        if self.network.cut(from, to, self.now) || self.rng.chance(self.network.loss_per_mille) {
            return;
        }
        let delay = if self.rng.chance(self.network.slow_per_mille) {
            self.rng.between(100, 1500)
        } else {
            self.rng.between(1, 15)
        };
        let delay = after + delay + self.network.extra_delay(from, to, self.now);
        self.schedule(delay, Event::Deliver { to, msg });
    }

    fn run(&mut self) -> Result<(), String> {
        for member in 0..MEMBERS {
            let after = self.rng.between(0, TICK_MS);
            self.schedule(
                after,
                Event::MemberTick {
                    member,
                    incarnation: 0,
                },
            );
        }
        for client in 0..CLIENTS {
            let timer = Timer {
                attempt: 0,
                switch: false,
            };
            let after = self.rng.between(0, 500);
            self.schedule(after, Event::ClientTimer { client, timer });
        }
        for replica in 0..self.replicas.len() {
            let after = self.rng.between(0, HEARTBEAT_MS);
            self.schedule(
                after,
                Event::ReplicaTick {
                    replica,
                    incarnation: 0,
                },
            );
        }
        let first_fault = self.rng.between(1000, 3000);
        self.schedule(first_fault, Event::Fault);
        while let Some(Reverse(next)) = self.queue.pop() {
            if next.at > self.config.run_ms {
                break;
            }
            self.now = next.at;
            self.dispatch(next.event)?;
            let acting: Vec<(usize, u64)> = self
                .members
                .iter()
                .filter_map(|m| m.acting(self.now).map(|epoch| (m.index, epoch)))
                .collect();
            self.checker.windows(&acting)?;
        }
        let on_disk = disk::inspect(&self.vfs)?;
        self.checker.disk_writes(&on_disk.writes, "at the end")?;
        Ok(())
    }

    fn member_event(&self, member: usize) -> Option<u64> {
        let m = &self.members[member];
        (m.up && m.paused_until > self.now).then(|| m.paused_until - self.now)
    }

    fn dispatch(&mut self, event: Event) -> Result<(), String> {
        // A stopped process does nothing until it is continued; its events wait, in order.
        let paused = match &event {
            Event::Deliver {
                to: Node::Member(m),
                ..
            }
            | Event::MemberTick { member: m, .. }
            | Event::MemberRetry { member: m, .. } => self.member_event(*m),
            Event::Deliver {
                to: Node::Replica(r),
                ..
            }
            | Event::ReplicaTick { replica: r, .. } => {
                let r = &self.replicas[*r];
                (r.up && r.paused_until > self.now).then(|| r.paused_until - self.now)
            }
            _ => None,
        };
        if let Some(wait) = paused {
            self.schedule(wait, event);
            return Ok(());
        }
        match event {
            Event::Deliver { to, msg } => self.deliver(to, msg),
            Event::MemberTick {
                member,
                incarnation,
            } => {
                let m = &self.members[member];
                if !m.up || m.incarnation != incarnation {
                    return Ok(());
                }
                self.with_member(member, |m, ctx| m.tick(ctx))?;
                let after = self.rng.between(TICK_MS - 50, TICK_MS + 50);
                self.schedule(
                    after,
                    Event::MemberTick {
                        member,
                        incarnation,
                    },
                );
                Ok(())
            }
            Event::MemberRetry {
                member,
                incarnation,
            } => {
                let m = &self.members[member];
                if !m.up || m.incarnation != incarnation {
                    return Ok(());
                }
                self.with_member(member, |m, ctx| {
                    m.retry(ctx);
                    Ok(())
                })
            }
            Event::ClientTimer { client, timer } => {
                if let Some((msg, after, retry)) =
                    self.clients[client].on_timer(timer, &mut self.rng)
                {
                    let to = self.clients[client].target();
                    self.send(Node::Client(client), to, msg, 0);
                    self.schedule(
                        after,
                        Event::ClientTimer {
                            client,
                            timer: retry,
                        },
                    );
                }
                Ok(())
            }
            Event::Fault => {
                self.fault()?;
                let after = self.rng.between(500, 4000);
                self.schedule(after, Event::Fault);
                Ok(())
            }
            Event::MemberRestart(member) => {
                self.members[member].restart();
                let incarnation = self.members[member].incarnation;
                self.schedule(
                    0,
                    Event::MemberTick {
                        member,
                        incarnation,
                    },
                );
                Ok(())
            }
            Event::VldbUp => {
                // Epochs, holders and members are durable; the expiry is not.
                self.vldb.up = true;
                self.vldb.pair.restarted(LEASE, Millis(self.now));
                Ok(())
            }
            Event::ReplicaTick {
                replica,
                incarnation,
            } => {
                let r = &self.replicas[replica];
                if !r.up || r.incarnation != incarnation {
                    return Ok(());
                }
                self.with_replica(replica, |r, ctx| {
                    r.tick(ctx);
                    Ok(())
                })?;
                let after = self.rng.between(HEARTBEAT_MS - 10, HEARTBEAT_MS + 10);
                self.schedule(
                    after,
                    Event::ReplicaTick {
                        replica,
                        incarnation,
                    },
                );
                Ok(())
            }
            Event::ReplicaUp(replica) => {
                self.with_replica(replica, |r, ctx| {
                    r.restart(ctx);
                    Ok(())
                })?;
                let incarnation = self.replicas[replica].incarnation;
                self.schedule(
                    0,
                    Event::ReplicaTick {
                        replica,
                        incarnation,
                    },
                );
                Ok(())
            }
        }
    }

    fn with_replica(
        &mut self,
        replica: usize,
        handle: impl FnOnce(&mut Replica, &mut replica::Ctx) -> Result<(), String>,
    ) -> Result<(), String> {
        let mut ctx = replica::Ctx {
            now: self.now,
            out: Vec::new(),
            synced: Vec::new(),
            checker: &mut self.checker,
            rng: &mut self.rng,
        };
        handle(&mut self.replicas[replica], &mut ctx)?;
        let (out, synced) = (ctx.out, ctx.synced);
        for (to, msg) in out {
            self.send(Node::Replica(replica), to, msg, 0);
        }
        let sync_ms = self.replicas[replica].sync_ms;
        for (to, msg) in synced {
            self.send(Node::Replica(replica), to, msg, sync_ms);
        }
        Ok(())
    }

    fn with_member(
        &mut self,
        member: usize,
        handle: impl FnOnce(&mut Member, &mut Ctx) -> Result<(), String>,
    ) -> Result<(), String> {
        let mut ctx = Ctx {
            now: self.now,
            out: Vec::new(),
            checker: &mut self.checker,
            vfs: &self.vfs,
            retry_after: None,
        };
        handle(&mut self.members[member], &mut ctx)?;
        let retry_after = ctx.retry_after;
        for (to, msg) in ctx.out {
            self.send(Node::Member(member), to, msg, 0);
        }
        if let Some(after) = retry_after {
            let incarnation = self.members[member].incarnation;
            self.schedule(
                after,
                Event::MemberRetry {
                    member,
                    incarnation,
                },
            );
        }
        Ok(())
    }

    fn deliver(&mut self, to: Node, msg: Msg) -> Result<(), String> {
        match to {
            Node::Vldb => {
                if self.vldb.up {
                    self.vldb_call(msg)?;
                }
                Ok(())
            }
            Node::Replica(replica) => {
                if !self.replicas[replica].up {
                    return Ok(());
                }
                self.with_replica(replica, |r, ctx| match msg {
                    Msg::Lease {
                        call,
                        member,
                        incarnation,
                        epoch,
                        sent,
                    } => {
                        r.on_lease(ctx, call, member, incarnation, epoch, sent);
                        Ok(())
                    }
                    Msg::Release {
                        member,
                        epoch,
                        successor,
                    } => {
                        r.on_release(ctx, member, epoch, successor);
                        Ok(())
                    }
                    Msg::Raft(raft) => r.on_raft(ctx, raft),
                    other => Err(format!("r{replica} got {other:?}")),
                })
            }
            Node::Member(member) => {
                if !self.members[member].up {
                    return Ok(());
                }
                match msg {
                    Msg::LeaseAnswer {
                        call,
                        incarnation,
                        epoch,
                        sent,
                        result,
                    } => {
                        if incarnation != self.members[member].incarnation {
                            return Ok(());
                        }
                        self.with_member(member, |m, ctx| {
                            m.on_lease_answer(ctx, call, epoch, sent, result)
                        })
                    }
                    Msg::NotLeader {
                        from,
                        incarnation,
                        hint,
                    } => {
                        if incarnation != self.members[member].incarnation {
                            return Ok(());
                        }
                        self.with_member(member, |m, ctx| {
                            m.on_not_leader(ctx, from, hint);
                            Ok(())
                        })
                    }
                    Msg::Request { client, seq, op } => {
                        self.with_member(member, |m, ctx| m.on_request(ctx, client, seq, op))
                    }
                    other => Err(format!("m{member} got {other:?}")),
                }
            }
            Node::Client(client) => match msg {
                Msg::Reply { seq, epoch, reply } => {
                    let next = self.clients[client].on_reply(
                        seq,
                        epoch,
                        reply,
                        &mut self.checker,
                        &mut self.rng,
                    )?;
                    if let Some((after, timer)) = next {
                        self.schedule(after, Event::ClientTimer { client, timer });
                    }
                    Ok(())
                }
                other => Err(format!("client {client} got {other:?}")),
            },
        }
    }

    /// The VLDB answers at once on its own clock (the simulated one).
    fn vldb_call(&mut self, msg: Msg) -> Result<(), String> {
        let now = Millis(self.now);
        match msg {
            Msg::Lease {
                call,
                member,
                incarnation,
                epoch,
                sent,
            } => {
                let name = member::name(member);
                let pair = &mut self.vldb.pair;
                let result = match call {
                    Call::Acquire => pair.acquire(&name, epoch, LEASE, now),
                    Call::Renew => pair.renew(&name, epoch, LEASE, now).map(|()| epoch),
                };
                match (call, &result) {
                    (Call::Acquire, Ok(granted)) => self.checker.vldb_granted(*granted, member)?,
                    (Call::Renew, Ok(_)) => self.checker.stats.renewals += 1,
                    _ => {}
                }
                let answer = Msg::LeaseAnswer {
                    call,
                    incarnation,
                    epoch,
                    sent,
                    result,
                };
                self.send(Node::Vldb, Node::Member(member), answer, 0);
                Ok(())
            }
            Msg::Release {
                member,
                epoch,
                successor,
            } => {
                // Refused when the lease is already gone: nothing to hand over then.
                let _ = self.vldb.pair.release(
                    &member::name(member),
                    epoch,
                    Some(&member::name(successor)),
                    now,
                );
                Ok(())
            }
            other => Err(format!("the VLDB got {other:?}")),
        }
    }

    fn fault(&mut self) -> Result<(), String> {
        let member = self.rng.between(0, MEMBERS as u64 - 1) as usize;
        let client = self.rng.between(0, CLIENTS as u64 - 1) as usize;
        let span = self.rng.between(200, 6000);
        let fault = match self.config.vldb {
            Vldb::Single => match self.rng.between(0, 9) {
                0..=2 => Fault::Partition(Node::Member(member), Node::Vldb, span),
                3 => Fault::Partition(Node::Client(client), Node::Member(member), span),
                4 => Fault::Crash(member, span),
                5..=6 => Fault::Pause(member, span),
                7 => Fault::VldbRestart(self.rng.between(0, 3000)),
                _ => Fault::Switchover,
            },
            Vldb::Replicated(_) => {
                let replica = self.victim();
                let other =
                    (replica + self.rng.between(1, REPLICAS as u64 - 1) as usize) % REPLICAS;
                match self.rng.between(0, 14) {
                    0..=1 => Fault::Partition(Node::Member(member), Node::Replica(replica), span),
                    2 => Fault::Partition(Node::Client(client), Node::Member(member), span),
                    3 => Fault::Crash(member, span),
                    4..=5 => Fault::Pause(member, span),
                    6 => Fault::Switchover,
                    7..=8 => Fault::ReplicaCrash(replica, self.rng.between(0, 3000)),
                    9..=10 => Fault::Isolate(replica, span),
                    11 => Fault::Partition(Node::Replica(replica), Node::Replica(other), span),
                    12..=13 => Fault::Slow(replica, span, self.rng.between(200, 2000)),
                    _ => Fault::ReplicaPause(replica, span),
                }
            }
        };
        match fault {
            Fault::Partition(a, b, span) => self.network.cuts.push((a, b, self.now + span)),
            Fault::Crash(member, down) => {
                if self.members[member].up {
                    self.members[member].crash();
                    self.schedule(down, Event::MemberRestart(member));
                }
            }
            Fault::Pause(member, span) => {
                let m = &mut self.members[member];
                if m.up {
                    m.paused_until = m.paused_until.max(self.now + span);
                }
            }
            Fault::VldbRestart(down) => {
                if self.vldb.up {
                    self.vldb.up = false;
                    self.schedule(down, Event::VldbUp);
                }
            }
            Fault::ReplicaCrash(replica, down) => {
                if self.replicas[replica].up {
                    self.replicas[replica].crash();
                    self.schedule(down, Event::ReplicaUp(replica));
                }
            }
            Fault::Isolate(replica, span) => {
                for other in (0..REPLICAS).filter(|&r| r != replica) {
                    let cut = (
                        Node::Replica(replica),
                        Node::Replica(other),
                        self.now + span,
                    );
                    self.network.cuts.push(cut);
                }
            }
            Fault::Slow(replica, span, extra) => {
                for other in (0..REPLICAS).filter(|&r| r != replica) {
                    let slow = (
                        Node::Replica(replica),
                        Node::Replica(other),
                        self.now + span,
                        extra,
                    );
                    self.network.slow.push(slow);
                }
            }
            Fault::ReplicaPause(replica, span) => {
                let r = &mut self.replicas[replica];
                if r.up {
                    r.paused_until = r.paused_until.max(self.now + span);
                }
            }
            Fault::Switchover => {
                for member in 0..MEMBERS {
                    if self.member_event(member).is_none() && self.members[member].up {
                        // A no-op unless the member is active.
                        self.with_member(member, |m, ctx| {
                            m.switchover(ctx);
                            Ok(())
                        })?;
                    }
                }
            }
        }
        self.network.cuts.retain(|&(_, _, until)| until > self.now);
        self.network
            .slow
            .retain(|&(_, _, until, _)| until > self.now);
        Ok(())
    }

    /// The replica a fault strikes: mostly the newest leader, else any.
    fn victim(&mut self) -> usize {
        let any = self.rng.between(0, REPLICAS as u64 - 1) as usize;
        let leader = self
            .replicas
            .iter()
            .filter(|r| r.up)
            .filter_map(|r| r.leads().map(|term| (term, r.index)))
            .max();
        match leader {
            Some((_, leader)) if self.rng.chance(700) => leader,
            _ => any,
        }
    }
}
