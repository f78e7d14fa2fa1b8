//! Stores are all or nothing: a full partition, a late store after a truncate.
