//! Boot information from either protocol, reduced to one common view.
//!
//! * PVH: `struct hvm_start_info` (Xen `arch-x86/hvm/start_info.h`):
//!   magic `0x336ec578` at 0, version at 4, `cmdline_paddr` (u64) at 24,
//!   and for version >= 1 `memmap_paddr` (u64) at 40 and `memmap_entries`
//!   (u32) at 48; memmap entries are `{addr u64, size u64, type u32,
//!   reserved u32}` (24 bytes).
//! * Linux 64-bit: `struct boot_params` (the zero page): `e820_entries`
//!   (u8) at 0x1e8, `e820_table` at 0x2d0 (packed 20-byte entries
//!   `{addr u64, size u64, type u32}`), `hdr.cmd_line_ptr` (u32) at 0x228
//!   and `ext_cmd_line_ptr` (u32, high half) at 0x0c8.
//!
//! Everything is copied out with bounds-checked reads ([`crate::phys`]),
//! so a bogus pointer yields an error string, never a fault.

use crate::e820;
use crate::entry::{BOOT_LINUX64, BOOT_PVH};
use crate::phys;

/// At most this many command line bytes are read.
pub const CMDLINE_MAX: usize = 4096;

const PVH_MAGIC: u32 = 0x336e_c578;
const PVH_VERSION: u64 = 4;
const PVH_CMDLINE: u64 = 24;
const PVH_MEMMAP_PADDR: u64 = 40;
const PVH_MEMMAP_ENTRIES: u64 = 48;
const PVH_START_INFO_SIZE: u64 = 56;
const PVH_MEMMAP_ENTRY_SIZE: u64 = 24;

const ZP_EXT_CMD_LINE_PTR: u64 = 0x0c8;
const ZP_E820_ENTRIES: u64 = 0x1e8;
const ZP_CMD_LINE_PTR: u64 = 0x228;
const ZP_E820_TABLE: u64 = 0x2d0;
const ZP_SIZE: u64 = 4096;
const ZP_E820_ENTRY_SIZE: u64 = 20;

/// Which entry point was used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootKind {
    Pvh,
    Linux64,
    /// `probe_main` was called with an unknown kind (cannot happen).
    Unknown(u32),
}

impl BootKind {
    /// The value printed in `probe.boot=`.
    pub fn name(self) -> &'static str {
        match self {
            BootKind::Pvh => "pvh",
            BootKind::Linux64 => "linux64",
            BootKind::Unknown(_) => "unknown",
        }
    }
}

/// Everything the probe needs from the boot protocol.
pub struct BootInfo {
    pub kind: BootKind,
    cmdline: [u8; CMDLINE_MAX],
    cmdline_len: usize,
    pub e820: e820::Map,
    /// First problem met while reading the boot structures, if any.
    pub error: Option<Error>,
}

/// Problems reading the boot structures (printed as
/// `probe.bootinfo_error=<this>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    InfoUnmapped(u64),
    BadPvhMagic(u32),
    CmdlineUnmapped(u64),
    CmdlineUnterminated,
    MemmapUnmapped(u64),
    UnknownKind(u32),
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            Error::InfoUnmapped(a) => write!(f, "info-unmapped addr={a:#x}"),
            Error::BadPvhMagic(m) => write!(f, "bad-start-info-magic=0x{m:x}"),
            Error::CmdlineUnmapped(a) => write!(f, "cmdline-unmapped addr={a:#x}"),
            Error::CmdlineUnterminated => write!(f, "cmdline-truncated max={CMDLINE_MAX}"),
            Error::MemmapUnmapped(a) => write!(f, "memmap-unmapped addr={a:#x}"),
            Error::UnknownKind(k) => write!(f, "unknown-boot-kind={k}"),
        }
    }
}

impl BootInfo {
    /// Reads the boot structures at `info` for the given entry `kind`.
    pub fn collect(kind: u32, info: u64) -> BootInfo {
        let mut boot = BootInfo {
            kind: BootKind::Unknown(kind),
            cmdline: [0; CMDLINE_MAX],
            cmdline_len: 0,
            e820: e820::Map::new(0),
            error: None,
        };
        match kind {
            BOOT_PVH => {
                boot.kind = BootKind::Pvh;
                boot.read_pvh(info);
            }
            BOOT_LINUX64 => {
                boot.kind = BootKind::Linux64;
                boot.read_zero_page(info);
            }
            other => boot.fail(Error::UnknownKind(other)),
        }
        boot
    }

    /// The command line (without the terminating NUL).
    pub fn cmdline(&self) -> &[u8] {
        &self.cmdline[..self.cmdline_len]
    }

    fn fail(&mut self, error: Error) {
        self.error.get_or_insert(error);
    }

    fn read_pvh(&mut self, info: u64) {
        if !phys::range_ok(info, PVH_START_INFO_SIZE) {
            return self.fail(Error::InfoUnmapped(info));
        }
        let magic = phys::read_u32(info).unwrap_or(0);
        if magic != PVH_MAGIC {
            return self.fail(Error::BadPvhMagic(magic));
        }
        let version = phys::read_u32(info + PVH_VERSION).unwrap_or(0);
        self.read_cmdline(phys::read_u64(info + PVH_CMDLINE).unwrap_or(0));
        if version < 1 {
            // Version 0 has no memory map: report it as empty.
            return;
        }
        let table = phys::read_u64(info + PVH_MEMMAP_PADDR).unwrap_or(0);
        let count = phys::read_u32(info + PVH_MEMMAP_ENTRIES).unwrap_or(0);
        self.read_memmap(table, u64::from(count), PVH_MEMMAP_ENTRY_SIZE);
    }

    fn read_zero_page(&mut self, zero_page: u64) {
        if !phys::range_ok(zero_page, ZP_SIZE) {
            return self.fail(Error::InfoUnmapped(zero_page));
        }
        let low = phys::read_u32(zero_page + ZP_CMD_LINE_PTR).unwrap_or(0);
        let high = phys::read_u32(zero_page + ZP_EXT_CMD_LINE_PTR).unwrap_or(0);
        self.read_cmdline(u64::from(high) << 32 | u64::from(low));
        let count = phys::read_u8(zero_page + ZP_E820_ENTRIES).unwrap_or(0);
        self.read_memmap(
            zero_page + ZP_E820_TABLE,
            u64::from(count),
            ZP_E820_ENTRY_SIZE,
        );
    }

    fn read_cmdline(&mut self, addr: u64) {
        if addr == 0 {
            return; // No command line.
        }
        for i in 0..CMDLINE_MAX {
            match phys::read_u8(addr.wrapping_add(i as u64)) {
                None => return self.fail(Error::CmdlineUnmapped(addr)),
                Some(0) => return,
                Some(byte) => {
                    self.cmdline[i] = byte;
                    self.cmdline_len = i + 1;
                }
            }
        }
        self.fail(Error::CmdlineUnterminated);
    }

    fn read_memmap(&mut self, table: u64, count: u64, entry_size: u64) {
        self.e820 = e820::Map::new(count);
        let readable = count.min(e820::MAX_ENTRIES as u64);
        if readable == 0 {
            return;
        }
        if !phys::range_ok(table, readable * entry_size) {
            return self.fail(Error::MemmapUnmapped(table));
        }
        for i in 0..readable {
            let at = table + i * entry_size;
            self.e820.push(e820::Entry {
                addr: phys::read_u64(at).unwrap_or(0),
                size: phys::read_u64(at + 8).unwrap_or(0),
                kind: phys::read_u32(at + 16).unwrap_or(0),
            });
        }
    }
}
