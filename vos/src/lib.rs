//! vos (work in progress)
