//! ACPI tables, for kernels that find their CPUs and devices through ACPI
//! (distribution kernels have no virtio-mmio command-line devices and may
//! have no MP-table parser): an RSDP in the BIOS area where Linux scans
//! for it (and handed over in the boot parameters), an XSDT, a
//! hardware-reduced FADT, a MADT with every vCPU's local APIC and the
//! IOAPIC, and a DSDT with COM1, the i8042 and each virtio-mmio device
//! (`LNRO0005`, its window and its edge-triggered interrupt). The MP table
//! stays for kernels without ACPI.
//!
//! A guest powers off through the FADT's sleep control register (an I/O
//! port; `_S5_` in the DSDT gives the sleep type), which ends the VM as a
//! reset does.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout;

const OEM_ID: [u8; 6] = *b"TESSRA";
const OEM_REVISION: u32 = 1;
/// `iapc_boot_arch`: no VGA, no CMOS RTC (the guest must not probe them).
const IAPC_BOOT_ARCH: u16 = (1 << 2) | (1 << 5);
/// The sleep type `_S5_` names, written to the sleep control register.
pub const S5_SLEEP_TYPE: u8 = 5;
/// `SLP_EN` in the sleep control register.
pub const SLEEP_ENABLE: u8 = 1 << 5;

/// Why the tables could not be written.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("the ACPI tables ({0} bytes) do not fit below 1 MiB")]
    TooLarge(usize),
    #[error("cannot write the ACPI tables to guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

/// A virtio-mmio device as the DSDT describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    pub base: u64,
    pub len: u64,
    pub irq: u32,
}

/// The virtio-mmio devices a command line names (`virtio_mmio.device=
/// <size>K@0x<base>:<irq>`, as the VMM adds one per device).
pub fn mmio_devices_on_cmdline(cmdline: &str) -> Vec<MmioDevice> {
    cmdline
        .split_whitespace()
        .filter_map(|token| token.strip_prefix("virtio_mmio.device="))
        .filter_map(|spec| {
            let (size, rest) = spec.split_once('@')?;
            let (base, irq) = rest.split_once(':')?;
            let len = match size.strip_suffix('K') {
                Some(kib) => kib.parse::<u64>().ok()? << 10,
                None => size.parse().ok()?,
            };
            let base = u64::from_str_radix(base.strip_prefix("0x")?, 16).ok()?;
            Some(MmioDevice {
                base,
                len,
                irq: irq.parse().ok()?,
            })
        })
        .collect()
}

fn bytes(table: &dyn Aml) -> Vec<u8> {
    let mut out = Vec::new();
    table.to_aml_bytes(&mut out);
    out
}

/// The DSDT's body: the legacy devices, the virtio devices, `_S5_`.
fn dsdt_body(devices: &[MmioDevice]) -> Vec<u8> {
    let mut body = Vec::new();
    let (com1_io, com1_irq) = (
        aml::IO::new(0x3f8, 0x3f8, 1, 8),
        aml::Interrupt::new(true, true, false, false, 4),
    );
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &com1_crs),
        ],
    )
    .to_aml_bytes(&mut body);
    let (data, command, kbd_irq) = (
        aml::IO::new(0x60, 0x60, 1, 1),
        aml::IO::new(0x64, 0x64, 1, 1),
        aml::Interrupt::new(true, true, false, false, 1),
    );
    let ps2_crs = aml::ResourceTemplate::new(vec![&data, &command, &kbd_irq]);
    aml::Device::new(
        "_SB_.PS2_".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0303")),
            &aml::Name::new("_CRS".into(), &ps2_crs),
        ],
    )
    .to_aml_bytes(&mut body);
    for (index, device) in devices.iter().enumerate() {
        let window = aml::Memory32Fixed::new(true, device.base as u32, device.len as u32);
        let irq = aml::Interrupt::new(true, true, false, false, device.irq);
        let crs = aml::ResourceTemplate::new(vec![&window, &irq]);
        let uid = index as u32;
        aml::Device::new(
            format!("_SB_.V{index:03X}").as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &uid),
                &aml::Name::new("_CCA".into(), &aml::ONE),
                &aml::Name::new("_CRS".into(), &crs),
            ],
        )
        .to_aml_bytes(&mut body);
    }
    aml::Name::new("_S5_".into(), &aml::Package::new(vec![&S5_SLEEP_TYPE])).to_aml_bytes(&mut body);
    body
}

fn dsdt(devices: &[MmioDevice]) -> Vec<u8> {
    let mut table = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"TESSDSDT", OEM_REVISION);
    table.append_slice(&dsdt_body(devices));
    table.as_slice().to_vec()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let sleep = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        layout::ACPI_SLEEP_PORT,
    );
    let mut fadt = FADTBuilder::new(OEM_ID, *b"TESSFACP", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    fadt.sleep_control_reg = sleep;
    fadt.sleep_status_reg = sleep;
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"TESSERA\0").into();
    bytes(&fadt.finalize())
}

fn madt(cpu_count: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        *b"TESSAPIC",
        OEM_REVISION,
        LocalInterruptController::Address(layout::APIC_ADDR),
    );
    for cpu in 0..cpu_count {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, layout::IOAPIC_ADDR, 0));
    bytes(&madt)
}

/// Lays out every table from the RSDP on: `(address, bytes)` each.
fn tables(cpu_count: u8, devices: &[MmioDevice]) -> Result<Vec<(u64, Vec<u8>)>, AcpiError> {
    let align = |addr: u64| addr.next_multiple_of(16);
    let mut next = align(layout::RSDP_ADDR + Rsdp::len() as u64);
    let mut place = |bytes: Vec<u8>| {
        let addr = next;
        next = align(addr + bytes.len() as u64);
        (addr, bytes)
    };
    let dsdt = place(dsdt(devices));
    let fadt = place(fadt(dsdt.0));
    let madt = place(madt(cpu_count));
    let mut xsdt = XSDT::new(OEM_ID, *b"TESSXSDT", OEM_REVISION);
    xsdt.add_entry(fadt.0);
    xsdt.add_entry(madt.0);
    let xsdt = place(bytes(&xsdt));
    let rsdp = (layout::RSDP_ADDR, bytes(&Rsdp::new(OEM_ID, xsdt.0)));
    let all = vec![rsdp, dsdt, fadt, madt, xsdt];
    let end = all
        .iter()
        .map(|(a, b)| a + b.len() as u64)
        .max()
        .unwrap_or(0);
    if end > layout::HIMEM_START {
        return Err(AcpiError::TooLarge((end - layout::RSDP_ADDR) as usize));
    }
    Ok(all)
}

/// Writes the tables for `cpu_count` vCPUs and `devices` into guest
/// memory; returns the RSDP's address.
pub fn setup_acpi(
    mem: &GuestMemoryMmap,
    cpu_count: u8,
    devices: &[MmioDevice],
) -> Result<u64, AcpiError> {
    for (addr, bytes) in tables(cpu_count, devices)? {
        mem.write_slice(&bytes, GuestAddress(addr))?;
    }
    Ok(layout::RSDP_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn devices() -> Vec<MmioDevice> {
        mmio_devices_on_cmdline(
            "console=ttyS0 virtio_mmio.device=4K@0xd0001000:5 virtio_mmio.device=4K@0xd0002000:6",
        )
    }

    #[test]
    fn the_command_lines_devices_are_read_back() {
        assert_eq!(
            devices(),
            [
                MmioDevice {
                    base: 0xd000_1000,
                    len: 4096,
                    irq: 5
                },
                MmioDevice {
                    base: 0xd000_2000,
                    len: 4096,
                    irq: 6
                },
            ]
        );
        assert!(mmio_devices_on_cmdline("virtio_mmio.device=oops").is_empty());
    }

    #[test]
    fn every_table_checks_out_and_points_at_the_next() {
        let tables = tables(4, &devices()).unwrap();
        let find = |sig: &[u8]| {
            tables
                .iter()
                .find(|(_, b)| b.starts_with(sig))
                .unwrap_or_else(|| panic!("no {}", String::from_utf8_lossy(sig)))
                .clone()
        };
        let (rsdp_addr, rsdp) = find(b"RSD PTR ");
        assert_eq!(rsdp_addr, 0xe0000);
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(&rsdp), 0);
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let (addr, xsdt) = find(b"XSDT");
        assert_eq!(addr, xsdt_addr);
        for (_, table) in &tables[1..] {
            let len = u32::from_le_bytes(table[4..8].try_into().unwrap()) as usize;
            assert_eq!(len, table.len(), "{}", String::from_utf8_lossy(&table[..4]));
            assert_eq!(sum(table), 0, "{}", String::from_utf8_lossy(&table[..4]));
        }
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(entries, [find(b"FACP").0, find(b"APIC").0]);
        let (_, fadt) = find(b"FACP");
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & Flags::HwReducedAcpi as u32, 0);
        let x_dsdt = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        assert_eq!(x_dsdt, find(b"DSDT").0);
        // MADT: 44-byte header, then 4 local APICs (8 bytes) and an IOAPIC (12).
        let (_, madt) = find(b"APIC");
        assert_eq!(madt.len(), 44 + 4 * 8 + 12);
        assert_eq!(&madt[44..46], &[0, 8]);
        assert_eq!(madt[44 + 4 * 8], 1, "the IOAPIC follows the CPUs");
    }

    #[test]
    fn the_dsdt_names_each_virtio_device_and_the_sleep_state() {
        let dsdt = dsdt(&devices());
        let count = |needle: &[u8]| dsdt.windows(needle.len()).filter(|w| *w == needle).count();
        assert_eq!(count(b"LNRO0005"), 2);
        assert_eq!(count(b"V000"), 1);
        assert_eq!(count(b"V001"), 1);
        assert_eq!(count(b"_S5_"), 1);
        // The second device's window and interrupt, little-endian.
        assert_eq!(count(&0xd000_2000u32.to_le_bytes()), 1);
    }

    #[test]
    fn tables_for_the_most_vcpus_and_devices_fit_below_1_mib() {
        let many: Vec<MmioDevice> = (0..19)
            .map(|i| MmioDevice {
                base: 0xd000_1000 + i * 0x1000,
                len: 4096,
                irq: 5 + i as u32,
            })
            .collect();
        assert!(tables(254, &many).is_ok());
    }
}
