//! The `vhost-user-blk` backend as a library: the binary's `main.rs` is its
//! command line; the request parser, planner and backend are here so that
//! fuzz targets and tests can drive them.

pub mod backend;
pub mod disk;
pub mod engine;
pub mod inflight;
pub mod mapping;
pub mod request;
