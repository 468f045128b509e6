//! virtio-net served by a `vhost-user-net` backend.

mod device;

pub use device::{VhostUserNet, VhostUserNetError};
