//! Just enough ACPI to find PCI Express ECAM: the RSDP (`RSD PTR `,
//! 16-byte aligned, in the first KiB of the EBDA or in 0xe0000..0x100000),
//! the XSDT (revision >= 2; else the RSDT) and its `MCFG` table.
//!
//! Every table is read through [`crate::phys`] (so a bad pointer cannot
//! fault) and its checksum is checked.

use crate::phys;

/// BDA word holding the EBDA segment.
const EBDA_SEGMENT_PTR: u64 = 0x40e;
/// Size of a system description table header.
const HEADER_SIZE: u64 = 36;
/// Most tables listed in the XSDT/RSDT that are looked at.
const MAX_TABLES: u64 = 64;
/// Largest table accepted (bytes).
const MAX_TABLE_LEN: u32 = 64 * 1024;

/// One MCFG allocation: the ECAM window of a PCI segment's buses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ecam {
    /// Physical address of bus 0's configuration space (MCFG's base,
    /// which corresponds to bus 0 even when `start_bus` is not 0).
    pub base: u64,
    pub segment: u16,
    pub start_bus: u8,
    pub end_bus: u8,
}

/// Why no ECAM was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Missing {
    NoRsdp,
    /// The XSDT or RSDT is unmapped, has the wrong signature, length or
    /// checksum.
    BadRoot,
    NoMcfg,
    /// MCFG with a bad checksum or length, or no entry for segment 0.
    BadMcfg,
}

impl Missing {
    pub fn name(self) -> &'static str {
        match self {
            Missing::NoRsdp => "no-rsdp",
            Missing::BadRoot => "bad-xsdt",
            Missing::NoMcfg => "no-mcfg",
            Missing::BadMcfg => "bad-mcfg",
        }
    }
}

/// Finds the RSDP: signature, then the ACPI 1.0 checksum over 20 bytes
/// (and for revision >= 2 the extended one over `length` bytes).
fn find_rsdp() -> Option<u64> {
    let mut areas = [(0u64, 0u64); 2];
    let segment = phys::read_u16(EBDA_SEGMENT_PTR).unwrap_or(0);
    let ebda = u64::from(segment) << 4;
    if segment != 0 && ebda + 1024 <= 0x10_0000 {
        areas[0] = (ebda, ebda + 1024);
    }
    areas[1] = (0xe_0000, 0x10_0000);
    for &(start, end) in &areas {
        let mut addr = (start + 15) & !15;
        while addr + 20 <= end {
            if phys::bytes_eq(addr, b"RSD PTR ") && phys::byte_sum(addr, 20) == Some(0) {
                let revision = phys::read_u8(addr + 15).unwrap_or(0);
                if revision < 2 {
                    return Some(addr);
                }
                let length = phys::read_u32(addr + 20).unwrap_or(0);
                if (36..=1024).contains(&length)
                    && phys::byte_sum(addr, u64::from(length)) == Some(0)
                {
                    return Some(addr);
                }
            }
            addr += 16;
        }
    }
    None
}

/// Length of the table at `addr` if its signature is `signature`, its
/// length sane and its checksum right.
fn table(addr: u64, signature: &[u8; 4]) -> Option<u64> {
    if !phys::bytes_eq(addr, signature) {
        return None;
    }
    let length = phys::read_u32(addr + 4)?;
    if u64::from(length) < HEADER_SIZE || length > MAX_TABLE_LEN {
        return None;
    }
    (phys::byte_sum(addr, u64::from(length))? == 0).then_some(u64::from(length))
}

/// The ECAM window of PCI segment 0 from the MCFG, if ACPI has one.
pub fn find_ecam() -> Result<Ecam, Missing> {
    let rsdp = find_rsdp().ok_or(Missing::NoRsdp)?;
    let revision = phys::read_u8(rsdp + 15).unwrap_or(0);
    let (root, entry_size, signature) = if revision >= 2 {
        (phys::read_u64(rsdp + 24).unwrap_or(0), 8, b"XSDT")
    } else {
        (
            u64::from(phys::read_u32(rsdp + 16).unwrap_or(0)),
            4,
            b"RSDT",
        )
    };
    let length = table(root, signature).ok_or(Missing::BadRoot)?;
    let entries = ((length - HEADER_SIZE) / entry_size).min(MAX_TABLES);
    for i in 0..entries {
        let at = root + HEADER_SIZE + i * entry_size;
        let addr = if entry_size == 8 {
            phys::read_u64(at)
        } else {
            phys::read_u32(at).map(u64::from)
        }
        .unwrap_or(0);
        if !phys::bytes_eq(addr, b"MCFG") {
            continue;
        }
        let length = table(addr, b"MCFG").ok_or(Missing::BadMcfg)?;
        // Header, 8 reserved bytes, then 16-byte allocations.
        let mut at = addr + HEADER_SIZE + 8;
        while at + 16 <= addr + length {
            let base = phys::read_u64(at).unwrap_or(0);
            let segment = phys::read_u16(at + 8).unwrap_or(u16::MAX);
            let start_bus = phys::read_u8(at + 10).unwrap_or(0xff);
            let end_bus = phys::read_u8(at + 11).unwrap_or(0);
            if segment == 0 && start_bus <= end_bus {
                return Ok(Ecam {
                    base,
                    segment,
                    start_bus,
                    end_bus,
                });
            }
            at += 16;
        }
        return Err(Missing::BadMcfg);
    }
    Err(Missing::NoMcfg)
}
