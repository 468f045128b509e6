//! Virtio device plumbing shared by the VMM's devices: the device trait the
//! transports drive, their shared core, and the virtio-mmio and virtio-pci
//! transports themselves.

pub mod balloon;
mod common;
pub mod entropy;
mod mmio;
pub mod pci;
mod queue;
mod transport;

pub use common::{VirtioCore, VirtioState};
pub use mmio::{MmioTransport, MMIO_WINDOW_SIZE, NOTIFY_REG_OFFSET};
pub use pci::{PciEventfds, PciTransport, PciTransportState};
pub use queue::{queue_from_layout, take_over_at_used_index, QueueLayoutError};
pub use transport::VirtioTransport;

use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// The guest-side layout of one virtqueue, as the driver configured it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLayout {
    pub size: u16,
    pub desc_table: GuestAddress,
    pub avail_ring: GuestAddress,
    pub used_ring: GuestAddress,
}

/// Errors activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the backend refused to set up the device: {0}")]
    Backend(String),
    #[error("queue {index} is invalid: {reason}")]
    BadQueue { index: usize, reason: String },
}

/// A virtio device behind a transport. The transport owns the register
/// state the driver writes; the device turns it into a running backend.
pub trait VirtioDevice: Send {
    /// The virtio device id (2 for block).
    fn device_type(&self) -> u32;
    /// The largest size of each queue.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered to the driver.
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space.
    fn read_config(&mut self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the features and queues the driver set up.
    fn activate(
        &mut self,
        acked_features: u64,
        queues: &[QueueLayout],
    ) -> Result<(), ActivateError>;
    /// Stops the device after a driver reset; it can be activated again.
    fn reset(&mut self);
}

/// A device whose queues are wired with eventfds: the VMM registers each
/// queue's notification as an ioeventfd and its interrupt as an irqfd, on
/// whichever transport the device sits.
pub trait QueueEventfds {
    /// Each queue's (notification, interrupt) eventfds, in queue order.
    fn queue_eventfds(&self) -> Vec<(&EventFd, &EventFd)>;
}
