//! `Activity`: what a server knows of one connection's traffic (when its peer last sent a
//! byte, how far it got, what is in flight) and the switch that closes it from outside.
//! Invariant: once `evict` is called the connection's reader and serving task end
//! promptly, and the first eviction's reason is the one kept.

use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How far a connection got: the order in which it becomes worth keeping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Accepted; no `Hello` yet.
    Handshake,
    /// Said hello; no request yet.
    Established,
    /// Sent at least one request.
    Served,
}

/// Why a connection was closed from outside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Eviction {
    /// The server was at its connection cap and a newcomer needed the slot.
    ConnectionsFull,
    /// The peer's address was at its connection cap and a newcomer from it needed the slot.
    PeerFull,
    /// It held frame memory without sending a byte while other frames waited for it.
    StalledUnderPressure,
}

impl std::fmt::Display for Eviction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Eviction::ConnectionsFull => "the server is at its connection cap",
            Eviction::PeerFull => "its address is at its connection cap",
            Eviction::StalledUnderPressure => {
                "it held frame memory without sending while other frames waited"
            }
        })
    }
}

/// Shared by a connection's reader, its serving task and the server's admission table.
#[derive(Debug)]
pub struct Activity {
    base: Instant,
    /// Milliseconds after `base` when the peer last sent a byte (or the connection opened).
    last_received_ms: AtomicU64,
    stage: AtomicU8,
    /// Requests being answered plus calls waiting for an answer, both directions.
    in_flight: AtomicUsize,
    evicted: CancellationToken,
    eviction: Mutex<Option<Eviction>>,
}

impl Default for Activity {
    fn default() -> Self {
        Activity::new()
    }
}

impl Activity {
    pub fn new() -> Activity {
        Activity {
            base: Instant::now(),
            last_received_ms: AtomicU64::new(0),
            stage: AtomicU8::new(Stage::Handshake as u8),
            in_flight: AtomicUsize::new(0),
            evicted: CancellationToken::new(),
            eviction: Mutex::new(None),
        }
    }

    /// The peer sent bytes just now.
    pub fn received(&self) {
        let now = self.base.elapsed().as_millis() as u64;
        self.last_received_ms.store(now, Ordering::Relaxed);
    }

    /// When the peer last sent a byte (or the connection opened).
    pub fn last_received(&self) -> Instant {
        self.base + Duration::from_millis(self.last_received_ms.load(Ordering::Relaxed))
    }

    /// How long the peer has sent nothing, as of `now`.
    pub fn silent_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_received())
    }

    pub fn stage(&self) -> Stage {
        match self.stage.load(Ordering::Relaxed) {
            0 => Stage::Handshake,
            1 => Stage::Established,
            _ => Stage::Served,
        }
    }

    /// Moves the connection on to `stage`; it never moves back.
    pub fn reached(&self, stage: Stage) {
        self.stage.fetch_max(stage as u8, Ordering::Relaxed);
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts one request or call in flight until the guard drops.
    pub fn begin(self: &std::sync::Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            activity: self.clone(),
        }
    }

    /// Closes the connection from outside; the first reason given is kept.
    pub fn evict(&self, why: Eviction) {
        self.eviction.lock().get_or_insert(why);
        self.evicted.cancel();
    }

    pub fn eviction(&self) -> Option<Eviction> {
        *self.eviction.lock()
    }

    pub fn is_evicted(&self) -> bool {
        self.evicted.is_cancelled()
    }

    /// Resolves once the connection was evicted.
    pub async fn evicted(&self) {
        self.evicted.cancelled().await
    }
}

/// One request or call in flight on a connection.
#[derive(Debug)]
pub struct InFlight {
    activity: std::sync::Arc<Activity>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.activity.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn silence_is_measured_from_the_last_byte() {
        let activity = Activity::new();
        tokio::time::sleep(Duration::from_millis(30)).await;
        let before = activity.silent_for(Instant::now());
        assert!(before >= Duration::from_millis(29), "{before:?}");
        activity.received();
        assert!(activity.silent_for(Instant::now()) < before);
    }

    #[test]
    fn stage_only_moves_forward_and_guards_count_in_flight() {
        let activity = Arc::new(Activity::new());
        activity.reached(Stage::Served);
        activity.reached(Stage::Established);
        assert_eq!(activity.stage(), Stage::Served);
        let one = activity.begin();
        let two = activity.begin();
        assert_eq!(activity.in_flight(), 2);
        drop(one);
        drop(two);
        assert_eq!(activity.in_flight(), 0);
    }

    #[test]
    fn the_first_eviction_reason_is_kept() {
        let activity = Activity::new();
        activity.evict(Eviction::PeerFull);
        activity.evict(Eviction::StalledUnderPressure);
        assert!(activity.is_evicted());
        assert_eq!(activity.eviction(), Some(Eviction::PeerFull));
    }
}
