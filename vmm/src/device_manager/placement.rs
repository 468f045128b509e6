//! Where virtio devices go, and how their queues are wired, on either
//! transport. With virtio-mmio a device takes the next 4 KiB slot of the
//! MMIO hole and an IOAPIC pin, and the kernel command line names it; with
//! `--enable-pci` it takes the lowest free slot of the root bus, with its
//! fixed BAR0 and MSI-X vectors. Either way each queue's notification is
//! an ioeventfd and its interrupt an irqfd, straight to whoever serves the
//! queue.

use std::sync::{Arc, Mutex};

use devices::pci::{
    bar0_address, MsiRouter, PciBarWindow, PciConfigIo, PciEcam, PciHandle, PciHotplug,
    PciHotplugRegisters, PciSlots, SlotError,
};
use devices::virtio::pci::{notify_address, PciTransportError};
use devices::virtio::{
    MmioTransport, PciEventfds, PciTransport, QueueEventfds, VirtioDevice, VirtioTransport,
    MMIO_WINDOW_SIZE, NOTIFY_REG_OFFSET,
};
use devices::{Bus, BusError};
use kvm_ioctls::{IoEventAddress, NoDatamatch};
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

/// Errors placing a device.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    #[error("no virtio-mmio slot or IRQ is left (at most 19 devices without --enable-pci)")]
    NoMmioSlot,
    #[error(transparent)]
    PciSlot(#[from] SlotError),
    #[error("cannot register its queue notification: {0}")]
    IoEvent(kvm_ioctls::Error),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("cannot add it to the kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("cannot duplicate its eventfds: {0}")]
    Eventfd(std::io::Error),
    #[error(transparent)]
    Pci(#[from] PciTransportError),
}

/// Where a placed device is, for the log and the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    Mmio { base: u64, irq: u32 },
    Pci { slot: u8 },
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Mmio { base, irq } => write!(f, "virtio-mmio at {base:#x}, IRQ {irq}"),
            Location::Pci { slot } => write!(f, "virtio-pci at 00:{slot:02x}.0"),
        }
    }
}

/// A placed device and where it went.
pub type Placed<D> = (Arc<Mutex<VirtioTransport<D>>>, Location);

/// The root bus, the VM's MSI routing and the hot-plug registers, with
/// `--enable-pci`.
#[derive(Clone)]
pub struct PciBus {
    pub slots: Arc<PciSlots>,
    pub router: Arc<dyn MsiRouter>,
    pub hotplug: Arc<PciHotplug>,
}

/// Puts the root bus on the guest's buses: configuration mechanism #1 on
/// the port I/O bus, ECAM, the BAR window and the hot-plug registers on
/// the MMIO bus, and their GED interrupt on its IOAPIC pin.
pub fn attach_pci_root(
    vm: &Vm,
    pio_bus: &mut Bus,
    mmio_bus: &mut Bus,
    router: Arc<dyn MsiRouter>,
) -> Result<PciBus, PlaceError> {
    let slots = Arc::new(PciSlots::new());
    let ged = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(PlaceError::Eventfd)?;
    vm.register_irqfd(&ged, layout::GED_GSI)?;
    let hotplug = Arc::new(PciHotplug::new(slots.clone(), ged).map_err(PlaceError::Eventfd)?);
    mmio_bus.insert(
        Arc::new(Mutex::new(PciHotplugRegisters(hotplug.clone()))),
        layout::PCI_HOTPLUG_START,
        layout::PCI_HOTPLUG_SIZE,
    )?;
    pio_bus.insert(
        Arc::new(Mutex::new(PciConfigIo::new(slots.clone()))),
        PciConfigIo::PORT_BASE,
        PciConfigIo::PORT_LEN,
    )?;
    mmio_bus.insert(
        Arc::new(Mutex::new(PciEcam::new(slots.clone()))),
        layout::PCI_ECAM_START,
        layout::PCI_ECAM_SIZE,
    )?;
    mmio_bus.insert(
        Arc::new(Mutex::new(PciBarWindow::new(slots.clone()))),
        layout::PCI_MMIO32_START,
        PciBarWindow::LEN,
    )?;
    Ok(PciBus {
        slots,
        router,
        hotplug,
    })
}

/// Places the devices of one microVM, in order.
pub struct Placement<'a> {
    vm: &'a Vm,
    mmio_bus: &'a mut Bus,
    cmdline: &'a mut Cmdline,
    pci: Option<PciBus>,
    next_mmio: usize,
    /// The PCI slots the next devices take, in order (a snapshot's);
    /// once they run out, the lowest free one.
    planned_slots: std::collections::VecDeque<u8>,
}

impl<'a> Placement<'a> {
    /// Places on virtio-mmio, or on `pci` when it is given.
    pub fn new(
        vm: &'a Vm,
        mmio_bus: &'a mut Bus,
        cmdline: &'a mut Cmdline,
        pci: Option<PciBus>,
    ) -> Self {
        Self {
            vm,
            mmio_bus,
            cmdline,
            pci,
            next_mmio: 0,
            planned_slots: Default::default(),
        }
    }

    /// Puts the next PCI devices in `slots`, in order (where a snapshot
    /// had them), rather than in the lowest free ones.
    pub fn with_planned_slots(mut self, slots: Vec<u8>) -> Self {
        self.planned_slots = slots.into();
        self
    }

    /// The kernel command line, for what else a device adds to it.
    pub fn cmdline(&mut self) -> &mut Cmdline {
        self.cmdline
    }

    /// Whether one more device fits; checked before its backend starts.
    pub fn check_room(&self) -> Result<(), PlaceError> {
        match &self.pci {
            Some(pci) => pci.slots.free_slot().map(|_| ()).map_err(Into::into),
            None => virtio_mmio_slot(self.next_mmio)
                .map(|_| ())
                .ok_or(PlaceError::NoMmioSlot),
        }
    }

    /// Puts `device` in the next slot with its queues wired.
    pub fn place<D: VirtioDevice + QueueEventfds + 'static>(
        &mut self,
        device: D,
    ) -> Result<Placed<D>, PlaceError> {
        match self.pci.clone() {
            Some(pci) => {
                let slot = self.planned_slots.pop_front();
                place_on_pci(self.vm, &pci, device, slot)
            }
            None => {
                let (base, irq) = virtio_mmio_slot(self.next_mmio).ok_or(PlaceError::NoMmioSlot)?;
                let placed = self.place_on_mmio(base, irq, device)?;
                self.next_mmio += 1;
                Ok(placed)
            }
        }
    }

    fn place_on_mmio<D: VirtioDevice + QueueEventfds + 'static>(
        &mut self,
        base: u64,
        irq: u32,
        device: D,
    ) -> Result<Placed<D>, PlaceError> {
        let fds = device.queue_eventfds();
        for (index, (kick, call)) in (0u32..).zip(&fds) {
            self.vm
                .fd()
                .register_ioevent(kick, &IoEventAddress::Mmio(base + NOTIFY_REG_OFFSET), index)
                .map_err(PlaceError::IoEvent)?;
            self.vm.register_irqfd(call, irq)?;
        }
        let config_irq = fds
            .first()
            .map(|(_, call)| call.try_clone())
            .transpose()
            .map_err(PlaceError::Eventfd)?;
        drop(fds);
        let mut transport = MmioTransport::new(device);
        if let Some(irq) = config_irq {
            transport = transport.with_config_irq(irq);
        }
        let transport = Arc::new(Mutex::new(VirtioTransport::from(transport)));
        self.mmio_bus
            .insert(transport.clone(), base, MMIO_WINDOW_SIZE)?;
        self.cmdline
            .add_virtio_mmio_device(MMIO_WINDOW_SIZE, GuestAddress(base), irq, None)
            .map_err(PlaceError::Cmdline)?;
        Ok((transport, Location::Mmio { base, irq }))
    }
}

/// Puts `device` in `slot` (by default the lowest free slot) of `pci`:
/// each queue's notification address in BAR0 is an ioeventfd; its
/// interrupt follows the MSI-X vector the driver gives the queue.
pub fn place_on_pci<D: VirtioDevice + QueueEventfds + 'static>(
    vm: &Vm,
    pci: &PciBus,
    device: D,
    slot: Option<u8>,
) -> Result<Placed<D>, PlaceError> {
    let slot = match slot {
        Some(slot) if !devices::pci::DEVICE_SLOTS.contains(&slot) => {
            return Err(SlotError::Invalid(slot).into())
        }
        Some(slot) if pci.slots.get(slot).is_some() => return Err(SlotError::Taken(slot).into()),
        Some(slot) => slot,
        None => pci.slots.free_slot()?,
    };
    let bar0 = bar0_address(layout::PCI_MMIO32_START, slot);
    let (kicks, calls) = duplicate(&device.queue_eventfds()).map_err(PlaceError::Eventfd)?;
    let mut registered = Vec::new();
    for (queue, kick) in (0u16..).zip(&kicks) {
        let addr = IoEventAddress::Mmio(notify_address(bar0, queue));
        if let Err(err) = vm.fd().register_ioevent(kick, &addr, NoDatamatch) {
            for (kick, addr) in registered {
                let _ = vm.fd().unregister_ioevent(kick, &addr, NoDatamatch);
            }
            return Err(PlaceError::IoEvent(err));
        }
        registered.push((kick, addr));
    }
    let eventfds = PciEventfds {
        kicks: kicks
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<_, _>>()
            .map_err(PlaceError::Eventfd)?,
        calls,
    };
    let transport = PciTransport::new(device, slot, bar0 as u32, eventfds, pci.router.clone())?;
    let transport = Arc::new(Mutex::new(VirtioTransport::from(transport)));
    let handle: PciHandle = transport.clone();
    pci.slots.insert(slot, handle)?;
    Ok((transport, Location::Pci { slot }))
}

/// Takes a device off the root bus: out of its slot (if the guest's eject
/// has not taken it out already), its interrupts unbound, its
/// notifications no longer ioeventfds, and stopped.
pub fn remove_from_pci<D: VirtioDevice + QueueEventfds>(
    vm: &Vm,
    pci: &PciBus,
    transport: &Mutex<VirtioTransport<D>>,
) {
    let mut transport = transport.lock().unwrap_or_else(|p| p.into_inner());
    let VirtioTransport::Pci(function) = &mut *transport else {
        return;
    };
    let slot = function.slot();
    pci.slots.remove(slot);
    function.release_interrupts();
    let bar0 = bar0_address(layout::PCI_MMIO32_START, slot);
    for (queue, (kick, _)) in (0u16..).zip(function.core().device().queue_eventfds()) {
        let addr = IoEventAddress::Mmio(notify_address(bar0, queue));
        if let Err(err) = vm.fd().unregister_ioevent(kick, &addr, NoDatamatch) {
            log::warn!("pci: slot {slot}: cannot unregister queue {queue}'s notification: {err}");
        }
    }
    function.stop();
}

/// Places devices after boot: on the root bus only (nothing is added to
/// virtio-mmio or the command line then).
pub fn hotplug_placement<R>(vm: &Vm, pci: &PciBus, place: impl FnOnce(&mut Placement) -> R) -> R {
    let mut unused_bus = Bus::new();
    let mut unused_cmdline = Cmdline::new(layout::CMDLINE_MAX_SIZE).expect("a non-zero capacity");
    let mut placement = Placement::new(vm, &mut unused_bus, &mut unused_cmdline, Some(pci.clone()));
    place(&mut placement)
}

/// Owned copies of each queue's (notification, interrupt) eventfds.
fn duplicate(fds: &[(&EventFd, &EventFd)]) -> std::io::Result<(Vec<EventFd>, Vec<EventFd>)> {
    let mut kicks = Vec::with_capacity(fds.len());
    let mut calls = Vec::with_capacity(fds.len());
    for (kick, call) in fds {
        kicks.push(kick.try_clone()?);
        calls.push(call.try_clone()?);
    }
    Ok((kicks, calls))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmio_slots_follow_the_boot_timer_and_run_out_at_irq_23() {
        assert_eq!(virtio_mmio_slot(0), Some((0xd000_1000, 5)));
        assert_eq!(virtio_mmio_slot(1), Some((0xd000_2000, 6)));
        assert_eq!(virtio_mmio_slot(18), Some((0xd001_3000, 23)));
        assert_eq!(virtio_mmio_slot(19), None);
    }

    #[test]
    fn pci_bars_fit_the_window_and_miss_the_hot_plug_registers() {
        let last = bar0_address(layout::PCI_MMIO32_START, 31) + devices::pci::BAR0_SIZE;
        assert!(last <= layout::PCI_MMIO32_START + layout::PCI_MMIO32_SIZE);
        assert!(virtio_mmio_slot(18).unwrap().0 + MMIO_WINDOW_SIZE <= layout::PCI_HOTPLUG_START);
    }
}
