//! The `vhost-user-net` backend as a library: the binary's `main.rs` is its
//! command line; the frame path, MMDS, relay and backend are here so that fuzz
//! targets and tests can drive them.

pub mod backend;
pub mod frame;
pub mod mmds;
pub mod relay;
pub mod tap;
pub mod tap_watch;
