//! Guest RAM: backed by a memfd when vhost-user backends must map it,
//! private anonymous memory otherwise (as Firecracker), and in both cases
//! advised for transparent huge pages where the host needs the advice:
//! guest RAM on 4 KiB pages costs a nested page fault per 4 KiB the guest
//! touches. Private memory gets them whenever the host's THP setting is
//! `always` or `madvise`; shared memory only where
//! `/sys/kernel/mm/transparent_hugepage/shmem_enabled` allows (`advise` or
//! `always`), or with `huge_pages: "2M"` (hugetlbfs).
//!
//! Every region is mapped at a 2 MiB-aligned host address: a host kernel
//! before 6.7 aligns no anonymous mapping, and a region whose 2 MiB guest
//! pages straddle two host huge pages gets neither transparent huge pages
//! for its ends nor 2 MiB entries in KVM's nested page tables for any of
//! it. Guest RAM then lives as long as the process, as in Firecracker.

use std::fs::File;
use std::num::NonZeroUsize;
use std::os::fd::AsFd;
use std::ptr::NonNull;

use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::mman::{mmap, mmap_anonymous, munmap, MapFlags, ProtFlags};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use crate::arch::layout;
use crate::resources::HugePageConfig;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot create the guest memory file: {0}")]
    Memfd(nix::Error),
    #[error("cannot size the guest memory file to {size_mib} MiB: {source}")]
    Resize {
        size_mib: usize,
        source: std::io::Error,
    },
    #[error("cannot map {size_mib} MiB of guest memory: {reason}")]
    Map { size_mib: usize, reason: String },
    #[error("mem_size_mib {wanted} is more than this host's memory ({host} MiB of RAM and swap)")]
    MoreThanHost { wanted: usize, host: u64 },
    #[error("mem_size_mib {0} is not a multiple of the 2 MiB huge page size")]
    HugePageMultiple(usize),
}

/// Where guest RAM regions start in the VMM's address space.
const REGION_ALIGNMENT: usize = 2 << 20;

/// The host's RAM plus swap in MiB, from /proc/meminfo.
pub fn host_memory_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = meminfo.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok()
    };
    Some((field("MemTotal:")? + field("SwapTotal:").unwrap_or(0)) >> 10)
}

/// Who maps guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// Vhost-user backends map it too: one memfd.
    Shared,
    /// Only this process: private anonymous memory.
    Private,
}

/// Creates `mem_size_mib` MiB of guest RAM laid out around the MMIO hole;
/// shared RAM is one memfd, at matching file offsets (hugetlbfs always
/// is).
pub fn create_guest_memory(
    mem_size_mib: usize,
    huge_pages: HugePageConfig,
    sharing: Sharing,
) -> Result<GuestMemoryMmap, MemoryError> {
    if let Some(host) = host_memory_mib() {
        if mem_size_mib as u64 > host {
            return Err(MemoryError::MoreThanHost {
                wanted: mem_size_mib,
                host,
            });
        }
    }
    let size = (mem_size_mib as u64) << 20;
    let map_err = |reason: String| MemoryError::Map {
        size_mib: mem_size_mib,
        reason,
    };
    let regions = layout::ram_regions(size);
    let file = match (sharing, huge_pages) {
        (Sharing::Private, HugePageConfig::None) => None,
        _ => Some(memfd(mem_size_mib, huge_pages)?),
    };
    let mut file_offset = 0;
    let mut mapped = Vec::with_capacity(regions.len());
    for (addr, len) in regions {
        let backing = match &file {
            Some(file) => {
                let clone = file.try_clone().map_err(|err| map_err(err.to_string()))?;
                Backing::Shared(FileOffset::new(clone, file_offset))
            }
            None => Backing::Anonymous,
        };
        file_offset += len;
        let region = map_region(len as usize, backing, huge_pages).map_err(map_err)?;
        mapped.push(
            GuestRegionMmap::new(region, GuestAddress(addr)).ok_or_else(|| {
                map_err(format!(
                    "the region at {addr:#x} overflows the address space"
                ))
            })?,
        );
    }
    let mem = GuestMemoryMmap::from_regions(mapped).map_err(|err| map_err(err.to_string()))?;
    if huge_pages != HugePageConfig::Hugetlbfs2M && thp_needs_advice(sharing) {
        advise_huge_pages(&mem);
    }
    Ok(mem)
}

/// Maps a snapshot's memory file as guest RAM for a microVM that shares
/// it with no backend: each region of `regions` (guest address, length)
/// copy-on-write over the file, the regions one after another in it, so
/// that a load reads only the pages the guest touches and clones of one
/// snapshot share the host's page cache of it.
pub fn map_snapshot_memory(
    file: &File,
    regions: &[(u64, u64)],
) -> Result<GuestMemoryMmap, MemoryError> {
    let total: u64 = regions.iter().map(|&(_, len)| len).sum();
    let map_err = |reason: String| MemoryError::Map {
        size_mib: (total >> 20) as usize,
        reason,
    };
    let mut file_offset = 0;
    let mut mapped = Vec::with_capacity(regions.len());
    for &(addr, len) in regions {
        let clone = file.try_clone().map_err(|err| map_err(err.to_string()))?;
        let backing = Backing::CopyOnWrite(FileOffset::new(clone, file_offset));
        file_offset += len;
        let region = map_region(len as usize, backing, HugePageConfig::None).map_err(map_err)?;
        mapped.push(
            GuestRegionMmap::new(region, GuestAddress(addr)).ok_or_else(|| {
                map_err(format!(
                    "the region at {addr:#x} overflows the address space"
                ))
            })?,
        );
    }
    GuestMemoryMmap::from_regions(mapped).map_err(|err| map_err(err.to_string()))
}

/// The memfd that shared (or hugetlbfs) guest RAM lives in.
fn memfd(mem_size_mib: usize, huge_pages: HugePageConfig) -> Result<File, MemoryError> {
    let mut flags = MemFdCreateFlag::MFD_CLOEXEC;
    if huge_pages == HugePageConfig::Hugetlbfs2M {
        if !mem_size_mib.is_multiple_of(2) {
            return Err(MemoryError::HugePageMultiple(mem_size_mib));
        }
        flags |= MemFdCreateFlag::MFD_HUGETLB | MemFdCreateFlag::MFD_HUGE_2MB;
    }
    let fd = memfd_create(c"tessera-guest-ram", flags).map_err(MemoryError::Memfd)?;
    let file = File::from(fd);
    file.set_len((mem_size_mib as u64) << 20)
        .map_err(|source| MemoryError::Resize {
            size_mib: mem_size_mib,
            source,
        })?;
    Ok(file)
}

/// Maps `len` bytes of guest RAM, of `backing` (shared) or private and
/// anonymous, at a [`REGION_ALIGNMENT`]-aligned address: a reservation
/// `REGION_ALIGNMENT` larger is made, the region is mapped over its
/// aligned part, and the rest is unmapped. The region never unmaps itself.
/// What a region of guest RAM maps.
enum Backing {
    /// Private anonymous memory.
    Anonymous,
    /// A file the backends map too (the memfd).
    Shared(FileOffset),
    /// A snapshot's memory file, copy-on-write: pages are read from it
    /// when the guest first touches them, and the guest's writes stay in
    /// this process.
    CopyOnWrite(FileOffset),
}

fn map_region(
    len: usize,
    backing: Backing,
    huge_pages: HugePageConfig,
) -> Result<vm_memory::MmapRegion, String> {
    let length = NonZeroUsize::new(len).ok_or("an empty region")?;
    let reserved = len
        .checked_add(REGION_ALIGNMENT)
        .and_then(NonZeroUsize::new)
        .ok_or("a region too large to align")?;
    // SAFETY: a new inaccessible mapping where the kernel finds room;
    // nothing else in the process is touched.
    let base = unsafe {
        mmap_anonymous(
            None,
            reserved,
            ProtFlags::PROT_NONE,
            MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE,
        )
    }
    .map_err(|err| format!("cannot reserve address space: {err}"))?;
    let start = (base.as_ptr() as usize).next_multiple_of(REGION_ALIGNMENT);
    let at = NonZeroUsize::new(start);
    let prot = ProtFlags::PROT_READ | ProtFlags::PROT_WRITE;
    let (flags, file) = match backing {
        Backing::Shared(file) => (MapFlags::MAP_SHARED | MapFlags::MAP_NORESERVE, Some(file)),
        Backing::CopyOnWrite(file) => (MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE, Some(file)),
        Backing::Anonymous => (
            MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE | MapFlags::MAP_ANONYMOUS,
            None,
        ),
    };
    let fixed = flags | MapFlags::MAP_FIXED;
    let mapped = match &file {
        // SAFETY: [start, start + len) lies inside the reservation made
        // above, which nothing else uses: MAP_FIXED replaces only it.
        Some(file) => unsafe {
            mmap(
                at,
                length,
                prot,
                fixed,
                file.file().as_fd(),
                file.start() as i64,
            )
        },
        // SAFETY: as above.
        None => unsafe { mmap_anonymous(at, length, prot, fixed) },
    };
    let slack = [
        (base.as_ptr() as usize, start - base.as_ptr() as usize),
        (
            start + len,
            base.as_ptr() as usize + reserved.get() - (start + len),
        ),
    ];
    let unmap_slack = |ranges: &[(usize, usize)]| {
        for &(addr, size) in ranges {
            if let (Some(addr), true) = (NonNull::new(addr as *mut libc::c_void), size > 0) {
                // SAFETY: the range is part of the reservation above and
                // holds no guest RAM.
                let _ = unsafe { munmap(addr, size) };
            }
        }
    };
    let addr = match mapped {
        Ok(addr) => addr,
        Err(err) => {
            unmap_slack(&[(base.as_ptr() as usize, reserved.get())]);
            return Err(err.to_string());
        }
    };
    unmap_slack(&slack);
    let builder = MmapRegionBuilder::new(len)
        .with_mmap_prot(prot.bits())
        .with_mmap_flags(flags.bits())
        .with_hugetlbfs(huge_pages == HugePageConfig::Hugetlbfs2M);
    let builder = match file {
        Some(file) => builder.with_file_offset(file),
        None => builder,
    };
    // SAFETY: [addr, addr + len) is the mapping made above, which lives
    // as long as the process; the region does not own (unmap) it.
    unsafe { builder.with_raw_mmap_pointer(addr.as_ptr().cast()) }
        .build()
        .map_err(|err| err.to_string())
}

/// Why guest pages could not be given back.
#[derive(Debug, thiserror::Error)]
pub enum DiscardError {
    #[error("{len:#x} bytes at guest address {addr:#x} are not all in one region of guest memory")]
    OutsideMemory { addr: u64, len: u64 },
    #[error(
        "cannot punch {len:#x} bytes at offset {offset:#x} out of the guest memory file: {source}"
    )]
    Punch {
        offset: u64,
        len: u64,
        source: nix::Error,
    },
    #[error("cannot drop {len:#x} bytes of guest memory at {addr:#x}: {source}")]
    Drop {
        addr: u64,
        len: u64,
        source: nix::Error,
    },
}

/// Gives the host back the whole 4 KiB pages of `len` bytes of guest
/// memory at `addr` (the balloon's pages): a hole punched in shared
/// memory's file, so that no process that maps it keeps them (the
/// backends included); dropped pages of private memory (anonymous pages
/// read as zeros again, a snapshot's copy-on-write pages as the file).
pub fn discard_range(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    len: u64,
) -> Result<(), DiscardError> {
    const PAGE: u64 = 4096;
    let outside = || DiscardError::OutsideMemory { addr: addr.0, len };
    let start = addr.0.checked_next_multiple_of(PAGE).ok_or_else(outside)?;
    let end = addr.0.checked_add(len).ok_or_else(outside)? / PAGE * PAGE;
    if start >= end {
        return Ok(());
    }
    let region = mem.find_region(GuestAddress(start)).ok_or_else(outside)?;
    let offset = start - region.start_addr().0;
    let len = end - start;
    if offset + len > region.len() {
        return Err(outside());
    }
    match region.file_offset() {
        Some(file) if region.flags() & libc::MAP_SHARED != 0 => {
            let offset = file.start() + offset;
            nix::fcntl::fallocate(
                std::os::fd::AsRawFd::as_raw_fd(file.file()),
                nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                    | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                offset as i64,
                len as i64,
            )
            .map_err(|source| DiscardError::Punch {
                offset,
                len,
                source,
            })
        }
        _ => {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(offset))
                .map_err(|_| outside())?;
            let at = NonNull::new(host.cast::<libc::c_void>()).ok_or_else(outside)?;
            // SAFETY: [host, host + len) is inside one region of guest memory
            // (checked above), mapped for the process's life; MADV_DONTNEED
            // only drops the contents of pages the guest gave up.
            unsafe {
                nix::sys::mman::madvise(at, len as usize, nix::sys::mman::MmapAdvise::MADV_DONTNEED)
            }
            .map_err(|source| DiscardError::Drop {
                addr: start,
                len,
                source,
            })
        }
    }
}

/// Whether the host gives guest RAM transparent huge pages only when asked
/// (THP `madvise`, shmem `advise`). Under `always` the advice is left out:
/// it would only add the host's `defrag` policy for advised memory, whose
/// page faults then compact memory synchronously (slow on a fragmented
/// host) where unadvised ones fall back to small pages at once.
fn thp_needs_advice(sharing: Sharing) -> bool {
    let setting = match sharing {
        Sharing::Private => "/sys/kernel/mm/transparent_hugepage/enabled",
        Sharing::Shared => "/sys/kernel/mm/transparent_hugepage/shmem_enabled",
    };
    std::fs::read_to_string(setting)
        .map(|value| !value.contains("[always]") && !value.contains("[force]"))
        .unwrap_or(true)
}

/// Asks for transparent huge pages on every region; a host that refuses
/// (THP `never`) still runs the guest, on small pages.
fn advise_huge_pages(mem: &GuestMemoryMmap) {
    for region in mem.iter() {
        // SAFETY: the range is exactly one live mapping owned by `mem`;
        // MADV_HUGEPAGE changes only how the kernel backs it.
        let rc = unsafe {
            libc::madvise(
                region.as_ptr().cast(),
                region.len() as usize,
                libc::MADV_HUGEPAGE,
            )
        };
        if rc != 0 {
            log::warn!(
                "transparent huge pages refused for guest memory: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn discarded_pages_leave_the_file_and_read_as_zeros() {
        for sharing in [Sharing::Shared, Sharing::Private] {
            let mem = create_guest_memory(16, HugePageConfig::None, sharing).unwrap();
            mem.write_slice(&[0xaa; 64 << 10], GuestAddress(0x10000))
                .unwrap();
            let allocated = |mem: &GuestMemoryMmap| {
                mem.iter().next().and_then(|r| r.file_offset()).map(|f| {
                    std::os::unix::fs::MetadataExt::blocks(&f.file().metadata().unwrap()) * 512
                })
            };
            let before = allocated(&mem);
            // Only the whole pages of an unaligned range go.
            discard_range(&mem, GuestAddress(0x10800), 0x8000).unwrap();
            // Before any read: reading a hole of shared memory fills it.
            if let (Some(before), Some(after)) = (before, allocated(&mem)) {
                assert_eq!(before - after, 7 * 4096, "the file keeps the pages");
            }
            let mut page = [0u8; 4096];
            mem.read_slice(&mut page, GuestAddress(0x10000)).unwrap();
            assert_eq!(
                page, [0xaa; 4096],
                "{sharing:?}: a partial page was dropped"
            );
            mem.read_slice(&mut page, GuestAddress(0x11000)).unwrap();
            assert_eq!(page, [0; 4096], "{sharing:?}");
            mem.read_slice(&mut page, GuestAddress(0x17000)).unwrap();
            assert_eq!(page, [0; 4096], "{sharing:?}");
            mem.read_slice(&mut page, GuestAddress(0x18000)).unwrap();
            assert_eq!(
                page, [0xaa; 4096],
                "{sharing:?}: a partial page was dropped"
            );
            assert!(discard_range(&mem, GuestAddress(15 << 20), 2 << 20).is_err());
            assert!(discard_range(&mem, GuestAddress(u64::MAX - 10), 100).is_err());
        }
    }

    #[test]
    fn memory_above_the_hole_is_one_file() {
        let mem = create_guest_memory(3584, HugePageConfig::None, Sharing::Shared).unwrap();
        let regions: Vec<_> = mem
            .iter()
            .map(|r| (r.start_addr().0, r.len(), r.file_offset().unwrap().start()))
            .collect();
        assert_eq!(
            regions,
            vec![
                (0, layout::MMIO_MEM_START, 0),
                (
                    layout::FIRST_ADDR_PAST_32BITS,
                    (3584 << 20) - layout::MMIO_MEM_START,
                    layout::MMIO_MEM_START
                ),
            ]
        );
        mem.write_obj(0xabcdu64, GuestAddress(layout::FIRST_ADDR_PAST_32BITS))
            .unwrap();
        assert!(mem
            .write_obj(1u64, GuestAddress(layout::MMIO_MEM_START))
            .is_err());
    }

    #[test]
    fn every_region_starts_on_a_2_mib_host_address_and_takes_writes_at_both_ends() {
        for sharing in [Sharing::Private, Sharing::Shared] {
            let mem = create_guest_memory(3585, HugePageConfig::None, sharing).unwrap();
            for region in mem.iter() {
                assert_eq!(
                    region.as_ptr() as usize % REGION_ALIGNMENT,
                    0,
                    "{sharing:?}"
                );
                let last = region.start_addr().0 + region.len() - 8;
                for addr in [region.start_addr().0, last] {
                    mem.write_obj(addr, GuestAddress(addr)).unwrap();
                    assert_eq!(mem.read_obj::<u64>(GuestAddress(addr)).unwrap(), addr);
                }
            }
            assert_eq!(
                mem.iter().next().unwrap().file_offset().is_some(),
                sharing == Sharing::Shared
            );
        }
    }

    #[test]
    fn refuses_more_than_the_host_has() {
        let err = create_guest_memory(1 << 40, HugePageConfig::None, Sharing::Shared).unwrap_err();
        assert!(matches!(err, MemoryError::MoreThanHost { .. }), "{err}");
    }
}
