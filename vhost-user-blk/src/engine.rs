//! The I/O engine one worker uses for reads, writes and flushes of every
//! queue it serves: io_uring where the kernel has it, keeping up to a ring's
//! worth of requests in flight while the worker keeps taking new ones from
//! the guest; blocking calls otherwise.
//!
//! Buffered I/O is done in place when it cannot wait for a device, since
//! io_uring hands what it cannot do without blocking to one of its worker
//! threads, which costs more than the copy itself:
//! - on a memory file system (tmpfs), every transfer is a copy: always in
//!   place, through the image's mapping where it has one (see
//!   [`crate::mapping`]), else with plain `preadv`/`pwritev` (tmpfs refuses
//!   `RWF_NOWAIT`);
//! - elsewhere, a request the guest posted alone is first tried with
//!   `preadv2`/`pwritev2` and `RWF_NOWAIT`, as QEMU and SPDK do, and only
//!   what would block goes to the ring. Requests posted together go to the
//!   ring together: one call submits them all, and the kernel copies those
//!   in the page cache inside it (4 KiB reads at QD32: 349k IOPS against
//!   324k one call each). Where the file system refuses `RWF_NOWAIT` (ext4
//!   for buffered writes), writes, which only fill the page cache, are done
//!   in place as Cloud Hypervisor's backend does, and reads go to the ring;
//! - O_DIRECT I/O, and a durable write outside memory, always go to the
//!   ring.

use std::io;

use io_uring::register::Restriction;
use io_uring::{opcode, squeue, types, IoUring};
use virtio_queue::desc::split::Descriptor;

use crate::disk::Disk;
use crate::mapping::Copied;
use crate::request::{run_sync, DataIo, RequestError, Work};

/// One operation.
pub enum Op {
    Io(DataIo),
    Flush,
}

/// Where a request's completion goes: the queue (by its position among
/// the worker's vrings), the descriptor head and the status descriptor.
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    pub position: usize,
    pub head: u16,
    pub status: Descriptor,
    pub work: Work,
}

/// A request whose I/O is done, with its outcome: bytes written into guest
/// buffers, or why it failed.
pub type Done = (Ticket, Result<u32, RequestError>);

struct InFlight {
    ticket: Ticket,
    op: Op,
}

/// An io_uring instance with its requests in flight, or the blocking
/// fallback.
pub struct Engine {
    ring: Option<IoUring>,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    queued: usize,
    submit_each: bool,
    reads: InPlace,
    writes: InPlace,
}

/// How a read or a write is tried in place, before the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InPlace {
    /// Never: it goes to the ring.
    Never,
    /// With `RWF_NOWAIT`: in place unless it would block.
    Nowait,
    /// Always, with a blocking call: the transfer is a copy in memory.
    Always,
}

/// What a transfer tried with `RWF_NOWAIT` came to.
enum Tried {
    Moved,
    WouldBlock,
    Unsupported,
}

impl Engine {
    /// Sets up io_uring with room for `entries` requests, or falls back.
    /// With `submit_each`, every request goes to the kernel as soon as it
    /// is started rather than with the rest of the worker's batch: right
    /// for O_DIRECT, where the disk can start on it while the worker parses
    /// the next one (4 KiB reads at QD32: 83k IOPS against 71k). From page
    /// cache, io_uring copies the data inside the submitting call, so one
    /// call per batch costs less (4 queues: 696k against 484k).
    /// How each transfer is tried in place follows from `disk`: see the
    /// module's documentation.
    pub fn new(entries: u32, use_uring: bool, disk: &Disk) -> Self {
        let submit_each = disk.direct();
        let in_place = if disk.direct() {
            InPlace::Never
        } else if disk.in_memory() {
            InPlace::Always
        } else {
            InPlace::Nowait
        };
        let ring = if use_uring {
            match restricted_ring(entries) {
                Ok(ring) => Some(ring),
                Err(err) => {
                    log::warn!("io_uring is unavailable ({err}); using synchronous I/O");
                    None
                }
            }
        } else {
            None
        };
        Self {
            ring,
            slots: (0..entries).map(|_| None).collect(),
            free: (0..entries as usize).rev().collect(),
            queued: 0,
            submit_each,
            reads: in_place,
            writes: in_place,
        }
    }

    /// Whether io_uring is in use.
    pub fn is_uring(&self) -> bool {
        self.ring.is_some()
    }

    /// Whether another request fits.
    pub fn has_room(&self) -> bool {
        self.ring.is_none() || !self.free.is_empty()
    }

    /// Requests submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Starts `op`. The blocking engine, or an in-place transfer that did
    /// not need to block, finishes it at once and returns it.
    /// `more` says whether the guest has posted further requests after
    /// this one (asked only where that decides whether it is done in place).
    pub fn start(
        &mut self,
        disk: &Disk,
        ticket: Ticket,
        op: Op,
        more: impl Fn() -> bool,
    ) -> Option<Done> {
        if let Op::Io(io) = &op {
            if let Some(result) = through_mapping(disk, io) {
                return Some((ticket, result));
            }
        }
        if self.ring.is_none() {
            return Some((ticket, run_one_sync(disk, &op)));
        }
        if let Op::Io(io) = &op {
            if let Some(result) = self.in_place(disk, io, more) {
                return Some((ticket, result));
            }
        }
        let Some(ring) = &mut self.ring else {
            return Some((ticket, run_one_sync(disk, &op)));
        };
        let Some(slot) = self.free.pop() else {
            return Some((
                ticket,
                Err(RequestError::Io(io::Error::other("engine full"))),
            ));
        };
        let sqe = entry(types::Fd(disk.raw_fd()), &op, slot);
        self.slots[slot] = Some(InFlight { ticket, op });
        loop {
            // SAFETY: the iovecs and guest buffers the entry points to live
            // in `self.slots[slot]` until its completion is reaped.
            if unsafe { ring.submission().push(&sqe) }.is_ok() {
                self.queued += 1;
                // A failed submit leaves the entry queued for reap().
                if self.submit_each && ring.submit().is_ok() {
                    self.queued = 0;
                }
                return None;
            }
            // The submission queue is full: hand it to the kernel first.
            if let Err(err) = ring.submit() {
                let ticket = self.slots[slot].take().map(|f| f.ticket);
                self.free.push(slot);
                return Some((ticket?, Err(RequestError::Io(err))));
            }
        }
    }

    /// Does `io` in place if its file and direction allow (see the module's
    /// documentation) and returns its outcome; None sends it to the ring.
    fn in_place(
        &mut self,
        disk: &Disk,
        io: &DataIo,
        more: impl Fn() -> bool,
    ) -> Option<Result<u32, RequestError>> {
        let moved = if io.write { 0 } else { io.len };
        let way = if io.write { self.writes } else { self.reads };
        match way {
            InPlace::Never => None,
            InPlace::Nowait if self.queued > 0 || more() => None,
            // A durable write waits for the device (RWF_DSYNC) but in memory.
            InPlace::Always if io.write && io.durable && !disk.in_memory() => None,
            InPlace::Always => Some(run_sync(io, disk).map(|()| moved)),
            InPlace::Nowait => match transfer_now(disk, io) {
                Tried::Moved => Some(Ok(moved)),
                Tried::WouldBlock => None,
                Tried::Unsupported => {
                    let (direction, learned) = if io.write {
                        ("writes", &mut self.writes)
                    } else {
                        ("reads", &mut self.reads)
                    };
                    // Buffered writes mostly only fill the page cache (a
                    // partial page not cached is read first, and dirty
                    // throttling can wait), as in Cloud Hypervisor's
                    // backend; a read the file system cannot promise may
                    // wait for a device.
                    *learned = if io.write {
                        InPlace::Always
                    } else {
                        InPlace::Never
                    };
                    // Once per worker and direction.
                    log::info!(
                        "the file system refuses RWF_NOWAIT for buffered {direction}: \
                         they are done {}",
                        if io.write {
                            "in place"
                        } else {
                            "through io_uring"
                        }
                    );
                    self.in_place(disk, io, more)
                }
            },
        }
    }

    /// Submits what was started, waits for at least one completion if
    /// `wait` and anything is in flight, and appends every completed request
    /// to `done`.
    pub fn reap(&mut self, disk: &Disk, wait: bool, done: &mut Vec<Done>) -> io::Result<()> {
        let Some(ring) = &mut self.ring else {
            return Ok(());
        };
        let want = usize::from(wait && self.slots.len() != self.free.len());
        if self.queued > 0 || want > 0 {
            match ring.submit_and_wait(want) {
                Ok(_) => self.queued = 0,
                Err(err) if err.raw_os_error() == Some(libc::EINTR) => {}
                Err(err) => return Err(err),
            }
        }
        for cqe in ring.completion() {
            let slot = cqe.user_data() as usize;
            let Some(flight) = self.slots.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            self.free.push(slot);
            let res = cqe.result();
            let result = match &flight.op {
                // A transient failure or a short transfer (the kernel may
                // stop early under memory pressure) is not the guest's
                // error: the request is redone synchronously, in full, as
                // QEMU resubmits it.
                _ if res == -libc::EAGAIN || res == -libc::EINTR => run_one_sync(disk, &flight.op),
                Op::Io(io) if res >= 0 && (res as u32) < io.len => run_one_sync(disk, &flight.op),
                _ if res < 0 => Err(RequestError::Io(io::Error::from_raw_os_error(-res))),
                Op::Io(io) => Ok(if io.write { 0 } else { io.len }),
                Op::Flush => Ok(0),
            };
            done.push((flight.ticket, result));
        }
        Ok(())
    }

    /// Waits until every request in flight has completed, dropping their
    /// outcomes: for a worker that gives up, whose requests' buffers must
    /// stay mapped until the kernel is done with them.
    pub fn drain(&mut self) -> io::Result<()> {
        let Self {
            ring, slots, free, ..
        } = self;
        let Some(ring) = ring else {
            return Ok(());
        };
        while slots.len() != free.len() {
            match ring.submit_and_wait(1) {
                Ok(_) => self.queued = 0,
                Err(err) if err.raw_os_error() == Some(libc::EINTR) => {}
                Err(err) => return Err(err),
            }
            for cqe in ring.completion() {
                let slot = cqe.user_data() as usize;
                if slots.get_mut(slot).and_then(Option::take).is_some() {
                    free.push(slot);
                }
            }
        }
        Ok(())
    }
}

/// An io_uring instance that accepts only what the engine submits: readv,
/// writev and fsync, with no flag but IO_DRAIN, and no register operation.
/// The ring starts disabled and is enabled once restricted, so that a
/// compromised backend cannot reach through it what its seccomp filter
/// denies (openat, socket, connect, unlinkat...).
pub fn restricted_ring(entries: u32) -> io::Result<IoUring> {
    let ring = IoUring::builder().setup_r_disabled().build(entries)?;
    let mut restrictions = [
        Restriction::sqe_op(opcode::Readv::CODE),
        Restriction::sqe_op(opcode::Writev::CODE),
        Restriction::sqe_op(opcode::Fsync::CODE),
        Restriction::sqe_flags_allowed(squeue::Flags::IO_DRAIN.bits()),
    ];
    let submitter = ring.submitter();
    submitter.register_restrictions(&mut restrictions)?;
    submitter.register_enable_rings()?;
    Ok(ring)
}

/// Copies `io` through the image's mapping if the disk has one in use
/// (see [`crate::mapping`]); None if the transfer needs a system call.
fn through_mapping(disk: &Disk, io: &DataIo) -> Option<Result<u32, RequestError>> {
    let map = disk.mapping()?;
    // SAFETY: the iovecs point into guest memory, which stays mapped while
    // the request is served.
    if unsafe { map.transfer(&io.iovecs, io.offset, io.write) } != Copied::Done {
        return None;
    }
    Some(match io.write {
        true if io.durable => disk.flush().map(|()| 0).map_err(Into::into),
        true => Ok(0),
        false => Ok(io.len),
    })
}

/// Moves all of `io` in one `preadv2`/`pwritev2` with `RWF_NOWAIT` if the
/// kernel can do it without blocking. If it would block (or moved only
/// part, or failed), the ring redoes the whole request.
fn transfer_now(disk: &Disk, io: &DataIo) -> Tried {
    let Ok(count) = libc::c_int::try_from(io.iovecs.len()) else {
        return Tried::WouldBlock;
    };
    let Ok(offset) = libc::off_t::try_from(io.offset) else {
        return Tried::WouldBlock;
    };
    let durable = if io.durable { libc::RWF_DSYNC } else { 0 };
    // SAFETY: the iovecs point into guest memory, which stays mapped while
    // the request is served (as for the ring's entries); the call only
    // reads or writes those buffers.
    let moved = unsafe {
        if io.write {
            libc::pwritev2(
                disk.raw_fd(),
                io.iovecs.as_ptr(),
                count,
                offset,
                libc::RWF_NOWAIT | durable,
            )
        } else {
            libc::preadv2(
                disk.raw_fd(),
                io.iovecs.as_ptr(),
                count,
                offset,
                libc::RWF_NOWAIT,
            )
        }
    };
    if usize::try_from(moved).is_ok_and(|moved| moved == io.len as usize) {
        Tried::Moved
    } else if moved < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP) {
        Tried::Unsupported
    } else {
        Tried::WouldBlock
    }
}

fn run_one_sync(disk: &Disk, op: &Op) -> Result<u32, RequestError> {
    match op {
        Op::Io(io) => run_sync(io, disk).map(|()| if io.write { 0 } else { io.len }),
        Op::Flush => disk.flush().map(|()| 0).map_err(Into::into),
    }
}

fn entry(fd: types::Fd, op: &Op, slot: usize) -> squeue::Entry {
    match op {
        // A write-through write is durable when it completes (RWF_DSYNC:
        // as if the file were open with O_DSYNC).
        Op::Io(io) if io.write => {
            opcode::Writev::new(fd, io.iovecs.as_ptr(), io.iovecs.len() as u32)
                .offset(io.offset)
                .rw_flags(if io.durable { libc::RWF_DSYNC } else { 0 })
                .build()
        }
        Op::Io(io) => opcode::Readv::new(fd, io.iovecs.as_ptr(), io.iovecs.len() as u32)
            .offset(io.offset)
            .build(),
        // Drained: it starts only when everything before it has completed,
        // so it covers every write the guest saw complete.
        Op::Flush => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .flags(squeue::Flags::IO_DRAIN),
    }
    .user_data(slot as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// Submits `sqe` alone and returns its result.
    fn run(ring: &mut IoUring, sqe: &squeue::Entry) -> i32 {
        // SAFETY: every buffer the entries point to outlives the wait below.
        unsafe { ring.submission().push(sqe).unwrap() };
        ring.submit_and_wait(1).unwrap();
        ring.completion().next().unwrap().result()
    }

    /// A read of `buf.len()` bytes at offset 0 into `buf`.
    fn read_into(buf: &mut [u8]) -> (DataIo, Ticket) {
        let io = DataIo {
            write: false,
            offset: 0,
            iovecs: vec![libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            }],
            len: buf.len() as u32,
            durable: false,
        };
        let ticket = Ticket {
            position: 0,
            head: 0,
            status: virtio_queue::desc::split::Descriptor::new(0, 1, 0, 0),
            work: io.work(),
        };
        (io, ticket)
    }

    /// A write of `buf` at offset 0; `durable` as in write-through mode.
    fn write_from(buf: &mut [u8], durable: bool) -> (DataIo, Ticket) {
        let (mut io, ticket) = read_into(buf);
        io.write = true;
        io.durable = durable;
        let work = io.work();
        (io, Ticket { work, ..ticket })
    }

    /// A 4 KiB image of 7s in `dir`, open buffered.
    fn image_in(dir: &std::path::Path) -> (tempfile::NamedTempFile, Disk) {
        use std::io::Write;
        let mut file = tempfile::NamedTempFile::new_in(dir).unwrap();
        file.write_all(&[7u8; 8 * 512]).unwrap();
        let disk = Disk::open(file.path(), false, false).unwrap();
        (file, disk)
    }

    /// The source tree: a disk-backed file system (the test says so).
    fn on_disk() -> &'static std::path::Path {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
    }

    #[test]
    fn tmpfs_reads_and_writes_complete_in_place_though_tmpfs_refuses_nowait() {
        let (file, disk) = image_in(std::path::Path::new("/dev/shm"));
        assert!(disk.in_memory());
        let mut engine = Engine::new(8, true, &disk);
        assert!(engine.is_uring());
        let mut buf = vec![0u8; 4096];
        let (io, ticket) = read_into(&mut buf);
        let done = engine.start(&disk, ticket, Op::Io(io), || false);
        assert!(
            matches!(done, Some((_, Ok(4096)))),
            "read not done in place"
        );
        assert_eq!(buf, [7u8; 4096]);
        let mut data = vec![9u8; 4096];
        // Durable too: in memory, RWF_DSYNC waits for nothing.
        let (io, ticket) = write_from(&mut data, true);
        let done = engine.start(&disk, ticket, Op::Io(io), || false);
        assert!(matches!(done, Some((_, Ok(0)))), "write not done in place");
        assert_eq!(engine.in_flight(), 0);
        assert_eq!(std::fs::read(file.path()).unwrap(), [9u8; 4096]);
    }

    #[test]
    fn a_device_node_is_not_in_memory_though_devtmpfs_says_tmpfs() {
        let disk = Disk::open(std::path::Path::new("/dev/null"), true, false).unwrap();
        assert!(!disk.in_memory());
    }

    #[test]
    fn a_buffered_write_completes_in_place_and_a_durable_one_goes_to_the_ring() {
        let (file, disk) = image_in(on_disk());
        assert!(!disk.in_memory(), "the source tree is on tmpfs");
        let mut engine = Engine::new(8, true, &disk);
        // ext4 refuses RWF_NOWAIT for buffered writes: the first one learns
        // it, and every one is done in place.
        for byte in [1u8, 2] {
            let mut data = vec![byte; 4096];
            let (io, ticket) = write_from(&mut data, false);
            let done = engine.start(&disk, ticket, Op::Io(io), || false);
            assert!(
                matches!(done, Some((_, Ok(0)))),
                "write {byte} not in place"
            );
            assert_eq!(std::fs::read(file.path()).unwrap(), [byte; 4096]);
        }
        let mut data = vec![3u8; 4096];
        let (io, ticket) = write_from(&mut data, true);
        assert!(engine.start(&disk, ticket, Op::Io(io), || false).is_none());
        assert_eq!(engine.in_flight(), 1);
        let mut done = Vec::new();
        while done.is_empty() {
            engine.reap(&disk, true, &mut done).unwrap();
        }
        assert!(matches!(done[0].1, Ok(0)), "{:?}", done[0].1);
        assert_eq!(std::fs::read(file.path()).unwrap(), [3u8; 4096]);
    }

    #[test]
    fn a_read_from_the_page_cache_completes_in_place() {
        use std::io::Write;
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&[7u8; 8 * 512]).unwrap();
        let disk = Disk::open(file.path(), false, false).unwrap();
        let mut buf = vec![0u8; 4096];
        let (io, ticket) = read_into(&mut buf);
        let mut engine = Engine::new(8, true, &disk);
        let done = engine.start(&disk, ticket, Op::Io(io), || false);
        assert!(matches!(done, Some((_, Ok(4096)))), "not done in place");
        assert_eq!(engine.in_flight(), 0);
        assert_eq!(buf, [7u8; 4096]);
    }

    #[test]
    fn reads_posted_together_go_to_the_ring_together() {
        let (_file, disk) = image_in(on_disk());
        assert!(!disk.in_memory(), "the source tree is on tmpfs");
        let mut engine = Engine::new(8, true, &disk);
        let mut first = vec![0u8; 4096];
        let mut last = vec![0u8; 4096];
        let (io, ticket) = read_into(&mut first);
        assert!(engine.start(&disk, ticket, Op::Io(io), || true).is_none());
        // The last of the batch follows the others though none is after it.
        let (io, ticket) = read_into(&mut last);
        assert!(engine.start(&disk, ticket, Op::Io(io), || false).is_none());
        assert_eq!(engine.in_flight(), 2);
        let mut done = Vec::new();
        while done.len() < 2 {
            engine.reap(&disk, true, &mut done).unwrap();
        }
        assert!(done.iter().all(|(_, result)| matches!(result, Ok(4096))));
        assert_eq!(first, [7u8; 4096]);
        assert_eq!(last, [7u8; 4096]);
        // Alone again: in place.
        let (io, ticket) = read_into(&mut first);
        let done = engine.start(&disk, ticket, Op::Io(io), || false);
        assert!(matches!(done, Some((_, Ok(4096)))), "not done in place");
    }

    #[test]
    fn a_short_transfer_is_an_error_not_a_success() {
        use std::io::Write;
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&[7u8; 8 * 512]).unwrap();
        let disk = Disk::open(file.path(), false, false).unwrap();
        // The image shrinks under the backend: a read of its last sectors
        // now ends early.
        file.as_file().set_len(512).unwrap();
        let mut buf = vec![0u8; 4096];
        let (io, ticket) = read_into(&mut buf);
        let mut engine = Engine::new(8, true, &disk);
        assert!(engine.is_uring());
        assert!(engine.start(&disk, ticket, Op::Io(io), || false).is_none());
        let mut done = Vec::new();
        while done.is_empty() {
            engine.reap(&disk, true, &mut done).unwrap();
        }
        assert!(
            matches!(done[0].1, Err(RequestError::Io(_))),
            "{:?}",
            done[0].1
        );
    }

    #[test]
    fn the_ring_refuses_every_opcode_the_engine_does_not_use() {
        let mut ring = restricted_ring(8).unwrap();
        let file = tempfile::tempfile().unwrap();
        file.set_len(4096).unwrap();
        let path = c"/etc/hostname";
        let openat = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr()).build();
        assert_eq!(run(&mut ring, &openat), -libc::EACCES);
        let socket = opcode::Socket::new(libc::AF_INET, libc::SOCK_STREAM, 0).build();
        assert_eq!(run(&mut ring, &socket), -libc::EACCES);
        let unlink = opcode::UnlinkAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr()).build();
        assert_eq!(run(&mut ring, &unlink), -libc::EACCES);
        // Linked requests are not something the engine makes either.
        let fsync = opcode::Fsync::new(types::Fd(file.as_raw_fd())).build();
        assert_eq!(
            run(&mut ring, &fsync.clone().flags(squeue::Flags::IO_LINK)),
            -libc::EACCES
        );
        // What the engine does submit goes through.
        let mut buf = [0u8; 512];
        let iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        let readv = opcode::Readv::new(types::Fd(file.as_raw_fd()), iov.as_ptr(), 1).build();
        assert_eq!(run(&mut ring, &readv), 512);
        let drained = fsync.flags(squeue::Flags::IO_DRAIN);
        assert_eq!(run(&mut ring, &drained), 0);
        assert!(
            ring.submitter()
                .register_files(&[file.as_raw_fd()])
                .is_err(),
            "no register operation is allowed"
        );
    }
}
