//! PCI discovery on bus 0: configuration mechanism #1 (ports 0xcf8/0xcfc)
//! or ECAM (found through ACPI's MCFG), BAR sizing and checks, and the
//! capability list (virtio vendor capabilities and MSI-X).
//!
//! Output (see README.md): `probe.pci_ecam=...`, one
//! `probe.pci=<bb:dd.f>,<vvvv:dddd>,class=<ccss>,bar0=0x<addr>` line per
//! function, `probe.pci_error=...` for refused BARs, and with
//! `probe.verbose` `probe.pci_bar=...` / `probe.pci_cap=...` lines.

use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::acpi;
use crate::e820;
use crate::entry;
use crate::io;
use crate::phys;
use crate::serial::outln;

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

/// Configuration-space offsets (type 0/1 headers).
pub mod reg {
    pub const VENDOR_ID: u16 = 0x00;
    pub const DEVICE_ID: u16 = 0x02;
    pub const COMMAND: u16 = 0x04;
    pub const STATUS: u16 = 0x06;
    pub const CLASS_REVISION: u16 = 0x08;
    pub const HEADER_TYPE: u16 = 0x0e;
    pub const BAR0: u16 = 0x10;
    pub const SUBSYSTEM_ID: u16 = 0x2e;
    pub const CAPABILITIES: u16 = 0x34;
}

/// Command register bits.
pub mod command {
    pub const IO: u16 = 1 << 0;
    pub const MEMORY: u16 = 1 << 1;
    pub const BUS_MASTER: u16 = 1 << 2;
}

/// Status register: a capability list is present.
const STATUS_CAP_LIST: u16 = 1 << 4;
/// Capability ids.
pub const CAP_VENDOR: u8 = 0x09;
pub const CAP_MSIX: u8 = 0x11;
/// Capabilities walked per function at most (a loop is cut short).
const MAX_CAPS: usize = 48;

/// Most functions remembered per boot.
pub const MAX_FUNCTIONS: usize = 32;

/// Bus, device, function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bdf {
    pub bus: u8,
    pub dev: u8,
    pub func: u8,
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{:x}", self.bus, self.dev, self.func)
    }
}

impl Bdf {
    /// Mechanism #1 address of the dword holding `offset` (< 256).
    fn cf8(self, offset: u16) -> u32 {
        0x8000_0000
            | u32::from(self.bus) << 16
            | u32::from(self.dev & 31) << 11
            | u32::from(self.func & 7) << 8
            | u32::from(offset & 0xfc)
    }

    /// Offset of this function's 4 KiB in an ECAM window (bus 0 based).
    fn ecam_offset(self) -> u64 {
        u64::from(self.bus) << 20 | u64::from(self.dev & 31) << 15 | u64::from(self.func & 7) << 12
    }
}

/// ECAM base (bus 0) used for every configuration access, or 0 for the
/// I/O ports (the default; `probe.pci_cfg=ecam` selects ECAM).
static ECAM: AtomicU64 = AtomicU64::new(0);

/// Configuration read through the ports (offset < 256, naturally aligned).
fn io_read(bdf: Bdf, offset: u16, width: u8) -> u32 {
    // SAFETY: 0xcf8/0xcfc are the PCI configuration mechanism #1 ports
    // (ignored by a machine without them); a configuration read has no
    // side effects on memory.
    unsafe {
        io::outl(CONFIG_ADDRESS, bdf.cf8(offset));
        match width {
            1 => u32::from(io::inb(CONFIG_DATA + (offset & 3))),
            2 => u32::from(io::inw(CONFIG_DATA + (offset & 2))),
            _ => io::inl(CONFIG_DATA),
        }
    }
}

/// Configuration write through the ports.
fn io_write(bdf: Bdf, offset: u16, width: u8, value: u32) {
    // SAFETY: as for `io_read`; the caller chose the register and value
    // (a configuration write cannot make the device touch our memory
    // unless bus mastering is on and the device is set up).
    unsafe {
        io::outl(CONFIG_ADDRESS, bdf.cf8(offset));
        match width {
            1 => io::outb(CONFIG_DATA + (offset & 3), value as u8),
            2 => io::outw(CONFIG_DATA + (offset & 2), value as u16),
            _ => io::outl(CONFIG_DATA, value),
        }
    }
}

/// Configuration read through the ECAM window at `base`.
fn ecam_read(base: u64, bdf: Bdf, offset: u16, width: u8) -> u32 {
    let addr = base + bdf.ecam_offset() + u64::from(offset & 0xfff);
    // SAFETY: `use_ecam`/`check_ecam` made sure bus 0's window is mapped
    // device memory outside RAM; `offset` is naturally aligned.
    unsafe {
        match width {
            1 => u32::from(phys::mmio_read8(addr)),
            2 => u32::from(phys::mmio_read16(addr & !1)),
            _ => phys::mmio_read32(addr & !3),
        }
    }
}

/// Configuration write through the ECAM window at `base`.
fn ecam_write(base: u64, bdf: Bdf, offset: u16, width: u8, value: u32) {
    let addr = base + bdf.ecam_offset() + u64::from(offset & 0xfff);
    // SAFETY: as for `ecam_read`.
    unsafe {
        match width {
            1 => phys::mmio_write8(addr, value as u8),
            2 => phys::mmio_write16(addr & !1, value as u16),
            _ => phys::mmio_write32(addr & !3, value),
        }
    }
}

fn read(bdf: Bdf, offset: u16, width: u8) -> u32 {
    match ECAM.load(Ordering::Relaxed) {
        0 => io_read(bdf, offset, width),
        base => ecam_read(base, bdf, offset, width),
    }
}

fn write(bdf: Bdf, offset: u16, width: u8, value: u32) {
    match ECAM.load(Ordering::Relaxed) {
        0 => io_write(bdf, offset, width, value),
        base => ecam_write(base, bdf, offset, width, value),
    }
}

pub fn read32(bdf: Bdf, offset: u16) -> u32 {
    read(bdf, offset & !3, 4)
}

pub fn read16(bdf: Bdf, offset: u16) -> u16 {
    read(bdf, offset & !1, 2) as u16
}

pub fn read8(bdf: Bdf, offset: u16) -> u8 {
    read(bdf, offset, 1) as u8
}

pub fn write32(bdf: Bdf, offset: u16, value: u32) {
    write(bdf, offset & !3, 4, value)
}

pub fn write16(bdf: Bdf, offset: u16, value: u16) {
    write(bdf, offset & !1, 2, u32::from(value))
}

/// Raw configuration read for `probe.pci_hostile`: `width` bytes at
/// `offset` (< 0xff0) exactly as given (unaligned, crossing a dword), through the
/// ports (data port `0xcfc + (offset & 3)`) or ECAM (one instruction).
pub fn raw_read(bdf: Bdf, offset: u16, width: u8) -> u64 {
    match ECAM.load(Ordering::Relaxed) {
        0 => {
            let port = CONFIG_DATA + (offset & 3);
            // SAFETY: port I/O touches no memory. A word or dword at
            // 0xcfd..0xcff runs past 0xcff into the next ports: that is
            // the hostile access, which any VMM must survive.
            unsafe {
                io::outl(CONFIG_ADDRESS, bdf.cf8(offset));
                match width {
                    1 => u64::from(io::inb(port)),
                    2 => u64::from(io::inw(port)),
                    _ => u64::from(io::inl(port)),
                }
            }
        }
        base => {
            let addr = base + bdf.ecam_offset() + u64::from(offset & 0xfff);
            // SAFETY: bus 0's ECAM window is mapped device memory outside
            // RAM (`usable_ecam`); callers keep `offset` below 0xff0, so
            // the access stays inside the function's 4 KiB.
            unsafe { phys::mmio_load(addr, width) }
        }
    }
}

/// Raw configuration write for `probe.pci_hostile` (see [`raw_read`]).
pub fn raw_write(bdf: Bdf, offset: u16, width: u8, value: u64) {
    match ECAM.load(Ordering::Relaxed) {
        0 => {
            let port = CONFIG_DATA + (offset & 3);
            // SAFETY: as for `raw_read`.
            unsafe {
                io::outl(CONFIG_ADDRESS, bdf.cf8(offset));
                match width {
                    1 => io::outb(port, value as u8),
                    2 => io::outw(port, value as u16),
                    _ => io::outl(port, value as u32),
                }
            }
        }
        base => {
            let addr = base + bdf.ecam_offset() + u64::from(offset & 0xfff);
            // SAFETY: as for `raw_read`.
            unsafe { phys::mmio_store(addr, width, value) }
        }
    }
}

/// True if configuration accesses go through ECAM (`probe.pci_cfg=ecam`).
pub fn uses_ecam() -> bool {
    ECAM.load(Ordering::Relaxed) != 0
}

/// A data-port read with 0xcf8's enable bit (31) clear: not a
/// configuration cycle, so it must read all ones (`probe.pci_hostile`).
pub fn disabled_data_read(bdf: Bdf) -> u32 {
    // SAFETY: port I/O on the configuration mechanism's ports; touches
    // no memory.
    unsafe {
        io::outl(CONFIG_ADDRESS, bdf.cf8(0) & !0x8000_0000);
        io::inl(CONFIG_DATA)
    }
}

/// Reads a function's BARs again (sizing them), for `probe.pci_hostile`.
pub fn resize_bars(function: &Function) -> [Bar; 6] {
    let count = match function.header_type & 0x7f {
        0 => 6,
        1 => 2,
        _ => 0,
    };
    size_bars(function.bdf, count)
}

/// Walks a function's capabilities again, for `probe.pci_hostile`.
pub fn reread_caps(function: &Function) -> Function {
    let mut copy = *function;
    copy.virtio = VirtioCaps::default();
    copy.msix = None;
    copy.bad_cap_list = false;
    read_caps(&mut copy, false);
    copy
}

/// What a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// Not implemented (sizing reads back 0).
    None,
    Io,
    Mem32,
    Mem64,
    /// The upper half of the 64-bit BAR below it.
    Upper,
}

#[derive(Clone, Copy, Debug)]
pub struct Bar {
    pub kind: BarKind,
    pub addr: u64,
    pub size: u64,
    pub prefetchable: bool,
}

const NO_BAR: Bar = Bar {
    kind: BarKind::None,
    addr: 0,
    size: 0,
    prefetchable: false,
};

/// A virtio vendor capability (`struct virtio_pci_cap`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioCap {
    pub bar: u8,
    pub offset: u32,
    pub length: u32,
}

/// The MSI-X capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixCap {
    /// Offset of the capability in configuration space.
    pub cap: u8,
    /// Table size (`N - 1` encoded + 1).
    pub vectors: u16,
    pub table_bar: u8,
    pub table_offset: u32,
    pub pba_bar: u8,
    pub pba_offset: u32,
}

/// virtio `cfg_type` values.
pub mod cfg_type {
    pub const COMMON: u8 = 1;
    pub const NOTIFY: u8 = 2;
    pub const ISR: u8 = 3;
    pub const DEVICE: u8 = 4;
    pub const PCI: u8 = 5;
}

/// The capabilities a virtio driver uses (the first of each type).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioCaps {
    pub common: Option<VirtioCap>,
    pub notify: Option<VirtioCap>,
    pub notify_multiplier: u32,
    pub isr: Option<VirtioCap>,
    pub device: Option<VirtioCap>,
    /// Offset of the `VIRTIO_PCI_CAP_PCI_CFG` capability.
    pub pci_cfg: Option<u8>,
}

/// One function found on bus 0.
#[derive(Clone, Copy, Debug)]
pub struct Function {
    pub bdf: Bdf,
    pub vendor: u16,
    pub device: u16,
    pub class: u8,
    pub subclass: u8,
    pub header_type: u8,
    pub bars: [Bar; 6],
    pub virtio: VirtioCaps,
    pub msix: Option<MsixCap>,
    /// The capability list ran off (bad pointer, too long).
    pub bad_cap_list: bool,
}

/// PCI vendor id of virtio devices.
pub const VIRTIO_VENDOR: u16 = 0x1af4;

impl Function {
    /// The virtio device id, for a virtio function (modern `0x1040 + id`;
    /// transitional `0x1000..0x1040` by subsystem id).
    pub fn virtio_id(&self) -> Option<u32> {
        if self.vendor != VIRTIO_VENDOR {
            return None;
        }
        match self.device {
            0x1040..=0x107f => Some(u32::from(self.device - 0x1040)),
            0x1000..=0x103f => Some(u32::from(read16(self.bdf, reg::SUBSYSTEM_ID))),
            _ => None,
        }
    }

    /// BAR 0's address (0 if it is not a memory or I/O BAR).
    fn bar0(&self) -> u64 {
        self.bars[0].addr
    }
}

/// Sizes the BARs of `bdf` (`count` registers) the way Linux does: with
/// memory and I/O decoding off, each register is saved, written with all
/// ones, read back and restored.
fn size_bars(bdf: Bdf, count: usize) -> [Bar; 6] {
    let mut bars = [NO_BAR; 6];
    let cmd = read16(bdf, reg::COMMAND);
    write16(bdf, reg::COMMAND, cmd & !(command::IO | command::MEMORY));
    let probe = |offset: u16| -> (u32, u32) {
        let original = read32(bdf, offset);
        write32(bdf, offset, u32::MAX);
        let sized = read32(bdf, offset);
        write32(bdf, offset, original);
        (original, sized)
    };
    let mut i = 0;
    while i < count {
        let offset = reg::BAR0 + 4 * i as u16;
        let (low, low_size) = probe(offset);
        if low & 1 == 1 {
            let mask = low_size & 0xffff_fffc;
            bars[i] = Bar {
                kind: BarKind::Io,
                addr: u64::from(low & 0xffff_fffc),
                size: if mask == 0 {
                    0
                } else {
                    u64::from((!mask).wrapping_add(1) & 0xffff)
                },
                prefetchable: false,
            };
            i += 1;
            continue;
        }
        let prefetchable = low & 8 != 0;
        if (low >> 1) & 3 == 2 && i + 1 < count {
            let (high, high_size) = probe(offset + 4);
            let mask = u64::from(high_size) << 32 | u64::from(low_size & 0xffff_fff0);
            bars[i] = Bar {
                kind: BarKind::Mem64,
                addr: u64::from(high) << 32 | u64::from(low & 0xffff_fff0),
                size: if mask == 0 {
                    0
                } else {
                    (!mask).wrapping_add(1)
                },
                prefetchable,
            };
            bars[i + 1] = Bar {
                kind: BarKind::Upper,
                ..NO_BAR
            };
            i += 2;
            continue;
        }
        let mask = low_size & 0xffff_fff0;
        bars[i] = if mask == 0 {
            NO_BAR
        } else {
            Bar {
                kind: BarKind::Mem32,
                addr: u64::from(low & 0xffff_fff0),
                size: u64::from((!mask).wrapping_add(1)),
                prefetchable,
            }
        };
        i += 1;
    }
    write16(bdf, reg::COMMAND, cmd);
    bars
}

/// Walks the capability list: virtio vendor capabilities and MSI-X
/// (with `print`, one `probe.pci_cap=` line each).
fn read_caps(function: &mut Function, print: bool) {
    let bdf = function.bdf;
    if read16(bdf, reg::STATUS) & STATUS_CAP_LIST == 0 {
        return;
    }
    let mut ptr = read8(bdf, reg::CAPABILITIES) & 0xfc;
    let mut walked = 0;
    while ptr != 0 {
        if ptr < 0x40 || walked == MAX_CAPS {
            function.bad_cap_list = true;
            return;
        }
        walked += 1;
        let at = u16::from(ptr);
        let id = read8(bdf, at);
        let next = read8(bdf, at + 1) & 0xfc;
        match id {
            CAP_VENDOR if function.vendor == VIRTIO_VENDOR => {
                let cap_len = read8(bdf, at + 2);
                let kind = read8(bdf, at + 3);
                let cap = VirtioCap {
                    bar: read8(bdf, at + 4),
                    offset: read32(bdf, at + 8),
                    length: read32(bdf, at + 12),
                };
                if print {
                    let multiplier =
                        (kind == cfg_type::NOTIFY && cap_len >= 20).then(|| read32(bdf, at + 16));
                    outln!(
                        "probe.pci_cap={},{:#x},virtio,type={},bar={},offset={:#x},length={:#x}{}",
                        bdf,
                        ptr,
                        kind,
                        cap.bar,
                        cap.offset,
                        cap.length,
                        Multiplier(multiplier)
                    );
                }
                // Reserved BAR numbers and short capabilities are skipped
                // (the spec's "MUST ignore").
                let v = &mut function.virtio;
                let usable = cap.bar <= 5 && cap_len >= 16;
                match kind {
                    cfg_type::COMMON if usable && v.common.is_none() => v.common = Some(cap),
                    cfg_type::NOTIFY if usable && cap_len >= 20 && v.notify.is_none() => {
                        v.notify = Some(cap);
                        v.notify_multiplier = read32(bdf, at + 16);
                    }
                    cfg_type::ISR if usable && v.isr.is_none() => v.isr = Some(cap),
                    cfg_type::DEVICE if usable && v.device.is_none() => v.device = Some(cap),
                    cfg_type::PCI if v.pci_cfg.is_none() => v.pci_cfg = Some(ptr),
                    _ => {}
                }
            }
            CAP_MSIX => {
                let control = read16(bdf, at + 2);
                let table = read32(bdf, at + 4);
                let pba = read32(bdf, at + 8);
                let cap = MsixCap {
                    cap: ptr,
                    vectors: (control & 0x7ff) + 1,
                    table_bar: (table & 7) as u8,
                    table_offset: table & !7,
                    pba_bar: (pba & 7) as u8,
                    pba_offset: pba & !7,
                };
                if print {
                    outln!(
                        "probe.pci_cap={},{:#x},msix,vectors={},table={}:{:#x},pba={}:{:#x}",
                        bdf,
                        ptr,
                        cap.vectors,
                        cap.table_bar,
                        cap.table_offset,
                        cap.pba_bar,
                        cap.pba_offset
                    );
                }
                function.msix.get_or_insert(cap);
            }
            _ => {
                if print {
                    outln!("probe.pci_cap={},{:#x},id={:#x}", bdf, ptr, id);
                }
            }
        }
        ptr = next;
    }
}

/// `,multiplier=<n>` of a notify capability's `probe.pci_cap=` line.
struct Multiplier(Option<u32>);

impl fmt::Display for Multiplier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(m) => write!(f, ",multiplier={m}"),
            None => Ok(()),
        }
    }
}

/// Reads one function (which answered with a vendor id).
fn read_function(bdf: Bdf) -> Function {
    let ids = read32(bdf, reg::VENDOR_ID);
    let class = read32(bdf, reg::CLASS_REVISION);
    let header_type = read8(bdf, reg::HEADER_TYPE);
    let bar_count = match header_type & 0x7f {
        0 => 6,
        1 => 2,
        _ => 0,
    };
    let mut function = Function {
        bdf,
        vendor: ids as u16,
        device: (ids >> 16) as u16,
        class: (class >> 24) as u8,
        subclass: (class >> 16) as u8,
        header_type,
        bars: size_bars(bdf, bar_count),
        virtio: VirtioCaps::default(),
        msix: None,
        bad_cap_list: false,
    };
    read_caps(&mut function, false);
    function
}

/// The functions found on bus 0.
pub struct Functions {
    list: [Option<Function>; MAX_FUNCTIONS],
    count: usize,
}

impl Functions {
    pub fn iter(&self) -> impl Iterator<Item = &Function> {
        self.list[..self.count].iter().flatten()
    }
}

/// Enumerates bus 0 (devices 0 to 31; functions 1 to 7 of multi-function
/// devices).
fn enumerate() -> Functions {
    let mut found = Functions {
        list: [None; MAX_FUNCTIONS],
        count: 0,
    };
    for dev in 0..32u8 {
        for func in 0..8u8 {
            let bdf = Bdf { bus: 0, dev, func };
            let vendor = read16(bdf, reg::VENDOR_ID);
            if vendor == 0xffff || vendor == 0 {
                if func == 0 {
                    break;
                }
                continue;
            }
            if found.count == MAX_FUNCTIONS {
                return found;
            }
            let function = read_function(bdf);
            let multi = function.header_type & 0x80 != 0;
            found.list[found.count] = Some(function);
            found.count += 1;
            if func == 0 && !multi {
                break;
            }
        }
    }
    found
}

/// True if `[addr, addr + size)` overlaps RAM in the memory map.
pub fn overlaps_ram(map: &e820::Map, addr: u64, size: u64) -> bool {
    let end = addr.saturating_add(size);
    map.entries()
        .iter()
        .any(|e| e.kind == e820::TYPE_RAM && addr < e.addr.saturating_add(e.size) && end > e.addr)
}

/// Why a BAR cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarProblem {
    Unassigned,
    Io,
    InRam,
    Unaligned,
    Unmappable(entry::MapError),
}

impl BarProblem {
    pub fn name(self) -> &'static str {
        match self {
            BarProblem::Unassigned => "bar-unassigned",
            BarProblem::Io => "bar-io",
            BarProblem::InRam => "bar-in-ram",
            BarProblem::Unaligned => "bar-unaligned",
            BarProblem::Unmappable(_) => "bar-unmappable",
        }
    }
}

/// Checks a memory BAR: assigned, aligned to its size, outside RAM.
pub fn check_bar(map: &e820::Map, bar: &Bar) -> Result<(), BarProblem> {
    match bar.kind {
        BarKind::Io => return Err(BarProblem::Io),
        BarKind::None | BarKind::Upper => return Err(BarProblem::Unassigned),
        BarKind::Mem32 | BarKind::Mem64 => {}
    }
    if bar.addr == 0 || bar.size == 0 {
        return Err(BarProblem::Unassigned);
    }
    if !bar.size.is_power_of_two() || !bar.addr.is_multiple_of(bar.size) {
        return Err(BarProblem::Unaligned);
    }
    if overlaps_ram(map, bar.addr, bar.size) {
        return Err(BarProblem::InRam);
    }
    Ok(())
}

/// Checks a memory BAR and makes it reachable: inside the identity map
/// as it is, else mapped uncached with 4 KiB pages (exactly the BAR).
pub fn map_bar(map: &e820::Map, bar: &Bar) -> Result<(), BarProblem> {
    check_bar(map, bar)?;
    if bar.addr + bar.size <= entry::mapped_limit() {
        return Ok(());
    }
    entry::map_device(bar.addr, bar.size).map_err(BarProblem::Unmappable)
}

/// Prints `probe.pci_error=<bdf>,<reason> bar=<i> addr=0x.. size=0x..`.
pub fn report_bar_problem(bdf: Bdf, index: usize, bar: &Bar, problem: BarProblem) {
    match problem {
        BarProblem::Unmappable(e) => outln!(
            "probe.pci_error={},{} bar={} addr={:#x} size={:#x} {}",
            bdf,
            problem.name(),
            index,
            bar.addr,
            bar.size,
            e.name()
        ),
        _ => outln!(
            "probe.pci_error={},{} bar={} addr={:#x} size={:#x}",
            bdf,
            problem.name(),
            index,
            bar.addr,
            bar.size
        ),
    }
}

/// What [`discover`] found.
pub struct Discovery {
    pub functions: Functions,
}

/// `probe.pci_cfg=<io|ecam>`: which mechanism configuration accesses use.
fn wants_ecam(cmdline: &[u8]) -> bool {
    crate::cmdline::last_value(cmdline, "probe.pci_cfg").flatten() == Some(b"ecam")
}

/// Makes bus 0's ECAM window usable: outside RAM, mapped. Returns the
/// base or the reason it is not usable.
fn usable_ecam(map: &e820::Map, ecam: &acpi::Ecam) -> Result<u64, &'static str> {
    if ecam.start_bus != 0 {
        return Err("no-bus-0");
    }
    let size = 1u64 << 20;
    if ecam.base == 0 || !ecam.base.is_multiple_of(size) {
        return Err("unaligned");
    }
    if overlaps_ram(map, ecam.base, size) {
        return Err("in-ram");
    }
    if ecam.base + size > entry::mapped_limit() && entry::map_device(ecam.base, size).is_err() {
        return Err("unmappable");
    }
    Ok(ecam.base)
}

/// Compares dwords 0 and 8 of every function through both mechanisms.
fn cross_check(base: u64, functions: &Functions) -> Result<u32, (Bdf, u16, u32, u32)> {
    let mut reads = 0;
    for f in functions.iter() {
        for offset in [reg::VENDOR_ID, reg::CLASS_REVISION] {
            let port = io_read(f.bdf, offset, 4);
            let mmio = ecam_read(base, f.bdf, offset, 4);
            if port != mmio {
                return Err((f.bdf, offset, port, mmio));
            }
            reads += 1;
        }
    }
    Ok(reads)
}

/// Enumerates bus 0 unless `pci=off`, prints what it found and returns
/// it. Prints nothing (and returns `None`) when no function answers.
pub fn discover(cmdline: &[u8], map: &e820::Map, verbose: bool) -> Option<Discovery> {
    // Like Linux, `pci=` takes a comma-separated list (any occurrence).
    let off = crate::cmdline::params(cmdline).any(|(name, value)| {
        crate::cmdline::param_eq(name, "pci")
            && value.is_some_and(|v| v.split(|&c| c == b',').any(|o| o == b"off"))
    });
    if off {
        return None;
    }
    let ecam = acpi::find_ecam();
    let ecam_base = ecam.as_ref().ok().map(|e| usable_ecam(map, e));
    let use_ecam = wants_ecam(cmdline);
    if use_ecam && let Some(Ok(base)) = ecam_base {
        ECAM.store(base, Ordering::Relaxed);
    }
    let functions = enumerate();
    if functions.count == 0 {
        ECAM.store(0, Ordering::Relaxed);
        return None;
    }
    match (ecam, ecam_base) {
        (Err(missing), _) => outln!("probe.pci_ecam=none {}", missing.name()),
        (Ok(e), Some(Ok(base))) => match cross_check(base, &functions) {
            Ok(reads) => outln!(
                "probe.pci_ecam={:#x} segment={} buses={}-{} check=ok reads={}",
                e.base,
                e.segment,
                e.start_bus,
                e.end_bus,
                reads
            ),
            Err((bdf, offset, port, mmio)) => outln!(
                "probe.pci_ecam={:#x} segment={} buses={}-{} check=mismatch {}+{:#x} io={:#x} ecam={:#x}",
                e.base,
                e.segment,
                e.start_bus,
                e.end_bus,
                bdf,
                offset,
                port,
                mmio
            ),
        },
        (Ok(e), reason) => outln!(
            "probe.pci_ecam={:#x} segment={} buses={}-{} check=unusable {}",
            e.base,
            e.segment,
            e.start_bus,
            e.end_bus,
            reason.and_then(Result::err).unwrap_or("?")
        ),
    }
    if use_ecam && ECAM.load(Ordering::Relaxed) == 0 {
        outln!("probe.pci_error=ecam-unavailable cfg=io");
    }
    for f in functions.iter() {
        outln!(
            "probe.pci={},{:04x}:{:04x},class={:02x}{:02x},bar0={:#x}",
            f.bdf,
            f.vendor,
            f.device,
            f.class,
            f.subclass,
            f.bar0()
        );
        for (i, bar) in f.bars.iter().enumerate() {
            let kind = match bar.kind {
                BarKind::None | BarKind::Upper => continue,
                BarKind::Io => "io",
                BarKind::Mem32 => "mem32",
                BarKind::Mem64 => "mem64",
            };
            if verbose {
                outln!(
                    "probe.pci_bar={},{},{},{:#x},{:#x}{}",
                    f.bdf,
                    i,
                    kind,
                    bar.addr,
                    bar.size,
                    if bar.prefetchable {
                        ",prefetchable"
                    } else {
                        ""
                    }
                );
            }
            // Assigned memory BARs must be sane even if unused.
            if bar.kind != BarKind::Io
                && bar.addr != 0
                && let Err(problem) = check_bar(map, bar)
            {
                report_bar_problem(f.bdf, i, bar, problem);
            }
        }
        if verbose {
            // Walked again, to print.
            let mut copy = *f;
            read_caps(&mut copy, true);
        }
        if f.bad_cap_list {
            outln!("probe.pci_error={},bad-cap-list", f.bdf);
        }
    }
    Some(Discovery { functions })
}
