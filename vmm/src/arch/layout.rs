//! The guest-physical memory map. The values match Firecracker's, so that
//! guests and tools built for Firecracker find things where they expect.
//!
//! ```text
//! 0x0000_0500  boot GDT, then IDT
//! 0x0000_6000  PVH hvm_start_info, module list at +0x40
//! 0x0000_7000  zero page (Linux boot protocol) or PVH memory map
//! 0x0000_8ff0  initial stack pointer (grows down)
//! 0x0000_9000  identity page tables (PML4, PDPT, PD)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA: MP floating pointer and configuration table
//! 0x000e_0000  ACPI: RSDP, then DSDT, FADT, MADT, XSDT
//! 0x0010_0000  kernel
//!      ...     RAM, initrd at the top of low RAM
//! 0xd000_0000  MMIO hole: boot timer, then virtio-mmio devices
//! 0xfec0_0000  IOAPIC;  0xfee0_0000 LAPIC
//! 0x1_0000_0000 RAM above 4 GiB
//! ```

/// Boot GDT and IDT.
pub const BOOT_GDT_OFFSET: u64 = 0x500;
pub const BOOT_IDT_OFFSET: u64 = 0x520;
/// PVH `hvm_start_info`, module list and memory map.
pub const PVH_INFO_START: u64 = 0x6000;
pub const MODLIST_START: u64 = 0x6040;
pub const MEMMAP_START: u64 = 0x7000;
/// Linux boot protocol zero page.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables for the 64-bit entry.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line; x86 Linux reads at most 2048 bytes.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the Extended BIOS Data Area; the MP table lives here.
pub const EBDA_START: u64 = 0x9fc00;
/// The ACPI RSDP, where Linux scans the BIOS area for it; the other tables
/// follow it.
pub const RSDP_ADDR: u64 = 0xe_0000;
/// The ACPI sleep control register (an I/O port, as Cloud Hypervisor's).
pub const ACPI_SLEEP_PORT: u64 = 0x600;
/// First address above the legacy BIOS area; kernels load here.
pub const HIMEM_START: u64 = 0x10_0000;
/// The MMIO hole below 4 GiB.
pub const MMIO_MEM_START: u64 = 0xd000_0000;
pub const FIRST_ADDR_PAST_32BITS: u64 = 1 << 32;
pub const MMIO_MEM_SIZE: u64 = FIRST_ADDR_PAST_32BITS - MMIO_MEM_START;
/// The boot timer takes the first page of the MMIO hole.
pub const BOOT_TIMER_START: u64 = MMIO_MEM_START;
pub const BOOT_TIMER_SIZE: u64 = 0x1000;
/// Interrupt controllers.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// Where KVM puts the TSS and identity map it needs for real mode on Intel.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// e820 entry types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// One entry of the e820 map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The guest RAM regions `(guest address, size)` for `mem_size` bytes:
/// RAM fills from 0 up to the MMIO hole and continues above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_MEM_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_MEM_START),
            (FIRST_ADDR_PAST_32BITS, mem_size - MMIO_MEM_START),
        ]
    }
}

/// The e820 map the guest sees for `mem_size` bytes of RAM. The legacy
/// BIOS area (EBDA, VGA, ROMs) is left out of RAM, as on a PC.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let ram = |addr, end: u64| E820Entry {
        addr,
        size: end - addr,
        kind: E820_RAM,
    };
    let mut map = vec![
        ram(0, EBDA_START),
        E820Entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    for (start, size) in ram_regions(mem_size) {
        let (low, end) = (start.max(HIMEM_START), start + size);
        if end > low {
            map.push(ram(low, end));
        }
    }
    map
}

/// The highest guest-physical address of low RAM (below the MMIO hole), exclusive.
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_MEM_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn ram_total(map: &[E820Entry]) -> u64 {
        map.iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum()
    }

    fn assert_well_formed(map: &[E820Entry], mem: u64) {
        for pair in map.windows(2) {
            assert!(pair[0].addr + pair[0].size <= pair[1].addr, "{map:x?}");
        }
        for e in map.iter().filter(|e| e.kind == E820_RAM) {
            let end = e.addr + e.size;
            assert!(
                end <= MMIO_MEM_START || e.addr >= FIRST_ADDR_PAST_32BITS,
                "RAM in the MMIO hole: {e:x?}"
            );
        }
        // All RAM except the 384 KiB legacy area is usable.
        assert_eq!(ram_total(map), mem - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn small_memory_fits_below_the_hole() {
        for mib in [32, 128, 512, 3328] {
            let map = e820_map(mib * MIB);
            assert_eq!(map.len(), 3, "{mib} MiB: {map:x?}");
            assert_eq!(map[2].addr + map[2].size, mib * MIB);
            assert_well_formed(&map, mib * MIB);
            assert_eq!(ram_regions(mib * MIB), vec![(0, mib * MIB)]);
        }
    }

    #[test]
    fn large_memory_skips_the_hole() {
        for mib in [3329, 3584, 4096, 8192, 65536] {
            let mem = mib * MIB;
            let map = e820_map(mem);
            assert_eq!(map.len(), 4, "{mib} MiB: {map:x?}");
            assert_eq!(map[2].addr + map[2].size, MMIO_MEM_START);
            assert_eq!(map[3].addr, FIRST_ADDR_PAST_32BITS);
            assert_eq!(map[3].size, mem - MMIO_MEM_START);
            assert_well_formed(&map, mem);
            let regions = ram_regions(mem);
            assert_eq!(regions.iter().map(|r| r.1).sum::<u64>(), mem);
        }
    }
}
