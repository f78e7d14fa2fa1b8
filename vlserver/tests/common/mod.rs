//! What more than one of the vlserver's test files needs.
//! Invariant: nothing here asserts; the tests do.

// Each test file uses some of these.
#![allow(dead_code)]

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

/// Makes the `Store` file at `path` what format 2 wrote: without the protection
/// database's tables.
pub fn as_format_2_file(path: &Path) {
    const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
    let db = Database::open(path).unwrap();
    let txn = db.begin_write().unwrap();
    txn.open_table(META)
        .unwrap()
        .insert("format_version", 2)
        .unwrap();
    for name in ["pts_entries", "pts_names", "pts_members", "pts_groups"] {
        txn.delete_table(TableDefinition::<u64, u64>::new(name))
            .unwrap();
    }
    txn.commit().unwrap();
}
