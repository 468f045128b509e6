//! One type for a virtio device on either transport, so that the VMM's
//! runtime, metrics and snapshots handle both alike.

use super::common::{VirtioCore, VirtioState};
use super::mmio::MmioTransport;
use super::pci::{PciTransport, PciTransportState};
use super::{ActivateError, VirtioDevice};
use crate::bus::BusDevice;
use crate::pci::PciFunction;

/// A virtio device on virtio-mmio or on virtio-pci.
pub enum VirtioTransport<D: VirtioDevice> {
    Mmio(MmioTransport<D>),
    /// Boxed: its configuration space and MSI-X table make it the larger.
    Pci(Box<PciTransport<D>>),
}

impl<D: VirtioDevice> From<MmioTransport<D>> for VirtioTransport<D> {
    fn from(t: MmioTransport<D>) -> Self {
        Self::Mmio(t)
    }
}

impl<D: VirtioDevice> From<PciTransport<D>> for VirtioTransport<D> {
    fn from(t: PciTransport<D>) -> Self {
        Self::Pci(Box::new(t))
    }
}

impl<D: VirtioDevice> VirtioTransport<D> {
    /// The transport-independent state.
    pub fn core(&self) -> &VirtioCore<D> {
        match self {
            Self::Mmio(t) => t.core(),
            Self::Pci(t) => t.core(),
        }
    }

    /// The transport-independent state, to change it.
    pub fn core_mut(&mut self) -> &mut VirtioCore<D> {
        match self {
            Self::Mmio(t) => t.core_mut(),
            Self::Pci(t) => t.core_mut(),
        }
    }

    /// The wrapped device.
    pub fn device(&self) -> &D {
        self.core().device()
    }

    /// The wrapped device, to act on it outside guest accesses.
    pub fn device_mut(&mut self) -> &mut D {
        self.core_mut().device_mut()
    }

    /// Accesses the guest made that a driver should not.
    pub fn invalid_accesses(&self) -> u64 {
        self.core().invalid_accesses()
    }

    /// What the driver negotiated, for a snapshot.
    pub fn state(&self) -> VirtioState {
        self.core().state()
    }

    /// The PCI slot the device is in (none on virtio-mmio).
    pub fn pci_slot(&self) -> Option<u8> {
        match self {
            Self::Mmio(_) => None,
            Self::Pci(t) => Some(t.slot()),
        }
    }

    /// The PCI side, for a snapshot (none on virtio-mmio).
    pub fn pci_state(&self) -> Option<PciTransportState> {
        match self {
            Self::Mmio(_) => None,
            Self::Pci(t) => Some(t.pci_state()),
        }
    }

    /// Takes a snapshot's state. The PCI side must be there exactly when
    /// the device is on PCI.
    pub fn restore(
        &mut self,
        virtio: &VirtioState,
        pci: Option<&PciTransportState>,
    ) -> Result<(), ActivateError> {
        match (self, pci) {
            (Self::Mmio(t), None) => t.core_mut().restore(virtio),
            (Self::Pci(t), Some(pci)) => t.restore(virtio, pci),
            (Self::Mmio(_), Some(_)) => Err(ActivateError::Backend(
                "the snapshot has the device on PCI; start with --enable-pci".into(),
            )),
            (Self::Pci(_), None) => Err(ActivateError::Backend(
                "the snapshot has the device on virtio-mmio; start without --enable-pci".into(),
            )),
        }
    }

    /// The device's configuration changed: tell the driver.
    pub fn notify_config_change(&mut self) {
        match self {
            Self::Mmio(t) => t.notify_config_change(),
            Self::Pci(t) => t.notify_config_change(),
        }
    }
}

impl<D: VirtioDevice> BusDevice for VirtioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self {
            Self::Mmio(t) => t.read(offset, data),
            Self::Pci(t) => t.bar_read(offset, data),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match self {
            Self::Mmio(t) => t.write(offset, data),
            Self::Pci(t) => t.bar_write(offset, data),
        }
    }
}

impl<D: VirtioDevice> PciFunction for VirtioTransport<D> {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        match self {
            Self::Mmio(_) => data.fill(0xff),
            Self::Pci(t) => t.config_read(offset, data),
        }
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        if let Self::Pci(t) = self {
            t.config_write(offset, data);
        }
    }

    fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        match self {
            Self::Mmio(_) => data.fill(0xff),
            Self::Pci(t) => t.bar_read(offset, data),
        }
    }

    fn bar_write(&mut self, offset: u64, data: &[u8]) {
        if let Self::Pci(t) = self {
            t.bar_write(offset, data);
        }
    }
}
