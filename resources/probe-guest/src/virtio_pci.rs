//! The virtio-pci (virtio 1.x, "modern") transport's registers: the
//! common, notify, ISR and device configuration structures that the
//! vendor capabilities point to, each checked to lie inside a usable
//! memory BAR, and the MSI-X table and PBA.
//!
//! [`crate::virtio::Transport`] drives a device through these exactly as
//! through the virtio-mmio registers: the drivers do not see the
//! difference.

use core::fmt;

use crate::e820;
use crate::pci::{self, Bar, BarProblem, Bdf, Function, VirtioCap};
use crate::phys;

/// Offsets in `struct virtio_pci_common_cfg`.
pub mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
    /// Size of the virtio 1.0 structure (up to `queue_device`).
    pub const SIZE: u32 = 0x38;
}

/// `VIRTIO_MSI_NO_VECTOR`.
pub const NO_VECTOR: u16 = 0xffff;

/// The MSI-X table and PBA, inside checked and mapped BARs.
#[derive(Clone, Copy, Debug)]
pub struct MsixRegs {
    /// Offset of the capability in configuration space.
    pub cap: u8,
    pub vectors: u16,
    pub table: u64,
    pub pba: u64,
}

/// A virtio-pci function's register addresses (identity-mapped).
#[derive(Clone, Copy, Debug)]
pub struct PciRegs {
    pub bdf: Bdf,
    /// virtio device id (net 1, block 2, ...).
    pub device_id: u32,
    common: u64,
    notify: u64,
    notify_len: u32,
    notify_multiplier: u32,
    /// 0: no ISR capability.
    isr: u64,
    device: u64,
    device_len: u32,
    /// The MSI-X table, or why it is unusable.
    pub msix: Result<MsixRegs, &'static str>,
    /// With `probe.msix`: the `<i>` of the `probe.msix<i>=` line (the
    /// device's `probe.virtio=` index).
    pub msix_check: Option<i64>,
}

/// Addresses and lengths of a function's virtio structures (ISR 0: none;
/// device length 0: none).
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub common: u64,
    pub notify: u64,
    pub notify_len: u32,
    pub isr: u64,
    pub device: u64,
    pub device_len: u32,
}

/// Why a virtio function is not driven (`probe.pci_error=<bdf>,<this>`).
#[derive(Clone, Copy, Debug)]
pub enum SetupError {
    /// No `common`, `notify` or (for a device with configuration space)
    /// `device` capability.
    MissingCap(&'static str),
    Bar {
        index: u8,
        bar: Bar,
        problem: BarProblem,
    },
    /// The structure does not fit in its BAR (or is too short).
    CapOutsideBar {
        kind: &'static str,
        cap: VirtioCap,
        size: u64,
    },
    /// `notify_off_multiplier` neither 0 nor an even power of two.
    BadNotifyMultiplier(u32),
}

impl SetupError {
    /// Prints the `probe.pci_error=` line.
    pub fn report(&self, bdf: Bdf) {
        match *self {
            SetupError::Bar {
                index,
                ref bar,
                problem,
            } => pci::report_bar_problem(bdf, usize::from(index), bar, problem),
            _ => crate::serial::outln!("probe.pci_error={},{}", bdf, self),
        }
    }
}

impl fmt::Display for SetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            SetupError::MissingCap(kind) => write!(f, "missing-cap type={kind}"),
            SetupError::Bar { index, problem, .. } => {
                write!(f, "{} bar={}", problem.name(), index)
            }
            SetupError::CapOutsideBar { kind, cap, size } => write!(
                f,
                "cap-outside-bar type={} bar={} offset={:#x} length={:#x} size={:#x}",
                kind, cap.bar, cap.offset, cap.length, size
            ),
            SetupError::BadNotifyMultiplier(m) => write!(f, "bad-notify-multiplier={m}"),
        }
    }
}

/// Devices whose driver reads device configuration space.
fn has_device_config(device_id: u32) -> bool {
    matches!(device_id, 1 | 2 | 5 | 19)
}

/// The address of `[offset, offset + length)` of BAR `index`, after
/// checking and mapping the BAR.
fn locate(
    function: &Function,
    map: &e820::Map,
    index: u8,
    offset: u64,
    length: u64,
) -> Result<u64, SetupError> {
    let bar = function
        .bars
        .get(usize::from(index))
        .copied()
        .ok_or(SetupError::MissingCap("bar"))?;
    pci::map_bar(map, &bar).map_err(|problem| SetupError::Bar {
        index,
        bar,
        problem,
    })?;
    if offset.checked_add(length).is_none_or(|end| end > bar.size) {
        return Err(SetupError::CapOutsideBar {
            kind: "range",
            cap: VirtioCap {
                bar: index,
                offset: offset as u32,
                length: length as u32,
            },
            size: bar.size,
        });
    }
    Ok(bar.addr + offset)
}

/// A structure pointed to by a virtio capability, at least `min_len`
/// bytes long.
fn structure(
    function: &Function,
    map: &e820::Map,
    cap: VirtioCap,
    kind: &'static str,
    min_len: u32,
) -> Result<u64, SetupError> {
    let size = function
        .bars
        .get(usize::from(cap.bar))
        .map_or(0, |b| b.size);
    if cap.length < min_len {
        return Err(SetupError::CapOutsideBar { kind, cap, size });
    }
    locate(
        function,
        map,
        cap.bar,
        u64::from(cap.offset),
        u64::from(cap.length),
    )
    .map_err(|e| match e {
        SetupError::CapOutsideBar { .. } => SetupError::CapOutsideBar { kind, cap, size },
        e => e,
    })
}

/// Finds the MSI-X table and PBA (each inside a usable BAR).
fn msix_regs(function: &Function, map: &e820::Map) -> Result<MsixRegs, &'static str> {
    let cap = function.msix.ok_or("no-msix-cap")?;
    let table = locate(
        function,
        map,
        cap.table_bar,
        u64::from(cap.table_offset),
        u64::from(cap.vectors) * 16,
    )
    .map_err(|_| "table-outside-bar")?;
    let pba = locate(
        function,
        map,
        cap.pba_bar,
        u64::from(cap.pba_offset),
        u64::from(cap.vectors).div_ceil(64) * 8,
    )
    .map_err(|_| "pba-outside-bar")?;
    Ok(MsixRegs {
        cap: cap.cap,
        vectors: cap.vectors,
        table,
        pba,
    })
}

impl PciRegs {
    /// Checks and maps the structures of virtio function `function`
    /// (device id `device_id`), and turns on memory decoding and bus
    /// mastering.
    pub fn new(
        function: &Function,
        device_id: u32,
        map: &e820::Map,
    ) -> Result<PciRegs, SetupError> {
        let caps = &function.virtio;
        let common_cap = caps.common.ok_or(SetupError::MissingCap("common"))?;
        let notify_cap = caps.notify.ok_or(SetupError::MissingCap("notify"))?;
        let multiplier = caps.notify_multiplier;
        if multiplier != 0 && (!multiplier.is_power_of_two() || multiplier == 1) {
            return Err(SetupError::BadNotifyMultiplier(multiplier));
        }
        let common = structure(function, map, common_cap, "common", common::SIZE)?;
        let notify = structure(function, map, notify_cap, "notify", 2)?;
        let isr = match caps.isr {
            Some(cap) => structure(function, map, cap, "isr", 1)?,
            None => 0,
        };
        let (device, device_len) = match caps.device {
            Some(cap) => (structure(function, map, cap, "device", 0)?, cap.length),
            None if has_device_config(device_id) => {
                return Err(SetupError::MissingCap("device"));
            }
            None => (0, 0),
        };
        let msix = msix_regs(function, map);
        let bdf = function.bdf;
        let cmd = pci::read16(bdf, pci::reg::COMMAND);
        pci::write16(
            bdf,
            pci::reg::COMMAND,
            cmd | pci::command::MEMORY | pci::command::BUS_MASTER,
        );
        Ok(PciRegs {
            bdf,
            device_id,
            common,
            notify,
            notify_len: notify_cap.length,
            notify_multiplier: multiplier,
            isr,
            device,
            device_len,
            msix,
            msix_check: None,
        })
    }

    /// Where the structures are (for `probe.pci_hostile`).
    pub fn layout(&self) -> Layout {
        Layout {
            common: self.common,
            notify: self.notify,
            notify_len: self.notify_len,
            isr: self.isr,
            device: self.device,
            device_len: self.device_len,
        }
    }

    pub fn read8(&self, offset: u64) -> u8 {
        // SAFETY: `new` checked that the common structure (at least
        // `common::SIZE` bytes) lies in a mapped memory BAR outside RAM;
        // callers pass offsets below `common::SIZE`.
        unsafe { phys::mmio_read8(self.common + offset) }
    }

    pub fn read16(&self, offset: u64) -> u16 {
        // SAFETY: as for `read8`; offsets are 2-byte aligned.
        unsafe { phys::mmio_read16(self.common + offset) }
    }

    pub fn read32(&self, offset: u64) -> u32 {
        // SAFETY: as for `read8`; offsets are 4-byte aligned.
        unsafe { phys::mmio_read32(self.common + offset) }
    }

    pub fn write8(&self, offset: u64, value: u8) {
        // SAFETY: as for `read8`.
        unsafe { phys::mmio_write8(self.common + offset, value) }
    }

    pub fn write16(&self, offset: u64, value: u16) {
        // SAFETY: as for `read16`.
        unsafe { phys::mmio_write16(self.common + offset, value) }
    }

    pub fn write32(&self, offset: u64, value: u32) {
        // SAFETY: as for `read32`.
        unsafe { phys::mmio_write32(self.common + offset, value) }
    }

    /// Writes a 64-bit queue address as two 32-bit halves, low first.
    pub fn write64(&self, offset: u64, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }

    /// Byte offset in the notify structure of a queue whose
    /// `queue_notify_off` is `off`, if a 16-bit write there fits.
    pub fn notify_offset(&self, off: u16) -> Option<u32> {
        let at = u32::from(off).checked_mul(self.notify_multiplier)?;
        (at.checked_add(2)? <= self.notify_len).then_some(at)
    }

    /// Writes `value` (the queue index) at notify offset `at` (from
    /// [`PciRegs::notify_offset`]).
    pub fn notify(&self, at: u32, value: u16) {
        // SAFETY: `notify_offset` checked that `at + 2` lies inside the
        // notify structure, which `new` checked and mapped.
        unsafe { phys::mmio_write16(self.notify + u64::from(at), value) }
    }

    /// Reads (and so clears) the ISR status; 0 without an ISR capability.
    pub fn isr(&self) -> u8 {
        if self.isr == 0 {
            return 0;
        }
        // SAFETY: `new` checked and mapped the (at least 1-byte) ISR
        // structure.
        unsafe { phys::mmio_read8(self.isr) }
    }

    /// Address of a `width`-byte field at `offset` (rounded down to
    /// `width`) of device configuration space, if it fits.
    fn device_field(&self, offset: u64, width: u64) -> Option<u64> {
        let offset = offset & !(width - 1);
        (offset + width <= u64::from(self.device_len)).then_some(self.device + offset)
    }

    /// Device configuration reads (0 beyond the structure).
    pub fn config_read32(&self, offset: u64) -> u32 {
        self.device_field(offset, 4).map_or(0, |addr| {
            // SAFETY: inside the device structure `new` checked and mapped.
            unsafe { phys::mmio_read32(addr) }
        })
    }

    pub fn config_read16(&self, offset: u64) -> u16 {
        self.device_field(offset, 2).map_or(0, |addr| {
            // SAFETY: as for `config_read32`.
            unsafe { phys::mmio_read16(addr) }
        })
    }

    pub fn config_read8(&self, offset: u64) -> u8 {
        self.device_field(offset, 1).map_or(0, |addr| {
            // SAFETY: as for `config_read32`.
            unsafe { phys::mmio_read8(addr) }
        })
    }

    /// Device configuration write (dropped beyond the structure).
    pub fn config_write32(&self, offset: u64, value: u32) {
        if let Some(addr) = self.device_field(offset, 4) {
            // SAFETY: as for `config_read32`.
            unsafe { phys::mmio_write32(addr, value) }
        }
    }
}
