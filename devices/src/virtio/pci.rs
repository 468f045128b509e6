//! The virtio-pci transport (modern, virtio 1.x): a PCI function whose
//! capabilities point into its BAR0, where the driver finds the common
//! configuration, the ISR, the device configuration, one notify address
//! per queue, and the MSI-X table. Queue notifications are ioeventfds
//! straight to the backend, and each queue's call eventfd is an irqfd on
//! the GSI of the MSI-X vector the driver gave the queue, so neither
//! direction of the data path goes through the VMM.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::common::{set_half, VirtioCore, VirtioState};
use super::{ActivateError, VirtioDevice};
use crate::guest_log;
use crate::pci::config::{ConfigError, ConfigSpace, PciIdentity};
use crate::pci::msix::{Msix, MsixInterrupts, MsixState, NO_VECTOR};
use crate::pci::{MsiRouter, PciFunction, BAR0_SIZE, DEVICE_SLOTS, VECTORS_PER_SLOT};

/// Where each structure lives in BAR0 (8 KiB apart, as Firecracker's).
pub const COMMON_CFG: u64 = 0x0;
const COMMON_CFG_LEN: u64 = 0x38;
pub const ISR: u64 = 0x2000;
pub const DEVICE_CFG: u64 = 0x4000;
const DEVICE_CFG_LEN: u64 = 0x1000;
pub const NOTIFY: u64 = 0x6000;
const NOTIFY_LEN: u64 = 0x1000;
/// Bytes between two queues' notify addresses.
pub const NOTIFY_MULTIPLIER: u32 = 4;
pub const MSIX_TABLE: u64 = 0x8000;
const MSIX_TABLE_LEN: u64 = 0x4_0000;
pub const MSIX_PBA: u64 = 0x4_8000;
const MSIX_PBA_LEN: u64 = 0x800;

const VIRTIO_VENDOR: u16 = 0x1af4;
/// Modern devices are 0x1040 + the virtio device id.
const MODERN_DEVICE_BASE: u16 = 0x1040;
const CAP_VENDOR: u8 = 0x09;
const CAP_MSIX: u8 = 0x11;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;
const CFG_PCI: u8 = 5;
/// In a virtio capability: bar, offset, length, and the extra dword.
const CAP_BAR: usize = 4;
const CAP_OFFSET: usize = 8;
const CAP_LENGTH: usize = 12;
const CAP_EXTRA: usize = 16;

// The match arms of the BAR accessors spell these ends out.
const _: () =
    assert!(COMMON_CFG + COMMON_CFG_LEN == 0x38 && MSIX_TABLE + MSIX_TABLE_LEN == MSIX_PBA);
const _: () = assert!(MSIX_PBA + MSIX_PBA_LEN == 0x4_8800 && NOTIFY + NOTIFY_LEN == 0x7000);
const _: () =
    assert!(DEVICE_CFG + DEVICE_CFG_LEN == 0x5000 && MSIX_PBA + MSIX_PBA_LEN <= BAR0_SIZE);

/// The guest address a queue's notification is written to.
pub fn notify_address(bar0: u64, queue: u16) -> u64 {
    bar0 + NOTIFY + u64::from(queue) * u64::from(NOTIFY_MULTIPLIER)
}

/// Errors building a virtio-pci function.
#[derive(Debug, thiserror::Error)]
pub enum PciTransportError {
    #[error("PCI slot {0} cannot hold a device")]
    Slot(u8),
    #[error("the device has {queues} queues; a PCI function has at most {max} vectors")]
    TooManyQueues { queues: usize, max: u16 },
    #[error("{what}: {got} eventfds for {queues} queues")]
    Eventfds {
        what: &'static str,
        got: usize,
        queues: usize,
    },
    #[error("cannot create the configuration-change eventfd: {0}")]
    ConfigEventfd(std::io::Error),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// The PCI side of a transport, for a snapshot (the virtio side is a
/// [`VirtioState`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PciTransportState {
    pub slot: u8,
    /// The guest-writable bytes of configuration space.
    pub config: Vec<u8>,
    pub msix: MsixState,
    /// The vector of each queue, then the configuration vector.
    pub vectors: Vec<u16>,
}

/// The eventfds a virtio-pci function connects.
pub struct PciEventfds {
    /// Each queue's notification, written when one reaches the VMM.
    pub kicks: Vec<EventFd>,
    /// Each queue's interrupt, bound to its vector's GSI.
    pub calls: Vec<EventFd>,
}

/// A virtio device on the PCI bus.
pub struct PciTransport<D: VirtioDevice> {
    core: VirtioCore<D>,
    slot: u8,
    config: ConfigSpace,
    msix_cap: usize,
    cfg_cap: usize,
    msix: Msix,
    /// The vector of each queue, then the configuration vector.
    vectors: Vec<u16>,
    /// Sources: each queue's call eventfd, then the configuration one.
    interrupts: MsixInterrupts,
    kicks: Vec<EventFd>,
}

fn class_of(device_type: u32) -> [u8; 3] {
    match device_type {
        1 => [0x02, 0x00, 0x00], // network controller, Ethernet
        2 => [0x01, 0x80, 0x00], // mass storage, other
        _ => [0xff, 0x00, 0x00],
    }
}

/// A virtio capability's body (after the id and next pointer).
fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: Option<u32>) -> Vec<u8> {
    let len = if extra.is_some() { 20u8 } else { 16 };
    let mut body = vec![len, cfg_type, 0, 0, 0, 0];
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&(length as u32).to_le_bytes());
    if let Some(extra) = extra {
        body.extend_from_slice(&extra.to_le_bytes());
    }
    body
}

impl<D: VirtioDevice> PciTransport<D> {
    /// Puts `device` in `slot` with its BAR0 at `bar0`; `eventfds` has one
    /// kick and one call per queue.
    pub fn new(
        device: D,
        slot: u8,
        bar0: u32,
        eventfds: PciEventfds,
        router: Arc<dyn MsiRouter>,
    ) -> Result<Self, PciTransportError> {
        if !DEVICE_SLOTS.contains(&slot) {
            return Err(PciTransportError::Slot(slot));
        }
        let queues = device.queue_max_sizes().len();
        let vectors = u16::try_from(queues + 1)
            .ok()
            .filter(|v| *v <= VECTORS_PER_SLOT)
            .ok_or(PciTransportError::TooManyQueues {
                queues,
                max: VECTORS_PER_SLOT,
            })?;
        for (what, fds) in [("kicks", &eventfds.kicks), ("calls", &eventfds.calls)] {
            if fds.len() != queues {
                return Err(PciTransportError::Eventfds {
                    what,
                    got: fds.len(),
                    queues,
                });
            }
        }
        let device_id = MODERN_DEVICE_BASE + device.device_type() as u16;
        let mut config = ConfigSpace::new(&PciIdentity {
            vendor: VIRTIO_VENDOR,
            device: device_id,
            revision: 1,
            class: class_of(device.device_type()),
            subsystem_vendor: VIRTIO_VENDOR,
            subsystem: device_id,
        });
        config.set_bar0(bar0, BAR0_SIZE as u32)?;
        config.add_capability(
            CAP_VENDOR,
            &virtio_cap(CFG_COMMON, COMMON_CFG, COMMON_CFG_LEN, None),
            &[],
        )?;
        config.add_capability(CAP_VENDOR, &virtio_cap(CFG_ISR, ISR, 1, None), &[])?;
        config.add_capability(
            CAP_VENDOR,
            &virtio_cap(CFG_DEVICE, DEVICE_CFG, DEVICE_CFG_LEN, None),
            &[],
        )?;
        config.add_capability(
            CAP_VENDOR,
            &virtio_cap(CFG_NOTIFY, NOTIFY, NOTIFY_LEN, Some(NOTIFY_MULTIPLIER)),
            &[],
        )?;
        // The driver sets bar, offset and length, then reads or writes the
        // data dword to reach BAR0 through configuration space.
        let mut cfg_writable = vec![0u8; 18];
        cfg_writable[CAP_BAR - 2] = 0xff;
        cfg_writable[CAP_OFFSET - 2..CAP_LENGTH + 2].fill(0xff);
        let cfg_cap = config.add_capability(
            CAP_VENDOR,
            &virtio_cap(CFG_PCI, 0, 0, Some(0)),
            &cfg_writable,
        )?;
        let msix = Msix::new(vectors);
        let mut msix_body = msix.control().to_le_bytes().to_vec();
        msix_body.extend_from_slice(&(MSIX_TABLE as u32).to_le_bytes());
        msix_body.extend_from_slice(&(MSIX_PBA as u32).to_le_bytes());
        let msix_cap = config.add_capability(CAP_MSIX, &msix_body, &[0, 0xc0])?;
        let config_fd = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(PciTransportError::ConfigEventfd)?;
        let mut sources = eventfds.calls;
        sources.push(config_fd);
        let mut transport = Self {
            core: VirtioCore::new(device, "virtio-pci"),
            slot,
            config,
            msix_cap,
            cfg_cap,
            msix,
            vectors: vec![NO_VECTOR; usize::from(vectors)],
            interrupts: MsixInterrupts::new(router, slot, sources),
            kicks: eventfds.kicks,
        };
        transport.core.preset_queue_sizes();
        Ok(transport)
    }

    /// The slot the function sits in.
    pub fn slot(&self) -> u8 {
        self.slot
    }

    /// The transport-independent state.
    pub fn core(&self) -> &VirtioCore<D> {
        &self.core
    }

    /// The transport-independent state, to change it.
    pub fn core_mut(&mut self) -> &mut VirtioCore<D> {
        &mut self.core
    }

    /// How many of its interrupt sources are bound to a GSI now.
    pub fn bound_interrupts(&self) -> usize {
        self.interrupts.bound()
    }

    /// The device's configuration changed: the generation moves on and the
    /// configuration vector fires (if the driver set one up).
    pub fn notify_config_change(&mut self) {
        self.core.config_changed();
        let config_source = self.vectors.len() - 1;
        if let Some(fd) = self.interrupts.source(config_source) {
            if let Err(err) = fd.write(1) {
                log::error!("virtio-pci: cannot raise a configuration change: {err}");
            }
        }
    }

    /// The PCI side, for a snapshot.
    pub fn pci_state(&self) -> PciTransportState {
        PciTransportState {
            slot: self.slot,
            config: self.config.writable_bytes(),
            msix: self.msix.state(),
            vectors: self.vectors.clone(),
        }
    }

    /// Takes a snapshot's state: PCI side first, so that the interrupts
    /// are bound when the device starts again.
    pub fn restore(
        &mut self,
        virtio: &VirtioState,
        pci: &PciTransportState,
    ) -> Result<(), ActivateError> {
        let refuse = |why: String| Err(ActivateError::Backend(why));
        if pci.slot != self.slot {
            return refuse(format!(
                "the snapshot has the device in PCI slot {}, not {}",
                pci.slot, self.slot
            ));
        }
        if pci.vectors.len() != self.vectors.len() {
            return refuse(format!(
                "the snapshot has {} interrupt vectors for a device with {}",
                pci.vectors.len(),
                self.vectors.len()
            ));
        }
        self.msix
            .restore(&pci.msix)
            .map_err(ActivateError::Backend)?;
        self.config.restore_writable_bytes(&pci.config);
        self.sync_msix_control();
        let table = self.msix.len();
        self.vectors = pci
            .vectors
            .iter()
            .map(|v| if *v < table { *v } else { NO_VECTOR })
            .collect();
        self.update_interrupts();
        self.core.restore(virtio)
    }

    /// Stops the device if the driver had started it (it leaves its slot).
    pub fn stop(&mut self) {
        if self.core.is_active() {
            self.core.write_status(0);
        }
    }

    /// Unbinds every interrupt (the device leaves its slot).
    pub fn release_interrupts(&mut self) {
        if let Err(err) = self.interrupts.release() {
            log::error!(
                "virtio-pci: slot {}: cannot release its interrupts: {err}",
                self.slot
            );
        }
    }

    fn update_interrupts(&mut self) {
        if let Err(err) = self.interrupts.update(&self.msix, &self.vectors) {
            guest_log!(
                self.core.log_limiter,
                log::Level::Error,
                "virtio-pci: slot {}: cannot route its MSI-X vectors: {err}",
                self.slot
            );
        }
    }

    /// Message control moves from configuration space to the table state,
    /// and back with the bits that are not the guest's.
    fn sync_msix_control(&mut self) {
        let at = self.msix_cap + 2;
        self.msix.set_control(self.config.u16_at(at));
        self.config.set_u16(at, self.msix.control());
    }

    fn set_vector(&mut self, source: usize, vector: u16) {
        let vector = if vector < self.msix.len() {
            vector
        } else {
            NO_VECTOR
        };
        if let Some(slot) = self.vectors.get_mut(source) {
            *slot = vector;
        }
        self.update_interrupts();
    }

    fn invalid(&mut self, what: &str, offset: u64, len: usize) {
        self.core.count_invalid();
        guest_log!(
            self.core.log_limiter,
            log::Level::Debug,
            "virtio-pci: slot {}: {what} at {offset:#x} ({len} bytes)",
            self.slot
        );
    }

    fn read_common(&mut self, offset: u64, data: &mut [u8]) {
        let core = &self.core;
        let queue = core.queue_sel() as usize;
        let value: Option<u64> = match (offset, data.len()) {
            (0x00, 4) => Some(core.device_features_sel().into()),
            (0x04, 4) => Some(core.device_features_window().into()),
            (0x08, 4) => Some(core.driver_features_sel().into()),
            (0x0c, 4) => Some(core.driver_features_window().into()),
            (0x10, 2) => Some(self.vectors[self.vectors.len() - 1].into()),
            (0x12, 2) => Some(core.queue_count() as u64),
            (0x14, 1) => Some(u64::from(core.status() as u8)),
            (0x15, 1) => Some(u64::from(core.config_generation() as u8)),
            (0x16, 2) => Some(u64::from(core.queue_sel() as u16)),
            (0x18, 2) => Some(core.selected_queue().map_or(0, |q| q.size.into())),
            (0x1a, 2) => Some(
                if queue < core.queue_count() {
                    self.vectors[queue]
                } else {
                    NO_VECTOR
                }
                .into(),
            ),
            (0x1c, 2) => Some(core.selected_queue().map_or(0, |q| q.ready.into())),
            (0x1e, 2) => Some(if queue < core.queue_count() {
                queue as u64
            } else {
                0
            }),
            (0x20..0x38, 4 | 8) if offset.is_multiple_of(data.len() as u64) => core
                .selected_queue()
                .map(|q| {
                    let whole = match offset & !7 {
                        0x20 => q.desc,
                        0x28 => q.avail,
                        _ => q.used,
                    };
                    if offset % 8 == 4 {
                        whole >> 32
                    } else {
                        whole
                    }
                })
                .or(Some(0)),
            _ => None,
        };
        match value {
            Some(value) => data.copy_from_slice(&value.to_le_bytes()[..data.len()]),
            None => {
                data.fill(0);
                self.invalid("read of the common configuration", offset, data.len());
            }
        }
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 8];
        bytes[..data.len().min(8)].copy_from_slice(&data[..data.len().min(8)]);
        let value = u64::from_le_bytes(bytes);
        let queue = self.core.queue_sel() as usize;
        match (offset, data.len()) {
            (0x00, 4) => self.core.select_device_features(value as u32),
            (0x08, 4) => self.core.select_driver_features(value as u32),
            (0x0c, 4) => self.core.write_driver_features(value as u32),
            (0x10, 2) => {
                let config_source = self.vectors.len() - 1;
                self.set_vector(config_source, value as u16);
            }
            (0x14, 1) => {
                self.core.write_status(value as u32);
                if value == 0 {
                    self.core.preset_queue_sizes();
                    self.vectors.fill(NO_VECTOR);
                    self.update_interrupts();
                }
            }
            (0x16, 2) => self.core.select_queue(value as u32),
            (0x18, 2) => {
                if let Some(q) = self.core.selected_queue_mut() {
                    q.size = value as u16;
                }
            }
            (0x1a, 2) if queue < self.core.queue_count() => self.set_vector(queue, value as u16),
            (0x1c, 2) => {
                if let Some(q) = self.core.selected_queue_mut() {
                    q.ready = value == 1;
                }
            }
            (0x20..0x38, 4 | 8) if offset.is_multiple_of(data.len() as u64) => {
                if let Some(q) = self.core.selected_queue_mut() {
                    let field = match offset & !7 {
                        0x20 => &mut q.desc,
                        0x28 => &mut q.avail,
                        _ => &mut q.used,
                    };
                    if data.len() == 8 {
                        *field = value;
                    } else {
                        set_half(field, offset % 8 == 4, value as u32);
                    }
                }
            }
            _ => self.invalid("write of the common configuration", offset, data.len()),
        }
    }

    /// (offset, length) the PCI configuration access capability points
    /// at, if it is one the transport serves: BAR0, 1, 2 or 4 bytes.
    fn cfg_cap_window(&self) -> Option<(u64, usize)> {
        let bar = self.config.u8_at(self.cfg_cap + CAP_BAR);
        let offset = u64::from(self.config.u32_at(self.cfg_cap + CAP_OFFSET));
        let length = self.config.u32_at(self.cfg_cap + CAP_LENGTH) as usize;
        (bar == 0 && matches!(length, 1 | 2 | 4) && offset + length as u64 <= BAR0_SIZE)
            .then_some((offset, length))
    }

    fn is_cfg_cap_data(&self, offset: usize) -> bool {
        offset == self.cfg_cap + CAP_EXTRA
    }

    fn touches_msix_control(&self, offset: usize, len: usize) -> bool {
        let control = self.msix_cap + 2;
        offset < control + 2 && control < offset + len
    }
}

impl<D: VirtioDevice> PciFunction for PciTransport<D> {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        if self.is_cfg_cap_data(offset) {
            data.fill(0);
            if let Some((bar_offset, length)) = self.cfg_cap_window() {
                let len = length.min(data.len());
                self.bar_read(bar_offset, &mut data[..len]);
            }
            return;
        }
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        if self.is_cfg_cap_data(offset) {
            match self.cfg_cap_window() {
                Some((bar_offset, length)) if length <= data.len() => {
                    self.bar_write(bar_offset, &data[..length]);
                }
                _ => self.invalid("PCI cfg capability access", offset as u64, data.len()),
            }
            return;
        }
        if !self.config.write(offset, data) {
            self.invalid(
                "write of read-only configuration",
                offset as u64,
                data.len(),
            );
        }
        if self.touches_msix_control(offset, data.len()) {
            self.sync_msix_control();
            self.update_interrupts();
        }
    }

    fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        let len = data.len();
        match offset {
            COMMON_CFG..0x38 => self.read_common(offset - COMMON_CFG, data),
            ISR if len == 1 => {
                data[0] = self.core.interrupt_status() as u8;
                // Reading the ISR acknowledges it.
                self.core.acknowledge_interrupt(u32::MAX);
            }
            DEVICE_CFG..0x5000 if offset + len as u64 <= DEVICE_CFG + DEVICE_CFG_LEN => {
                self.core.read_config(offset - DEVICE_CFG, data)
            }
            MSIX_TABLE..0x4_8000 => {
                if !self.msix.read_table(offset - MSIX_TABLE, data) {
                    self.invalid("read of the MSI-X table", offset, len);
                }
            }
            // Nothing is ever pending: a masked vector's source keeps its
            // count in its eventfd until the vector is unmasked.
            MSIX_PBA..0x4_8800 if matches!(len, 4 | 8) => data.fill(0),
            _ => {
                data.fill(0);
                self.invalid("read of BAR0", offset, len);
            }
        }
    }

    fn bar_write(&mut self, offset: u64, data: &[u8]) {
        let len = data.len();
        match offset {
            COMMON_CFG..0x38 => self.write_common(offset - COMMON_CFG, data),
            DEVICE_CFG..0x5000 if offset + len as u64 <= DEVICE_CFG + DEVICE_CFG_LEN => {
                self.core.write_config(offset - DEVICE_CFG, data)
            }
            // A notification that reached the VMM (no ioeventfd yet, or
            // through the cfg capability): pass it on.
            NOTIFY..0x7000 => {
                let index = (offset - NOTIFY) / u64::from(NOTIFY_MULTIPLIER);
                let aligned = (offset - NOTIFY).is_multiple_of(u64::from(NOTIFY_MULTIPLIER));
                match self.kicks.get(index as usize) {
                    Some(kick) if aligned && matches!(len, 2 | 4) => {
                        if let Err(err) = kick.write(1) {
                            log::error!("virtio-pci: cannot pass on a notification: {err}");
                        }
                    }
                    _ => self.invalid("notification", offset, len),
                }
            }
            MSIX_TABLE..0x4_8000 => {
                if self.msix.write_table(offset - MSIX_TABLE, data) {
                    self.update_interrupts();
                } else {
                    self.invalid("write of the MSI-X table", offset, len);
                }
            }
            _ => self.invalid("write of BAR0", offset, len),
        }
    }
}

#[cfg(test)]
mod tests;
