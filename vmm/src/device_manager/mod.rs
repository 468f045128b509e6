//! Attaches devices to the VM: the legacy devices on the port I/O bus, and
//! the virtio-mmio devices (vhost-user block and net) in the MMIO hole, each with its
//! ioeventfds, irqfd and kernel command-line entry.

mod backend_monitor;
mod backend_process;
mod block;
mod legacy;
mod net;

pub use backend_monitor::BackendMonitor;
pub use backend_process::{BackendProcessError, BackendSpawner};
pub use block::{attach_block_devices, BlockDeviceError, BlockTransport};
pub use legacy::{attach_legacy_devices, DeviceError, LegacyDevices};
pub use net::{attach_net_devices, NetBackendMonitor, NetDeviceError, NetTransport};

use crate::arch::layout;

/// The first IRQ for virtio-mmio devices (0-4 are legacy devices').
const FIRST_VIRTIO_IRQ: u32 = 5;
/// The last IOAPIC pin.
const LAST_IRQ: u32 = 23;

/// Where the `index`-th virtio-mmio device goes: (base address, IRQ). The
/// boot timer has the first page of the MMIO hole.
pub fn virtio_mmio_slot(index: usize) -> Option<(u64, u32)> {
    let irq = FIRST_VIRTIO_IRQ.checked_add(u32::try_from(index).ok()?)?;
    if irq > LAST_IRQ {
        return None;
    }
    let base = layout::BOOT_TIMER_START + layout::BOOT_TIMER_SIZE * (index as u64 + 1);
    Some((base, irq))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_boot_timer_and_run_out_at_irq_23() {
        assert_eq!(virtio_mmio_slot(0), Some((0xd000_1000, 5)));
        assert_eq!(virtio_mmio_slot(1), Some((0xd000_2000, 6)));
        assert_eq!(virtio_mmio_slot(18), Some((0xd001_3000, 23)));
        assert_eq!(virtio_mmio_slot(19), None);
    }
}
