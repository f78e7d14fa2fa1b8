//! Time as the pure tables see it: milliseconds since the owning server started.
//! Invariant: the server passes a monotonic value; the tables never read a clock.

use std::time::Duration;

/// Milliseconds since an origin chosen by the caller (the server's start).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Millis(pub u64);

impl Millis {
    pub fn saturating_add(self, duration: Duration) -> Millis {
        let added = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        Millis(self.0.saturating_add(added))
    }

    /// The time left from `self` until `later`, zero if `later` has passed.
    pub fn until(self, later: Millis) -> Duration {
        Duration::from_millis(later.0.saturating_sub(self.0))
    }
}
