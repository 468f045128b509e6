//! The vhost-user vsock device (virtio-vsock, device id 19).

mod device;

pub use device::{VhostUserVsock, QUEUE_SIZE, VIRTIO_ID_VSOCK};
