//! A loaded snapshot's guest memory filled on demand where backends share
//! it (a memfd): nothing is copied up front. The VMM's mapping of guest
//! memory is registered with a userfaultfd, and so is each backend's
//! (vhost-user postcopy, see `devices::vhost_user::PageFaultServer`); one
//! thread serves both kinds of faults, copying each page in from the
//! memory file (`UFFDIO_COPY`). A page copied in through any mapping is in
//! the memfd, so every other mapping finds it there without a fault.
//!
//! The thread serves until the microVM ends; the memory file stays mapped
//! (read-only) meanwhile, as it does for a copy-on-write load.

use std::collections::HashMap;
use std::fs::File;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use devices::vhost_user::{BackendRegion, DeviceName, PageFaultServer};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tessera_uffd::{Event, Uffd, UffdError};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

const PAGE: u64 = 4096;
/// Pages copied in per `UFFDIO_COPY` when all of memory is filled at once.
const FILL_CHUNK: u64 = 2 << 20;

/// Errors setting up memory filled on demand.
#[derive(Debug, thiserror::Error)]
pub enum LazyMemoryError {
    #[error("{0}")]
    Uffd(#[from] UffdError),
    #[error("cannot map the memory file: {0}")]
    Map(nix::Error),
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot start the page-fault thread: {0}")]
    Thread(std::io::Error),
    #[error("guest memory region at {0:#x} has no host address")]
    HostAddress(u64),
    #[error("the seccomp filters have no page_faults kind for the thread that would fill it")]
    NoFilter,
}

/// One region as an address space maps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mapped {
    /// Where it is mapped in that address space.
    at: u64,
    len: u64,
    guest: u64,
    /// Where its pages are in the memory file.
    file_offset: u64,
}

/// One address space's view of guest memory.
#[derive(Debug, Clone, Default)]
struct Space {
    regions: Vec<Mapped>,
}

impl Space {
    /// The page holding `addr` and its offset in the memory file.
    fn locate(&self, addr: u64) -> Option<(u64, u64)> {
        self.regions.iter().find_map(|r| {
            let within = addr.checked_sub(r.at).filter(|&o| o < r.len)?;
            let page = within & !(PAGE - 1);
            Some((r.at + page, r.file_offset + page))
        })
    }
}

/// The memory file, mapped read-only for the microVM's life.
struct Source {
    ptr: NonNull<u8>,
    len: u64,
}

// SAFETY: a read-only mapping, unmapped only on drop, read by any thread.
unsafe impl Send for Source {}
// SAFETY: as above.
unsafe impl Sync for Source {}

impl Drop for Source {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map_source`, which nothing uses
        // once the page-fault thread has ended (its owner joins it first).
        let _ = unsafe { nix::sys::mman::munmap(self.ptr.cast(), self.len as usize) };
    }
}

/// A backend's userfaultfd and mappings.
struct BackendFaults {
    uffd: Arc<Uffd>,
    space: Space,
}

/// What the page-fault thread and the devices share.
struct Shared {
    source: Source,
    vmm: Uffd,
    vmm_space: Space,
    /// Per device, its backend's faults (replaced whole, so that the
    /// thread polls without holding the lock).
    backends: Mutex<HashMap<String, Arc<BackendFaults>>>,
    /// Wakes the thread: a backend was added, or it must end.
    wake: EventFd,
    stop: std::sync::atomic::AtomicBool,
}

/// Guest memory filled on demand from a snapshot's memory file.
pub struct LazyMemory {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl LazyMemory {
    /// Registers the VMM's mapping of `mem` (empty, shared) for faults,
    /// and starts the thread that fills it from `file`, the regions one
    /// after another in it. The thread confines itself with `seccomp`'s
    /// "page_faults" filter.
    pub fn start(
        mem: &GuestMemoryMmap,
        file: &File,
        seccomp: Arc<tessera_seccomp::Filters>,
    ) -> Result<Self, LazyMemoryError> {
        // A custom filter file may lack the kind: then no thread is
        // started that would die or hang, and the load copies in whole.
        if !seccomp.is_disabled() && seccomp.stack("page_faults").is_err() {
            return Err(LazyMemoryError::NoFilter);
        }
        let vmm = Uffd::new()?;
        let mut vmm_space = Space::default();
        let mut offset = 0;
        for region in mem.iter() {
            let host = mem
                .get_host_address(region.start_addr())
                .map_err(|_| LazyMemoryError::HostAddress(region.start_addr().0))?
                as u64;
            vmm.register(host, region.len())?;
            vmm_space.regions.push(Mapped {
                at: host,
                len: region.len(),
                guest: region.start_addr().0,
                file_offset: offset,
            });
            offset += region.len();
        }
        let shared = Arc::new(Shared {
            source: map_source(file, offset)?,
            vmm,
            vmm_space,
            backends: Mutex::default(),
            wake: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                .map_err(LazyMemoryError::EventFd)?,
            stop: std::sync::atomic::AtomicBool::new(false),
        });
        let serving = shared.clone();
        let thread = std::thread::Builder::new()
            .name("page_faults".into())
            .spawn(move || {
                if let Err(err) = seccomp.apply("page_faults") {
                    log::error!("the page-fault thread cannot confine itself: {err}");
                    return;
                }
                serve(&serving);
            })
            .map_err(LazyMemoryError::Thread)?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// The devices' handle on it.
    pub fn server(&self) -> Arc<dyn PageFaultServer> {
        Arc::new(Server(self.shared.clone()))
    }
}

impl Drop for LazyMemory {
    fn drop(&mut self) {
        self.shared
            .stop
            .store(true, std::sync::atomic::Ordering::Release);
        let _ = self.shared.wake.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn map_source(file: &File, len: u64) -> Result<Source, LazyMemoryError> {
    let length = NonZeroUsize::new(len as usize).ok_or(LazyMemoryError::Map(nix::Error::EINVAL))?;
    // SAFETY: a new read-only private mapping of the memory file, which
    // the load checked holds `len` bytes; `Source` unmaps it.
    let ptr = unsafe {
        nix::sys::mman::mmap(
            None,
            length,
            nix::sys::mman::ProtFlags::PROT_READ,
            nix::sys::mman::MapFlags::MAP_PRIVATE | nix::sys::mman::MapFlags::MAP_NORESERVE,
            file.as_fd(),
            0,
        )
    }
    .map_err(LazyMemoryError::Map)?;
    Ok(Source {
        ptr: ptr.cast(),
        len,
    })
}

/// Copies the page of `space` holding `addr` in through `uffd`. Whoever
/// copied it first, the threads waiting on it are woken.
fn fill(shared: &Shared, uffd: &Uffd, space: &Space, addr: u64) -> std::io::Result<()> {
    let (page, offset) = space.locate(addr).ok_or_else(|| {
        std::io::Error::other(format!("a fault at {addr:#x}, outside guest memory"))
    })?;
    if offset + PAGE > shared.source.len {
        return Err(std::io::Error::other(format!(
            "offset {offset:#x} is past the memory file"
        )));
    }
    // SAFETY: `offset + PAGE` lies inside the read-only source mapping,
    // which outlives this thread.
    let src = unsafe { shared.source.ptr.as_ptr().add(offset as usize) };
    // SAFETY: `src` is readable for PAGE bytes (above).
    unsafe { uffd.copy(page, src, PAGE) }.map(drop)
}

/// The page-fault thread: serves the VMM's faults and every backend's
/// until told to stop.
fn serve(shared: &Shared) {
    // Faults whose copy met a mapping change (EAGAIN): tried again after
    // the events that follow it, per address space (None: the VMM's).
    let mut retry: HashMap<Option<String>, Vec<u64>> = HashMap::new();
    loop {
        let backends: Vec<(String, Arc<BackendFaults>)> = shared
            .backends
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, b)| (id.clone(), b.clone()))
            .collect();
        // SAFETY: the eventfd lives in `shared`, which outlives `fds`.
        let wake = unsafe { BorrowedFd::borrow_raw(shared.wake.as_raw_fd()) };
        let mut fds: Vec<PollFd<'_>> = vec![
            PollFd::new(wake, PollFlags::POLLIN),
            PollFd::new(shared.vmm.as_fd(), PollFlags::POLLIN),
        ];
        fds.extend(
            backends
                .iter()
                .map(|(_, b)| PollFd::new(b.uffd.as_fd(), PollFlags::POLLIN)),
        );
        let timeout = if retry.is_empty() {
            PollTimeout::NONE
        } else {
            PollTimeout::from(1u8)
        };
        if poll(&mut fds, timeout).is_err() {
            continue;
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|fd| fd.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        if ready[0] {
            let _ = shared.wake.read();
            if shared.stop.load(std::sync::atomic::Ordering::Acquire) {
                return;
            }
        }
        let mut again = HashMap::new();
        let vmm_retry = retry.remove(&None).unwrap_or_default();
        if ready[1] || !vmm_retry.is_empty() {
            let mut pending = Vec::new();
            serve_faults(
                shared,
                &shared.vmm,
                &shared.vmm_space,
                "the VMM",
                vmm_retry,
                &mut pending,
            );
            if !pending.is_empty() {
                again.insert(None, pending);
            }
        }
        for ((id, backend), ready) in backends.iter().zip(&ready[2..]) {
            let earlier = retry.remove(&Some(id.clone())).unwrap_or_default();
            if !ready && earlier.is_empty() {
                continue;
            }
            let mut pending = Vec::new();
            if serve_faults(
                shared,
                &backend.uffd,
                &backend.space,
                id,
                earlier,
                &mut pending,
            ) {
                if !pending.is_empty() {
                    again.insert(Some(id.clone()), pending);
                }
            } else {
                // Its backend is gone: so are its faults.
                let mut all = shared.backends.lock().unwrap_or_else(|p| p.into_inner());
                if all.get(id).is_some_and(|b| Arc::ptr_eq(b, backend)) {
                    all.remove(id);
                }
            }
        }
        retry = again;
    }
}

/// Fills the pages of `earlier` faults, then of every fault waiting on
/// `uffd`; a copy that meets a mapping change goes to `pending`. False once
/// the userfaultfd is unusable.
fn serve_faults(
    shared: &Shared,
    uffd: &Uffd,
    space: &Space,
    whose: &str,
    earlier: Vec<u64>,
    pending: &mut Vec<u64>,
) -> bool {
    let mut serve_one = |addr: u64| match fill(shared, uffd, space, addr) {
        Ok(()) => true,
        Err(err) if err.raw_os_error() == Some(libc::EAGAIN) => {
            pending.push(addr);
            true
        }
        Err(err) => {
            log::error!("cannot fill {whose}'s page at {addr:#x}: {err}");
            err.raw_os_error() != Some(libc::ESRCH)
        }
    };
    for addr in earlier {
        if !serve_one(addr) {
            return false;
        }
    }
    loop {
        match uffd.read_event() {
            Ok(None) => return true,
            Ok(Some(Event::PageFault { addr })) => {
                if !serve_one(addr) {
                    return false;
                }
            }
            Ok(Some(_)) => {}
            Err(err) => {
                log::warn!("{whose}'s page faults: {err}");
                return false;
            }
        }
    }
}

/// The devices' handle on the shared state.
struct Server(Arc<Shared>);

impl Server {
    /// A backend's view: its mappings, with each region's place in the
    /// memory file (by guest address).
    fn space(&self, regions: &[BackendRegion]) -> Space {
        Space {
            regions: regions
                .iter()
                .filter_map(|r| {
                    let vmm = self
                        .0
                        .vmm_space
                        .regions
                        .iter()
                        .find(|m| m.guest == r.guest_addr)?;
                    Some(Mapped {
                        at: r.backend_addr,
                        len: r.len.min(vmm.len),
                        guest: r.guest_addr,
                        file_offset: vmm.file_offset,
                    })
                })
                .collect(),
        }
    }
}

impl PageFaultServer for Server {
    fn serve_backend(&self, device: &DeviceName, uffd: File, regions: Vec<BackendRegion>) {
        // The thread must never block on one backend's descriptor.
        if let Err(err) = nix::fcntl::fcntl(
            uffd.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        ) {
            log::warn!("{device}: its userfaultfd stays blocking: {err}");
        }
        let faults = BackendFaults {
            uffd: Arc::new(Uffd::from_fd(OwnedFd::from(uffd))),
            space: self.space(&regions),
        };
        self.0
            .backends
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(device.to_string(), Arc::new(faults));
        let _ = self.0.wake.write(1);
    }

    fn update_backend(&self, device: &DeviceName, regions: Vec<BackendRegion>) {
        let space = self.space(&regions);
        let mut backends = self.0.backends.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(backend) = backends.get_mut(&device.to_string()) {
            *backend = Arc::new(BackendFaults {
                uffd: backend.uffd.clone(),
                space,
            });
        }
        drop(backends);
        let _ = self.0.wake.write(1);
    }

    fn fill_all(&self) -> std::io::Result<()> {
        let shared = &self.0;
        for &Mapped {
            at: base,
            len,
            file_offset: offset,
            ..
        } in &shared.vmm_space.regions
        {
            let mut at = 0;
            while at < len {
                let chunk = FILL_CHUNK.min(len - at);
                // SAFETY: `offset + at + chunk` lies inside the source
                // mapping (the regions are the file's, one after another).
                let src = unsafe { shared.source.ptr.as_ptr().add((offset + at) as usize) };
                // SAFETY: `src` is readable for `chunk` bytes.
                let whole = unsafe { shared.vmm.copy(base + at, src, chunk) };
                if !matches!(whole, Ok(true)) {
                    // Some of it is in already: page by page.
                    for page in (0..chunk).step_by(PAGE as usize) {
                        fill(shared, &shared.vmm, &shared.vmm_space, base + at + page)?;
                    }
                }
                at += chunk;
            }
        }
        Ok(())
    }
}

impl AsRawFd for LazyMemory {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.shared.vmm.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fault_is_located_in_its_region_and_the_file() {
        let mapped = |at, len, guest, file_offset| Mapped {
            at,
            len,
            guest,
            file_offset,
        };
        let space = Space {
            regions: vec![
                mapped(0x1000_0000, 0x20_0000, 0, 0),
                mapped(0x4000_0000, 0x10_0000, 0x1_0000_0000, 0x20_0000),
            ],
        };
        assert_eq!(space.locate(0x1000_0fff), Some((0x1000_0000, 0)));
        assert_eq!(space.locate(0x4000_1234), Some((0x4000_1000, 0x20_1000)));
        assert_eq!(space.locate(0x4010_0000), None);
        assert_eq!(space.locate(0), None);
    }
}
