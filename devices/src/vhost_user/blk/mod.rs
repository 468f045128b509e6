//! virtio-blk served by a `vhost-user-blk` backend.

mod device;

pub use device::{Block, VhostUserBlock};
