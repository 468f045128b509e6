//! The backing file or block device and the I/O primitives on it: reads
//! into and writes from guest memory at a byte offset, flush, discard and
//! write-zeroes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::mapping::ImageMap;

/// The sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;

/// Errors opening the disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open {path}: {source}")]
    Open { path: String, source: io::Error },
    #[error("cannot find the size of {path}: {source}")]
    Size { path: String, source: io::Error },
}

/// An open disk image.
#[derive(Debug)]
pub struct Disk {
    file: File,
    sectors: u64,
    read_only: bool,
    direct: bool,
    /// Whether the file lives in memory (tmpfs, ramfs, hugetlbfs): its
    /// transfers never wait for a device.
    in_memory: bool,
    /// The image mapped, for copies without a system call: an image in
    /// memory with no holes, when mapping it worked.
    mapping: Option<Arc<ImageMap>>,
    /// Whether each write is durable before it completes (the guest's
    /// cache mode; write-back leaves that to FLUSH).
    write_through: AtomicBool,
}

impl Disk {
    /// Opens a raw image or block device.
    pub fn open(path: &Path, read_only: bool, direct: bool) -> Result<Self, DiskError> {
        let display = || path.display().to_string();
        let mut options = OpenOptions::new();
        options.read(true).write(!read_only);
        if direct {
            options.custom_flags(libc::O_DIRECT);
        }
        let file = options.open(path).map_err(|source| DiskError::Open {
            path: display(),
            source,
        })?;
        Self::from_file(file, &display(), read_only, direct)
    }

    /// Serves an inherited, already open disk (`--disk-fd`: the jailer's
    /// launcher hands it over, so the backend's jail holds no path to it).
    /// `O_DIRECT` is set on the open file with `direct`.
    pub fn from_fd(
        fd: std::os::fd::OwnedFd,
        read_only: bool,
        direct: bool,
    ) -> Result<Self, DiskError> {
        let name = format!("--disk-fd {}", fd.as_raw_fd());
        let file = File::from(fd);
        if direct {
            add_status_flags(&file, nix::fcntl::OFlag::O_DIRECT).map_err(|errno| {
                DiskError::Open {
                    path: name.clone(),
                    source: errno.into(),
                }
            })?;
        }
        Self::from_file(file, &name, read_only, direct)
    }

    fn from_file(file: File, name: &str, read_only: bool, direct: bool) -> Result<Self, DiskError> {
        let display = || name.to_string();
        let size = disk_size(&file).map_err(|source| DiskError::Size {
            path: display(),
            source,
        })?;
        if !size.is_multiple_of(SECTOR_SIZE) {
            // As Firecracker does: the guest sees the whole sectors.
            log::warn!(
                "{} is {size} bytes, not a multiple of {SECTOR_SIZE}; the last {} \
                 byte(s) are not visible to the guest",
                display(),
                size % SECTOR_SIZE
            );
        }
        // Reads then skip the access-time check and update (5% of a polled
        // 4 KiB page-cache read). Only the file's owner (or CAP_FOWNER) may
        // set it: a jailed backend serving another uid's image goes without.
        let _ = add_status_flags(&file, nix::fcntl::OFlag::O_NOATIME);
        let memory_fs = memory_file_system(&file);
        let in_memory = memory_fs.is_some();
        let mapping = (memory_fs.is_some_and(|fs| fs.mappable) && !direct)
            .then(|| ImageMap::new(&file, size, !read_only))
            .flatten()
            .map(Arc::new);
        Ok(Self {
            file,
            sectors: size / SECTOR_SIZE,
            read_only,
            direct,
            in_memory,
            mapping,
            write_through: AtomicBool::new(true),
        })
    }

    /// The file descriptor, for an I/O engine.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Whether each write must be durable before it completes.
    pub fn write_through(&self) -> bool {
        self.write_through.load(Ordering::Relaxed)
    }

    /// Sets the cache mode: write-through, or write-back (FLUSH makes
    /// writes durable).
    pub fn set_write_through(&self, write_through: bool) {
        self.write_through.store(write_through, Ordering::Relaxed);
    }

    /// Whether I/O bypasses the host page cache (O_DIRECT).
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// Whether the image is a regular file on a memory file system (tmpfs,
    /// ramfs, hugetlbfs), where a transfer is a copy that never waits.
    pub fn in_memory(&self) -> bool {
        self.in_memory
    }

    /// The image's mapping, while transfers may use it.
    pub fn mapping(&self) -> Option<&ImageMap> {
        self.mapping.as_deref().filter(|map| map.usable())
    }

    /// Starts a thread that prefaults the image's mapping, if it has one
    /// (see [`ImageMap::prefault`]), at idle priority: it runs only on a
    /// CPU nothing else wants, and holds the mapping until it is done.
    pub fn prefault_in_background(&self) -> io::Result<()> {
        let Some(map) = self.mapping.clone() else {
            return Ok(());
        };
        std::thread::Builder::new()
            .name("prefault".into())
            .spawn(move || {
                let param = libc::sched_param { sched_priority: 0 };
                // SAFETY: sets this thread's own policy from a valid param.
                if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
                    log::debug!(
                        "prefaulting at normal priority: {}",
                        io::Error::last_os_error()
                    );
                }
                let started = std::time::Instant::now();
                let done = map.prefault();
                log::debug!(
                    "prefaulted {} MiB of the image's mapping in {:?}",
                    done >> 20,
                    started.elapsed()
                );
            })
            .map(drop)
    }

    /// Reads `len` bytes at `offset` into host memory at `dst`.
    ///
    /// # Safety
    /// `dst` must be valid for writes of `len` bytes for the whole call.
    pub unsafe fn read_to(&self, dst: *mut u8, len: usize, offset: u64) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        self.transfer(len, offset, io::ErrorKind::UnexpectedEof, |done, off| {
            // SAFETY: the caller's guarantee covers every chunk `transfer`
            // asks for, which stays inside `dst..dst+len`.
            unsafe { libc::pread64(fd, dst.add(done).cast(), len - done, off) }
        })
    }

    /// Writes `len` bytes from host memory at `src` to `offset`.
    ///
    /// # Safety
    /// `src` must be valid for reads of `len` bytes for the whole call.
    pub unsafe fn write_from(&self, src: *const u8, len: usize, offset: u64) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        self.transfer(len, offset, io::ErrorKind::WriteZero, |done, off| {
            // SAFETY: as for `read_to`, inside `src..src+len`.
            unsafe { libc::pwrite64(fd, src.add(done).cast(), len - done, off) }
        })
    }

    /// Repeats `step(done, file offset)` until `len` bytes moved, retrying
    /// interrupted calls; a call that moves nothing fails with `stalled`.
    fn transfer(
        &self,
        len: usize,
        offset: u64,
        stalled: io::ErrorKind,
        mut step: impl FnMut(usize, libc::off64_t) -> isize,
    ) -> io::Result<()> {
        let mut done = 0;
        while done < len {
            match step(done, (offset + done as u64) as libc::off64_t) {
                n if n < 0 => {
                    let err = io::Error::last_os_error();
                    if err.kind() != io::ErrorKind::Interrupted {
                        return Err(err);
                    }
                }
                0 => return Err(io::Error::from(stalled)),
                n => done += n as usize,
            }
        }
        Ok(())
    }

    /// Makes completed writes durable.
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Frees the byte range in the host file (reads then return zeroes).
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.before_punch();
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    /// Zeroes the byte range, freeing it when `unmap` allows.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let mode = if unmap {
            self.before_punch();
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match self.fallocate(mode, offset, len) {
            Err(err) if err.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                // Block devices and some file systems lack the fast paths.
                let zeroes = vec![0u8; (1 << 20).min(len as usize)];
                let mut done = 0;
                while done < len {
                    let n = zeroes.len().min((len - done) as usize);
                    // SAFETY: `zeroes` is a live buffer of at least `n` bytes.
                    unsafe { self.write_from(zeroes.as_ptr(), n, offset + done)? };
                    done += n as u64;
                }
                Ok(())
            }
            other => other,
        }
    }

    /// A hole makes reads through the mapping allocate memory (see
    /// [`crate::mapping`]): the mapping is off from the first one.
    fn before_punch(&self) {
        if let Some(map) = &self.mapping {
            map.switch_off();
        }
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate only acts on the descriptor we own.
        let rc = unsafe {
            libc::fallocate64(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off64_t,
                len as libc::off64_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// Adds `flags` to the open file's status flags.
fn add_status_flags(file: &File, flags: nix::fcntl::OFlag) -> nix::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let current = OFlag::from_bits_retain(fcntl(file.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(file.as_raw_fd(), FcntlArg::F_SETFL(current | flags)).map(drop)
}

/// A memory file system an image lives on.
struct MemoryFs {
    /// Whether its images may be served through a mapping (see
    /// [`crate::mapping`]): not hugetlbfs.
    mappable: bool,
}

/// The memory file system `file` is a regular file on, if any. A block
/// device node is not, though devtmpfs reports tmpfs's magic for it.
fn memory_file_system(file: &File) -> Option<MemoryFs> {
    use nix::sys::statfs::{fstatfs, FsType, HUGETLBFS_MAGIC, TMPFS_MAGIC};
    // linux/magic.h; neither libc nor nix names it.
    const RAMFS_MAGIC: FsType = FsType(0x8584_58f6);
    if !file.metadata().is_ok_and(|meta| meta.file_type().is_file()) {
        return None;
    }
    let kind = fstatfs(file).ok()?.filesystem_type();
    [TMPFS_MAGIC, RAMFS_MAGIC, HUGETLBFS_MAGIC]
        .contains(&kind)
        .then_some(MemoryFs {
            mappable: kind != HUGETLBFS_MAGIC,
        })
}

fn disk_size(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        let mut size: u64 = 0;
        // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
        const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
        // SAFETY: the ioctl writes one u64 into `size`, which outlives it.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(size)
    } else {
        Ok(meta.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::FileTimes;
    use std::os::unix::fs::FileExt;
    use std::time::{Duration, SystemTime};

    /// A 4 KiB file in the source tree whose access time is two days old.
    fn read_long_ago() -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        file.as_file().write_all_at(&[5u8; 4096], 0).unwrap();
        let day = Duration::from_secs(86_400);
        let times = FileTimes::new()
            .set_accessed(SystemTime::now() - 2 * day)
            .set_modified(SystemTime::now() - 3 * day);
        file.as_file().set_times(times).unwrap();
        file
    }

    fn accessed(file: &tempfile::NamedTempFile) -> SystemTime {
        std::fs::metadata(file.path()).unwrap().accessed().unwrap()
    }

    #[test]
    fn reads_leave_the_image_s_access_time_alone() {
        let control = read_long_ago();
        let before = accessed(&control);
        std::fs::read(control.path()).unwrap();
        if accessed(&control) == before {
            let why = "this file system does not update access times on read";
            assert!(std::env::var_os("TESSERA_STRICT").is_none(), "{why}");
            eprintln!("skipped: {why}");
            return;
        }
        let image = read_long_ago();
        let before = accessed(&image);
        let disk = Disk::open(image.path(), false, false).unwrap();
        let mut buf = [0u8; 4096];
        // SAFETY: `buf` outlives the call.
        unsafe { disk.read_to(buf.as_mut_ptr(), buf.len(), 0) }.unwrap();
        assert_eq!(buf, [5u8; 4096]);
        assert_eq!(accessed(&image), before, "a read updated the access time");
    }
}
