//! Loading the kernel and initrd, and writing the boot information the
//! kernel reads: the Linux zero page or the PVH start info, the command line
//! and the MP table.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{self, BzImage, Cmdline, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::acpi;
use super::layout::{self, E820Entry};
use super::mptable::{self, MptableError};
use super::regs::EntryPoint;

/// Errors loading the kernel or writing boot information.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open {what} {path}: {source}")]
    Open {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a kernel Tessera can boot: as ELF: {elf}; as bzImage: {bzimage}")]
    NotAKernel {
        path: String,
        elf: loader::Error,
        bzimage: loader::Error,
    },
    #[error(
        "the initrd {path} ({size} bytes) does not fit in guest memory between the kernel \
         (ending at {kernel_end:#x}) and {limit:#x}"
    )]
    InitrdTooBig {
        path: String,
        size: u64,
        kernel_end: u64,
        limit: u64,
    },
    #[error("cannot read the initrd {path} into guest memory: {reason}")]
    InitrdRead { path: String, reason: String },
    #[error("the kernel command line is invalid: {0}")]
    Cmdline(#[from] linux_loader::cmdline::Error),
    #[error("cannot write the kernel command line: {0}")]
    WriteCmdline(loader::Error),
    #[error("cannot write the boot parameters: {0}")]
    BootParams(linux_loader::configurator::Error),
    #[error(transparent)]
    Acpi(#[from] super::acpi::AcpiError),
    #[error(transparent)]
    Mptable(#[from] MptableError),
}

/// A kernel loaded into guest memory.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    pub entry: EntryPoint,
    /// The bzImage setup header, which the zero page must carry.
    pub setup_header: Option<setup_header>,
    /// The first guest address after the loaded image.
    pub kernel_end: u64,
}

/// Where the initrd was put.
#[derive(Debug, Clone, Copy)]
pub struct InitrdRegion {
    pub addr: u64,
    pub size: u64,
}

/// Opens a file for reading; a FIFO put in place of the file since it was
/// configured reads as empty instead of waiting for a writer.
fn open_without_blocking(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
}

/// Loads an ELF vmlinux (through its PVH note when it has one, else the
/// 64-bit entry) or a bzImage.
fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let open = || {
        open_without_blocking(path).map_err(|source| BootError::Open {
            what: "the kernel image",
            path: path.display().to_string(),
            source,
        })
    };
    let highmem = Some(GuestAddress(layout::HIMEM_START));
    let elf_err = match Elf::load(mem, None, &mut open()?, highmem) {
        Ok(result) => {
            let entry = match result.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => EntryPoint::Pvh(addr.0),
                _ => EntryPoint::Linux64(result.kernel_load.0),
            };
            return Ok(LoadedKernel {
                entry,
                setup_header: None,
                kernel_end: result.kernel_end,
            });
        }
        Err(err) => err,
    };
    match BzImage::load(mem, None, &mut open()?, highmem) {
        // The 64-bit entry point is 0x200 bytes into the protected-mode code.
        Ok(result) => Ok(LoadedKernel {
            entry: EntryPoint::Linux64(result.kernel_load.0 + 0x200),
            setup_header: result.setup_header,
            kernel_end: result.kernel_end,
        }),
        Err(bz_err) => Err(BootError::NotAKernel {
            path: path.display().to_string(),
            elf: elf_err,
            bzimage: bz_err,
        }),
    }
}

/// Loads the kernel at `kernel` and, if given, the initrd at `initrd`
/// above it, then faults in the page the boot information goes to.
pub fn load_images(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &Path,
    initrd: Option<&Path>,
) -> Result<(LoadedKernel, Option<InitrdRegion>), BootError> {
    let kernel = load_kernel(mem, kernel)?;
    let initrd = initrd
        .map(|path| {
            load_initrd(
                mem,
                mem_size,
                path,
                kernel.kernel_end,
                initrd_addr_limit(&kernel),
            )
        })
        .transpose()?;
    fault_in_boot_info(mem);
    Ok((kernel, initrd))
}

/// Faults in the page the boot information goes to later, once the
/// devices are known: with transparent huge pages that brings in the first
/// 2 MiB of guest memory, zeroed, which the loader then pays for instead of
/// the VMM thread (16 to 32 ms of a start in L1 under TCG).
fn fault_in_boot_info(mem: &GuestMemoryMmap) {
    // Guest RAM starts at 0; were the page missing, writing the boot
    // information would report it.
    let _ = mem.write_obj(0u8, GuestAddress(layout::ZERO_PAGE_START));
}

/// Loads the initrd page-aligned at the top of low RAM, below `max_addr`
/// and above the kernel image.
fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    path: &Path,
    kernel_end: u64,
    max_addr: u64,
) -> Result<InitrdRegion, BootError> {
    let display = || path.display().to_string();
    let mut file = open_without_blocking(path).map_err(|source| BootError::Open {
        what: "the initrd",
        path: display(),
        source,
    })?;
    let size = file
        .metadata()
        .map_err(|source| BootError::Open {
            what: "the initrd",
            path: display(),
            source,
        })?
        .len();
    let limit = layout::low_ram_end(mem_size).min(max_addr);
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end.max(layout::HIMEM_START))
        .ok_or(BootError::InitrdTooBig {
            path: display(),
            size,
            kernel_end,
            limit,
        })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|err| BootError::InitrdRead {
            path: display(),
            reason: err.to_string(),
        })?;
    Ok(InitrdRegion { addr, size })
}

/// The highest address (exclusive) the kernel accepts an initrd at.
fn initrd_addr_limit(kernel: &LoadedKernel) -> u64 {
    match kernel.setup_header {
        Some(hdr) if hdr.initrd_addr_max != 0 => u64::from(hdr.initrd_addr_max) + 1,
        // The boot protocol's default for old kernels, and a safe bound for PVH.
        _ => 0x3800_0000,
    }
}

/// Writes the command line, the MP table, the ACPI tables (with a device
/// per `virtio_mmio.device=` entry of the command line, and with `pci` the
/// PCI root bridge and its MCFG) and the zero page or PVH start info (whose
/// e820 map reserves the ECAM range with `pci`).
pub fn configure_system(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &LoadedKernel,
    cmdline: &Cmdline,
    initrd: Option<InitrdRegion>,
    cpu_count: u8,
    pci: bool,
) -> Result<(), BootError> {
    loader::load_cmdline(mem, GuestAddress(layout::CMDLINE_START), cmdline)
        .map_err(BootError::WriteCmdline)?;
    let cmdline_size = cmdline.as_cstring()?.as_bytes_with_nul().len() as u32;
    mptable::setup_mptable(mem, cpu_count)?;
    let devices = acpi::mmio_devices_on_cmdline(&cmdline.as_cstring()?.to_string_lossy());
    let rsdp = acpi::setup_acpi(mem, cpu_count, &devices, pci)?;
    let e820 = layout::e820_map(mem_size, pci);
    match kernel.entry {
        EntryPoint::Pvh(_) => write_pvh_start_info(mem, &e820, initrd, rsdp),
        EntryPoint::Linux64(_) => {
            write_zero_page(mem, &e820, kernel.setup_header, cmdline_size, initrd, rsdp)
        }
    }
}

fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    e820: &[E820Entry],
    initrd: Option<InitrdRegion>,
    rsdp: u64,
) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let mut start_info = hvm_start_info {
        magic: 0x336e_c578,
        version: 1,
        cmdline_paddr: layout::CMDLINE_START,
        memmap_paddr: layout::MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        rsdp_paddr: rsdp,
        ..Default::default()
    };
    if initrd.is_some() {
        start_info.nr_modules = 1;
        start_info.modlist_paddr = layout::MODLIST_START;
    }
    let mut params = BootParams::new(&start_info, GuestAddress(layout::PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(layout::MEMMAP_START));
    if let Some(initrd) = initrd {
        let module = hvm_modlist_entry {
            paddr: initrd.addr,
            size: initrd.size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(layout::MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(BootError::BootParams)
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    e820: &[E820Entry],
    setup_header: Option<setup_header>,
    cmdline_size: u32,
    initrd: Option<InitrdRegion>,
    rsdp: u64,
) -> Result<(), BootError> {
    const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
    const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
    const KERNEL_LOADER_OTHER: u8 = 0xff;
    const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

    let mut params = boot_params::default();
    if let Some(hdr) = setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_size;
    params.acpi_rsdp_addr = rsdp;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(e820) {
        slot.addr = entry.addr;
        slot.size = entry.size;
        slot.r#type = entry.kind;
    }
    params.e820_entries = e820.len().min(params.e820_table.len()) as u8;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(layout::ZERO_PAGE_START)),
        mem,
    )
    .map_err(BootError::BootParams)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn memory(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap()
    }

    #[test]
    fn rejects_files_that_are_not_kernels() {
        let mem = memory(64 << 20);
        let mut junk = std::env::temp_dir();
        junk.push(format!("tessera-not-a-kernel-{}", std::process::id()));
        std::fs::File::create(&junk)
            .unwrap()
            .write_all(&[0x42; 8192])
            .unwrap();
        let err = load_kernel(&mem, &junk).unwrap_err();
        std::fs::remove_file(&junk).unwrap();
        assert!(matches!(err, BootError::NotAKernel { .. }), "{err}");
    }

    #[test]
    fn zero_page_carries_e820_cmdline_and_initrd() {
        let size = 256 << 20;
        let mem = memory(size);
        let kernel = LoadedKernel {
            entry: EntryPoint::Linux64(0x100200),
            setup_header: None,
            kernel_end: 0x20_0000,
        };
        let mut cmdline = Cmdline::new(layout::CMDLINE_MAX_SIZE).unwrap();
        cmdline.insert_str("console=ttyS0").unwrap();
        let initrd = InitrdRegion {
            addr: 0x800_0000,
            size: 0x1234,
        };
        configure_system(&mem, size, &kernel, &cmdline, Some(initrd), 2, false).unwrap();
        let params: boot_params = mem.read_obj(GuestAddress(layout::ZERO_PAGE_START)).unwrap();
        assert_eq!(params.e820_entries, 3);
        let last = params.e820_table[2];
        assert_eq!({ last.addr } + { last.size }, size);
        assert_eq!({ params.hdr.cmd_line_ptr }, layout::CMDLINE_START as u32);
        assert_eq!({ params.hdr.ramdisk_image }, 0x800_0000);
        let mut text = [0u8; 14];
        mem.read_slice(&mut text, GuestAddress(layout::CMDLINE_START))
            .unwrap();
        assert_eq!(&text, b"console=ttyS0\0");
    }

    #[test]
    fn pvh_start_info_points_at_memmap_and_modules() {
        let size = 128 << 20;
        let mem = memory(size);
        let kernel = LoadedKernel {
            entry: EntryPoint::Pvh(0x100000),
            setup_header: None,
            kernel_end: 0x20_0000,
        };
        let cmdline = Cmdline::new(layout::CMDLINE_MAX_SIZE).unwrap();
        let initrd = InitrdRegion {
            addr: 0x400_0000,
            size: 4096,
        };
        configure_system(&mem, size, &kernel, &cmdline, Some(initrd), 1, false).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(layout::PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, 0x336e_c578);
        assert_eq!(info.memmap_entries, 3);
        assert_eq!(info.nr_modules, 1);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x400_0000, 4096));
    }

    #[test]
    fn with_pci_both_boot_paths_reserve_the_ecam_and_list_the_mcfg() {
        let size = 128 << 20;
        let cmdline = Cmdline::new(layout::CMDLINE_MAX_SIZE).unwrap();
        let ecam = (
            layout::PCI_ECAM_START,
            layout::PCI_ECAM_SIZE,
            layout::E820_RESERVED,
        );
        let xsdt_has_mcfg = |mem: &GuestMemoryMmap, rsdp: u64| {
            let xsdt: u64 = mem.read_obj(GuestAddress(rsdp + 24)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(xsdt + 4)).unwrap();
            (xsdt + 36..xsdt + u64::from(len)).step_by(8).any(|entry| {
                let table: u64 = mem.read_obj(GuestAddress(entry)).unwrap();
                let sig: [u8; 4] = mem.read_obj(GuestAddress(table)).unwrap();
                &sig == b"MCFG"
            })
        };

        let mem = memory(size);
        let linux = LoadedKernel {
            entry: EntryPoint::Linux64(0x100200),
            setup_header: None,
            kernel_end: 0x20_0000,
        };
        configure_system(&mem, size, &linux, &cmdline, None, 1, true).unwrap();
        let params: boot_params = mem.read_obj(GuestAddress(layout::ZERO_PAGE_START)).unwrap();
        // RAM, the BIOS area, RAM, what lies below the BAR window, ECAM.
        assert_eq!(params.e820_entries, 5);
        let last = params.e820_table[4];
        assert_eq!(({ last.addr }, { last.size }, { last.r#type }), ecam);
        assert!(xsdt_has_mcfg(&mem, params.acpi_rsdp_addr));

        let mem = memory(size);
        let pvh = LoadedKernel {
            entry: EntryPoint::Pvh(0x100000),
            ..linux
        };
        configure_system(&mem, size, &pvh, &cmdline, None, 1, true).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(layout::PVH_INFO_START)).unwrap();
        assert_eq!(info.memmap_entries, 5);
        let last: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(
                info.memmap_paddr + 4 * std::mem::size_of::<hvm_memmap_table_entry>() as u64,
            ))
            .unwrap();
        assert_eq!((last.addr, last.size, last.type_), ecam);
        assert!(xsdt_has_mcfg(&mem, info.rsdp_paddr));

        // Without PCI, no MCFG.
        let mem = memory(size);
        configure_system(&mem, size, &pvh, &cmdline, None, 1, false).unwrap();
        assert!(!xsdt_has_mcfg(&mem, layout::RSDP_ADDR));
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram() {
        let size = 64u64 << 20;
        let mem = memory(size);
        let mut file = std::env::temp_dir();
        file.push(format!("tessera-initrd-{}", std::process::id()));
        std::fs::write(&file, vec![7u8; 10_000]).unwrap();
        let region = load_initrd(&mem, size, &file, 0x20_0000, u64::MAX).unwrap();
        assert_eq!(region.addr % 4096, 0);
        assert!(region.addr + region.size <= size);
        assert!(size - (region.addr + region.size) < 4096);
        let err = load_initrd(&mem, size, &file, 0x20_0000, layout::HIMEM_START + 100).unwrap_err();
        assert!(matches!(err, BootError::InitrdTooBig { .. }));
        // It must not overlap the kernel either.
        let err = load_initrd(&mem, size, &file, size - 4096, u64::MAX).unwrap_err();
        std::fs::remove_file(&file).unwrap();
        assert!(matches!(err, BootError::InitrdTooBig { .. }));
    }
}
