//! Recorded outcomes of sequenced namespace changes, so that a retry (after a lost reply
//! or a failover) is answered from the record instead of being applied a second time.
//! Invariant: an outcome is written in the same redb transaction as the change it
//! answers, and looked up in the transaction that would apply it; so a change and its
//! record are durable together or not at all, and one key is applied at most once.
//!
//! Table `outcomes`: (client uuid as u128, instance nonce, seq) -> `OutcomeRecord`
//! (postcard: format version, then the answer with every callback grant stripped).
//! Bounded per client: recording seq `s` of an instance drops the client's records of
//! every other instance and those of this instance below `s - SEQ_WINDOW`.

use proto::{ClientId, ErrorCode, InstanceNonce, Response};
use redb::{ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

/// (client, instance, seq) -> encoded `OutcomeRecord`.
const OUTCOMES: TableDefinition<(u128, u64, u64), &[u8]> = TableDefinition::new("outcomes");
/// Format version of `OutcomeRecord`.
const OUTCOME_FORMAT: u16 = 1;
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

impl SequenceKey {
    fn key(&self) -> (u128, u64, u64) {
        (self.client.0.as_u128(), self.instance.0, self.seq)
    }
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

#[derive(Serialize, Deserialize)]
struct OutcomeRecord {
    format: u16,
    answer: Result<Response, ErrorCode>,
}

/// The recorded answer of `key`, if any.
pub(super) fn find(
    txn: &WriteTransaction,
    key: &SequenceKey,
) -> Result<Option<Result<Response, ErrorCode>>, FindError> {
    let table = txn.open_table(OUTCOMES).map_err(redb_error)?;
    let Some(bytes) = table.get(key.key()).map_err(redb_error)? else {
        return Ok(None);
    };
    let record: OutcomeRecord =
        postcard::from_bytes(bytes.value()).map_err(|e| FindError::Corrupt(e.to_string()))?;
    if record.format != OUTCOME_FORMAT {
        return Err(FindError::Corrupt(format!(
            "outcome record format {}",
            record.format
        )));
    }
    Ok(Some(record.answer))
}

/// Records `answer` under `key` and prunes the client's older records.
pub(super) fn record(
    txn: &WriteTransaction,
    key: &SequenceKey,
    answer: Result<Response, ErrorCode>,
) -> Result<(), FindError> {
    let bytes = postcard::to_allocvec(&OutcomeRecord {
        format: OUTCOME_FORMAT,
        answer,
    })
    .map_err(|e| FindError::Corrupt(format!("encode outcome: {e}")))?;
    let mut table = txn.open_table(OUTCOMES).map_err(redb_error)?;
    table
        .insert(key.key(), bytes.as_slice())
        .map_err(redb_error)?;
    let client = key.client.0.as_u128();
    let instance = key.instance.0;
    // Older instances sort before this one, and so do this instance's old seqs.
    let oldest_kept = key.seq.saturating_sub(SEQ_WINDOW);
    table
        .retain_in((client, 0, 0)..(client, instance, oldest_kept), |_, _| {
            false
        })
        .map_err(redb_error)?;
    if let Some(next) = instance.checked_add(1) {
        table
            .retain_in((client, next, 0)..=(client, u64::MAX, u64::MAX), |_, _| {
                false
            })
            .map_err(redb_error)?;
    }
    Ok(())
}

/// How many outcomes the table holds (for tests and inspection).
#[cfg(test)]
pub(super) fn count(txn: &WriteTransaction) -> u64 {
    use redb::ReadableTableMetadata;
    txn.open_table(OUTCOMES)
        .map_err(redb::Error::from)
        .and_then(|t| Ok(t.len()?))
        .unwrap_or(0)
}

/// Why an outcome could not be read or written.
#[derive(Debug)]
pub(super) enum FindError {
    Database(redb::Error),
    Corrupt(String),
}

fn redb_error<E: Into<redb::Error>>(e: E) -> FindError {
    FindError::Database(e.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes of an outcome record: a change here is a change of the on-disk format.
    #[test]
    fn golden_bytes() {
        let hex = |answer: Result<Response, ErrorCode>| -> String {
            postcard::to_allocvec(&OutcomeRecord {
                format: OUTCOME_FORMAT,
                answer,
            })
            .unwrap()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
        };
        assert_eq!(hex(Ok(Response::Ok)), "010000");
        assert_eq!(hex(Err(ErrorCode::Exists)), "010102");
    }
}
