//! One page of counters shared by the VMM and a backend process.

use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::mman::{mmap, mmap_anonymous, munmap, MapFlags, ProtFlags};
use nix::sys::stat::fstat;
use nix::unistd::ftruncate;

/// The page's size.
pub const PAGE_LEN: usize = 4096;
/// How many counters it holds.
pub const SLOTS: usize = PAGE_LEN / std::mem::size_of::<u64>();

/// Errors creating or mapping a page.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("cannot create the stats memfd: {0}")]
    Create(nix::Error),
    #[error("cannot size or seal the stats memfd: {0}")]
    Seal(nix::Error),
    #[error("the stats fd is not a memfd sealed against shrinking (seals {0:?})")]
    NotSealed(Option<SealFlag>),
    #[error("the stats fd holds {0} bytes, fewer than a page ({PAGE_LEN})")]
    TooSmall(i64),
    #[error("cannot map the stats page: {0}")]
    Map(nix::Error),
}

/// [`SLOTS`] counters in memory the VMM and one backend may share.
#[derive(Debug)]
pub struct StatsPage {
    base: NonNull<AtomicU64>,
    /// The memfd behind a shared page (the VMM keeps it for every backend
    /// it starts for the device).
    fd: Option<OwnedFd>,
}

// SAFETY: the page is only accessed through atomics.
unsafe impl Send for StatsPage {}
// SAFETY: as above.
unsafe impl Sync for StatsPage {}

impl StatsPage {
    /// A new page for a device's backends (the VMM's side): a memfd that
    /// can neither shrink nor grow, nor lose those seals.
    pub fn create() -> Result<Self, StatsError> {
        let fd = memfd_create(
            c"tessera-backend-stats",
            MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
        )
        .map_err(StatsError::Create)?;
        ftruncate(&fd, PAGE_LEN as i64).map_err(StatsError::Seal)?;
        let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
        fcntl(fd.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals)).map_err(StatsError::Seal)?;
        Self::map(fd)
    }

    /// Maps the page the VMM passed (the backend's side). A page that
    /// could shrink under the mapping is refused: touching it would fault.
    pub fn map_shared(fd: OwnedFd) -> Result<Self, StatsError> {
        Self::check_fd(fd.as_fd())?;
        Self::map(fd)
    }

    /// Checks that `fd` is a page a backend can map: a memfd at least
    /// [`PAGE_LEN`] long that can never shrink.
    pub fn check_fd(fd: BorrowedFd) -> Result<(), StatsError> {
        let seals = fcntl(fd.as_raw_fd(), FcntlArg::F_GET_SEALS)
            .ok()
            .map(SealFlag::from_bits_truncate);
        if !seals.is_some_and(|s| s.contains(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_SEAL)) {
            return Err(StatsError::NotSealed(seals));
        }
        let size = fstat(fd.as_raw_fd()).map_err(StatsError::Map)?.st_size;
        if size < PAGE_LEN as i64 {
            return Err(StatsError::TooSmall(size));
        }
        Ok(())
    }

    /// A page of private memory.
    pub fn private() -> Self {
        let len = NonZeroUsize::new(PAGE_LEN).expect("a page is not empty");
        // SAFETY: a new anonymous mapping overlaps nothing.
        let mapped = unsafe {
            mmap_anonymous(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE,
            )
        };
        // Without a page of memory the process has nothing else to do.
        let base = mapped.expect("cannot map one anonymous page");
        Self {
            base: base.cast(),
            fd: None,
        }
    }

    fn map(fd: OwnedFd) -> Result<Self, StatsError> {
        let len = NonZeroUsize::new(PAGE_LEN).expect("a page is not empty");
        // SAFETY: a new shared mapping of a file sealed at (or checked to
        // be at least) PAGE_LEN bytes overlaps nothing.
        let base = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd.as_fd(),
                0,
            )
        }
        .map_err(StatsError::Map)?;
        Ok(Self {
            base: base.cast(),
            fd: Some(fd),
        })
    }

    /// The memfd to hand a backend (none for a private page).
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(AsFd::as_fd)
    }

    /// Counter `index`.
    ///
    /// # Panics
    /// If `index` is [`SLOTS`] or more (every counter set fits).
    pub fn slot(&self, index: usize) -> &AtomicU64 {
        assert!(index < SLOTS, "stats slot {index} beyond {SLOTS}");
        // SAFETY: the mapping is PAGE_LEN bytes, page-aligned, lives as
        // long as `self`, and `index` is within it.
        unsafe { &*self.base.as_ptr().add(index) }
    }
}

impl Drop for StatsPage {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by this page and nothing borrows it
        // any more.
        let _ = unsafe { munmap(self.base.cast(), PAGE_LEN) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_that_could_shrink_is_refused() {
        let fd = memfd_create(c"unsealed", MemFdCreateFlag::MFD_CLOEXEC).unwrap();
        ftruncate(&fd, PAGE_LEN as i64).unwrap();
        let err = StatsPage::map_shared(fd).unwrap_err();
        assert!(matches!(err, StatsError::NotSealed(_)), "{err}");

        let file = tempfile_in_memory();
        assert!(matches!(
            StatsPage::map_shared(file),
            Err(StatsError::NotSealed(None))
        ));
    }

    #[test]
    fn a_sealed_page_can_be_neither_shrunk_nor_grown() {
        let page = StatsPage::create().unwrap();
        let fd = page.fd().unwrap();
        assert!(ftruncate(fd, 0).is_err());
        assert!(ftruncate(fd, 2 * PAGE_LEN as i64).is_err());
        let seals = fcntl(fd.as_raw_fd(), FcntlArg::F_GET_SEALS).unwrap();
        assert!(
            fcntl(
                fd.as_raw_fd(),
                FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_WRITE)
            )
            .is_err(),
            "{seals}"
        );
    }

    /// A plain file (no seals at all).
    fn tempfile_in_memory() -> OwnedFd {
        let path = std::env::temp_dir().join(format!("stats-page-{}", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        file.into()
    }
}
