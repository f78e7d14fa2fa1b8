//! vlserver (work in progress)
