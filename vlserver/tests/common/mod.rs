//! What more than one of the vlserver's test files needs.
//! Invariant: nothing here asserts; the tests do.

use std::path::Path;

use redb::{Database, TableDefinition};

/// Makes the `Store` file at `path` what a single VLDB wrote: format 1, without the
/// tables a replica adds (`pair_seqs`, `raft`).
pub fn as_single_vldb_file(path: &Path) {
    const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
    const PAIR_SEQS: TableDefinition<&str, u64> = TableDefinition::new("pair_seqs");
    const RAFT: TableDefinition<&str, &[u8]> = TableDefinition::new("raft");
    let db = Database::open(path).unwrap();
    let txn = db.begin_write().unwrap();
    txn.open_table(META)
        .unwrap()
        .insert("format_version", 1)
        .unwrap();
    txn.delete_table(PAIR_SEQS).unwrap();
    txn.delete_table(RAFT).unwrap();
    txn.commit().unwrap();
}
