//! The `vhost-user-vsock` backend as a library: the binary's `main.rs` is
//! its command line; the device, the muxer of host sockets and the
//! connections are here so that fuzz targets and tests can drive them.

pub mod backend;
pub mod connection;
pub mod muxer;
pub mod packet;
