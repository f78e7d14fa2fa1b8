//! Sequenced namespace changes: the key naming one, and its answer, applied or replayed.
//! Invariant: a change commits with its outcome record in the transaction that looked its
//! key up first, so a key is applied at most once while its record is kept.

use proto::{ClientId, ErrorCode, InstanceNonce, Response};

/// How many sequence numbers back a retry is still answered from the record. A cache
/// manager retries only its requests in flight, far fewer than this.
pub const SEQ_WINDOW: u64 = 65_536;

/// Names one sequenced request: the client, its instance, and its sequence number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SequenceKey {
    pub client: ClientId,
    pub instance: InstanceNonce,
    pub seq: u64,
}

/// A sequenced change: applied now, or answered from the record of an earlier attempt.
#[derive(Debug)]
pub enum Outcome<T> {
    Applied(T),
    /// Boxed: a recorded answer is much larger than most applied values.
    Replayed(Box<Result<Response, ErrorCode>>),
}

/// What a namespace change answers, without callback grants: what the record keeps.
pub trait Answer {
    fn answer(&self) -> Response;
}
