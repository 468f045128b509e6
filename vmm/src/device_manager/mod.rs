//! Attaches devices to the VM: the legacy devices on the port I/O bus, and
//! the virtio-mmio devices (vhost-user block, net and vsock; the VMM's
//! own entropy and balloon devices) in the MMIO hole, each with its
//! ioeventfds, irqfd and kernel command-line entry.

mod backend_monitor;
mod backend_process;
pub mod backend_starter;
mod backend_watch;
mod balloon;
mod block;
mod entropy;
mod legacy;
mod net;
mod vhost_user;
mod vsock;

pub use backend_monitor::BackendMonitor;
pub use backend_process::{BackendProcessError, BackendSpawner};
pub use backend_watch::Connector;
pub use balloon::{
    attach_balloon_device, balloon_options, raise_config_change, BalloonAttachError,
    BalloonMonitor, BalloonTransport,
};
pub use block::{attach_block_devices, drive_limits_message, BlockTransport};
pub use entropy::{attach_entropy_device, EntropyAttachError, EntropyMonitor, EntropyTransport};
pub use legacy::{attach_legacy_devices, DeviceError, LegacyDevices};
pub use net::{
    attach_net_devices, interface_limits_messages, Interfaces, NetBackendMonitor, NetTransport,
};
pub use vhost_user::{spawner, AttachError, DeviceKind};
pub use vsock::{attach_vsock_device, VsockBackendMonitor, VsockTransport};

use std::sync::{Arc, Mutex};

use devices::vhost_user::VhostUserQueues;
use devices::virtio::{MMIO_WINDOW_SIZE, NOTIFY_REG_OFFSET};
use devices::{Bus, BusDevice, BusError};
use kvm_ioctls::IoEventAddress;
use linux_loader::loader::Cmdline;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout;
use crate::vstate::vm::{Vm, VmError};

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

/// Errors placing a vhost-user device in its virtio-mmio slot.
#[derive(Debug, thiserror::Error)]
pub enum MmioSlotError {
    #[error("cannot register its queue notification: {0}")]
    IoEvent(kvm_ioctls::Error),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("cannot add it to the kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
}

/// Connects the guest straight to the backend: an ioeventfd per queue on
/// the slot's QueueNotify register (matching the queue index) and an irqfd
/// per queue on the slot's IRQ.
pub fn wire_queues(
    vm: &Vm,
    base: u64,
    irq: u32,
    queues: &VhostUserQueues,
) -> Result<(), MmioSlotError> {
    let kicks = (0u32..).zip(queues.kick_fds());
    wire_eventfds(vm, base, irq, kicks, queues.call_fds())
}

/// Registers each `(queue index, kick)` as an ioeventfd on the slot's
/// QueueNotify register, matching the index, and each call eventfd as an
/// irqfd on the slot's IRQ.
pub fn wire_eventfds<'a>(
    vm: &Vm,
    base: u64,
    irq: u32,
    kicks: impl IntoIterator<Item = (u32, &'a EventFd)>,
    calls: impl IntoIterator<Item = &'a EventFd>,
) -> Result<(), MmioSlotError> {
    for (index, kick) in kicks {
        vm.fd()
            .register_ioevent(kick, &IoEventAddress::Mmio(base + NOTIFY_REG_OFFSET), index)
            .map_err(MmioSlotError::IoEvent)?;
    }
    for call in calls {
        vm.register_irqfd(call, irq)?;
    }
    Ok(())
}

/// Puts a virtio-mmio transport on the MMIO bus at `base` and tells the
/// guest kernel where it is (`virtio_mmio.device=`).
pub fn place_on_bus(
    transport: Arc<Mutex<dyn BusDevice>>,
    base: u64,
    irq: u32,
    mmio_bus: &mut Bus,
    cmdline: &mut Cmdline,
) -> Result<(), MmioSlotError> {
    mmio_bus.insert(transport, base, MMIO_WINDOW_SIZE)?;
    cmdline
        .add_virtio_mmio_device(MMIO_WINDOW_SIZE, GuestAddress(base), irq, None)
        .map_err(MmioSlotError::Cmdline)
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
