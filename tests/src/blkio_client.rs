//! A vhost-user-blk client on libblkio (the `blkio` crate, the library QEMU
//! uses): an independent frontend that drives our backend with no guest and
//! no VMM, for interop tests and the block benchmark.

use std::mem::MaybeUninit;
use std::path::Path;

use blkio::{Blkio, Blkioq, MemoryRegion, ReqFlags};

/// One request queue on a connected backend, with a shared buffer region.
pub struct BlkioDisk {
    // Kept alive: the queue and the region belong to this instance.
    _blkio: Blkio,
    queue: Blkioq,
    region: MemoryRegion,
    capacity: u64,
}

/// Several request queues on one connected backend, sharing one buffer
/// region; each queue may be driven from a thread of its own.
pub struct BlkioQueues {
    _blkio: Blkio,
    pub queues: Vec<Blkioq>,
    pub region: MemoryRegion,
}

/// How a frontend learns that requests completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completions {
    /// The backend signals the queue's call eventfd and the frontend sleeps
    /// on it (a guest waiting for its interrupt).
    Interrupt,
    /// The frontend asks for no interrupts and busy-polls the used ring
    /// (libblkio's poll queues; a guest's virtio-blk `poll_queues`).
    Polled,
}

impl BlkioQueues {
    /// Connects to the backend at `socket` with `queues` queues and a
    /// `buffer_len` shared buffer.
    pub fn connect(socket: &Path, queues: usize, buffer_len: usize) -> Result<Self, String> {
        Self::connect_with(socket, queues, buffer_len, Completions::Interrupt)
    }

    /// As `connect`, with the queues' completion mode.
    pub fn connect_with(
        socket: &Path,
        queues: usize,
        buffer_len: usize,
        completions: Completions,
    ) -> Result<Self, String> {
        let (blkio, queues, region) = open(socket, false, queues, buffer_len, completions)?;
        Ok(Self {
            _blkio: blkio,
            queues,
            region,
        })
    }
}

/// Connects libblkio's vhost-user-blk driver, starts `queues` queues of
/// the `completions` kind and maps a shared buffer of `buffer_len` bytes.
fn open(
    socket: &Path,
    read_only: bool,
    queues: usize,
    buffer_len: usize,
    completions: Completions,
) -> Result<(Blkio, Vec<Blkioq>, MemoryRegion), String> {
    let err = |what: &str, e: blkio::Error| format!("{what}: {}", e.message());
    let mut blkio = Blkio::new("virtio-blk-vhost-user").map_err(|e| err("new", e))?;
    blkio
        .set_str("path", &socket.to_string_lossy())
        .map_err(|e| err("path", e))?;
    blkio
        .set_bool("read-only", read_only)
        .map_err(|e| err("read-only", e))?;
    blkio.connect().map_err(|e| err("connect", e))?;
    let count = i32::try_from(queues).map_err(|_| format!("{queues} queues"))?;
    let (interrupt, polled) = match completions {
        Completions::Interrupt => (count, 0),
        Completions::Polled => (0, count),
    };
    blkio
        .set_i32("num-queues", interrupt)
        .map_err(|e| err("num-queues", e))?;
    blkio
        .set_i32("num-poll-queues", polled)
        .map_err(|e| err("num-poll-queues", e))?;
    let started = blkio.start().map_err(|e| err("start", e))?;
    let region = blkio
        .alloc_mem_region(buffer_len)
        .map_err(|e| err("alloc_mem_region", e))?;
    blkio
        .map_mem_region(&region)
        .map_err(|e| err("map_mem_region", e))?;
    let queues = match completions {
        Completions::Interrupt => started.queues,
        Completions::Polled => started.poll_queues,
    };
    Ok((blkio, queues, region))
}

impl BlkioDisk {
    /// Connects to the backend at `socket` with a `buffer_len` shared buffer.
    pub fn connect(socket: &Path, buffer_len: usize) -> Result<Self, String> {
        Self::connect_with(socket, buffer_len, false)
    }

    /// As `connect`; `read_only` is needed for a device that offers RO.
    pub fn connect_with(socket: &Path, buffer_len: usize, read_only: bool) -> Result<Self, String> {
        let (blkio, mut queues, region) =
            open(socket, read_only, 1, buffer_len, Completions::Interrupt)?;
        let queue = queues.pop().ok_or("no queue")?;
        let capacity = blkio
            .get_u64("capacity")
            .map_err(|e| format!("capacity: {}", e.message()))?;
        Ok(Self {
            _blkio: blkio,
            queue,
            region,
            capacity,
        })
    }

    /// The disk size in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The shared buffer.
    pub fn buffer(&mut self) -> &mut [u8] {
        // SAFETY: the region is a live mapping of `len` bytes owned by this
        // instance, and the borrow of `self` keeps requests from using it
        // at the same time.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    fn complete(&mut self) -> i32 {
        let mut completion = [MaybeUninit::uninit()];
        match self.queue.do_io(&mut completion, 1, None, None) {
            // SAFETY: do_io initialised one completion.
            Ok(1) => unsafe { completion[0].assume_init_read() }.ret,
            Ok(_) => -libc::EIO,
            Err(_) => -libc::EIO,
        }
    }

    /// Reads `len` bytes at `offset` into the buffer; returns the request's
    /// result (0 or a negative errno).
    pub fn read(&mut self, offset: u64, len: usize) -> i32 {
        let buf = self.region.addr as *mut u8;
        self.queue.read(offset, buf, len, 0, ReqFlags::empty());
        self.complete()
    }

    /// Writes `len` bytes of the buffer at `offset`.
    pub fn write(&mut self, offset: u64, len: usize) -> i32 {
        let buf = self.region.addr as *const u8;
        self.queue.write(offset, buf, len, 0, ReqFlags::empty());
        self.complete()
    }

    pub fn flush(&mut self) -> i32 {
        self.queue.flush(0, ReqFlags::empty());
        self.complete()
    }

    pub fn discard(&mut self, offset: u64, len: u64) -> i32 {
        self.queue.discard(offset, len, 0, ReqFlags::empty());
        self.complete()
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> i32 {
        self.queue.write_zeroes(offset, len, 0, ReqFlags::empty());
        self.complete()
    }

    /// Keeps `depth` requests of `len` bytes in flight for `duration`;
    /// returns how many completed (failures count as a panic: a benchmark
    /// of failing I/O measures nothing).
    pub fn run_for(
        &mut self,
        depth: usize,
        len: usize,
        duration: std::time::Duration,
        mut next: impl FnMut(usize) -> (bool, u64),
    ) -> usize {
        let base = self.region.addr;
        let deadline = std::time::Instant::now() + duration;
        let mut submitted = 0;
        let mut done = 0;
        let mut completions: Vec<MaybeUninit<blkio::Completion>> =
            (0..depth).map(|_| MaybeUninit::uninit()).collect();
        loop {
            let stop = std::time::Instant::now() >= deadline;
            while !stop && submitted - done < depth {
                let slot = submitted % depth;
                let buf = base + slot * len;
                let (is_write, offset) = next(submitted);
                if is_write {
                    self.queue
                        .write(offset, buf as *const u8, len, slot, ReqFlags::empty());
                } else {
                    self.queue
                        .read(offset, buf as *mut u8, len, slot, ReqFlags::empty());
                }
                submitted += 1;
            }
            if stop && done == submitted {
                return done;
            }
            let n = self
                .queue
                .do_io(&mut completions, 1, None, None)
                .unwrap_or(0);
            for completion in &completions[..n] {
                // SAFETY: do_io initialised the first `n` completions.
                let ret = unsafe { completion.assume_init_read() }.ret;
                assert_eq!(ret, 0, "a benchmark request failed");
            }
            done += n;
        }
    }

    /// Queues `depth` requests from `next(index) -> (is_write, offset)` at a
    /// time, each `len` bytes from its own slot of the buffer, and keeps the
    /// queue full until `total` requests completed. Returns how many failed.
    pub fn run_queue_depth(
        &mut self,
        depth: usize,
        len: usize,
        total: usize,
        next: impl FnMut(usize) -> (bool, u64),
    ) -> usize {
        run_queue_depth(&mut self.queue, self.region.addr, depth, len, total, next)
    }
}

/// [`BlkioDisk::run_queue_depth`] on any queue, with its slots from `base`.
pub fn run_queue_depth(
    queue: &mut Blkioq,
    base: usize,
    depth: usize,
    len: usize,
    total: usize,
    mut next: impl FnMut(usize) -> (bool, u64),
) -> usize {
    let mut submitted = 0;
    let mut done = 0;
    let mut failed = 0;
    let mut completions: Vec<MaybeUninit<blkio::Completion>> =
        (0..depth).map(|_| MaybeUninit::uninit()).collect();
    while done < total {
        while submitted < total && submitted - done < depth {
            let slot = submitted % depth;
            let buf = base + slot * len;
            let (is_write, offset) = next(submitted);
            if is_write {
                queue.write(offset, buf as *const u8, len, slot, ReqFlags::empty());
            } else {
                queue.read(offset, buf as *mut u8, len, slot, ReqFlags::empty());
            }
            submitted += 1;
        }
        let n = queue.do_io(&mut completions, 1, None, None).unwrap_or(0);
        for completion in &completions[..n] {
            // SAFETY: do_io initialised the first `n` completions.
            if unsafe { completion.assume_init_read() }.ret != 0 {
                failed += 1;
            }
        }
        done += n;
    }
    failed
}
