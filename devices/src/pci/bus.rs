//! The root bus: a table of slots (00:00.0 is the host bridge) shared by
//! the three ways a guest reaches them: configuration mechanism #1 at
//! ports 0xCF8-0xCFF, ECAM in the MMIO hole, and the window of the slots'
//! BAR0s. Each is one entry of the VMM's [`Bus`](crate::Bus), registered
//! at boot; a hot-plug only fills a slot. vCPUs take the table's read lock
//! only to clone a slot's handle.

use std::sync::{Arc, Mutex, RwLock};

use super::config::{ConfigSpace, PciIdentity};
use super::{BAR0_SIZE, DEVICE_SLOTS};
use crate::bus::BusDevice;
use crate::guest_log_here;

/// A function on the root bus.
pub trait PciFunction: Send {
    /// Reads its configuration space at `offset` (0..256, inside a dword).
    fn config_read(&mut self, offset: usize, data: &mut [u8]);
    /// Writes its configuration space at `offset` (0..256, inside a dword).
    fn config_write(&mut self, offset: usize, data: &[u8]);
    /// Reads its BAR0 at `offset` (inside [`BAR0_SIZE`]).
    fn bar_read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes its BAR0 at `offset` (inside [`BAR0_SIZE`]).
    fn bar_write(&mut self, offset: u64, data: &[u8]);
}

/// A slot's occupant.
pub type PciHandle = Arc<Mutex<dyn PciFunction>>;

/// Errors filling or emptying a slot.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SlotError {
    #[error("PCI slot {0} does not exist (devices take slots 1 to 31)")]
    Invalid(u8),
    #[error("PCI slot {0} is taken")]
    Taken(u8),
    #[error("no PCI slot is free: the bus holds 31 devices")]
    Full,
}

/// The 00:00.0 host bridge: an Intel vendor id and the host-bridge class,
/// which Linux's configuration-mechanism check looks for.
pub struct HostBridge {
    config: ConfigSpace,
}

impl HostBridge {
    pub fn new() -> Self {
        Self {
            config: ConfigSpace::new(&PciIdentity {
                vendor: 0x8086,
                device: 0x0d57,
                revision: 0,
                class: [0x06, 0x00, 0x00],
                subsystem_vendor: 0,
                subsystem: 0,
            }),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciFunction for HostBridge {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
    }
    fn bar_read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _offset: u64, _data: &[u8]) {}
}

/// The functions of bus 0, by slot.
pub struct PciSlots {
    slots: RwLock<Vec<Option<PciHandle>>>,
}

impl PciSlots {
    /// A bus with the host bridge in slot 0 and every other slot free.
    pub fn new() -> Self {
        let mut slots: Vec<Option<PciHandle>> = vec![None; usize::from(DEVICE_SLOTS.end)];
        slots[0] = Some(Arc::new(Mutex::new(HostBridge::new())));
        Self {
            slots: RwLock::new(slots),
        }
    }

    /// The lowest free slot.
    pub fn free_slot(&self) -> Result<u8, SlotError> {
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
        DEVICE_SLOTS
            .clone()
            .find(|s| slots[usize::from(*s)].is_none())
            .ok_or(SlotError::Full)
    }

    /// Puts `function` in `slot`: from now on the guest sees it.
    pub fn insert(&self, slot: u8, function: PciHandle) -> Result<(), SlotError> {
        if !DEVICE_SLOTS.contains(&slot) {
            return Err(SlotError::Invalid(slot));
        }
        let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
        let entry = &mut slots[usize::from(slot)];
        if entry.is_some() {
            return Err(SlotError::Taken(slot));
        }
        *entry = Some(function);
        Ok(())
    }

    /// Empties `slot`; the guest no longer sees its function.
    pub fn remove(&self, slot: u8) -> Option<PciHandle> {
        if !DEVICE_SLOTS.contains(&slot) {
            return None;
        }
        let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
        slots[usize::from(slot)].take()
    }

    /// The function in `slot`, if any.
    pub fn get(&self, slot: u8) -> Option<PciHandle> {
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
        slots.get(usize::from(slot)).cloned().flatten()
    }

    /// A configuration access to bus 0 device `slot` function
    /// `function`: anything absent reads all-ones.
    fn config_read(&self, bus: u8, slot: u8, function: u8, offset: usize, data: &mut [u8]) {
        match self.addressed(bus, slot, function) {
            Some(f) => f
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .config_read(offset, data),
            None => data.fill(0xff),
        }
    }

    fn config_write(&self, bus: u8, slot: u8, function: u8, offset: usize, data: &[u8]) {
        if let Some(f) = self.addressed(bus, slot, function) {
            f.lock()
                .unwrap_or_else(|p| p.into_inner())
                .config_write(offset, data);
        }
    }

    fn addressed(&self, bus: u8, slot: u8, function: u8) -> Option<PciHandle> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.get(slot)
    }
}

impl Default for PciSlots {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether a configuration access of `len` bytes at `offset` stays inside
/// one dword, with a size a CPU can make.
fn well_formed(offset: usize, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && offset % 4 + len <= 4
}

/// Configuration mechanism #1: CONFIG_ADDRESS at 0xCF8, CONFIG_DATA at
/// 0xCFC-0xCFF. Bus offsets are relative to 0xCF8.
pub struct PciConfigIo {
    slots: Arc<PciSlots>,
    address: u32,
}

impl PciConfigIo {
    /// Ports 0xCF8 to 0xCFF.
    pub const PORT_BASE: u64 = 0xcf8;
    pub const PORT_LEN: u64 = 8;

    pub fn new(slots: Arc<PciSlots>) -> Self {
        Self { slots, address: 0 }
    }

    /// (enabled, bus, device, function, register) from CONFIG_ADDRESS.
    fn decode(&self) -> (bool, u8, u8, u8, usize) {
        let a = self.address;
        (
            a & 0x8000_0000 != 0,
            (a >> 16) as u8,
            ((a >> 11) & 0x1f) as u8,
            ((a >> 8) & 0x7) as u8,
            (a & 0xfc) as usize,
        )
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let offset = offset as usize;
        if offset < 4 {
            if !well_formed(offset, data.len()) {
                data.fill(0xff);
                return;
            }
            let bytes = self.address.to_le_bytes();
            data.copy_from_slice(&bytes[offset..offset + data.len()]);
            return;
        }
        let (enabled, bus, device, function, register) = self.decode();
        let within = offset - 4;
        if !enabled || !well_formed(within, data.len()) {
            data.fill(0xff);
            return;
        }
        self.slots
            .config_read(bus, device, function, register + within, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let offset = offset as usize;
        if offset < 4 {
            if !well_formed(offset, data.len()) {
                return;
            }
            let mut bytes = self.address.to_le_bytes();
            bytes[offset..offset + data.len()].copy_from_slice(data);
            self.address = u32::from_le_bytes(bytes);
            return;
        }
        let (enabled, bus, device, function, register) = self.decode();
        let within = offset - 4;
        if !enabled || !well_formed(within, data.len()) {
            return;
        }
        self.slots
            .config_write(bus, device, function, register + within, data);
    }
}

/// ECAM: bus 27:20, device 19:15, function 14:12, register 11:0 of the
/// offset. Registers past the 256 bytes of a function read zero.
pub struct PciEcam {
    slots: Arc<PciSlots>,
}

impl PciEcam {
    pub fn new(slots: Arc<PciSlots>) -> Self {
        Self { slots }
    }

    fn decode(offset: u64) -> (u8, u8, u8, usize) {
        (
            ((offset >> 20) & 0xff) as u8,
            ((offset >> 15) & 0x1f) as u8,
            ((offset >> 12) & 0x7) as u8,
            (offset & 0xfff) as usize,
        )
    }
}

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (bus, device, function, register) = Self::decode(offset);
        if !well_formed(register, data.len()) {
            data.fill(0xff);
            return;
        }
        if register >= super::config::CONFIG_SPACE_SIZE {
            match self.slots.addressed(bus, device, function) {
                Some(_) => data.fill(0),
                None => data.fill(0xff),
            }
            return;
        }
        self.slots
            .config_read(bus, device, function, register, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (bus, device, function, register) = Self::decode(offset);
        if well_formed(register, data.len()) && register < super::config::CONFIG_SPACE_SIZE {
            self.slots
                .config_write(bus, device, function, register, data);
        }
    }
}

/// The window of every slot's BAR0, slot 1 first; an access goes to the
/// function in the slot it falls in.
pub struct PciBarWindow {
    slots: Arc<PciSlots>,
}

impl PciBarWindow {
    /// The window's length: one BAR0 per device slot.
    pub const LEN: u64 = BAR0_SIZE * (DEVICE_SLOTS.end - DEVICE_SLOTS.start) as u64;

    pub fn new(slots: Arc<PciSlots>) -> Self {
        Self { slots }
    }

    fn route(&self, offset: u64, len: usize) -> Option<(PciHandle, u64)> {
        let slot = u8::try_from(offset / BAR0_SIZE + 1).ok()?;
        let within = offset % BAR0_SIZE;
        if within + len as u64 > BAR0_SIZE {
            return None;
        }
        Some((self.slots.get(slot)?, within))
    }
}

impl BusDevice for PciBarWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.route(offset, data.len()) {
            Some((f, within)) => f
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .bar_read(within, data),
            None => {
                guest_log_here!(
                    log::Level::Debug,
                    "pci: read at {offset:#x} of the BAR window hits no device"
                );
                data.fill(0xff);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match self.route(offset, data.len()) {
            Some((f, within)) => f
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .bar_write(within, data),
            None => guest_log_here!(
                log::Level::Debug,
                "pci: write at {offset:#x} of the BAR window hits no device"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records BAR accesses; config space reads its offset.
    #[derive(Default)]
    struct Probe {
        bar_writes: Vec<(u64, Vec<u8>)>,
    }

    impl PciFunction for Probe {
        fn config_read(&mut self, offset: usize, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn config_write(&mut self, _: usize, _: &[u8]) {}
        fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill((offset >> 12) as u8);
        }
        fn bar_write(&mut self, offset: u64, data: &[u8]) {
            self.bar_writes.push((offset, data.to_vec()));
        }
    }

    fn read(dev: &mut dyn BusDevice, offset: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0; len];
        dev.read(offset, &mut data);
        data
    }

    #[test]
    fn config_address_takes_linux_conf1_probe() {
        // arch/x86/pci/direct.c: pci_check_type1.
        let mut io = PciConfigIo::new(Arc::new(PciSlots::new()));
        io.write(3, &[0x01]);
        io.write(0, &0x8000_0000_u32.to_le_bytes());
        assert_eq!(read(&mut io, 0, 4), 0x8000_0000_u32.to_le_bytes());
        // The host bridge's vendor and class.
        assert_eq!(read(&mut io, 4, 4), [0x86, 0x80, 0x57, 0x0d]);
        io.write(0, &0x8000_0008_u32.to_le_bytes());
        assert_eq!(read(&mut io, 7, 1), [0x06]);
    }

    #[test]
    fn absent_and_malformed_accesses_read_all_ones() {
        let slots = Arc::new(PciSlots::new());
        let mut io = PciConfigIo::new(slots.clone());
        io.write(0, &(0x8000_0000_u32 | 5 << 11).to_le_bytes());
        assert_eq!(read(&mut io, 4, 4), [0xff; 4], "empty slot");
        io.write(0, &(0x8000_0000_u32 | 1 << 16).to_le_bytes());
        assert_eq!(read(&mut io, 4, 4), [0xff; 4], "bus 1");
        io.write(0, &0x0000_0000_u32.to_le_bytes());
        assert_eq!(read(&mut io, 4, 4), [0xff; 4], "not enabled");
        io.write(0, &0x8000_0000_u32.to_le_bytes());
        assert_eq!(read(&mut io, 7, 2), [0xff; 2], "straddles the dword");
        let mut ecam = PciEcam::new(slots);
        assert_eq!(read(&mut ecam, 2, 4), [0xff; 4]);
        assert_eq!(read(&mut ecam, 0, 8), [0xff; 8]);
        assert_eq!(read(&mut ecam, 7 << 12, 4), [0xff; 4], "function 7");
        assert_eq!(read(&mut ecam, 255 << 20, 4), [0xff; 4], "bus 255");
        assert_eq!(read(&mut ecam, 0x100, 4), [0; 4], "past 256 bytes");
        assert_eq!(read(&mut ecam, 0, 2), [0x86, 0x80]);
    }

    #[test]
    fn slots_fill_lowest_first_and_reach_their_bar() {
        let slots = Arc::new(PciSlots::new());
        assert_eq!(slots.free_slot(), Ok(1));
        let probe = Arc::new(Mutex::new(Probe::default()));
        slots.insert(1, probe.clone()).unwrap();
        assert_eq!(slots.insert(1, probe.clone()), Err(SlotError::Taken(1)));
        assert_eq!(slots.insert(0, probe.clone()), Err(SlotError::Invalid(0)));
        assert_eq!(slots.insert(32, probe.clone()), Err(SlotError::Invalid(32)));
        assert_eq!(slots.free_slot(), Ok(2));
        let mut ecam = PciEcam::new(slots.clone());
        assert_eq!(read(&mut ecam, 1 << 15 | 0x40, 1), [0x40]);
        let mut window = PciBarWindow::new(slots.clone());
        assert_eq!(read(&mut window, 0x6000, 2), [6, 6]);
        window.write(0x6004, &[1, 0]);
        window.write(BAR0_SIZE + 0x6004, &[1, 0]);
        window.write(BAR0_SIZE - 1, &[1, 0]);
        assert_eq!(probe.lock().unwrap().bar_writes, vec![(0x6004, vec![1, 0])]);
        assert_eq!(
            read(&mut window, BAR0_SIZE, 4),
            [0xff; 4],
            "slot 2 is empty"
        );
        assert!(slots.remove(1).is_some());
        assert_eq!(read(&mut window, 0x6000, 2), [0xff; 2]);
        for s in DEVICE_SLOTS {
            slots.insert(s, probe.clone()).unwrap();
        }
        assert_eq!(slots.free_slot(), Err(SlotError::Full));
        assert_eq!(PciBarWindow::LEN, 31 * BAR0_SIZE);
    }
}
