//! The pairs the VLDB arbitrates: `state::PairLease`'s decisions, made durable except for
//! the lease expiries.
//! Invariant: an epoch is durable before any member hears of it, so none is granted
//! twice.

use std::collections::HashMap;
use std::time::Duration;

use parking_lot::Mutex;
use proto::{Epoch, ErrorCode, PairEntry, PairName, ServerEntry, ServerId, Timestamp};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, WriteTransaction};
use serde::{Deserialize, Serialize};
use state::{LeaseRefusal, Millis, PairLease};
use tracing::{debug, info, warn};

use crate::error::VldbError;
use crate::limits::StoreLimits;
use crate::tables::{
    PAIR_SEQS, PAIRS, PAIRS_NAME, SERVERS, SERVERS_NAME, decode, encode, get_server, put_server,
};

/// Every pair: the durable fields mirrored from the `pairs` table, plus the lease expiries,
/// which live only here. Methods take the VLDB's monotonic clock as a `Millis`; a pair
/// loaded at open gets its holder one whole lease from the first call that touches it.
/// Methods block on disk I/O, like `Store`'s. Why this keeps one active per epoch:
/// `docs/pair-lease.md`.
pub(crate) struct Pairs {
    /// Changes are applied one at a time (the state machine applies the log in order), so
    /// this lock only guards the map against the leader's concurrent checks and reads.
    by_name: Mutex<HashMap<String, Pair>>,
    /// The store's: they bound the pairs, a member's address and a new server entry.
    limits: StoreLimits,
}

/// The durable part of a pair.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct PairRecord {
    server: ServerId,
    members: Vec<String>,
    epoch: Epoch,
    active: Option<String>,
    successor: Option<String>,
    /// The longest lease granted in this epoch: what a restarted VLDB grants the holder
    /// again, so that the holder never believes in a longer lease than the VLDB honours.
    lease_ms: u64,
}

/// One pair in memory.
#[derive(Clone, Debug)]
struct Pair {
    server: ServerId,
    lease: PairLease,
    /// Durable twin of `PairRecord::lease_ms`.
    lease_granted: Duration,
    /// Loaded at open and not touched since: the expiry is not known yet.
    expiry_unknown: bool,
}

impl Pair {
    fn record(&self) -> PairRecord {
        PairRecord {
            server: self.server,
            members: self.lease.members.clone(),
            epoch: Epoch(self.lease.epoch),
            active: self.lease.active.clone(),
            successor: self.lease.successor.clone(),
            lease_ms: millis(self.lease_granted),
        }
    }

    /// Starts the lease a restart left without an expiry: the VLDB does not know how
    /// much of it had run, so the holder gets a whole one.
    fn touch(&mut self, now: Millis) {
        if self.expiry_unknown {
            self.expiry_unknown = false;
            if self.lease.active.is_some() {
                self.lease.restarted(self.lease_granted, now);
            }
        }
    }

    fn entry(&self, name: &PairName, now: Millis) -> PairEntry {
        PairEntry {
            name: name.clone(),
            server: self.server,
            members: self.lease.members.clone(),
            active: self.lease.active.clone(),
            epoch: Epoch(self.lease.epoch),
            lease_left_ms: millis(self.lease.left(now)),
            successor: self.lease.successor.clone(),
        }
    }
}

/// A pair's next state, written in a transaction and installed in memory once that
/// transaction committed (`Pairs::install`).
#[derive(Debug)]
pub(crate) struct PairUpdate {
    name: String,
    pair: Pair,
}

impl Pairs {
    /// Reads every pair at open; `limits` bounds the pairs and their server entries.
    pub(crate) fn load(db: &Database, limits: StoreLimits) -> Result<Pairs, VldbError> {
        let by_name = Mutex::new(read_all(db)?);
        Ok(Pairs { by_name, limits })
    }

    /// Reads every pair again after the tables were replaced (a snapshot installed):
    /// as at open, each holder keeps one whole lease from the first call.
    pub(crate) fn reload(&self, db: &Database) -> Result<(), VldbError> {
        *self.by_name.lock() = read_all(db)?;
        Ok(())
    }

    /// The addresses `server`'s entry must list: a pair's server entry lists its members,
    /// the active first, whatever a member registers, since clients find the pair
    /// through it.
    pub(crate) fn server_addresses(&self, server: ServerId, addresses: Vec<String>) -> Vec<String> {
        let pairs = self.by_name.lock();
        match pairs.values().find(|p| p.server == server) {
            Some(pair) => ordered_addresses(&pair.lease, &addresses),
            None => addresses,
        }
    }

    /// `member` (an address) joins `pair`, serving the partition of `server`; the pair is
    /// created by its first member. Also makes the server entry of `server` list the
    /// members, stamped `registered` if it is new.
    pub(crate) fn join(
        &self,
        txn: &WriteTransaction,
        pair: &PairName,
        server: ServerId,
        member: &str,
        registered: Timestamp,
    ) -> Result<PairUpdate, VldbError> {
        if member.is_empty() || member.len() > self.limits.address_bytes_max {
            debug!(%pair, "refusing a pair member address");
            return Err(VldbError::Refused(ErrorCode::InvalidArgument));
        }
        let mut next = {
            let pairs = self.by_name.lock();
            if pairs
                .iter()
                .any(|(name, other)| name != pair.as_str() && other.server == server)
            {
                warn!(%pair, %member, %server,
                    "refusing a member whose partition already serves another pair: a \
                     partition belongs to one pair");
                return Err(VldbError::Refused(ErrorCode::InvalidArgument));
            }
            match pairs.get(pair.as_str()) {
                Some(existing) if existing.server != server => {
                    warn!(%pair, %member, pair_server = %existing.server,
                        member_server = %server,
                        "refusing a member whose partition has another server id than the \
                         pair's: both members must serve the same partition directory");
                    return Err(VldbError::Refused(ErrorCode::InvalidArgument));
                }
                Some(existing) => existing.clone(),
                None if pairs.len() >= self.limits.pairs_max => {
                    debug!(%pair, "pair table full");
                    return Err(VldbError::Refused(ErrorCode::InvalidArgument));
                }
                None => Pair {
                    server,
                    lease: PairLease::default(),
                    lease_granted: Duration::ZERO,
                    expiry_unknown: false,
                },
            }
        };
        let joined = next
            .lease
            .join(member)
            .map_err(|refusal| refused(&next, refusal))?;
        self.write(txn, pair, &next, Some(registered))?;
        if joined {
            info!(%pair, %member, %server, members = ?next.lease.members, "pair member joined");
        } else {
            debug!(%pair, %member, "pair member joined again");
        }
        Ok(update(pair, next))
    }

    /// The leader's check before it proposes an acquire: may `member` take the pair from
    /// `epoch` now, on the leader's clock? Returns the seq the decision saw.
    pub(crate) fn check_acquire(
        &self,
        pair: &PairName,
        member: &str,
        epoch: Epoch,
        lease: Duration,
        now: Millis,
    ) -> Result<u64, VldbError> {
        let mut pairs = self.by_name.lock();
        let current = pair_mut(&mut pairs, pair, now)?;
        current
            .lease
            .check_acquire(member, epoch.0, lease, now)
            .map_err(|refusal| refused(current, refusal))
    }

    /// The leader's check before it proposes a renewal.
    pub(crate) fn check_renew(
        &self,
        pair: &PairName,
        member: &str,
        epoch: Epoch,
        lease: Duration,
        now: Millis,
    ) -> Result<(), VldbError> {
        let mut pairs = self.by_name.lock();
        let current = pair_mut(&mut pairs, pair, now)?;
        current
            .lease
            .check_renew(member, epoch.0, lease, now)
            .map_err(|refusal| refused(current, refusal))
    }

    /// The leader's check before it proposes a release: the caller holds the lease.
    pub(crate) fn check_holder(
        &self,
        pair: &PairName,
        member: &str,
        epoch: Epoch,
        now: Millis,
    ) -> Result<(), VldbError> {
        let mut pairs = self.by_name.lock();
        let current = pair_mut(&mut pairs, pair, now)?;
        if current.lease.holds(member, epoch.0, now) {
            Ok(())
        } else {
            let epoch = current.lease.epoch;
            Err(refused(current, LeaseRefusal::Lost { epoch }))
        }
    }

    /// Applies an acquire the leader decided (`PairLease::apply_acquire`); the new epoch
    /// is durable once `txn` commits.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn acquire(
        &self,
        txn: &WriteTransaction,
        pair: &PairName,
        member: &str,
        epoch: Epoch,
        seq: u64,
        lease: Duration,
        now: Millis,
    ) -> Result<PairUpdate, VldbError> {
        let mut next = self.current(pair, now)?;
        let granted = next
            .lease
            .apply_acquire(member, epoch.0, seq, lease, now)
            .map_err(|refusal| refused(&next, refusal))?;
        next.lease_granted = lease;
        self.write(txn, pair, &next, None)?;
        info!(%pair, %member, epoch = granted, lease_ms = millis(lease), "pair lease acquired");
        Ok(update(pair, next))
    }

    /// Applies a renewal. The seq and, if the member asks for a longer lease than any
    /// granted in this epoch, that length are durable: a replica that restarts grants the
    /// holder the recorded length again.
    pub(crate) fn renew(
        &self,
        txn: &WriteTransaction,
        pair: &PairName,
        member: &str,
        epoch: Epoch,
        lease: Duration,
        now: Millis,
    ) -> Result<PairUpdate, VldbError> {
        let mut next = self.current(pair, now)?;
        next.lease
            .apply_renew(member, epoch.0, lease, now)
            .map_err(|refusal| refused(&next, refusal))?;
        next.lease_granted = next.lease_granted.max(lease);
        self.write(txn, pair, &next, None)?;
        debug!(%pair, %member, epoch = epoch.0, "pair lease renewed");
        Ok(update(pair, next))
    }

    /// Applies a release: the active gives its lease up at once, optionally to
    /// `successor`.
    pub(crate) fn release(
        &self,
        txn: &WriteTransaction,
        pair: &PairName,
        member: &str,
        epoch: Epoch,
        successor: Option<&str>,
        now: Millis,
    ) -> Result<PairUpdate, VldbError> {
        let mut next = self.current(pair, now)?;
        next.lease
            .apply_release(member, epoch.0, successor, now)
            .map_err(|refusal| refused(&next, refusal))?;
        self.write(txn, pair, &next, None)?;
        info!(%pair, %member, epoch = epoch.0, ?successor, "pair lease released");
        Ok(update(pair, next))
    }

    /// Makes an update written by a committed transaction the pair's state in memory;
    /// returns the pair's epoch.
    pub(crate) fn install(&self, update: PairUpdate) -> Epoch {
        let epoch = Epoch(update.pair.lease.epoch);
        self.by_name.lock().insert(update.name, update.pair);
        epoch
    }

    pub(crate) fn entry(&self, pair: &PairName, now: Millis) -> Result<PairEntry, VldbError> {
        let mut pairs = self.by_name.lock();
        Ok(pair_mut(&mut pairs, pair, now)?.entry(pair, now))
    }

    /// A copy of the pair to change, its expiry started if a restart left it unknown.
    fn current(&self, pair: &PairName, now: Millis) -> Result<Pair, VldbError> {
        let mut pairs = self.by_name.lock();
        Ok(pair_mut(&mut pairs, pair, now)?.clone())
    }

    /// Writes a pair's record, its seq and its server entry in `txn`. `registered`
    /// stamps a server entry that does not exist yet; without it a missing entry is
    /// corruption (joining created it). Checks come before the first write, so a refusal
    /// leaves `txn` as it was.
    fn write(
        &self,
        txn: &WriteTransaction,
        name: &PairName,
        pair: &Pair,
        registered: Option<Timestamp>,
    ) -> Result<(), VldbError> {
        let mut servers = txn.open_table(SERVERS)?;
        let (others, registered) = match (get_server(&servers, pair.server)?, registered) {
            (Some(entry), _) => (entry.addresses, entry.registered),
            (None, Some(registered)) => {
                if servers.len()? >= self.limits.servers_max {
                    debug!(pair = %name, "server table full");
                    return Err(VldbError::Refused(ErrorCode::InvalidArgument));
                }
                (Vec::new(), registered)
            }
            (None, None) => {
                return Err(VldbError::Corrupt {
                    table: SERVERS_NAME,
                    key: pair.server.to_string(),
                    reason: format!("pair {name} has no server entry"),
                });
            }
        };
        txn.open_table(PAIRS)?
            .insert(name.as_str(), encode(&pair.record())?.as_slice())?;
        txn.open_table(PAIR_SEQS)?
            .insert(name.as_str(), pair.lease.seq)?;
        let entry = ServerEntry {
            server: pair.server,
            addresses: ordered_addresses(&pair.lease, &others),
            registered,
        };
        put_server(&mut servers, &entry)?;
        Ok(())
    }
}

fn update(name: &PairName, pair: Pair) -> PairUpdate {
    PairUpdate {
        name: name.as_str().to_owned(),
        pair,
    }
}

/// Every pair in `db`, each holder's expiry unknown until the first call.
fn read_all(db: &Database) -> Result<HashMap<String, Pair>, VldbError> {
    let txn = db.begin_read()?;
    let table = txn.open_table(PAIRS)?;
    let seqs = txn.open_table(PAIR_SEQS)?;
    let mut by_name = HashMap::with_capacity(usize::try_from(table.len()?).unwrap_or(0));
    for row in table.iter()? {
        let (key, bytes) = row?;
        let name = key.value().to_owned();
        let record: PairRecord = decode(PAIRS_NAME, &name, bytes.value())?;
        let seq = seqs.get(name.as_str())?.map_or(0, |v| v.value());
        let pair = Pair {
            server: record.server,
            lease: PairLease {
                members: record.members,
                epoch: record.epoch.0,
                active: record.active,
                expires: Millis(0),
                successor: record.successor,
                seq,
            },
            lease_granted: Duration::from_millis(record.lease_ms),
            expiry_unknown: true,
        };
        info!(pair = %name, epoch = pair.lease.epoch, active = ?pair.lease.active,
            "pair loaded; its holder keeps one whole lease");
        by_name.insert(name, pair);
    }
    Ok(by_name)
}

/// A pair's addresses for its server entry: the active, the other members in the order
/// they joined, then any other address the server registered.
fn ordered_addresses(lease: &PairLease, others: &[String]) -> Vec<String> {
    let mut out: Vec<String> = lease.active.iter().cloned().collect();
    for address in lease.members.iter().chain(others) {
        if !out.contains(address) {
            out.push(address.clone());
        }
    }
    out
}

/// The pair named `name`, its expiry started if a restart left it unknown.
fn pair_mut<'a>(
    pairs: &'a mut HashMap<String, Pair>,
    name: &PairName,
    now: Millis,
) -> Result<&'a mut Pair, VldbError> {
    let pair = pairs
        .get_mut(name.as_str())
        .ok_or(VldbError::Refused(ErrorCode::NoSuchPair))?;
    pair.touch(now);
    Ok(pair)
}

/// The wire's answer to a lease refusal.
fn refused(pair: &Pair, refusal: LeaseRefusal) -> VldbError {
    let code = match refusal {
        // The pair exists (callers look it up first): the caller or the successor it
        // named is not one of its members.
        LeaseRefusal::NotMember | LeaseRefusal::BadLength => ErrorCode::InvalidArgument,
        LeaseRefusal::Full { members } => ErrorCode::PairFull { members },
        LeaseRefusal::Held {
            epoch,
            active,
            left,
        } => ErrorCode::LeaseHeld {
            epoch: Epoch(epoch),
            active,
            lease_left_ms: millis(left),
        },
        LeaseRefusal::Lost { epoch } => ErrorCode::LeaseLost {
            epoch: Epoch(epoch),
        },
    };
    debug!(server = %pair.server, ?code, "pair call refused");
    VldbError::Refused(code)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
