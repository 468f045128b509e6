//! The vhost-user vsock device (virtio-vsock, device id 19).

mod device;
mod reset;

pub use device::{VhostUserVsock, Vsock, VIRTIO_ID_VSOCK};
