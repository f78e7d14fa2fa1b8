//! Frame memory: one `FrameBudget` shared by every connection of a server, a small
//! `Allowance` of each connection's own, and the `Charge` one frame holds from its header
//! until it is answered.
//! Invariant: the bytes charged to a budget never exceed it, those charged to an allowance
//! never exceed it, and a charge is returned when it drops.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::activity::{Activity, Eviction};

/// Why a frame got no memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BudgetError {
    /// The frame is larger than the whole budget.
    TooLarge { bytes: usize, budget: usize },
    /// The frame's read deadline passed while it waited.
    Timeout,
    /// Its connection was evicted while it waited.
    Evicted,
}

/// Bytes of frames a server may hold at once, across all its connections: frames being
/// received and frames received but not yet answered.
#[derive(Debug)]
pub struct FrameBudget {
    bytes_max: usize,
    /// While a frame waits, a frame still being received whose peer sent nothing for
    /// this long is evicted to make room.
    stall_limit: Duration,
    state: Mutex<BudgetState>,
    released: Notify,
}

#[derive(Debug, Default)]
struct BudgetState {
    used: usize,
    high_water: usize,
    next_id: u64,
    /// Charges of frames still arriving, with their connection and bytes: the
    /// candidates for eviction when others wait.
    receiving: HashMap<u64, (Arc<Activity>, usize)>,
    /// Charges evicted but not yet returned, and their bytes: room on its way, so that
    /// waiters do not evict more than they need.
    evicted: HashMap<u64, usize>,
    evicted_bytes: usize,
}

impl FrameBudget {
    pub fn new(bytes_max: usize, stall_limit: Duration) -> Arc<FrameBudget> {
        Arc::new(FrameBudget {
            bytes_max,
            stall_limit,
            state: Mutex::new(BudgetState::default()),
            released: Notify::new(),
        })
    }

    pub fn bytes_max(&self) -> usize {
        self.bytes_max
    }

    /// Bytes charged now.
    pub fn used(&self) -> usize {
        self.state.lock().used
    }

    /// The most bytes charged at once since the last call; starts over from now.
    pub fn take_high_water(&self) -> usize {
        let mut state = self.state.lock();
        let used = state.used;
        std::mem::replace(&mut state.high_water, used)
    }

    /// Charges `bytes` for a frame of the connection `activity`, waiting until `deadline`
    /// for room. While it waits, the longest-silent frame still arriving is evicted
    /// once its peer has sent nothing for the stall limit.
    pub async fn charge(
        self: &Arc<Self>,
        bytes: usize,
        activity: &Arc<Activity>,
        deadline: Instant,
    ) -> Result<Charge, BudgetError> {
        if bytes > self.bytes_max {
            return Err(BudgetError::TooLarge {
                bytes,
                budget: self.bytes_max,
            });
        }
        let recheck =
            (self.stall_limit / 4).clamp(Duration::from_millis(10), Duration::from_millis(250));
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if let Some(charge) = self.try_charge(bytes, activity) {
                return Ok(charge);
            }
            self.evict_a_stalled_frame(bytes, activity);
            tokio::select! {
                () = &mut released => {}
                () = tokio::time::sleep(recheck) => {}
                () = tokio::time::sleep_until(deadline) => return Err(BudgetError::Timeout),
                () = activity.evicted() => return Err(BudgetError::Evicted),
            }
        }
    }

    fn try_charge(self: &Arc<Self>, bytes: usize, activity: &Arc<Activity>) -> Option<Charge> {
        let mut state = self.state.lock();
        if state.used + bytes > self.bytes_max {
            return None;
        }
        state.used += bytes;
        state.high_water = state.high_water.max(state.used);
        state.next_id += 1;
        let id = state.next_id;
        state.receiving.insert(id, (activity.clone(), bytes));
        Some(Charge {
            held: Held::Budget {
                budget: self.clone(),
                bytes,
                id,
            },
        })
    }

    /// Unless the room `bytes` need is already on its way back, evicts the frame still
    /// arriving whose peer has been silent longest, if that is at least the stall limit;
    /// never `waiting`'s own.
    fn evict_a_stalled_frame(&self, bytes: usize, waiting: &Arc<Activity>) {
        let now = Instant::now();
        let mut state = self.state.lock();
        if state.used + bytes <= self.bytes_max + state.evicted_bytes {
            return;
        }
        let stalled = state
            .receiving
            .iter()
            .filter(|(_, (holder, _))| !Arc::ptr_eq(holder, waiting))
            .map(|(id, (holder, _))| (*id, holder.silent_for(now)))
            .filter(|(_, silent)| *silent >= self.stall_limit)
            .max_by_key(|(_, silent)| *silent);
        if let Some((id, _)) = stalled
            && let Some((holder, held)) = state.receiving.remove(&id)
        {
            state.evicted.insert(id, held);
            state.evicted_bytes += held;
            holder.evict(Eviction::StalledUnderPressure);
        }
    }

    fn release(&self, bytes: usize, id: u64) {
        {
            let mut state = self.state.lock();
            state.used -= bytes;
            state.receiving.remove(&id);
            if let Some(held) = state.evicted.remove(&id) {
                state.evicted_bytes -= held;
            }
        }
        self.released.notify_waiters();
    }

    fn received(&self, id: u64) {
        self.state.lock().receiving.remove(&id);
    }
}

/// Bytes of frames one connection may hold without charging the shared budget: enough
/// for its small requests, so that those never wait behind large frames of others.
#[derive(Debug)]
pub struct Allowance {
    bytes_max: usize,
    held: AtomicUsize,
}

impl Allowance {
    pub fn new(bytes_max: usize) -> Arc<Allowance> {
        Arc::new(Allowance {
            bytes_max,
            held: AtomicUsize::new(0),
        })
    }

    /// Takes `bytes` if they fit.
    fn try_take(self: &Arc<Self>, bytes: usize) -> Option<Charge> {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held + bytes <= self.bytes_max).then_some(held + bytes)
            })
            .ok()?;
        Some(Charge {
            held: Held::Allowance {
                allowance: self.clone(),
                bytes,
            },
        })
    }
}

/// The memory one frame holds, from its header until it is answered.
#[derive(Debug)]
pub struct Charge {
    held: Held,
}

#[derive(Debug)]
enum Held {
    /// Not counted: a client's connection, which bounds nothing.
    Nothing,
    Allowance {
        allowance: Arc<Allowance>,
        bytes: usize,
    },
    Budget {
        budget: Arc<FrameBudget>,
        bytes: usize,
        id: u64,
    },
}

impl Charge {
    /// A charge that holds nothing.
    pub fn none() -> Charge {
        Charge {
            held: Held::Nothing,
        }
    }

    /// The whole frame has arrived: it is no longer a candidate for eviction.
    pub fn received(&self) {
        if let Held::Budget { budget, id, .. } = &self.held {
            budget.received(*id);
        }
    }

    /// Bytes this charge holds of the shared budget.
    pub fn budget_bytes(&self) -> usize {
        match &self.held {
            Held::Budget { bytes, .. } => *bytes,
            Held::Nothing | Held::Allowance { .. } => 0,
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        match &self.held {
            Held::Nothing => {}
            Held::Allowance { allowance, bytes } => {
                allowance.held.fetch_sub(*bytes, Ordering::AcqRel);
            }
            Held::Budget { budget, bytes, id } => budget.release(*bytes, *id),
        }
    }
}

/// Where one connection's frames take their memory from.
#[derive(Clone, Debug)]
pub struct Intake {
    pub activity: Arc<Activity>,
    allowance: Arc<Allowance>,
    budget: Option<Arc<FrameBudget>>,
}

impl Intake {
    /// A server's connection: its own allowance first, then the shared budget.
    pub fn bounded(
        activity: Arc<Activity>,
        allowance_bytes: usize,
        budget: Arc<FrameBudget>,
    ) -> Intake {
        Intake {
            activity,
            allowance: Allowance::new(allowance_bytes),
            budget: Some(budget),
        }
    }

    /// A client's connection: frames are not counted (they answer its own calls).
    pub fn unbounded() -> Intake {
        Intake {
            activity: Arc::new(Activity::new()),
            allowance: Allowance::new(0),
            budget: None,
        }
    }

    /// Memory for a frame of `bytes`, waiting for the budget until `deadline`.
    pub async fn charge(&self, bytes: usize, deadline: Instant) -> Result<Charge, BudgetError> {
        let Some(budget) = &self.budget else {
            return Ok(Charge::none());
        };
        if let Some(charge) = self.allowance.try_take(bytes) {
            return Ok(charge);
        }
        budget.charge(bytes, &self.activity, deadline).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALL: Duration = Duration::from_millis(40);

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    #[tokio::test]
    async fn charges_stay_within_the_budget_and_return_when_dropped() {
        let budget = FrameBudget::new(100, STALL);
        let activity = Arc::new(Activity::new());
        let a = budget.charge(60, &activity, far()).await.unwrap();
        let b = budget.charge(40, &activity, far()).await.unwrap();
        assert_eq!(budget.used(), 100);
        assert!(budget.try_charge(1, &activity).is_none());
        drop(a);
        assert_eq!(budget.used(), 40);
        drop(b);
        assert_eq!(budget.used(), 0);
        assert_eq!(budget.take_high_water(), 100);
        assert_eq!(budget.take_high_water(), 0);
    }

    #[tokio::test]
    async fn a_frame_larger_than_the_budget_is_refused_at_once() {
        let budget = FrameBudget::new(100, STALL);
        let activity = Arc::new(Activity::new());
        assert_eq!(
            budget.charge(101, &activity, far()).await.unwrap_err(),
            BudgetError::TooLarge {
                bytes: 101,
                budget: 100
            }
        );
    }

    #[tokio::test]
    async fn a_waiting_frame_gets_the_bytes_another_returns() {
        let budget = FrameBudget::new(100, Duration::from_secs(3600));
        let activity = Arc::new(Activity::new());
        let first = budget.charge(100, &activity, far()).await.unwrap();
        let waiter = {
            let budget = budget.clone();
            let activity = activity.clone();
            tokio::spawn(async move { budget.charge(50, &activity, far()).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        drop(first);
        let second = waiter.await.unwrap().unwrap();
        assert_eq!(second.budget_bytes(), 50);
    }

    #[tokio::test]
    async fn a_wait_ends_at_the_frame_deadline() {
        let budget = FrameBudget::new(100, Duration::from_secs(3600));
        let activity = Arc::new(Activity::new());
        let _held = budget.charge(100, &activity, far()).await.unwrap();
        let deadline = Instant::now() + Duration::from_millis(50);
        assert_eq!(
            budget.charge(1, &activity, deadline).await.unwrap_err(),
            BudgetError::Timeout
        );
        assert!(Instant::now() >= deadline);
    }

    #[tokio::test]
    async fn under_pressure_the_longest_silent_arriving_frame_is_evicted() {
        let budget = FrameBudget::new(100, STALL);
        let silent = Arc::new(Activity::new());
        let talking = Arc::new(Activity::new());
        let done = Arc::new(Activity::new());
        let held_silent = budget.charge(40, &silent, far()).await.unwrap();
        let _held_talking = budget.charge(30, &talking, far()).await.unwrap();
        let held_done = budget.charge(30, &done, far()).await.unwrap();
        // A frame that has wholly arrived waits for its handler, not for its peer.
        held_done.received();
        tokio::time::sleep(STALL * 2).await;
        talking.received();
        let waiting = Arc::new(Activity::new());
        let waiter = {
            let budget = budget.clone();
            let waiting = waiting.clone();
            tokio::spawn(async move { budget.charge(40, &waiting, far()).await })
        };
        silent.evicted().await;
        assert_eq!(silent.eviction(), Some(Eviction::StalledUnderPressure));
        assert!(!talking.is_evicted() && !done.is_evicted());
        // The evicted connection's reader drops its charge; the waiter gets the room.
        drop(held_silent);
        assert_eq!(waiter.await.unwrap().unwrap().budget_bytes(), 40);
    }

    #[tokio::test]
    async fn small_frames_use_the_connection_allowance_first() {
        let budget = FrameBudget::new(1000, STALL);
        let intake = Intake::bounded(Arc::new(Activity::new()), 100, budget.clone());
        let small = intake.charge(60, far()).await.unwrap();
        assert_eq!((small.budget_bytes(), budget.used()), (0, 0));
        // The allowance is per connection and holds 100: the next 60 go to the budget.
        let next = intake.charge(60, far()).await.unwrap();
        assert_eq!(budget.used(), 60);
        drop((small, next));
        assert_eq!(budget.used(), 0);
        let again = intake.charge(100, far()).await.unwrap();
        assert_eq!(again.budget_bytes(), 0);
    }
}
