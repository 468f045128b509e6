//! userfaultfd, as Tessera uses it: the VMM creates one and registers
//! guest memory with it (missing-page faults, Firecracker's `Uffd` memory
//! backend); a page-fault handler reads its events and resolves each fault
//! by copying a page in (`UFFDIO_COPY`) or mapping zeros.
//!
//! The ioctls and structures are the kernel's (`linux-raw-sys`); each call
//! is one `ioctl` on a descriptor this type owns.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use linux_raw_sys::general::{
    uffd_msg, uffdio_api, uffdio_copy, uffdio_range, uffdio_register, uffdio_zeropage,
    UFFDIO_REGISTER_MODE_MISSING, UFFD_API, UFFD_EVENT_PAGEFAULT, UFFD_EVENT_REMOVE,
    UFFD_EVENT_UNMAP, UFFD_FEATURE_EVENT_REMOVE,
};
use linux_raw_sys::ioctl::{
    UFFDIO_API, UFFDIO_COPY, UFFDIO_REGISTER, UFFDIO_WAKE, UFFDIO_ZEROPAGE,
};

/// Errors from a userfaultfd call, naming it.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("cannot create a userfaultfd: {0} (is vm.unprivileged_userfaultfd 0 and the process unprivileged?)")]
    Create(io::Error),
    #[error("UFFDIO_API: {0}")]
    Api(io::Error),
    #[error("the kernel's userfaultfd lacks the features {0:#x}")]
    Features(u64),
    #[error("UFFDIO_REGISTER of {len:#x} bytes at {addr:#x}: {source}")]
    Register {
        addr: u64,
        len: u64,
        source: io::Error,
    },
}

/// What [`Uffd::read_event`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A thread touched the missing page holding `addr`.
    PageFault { addr: u64 },
    /// `[start, end)` was given back (madvise DONTNEED, a balloon): its
    /// pages are missing again.
    Remove { start: u64, end: u64 },
    /// `[start, end)` was unmapped.
    Unmap { start: u64, end: u64 },
    /// An event this handler does not act on.
    Other(u8),
}

/// A userfaultfd.
#[derive(Debug)]
pub struct Uffd(OwnedFd);

impl Uffd {
    /// A new non-blocking, close-on-exec userfaultfd for missing-page
    /// faults from the kernel too (a vhost-user backend's or KVM's access
    /// to guest memory, not only user mode), with `UFFD_FEATURE_EVENT_REMOVE`
    /// as Firecracker requires of its page-fault handlers.
    pub fn new() -> Result<Self, UffdError> {
        use rustix::mm::UserfaultfdFlags;
        let flags = UserfaultfdFlags::CLOEXEC | UserfaultfdFlags::NONBLOCK;
        // SAFETY: userfaultfd only creates a descriptor, which `OwnedFd`
        // owns from here on.
        let fd =
            unsafe { rustix::mm::userfaultfd(flags) }.map_err(|e| UffdError::Create(e.into()))?;
        let uffd = Self(fd);
        let wanted = u64::from(UFFD_FEATURE_EVENT_REMOVE);
        let mut api = uffdio_api {
            api: u64::from(UFFD_API),
            features: wanted,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes one `uffdio_api`, which lives
        // for the call.
        uffd.ioctl(UFFDIO_API, &mut api).map_err(UffdError::Api)?;
        if api.features & wanted != wanted {
            return Err(UffdError::Features(wanted & !api.features));
        }
        Ok(uffd)
    }

    /// Takes over a userfaultfd another process set up (a handler's end
    /// of Firecracker's handshake).
    pub fn from_fd(fd: OwnedFd) -> Self {
        Self(fd)
    }

    /// Registers `[addr, addr + len)`, a mapping of this process, for
    /// missing-page faults.
    pub fn register(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        let mut register = uffdio_register {
            range: uffdio_range { start: addr, len },
            mode: u64::from(UFFDIO_REGISTER_MODE_MISSING),
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one `uffdio_register`;
        // it changes how faults in the range are served, not the memory.
        self.ioctl(UFFDIO_REGISTER, &mut register)
            .map_err(|source| UffdError::Register { addr, len, source })
    }

    /// The next event, if one is waiting.
    pub fn read_event(&self) -> io::Result<Option<Event>> {
        let mut msg = std::mem::MaybeUninit::<uffd_msg>::zeroed();
        let size = std::mem::size_of::<uffd_msg>();
        // SAFETY: reads at most `size` bytes into `msg`, which has them.
        let n = unsafe { libc::read(self.0.as_raw_fd(), msg.as_mut_ptr().cast(), size) };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock => Ok(None),
                _ => Err(err),
            };
        }
        if n as usize != size {
            return Err(io::Error::other(format!(
                "a userfaultfd message of {n} bytes"
            )));
        }
        // SAFETY: the kernel wrote a whole `uffd_msg`; every bit pattern
        // of its plain integer fields is valid.
        let msg = unsafe { msg.assume_init() };
        // SAFETY: the union member read is the one `event` names.
        Ok(Some(unsafe {
            match u32::from(msg.event) {
                UFFD_EVENT_PAGEFAULT => Event::PageFault {
                    addr: msg.arg.pagefault.address,
                },
                UFFD_EVENT_REMOVE => Event::Remove {
                    start: msg.arg.remove.start,
                    end: msg.arg.remove.end,
                },
                UFFD_EVENT_UNMAP => Event::Unmap {
                    start: msg.arg.remove.start,
                    end: msg.arg.remove.end,
                },
                _ => Event::Other(msg.event),
            }
        }))
    }

    /// Fills the missing page(s) `[dst, dst + len)` with the bytes at `src`
    /// and wakes the threads waiting on them. `Ok(false)` if another
    /// thread filled them first (EEXIST), which also wakes the waiters.
    ///
    /// # Safety
    /// `src` must be readable for `len` bytes.
    pub unsafe fn copy(&self, dst: u64, src: *const u8, len: u64) -> io::Result<bool> {
        let mut copy = uffdio_copy {
            dst,
            src: src as u64,
            len,
            mode: 0,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads `len` bytes at `src` (readable, the
        // caller says) and writes only the registered range it fills.
        match self.ioctl(UFFDIO_COPY, &mut copy) {
            Ok(()) => Ok(true),
            Err(err) if err.raw_os_error() == Some(libc::EEXIST) => {
                self.wake(dst, len)?;
                Ok(false)
            }
            Err(err) => Err(err),
        }
    }

    /// Maps zeros at the missing page(s) `[dst, dst + len)` and wakes the
    /// threads waiting on them.
    pub fn zeropage(&self, dst: u64, len: u64) -> io::Result<bool> {
        let mut zero = uffdio_zeropage {
            range: uffdio_range { start: dst, len },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE reads and writes one `uffdio_zeropage`
        // and maps zeros only where pages are missing.
        match self.ioctl(UFFDIO_ZEROPAGE, &mut zero) {
            Ok(()) => Ok(true),
            Err(err) if err.raw_os_error() == Some(libc::EEXIST) => {
                self.wake(dst, len)?;
                Ok(false)
            }
            Err(err) => Err(err),
        }
    }

    /// Wakes the threads waiting on `[start, start + len)`.
    pub fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let mut range = uffdio_range { start, len };
        // SAFETY: UFFDIO_WAKE reads one `uffdio_range`.
        self.ioctl(UFFDIO_WAKE, &mut range)
    }

    /// One ioctl whose argument is `*arg`. EAGAIN (the mappings changed
    /// under a copy) goes back to the caller, which serves the events
    /// first and tries again.
    fn ioctl<T>(&self, request: u32, arg: &mut T) -> io::Result<()> {
        // SAFETY: every request used here takes a pointer to the one
        // structure its caller passes, which outlives the call.
        let ret = unsafe {
            libc::ioctl(
                self.0.as_raw_fd(),
                request as libc::c_ulong,
                std::ptr::from_mut(arg),
            )
        };
        if ret == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroUsize;
    use std::os::fd::AsFd;

    const PAGE: usize = 4096;

    /// Two shared mappings of one memfd, as the VMM's and a backend's.
    fn two_mappings(len: usize) -> (std::fs::File, *mut u8, *mut u8) {
        let fd = rustix::fs::memfd_create("uffd-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let file = std::fs::File::from(fd);
        file.set_len(len as u64).unwrap();
        let map = || {
            // SAFETY: a new shared mapping of the memfd where the kernel
            // finds room; the test owns it until the process ends.
            unsafe {
                rustix::mm::mmap(
                    std::ptr::null_mut(),
                    NonZeroUsize::new(len).unwrap().get(),
                    rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                    rustix::mm::MapFlags::SHARED,
                    file.as_fd(),
                    0,
                )
            }
            .unwrap()
            .cast::<u8>()
        };
        let (a, b) = (map(), map());
        (file, a, b)
    }

    fn privileged() -> bool {
        match Uffd::new() {
            Ok(_) => true,
            Err(err) => {
                eprintln!("skipped: {err}");
                assert!(
                    std::env::var_os("TESSERA_STRICT").is_none(),
                    "TESSERA_STRICT: {err}"
                );
                false
            }
        }
    }

    #[test]
    fn a_page_copied_in_through_one_mapping_of_shared_memory_is_in_the_other() {
        if !privileged() {
            return;
        }
        let (_file, vmm, backend) = two_mappings(4 * PAGE);
        let (vmm_uffd, backend_uffd) = (Uffd::new().unwrap(), Uffd::new().unwrap());
        vmm_uffd.register(vmm as u64, 4 * PAGE as u64).unwrap();
        backend_uffd
            .register(backend as u64, 4 * PAGE as u64)
            .unwrap();
        let backend_addr = backend as u64 + PAGE as u64;
        let vmm_addr = vmm as u64 + 2 * PAGE as u64;
        // A "backend" thread touches page 1 and waits on its uffd; the
        // handler fills it through that uffd.
        let toucher = std::thread::spawn(move || {
            // SAFETY: page 1 of the mapping, readable once filled.
            unsafe { std::ptr::read_volatile(backend_addr as *const u8) }
        });
        let fault = loop {
            if let Some(event) = backend_uffd.read_event().unwrap() {
                break event;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        assert_eq!(fault, Event::PageFault { addr: backend_addr });
        let page = [0xabu8; PAGE];
        // SAFETY: `page` is readable for PAGE bytes.
        assert!(unsafe { backend_uffd.copy(backend_addr, page.as_ptr(), PAGE as u64) }.unwrap());
        assert_eq!(toucher.join().unwrap(), 0xab);
        // The page is in the memfd: the other mapping reads it without a
        // fault on its own uffd.
        // SAFETY: page 1 of the other mapping, now present.
        assert_eq!(unsafe { *vmm.add(PAGE) }, 0xab);
        assert_eq!(vmm_uffd.read_event().unwrap(), None);
        // Filling page 2 through the other one: the backend sees it, and a
        // second fill of the same page is EEXIST (Ok(false)), not an error.
        let page = [0xcdu8; PAGE];
        // SAFETY: as above.
        assert!(unsafe { vmm_uffd.copy(vmm_addr, page.as_ptr(), PAGE as u64) }.unwrap());
        // SAFETY: page 2 of the backend's mapping, now present.
        assert_eq!(unsafe { *backend.add(2 * PAGE) }, 0xcd);
        let again = backend as u64 + 2 * PAGE as u64;
        // SAFETY: as above.
        assert!(!unsafe { backend_uffd.copy(again, page.as_ptr(), PAGE as u64) }.unwrap());
    }
}
