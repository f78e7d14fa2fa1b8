//! `holdfast up` as a supervisor: each child killed in turn while a writer appends.
