//! The lease that decides which member of a fileserver pair is active, as pure code: the
//! VLDB's record of a pair (`PairLease`) and a member's own deadline (`MemberLease`).
//! Invariant: never two actives at once: an epoch moves on only by a compare-and-set once
//! its lease expired or was released, and a member stops acting a margin before expiry.

use std::time::Duration;

use crate::time::Millis;

/// Most members of a pair.
pub const MEMBERS_MAX: usize = 2;
/// The longest lease a member may ask for: a dead active blocks its pair at most this long.
pub const LEASE_MAX: Duration = Duration::from_secs(60);
/// The shortest lease: below this, renewal traffic and clock jitter dominate.
pub const LEASE_MIN: Duration = Duration::from_millis(100);

/// Why the VLDB refused a pair call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseRefusal {
    /// The caller has not joined the pair.
    NotMember,
    /// The pair already has two other members.
    Full { members: Vec<String> },
    /// Acquire refused: another member holds an unexpired lease, or the epoch moved.
    Held {
        epoch: u64,
        active: Option<String>,
        left: Duration,
    },
    /// Renew or release refused: the caller's lease expired or the epoch moved on.
    Lost { epoch: u64 },
    /// A lease length outside `LEASE_MIN..=LEASE_MAX`.
    BadLength,
}

/// One pair as the VLDB keeps it. `epoch`, `active` and `members` are durable;
/// `expires` lives in memory (a restarted VLDB grants the holder one whole lease).
///
/// The VLDB moves a pair from epoch `e` to `e + 1` only by a compare-and-set on `e`
/// (`acquire`), and only once the lease of `e` has expired on the VLDB's clock or was
/// released. The whole argument is in `docs/pair-lease.md`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PairLease {
    pub members: Vec<String>,
    pub epoch: u64,
    pub active: Option<String>,
    /// When the active's lease ends, on the VLDB's clock.
    pub expires: Millis,
    /// The member a planned switchover hands the lease to: it may acquire at once.
    pub successor: Option<String>,
    /// Counts the grants, renewals and releases applied (durable): an acquire decided
    /// by a replicated VLDB's leader carries the `seq` its check saw, so the decision
    /// fails if anything changed the lease between the check and the apply.
    pub seq: u64,
}

impl PairLease {
    /// Adds `member`; joining twice is a no-op. Returns whether the members changed.
    pub fn join(&mut self, member: &str) -> Result<bool, LeaseRefusal> {
        if self.members.iter().any(|m| m == member) {
            return Ok(false);
        }
        if self.members.len() >= MEMBERS_MAX {
            return Err(LeaseRefusal::Full {
                members: self.members.clone(),
            });
        }
        self.members.push(member.to_owned());
        Ok(true)
    }

    /// How long the current lease still runs at `now`; zero when nobody holds it.
    pub fn left(&self, now: Millis) -> Duration {
        match self.active {
            Some(_) => now.until(self.expires),
            None => Duration::ZERO,
        }
    }

    /// Compare-and-set: grants `member` the lease of epoch `epoch + 1` if the pair is at
    /// `epoch` and its lease is free, expired, or handed to `member`. Returns the new epoch,
    /// which the caller must make durable before answering. A single decider's
    /// `check_acquire` then `apply_acquire`.
    pub fn acquire(
        &mut self,
        member: &str,
        epoch: u64,
        lease: Duration,
        now: Millis,
    ) -> Result<u64, LeaseRefusal> {
        let seq = self.check_acquire(member, epoch, lease, now)?;
        self.apply_acquire(member, epoch, seq, lease, now)
    }

    /// The leader's half of `acquire`, on its own clock: may `member` take epoch
    /// `epoch + 1` now? Returns the `seq` the decision saw, for `apply_acquire` to compare.
    pub fn check_acquire(
        &self,
        member: &str,
        epoch: u64,
        lease: Duration,
        now: Millis,
    ) -> Result<u64, LeaseRefusal> {
        self.check_candidate(member, lease)?;
        let handed_to_caller = self.successor.as_deref() == Some(member);
        let free = self.left(now).is_zero() || handed_to_caller;
        if epoch != self.epoch || !free {
            return Err(self.held(now));
        }
        Ok(self.seq)
    }

    /// Every replica's half of `acquire`, applied from the log: deterministic, it compares
    /// the epoch and the `seq` the leader's check saw, so a renewal, release or grant
    /// applied in between makes it fail everywhere alike. The expiry starts at `now`, the
    /// replica's own clock when it applies, which is never before the member sent the call.
    pub fn apply_acquire(
        &mut self,
        member: &str,
        epoch: u64,
        seq: u64,
        lease: Duration,
        now: Millis,
    ) -> Result<u64, LeaseRefusal> {
        self.check_candidate(member, lease)?;
        if epoch != self.epoch || seq != self.seq {
            return Err(self.held(now));
        }
        self.epoch += 1;
        self.seq += 1;
        self.active = Some(member.to_owned());
        self.expires = now.saturating_add(lease);
        self.successor = None;
        Ok(self.epoch)
    }

    /// The active extends its lease to `now + lease`. An expired lease is not revived:
    /// the member may already have fenced itself, and the partner may be about to take
    /// over; it must acquire a new epoch instead.
    pub fn renew(
        &mut self,
        member: &str,
        epoch: u64,
        lease: Duration,
        now: Millis,
    ) -> Result<(), LeaseRefusal> {
        self.check_renew(member, epoch, lease, now)?;
        self.apply_renew(member, epoch, lease, now)
    }

    /// The leader's half of `renew`: the caller holds an unexpired lease of `epoch` on
    /// the leader's clock, and no successor is named.
    pub fn check_renew(
        &self,
        member: &str,
        epoch: u64,
        lease: Duration,
        now: Millis,
    ) -> Result<(), LeaseRefusal> {
        check_length(lease)?;
        if !self.holds(member, epoch, now) || self.successor.is_some() {
            return Err(LeaseRefusal::Lost { epoch: self.epoch });
        }
        Ok(())
    }

    /// Every replica's half of `renew`: deterministic on the durable fields; the expiry
    /// is this replica's `now` plus the lease.
    pub fn apply_renew(
        &mut self,
        member: &str,
        epoch: u64,
        lease: Duration,
        now: Millis,
    ) -> Result<(), LeaseRefusal> {
        check_length(lease)?;
        if !self.is_holder(member, epoch) || self.successor.is_some() {
            return Err(LeaseRefusal::Lost { epoch: self.epoch });
        }
        self.seq += 1;
        self.expires = now.saturating_add(lease);
        Ok(())
    }

    /// The active gives the lease up at once, optionally to `successor` (a member).
    pub fn release(
        &mut self,
        member: &str,
        epoch: u64,
        successor: Option<&str>,
        now: Millis,
    ) -> Result<(), LeaseRefusal> {
        if !self.holds(member, epoch, now) {
            return Err(LeaseRefusal::Lost { epoch: self.epoch });
        }
        self.apply_release(member, epoch, successor, now)
    }

    /// Every replica's half of `release` (the leader checks with `check_renew`'s
    /// holder test first): deterministic on the durable fields.
    pub fn apply_release(
        &mut self,
        member: &str,
        epoch: u64,
        successor: Option<&str>,
        now: Millis,
    ) -> Result<(), LeaseRefusal> {
        if !self.is_holder(member, epoch) {
            return Err(LeaseRefusal::Lost { epoch: self.epoch });
        }
        if let Some(successor) = successor
            && !self.members.iter().any(|m| m == successor)
        {
            return Err(LeaseRefusal::NotMember);
        }
        self.seq += 1;
        self.expires = now;
        self.successor = successor.map(str::to_owned);
        Ok(())
    }

    /// Whether `member` holds an unexpired lease of `epoch` at `now`.
    pub fn holds(&self, member: &str, epoch: u64, now: Millis) -> bool {
        self.is_holder(member, epoch) && !self.left(now).is_zero()
    }

    /// Whether `member` holds the lease of `epoch`, expired or not: what an apply, which
    /// reads no clock, can know.
    fn is_holder(&self, member: &str, epoch: u64) -> bool {
        self.active.as_deref() == Some(member) && epoch == self.epoch
    }

    /// An acquire's first checks: a lease length in range, asked by a member.
    fn check_candidate(&self, member: &str, lease: Duration) -> Result<(), LeaseRefusal> {
        check_length(lease)?;
        if self.members.iter().any(|m| m == member) {
            Ok(())
        } else {
            Err(LeaseRefusal::NotMember)
        }
    }

    fn held(&self, now: Millis) -> LeaseRefusal {
        LeaseRefusal::Held {
            epoch: self.epoch,
            active: self.active.clone(),
            left: self.left(now),
        }
    }

    /// A VLDB that restarted knows epochs and holders but not expiries: the holder gets
    /// one whole lease from now, so a live active keeps its pair and a dead one is
    /// replaced after one lease.
    pub fn restarted(&mut self, lease: Duration, now: Millis) {
        self.expires = now.saturating_add(lease.min(LEASE_MAX));
    }
}

fn check_length(lease: Duration) -> Result<(), LeaseRefusal> {
    if (LEASE_MIN..=LEASE_MAX).contains(&lease) {
        Ok(())
    } else {
        Err(LeaseRefusal::BadLength)
    }
}

/// A member's own view of its lease: until when it may accept requests and write.
///
/// A member acts only until `sent + lease - margin` on its own clock, where `sent` is
/// when it sent the call that the VLDB answered. The VLDB measured the same lease from a
/// later instant, so the member stops before the VLDB can hand the pair on, as long as
/// the two clocks run at the same rate within `margin / lease`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberLease {
    /// The lease the member asks for.
    pub lease: Duration,
    /// How much earlier than the VLDB's expiry the member stops: covers clock-rate
    /// differences and the gap between a fence check and the write it guards.
    pub margin: Duration,
    epoch: u64,
    valid_until: Option<Millis>,
}

impl MemberLease {
    /// `margin` must be shorter than `lease`; a fifth of it is the usual choice.
    pub fn new(lease: Duration, margin: Duration) -> MemberLease {
        MemberLease {
            lease,
            margin: margin.min(lease / 2),
            epoch: 0,
            valid_until: None,
        }
    }

    /// The VLDB granted or renewed the lease of `epoch` for a call sent at `sent`.
    pub fn granted(&mut self, epoch: u64, sent: Millis) {
        if epoch < self.epoch {
            // A late answer to a renewal of an older epoch says nothing about this one:
            // taking it would roll the epoch back and cut the current lease short.
            return;
        }
        let until = Millis(
            sent.saturating_add(self.lease)
                .0
                .saturating_sub(duration_ms(self.margin)),
        );
        if self.epoch != epoch {
            self.epoch = epoch;
            self.valid_until = Some(until);
        } else {
            // A late answer to an older renewal never shortens a newer one.
            self.valid_until = Some(self.valid_until.map_or(until, |u| u.max(until)));
        }
    }

    /// The lease is gone (refused, released, or given up): stop at once.
    pub fn lost(&mut self) {
        self.valid_until = None;
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Until when the member may act, if it holds a lease at all.
    pub fn valid_until(&self) -> Option<Millis> {
        self.valid_until
    }

    pub fn is_valid(&self, now: Millis) -> bool {
        self.valid_until.is_some_and(|until| now < until)
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(2);

    fn pair() -> PairLease {
        let mut pair = PairLease::default();
        pair.join("a").unwrap();
        pair.join("b").unwrap();
        pair
    }

    #[test]
    fn a_third_member_is_refused_and_joining_twice_is_a_no_op() {
        let mut pair = pair();
        assert_eq!(pair.join("a"), Ok(false));
        assert!(matches!(pair.join("c"), Err(LeaseRefusal::Full { .. })));
    }

    #[test]
    fn the_epoch_moves_only_by_compare_and_set_after_expiry() {
        let mut pair = pair();
        assert_eq!(pair.acquire("a", 0, LEASE, Millis(0)), Ok(1));
        // b cannot take it while a's lease runs, nor with a stale epoch later.
        assert!(matches!(
            pair.acquire("b", 1, LEASE, Millis(1_999)),
            Err(LeaseRefusal::Held { epoch: 1, .. })
        ));
        assert!(matches!(
            pair.acquire("b", 0, LEASE, Millis(5_000)),
            Err(LeaseRefusal::Held { .. })
        ));
        assert_eq!(pair.acquire("b", 1, LEASE, Millis(2_000)), Ok(2));
        // a's renewal of epoch 1 is refused now.
        assert_eq!(
            pair.renew("a", 1, LEASE, Millis(2_001)),
            Err(LeaseRefusal::Lost { epoch: 2 })
        );
    }

    #[test]
    fn an_expired_lease_is_not_revived_by_a_renewal() {
        let mut pair = pair();
        pair.acquire("a", 0, LEASE, Millis(0)).unwrap();
        assert_eq!(pair.renew("a", 1, LEASE, Millis(1_000)), Ok(()));
        assert_eq!(
            pair.renew("a", 1, LEASE, Millis(3_000)),
            Err(LeaseRefusal::Lost { epoch: 1 })
        );
    }

    #[test]
    fn an_acquire_decided_before_a_renewal_applied_fails_when_applied_after_it() {
        let mut leader = pair();
        leader.acquire("a", 0, LEASE, Millis(0)).unwrap();
        // The leader's clock says a's lease ran out, so it decides for b...
        let seq = leader.check_acquire("b", 1, LEASE, Millis(2_000)).unwrap();
        // ...but a renewal of a's, decided earlier, reaches the log first.
        let mut replica = leader.clone();
        replica.apply_renew("a", 1, LEASE, Millis(2_001)).unwrap();
        assert!(matches!(
            replica.apply_acquire("b", 1, seq, LEASE, Millis(2_002)),
            Err(LeaseRefusal::Held { epoch: 1, .. })
        ));
        // Applied in the other order, the renewal is the one that fails.
        assert_eq!(
            leader.apply_acquire("b", 1, seq, LEASE, Millis(2_001)),
            Ok(2)
        );
        assert_eq!(
            leader.apply_renew("a", 1, LEASE, Millis(2_002)),
            Err(LeaseRefusal::Lost { epoch: 2 })
        );
    }

    #[test]
    fn a_release_hands_over_at_once_to_the_successor_only() {
        let mut pair = pair();
        pair.acquire("a", 0, LEASE, Millis(0)).unwrap();
        pair.release("a", 1, Some("b"), Millis(100)).unwrap();
        assert_eq!(pair.acquire("b", 1, LEASE, Millis(101)), Ok(2));
        assert_eq!(pair.successor, None);
    }

    #[test]
    fn outsiders_and_odd_lengths_are_refused() {
        let mut pair = pair();
        assert_eq!(
            pair.acquire("z", 0, LEASE, Millis(0)),
            Err(LeaseRefusal::NotMember)
        );
        assert_eq!(
            pair.acquire("a", 0, Duration::from_secs(3_600), Millis(0)),
            Err(LeaseRefusal::BadLength)
        );
    }

    #[test]
    fn a_member_stops_a_margin_before_the_vldb_can_hand_over() {
        let mut member = MemberLease::new(LEASE, Duration::from_millis(400));
        member.granted(1, Millis(1_000));
        assert!(member.is_valid(Millis(2_599)));
        assert!(!member.is_valid(Millis(2_600)));
        // A late answer to an older renewal does not shorten the lease.
        member.granted(1, Millis(1_500));
        member.granted(1, Millis(1_200));
        assert_eq!(member.valid_until(), Some(Millis(3_100)));
        member.lost();
        assert!(!member.is_valid(Millis(1_600)));
    }

    #[test]
    fn a_late_answer_about_an_older_epoch_leaves_the_lease_alone() {
        let mut member = MemberLease::new(LEASE, Duration::from_millis(400));
        member.granted(1, Millis(0));
        member.granted(2, Millis(5_000));
        // A renewal of epoch 1, answered after the member acquired epoch 2.
        member.granted(1, Millis(1_000));
        assert_eq!(member.epoch(), 2);
        assert_eq!(member.valid_until(), Some(Millis(6_600)));
        assert!(member.is_valid(Millis(5_100)));
    }
}
