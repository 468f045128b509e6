//! The Intel MultiProcessor Specification 1.4 table, which tells a guest
//! without ACPI how many CPUs it has and how its interrupts are wired.
//!
//! Layout: the 16-byte floating pointer at the start of the EBDA, followed
//! by the configuration table: one processor entry per vCPU, the ISA bus,
//! the IOAPIC, one I/O interrupt entry per IOAPIC pin, and the LINT0/LINT1
//! wiring of the local APICs.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{APIC_ADDR, EBDA_START, IOAPIC_ADDR};

/// Errors writing the MP table.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MptableError {
    #[error("an MP table for {0} CPUs does not fit in the EBDA")]
    TooManyCpus(u8),
    #[error("cannot write the MP table to guest memory at {0:#x}")]
    GuestMemory(u64),
}

/// The EBDA ends where the legacy VGA window starts.
const EBDA_END: u64 = 0xa_0000;

/// IOAPIC input pins; Linux expects the 24 of a PC.
pub const IOAPIC_PINS: u8 = 24;

const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const PROCESSOR_ENTRY_LEN: usize = 20;
const SHORT_ENTRY_LEN: usize = 8;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// Family 6 stepping, and the FPU and APIC feature flags.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;
const SPEC_REVISION: u8 = 4;

/// Sum-to-zero checksum byte for `bytes`.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the MP floating pointer and configuration table for `cpu_count`
/// CPUs, to be placed at guest-physical `base`.
pub fn build(cpu_count: u8, base: u64) -> Vec<u8> {
    let ioapic_id = cpu_count.saturating_add(1);
    let table_addr = base + FLOATING_POINTER_LEN as u64;

    let mut entries = Vec::with_capacity(
        usize::from(cpu_count) * PROCESSOR_ENTRY_LEN
            + (usize::from(IOAPIC_PINS) + 4) * SHORT_ENTRY_LEN,
    );
    for cpu in 0..cpu_count {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    for pin in 0..IOAPIC_PINS {
        // Conforming polarity and trigger mode (flags 0), ISA bus 0.
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            0,
            pin,
            ioapic_id,
            pin,
        ]);
    }
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    let entry_count = u16::from(cpu_count) + 2 + u16::from(IOAPIC_PINS) + 2;

    let mut table = Vec::with_capacity(HEADER_LEN + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((HEADER_LEN + entries.len()) as u16).to_le_bytes());
    table.extend_from_slice(&[SPEC_REVISION, 0]); // checksum patched below
    table.extend_from_slice(b"TESSERA ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&APIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // no extended table
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(FLOATING_POINTER_LEN + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&(table_addr as u32).to_le_bytes());
    out.extend_from_slice(&[1, SPEC_REVISION, 0, 0, 0, 0, 0, 0]);
    out[10] = checksum(&out);
    out.extend_from_slice(&table);
    out
}

/// Writes the MP table for `cpu_count` CPUs into the EBDA.
pub fn setup_mptable(mem: &GuestMemoryMmap, cpu_count: u8) -> Result<(), MptableError> {
    let bytes = build(cpu_count, EBDA_START);
    if EBDA_START + bytes.len() as u64 > EBDA_END {
        return Err(MptableError::TooManyCpus(cpu_count));
    }
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(|_| MptableError::GuestMemory(EBDA_START))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn checksums_and_processor_count() {
        for cpus in [1u8, 2, 4, 32] {
            let bytes = build(cpus, EBDA_START);
            assert_eq!(&bytes[0..4], b"_MP_");
            assert_eq!(sum(&bytes[..16]), 0);
            let table = &bytes[16..];
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0);
            let mut processors = 0;
            let mut at = HEADER_LEN;
            while at < len {
                if table[at] == ENTRY_PROCESSOR {
                    assert_eq!(table[at + 1], processors, "APIC ids are 0..n");
                    processors += 1;
                    at += PROCESSOR_ENTRY_LEN;
                } else {
                    at += SHORT_ENTRY_LEN;
                }
            }
            assert_eq!(processors, cpus);
            let phys = u32::from_le_bytes(bytes[4..8].try_into().unwrap());
            assert_eq!(u64::from(phys), EBDA_START + 16);
        }
    }

    #[test]
    fn thirty_two_cpus_fit_in_the_ebda() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
        assert!(setup_mptable(&mem, 32).is_ok());
        assert!(build(32, EBDA_START).len() <= 1024);
    }
}
