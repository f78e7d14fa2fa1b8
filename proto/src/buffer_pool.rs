//! A bounded pool of large byte buffers reused along the data path (frame bodies, store
//! payloads, FUSE write copies and read replies): a stream of 1-2 MiB transfers reuses
//! memory already faulted in rather than mapping, zeroing and unmapping fresh pages for
//! each (glibc maps every such buffer on its own and unmaps it at `free`).
//! Invariant: the pool holds at most `POOL_BYTES_MAX` bytes of capacity, only buffers of
//! at least `POOLED_BYTES_MIN`, and none idle for longer than `IDLE_MAX` once a runtime
//! has run its reaper since.

use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;

/// Smaller buffers come from the allocator's arenas, which reuse them well already.
pub const POOLED_BYTES_MIN: usize = 256 << 10;
/// What the pool keeps at most: a write-back's window of stores, or a reader's fetches
/// in flight, on either side of a connection.
const POOL_BYTES_MAX: usize = 24 << 20;
/// A buffer unused this long goes back to the allocator (and so to the system): memory
/// held for a burst returns once it has passed.
const IDLE_MAX: Duration = Duration::from_secs(1);

static POOL: Mutex<Shared> = Mutex::new(Shared {
    pool: Pool::new(POOL_BYTES_MAX),
    reaper: false,
});

struct Shared {
    pool: Pool,
    /// A reaper task is running.
    reaper: bool,
}

/// The free buffers and what they hold; pure (the caller gives the time).
struct Pool {
    /// Free buffers, each with when it was given back.
    buffers: Vec<(Vec<u8>, Instant)>,
    /// Their capacities added up.
    bytes: usize,
    bytes_max: usize,
}

impl Pool {
    const fn new(bytes_max: usize) -> Pool {
        Pool {
            buffers: Vec::new(),
            bytes: 0,
            bytes_max,
        }
    }

    /// The smallest buffer with room for `capacity` bytes, emptied.
    fn take(&mut self, capacity: usize) -> Option<Vec<u8>> {
        if capacity < POOLED_BYTES_MIN {
            return None;
        }
        let best = self
            .buffers
            .iter()
            .enumerate()
            .filter(|(_, (buffer, _))| buffer.capacity() >= capacity)
            .min_by_key(|(_, (buffer, _))| buffer.capacity())
            .map(|(i, _)| i)?;
        let (mut buffer, _) = self.buffers.swap_remove(best);
        self.bytes -= buffer.capacity();
        buffer.clear();
        Some(buffer)
    }

    /// Keeps `buffer` when it is large enough and there is room; else hands it back, to
    /// be freed outside the lock.
    fn give_back(&mut self, buffer: Vec<u8>, now: Instant) -> Option<Vec<u8>> {
        if buffer.capacity() < POOLED_BYTES_MIN || self.bytes + buffer.capacity() > self.bytes_max {
            return Some(buffer);
        }
        self.bytes += buffer.capacity();
        self.buffers.push((buffer, now));
        None
    }

    /// Removes the buffers idle for `IDLE_MAX` or longer, to be freed outside the lock.
    fn expire(&mut self, now: Instant) -> Vec<Vec<u8>> {
        let mut expired = Vec::new();
        let mut i = 0;
        while i < self.buffers.len() {
            if now.saturating_duration_since(self.buffers[i].1) >= IDLE_MAX {
                let (buffer, _) = self.buffers.swap_remove(i);
                self.bytes -= buffer.capacity();
                expired.push(buffer);
            } else {
                i += 1;
            }
        }
        expired
    }
}

/// An empty buffer with room for at least `capacity` bytes: the smallest pooled one that
/// is large enough, else a new one of exactly `capacity`.
pub fn take(capacity: usize) -> Vec<u8> {
    take_pooled(capacity).unwrap_or_else(|| Vec::with_capacity(capacity))
}

/// The smallest pooled buffer with room for `capacity` bytes, emptied; `None` when none
/// is large enough (or `capacity` is too small to be pooled).
pub fn take_pooled(capacity: usize) -> Option<Vec<u8>> {
    if capacity < POOLED_BYTES_MIN {
        return None;
    }
    POOL.lock().pool.take(capacity)
}

/// Keeps `buffer` for a later `take` when it is large enough and the pool has room;
/// else frees it.
pub fn give_back(buffer: Vec<u8>) {
    if buffer.capacity() < POOLED_BYTES_MIN {
        return;
    }
    let now = Instant::now();
    let mut shared = POOL.lock();
    let expired = shared.pool.expire(now);
    let refused = shared.pool.give_back(buffer, now);
    if refused.is_none() {
        start_reaper(&mut shared);
    }
    drop(shared);
    drop((expired, refused));
}

/// `Bytes` over `buffer`'s content; a buffer large enough to pool goes back to the pool
/// when the last `Bytes` over it is dropped.
pub fn into_bytes(buffer: Vec<u8>) -> Bytes {
    if buffer.capacity() < POOLED_BYTES_MIN {
        return Bytes::from(buffer);
    }
    Bytes::from_owner(Pooled(buffer))
}

/// A buffer lent to `Bytes`, given back when they drop it.
struct Pooled(Vec<u8>);

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        give_back(std::mem::take(&mut self.0));
    }
}

/// Starts the task that frees idle buffers, on the current tokio runtime, unless one
/// runs; it ends once the pool is empty. Without a runtime (a plain thread giving a
/// buffer back) the next `give_back` on a runtime starts it.
fn start_reaper(shared: &mut Shared) {
    if shared.reaper {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    shared.reaper = true;
    runtime.spawn(async {
        loop {
            tokio::time::sleep(IDLE_MAX).await;
            let mut shared = POOL.lock();
            let expired = shared.pool.expire(Instant::now());
            let empty = shared.pool.buffers.is_empty();
            if empty {
                shared.reaper = false;
            }
            drop(shared);
            drop(expired);
            if empty {
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn the_smallest_buffer_that_fits_is_taken_emptied() {
        let now = Instant::now();
        let mut pool = Pool::new(8 * MIB);
        for size in [2 * MIB, MIB, 3 * MIB] {
            let mut buffer = Vec::with_capacity(size);
            buffer.push(1);
            assert!(pool.give_back(buffer, now).is_none());
        }
        let taken = pool.take(MIB + 1).unwrap();
        assert!(taken.is_empty());
        assert_eq!(taken.capacity(), 2 * MIB);
        assert!(pool.take(4 * MIB).is_none(), "none large enough");
        assert_eq!(pool.bytes, 4 * MIB);
        assert!(
            pool.take(100).is_none(),
            "small ones come from the allocator"
        );
    }

    #[test]
    fn the_pool_keeps_no_small_buffer_and_nothing_past_its_bound() {
        let now = Instant::now();
        let mut pool = Pool::new(3 * MIB);
        let small = Vec::with_capacity(POOLED_BYTES_MIN - 1);
        assert!(pool.give_back(small, now).is_some());
        assert!(pool.give_back(Vec::with_capacity(2 * MIB), now).is_none());
        assert!(pool.give_back(Vec::with_capacity(2 * MIB), now).is_some());
        assert_eq!(pool.bytes, 2 * MIB);
    }

    #[test]
    fn idle_buffers_expire() {
        let start = Instant::now();
        let mut pool = Pool::new(8 * MIB);
        assert!(pool.give_back(Vec::with_capacity(MIB), start).is_none());
        let later = start + IDLE_MAX / 2;
        assert!(pool.give_back(Vec::with_capacity(2 * MIB), later).is_none());
        assert!(pool.expire(later).is_empty());
        let expired = pool.expire(start + IDLE_MAX);
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].capacity(), MIB);
        assert_eq!(pool.bytes, 2 * MIB);
    }

    #[test]
    fn bytes_over_a_pooled_buffer_give_it_back_when_the_last_slice_drops() {
        // An unusual size, so no other test running meanwhile takes this buffer.
        let size = POOLED_BYTES_MIN + 4099;
        let mut buffer = take(size);
        buffer.resize(size, 7);
        let address = buffer.as_ptr();
        let bytes = into_bytes(buffer);
        let slice = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(&slice[..], &[7u8; 10]);
        drop(slice);
        let mut found = false;
        // Other tests may have given back buffers that fit too; the smallest fit is this
        // one unless one of exactly this size exists, which none makes.
        if let Some(again) = take_pooled(size) {
            found = again.as_ptr() == address;
            assert!(again.is_empty());
        }
        assert!(found, "the buffer went back to the pool");
    }
}
