//! Nobody waits behind somebody else's dead server; blocking lock waits can be interrupted.
