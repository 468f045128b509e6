//! Address-range dispatch of guest port I/O and MMIO accesses to devices.
//!
//! A [`Bus`] is built once, before the vCPUs start, and is then shared
//! read-only between vCPU threads. Looking a device up takes no lock; only
//! the device itself is behind a mutex, so two vCPUs contend only when they
//! touch the same device.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that handles guest accesses in an address range of a [`Bus`].
pub trait BusDevice: Send {
    /// Fills `data` with the value read at `offset` from the device's base.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a guest write of `data` at `offset` from the device's base.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors of bus construction.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps a device that is already attached.
    #[error("bus range {base:#x}+{len:#x} overlaps the device at {other_base:#x}+{other_len:#x}")]
    Overlap {
        base: u64,
        len: u64,
        other_base: u64,
        other_len: u64,
    },
    /// The range is empty or wraps around the address space.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange { base: u64, len: u64 },
}

#[derive(Clone)]
struct BusEntry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A set of non-overlapping address ranges, each served by one device.
#[derive(Clone, Default)]
pub struct Bus {
    devices: BTreeMap<u64, BusEntry>,
}

impl Bus {
    /// Creates an empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Attaches `device` to serve `[base, base + len)`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let clash = self
            .devices
            .range(..end)
            .next_back()
            .filter(|(other_base, other)| **other_base + other.len > base);
        if let Some((other_base, other)) = clash {
            return Err(BusError::Overlap {
                base,
                len,
                other_base: *other_base,
                other_len: other.len,
            });
        }
        self.devices.insert(base, BusEntry { len, device });
        Ok(())
    }

    fn resolve(&self, addr: u64, access_len: usize) -> Option<(u64, &BusEntry)> {
        let (base, entry) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        let fits = offset
            .checked_add(access_len as u64)
            .is_some_and(|end| end <= entry.len);
        fits.then_some((offset, entry))
    }

    /// Dispatches a guest read. Returns false when no device serves `addr`;
    /// `data` is then left for the caller to fill.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, entry)) => {
                lock_device(&entry.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a guest write. Returns false when no device serves `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, entry)) => {
                lock_device(&entry.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering from a poisoned mutex: device state stays
/// usable even if another vCPU thread panicked while holding it.
fn lock_device<'a>(
    device: &'a Mutex<dyn BusDevice + 'static>,
) -> std::sync::MutexGuard<'a, dyn BusDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder {
        last_write: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write.push((offset, data.to_vec()));
        }
    }

    fn recorder() -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder { last_write: vec![] }))
    }

    #[test]
    fn dispatches_by_offset_within_range() {
        let mut bus = Bus::new();
        let dev = recorder();
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fa, &mut data));
        assert_eq!(data, [2]);
        assert!(bus.write(0x3ff, &[7]));
        assert_eq!(dev.lock().unwrap().last_write, vec![(7, vec![7])]);
    }

    #[test]
    fn rejects_accesses_outside_or_straddling_a_device() {
        let mut bus = Bus::new();
        bus.insert(recorder(), 0x1000, 0x10).unwrap();
        let mut data = [0u8; 4];
        assert!(!bus.read(0xfff, &mut data));
        assert!(!bus.read(0x1010, &mut data));
        assert!(!bus.read(0x100e, &mut data), "straddles the end");
        assert!(!bus.write(u64::MAX, &[0; 8]));
    }

    #[test]
    fn rejects_overlapping_and_empty_ranges() {
        let mut bus = Bus::new();
        bus.insert(recorder(), 0x100, 0x100).unwrap();
        assert!(matches!(
            bus.insert(recorder(), 0x1ff, 1),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(recorder(), 0x80, 0x81),
            Err(BusError::Overlap { .. })
        ));
        assert!(bus.insert(recorder(), 0x200, 1).is_ok());
        assert!(bus.insert(recorder(), 0x80, 0x80).is_ok());
        assert_eq!(
            bus.insert(recorder(), 0x400, 0),
            Err(BusError::InvalidRange {
                base: 0x400,
                len: 0
            })
        );
        assert!(bus.insert(recorder(), u64::MAX, 2).is_err());
    }
}
