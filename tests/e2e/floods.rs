//! Servers bound what a peer can make them hold: idle and mid-frame floods.
