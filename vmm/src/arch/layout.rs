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
//! 0xd002_0000  PCI hot-plug registers (--enable-pci)
//! 0xd800_0000  PCI 32-bit BAR window, 128 MiB (--enable-pci)
//! 0xeec0_0000  PCI ECAM, 256 MiB reserved, bus 0 in the first MiB (--enable-pci)
//! 0xfec0_0000  IOAPIC;  0xfee0_0000 LAPIC
//! 0xfffb_c000  KVM's identity map and TSS
//! 0x1_0000_0000 RAM above 4 GiB
//! ```
//!
//! Everything from 0xd000_0000 to 4 GiB is the MMIO hole: RAM is never
//! there, with or without PCI.

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
/// The PCI hot-plug registers (PCIU/PCID/B0EJ/PSEG), above the last
/// virtio-mmio slot; used only with `--enable-pci`.
pub const PCI_HOTPLUG_START: u64 = 0xd002_0000;
pub const PCI_HOTPLUG_SIZE: u64 = 0x1000;
/// The window of the PCI devices' 32-bit memory BARs (each slot's BAR0 at
/// a fixed address in it, see `devices::pci::bar0_address`), advertised in
/// the root bridge's `_CRS`.
pub const PCI_MMIO32_START: u64 = 0xd800_0000;
pub const PCI_MMIO32_SIZE: u64 = 128 << 20;
/// PCI Express enhanced configuration space (ECAM): 256 MiB reserved (256
/// buses, Firecracker's PCI_MMCONFIG_START and size), of which the only
/// bus, bus 0, uses the first MiB.
pub const PCI_ECAM_START: u64 = 0xeec0_0000;
pub const PCI_ECAM_SIZE: u64 = 256 << 20;
pub const PCI_ECAM_BUS0_SIZE: u64 = 1 << 20;
/// PCI configuration mechanism #1: CONFIG_ADDRESS at 0xcf8, CONFIG_DATA at
/// 0xcfc, 8 ports in all.
pub const PCI_CONFIG_PORT: u64 = 0xcf8;
pub const PCI_CONFIG_PORT_SIZE: u64 = 8;
/// The IOAPIC pin of the ACPI Generic Event Device (PCI hot-plug
/// notifications). It is the last virtio-mmio IRQ too, which is free with
/// `--enable-pci` (no device is on virtio-mmio then).
pub const GED_GSI: u32 = 23;
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

/// The e820 map the guest sees for `mem_size` bytes of RAM, in address
/// order. The legacy BIOS area (EBDA, VGA, ROMs) is left out of RAM, as on
/// a PC. With `pci`, the ECAM range is reserved too, as Firecracker does
/// (Linux checks that an MCFG region is reserved before it uses it).
pub fn e820_map(mem_size: u64, pci: bool) -> Vec<E820Entry> {
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
    if pci {
        map.push(E820Entry {
            addr: PCI_ECAM_START,
            size: PCI_ECAM_SIZE,
            kind: E820_RESERVED,
        });
        // A kernel without ACPI puts the BARs of devices it finds on a
        // rescan (hot-plug) from the start of the largest gap below 4 GiB
        // (`pci_mem_start`): reserving what lies between low RAM and the
        // BAR window makes that gap start at the window, where each
        // slot's fixed BAR0 is.
        let low_end = low_ram_end(mem_size);
        map.push(E820Entry {
            addr: low_end,
            size: PCI_MMIO32_START - low_end,
            kind: E820_RESERVED,
        });
        map.sort_by_key(|e| e.addr);
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

    /// A half-open guest-physical range, with its name for messages.
    type Span = (&'static str, u64, u64);

    fn range(name: &'static str, start: u64, size: u64) -> Span {
        (name, start, start + size)
    }

    fn overlap(a: &Span, b: &Span) -> bool {
        a.1 < b.2 && b.1 < a.2
    }

    /// Everything below 4 GiB that is not RAM, with and without PCI.
    fn fixed_ranges() -> Vec<Span> {
        let slots: Vec<(u64, u32)> = (0..)
            .map_while(crate::device_manager::virtio_mmio_slot)
            .collect();
        let last_slot = slots.last().unwrap().0;
        let mmio_size = devices::virtio::MMIO_WINDOW_SIZE;
        vec![
            range("boot timer", BOOT_TIMER_START, BOOT_TIMER_SIZE),
            ("virtio-mmio slots", slots[0].0, last_slot + mmio_size),
            range(
                "PCI hot-plug registers",
                PCI_HOTPLUG_START,
                PCI_HOTPLUG_SIZE,
            ),
            range("PCI MMIO32 window", PCI_MMIO32_START, PCI_MMIO32_SIZE),
            range("PCI ECAM", PCI_ECAM_START, PCI_ECAM_SIZE),
            range("IOAPIC", u64::from(IOAPIC_ADDR), 0x1000),
            range("LAPIC", u64::from(APIC_ADDR), 0x1000),
            range("KVM identity map", KVM_IDENTITY_MAP_ADDRESS, 0x1000),
            // KVM_SET_TSS_ADDRESS takes three pages.
            range("KVM TSS", KVM_TSS_ADDRESS as u64, 0x3000),
        ]
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
            let map = e820_map(mib * MIB, false);
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
            let map = e820_map(mem, false);
            assert_eq!(map.len(), 4, "{mib} MiB: {map:x?}");
            assert_eq!(map[2].addr + map[2].size, MMIO_MEM_START);
            assert_eq!(map[3].addr, FIRST_ADDR_PAST_32BITS);
            assert_eq!(map[3].size, mem - MMIO_MEM_START);
            assert_well_formed(&map, mem);
            let regions = ram_regions(mem);
            assert_eq!(regions.iter().map(|r| r.1).sum::<u64>(), mem);
        }
    }

    #[test]
    fn the_pci_ranges_collide_with_nothing_and_sit_in_the_mmio_hole() {
        let ranges = fixed_ranges();
        for (i, a) in ranges.iter().enumerate() {
            assert!(
                a.1 >= MMIO_MEM_START && a.2 <= FIRST_ADDR_PAST_32BITS,
                "{a:x?} is outside the MMIO hole"
            );
            for b in &ranges[i + 1..] {
                assert!(!overlap(a, b), "{a:x?} overlaps {b:x?}");
            }
        }
        // Every slot's BAR0 is in the window, and bus 0's ECAM in the range.
        let last = devices::pci::DEVICE_SLOTS.end - 1;
        let window_end = PCI_MMIO32_START + PCI_MMIO32_SIZE;
        assert_eq!(
            devices::pci::bar0_address(PCI_MMIO32_START, devices::pci::DEVICE_SLOTS.start),
            PCI_MMIO32_START
        );
        assert!(
            devices::pci::bar0_address(PCI_MMIO32_START, last) + devices::pci::BAR0_SIZE
                <= window_end
        );
        assert_eq!(
            PCI_MMIO32_START % devices::pci::BAR0_SIZE,
            0,
            "BARs are naturally aligned"
        );
        const { assert!(PCI_ECAM_BUS0_SIZE <= PCI_ECAM_SIZE) };
        assert_eq!(PCI_ECAM_START % PCI_ECAM_BUS0_SIZE, 0);
        // The GED's pin is an IOAPIC pin, below the MSI GSIs.
        const { assert!(GED_GSI < devices::pci::MSI_GSI_BASE) };
    }

    #[test]
    fn ram_never_overlaps_a_device_range() {
        let ranges = fixed_ranges();
        for mib in [32, 3328, 3329, 3584, 4096, 65536, 1 << 20] {
            for (start, size) in ram_regions(mib * MIB) {
                let ram = range("RAM", start, size);
                for r in &ranges {
                    assert!(!overlap(&ram, r), "{mib} MiB: {ram:x?} overlaps {r:x?}");
                }
            }
        }
    }

    #[test]
    fn with_pci_the_ecam_range_is_reserved_in_address_order() {
        for mib in [128, 3328, 4096, 65536] {
            let mem = mib * MIB;
            let plain = e820_map(mem, false);
            let map = e820_map(mem, true);
            assert_eq!(map.len(), plain.len() + 2, "{mib} MiB: {map:x?}");
            assert_well_formed(&map, mem);
            let ecam = E820Entry {
                addr: 0xeec0_0000,
                size: 0x1000_0000,
                kind: E820_RESERVED,
            };
            let low_end = low_ram_end(mem);
            let below_window = E820Entry {
                addr: low_end,
                size: 0xd800_0000 - low_end,
                kind: E820_RESERVED,
            };
            for reserved in [ecam, below_window] {
                assert_eq!(map.iter().filter(|e| **e == reserved).count(), 1);
            }
            // The largest gap below 4 GiB starts at the BAR window.
            let gaps = map.windows(2).map(|w| (w[0].addr + w[0].size, w[1].addr));
            let largest = gaps
                .filter(|(_, end)| *end <= 1 << 32)
                .max_by_key(|(start, end)| end - start)
                .unwrap();
            assert_eq!(largest.0, 0xd800_0000, "{mib} MiB: {map:x?}");
            // The rest is the map without PCI, unchanged.
            let rest: Vec<E820Entry> = map
                .into_iter()
                .filter(|e| *e != ecam && *e != below_window)
                .collect();
            assert_eq!(rest, plain);
        }
    }
}
