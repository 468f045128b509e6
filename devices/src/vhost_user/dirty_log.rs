//! The dirty log the VMM shares with every backend (vhost-user
//! `LOG_SHMFD` and `VHOST_F_LOG_ALL`): one bit per 4 KiB page of
//! guest-physical memory, which a backend sets for every page it writes
//! (a block read into the guest, a received frame, a used-ring entry) and
//! the VMM reads and clears when it writes a Diff snapshot. KVM's own
//! dirty log cannot see those writes: they do not come from a vCPU.
//!
//! The bit layout is vhost-user's: bit `p % 8` of byte `p / 8` stands for
//! the page at guest-physical address `p * 4096`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use vhost::VhostUserDirtyLogRegion;
use vm_memory::{FileOffset, GuestAddress, MmapRegion};

use crate::virtio::QueueLayout;

/// The page one bit stands for (vhost-user's `VHOST_LOG_PAGE`).
const VHOST_LOG_PAGE: u64 = 0x1000;
/// Guest pages per bitmap word.
const PAGES_PER_WORD: u64 = u64::BITS as u64;

/// Errors creating the log.
#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    #[error("cannot create the dirty log's memfd of {len} bytes: {source}")]
    Memfd { len: u64, source: std::io::Error },
    #[error("cannot map the dirty log of {len} bytes: {source}")]
    Map {
        len: u64,
        source: vm_memory::mmap::MmapRegionError,
    },
}

/// A dirty bitmap over guest-physical memory, in a memfd the backends map.
#[derive(Debug)]
pub struct DirtyLog {
    file: File,
    map: MmapRegion,
    words: usize,
}

impl DirtyLog {
    /// A clean log covering guest-physical addresses below `mem_end`.
    pub fn new(mem_end: u64) -> Result<Self, DirtyLogError> {
        let words = mem_end.div_ceil(VHOST_LOG_PAGE).div_ceil(PAGES_PER_WORD);
        let len = (words * 8).next_multiple_of(4096).max(4096);
        let file = memfd(len).map_err(|source| DirtyLogError::Memfd { len, source })?;
        let handle = file
            .try_clone()
            .map_err(|source| DirtyLogError::Memfd { len, source })?;
        let map = MmapRegion::from_file(FileOffset::new(handle, 0), len as usize)
            .map_err(|source| DirtyLogError::Map { len, source })?;
        Ok(Self {
            file,
            map,
            words: words as usize,
        })
    }

    /// What SET_LOG_BASE hands a backend.
    pub fn region(&self) -> VhostUserDirtyLogRegion {
        VhostUserDirtyLogRegion {
            mmap_size: self.map.size() as u64,
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }

    fn words(&self) -> &[AtomicU64] {
        // A backend ORs bytes into the log while this side swaps words:
        // every access is atomic, and a u64 reads the same bits either way.
        // SAFETY: the page-aligned mapping of `words * 8` bytes or more
        // lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().cast::<AtomicU64>(), self.words) }
    }

    /// Marks the pages of `[addr, addr + len)`, for writes the VMM itself
    /// makes into guest memory.
    pub fn mark(&self, addr: GuestAddress, len: usize) {
        if len == 0 {
            return;
        }
        let first = addr.0 / VHOST_LOG_PAGE;
        let last = addr.0.saturating_add(len as u64 - 1) / VHOST_LOG_PAGE;
        let words = self.words();
        for page in first..=last {
            let Some(word) = words.get((page / PAGES_PER_WORD) as usize) else {
                return;
            };
            word.fetch_or(1 << (page % PAGES_PER_WORD), Ordering::Relaxed);
        }
    }

    /// Marks the used ring of `layout` (its entries, index and avail
    /// event), which the VMM wrote.
    pub fn mark_used_ring(&self, layout: &QueueLayout) {
        self.mark(layout.used_ring, used_ring_len(layout.size));
    }

    /// Whether the page at guest-physical `addr` is marked.
    pub fn is_marked(&self, addr: GuestAddress) -> bool {
        let page = addr.0 / VHOST_LOG_PAGE;
        self.words()
            .get((page / PAGES_PER_WORD) as usize)
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (page % PAGES_PER_WORD)) != 0)
    }

    /// Reads and clears the log: bit `p % 64` of word `p / 64` stands for
    /// guest page `p`.
    pub fn take(&self) -> Vec<u64> {
        self.words()
            .iter()
            .map(|w| w.swap(0, Ordering::AcqRel))
            .collect()
    }
}

/// A split used ring's bytes: flags, index, the entries, the avail event.
pub fn used_ring_len(size: u16) -> usize {
    6 + 8 * usize::from(size)
}

fn memfd(len: u64) -> std::io::Result<File> {
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    let fd = memfd_create(c"tessera-dirty-log", MemFdCreateFlag::MFD_CLOEXEC)?;
    let file = File::from(fd);
    file.set_len(len)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_every_page_a_range_touches_and_take_clears_them() {
        let log = DirtyLog::new(64 << 20).unwrap();
        log.mark(GuestAddress(0x1fff), 2);
        log.mark(GuestAddress(0x40_0000), 1);
        assert!(log.is_marked(GuestAddress(0x1000)));
        assert!(log.is_marked(GuestAddress(0x2000)));
        assert!(!log.is_marked(GuestAddress(0x3000)));
        let words = log.take();
        assert_eq!(words[0], 0b110);
        assert_eq!(words[0x400 / 64], 1);
        assert!(log.take().iter().all(|&w| w == 0));
    }

    #[test]
    fn a_range_past_the_end_is_ignored_not_a_panic() {
        let log = DirtyLog::new(1 << 20).unwrap();
        log.mark(GuestAddress(u64::MAX - 10), 100);
        log.mark(GuestAddress(0xff000), 0x10000);
        assert!(log.is_marked(GuestAddress(0xff000)));
    }

    #[test]
    fn a_backend_mapping_sees_the_same_bits() {
        let log = DirtyLog::new(1 << 20).unwrap();
        let region = log.region();
        // SAFETY: dup of a live fd we own.
        let fd = unsafe { libc::dup(region.mmap_handle) };
        assert!(fd >= 0);
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let map = MmapRegion::<()>::from_file(FileOffset::new(file, 0), 4096).unwrap();
        // SAFETY: the mapping is 4096 bytes; byte 0 is in it.
        unsafe { *map.as_ptr() |= 1 << 3 };
        assert!(log.is_marked(GuestAddress(3 * 4096)));
    }
}
