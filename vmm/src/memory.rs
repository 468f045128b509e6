//! Guest RAM: backed by a memfd when vhost-user backends must map it,
//! private anonymous memory otherwise (as Firecracker), and in both cases
//! advised for transparent huge pages: guest RAM on 4 KiB pages costs a
//! nested page fault per 4 KiB the guest touches. Private memory gets them
//! whenever the host's THP setting is `always` or `madvise`; shared memory
//! only where `/sys/kernel/mm/transparent_hugepage/shmem_enabled` allows
//! (`advise` or `always`), or with `huge_pages: "2M"` (hugetlbfs).

use std::fs::File;

use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

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
    if sharing == Sharing::Private && huge_pages != HugePageConfig::Hugetlbfs2M {
        let ranges: Vec<(GuestAddress, usize)> = layout::ram_regions(size)
            .into_iter()
            .map(|(addr, len)| (GuestAddress(addr), len as usize))
            .collect();
        let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|err| map_err(err.to_string()))?;
        advise_huge_pages(&mem);
        return Ok(mem);
    }
    let mut flags = MemFdCreateFlag::MFD_CLOEXEC;
    if huge_pages == HugePageConfig::Hugetlbfs2M {
        if !mem_size_mib.is_multiple_of(2) {
            return Err(MemoryError::HugePageMultiple(mem_size_mib));
        }
        flags |= MemFdCreateFlag::MFD_HUGETLB | MemFdCreateFlag::MFD_HUGE_2MB;
    }
    let fd = memfd_create(c"tessera-guest-ram", flags).map_err(MemoryError::Memfd)?;
    let file = File::from(fd);
    file.set_len(size).map_err(|source| MemoryError::Resize {
        size_mib: mem_size_mib,
        source,
    })?;

    let mut file_offset = 0;
    let ranges = layout::ram_regions(size)
        .into_iter()
        .map(|(addr, len)| {
            let region = (
                GuestAddress(addr),
                len as usize,
                Some(FileOffset::new(file.try_clone()?, file_offset)),
            );
            file_offset += len;
            Ok(region)
        })
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|err| map_err(err.to_string()))?;
    let mem =
        GuestMemoryMmap::from_ranges_with_files(ranges).map_err(|err| map_err(err.to_string()))?;
    if huge_pages != HugePageConfig::Hugetlbfs2M {
        advise_huge_pages(&mem);
    }
    Ok(mem)
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
    fn refuses_more_than_the_host_has() {
        let err = create_guest_memory(1 << 40, HugePageConfig::None, Sharing::Shared).unwrap_err();
        assert!(matches!(err, MemoryError::MoreThanHost { .. }), "{err}");
    }
}
