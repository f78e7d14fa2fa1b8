//! The fence: until when this process may act on the partition, checked before its redb,
//! data file and metadata log writes, and before and after every request it serves.
//! Invariant: the deadline is read on a process-local monotonic clock, so no wall-clock
//! step can reopen the fence, and a fence closed for good never opens again.

mod backend;

pub use backend::FencedFile;

use std::io;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use state::Millis;

/// The error every fenced write gets.
pub const FENCED: &str =
    "fenced: this server may not write to the partition (pair lease lost or state journal failed)";

/// The bit of `Fence::deadline_ms` that closes it for good; the rest is the deadline.
const CLOSED_FOR_GOOD: u64 = 1 << 63;
/// The deadline of a fence that stays open: some 292 million years of `now()`.
const FOREVER: u64 = CLOSED_FOR_GOOD - 1;

/// An atomic deadline in milliseconds of `now()`, and whether the fence is closed for
/// good, in one word; checked with one load. A pair member keeps the deadline at its
/// lease's end minus a margin (`state::MemberLease`) and closes the fence when it loses
/// the lease; a single server keeps it open for good.
#[derive(Debug)]
pub struct Fence {
    deadline_ms: AtomicU64,
}

impl Fence {
    /// A fence that stays open (until closed for good): a single server's.
    pub fn open() -> Fence {
        Fence {
            deadline_ms: AtomicU64::new(FOREVER),
        }
    }

    /// A closed fence: a pair member's until it wins the lease.
    pub fn closed() -> Fence {
        Fence {
            deadline_ms: AtomicU64::new(0),
        }
    }

    /// Lets the process act until `deadline` on `now()`'s clock, unless the fence was
    /// closed for good.
    pub fn open_until(&self, deadline: Millis) {
        let _ = self
            .deadline_ms
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |current| {
                (current & CLOSED_FOR_GOOD == 0).then_some(deadline.0.min(FOREVER))
            });
    }

    /// Closes the fence until the next `open_until` (a lost lease).
    pub fn close(&self) {
        self.deadline_ms
            .fetch_and(CLOSED_FOR_GOOD, Ordering::SeqCst);
    }

    /// Closes the fence so that no grant opens it again: the process must stop. A state
    /// journal that fails calls it, so that the process neither answers nor writes until
    /// it is started again.
    pub fn close_for_good(&self) {
        self.deadline_ms.store(CLOSED_FOR_GOOD, Ordering::SeqCst);
    }

    /// Whether `close_for_good` was called: the process must stop.
    pub fn is_closed_for_good(&self) -> bool {
        self.deadline_ms.load(Ordering::SeqCst) & CLOSED_FOR_GOOD != 0
    }

    pub fn is_open(&self) -> bool {
        let deadline = self.deadline_ms.load(Ordering::SeqCst);
        deadline & CLOSED_FOR_GOOD == 0 && now().0 < deadline
    }

    /// `Ok` while open; the error a fenced write returns otherwise.
    pub fn check(&self) -> io::Result<()> {
        if self.is_open() {
            Ok(())
        } else {
            Err(fenced())
        }
    }
}

/// Whether `error` (or what it wraps, as text) is a closed fence's refusal.
pub fn refused(error: &dyn std::fmt::Display) -> bool {
    error.to_string().contains(FENCED)
}

/// The io error of a write refused by a closed fence.
pub fn fenced() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, FENCED)
}

fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// Milliseconds on this process's monotonic clock (from its first use).
pub fn now() -> Millis {
    Millis(u64::try_from(origin().elapsed().as_millis()).unwrap_or(u64::MAX))
}

/// The instant `at` on `now()`'s clock, for timers.
pub fn instant_at(at: Millis) -> tokio::time::Instant {
    tokio::time::Instant::from_std(origin() + std::time::Duration::from_millis(at.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fence_opens_until_its_deadline_and_closes() {
        let fence = Fence::closed();
        assert!(fence.check().is_err());
        fence.open_until(now().saturating_add(std::time::Duration::from_secs(60)));
        assert!(fence.check().is_ok());
        fence.open_until(now());
        assert_eq!(fence.check().unwrap_err().to_string(), FENCED);
        assert!(Fence::open().is_open());
    }

    #[test]
    fn a_fence_closed_for_good_never_opens_again() {
        let fence = Fence::open();
        assert!(!fence.is_closed_for_good());
        fence.close_for_good();
        assert!(!fence.is_open());
        assert!(fence.is_closed_for_good());
        fence.open_until(now().saturating_add(std::time::Duration::from_secs(60)));
        assert!(!fence.is_open());
        fence.close();
        fence.open_until(Millis(u64::MAX));
        assert!(fence.check().is_err());
    }
}
