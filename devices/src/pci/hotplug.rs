//! The PCI hot-plug registers the ACPI tables' `PHPR` device reads and
//! writes (Cloud Hypervisor's layout): PCIU, the slots the VMM filled and
//! PCID, those it wants back, both cleared when read; B0EJ, where the
//! guest's `_EJ0` writes a slot bit once it let go of the device; PSEG,
//! the segment. A write to B0EJ ejects only a slot the VMM put in PCID,
//! so a guest can give back only what the host asked for.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::bus::PciSlots;
use super::DEVICE_SLOTS;
use crate::bus::BusDevice;
use crate::guest_log_here;

/// Bytes of register space used (four dwords).
pub const REGISTERS_LEN: u64 = 16;

#[derive(Debug, Default)]
struct Registers {
    /// Slots filled since the guest last read PCIU.
    up: u32,
    /// Slots the VMM asked back, not read by the guest yet.
    down: u32,
    /// Slots the VMM asked back and the guest has not ejected.
    requested: u32,
    /// Slots the guest ejected, for the VMM thread to tear down.
    ejected: u32,
}

/// The registers and what they act on.
pub struct PciHotplug {
    slots: Arc<PciSlots>,
    registers: Mutex<Registers>,
    /// Written when the guest ejects a slot.
    ejected: EventFd,
    /// Raises the guest's ACPI GED interrupt.
    notify: EventFd,
}

impl PciHotplug {
    /// Registers for `slots`; `notify` raises the GED's interrupt (an irqfd).
    pub fn new(slots: Arc<PciSlots>, notify: EventFd) -> std::io::Result<Self> {
        Ok(Self {
            slots,
            registers: Mutex::default(),
            ejected: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            notify,
        })
    }

    fn registers(&self) -> std::sync::MutexGuard<'_, Registers> {
        self.registers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells the guest a device is in `slot` (the slot is filled already).
    pub fn announce_added(&self, slot: u8) {
        self.registers().up |= 1 << slot;
        self.raise();
    }

    /// Asks the guest to let go of the device in `slot`.
    pub fn request_removal(&self, slot: u8) {
        {
            let mut registers = self.registers();
            registers.down |= 1 << slot;
            registers.requested |= 1 << slot;
        }
        self.raise();
    }

    /// Drops a removal request the guest did not answer.
    pub fn cancel_removal(&self, slot: u8) {
        let mut registers = self.registers();
        registers.down &= !(1 << slot);
        registers.requested &= !(1 << slot);
    }

    /// Readable when the guest ejected a slot.
    pub fn ejected_fd(&self) -> &EventFd {
        &self.ejected
    }

    /// The slots ejected since the last call (their functions are out of
    /// the bus already).
    pub fn take_ejected(&self) -> Vec<u8> {
        let _ = self.ejected.read();
        let bits = std::mem::take(&mut self.registers().ejected);
        DEVICE_SLOTS.filter(|s| bits & (1 << s) != 0).collect()
    }

    fn raise(&self) {
        if let Err(err) = self.notify.write(1) {
            log::error!("pci: cannot raise the hot-plug interrupt: {err}");
        }
    }

    fn eject(&self, bits: u32) {
        let mut registers = self.registers();
        let allowed = bits & registers.requested;
        if allowed != bits {
            guest_log_here!(
                log::Level::Warn,
                "pci: the guest ejected slots {:#x} the VMM did not ask back; ignored",
                bits & !allowed
            );
        }
        for slot in DEVICE_SLOTS.filter(|s| allowed & (1 << s) != 0) {
            self.slots.remove(slot);
            registers.requested &= !(1 << slot);
            registers.ejected |= 1 << slot;
        }
        drop(registers);
        if allowed != 0 {
            if let Err(err) = self.ejected.write(1) {
                log::error!("pci: cannot report an eject: {err}");
            }
        }
    }
}

/// The registers on the MMIO bus.
pub struct PciHotplugRegisters(pub Arc<PciHotplug>);

impl BusDevice for PciHotplugRegisters {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 4 || offset >= REGISTERS_LEN || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        let value = {
            let mut registers = self.0.registers();
            match offset {
                0 => std::mem::take(&mut registers.up),
                4 => std::mem::take(&mut registers.down),
                _ => 0,
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let value = u32::from_le_bytes(bytes);
        match offset {
            8 => self.0.eject(value),
            12 if value != 0 => guest_log_here!(
                log::Level::Debug,
                "pci: the guest selected PCI segment {value}; there is only segment 0"
            ),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::bus::HostBridge;

    fn read(regs: &mut PciHotplugRegisters, offset: u64) -> u32 {
        let mut data = [0; 4];
        regs.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn the_guest_reads_additions_and_requests_once_and_ejects_only_what_was_asked() {
        let slots = Arc::new(PciSlots::new());
        for slot in [2, 3] {
            slots
                .insert(slot, Arc::new(Mutex::new(HostBridge::new())))
                .unwrap();
        }
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let hotplug =
            Arc::new(PciHotplug::new(slots.clone(), notify.try_clone().unwrap()).unwrap());
        let mut regs = PciHotplugRegisters(hotplug.clone());
        hotplug.announce_added(2);
        assert_eq!(notify.read().unwrap(), 1);
        assert_eq!(read(&mut regs, 0), 1 << 2);
        assert_eq!(read(&mut regs, 0), 0, "cleared when read");
        // A slot never asked back, or an empty one, is not ejected.
        regs.write(8, &u32::MAX.to_le_bytes());
        assert!(slots.get(2).is_some() && slots.get(3).is_some());
        assert!(hotplug.take_ejected().is_empty());
        hotplug.request_removal(3);
        assert_eq!(read(&mut regs, 4), 1 << 3);
        regs.write(8, &[0x08, 0, 0, 0]);
        assert!(slots.get(3).is_none());
        assert!(slots.get(2).is_some());
        assert_eq!(hotplug.take_ejected(), vec![3]);
        // Odd accesses do nothing.
        regs.write(8, &[0x04]);
        assert_eq!(read(&mut regs, 9), 0);
        assert!(slots.get(2).is_some());
    }
}
