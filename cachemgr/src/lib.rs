//! cachemgr (work in progress)
