//! Intel MultiProcessor Specification 1.4 table discovery.
//!
//! Looks for the 16-byte floating pointer (`_MP_`, 16-byte aligned, valid
//! checksum) in the first KiB of the EBDA (segment at 0x40e), in
//! 0x9fc00..0xa0000 and in 0xf0000..0x100000, follows it to the `PCMP`
//! configuration table, checks its checksum and counts enabled processor
//! entries (type 0, 20 bytes, flags bit 0). Entry types 1-4 are 8 bytes.
//! Like Linux, the entries are walked by table length (at most 256).
//!
//! Output: `probe.cpus=<N>`, plus `probe.mptable=missing` or
//! `probe.mptable=bad <reason>` when no usable table was found.

use core::fmt;

use crate::phys;
use crate::serial::outln;

/// BDA word holding the EBDA segment.
const EBDA_SEGMENT_PTR: u64 = 0x40e;
/// Base table header size.
const CONFIG_HEADER_SIZE: u64 = 44;
/// At most this many entries are walked.
const MAX_ENTRIES: u16 = 256;
const ENTRY_PROCESSOR: u8 = 0;
const PROCESSOR_ENTRY_SIZE: u64 = 20;
const OTHER_ENTRY_SIZE: u64 = 8;
const PROCESSOR_ENABLED: u8 = 1;
/// The MP default configurations (feature byte 1 != 0) have two CPUs.
const DEFAULT_CONFIG_CPUS: u32 = 2;

/// What the scan found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Found { cpus: u32 },
    Missing,
    Bad { cpus: u32, problem: Problem },
}

/// Why a floating pointer's configuration table is unusable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem {
    ConfigUnmapped { addr: u64 },
    ConfigSignature { addr: u64 },
    ConfigLength { addr: u64, length: u16 },
    ConfigChecksum { addr: u64 },
    Truncated { index: u16 },
    TooManyEntries,
    UnknownEntry { index: u16, kind: u8 },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Problem::ConfigUnmapped { addr } => write!(f, "config-unmapped addr={addr:#x}"),
            Problem::ConfigSignature { addr } => write!(f, "config-signature addr={addr:#x}"),
            Problem::ConfigLength { addr, length } => {
                write!(f, "config-length={length} addr={addr:#x}")
            }
            Problem::ConfigChecksum { addr } => write!(f, "config-checksum addr={addr:#x}"),
            Problem::Truncated { index } => write!(f, "truncated entry={index}"),
            Problem::TooManyEntries => write!(f, "too-many-entries max={MAX_ENTRIES}"),
            Problem::UnknownEntry { index, kind } => {
                write!(f, "unknown-entry-type={kind} entry={index}")
            }
        }
    }
}

/// Finds a floating pointer with a valid signature, length and checksum.
fn find_floating_pointer() -> Option<u64> {
    let mut areas = [(0u64, 0u64); 3];
    let segment = phys::read_u16(EBDA_SEGMENT_PTR).unwrap_or(0);
    let ebda = u64::from(segment) << 4;
    if segment != 0 && ebda + 1024 <= 0x10_0000 {
        areas[0] = (ebda, ebda + 1024);
    }
    areas[1] = (0x9_fc00, 0xa_0000);
    areas[2] = (0xf_0000, 0x10_0000);
    for &(start, end) in &areas {
        let mut addr = (start + 15) & !15;
        while addr + 16 <= end {
            if phys::bytes_eq(addr, b"_MP_")
                && phys::read_u8(addr + 8) == Some(1)
                && phys::byte_sum(addr, 16) == Some(0)
            {
                return Some(addr);
            }
            addr += 16;
        }
    }
    None
}

/// Walks the configuration table at `addr`, counting enabled processors.
fn count_processors(addr: u64, verbose: bool) -> Result<u32, (u32, Problem)> {
    if !phys::range_ok(addr, CONFIG_HEADER_SIZE) {
        return Err((0, Problem::ConfigUnmapped { addr }));
    }
    if !phys::bytes_eq(addr, b"PCMP") {
        return Err((0, Problem::ConfigSignature { addr }));
    }
    let length = phys::read_u16(addr + 4).unwrap_or(0);
    if u64::from(length) < CONFIG_HEADER_SIZE || !phys::range_ok(addr, u64::from(length)) {
        return Err((0, Problem::ConfigLength { addr, length }));
    }
    if phys::byte_sum(addr, u64::from(length)) != Some(0) {
        return Err((0, Problem::ConfigChecksum { addr }));
    }
    if verbose {
        let declared = phys::read_u16(addr + 34).unwrap_or(0);
        outln!(
            "probe.mptable_config=length={},entries={}",
            length,
            declared
        );
    }
    // Like Linux's smp_read_mpc, walk by the table length; the header's
    // entry count is not trusted (some firmware leaves it at 0).
    let end = addr + u64::from(length);
    let mut at = addr + CONFIG_HEADER_SIZE;
    let mut cpus = 0;
    let mut index = 0;
    while at < end {
        if index == MAX_ENTRIES {
            return Err((cpus, Problem::TooManyEntries));
        }
        let kind = phys::read_u8(at).unwrap_or(0xff);
        let size = match kind {
            ENTRY_PROCESSOR => PROCESSOR_ENTRY_SIZE,
            1..=4 => OTHER_ENTRY_SIZE,
            _ => return Err((cpus, Problem::UnknownEntry { index, kind })),
        };
        if at + size > end {
            return Err((cpus, Problem::Truncated { index }));
        }
        if kind == ENTRY_PROCESSOR {
            let flags = phys::read_u8(at + 3).unwrap_or(0);
            if verbose {
                let apic_id = phys::read_u8(at + 1).unwrap_or(0);
                outln!("probe.mptable_cpu=apic_id={},flags={:#x}", apic_id, flags);
            }
            if flags & PROCESSOR_ENABLED != 0 {
                cpus += 1;
            }
        }
        at += size;
        index += 1;
    }
    Ok(cpus)
}

/// Scans for the MP table and counts the enabled CPUs.
pub fn scan(verbose: bool) -> Outcome {
    let Some(floating) = find_floating_pointer() else {
        return Outcome::Missing;
    };
    if verbose {
        outln!(
            "probe.mptable_floating={:#x},config={:#x},default={}",
            floating,
            phys::read_u32(floating + 4).unwrap_or(0),
            phys::read_u8(floating + 11).unwrap_or(0)
        );
    }
    let config = u64::from(phys::read_u32(floating + 4).unwrap_or(0));
    let default_config = phys::read_u8(floating + 11).unwrap_or(0);
    if config == 0 && default_config != 0 {
        return Outcome::Found {
            cpus: DEFAULT_CONFIG_CPUS,
        };
    }
    match count_processors(config, verbose) {
        Ok(cpus) => Outcome::Found { cpus },
        Err((cpus, problem)) => Outcome::Bad { cpus, problem },
    }
}

/// Prints `probe.cpus=` (and `probe.mptable=` when there is no usable table).
pub fn report(verbose: bool) {
    match scan(verbose) {
        Outcome::Found { cpus } => outln!("probe.cpus={}", cpus),
        Outcome::Missing => {
            outln!("probe.cpus=0");
            outln!("probe.mptable=missing");
        }
        Outcome::Bad { cpus, problem } => {
            outln!("probe.cpus={}", cpus);
            outln!("probe.mptable=bad {}", problem);
        }
    }
}
