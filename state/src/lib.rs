//! state (work in progress)
