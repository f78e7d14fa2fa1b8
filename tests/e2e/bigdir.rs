//! Large busy directories: creates under concurrent change; `forget` bounds the mount's memory.
