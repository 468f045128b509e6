//! The PCI transport's guest-facing side: one root bus (segment 0, bus 0)
//! with a host bridge and up to 31 single-function devices, reached through
//! ECAM and the 0xCF8/0xCFC ports, each with one 32-bit memory BAR at a
//! fixed address and MSI-X vectors that the VMM routes in KVM.
//!
//! Slots, BARs and GSIs are fixed by the slot number, so a device needs
//! nothing else to be placed, hot-plugged or restored from a snapshot.

pub mod bus;
pub mod config;
pub mod hotplug;
pub mod msix;

pub use bus::{PciBarWindow, PciConfigIo, PciEcam, PciFunction, PciHandle, PciSlots, SlotError};
pub use config::{ConfigSpace, PciIdentity};
pub use hotplug::{PciHotplug, PciHotplugRegisters};
pub use msix::{Msix, MsixInterrupts, MsixState, NO_VECTOR};

use std::io;
use std::ops::Range;

use vmm_sys_util::eventfd::EventFd;

/// The slots a device can take (0 is the host bridge).
pub const DEVICE_SLOTS: Range<u8> = 1..32;
/// The size of each device's BAR0, a power of two.
pub const BAR0_SIZE: u64 = 0x8_0000;
/// The first GSI of MSI-X vectors (0-23 are the IOAPIC's pins).
pub const MSI_GSI_BASE: u32 = 24;
/// GSIs reserved per slot: the most MSI-X vectors a device can have.
pub const VECTORS_PER_SLOT: u16 = 32;

/// The GSI that MSI-X vector `vector` of the device in `slot` raises.
pub fn msi_gsi(slot: u8, vector: u16) -> u32 {
    MSI_GSI_BASE + u32::from(slot) * u32::from(VECTORS_PER_SLOT) + u32::from(vector)
}

/// The GSIs of every vector of the device in `slot`.
pub fn slot_gsis(slot: u8) -> Range<u32> {
    msi_gsi(slot, 0)..msi_gsi(slot, VECTORS_PER_SLOT)
}

/// The guest-physical address of the BAR0 of the device in `slot`, in a
/// window that starts at `window_base`.
pub fn bar0_address(window_base: u64, slot: u8) -> u64 {
    window_base + u64::from(slot.saturating_sub(1)) * BAR0_SIZE
}

/// One MSI message, as a guest programs it in an MSI-X table entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsiMessage {
    pub addr_lo: u32,
    pub addr_hi: u32,
    pub data: u32,
}

/// The VM's interrupt routing, as PCI devices drive it. The VMM implements
/// it on KVM; tests use a fake.
pub trait MsiRouter: Send + Sync {
    /// Replaces every MSI route whose GSI lies in `gsis` by `routes`, then
    /// commits the VM's whole routing table.
    fn set_msi_routes(&self, gsis: Range<u32>, routes: &[(u32, MsiMessage)]) -> io::Result<()>;
    /// Makes a write to `fd` raise `gsi` (a KVM irqfd).
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()>;
    /// Undoes [`MsiRouter::register_irqfd`].
    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_slot_has_its_own_gsis_and_bar() {
        assert_eq!(msi_gsi(1, 0), 56);
        assert_eq!(slot_gsis(31).end, 24 + 32 * 32);
        assert!(slot_gsis(1).end <= slot_gsis(2).start);
        assert_eq!(bar0_address(0xd800_0000, 1), 0xd800_0000);
        assert_eq!(bar0_address(0xd800_0000, 31), 0xd800_0000 + 30 * 0x8_0000);
        assert!(bar0_address(0xd800_0000, 31) + BAR0_SIZE <= 0xe000_0000);
    }
}
