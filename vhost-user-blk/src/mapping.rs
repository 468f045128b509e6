//! Transfers copied through a shared mapping of an image in memory, with
//! no system call. On tmpfs every transfer is a copy, and a 4 KiB `preadv`
//! costs 1 to 3 µs on a virtualised host: at queue depth 1 that is longer
//! than the frontend's CPU takes to fall asleep waiting for the answer, so
//! every request pays a wake-up. A copy out of the mapping answers first.
//!
//! A mapping turns what a system call reports as an error into SIGBUS: the
//! file truncated by another process, tmpfs out of space or out of swap.
//! The process's SIGBUS handler replaces the faulting page with an
//! anonymous one, so that the copy finishes, and switches the mapping off
//! for good; every transfer that may have overlapped the fault is redone
//! with a system call, which reports what went wrong. (One case raises no
//! SIGBUS: after a truncation to a size that is not a whole number of
//! pages, the rest of the new last page stays mapped, so until a transfer
//! reaches the next page, reads there return zeroes and writes there are
//! not kept, where `pwritev` would have grown the file again.)
//! hugetlbfs is not mapped: its pages cannot be replaced one base page at a
//! time, and it reports no holes.
//!
//! A read fault on a hole in a tmpfs file allocates a page where `preadv`
//! returns zeroes, so only images with no holes are mapped, and a DISCARD
//! that punches one switches the mapping off first.
//!
//! A page's first write through the mapping is a page fault (write faults
//! map one page at a time), as long as a 4 KiB request itself at queue
//! depth 1: a fresh backend would pay one per page it writes. So a thread
//! at idle priority maps the whole image ahead of the guest
//! ([`ImageMap::prefault`]), a chunk at a time, until the mapping is off.

use std::os::fd::{AsFd, AsRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use vm_memory::VolatileSlice;

/// How many mappings the SIGBUS handler can tell apart: a backend process
/// maps its one disk; tests open several at once.
const WINDOWS: usize = 64;

/// A mapped range the SIGBUS handler recovers faults in.
struct Window {
    start: AtomicUsize,
    end: AtomicUsize,
    faulted: AtomicBool,
}

// A const item, only to repeat it in the array below.
#[allow(clippy::declare_interior_mutable_const)]
const FREE: Window = Window {
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    faulted: AtomicBool::new(false),
};

static WINDOW_TABLE: [Window; WINDOWS] = [FREE; WINDOWS];

/// The SIGBUS disposition before ours, for faults outside every window.
static PREVIOUS: OnceLock<SigAction> = OnceLock::new();

/// The host's page size, read before the handler is installed.
static PAGE_SIZE: AtomicUsize = AtomicUsize::new(4096);

/// How much of the image [`ImageMap::prefault`] maps at a time: a DISCARD
/// waits for at most one chunk (about 90 µs of CPU), small because the
/// thread doing it runs at idle priority, so a CPU busy with other threads
/// lets it finish only in the gaps.
const PREFAULT_CHUNK: usize = 512 << 10;

/// What a transfer through the mapping came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copied {
    /// Done: the data moved.
    Done,
    /// Not tried: the mapping is off, or the range or direction is not
    /// one it serves.
    Declined,
    /// Untrusted: a SIGBUS was taken in the mapping meanwhile, which is
    /// off from now on.
    Faulted,
}

/// A shared mapping of a whole image, readable, and writable unless the
/// disk is read-only.
#[derive(Debug)]
pub struct ImageMap {
    base: NonNull<u8>,
    len: usize,
    writable: bool,
    window: usize,
    /// Set when a DISCARD punches a hole.
    off: AtomicBool,
    /// Held while a chunk is prefaulted and while the mapping is switched
    /// off, so that no chunk is prefaulted after a hole is punched (that
    /// would allocate the hole's memory again).
    prefaulting: Mutex<()>,
    /// Whether a fault was logged (once).
    reported: AtomicBool,
}

// SAFETY: the mapping is shared memory owned by this value; every access to
// it is a volatile copy, and a concurrent change by a writer is the guest's
// own race, as with `preadv`.
unsafe impl Send for ImageMap {}
// SAFETY: as for Send: no access through `&ImageMap` assumes exclusivity.
unsafe impl Sync for ImageMap {}

impl ImageMap {
    /// Maps `len` bytes of `file`, or None (the disk then uses system
    /// calls) if it has holes, is empty, or cannot be mapped.
    pub fn new(file: &std::fs::File, len: u64, writable: bool) -> Option<Self> {
        let size = std::num::NonZeroUsize::new(usize::try_from(len).ok()?)?;
        if has_holes(file, len) {
            return None;
        }
        install_handler()?;
        let window = claim_window()?;
        let prot = if writable {
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE
        } else {
            ProtFlags::PROT_READ
        };
        // SAFETY: a new shared mapping of a file we hold, at an address the
        // kernel picks: no existing memory is affected.
        let mapped = unsafe { mmap(None, size, prot, MapFlags::MAP_SHARED, file.as_fd(), 0) };
        let Ok(base) = mapped else {
            release_window(window);
            return None;
        };
        let base = base.cast::<u8>();
        let slot = &WINDOW_TABLE[window];
        slot.start.store(base.as_ptr() as usize, Ordering::SeqCst);
        slot.end
            .store(base.as_ptr() as usize + size.get(), Ordering::SeqCst);
        Some(Self {
            base,
            len: size.get(),
            writable,
            window,
            off: AtomicBool::new(false),
            prefaulting: Mutex::new(()),
            reported: AtomicBool::new(false),
        })
    }

    /// Whether transfers may still go through the mapping.
    pub fn usable(&self) -> bool {
        !self.off.load(Ordering::SeqCst)
            && !WINDOW_TABLE[self.window].faulted.load(Ordering::SeqCst)
    }

    /// Stops every later transfer from using the mapping, and the prefault
    /// after the chunk it may be in.
    pub fn switch_off(&self) {
        let _chunk = self.prefaulting.lock().unwrap_or_else(|p| p.into_inner());
        self.off.store(true, Ordering::SeqCst);
    }

    /// Maps every page of the image into the page tables, writable unless
    /// the disk is read-only, as the guest's first touch of each would.
    /// Stops once the mapping is off, or at the first failure (a page the
    /// file lost: `MADV_POPULATE_*` then fails where an access would raise
    /// SIGBUS). Returns the bytes prefaulted.
    pub fn prefault(&self) -> usize {
        let advice = if self.writable {
            libc::MADV_POPULATE_WRITE
        } else {
            libc::MADV_POPULATE_READ
        };
        let mut done = 0;
        while done < self.len {
            let _chunk = self.prefaulting.lock().unwrap_or_else(|p| p.into_inner());
            if !self.usable() {
                break;
            }
            let len = PREFAULT_CHUNK.min(self.len - done);
            // SAFETY: the range is inside the mapping, which lives as long as
            // `self`; populating changes no byte of it.
            let rc = unsafe { libc::madvise(self.base.as_ptr().add(done).cast(), len, advice) };
            if rc != 0 {
                break;
            }
            done += len;
        }
        done
    }

    /// Copies between the image at `offset` and `iovecs`, reading the image
    /// unless `write`. Unless [`Copied::Done`], the caller does the
    /// transfer with a system call.
    ///
    /// # Safety
    /// Each iovec must be valid for reads (`write`) or writes of its length
    /// for the whole call.
    pub unsafe fn transfer(&self, iovecs: &[libc::iovec], offset: u64, write: bool) -> Copied {
        if !self.usable() || (write && !self.writable) {
            return Copied::Declined;
        }
        let total: usize = iovecs.iter().map(|iov| iov.iov_len).sum();
        let Some(start) = usize::try_from(offset)
            .ok()
            .filter(|start| start.checked_add(total).is_some_and(|end| end <= self.len))
        else {
            return Copied::Declined;
        };
        let mut at = start;
        for iov in iovecs {
            // SAFETY: `start..start + total` is inside the mapping (checked
            // above), which lives as long as `self`; a page lost under it is
            // replaced by the SIGBUS handler rather than left unmapped.
            let image = unsafe { VolatileSlice::new(self.base.as_ptr().add(at), iov.iov_len) };
            // SAFETY: the caller's guarantee.
            let guest = unsafe { VolatileSlice::new(iov.iov_base.cast(), iov.iov_len) };
            if write {
                guest.copy_to_volatile_slice(image);
            } else {
                image.copy_to_volatile_slice(guest);
            }
            at += iov.iov_len;
        }
        // The copy's accesses before the check, so that one that met a
        // replaced page finds the flag the handler set before replacing it:
        // loads need only keep their order (free on x86), a store must not
        // be overtaken by the load that follows it.
        fence(if write {
            Ordering::SeqCst
        } else {
            Ordering::Acquire
        });
        if WINDOW_TABLE[self.window].faulted.load(Ordering::SeqCst) {
            if !self.reported.swap(true, Ordering::Relaxed) {
                log::warn!(
                    "a page of the image was lost under its mapping (the file cut short \
                     or its file system full): served with system calls from now on"
                );
            }
            Copied::Faulted
        } else {
            Copied::Done
        }
    }
}

impl Drop for ImageMap {
    fn drop(&mut self) {
        // First, or a fault in whatever is mapped at these addresses next
        // would be taken for one of ours.
        release_window(self.window);
        // SAFETY: the mapping was made in `new` with this length and nothing
        // borrows from it past `self`.
        if let Err(err) = unsafe { munmap(self.base.cast(), self.len) } {
            log::warn!("cannot unmap the image: {err}");
        }
    }
}

/// Whether `file` has a hole in its first `len` bytes.
fn has_holes(file: &std::fs::File, len: u64) -> bool {
    let Ok(len) = libc::off_t::try_from(len) else {
        return true;
    };
    match nix::unistd::lseek(file.as_raw_fd(), 0, nix::unistd::Whence::SeekHole) {
        Ok(hole) => hole < len,
        Err(_) => true,
    }
}

fn claim_window() -> Option<usize> {
    WINDOW_TABLE.iter().position(|slot| {
        // A claimed window has a nonzero start; its end stays 0 until the
        // mapping exists, so the handler matches nothing in it before.
        let claimed = slot
            .start
            .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        if claimed {
            slot.faulted.store(false, Ordering::SeqCst);
        }
        claimed
    })
}

fn release_window(window: usize) {
    let slot = &WINDOW_TABLE[window];
    slot.end.store(0, Ordering::SeqCst);
    slot.start.store(0, Ordering::SeqCst);
}

/// Installs the SIGBUS handler once per process; None if that failed.
fn install_handler() -> Option<()> {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    let installed = *INSTALLED.get_or_init(|| {
        if let Ok(Some(size)) = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE) {
            PAGE_SIZE.store(size as usize, Ordering::Relaxed);
        }
        let ours = SigAction::new(
            SigHandler::SigAction(on_sigbus),
            SaFlags::SA_SIGINFO | SaFlags::SA_ONSTACK,
            SigSet::empty(),
        );
        // SAFETY: `on_sigbus` only does what is allowed in a signal
        // handler: atomic loads and stores, mmap and sigaction.
        match unsafe { sigaction(Signal::SIGBUS, &ours) } {
            Ok(previous) => {
                let _ = PREVIOUS.set(previous);
                true
            }
            Err(err) => {
                log::warn!("cannot handle SIGBUS ({err}); the image is not mapped");
                false
            }
        }
    });
    installed.then_some(())
}

/// The window holding `addr`. A window's end is set last and cleared
/// first, so a window being set up or released matches nothing; an end
/// read the same before and after its start was not released and claimed
/// again in between.
fn window_of(addr: usize) -> Option<&'static Window> {
    WINDOW_TABLE.iter().find(|slot| {
        let end = slot.end.load(Ordering::SeqCst);
        let start = slot.start.load(Ordering::SeqCst);
        end != 0 && slot.end.load(Ordering::SeqCst) == end && (start..end).contains(&addr)
    })
}

extern "C" fn on_sigbus(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    if let Some(window) = window_of(addr) {
        // Before the page changes: whoever reads the new page then sees it.
        window.faulted.store(true, Ordering::SeqCst);
        let page_size = PAGE_SIZE.load(Ordering::Relaxed);
        let page = addr & !(page_size - 1);
        // SAFETY: replaces one page inside our own mapping (the window
        // holds it) with zeroes, so the faulting copy can finish.
        let replaced = unsafe {
            libc::mmap(
                page as *mut libc::c_void,
                page_size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if replaced != libc::MAP_FAILED {
            return;
        }
    }
    match PREVIOUS.get().map(SigAction::handler) {
        Some(SigHandler::SigAction(previous)) => previous(signal, info, context),
        Some(SigHandler::Handler(previous)) => previous(signal),
        // The default action (or none known): restored, the fault repeats
        // when this returns, and ends the process as it would have.
        _ => {
            // SAFETY: sigaction is async-signal-safe.
            unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::Disk;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    const PAGE: usize = 4096;

    /// A two-page image of 7s on tmpfs, fully written.
    fn written_image() -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new_in("/dev/shm").unwrap();
        file.write_all(&[7u8; 2 * PAGE]).unwrap();
        file
    }

    fn iovec(buf: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }
    }

    #[test]
    fn only_an_image_in_memory_with_no_holes_is_mapped() {
        let written = written_image();
        let disk = Disk::open(written.path(), false, false).unwrap();
        assert!(
            disk.mapping().is_some(),
            "a written tmpfs image is not mapped"
        );
        let sparse = tempfile::NamedTempFile::new_in("/dev/shm").unwrap();
        sparse.as_file().set_len(2 * PAGE as u64).unwrap();
        let disk = Disk::open(sparse.path(), false, false).unwrap();
        assert!(disk.mapping().is_none(), "a sparse tmpfs image is mapped");
        let mut on_disk = tempfile::NamedTempFile::new_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        on_disk.write_all(&[7u8; 2 * PAGE]).unwrap();
        let disk = Disk::open(on_disk.path(), false, false).unwrap();
        assert!(!disk.in_memory(), "the source tree is on tmpfs");
        assert!(disk.mapping().is_none(), "an image on disk is mapped");
    }

    #[test]
    fn copies_through_the_mapping_are_the_file_s_bytes() {
        let image = written_image();
        let map = ImageMap::new(image.as_file(), 2 * PAGE as u64, true).unwrap();
        // A write across the pages' boundary, from two buffers.
        let (mut head, mut tail) = (vec![1u8; 100], vec![2u8; 300]);
        let iovecs = [iovec(&mut head), iovec(&mut tail)];
        // SAFETY: the buffers outlive the call.
        let copied = unsafe { map.transfer(&iovecs, PAGE as u64 - 100, true) };
        assert_eq!(copied, Copied::Done);
        let mut file = vec![0u8; 400];
        image
            .as_file()
            .read_exact_at(&mut file, PAGE as u64 - 100)
            .unwrap();
        assert_eq!(file[..100], [1u8; 100]);
        assert_eq!(file[100..], [2u8; 300]);
        // What another writer puts in the file is what a read returns.
        image.as_file().write_all_at(&[3u8; 512], 512).unwrap();
        let mut read = vec![0u8; 1024];
        // SAFETY: as above.
        let copied = unsafe { map.transfer(&[iovec(&mut read)], 0, false) };
        assert_eq!(copied, Copied::Done);
        assert_eq!(read[..512], [7u8; 512]);
        assert_eq!(read[512..], [3u8; 512]);
        // Past the end: refused, for a system call to report.
        // SAFETY: as above.
        let copied = unsafe { map.transfer(&[iovec(&mut read)], 2 * PAGE as u64 - 512, false) };
        assert_eq!(copied, Copied::Declined);
    }

    #[test]
    fn a_read_only_mapping_refuses_writes() {
        let image = written_image();
        let map = ImageMap::new(image.as_file(), 2 * PAGE as u64, false).unwrap();
        let mut data = vec![9u8; 512];
        // SAFETY: the buffer outlives the call.
        let copied = unsafe { map.transfer(&[iovec(&mut data)], 0, true) };
        assert_eq!(copied, Copied::Declined);
        assert_eq!(std::fs::read(image.path()).unwrap(), [7u8; 2 * PAGE]);
    }

    #[test]
    fn a_page_truncated_away_under_the_mapping_is_an_error_not_a_crash() {
        let image = written_image();
        let disk = Disk::open(image.path(), false, false).unwrap();
        let map = disk.mapping().unwrap();
        // Someone else shrinks the image to its first page.
        image.as_file().set_len(PAGE as u64).unwrap();
        let mut read = vec![0u8; 512];
        // SAFETY: the buffer outlives the call.
        let copied = unsafe { map.transfer(&[iovec(&mut read)], PAGE as u64, false) };
        assert_eq!(
            copied,
            Copied::Faulted,
            "a copy that took SIGBUS was trusted"
        );
        assert!(
            disk.mapping().is_none(),
            "the mapping stays on after SIGBUS"
        );
        // The request is redone with a system call, which reports the end.
        let io = crate::request::DataIo {
            write: false,
            offset: PAGE as u64,
            iovecs: vec![iovec(&mut read)],
            len: 512,
            durable: false,
        };
        assert!(crate::request::run_sync(&io, &disk).is_err());
    }

    /// The resident size of this process's mapping that starts at `base`
    /// (its pages in the page tables), from /proc/self/smaps.
    fn resident(base: NonNull<u8>) -> usize {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let start = format!("{:x}-", base.as_ptr() as usize);
        let mut lines = smaps.lines().skip_while(|line| !line.starts_with(&start));
        let rss = lines
            .find_map(|line| line.strip_prefix("Rss:"))
            .expect("the mapping is in smaps");
        let kib: usize = rss.trim().trim_end_matches("kB").trim().parse().unwrap();
        kib << 10
    }

    /// An image of `len` bytes of 7s on tmpfs.
    fn image_of(len: usize) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new_in("/dev/shm").unwrap();
        file.write_all(&vec![7u8; len]).unwrap();
        file
    }

    #[test]
    fn prefault_maps_every_page_and_changes_no_byte() {
        // Two chunks and a part of one.
        let len = 2 * PREFAULT_CHUNK + 3 * PAGE;
        for writable in [true, false] {
            let image = image_of(len);
            let map = ImageMap::new(image.as_file(), len as u64, writable).unwrap();
            assert_eq!(resident(map.base), 0, "a fresh mapping has pages mapped");
            assert_eq!(map.prefault(), len);
            assert_eq!(resident(map.base), len, "writable: {writable}");
            assert_eq!(std::fs::read(image.path()).unwrap(), vec![7u8; len]);
            if writable {
                // The guest's first write to each page takes no fault (the
                // first write also brings in the code it runs).
                let mut byte = [8u8];
                let write_at = |page: usize, byte: &mut [u8; 1]| {
                    // SAFETY: the buffer outlives the call.
                    let copied = unsafe { map.transfer(&[iovec(byte)], page as u64, true) };
                    assert_eq!(copied, Copied::Done);
                };
                write_at(0, &mut byte);
                let before = minor_faults();
                for page in (PAGE..len).step_by(PAGE) {
                    write_at(page, &mut byte);
                }
                assert_eq!(minor_faults(), before, "a write after the prefault faulted");
            }
        }
    }

    fn minor_faults() -> libc::c_long {
        use nix::sys::resource::{getrusage, UsageWho};
        getrusage(UsageWho::RUSAGE_THREAD)
            .unwrap()
            .minor_page_faults()
    }

    #[test]
    fn prefault_stops_once_the_mapping_is_off() {
        let image = image_of(2 * PREFAULT_CHUNK);
        let map = ImageMap::new(image.as_file(), 2 * PREFAULT_CHUNK as u64, true).unwrap();
        map.switch_off();
        assert_eq!(map.prefault(), 0);
        assert_eq!(resident(map.base), 0);
    }

    #[test]
    fn prefault_stops_at_a_page_the_file_lost() {
        let image = image_of(2 * PREFAULT_CHUNK);
        let map = ImageMap::new(image.as_file(), 2 * PREFAULT_CHUNK as u64, true).unwrap();
        // Someone else cuts the image to its first chunk: populating the
        // second fails (no SIGBUS), and the file keeps its new size.
        image.as_file().set_len(PREFAULT_CHUNK as u64).unwrap();
        assert_eq!(map.prefault(), PREFAULT_CHUNK);
        assert_eq!(
            image.as_file().metadata().unwrap().len(),
            PREFAULT_CHUNK as u64
        );
    }

    #[test]
    fn a_discard_switches_the_mapping_off() {
        let image = written_image();
        let disk = Disk::open(image.path(), false, false).unwrap();
        assert!(disk.mapping().is_some());
        disk.discard(0, PAGE as u64).unwrap();
        assert!(disk.mapping().is_none(), "a hole under a live mapping");
        let mut read = vec![1u8; PAGE];
        // SAFETY: the buffer outlives the call.
        unsafe { disk.read_to(read.as_mut_ptr(), PAGE, 0) }.unwrap();
        assert_eq!(read, [0u8; PAGE]);
    }

    /// Set in the child process of the test below.
    const SIGBUS_CHILD: &str = "TESSERA_TEST_FOREIGN_SIGBUS";

    #[test]
    fn a_sigbus_outside_every_image_still_ends_the_process() {
        if std::env::var_os(SIGBUS_CHILD).is_some() {
            let image = written_image();
            let _map = ImageMap::new(image.as_file(), 2 * PAGE as u64, true).unwrap();
            let other = written_image();
            // SAFETY: a new shared mapping of a file we hold.
            let ptr = unsafe {
                mmap(
                    None,
                    std::num::NonZeroUsize::new(PAGE).unwrap(),
                    ProtFlags::PROT_READ,
                    MapFlags::MAP_SHARED,
                    other.as_file().as_fd(),
                    0,
                )
            }
            .unwrap();
            other.as_file().set_len(0).unwrap();
            // SAFETY: the page is mapped; its file page is gone, which is
            // the point: this read must raise SIGBUS.
            let byte = unsafe { std::ptr::read_volatile(ptr.as_ptr().cast::<u8>()) };
            panic!("read {byte} from a truncated page");
        }
        use std::os::unix::process::ExitStatusExt;
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "mapping::tests::a_sigbus_outside_every_image_still_ends_the_process",
                "--exact",
                "--test-threads=1",
            ])
            .env(SIGBUS_CHILD, "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // A handler that swallowed the fault would retry it forever.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                child.kill().unwrap();
                panic!("the child still runs 30 s after its SIGBUS");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert_eq!(status.signal(), Some(libc::SIGBUS), "{status}");
    }
}
