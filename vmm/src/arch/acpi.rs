//! ACPI tables, for kernels that find their CPUs and devices through ACPI
//! (distribution kernels have no virtio-mmio command-line devices and may
//! have no MP-table parser): an RSDP in the BIOS area where Linux scans
//! for it (and handed over in the boot parameters), an XSDT, a
//! hardware-reduced FADT, a MADT with every vCPU's local APIC and the
//! IOAPIC, and a DSDT with COM1, the i8042 and each virtio-mmio device
//! (`LNRO0005`, its window and its edge-triggered interrupt). The MP table
//! stays for kernels without ACPI.
//!
//! With `--enable-pci` there are two more: an MCFG with bus 0's ECAM, listed
//! in the XSDT after the MADT, and in the DSDT the root bridge `\_SB_.PC00`
//! (its bus, config ports and BAR window in `_CRS`, a `_DSM` that has Linux
//! keep the BARs the VMM assigned, a device per slot) and `\_SB_.MBRD`,
//! which reserves bus 0's ECAM as the PCI Firmware spec asks. Without it the
//! tables are byte for byte what they were before PCI.
//!
//! A guest powers off through the FADT's sleep control register (an I/O
//! port; `_S5_` in the DSDT gives the sleep type), which ends the VM as a
//! reset does.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
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

/// The `_DSM` UUID of PCI root bridges (PCI Firmware spec 3.3, 4.6).
const PCI_DSM_UUID: &str = "E5C937D0-3553-4D7A-9117-EA4D19C3434D";
/// `_DSM` function 5: "ignore PCI boot configuration"; returning 0 asks the
/// OS to keep the firmware's (here the VMM's) resource assignment.
const PCI_DSM_PRESERVE_BOOT_CONFIG: u8 = 5;
/// What `_DSM` function 0 answers: functions 0 and 5 are supported.
const PCI_DSM_FUNCTIONS: u8 = (1 << 0) | (1 << PCI_DSM_PRESERVE_BOOT_CONFIG);

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

/// The DSDT's body: the legacy devices, the virtio-mmio devices, with
/// `pci` the PCI root bridge and the ECAM's reservation, and `_S5_`.
fn dsdt_body(devices: &[MmioDevice], pci: bool) -> Vec<u8> {
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
    if pci {
        pci_root_bridge(&mut body);
        ecam_reservation(&mut body);
        pci_hotplug_controller(&mut body);
        generic_event_device(&mut body);
    }
    aml::Name::new("_S5_".into(), &aml::Package::new(vec![&S5_SLEEP_TYPE])).to_aml_bytes(&mut body);
    body
}

/// Bus 0's ECAM (the only bus), as a fixed memory range.
fn ecam_bus0() -> aml::Memory32Fixed {
    aml::Memory32Fixed::new(
        true,
        layout::PCI_ECAM_START as u32,
        layout::PCI_ECAM_BUS0_SIZE as u32,
    )
}

/// `_DSM` of the root bridge, in ASL:
///
/// ```text
/// Method (_DSM, 4) {
///     If (Arg0 == ToUUID ("E5C937D0-3553-4D7A-9117-EA4D19C3434D")) {
///         If (Arg2 == 0) { Return (Buffer () { 0x21 }) }
///         If (Arg2 == 5) { Return (0) }
///     }
///     Return (Buffer () { 0 })
/// }
/// ```
///
/// Function 5 returning 0 sets Linux's `preserve_config` for the host
/// bridge: it keeps the fixed BARs the VMM gave each slot.
fn pci_dsm() -> Vec<u8> {
    let uuid = aml::Uuid::new(PCI_DSM_UUID);
    let (function, zero) = (aml::Arg(2), aml::ZERO);
    let supported = aml::BufferData::new(vec![PCI_DSM_FUNCTIONS]);
    let query = aml::Equal::new(&function, &zero);
    let return_supported = aml::Return::new(&supported);
    let preserve = aml::Equal::new(&function, &PCI_DSM_PRESERVE_BOOT_CONFIG);
    let return_zero = aml::Return::new(&zero);
    let none = aml::BufferData::new(vec![0]);
    let this_uuid = aml::Equal::new(&aml::Arg(0), &uuid);
    bytes(&aml::Method::new(
        "_DSM".into(),
        4,
        false,
        vec![
            &aml::If::new(
                &this_uuid,
                vec![
                    &aml::If::new(&query, vec![&return_supported]),
                    &aml::If::new(&preserve, vec![&return_zero]),
                ],
            ),
            &aml::Return::new(&none),
        ],
    ))
}

/// A PCI slot: `Sxxx` (decimal) with its address, its slot number and
/// `_EJ0`, which hands the slot back through `\_SB_.PHPR.PCEJ`. The
/// `_EJ0` is what makes Linux's acpiphp manage the slot.
fn pci_slot(slot: u8) -> Vec<u8> {
    let adr = u32::from(slot) << 16;
    let (sun, seg) = (aml::Path::new("_SUN"), aml::Path::new("_SEG"));
    let eject_call = aml::MethodCall::new("\\_SB_.PHPR.PCEJ".into(), vec![&sun, &seg]);
    bytes(&aml::Device::new(
        format!("S{slot:03}").as_str().into(),
        vec![
            &aml::Name::new("_ADR".into(), &adr),
            &aml::Name::new("_SUN".into(), &slot),
            &aml::Method::new("_EJ0".into(), 1, true, vec![&eject_call]),
        ],
    ))
}

/// `DVNT(slots, event)`: `Notify(Sxxx, event)` for each slot whose bit is
/// set (1 device check, 3 eject request).
fn pci_device_notify() -> Vec<u8> {
    let masks: Vec<u32> = devices::pci::DEVICE_SLOTS.map(|slot| 1 << slot).collect();
    let names: Vec<aml::Path> = devices::pci::DEVICE_SLOTS
        .map(|slot| aml::Path::new(&format!("S{slot:03}")))
        .collect();
    let selected: Vec<aml::And> = masks
        .iter()
        .map(|mask| aml::And::new(&aml::ZERO, &aml::Arg(0), mask))
        .collect();
    let tests: Vec<aml::Equal> = selected
        .iter()
        .zip(&masks)
        .map(|(bit, mask)| aml::Equal::new(bit, mask))
        .collect();
    let notifies: Vec<aml::Notify> = names
        .iter()
        .map(|name| aml::Notify::new(name, &aml::Arg(1)))
        .collect();
    let ifs: Vec<aml::If> = tests
        .iter()
        .zip(&notifies)
        .map(|(test, notify)| aml::If::new(test, vec![notify]))
        .collect();
    bytes(&aml::Method::new(
        "DVNT".into(),
        2,
        false,
        ifs.iter().map(|i| i as &dyn Aml).collect(),
    ))
}

/// `PCNT()`: the slots the VMM filled get a device check, those it wants
/// back an eject request (PCIU and PCID clear when read).
fn pci_notify_changes() -> Vec<u8> {
    let lock = aml::Acquire::new("\\_SB_.PHPR.BLCK".into(), 0xffff);
    let (up, down) = (
        aml::Path::new("\\_SB_.PHPR.PCIU"),
        aml::Path::new("\\_SB_.PHPR.PCID"),
    );
    let added = aml::MethodCall::new("DVNT".into(), vec![&up, &aml::ONE]);
    let eject_request = 3u8;
    let removed = aml::MethodCall::new("DVNT".into(), vec![&down, &eject_request]);
    let unlock = aml::Release::new("\\_SB_.PHPR.BLCK".into());
    bytes(&aml::Method::new(
        "PCNT".into(),
        0,
        true,
        vec![&lock, &added, &removed, &unlock],
    ))
}

/// `\_SB_.PHPR`, the hot-plug registers (`devices::pci::hotplug`):
/// `PCEJ(slot, segment)` ejects a slot, `PSCN()` reports changes.
fn pci_hotplug_controller(body: &mut Vec<u8>) {
    let base = layout::PCI_HOTPLUG_START as u32;
    let len = devices::pci::hotplug::REGISTERS_LEN as u32;
    let window = aml::Memory32Fixed::new(true, base, len);
    let crs = aml::ResourceTemplate::new(vec![&window]);
    let region = aml::OpRegion::new("PCST".into(), aml::OpRegionSpace::SystemMemory, &base, &len);
    let fields = aml::Field::new(
        "PCST".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![
            aml::FieldEntry::Named(*b"PCIU", 32),
            aml::FieldEntry::Named(*b"PCID", 32),
            aml::FieldEntry::Named(*b"B0EJ", 32),
            aml::FieldEntry::Named(*b"PSEG", 32),
        ],
    );
    let (segment, eject_bits) = (aml::Path::new("PSEG"), aml::Path::new("B0EJ"));
    let (slot, segment_arg) = (aml::Arg(0), aml::Arg(1));
    let lock = aml::Acquire::new("BLCK".into(), 0xffff);
    let store_segment = aml::Store::new(&segment, &segment_arg);
    let eject_slot = aml::ShiftLeft::new(&eject_bits, &aml::ONE, &slot);
    let unlock = aml::Release::new("BLCK".into());
    let done = aml::Return::new(&aml::ZERO);
    let eject = aml::Method::new(
        "PCEJ".into(),
        2,
        true,
        vec![&lock, &store_segment, &eject_slot, &unlock, &done],
    );
    let scan_call = aml::MethodCall::new("\\_SB_.PC00.PCNT".into(), vec![]);
    let scan = aml::Method::new("PSCN".into(), 0, true, vec![&scan_call]);
    let status = 0x0bu8;
    aml::Device::new(
        "_SB_.PHPR".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A06")),
            &aml::Name::new("_STA".into(), &status),
            &aml::Name::new("_UID".into(), &"PCI Hotplug Controller"),
            &aml::Mutex::new("BLCK".into(), 0),
            &aml::Name::new("_CRS".into(), &crs),
            &region,
            &fields,
            &eject,
            &scan,
        ],
    )
    .to_aml_bytes(body);
}

/// `\_SB_.GED_`, the Generic Event Device whose interrupt (an irqfd the
/// VMM raises) makes the guest look at the hot-plug registers.
fn generic_event_device(body: &mut Vec<u8>) {
    let irq = aml::Interrupt::new(true, true, false, false, layout::GED_GSI);
    let crs = aml::ResourceTemplate::new(vec![&irq]);
    let scan_call = aml::MethodCall::new("\\_SB_.PHPR.PSCN".into(), vec![]);
    aml::Device::new(
        "_SB_.GED_".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &crs),
            &aml::Method::new("_EVT".into(), 1, true, vec![&scan_call]),
        ],
    )
    .to_aml_bytes(body);
}

/// Raw AML, already encoded.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

/// `\_SB_.PC00`, the PCIe root bridge of segment 0: bus 0 only, its
/// configuration ports and ECAM, the BAR window (non-cacheable, read-write)
/// and the I/O ports around the configuration ports, which the guest may
/// hand on to devices (none of Tessera's has an I/O BAR). No `_PRT`: the
/// devices use MSI-X only.
fn pci_root_bridge(body: &mut Vec<u8>) {
    let bus = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let config_ports = aml::IO::new(
        layout::PCI_CONFIG_PORT as u16,
        layout::PCI_CONFIG_PORT as u16,
        1,
        layout::PCI_CONFIG_PORT_SIZE as u8,
    );
    let ecam = ecam_bus0();
    let window = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        layout::PCI_MMIO32_START as u32,
        (layout::PCI_MMIO32_START + layout::PCI_MMIO32_SIZE - 1) as u32,
        None,
    );
    let io_below = aml::AddressSpace::new_io(0u16, layout::PCI_CONFIG_PORT as u16 - 1, None);
    let io_above = aml::AddressSpace::new_io(0x0d00u16, 0xffff, None);
    let crs = aml::ResourceTemplate::new(vec![
        &bus,
        &config_ports,
        &ecam,
        &window,
        &io_below,
        &io_above,
    ]);
    let dsm = RawAml(pci_dsm());
    let (device_notify, notify_changes) =
        (RawAml(pci_device_notify()), RawAml(pci_notify_changes()));
    let slots: Vec<RawAml> = devices::pci::DEVICE_SLOTS
        .map(|slot| RawAml(pci_slot(slot)))
        .collect();
    let (hid, cid) = (
        aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08")),
        aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03")),
    );
    let adr = aml::Name::new("_ADR".into(), &aml::ZERO);
    let seg = aml::Name::new("_SEG".into(), &aml::ZERO);
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let cca = aml::Name::new("_CCA".into(), &aml::ONE);
    let crs = aml::Name::new("_CRS".into(), &crs);
    let mut children: Vec<&dyn Aml> = vec![
        &hid,
        &cid,
        &adr,
        &seg,
        &uid,
        &cca,
        &dsm,
        &crs,
        &device_notify,
        &notify_changes,
    ];
    children.extend(slots.iter().map(|slot| slot as &dyn Aml));
    aml::Device::new("_SB_.PC00".into(), children).to_aml_bytes(body);
}

/// `\_SB_.MBRD`, a motherboard resource device (PNP0C02) that reserves
/// bus 0's ECAM: "ECAM space must be reserved by a PNP0C02 resource" (PCI
/// Firmware spec 3.3, 4.1.2), which Linux checks before it uses the MCFG.
fn ecam_reservation(body: &mut Vec<u8>) {
    let ecam = ecam_bus0();
    let crs = aml::ResourceTemplate::new(vec![&ecam]);
    aml::Device::new(
        "_SB_.MBRD".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    )
    .to_aml_bytes(body);
}

fn dsdt(devices: &[MmioDevice], pci: bool) -> Vec<u8> {
    let mut table = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"TESSDSDT", OEM_REVISION);
    table.append_slice(&dsdt_body(devices, pci));
    table.as_slice().to_vec()
}

/// The MCFG: segment 0, buses 0 to 0, at the ECAM base.
fn mcfg() -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, *b"TESSMCFG", OEM_REVISION);
    mcfg.add_ecam(layout::PCI_ECAM_START, 0, 0, 0);
    bytes(&mcfg)
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
fn tables(
    cpu_count: u8,
    devices: &[MmioDevice],
    pci: bool,
) -> Result<Vec<(u64, Vec<u8>)>, AcpiError> {
    let align = |addr: u64| addr.next_multiple_of(16);
    let mut next = align(layout::RSDP_ADDR + Rsdp::len() as u64);
    let mut place = |bytes: Vec<u8>| {
        let addr = next;
        next = align(addr + bytes.len() as u64);
        (addr, bytes)
    };
    let dsdt = place(dsdt(devices, pci));
    let fadt = place(fadt(dsdt.0));
    let madt = place(madt(cpu_count));
    let mcfg = pci.then(|| place(mcfg()));
    let mut xsdt = XSDT::new(OEM_ID, *b"TESSXSDT", OEM_REVISION);
    xsdt.add_entry(fadt.0);
    xsdt.add_entry(madt.0);
    if let Some((addr, _)) = &mcfg {
        xsdt.add_entry(*addr);
    }
    let xsdt = place(bytes(&xsdt));
    let rsdp = (layout::RSDP_ADDR, bytes(&Rsdp::new(OEM_ID, xsdt.0)));
    let mut all = vec![rsdp, dsdt, fadt, madt];
    all.extend(mcfg);
    all.push(xsdt);
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

/// Writes the tables for `cpu_count` vCPUs and the virtio-mmio `devices`
/// into guest memory, with the PCI root bridge and the MCFG if `pci`
/// (`--enable-pci`); returns the RSDP's address.
pub fn setup_acpi(
    mem: &GuestMemoryMmap,
    cpu_count: u8,
    devices: &[MmioDevice],
    pci: bool,
) -> Result<u64, AcpiError> {
    for (addr, bytes) in tables(cpu_count, devices, pci)? {
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
        let tables = tables(4, &devices(), false).unwrap();
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
        let dsdt = dsdt(&devices(), false);
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
        assert!(tables(254, &many, false).is_ok());
        // With PCI there are no virtio-mmio devices, but the slots.
        let end = tables(254, &[], true)
            .unwrap()
            .iter()
            .map(|(addr, bytes)| addr + bytes.len() as u64)
            .max()
            .unwrap();
        assert!(end <= layout::HIMEM_START, "{end:#x}");
    }

    fn find(tables: &[(u64, Vec<u8>)], sig: &[u8]) -> Option<(u64, Vec<u8>)> {
        tables.iter().find(|(_, b)| b.starts_with(sig)).cloned()
    }

    fn count(haystack: &[u8], needle: &[u8]) -> usize {
        haystack
            .windows(needle.len())
            .filter(|w| *w == needle)
            .count()
    }

    #[test]
    fn without_pci_nothing_changes() {
        let tables = tables(2, &devices(), false).unwrap();
        assert!(find(&tables, b"MCFG").is_none());
        let (_, dsdt) = find(&tables, b"DSDT").unwrap();
        assert_eq!(dsdt, super::dsdt(&devices(), false));
        for name in [&b"PC00"[..], b"MBRD", b"_DSM", b"S001"] {
            assert_eq!(count(&dsdt, name), 0, "{}", String::from_utf8_lossy(name));
        }
        // Exactly the sizes of the tables before PCI: the DSDT's body is
        // COM1, PS2_, the two V00x devices and _S5_; the XSDT has 2 entries.
        let (_, xsdt) = find(&tables, b"XSDT").unwrap();
        assert_eq!(xsdt.len(), 36 + 2 * 8);
    }

    #[test]
    fn with_pci_the_xsdt_lists_the_mcfg_and_every_table_checks_out() {
        let tables = tables(4, &[], true).unwrap();
        for (_, table) in &tables[1..] {
            let len = u32::from_le_bytes(table[4..8].try_into().unwrap()) as usize;
            assert_eq!(len, table.len(), "{}", String::from_utf8_lossy(&table[..4]));
            assert_eq!(sum(table), 0, "{}", String::from_utf8_lossy(&table[..4]));
        }
        let (_, rsdp) = find(&tables, b"RSD PTR ").unwrap();
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(&rsdp), 0);
        let (xsdt_addr, xsdt) = find(&tables, b"XSDT").unwrap();
        assert_eq!(
            u64::from_le_bytes(rsdp[24..32].try_into().unwrap()),
            xsdt_addr
        );
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let addr = |sig: &[u8]| find(&tables, sig).unwrap().0;
        assert_eq!(entries, [addr(b"FACP"), addr(b"APIC"), addr(b"MCFG")]);
        // Tables do not overlap.
        let mut spans: Vec<(u64, u64)> = tables
            .iter()
            .map(|(a, b)| (*a, a + b.len() as u64))
            .collect();
        spans.sort();
        for pair in spans.windows(2) {
            assert!(pair[0].1 <= pair[1].0, "{spans:x?}");
        }
    }

    #[test]
    fn the_mcfg_has_one_entry_for_bus_0_of_segment_0() {
        let (_, mcfg) = find(&tables(1, &[], true).unwrap(), b"MCFG").unwrap();
        // 36-byte header, 8 reserved bytes, one 16-byte allocation.
        assert_eq!(mcfg.len(), 36 + 8 + 16);
        assert_eq!(mcfg[8], 1, "revision");
        assert_eq!(sum(&mcfg), 0);
        assert_eq!(&mcfg[36..44], &[0; 8]);
        let entry = &mcfg[44..60];
        assert_eq!(
            u64::from_le_bytes(entry[0..8].try_into().unwrap()),
            0xeec0_0000
        );
        assert_eq!(&entry[8..10], &[0, 0], "segment");
        assert_eq!((entry[10], entry[11]), (0, 0), "buses 0 to 0");
        assert_eq!(&entry[12..16], &[0; 4]);
    }

    #[test]
    fn with_pci_the_dsdt_has_the_root_bridge_its_slots_and_the_ecam_reservation() {
        let dsdt = dsdt(&[], true);
        // EISA ids as AML DWords (compressed "PNP" = 0x41d0).
        let pnp0a08 = [0x0c, 0x41, 0xd0, 0x0a, 0x08];
        let pnp0a03 = [0x0c, 0x41, 0xd0, 0x0a, 0x03];
        let pnp0c02 = [0x0c, 0x41, 0xd0, 0x0c, 0x02];
        assert_eq!(count(&dsdt, &pnp0a08), 1);
        assert_eq!(count(&dsdt, &pnp0a03), 1);
        assert_eq!(count(&dsdt, &pnp0c02), 1);
        // Both devices are under \_SB_ (a dual-name path, 0x2e).
        assert_eq!(count(&dsdt, b"\x2e_SB_PC00"), 1);
        assert_eq!(count(&dsdt, b"\x2e_SB_MBRD"), 1);
        for name in [&b"_SEG"[..], b"_CCA", b"_CRS"] {
            assert!(count(&dsdt, name) >= 1, "{}", String::from_utf8_lossy(name));
        }
        // _DSM: the UUID in ToUUID's mixed-endian order, the 0x21 bitmap.
        assert_eq!(count(&dsdt, b"_DSM"), 1);
        let uuid = [
            0xd0, 0x37, 0xc9, 0xe5, 0x53, 0x35, 0x7a, 0x4d, 0x91, 0x17, 0xea, 0x4d, 0x19, 0xc3,
            0x43, 0x4d,
        ];
        assert_eq!(count(&dsdt, &uuid), 1);
        // Buffer (1) {0x21}: BufferOp, length, size 1 (OneOp), the byte.
        assert_eq!(count(&dsdt, &[0x11, 0x03, 0x01, 0x21]), 1);
        // The BAR window: DWord memory descriptor, non-cacheable and
        // read-write, 0xd800_0000..=0xdfff_ffff, 128 MiB.
        let mut window = vec![0x87, 0x17, 0x00, 0x00, 0x0c, 0x01, 0, 0, 0, 0];
        window.extend(0xd800_0000u32.to_le_bytes());
        window.extend(0xdfff_ffffu32.to_le_bytes());
        window.extend(0u32.to_le_bytes());
        window.extend(0x0800_0000u32.to_le_bytes());
        assert_eq!(count(&dsdt, &window), 1);
        // The configuration ports: IO (Decode16, 0xcf8, 0xcf8, 1, 8).
        assert_eq!(
            count(&dsdt, &[0x47, 0x01, 0xf8, 0x0c, 0xf8, 0x0c, 0x01, 0x08]),
            1
        );
        // Word bus number 0..0, and the I/O windows around the ports.
        let word = |kind: u8, min: u16, max: u16| {
            let mut d = vec![
                0x88,
                0x0d,
                0x00,
                kind,
                0x0c,
                if kind == 1 { 3 } else { 0 },
                0,
                0,
            ];
            d.extend(min.to_le_bytes());
            d.extend(max.to_le_bytes());
            d.extend([0, 0]);
            d.extend((max - min + 1).to_le_bytes());
            d
        };
        assert_eq!(count(&dsdt, &word(2, 0, 0)), 1, "bus 0");
        assert_eq!(count(&dsdt, &word(1, 0, 0xcf7)), 1);
        assert_eq!(count(&dsdt, &word(1, 0xd00, 0xffff)), 1);
        // Bus 0's ECAM as Memory32Fixed: in PC00's _CRS and in MBRD's.
        let mut ecam = vec![0x86, 0x09, 0x00, 0x01];
        ecam.extend(0xeec0_0000u32.to_le_bytes());
        ecam.extend(0x10_0000u32.to_le_bytes());
        assert_eq!(count(&dsdt, &ecam), 2);
        // One device per slot 1..=31 with _ADR = slot << 16, _SUN = slot
        // and _EJ0; DVNT notifies each.
        assert_eq!(count(&dsdt, b"S000"), 0);
        assert_eq!(count(&dsdt, b"_EJ0"), 31);
        for slot in 1u32..32 {
            let name = format!("S{slot:03}");
            assert_eq!(count(&dsdt, name.as_bytes()), 2, "{name}");
            let mut adr = b"_ADR".to_vec();
            adr.push(0x0c);
            adr.extend((slot << 16).to_le_bytes());
            assert_eq!(count(&dsdt, &adr), 1, "{name} _ADR");
            let mut sun = b"_SUN".to_vec();
            sun.extend(if slot == 1 {
                vec![0x01]
            } else {
                vec![0x0a, slot as u8]
            });
            assert_eq!(count(&dsdt, &sun), 1, "{name} _SUN");
        }
        // _S5_ is still there, once.
        assert_eq!(count(&dsdt, b"_S5_"), 1);
    }

    #[test]
    fn with_pci_the_dsdt_has_the_hot_plug_controller_and_its_event_device() {
        let dsdt = dsdt(&[], true);
        for name in [
            &b"PHPR"[..],
            b"GED_",
            b"ACPI0013",
            b"PCEJ",
            b"PSCN",
            b"PCNT",
            b"DVNT",
        ] {
            assert!(count(&dsdt, name) >= 1, "{}", String::from_utf8_lossy(name));
        }
        // The registers' OperationRegion at PCI_HOTPLUG_START, 16 bytes.
        let mut region = b"PCST".to_vec();
        region.push(0x00); // SystemMemory
        region.push(0x0c);
        region.extend((layout::PCI_HOTPLUG_START as u32).to_le_bytes());
        assert_eq!(count(&dsdt, &region), 1);
        // The GED's interrupt: extended IRQ descriptor, GSI 23.
        let mut irq = vec![0x89, 0x06, 0x00];
        irq.push(0x03); // consumer, edge
        irq.push(0x01);
        irq.extend(layout::GED_GSI.to_le_bytes());
        assert_eq!(count(&dsdt, &irq), 1);
        let without = dsdt_body(&[], false);
        assert_eq!(count(&without, b"PHPR") + count(&without, b"GED_"), 0);
    }

    /// iasl (ACPICA) decompiles and recompiles the DSDT with PCI without
    /// an error, when it is installed.
    #[test]
    fn iasl_takes_the_pci_dsdt() {
        let Ok(status) = std::process::Command::new("iasl").arg("-v").output() else {
            assert!(
                std::env::var_os("TESSERA_STRICT").is_none(),
                "iasl (acpica-tools) is needed under TESSERA_STRICT"
            );
            eprintln!("iasl not installed: not checked");
            return;
        };
        assert!(status.status.success());
        let dir = tempfile::tempdir().unwrap();
        let aml = dir.path().join("dsdt.aml");
        std::fs::write(&aml, dsdt(&[], true)).unwrap();
        let out = std::process::Command::new("iasl")
            .current_dir(dir.path())
            .args(["-d", "dsdt.aml"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = std::process::Command::new("iasl")
            .current_dir(dir.path())
            .args(["-tc", "dsdt.dsl"])
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(report.contains(" 0 Errors"), "{report}");
    }
}
