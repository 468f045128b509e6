//! The feature bits every vhost-user frontend treats the same way, as
//! masks of `virtio-bindings`' bit numbers.

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

pub const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
pub const EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;
/// The transport and ring features the VMM passes through to the guest.
const PASSTHROUGH: u64 = VERSION_1 | 1 << VIRTIO_RING_F_INDIRECT_DESC | EVENT_IDX;
/// Bits 0 to 27: the device-specific features (and reserved ones).
const DEVICE_SPECIFIC: u64 = 0x0fff_ffff;

/// What the guest is offered of the backend's features: its
/// device-specific ones, and the transport features the VMM passes
/// through. The rest (vhost-user's PROTOCOL_FEATURES, unknown transport
/// bits) stays between the VMM and the backend.
pub fn offered_to_guest(backend: u64) -> u64 {
    backend & (DEVICE_SPECIFIC | PASSTHROUGH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_sees_device_bits_and_the_passed_through_transport_bits() {
        let protocol_features = 1 << 30;
        let unknown_transport = 1 << 33;
        let backend = 0b101 | VERSION_1 | EVENT_IDX | protocol_features | unknown_transport;
        assert_eq!(offered_to_guest(backend), 0b101 | VERSION_1 | EVENT_IDX);
        assert_eq!(offered_to_guest(1 << 28), 1 << 28, "INDIRECT_DESC");
        assert_eq!(offered_to_guest(0), 0);
    }
}
