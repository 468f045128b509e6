//! The entropy device (virtio-rng, device id 4), served by the VMM itself
//! as Firecracker's is: one request queue whose buffers it fills from the
//! host's `getrandom`, within the device's rate limiter. Nothing else
//! reaches a backend, so no process is started for it.
//!
//! `device.rs` is the device the transport drives (features, activation,
//! snapshot state); `requests.rs` serves the queue.

mod device;
mod requests;

pub use device::{Entropy, EntropyCounters, EntropyState, ENTROPY_QUEUE_SIZE, VIRTIO_ID_RNG};
pub use requests::MAX_REQUEST_BYTES;
