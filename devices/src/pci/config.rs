//! A PCI function's 256-byte type-0 configuration space: the header, a
//! capability list, and a fixed 32-bit memory BAR0. Each byte has a write
//! mask, so a guest changes only what a real function would let it
//! change; BAR0 answers the sizing probe but never moves.

/// Bytes of configuration space (no PCIe extended space).
pub const CONFIG_SPACE_SIZE: usize = 256;

const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;
const REVISION: usize = 0x08;
const CACHE_LINE_SIZE: usize = 0x0c;
const BAR0: usize = 0x10;
const SUBSYSTEM_VENDOR: usize = 0x2c;
const CAPABILITY_POINTER: usize = 0x34;
const INTERRUPT_LINE: usize = 0x3c;
/// Capabilities start after the standard header.
const FIRST_CAPABILITY: u8 = 0x40;
/// Status: the function has a capability list.
const STATUS_CAPABILITIES: u16 = 0x0010;
/// The command bits a guest may set (I/O, memory, bus master ... INTx disable).
const COMMAND_WRITABLE: u16 = 0x07ff;

/// What identifies a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIdentity {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    /// Class, subclass, programming interface.
    pub class: [u8; 3],
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

/// Errors building a configuration space.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("a capability of {len} bytes does not fit at {offset:#x}")]
    CapabilityTooBig { offset: usize, len: usize },
    #[error("BAR0 size {size:#x} is not a power of two of at least 16 bytes")]
    BadBarSize { size: u32 },
}

/// One function's configuration space.
#[derive(Debug, Clone)]
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SPACE_SIZE],
    writable: [u8; CONFIG_SPACE_SIZE],
    bar0: Option<(u32, u32)>,
    /// The guest wrote all-ones to BAR0: the next read returns the size.
    bar0_sizing: bool,
    last_capability: Option<usize>,
    next_capability: usize,
}

impl ConfigSpace {
    /// A function with `identity`, no BAR and no capability.
    pub fn new(identity: &PciIdentity) -> Self {
        let mut space = Self {
            bytes: [0; CONFIG_SPACE_SIZE],
            writable: [0; CONFIG_SPACE_SIZE],
            bar0: None,
            bar0_sizing: false,
            last_capability: None,
            next_capability: usize::from(FIRST_CAPABILITY),
        };
        space.set_u16(0, identity.vendor);
        space.set_u16(2, identity.device);
        space.bytes[REVISION] = identity.revision;
        space.bytes[REVISION + 1] = identity.class[2];
        space.bytes[REVISION + 2] = identity.class[1];
        space.bytes[REVISION + 3] = identity.class[0];
        space.set_u16(SUBSYSTEM_VENDOR, identity.subsystem_vendor);
        space.set_u16(SUBSYSTEM_VENDOR + 2, identity.subsystem);
        space.writable[COMMAND..COMMAND + 2].copy_from_slice(&COMMAND_WRITABLE.to_le_bytes());
        space.writable[CACHE_LINE_SIZE] = 0xff;
        space.writable[INTERRUPT_LINE] = 0xff;
        space
    }

    /// Gives the function a 32-bit, non-prefetchable memory BAR0 of `size`
    /// bytes at `address`, which never moves.
    pub fn set_bar0(&mut self, address: u32, size: u32) -> Result<(), ConfigError> {
        if !size.is_power_of_two() || size < 16 || address & (size - 1) != 0 {
            return Err(ConfigError::BadBarSize { size });
        }
        self.bar0 = Some((address, size));
        self.set_u32(BAR0, address);
        Ok(())
    }

    /// Appends a capability with `id` whose body (after the id and next
    /// pointer) is `body`; `writable` masks the body's bytes (shorter means
    /// read-only past its end). Returns the capability's offset.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<usize, ConfigError> {
        let offset = self.next_capability;
        let len = 2 + body.len();
        if offset + len > CONFIG_SPACE_SIZE {
            return Err(ConfigError::CapabilityTooBig { offset, len });
        }
        self.bytes[offset] = id;
        self.bytes[offset + 1] = 0;
        self.bytes[offset + 2..offset + len].copy_from_slice(body);
        for (mask, bits) in self.writable[offset + 2..offset + len]
            .iter_mut()
            .zip(writable)
        {
            *mask = *bits;
        }
        match self.last_capability {
            Some(last) => self.bytes[last + 1] = offset as u8,
            None => {
                self.bytes[CAPABILITY_POINTER] = offset as u8;
                self.set_u16(STATUS, STATUS_CAPABILITIES);
            }
        }
        self.last_capability = Some(offset);
        self.next_capability = (offset + len).next_multiple_of(4);
        Ok(offset)
    }

    /// Reads `data.len()` bytes at `offset`; the caller keeps accesses
    /// inside one dword.
    pub fn read(&mut self, offset: usize, data: &mut [u8]) {
        let Some(bytes) = self.bytes.get(offset..offset + data.len()) else {
            data.fill(0);
            return;
        };
        data.copy_from_slice(bytes);
        if (BAR0..BAR0 + 4).contains(&offset) && self.bar0_sizing {
            if let Some((_, size)) = self.bar0 {
                let sized = (!(size - 1)).to_le_bytes();
                data.copy_from_slice(&sized[offset - BAR0..offset - BAR0 + data.len()]);
            }
        }
    }

    /// A guest's write of `data` at `offset`, through the write masks.
    /// Returns false when the write tried to change a read-only bit or
    /// move BAR0 (the caller counts it).
    pub fn write(&mut self, offset: usize, data: &[u8]) -> bool {
        if offset + data.len() > CONFIG_SPACE_SIZE {
            return false;
        }
        if (BAR0..BAR0 + 4).contains(&offset) {
            return self.write_bar0(offset, data);
        }
        let mut honoured = true;
        for (i, value) in data.iter().enumerate() {
            let at = offset + i;
            let mask = self.writable[at];
            if (value ^ self.bytes[at]) & !mask != 0 {
                honoured = false;
            }
            self.bytes[at] = (self.bytes[at] & !mask) | (value & mask);
        }
        honoured
    }

    fn write_bar0(&mut self, offset: usize, data: &[u8]) -> bool {
        let Some((address, _)) = self.bar0 else {
            return data.iter().all(|b| *b == 0);
        };
        if offset == BAR0 && data == [0xff; 4] {
            self.bar0_sizing = true;
            return true;
        }
        self.bar0_sizing = false;
        // Writing back the address it has (as a driver does after sizing)
        // is fine; any other address is ignored.
        let current = address.to_le_bytes();
        data == &current[offset - BAR0..offset - BAR0 + data.len()]
    }

    /// Reads a byte, for the function's own use.
    pub fn u8_at(&self, offset: usize) -> u8 {
        self.bytes[offset]
    }

    /// Reads a little-endian u16, for the function's own use.
    pub fn u16_at(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.bytes[offset], self.bytes[offset + 1]])
    }

    /// Reads a little-endian u32, for the function's own use.
    pub fn u32_at(&self, offset: usize) -> u32 {
        let mut bytes = [0; 4];
        bytes.copy_from_slice(&self.bytes[offset..offset + 4]);
        u32::from_le_bytes(bytes)
    }

    /// Sets a u16 whatever its mask (the function's own registers).
    pub fn set_u16(&mut self, offset: usize, value: u16) {
        self.bytes[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
    }

    /// Sets a u32 whatever its mask (the function's own registers).
    pub fn set_u32(&mut self, offset: usize, value: u32) {
        self.bytes[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
    }

    /// The guest-writable bytes, for a snapshot.
    pub fn writable_bytes(&self) -> Vec<u8> {
        self.bytes
            .iter()
            .zip(&self.writable)
            .map(|(b, m)| b & m)
            .collect()
    }

    /// Takes a snapshot's guest-writable bytes; read-only ones stay as
    /// this function has them, whatever the snapshot says.
    pub fn restore_writable_bytes(&mut self, saved: &[u8]) {
        for ((byte, mask), saved) in self.bytes.iter_mut().zip(&self.writable).zip(saved) {
            *byte = (*byte & !mask) | (saved & mask);
        }
        self.bar0_sizing = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> PciIdentity {
        PciIdentity {
            vendor: 0x1af4,
            device: 0x1042,
            revision: 1,
            class: [0x01, 0x80, 0x00],
            subsystem_vendor: 0x1af4,
            subsystem: 0x1042,
        }
    }

    fn read32(space: &mut ConfigSpace, offset: usize) -> u32 {
        let mut data = [0; 4];
        space.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn the_header_reads_as_built_and_resists_writes() {
        let mut space = ConfigSpace::new(&identity());
        assert_eq!(read32(&mut space, 0), 0x1042_1af4);
        assert_eq!(read32(&mut space, 8), 0x0180_0001);
        assert_eq!(read32(&mut space, 0x2c), 0x1042_1af4);
        assert!(!space.write(0, &[0; 4]));
        assert!(!space.write(8, &[0xff]));
        assert_eq!(read32(&mut space, 0), 0x1042_1af4);
        assert_eq!(read32(&mut space, 8), 0x0180_0001);
        assert!(
            !space.write(4, &0xffff_u16.to_le_bytes()),
            "bits 11-15 are read-only"
        );
        assert_eq!(read32(&mut space, 4) & 0xffff, 0x07ff);
        assert!(!space.write(0x30, &[0x00, 0xf8, 0xff, 0xff]));
        assert_eq!(read32(&mut space, 0x30), 0, "no expansion ROM");
        assert!(!space.write(0x14, &[0xff; 4]));
        assert_eq!(read32(&mut space, 0x14), 0, "no BAR1");
    }

    #[test]
    fn bar0_answers_the_sizing_probe_but_never_moves() {
        let mut space = ConfigSpace::new(&identity());
        space.set_bar0(0xd800_0000, 0x8_0000).unwrap();
        assert_eq!(read32(&mut space, 0x10), 0xd800_0000);
        assert!(space.write(0x10, &[0xff; 4]));
        assert_eq!(read32(&mut space, 0x10), 0xfff8_0000);
        assert!(space.write(0x10, &0xd800_0000_u32.to_le_bytes()));
        assert_eq!(read32(&mut space, 0x10), 0xd800_0000);
        assert!(!space.write(0x10, &0xdead_bee0_u32.to_le_bytes()));
        assert!(!space.write(0x12, &[0x12]));
        assert_eq!(read32(&mut space, 0x10), 0xd800_0000);
        assert_eq!(
            space.set_bar0(0xd800_0000, 3),
            Err(ConfigError::BadBarSize { size: 3 })
        );
    }

    #[test]
    fn capabilities_chain_from_0x40_dword_aligned() {
        let mut space = ConfigSpace::new(&identity());
        assert_eq!(read32(&mut space, 4) >> 16, 0, "no list yet");
        let first = space.add_capability(0x09, &[14, 1, 0, 0], &[]).unwrap();
        let second = space.add_capability(0x11, &[0; 10], &[0, 0xc0]).unwrap();
        assert_eq!((first, second), (0x40, 0x48));
        assert_eq!(read32(&mut space, 4) >> 16, 0x10);
        assert_eq!(space.u8_at(0x34), 0x40);
        assert_eq!(space.u8_at(0x41), 0x48);
        assert_eq!(space.u8_at(0x49), 0);
        space.write(0x4a, &[0xff, 0xff]);
        assert_eq!(space.u16_at(0x4a), 0xc000, "only the masked bits");
        let err = space.add_capability(0x09, &[0; 250], &[]).unwrap_err();
        assert!(matches!(err, ConfigError::CapabilityTooBig { .. }));
    }

    #[test]
    fn a_snapshot_restores_only_writable_bytes() {
        let mut space = ConfigSpace::new(&identity());
        space.write(0x3c, &[11]);
        let mut saved = space.writable_bytes();
        saved[0] = 0x99; // a hostile file cannot change the vendor
        let mut fresh = ConfigSpace::new(&identity());
        fresh.restore_writable_bytes(&saved);
        assert_eq!(fresh.u8_at(0x3c), 11);
        assert_eq!(fresh.u16_at(0), 0x1af4);
    }
}
