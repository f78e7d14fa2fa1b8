//! fileserver (work in progress)
