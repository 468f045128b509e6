//! virtio memory balloon (device id 5), driven through [`crate::virtio`]
//! by polling: it gives the host pages of a pool of free RAM and takes
//! them back, as the host's target says.
//!
//! `probe.balloon=<MiB>` (base 0, above 0) drives the first balloon device
//! (later ones are only listed); an unusable value prints
//! `probe.balloon_error=bad-value,<value>` before the `probe.virtio=`
//! lines. Once the memory test (`probe.memtest`) and the dirtier
//! (`probe.dirty`) have their memory, [`start`] takes a pool of that many
//! MiB of free RAM just below theirs (`probe.balloon_error=no-free-ram,<MiB>`
//! if there is none) and sets the device up to its queues
//! (`probe.balloon=error setup <reason>` if that fails). It fills every
//! page of the pool with a value derived from the page's address and a
//! seed (RDTSC), so that every pool page is resident on the host, prints
//! `probe.balloon=pool <MiB> MiB at <base>`, sets DRIVER_OK, prints
//! `probe.balloon=up stats=<0|1> deflate_on_oom=<0|1>` (the features
//! negotiated) and polls the device once.
//!
//! [`Balloon::poll`] (once per tick, or about every 100 ms while the probe
//! serves the network without ticks) moves the balloon to
//! `min(num_pages, pool pages)`. The balloon is always the top `actual`
//! pages of the pool: it grows downwards from the pool's top and shrinks
//! back upwards, so it needs no bitmap. Inflating sends the PFNs of the
//! pages going in on the inflate queue, deflating those of the pages
//! coming out on the deflate queue, at most [`PFNS_PER_REQUEST`] per
//! request, one request at a time, each waited for (at most
//! [`REQUEST_TIMEOUT_MS`]) before `actual` is written to config space.
//! Pages out of the balloon are filled again. After a poll that moved
//! the balloon, two words of every pool page outside it are checked (the
//! first, and one whose offset moves with every check), and
//! `probe.balloon=<actual> pages` is printed. The first word that does not
//! hold its page's value prints `probe.balloon=bad,<addr>,<expected>,<found>`
//! and ends the checks.
//!
//! With `VIRTIO_BALLOON_F_STATS_VQ` one statistics buffer is posted at
//! setup; the device returns it when it wants new figures, and the next
//! poll posts it again with fresh ones and prints
//! `probe.balloon_stats=<n>`: how many times the device asked so far.
//! `MINFLT` is the number of polls so far, `MEMFREE` and `AVAIL` the bytes
//! of the pool outside the balloon, `MEMTOT` the RAM in the memory map;
//! `SWAP_IN`, `SWAP_OUT`, `MAJFLT` and `CACHES` are 0.
//!
//! A queue error, a request not taken in time or `DEVICE_NEEDS_RESET`
//! prints `probe.balloon=error <reason>[=<value>][ <queue>]` (e.g.
//! `timeout inflate`), resets the device (`probe.balloon=error
//! reset-timeout` if it does not confirm) and ends the driving.

use core::arch::x86_64::_rdtsc;
use core::cell::UnsafeCell;
use core::fmt;
use core::mem::MaybeUninit;
use core::ops::Range;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::cmdline::{self, BadOption};
use crate::e820;
use crate::phys;
use crate::serial::outln;
use crate::virtio::{self, Buffer, Error, Regs, Transport, Virtqueue};

/// virtio device id of the memory balloon.
pub const DEVICE_ID: u32 = 5;

/// Feature bits (virtio 1.x, section 5.5.3). Free page hinting (3) and
/// reporting (5) are not taken: their queues would follow the stats queue.
mod feature {
    /// `VIRTIO_BALLOON_F_STATS_VQ`: queue 2 carries memory statistics.
    pub const STATS_VQ: u64 = 1 << 1;
    /// `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`: changes nothing for the probe,
    /// which never runs out of memory.
    pub const DEFLATE_ON_OOM: u64 = 1 << 2;
}

/// Offsets in `struct virtio_balloon_config`.
mod config {
    /// `le32 num_pages`: the host's target, in 4 KiB pages.
    pub const NUM_PAGES: u64 = 0;
    /// `le32 actual`: the pages in the balloon, written by the driver.
    pub const ACTUAL: u64 = 4;
}

const INFLATE_QUEUE: u32 = 0;
const DEFLATE_QUEUE: u32 = 1;
/// Only with `STATS_VQ`.
const STATS_QUEUE: u32 = 2;

const PAGE: u64 = 4096;
const PAGE_SHIFT: u32 = 12;
const PAGE_WORDS: u64 = PAGE / 8;
/// PFNs per inflate or deflate request (Linux's
/// `VIRTIO_BALLOON_ARRAY_PFNS_MAX`).
pub const PFNS_PER_REQUEST: u32 = 256;
/// Time the device has to take one request.
pub const REQUEST_TIMEOUT_MS: u32 = 2000;

/// Statistics tags (`VIRTIO_BALLOON_S_*`).
mod tag {
    pub const SWAP_IN: u16 = 0;
    pub const SWAP_OUT: u16 = 1;
    pub const MAJFLT: u16 = 2;
    pub const MINFLT: u16 = 3;
    pub const MEMFREE: u16 = 4;
    pub const MEMTOT: u16 = 5;
    pub const AVAIL: u16 = 6;
    pub const CACHES: u16 = 7;
}
/// Statistics reported.
const STATS: usize = 8;
/// `struct virtio_balloon_stat`: `le16 tag`, `le64 val`, packed.
const STAT_LEN: usize = 10;
const STATS_LEN: usize = STATS * STAT_LEN;

/// `probe.balloon=<MiB>` (base 0 like `kstrtouint`, above 0): the pool
/// size. `Ok(None)` without it.
pub fn options(cmdline: &[u8]) -> Result<Option<u32>, BadOption<'_>> {
    let Some(value) = cmdline::last_value(cmdline, "probe.balloon") else {
        return Ok(None);
    };
    value
        .and_then(|v| cmdline::kstrtouint(v, 0))
        .filter(|&mib| mib > 0)
        .map(Some)
        .ok_or(BadOption {
            name: "probe.balloon",
            value,
        })
}

/// What the statistics report besides constants.
struct Figures {
    /// Polls so far (`MINFLT`).
    polls: u64,
    /// Bytes of the pool outside the balloon (`MEMFREE`, `AVAIL`).
    free: u64,
    /// RAM in the memory map (`MEMTOT`).
    total: u64,
}

/// The statistics buffer's contents: one entry per tag, in tag order.
fn encode_stats(figures: &Figures) -> [u8; STATS_LEN] {
    let entries = [
        (tag::SWAP_IN, 0),
        (tag::SWAP_OUT, 0),
        (tag::MAJFLT, 0),
        (tag::MINFLT, figures.polls),
        (tag::MEMFREE, figures.free),
        (tag::MEMTOT, figures.total),
        (tag::AVAIL, figures.free),
        (tag::CACHES, 0),
    ];
    let mut out = [0u8; STATS_LEN];
    for (slot, (tag, value)) in out.chunks_exact_mut(STAT_LEN).zip(entries) {
        let (tag_bytes, value_bytes) = slot.split_at_mut(2);
        tag_bytes.copy_from_slice(&tag.to_le_bytes());
        value_bytes.copy_from_slice(&value.to_le_bytes());
    }
    out
}

/// Every word of the pool page at `page_addr` while it is outside the
/// balloon.
fn pattern(seed: u64, page_addr: u64) -> u64 {
    page_addr
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .rotate_left(17)
        ^ seed
}

/// The free RAM the balloon is made of: `pages` pages from `base`.
struct Pool {
    base: u64,
    pages: u32,
    seed: u64,
    /// Checks done so far (moves the second word checked on each page).
    checks: u64,
    /// A check failed: no more checks.
    bad: bool,
}

impl Pool {
    /// `mib` MiB of free RAM right below the top `reserved` bytes of free
    /// RAM (the memory test's and the dirtier's), all of it at PFNs that
    /// fit in 32 bits.
    fn find(map: &e820::Map, image: (u64, u64), reserved: u64, mib: u32) -> Option<Pool> {
        let len = u64::from(mib) << 20;
        let base = e820::free_top(map, image, len.checked_add(reserved)?)?;
        let pages = u32::try_from(len / PAGE).ok()?;
        u32::try_from((base + len) >> PAGE_SHIFT).ok()?;
        // SAFETY: RDTSC has no preconditions; any value makes a seed.
        let seed = unsafe { _rdtsc() };
        Some(Pool {
            base,
            pages,
            seed,
            checks: 0,
            bad: false,
        })
    }

    fn page_addr(&self, page: u32) -> u64 {
        self.base + u64::from(page) * PAGE
    }

    /// The page frame number of pool page `page` (it fits: see `find`).
    fn pfn(&self, page: u32) -> u32 {
        (self.page_addr(page) >> PAGE_SHIFT) as u32
    }

    fn load(&self, addr: u64) -> u64 {
        // SAFETY: `addr` is an aligned word of the pool (identity-mapped
        // free RAM, outside the image, memtest and dirtier): no Rust object
        // lives there, and the balloon driver owns it.
        unsafe { phys::read_volatile_u64(addr) }
    }

    /// Writes the pattern into the pool pages `pages` (at most the pool's),
    /// one `rep stosq` per page: under kvm_pvm a loop of stores takes ten
    /// times as long, each instruction being emulated.
    fn fill(&self, pages: Range<u32>) {
        for page in pages.start..pages.end.min(self.pages) {
            let addr = self.page_addr(page);
            // SAFETY: the page is in the pool (as in `load`), and no
            // reference covers it. The direction flag is clear (Rust ABI),
            // so `rep stosq` writes exactly the page's words upwards.
            unsafe {
                core::arch::asm!(
                    "rep stosq",
                    inout("rcx") PAGE_WORDS => _,
                    inout("rdi") addr => _,
                    in("rax") pattern(self.seed, addr),
                    options(nostack, preserves_flags)
                )
            };
        }
    }

    /// Checks two words of each of the first `kept` pages (those outside
    /// the balloon): the first one and one whose offset moves with every
    /// check. The first bad word is printed and ends the checks.
    fn check(&mut self, kept: u32) {
        if self.bad {
            return;
        }
        self.checks += 1;
        let offset = (1 + self.checks % (PAGE_WORDS - 1)) * 8;
        for page in 0..kept.min(self.pages) {
            let first = self.page_addr(page);
            let expected = pattern(self.seed, first);
            for addr in [first, first + offset] {
                let found = self.load(addr);
                if found != expected {
                    outln!("probe.balloon=bad,{:#x},{:#x},{:#x}", addr, expected, found);
                    self.bad = true;
                    return;
                }
            }
        }
    }
}

/// The PFN and statistics buffers the device reads.
#[repr(C, align(4096))]
struct Buffers {
    /// The PFNs of one inflate or deflate request (le32 each).
    pfns: [u32; PFNS_PER_REQUEST as usize],
    stats: [u8; STATS_LEN],
}

/// The static buffers, owned by the first balloon device set up.
struct BufferCell {
    mem: UnsafeCell<MaybeUninit<Buffers>>,
}

// SAFETY: the probe is single-threaded with interrupts disabled; the
// memory is only reached through the pointer handed out by `take`, and
// `BUFFERS_TAKEN` lets that happen once.
unsafe impl Sync for BufferCell {}

/// Not zeroed at boot (`.probe_noinit`, see link.ld): each buffer is
/// written before the device may read it.
#[unsafe(link_section = ".probe_noinit.virtio_balloon")]
static BUFFERS: BufferCell = BufferCell {
    mem: UnsafeCell::new(MaybeUninit::uninit()),
};
static BUFFERS_TAKEN: AtomicBool = AtomicBool::new(false);

impl BufferCell {
    /// The buffers, for the one driver that ever uses them.
    fn take(&self) -> Option<*mut Buffers> {
        (!BUFFERS_TAKEN.swap(true, Ordering::Relaxed)).then(|| self.mem.get().cast::<Buffers>())
    }
}

/// Why setup failed (the text after `error setup `).
#[derive(Clone, Copy, Debug)]
enum SetupError {
    Transport(Error),
    /// `queue=<q> <reason>`.
    Queue(u32, Error),
    /// Internal: the buffers are taken.
    Busy,
}

impl fmt::Display for SetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            SetupError::Transport(e) => f.write_str(e.name()),
            SetupError::Queue(q, e) => write!(f, "queue={} {}", q, e.name()),
            SetupError::Busy => f.write_str("busy"),
        }
    }
}

/// An error while driving: `<reason>[=<value>][ <queue>]`.
struct DriveError {
    error: Error,
    /// `inflate`, `deflate` or `stats`.
    queue: Option<&'static str>,
}

impl fmt::Display for DriveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.error.name())?;
        match self.error {
            Error::BadUsedId(v) => write!(f, "={}", v)?,
            Error::BadUsedIdx(v) => write!(f, "={}", v)?,
            _ => {}
        }
        match self.queue {
            Some(queue) => write!(f, " {}", queue),
            None => Ok(()),
        }
    }
}

/// A live device: its transport and queues.
struct Device {
    transport: Transport,
    inflate: Virtqueue,
    deflate: Virtqueue,
    /// With `STATS_VQ`.
    stats: Option<Virtqueue>,
}

impl Device {
    /// Resets the device; prints `probe.balloon=error reset-timeout` if it
    /// does not confirm (it is then marked FAILED).
    fn stop(self) {
        let queues = [self.inflate, self.deflate].into_iter().chain(self.stats);
        if self.transport.shutdown(queues).is_err() {
            outln!("probe.balloon=error reset-timeout");
        }
    }
}

/// Sets up queue `index`, without used-buffer notifications (the driver
/// polls); marks the device FAILED if that fails.
fn setup_queue(transport: &mut Transport, index: u32) -> Result<Virtqueue, SetupError> {
    match transport.setup_queue(index) {
        Ok(mut queue) => {
            queue.disable_interrupts();
            Ok(queue)
        }
        Err(e) => {
            transport.fail();
            Err(SetupError::Queue(index, e))
        }
    }
}

/// Negotiates features and sets up the queues (inflate, deflate, and
/// statistics with `STATS_VQ`).
fn setup(regs: Regs) -> Result<Device, SetupError> {
    let mut transport = Transport::new(regs).map_err(SetupError::Transport)?;
    let features = transport
        .negotiate(feature::STATS_VQ | feature::DEFLATE_ON_OOM, 0)
        .map_err(SetupError::Transport)?;
    let inflate = setup_queue(&mut transport, INFLATE_QUEUE)?;
    let deflate = setup_queue(&mut transport, DEFLATE_QUEUE)?;
    let stats = if features & feature::STATS_VQ != 0 {
        Some(setup_queue(&mut transport, STATS_QUEUE)?)
    } else {
        None
    };
    Ok(Device {
        transport,
        inflate,
        deflate,
        stats,
    })
}

/// Writes `figures` into the statistics buffer and makes it available
/// (the caller notifies).
fn post_stats(queue: &mut Virtqueue, mem: *mut Buffers, figures: &Figures) -> Result<(), Error> {
    let stats = encode_stats(figures);
    // SAFETY: the statistics buffer is not in flight (the device returned
    // it, or never had it), so the device does not read it; raw pointers
    // only.
    let addr = unsafe {
        let buffer = &raw mut (*mem).stats;
        buffer.write_volatile(stats);
        buffer as u64
    };
    let buffer = Buffer {
        addr,
        len: STATS_LEN as u32,
        device_writes: false,
    };
    // SAFETY: the buffer is in the static memory this driver owns for good
    // and is not written again until the device returns it.
    unsafe { queue.add(&[buffer]) }.map(|_| ())
}

/// A balloon device being driven, and its pool.
pub struct Balloon {
    /// `None` once the device was stopped.
    device: Option<Device>,
    mem: *mut Buffers,
    pool: Pool,
    /// Pages in the balloon: the top `actual` pages of the pool.
    actual: u32,
    /// Polls so far.
    polls: u64,
    /// Times the device asked for statistics.
    stats_asked: u64,
    /// RAM in the memory map, in bytes.
    ram: u64,
}

/// Finds the pool of `mib` MiB below the top `reserved` bytes of free RAM,
/// sets up the balloon device behind `regs` up to its queues, fills the
/// pool, sets DRIVER_OK and polls the device once. `None` (said on the
/// console) if there is no room or setup fails.
pub fn start(
    regs: Regs,
    mib: u32,
    map: &e820::Map,
    image: (u64, u64),
    reserved: u64,
) -> Option<Balloon> {
    let Some(pool) = Pool::find(map, image, reserved, mib) else {
        outln!("probe.balloon_error=no-free-ram,{}", mib);
        return None;
    };
    let Some(mem) = BUFFERS.take() else {
        outln!("probe.balloon=error setup {}", SetupError::Busy);
        return None;
    };
    let mut device = match setup(regs) {
        Ok(device) => device,
        Err(e) => {
            outln!("probe.balloon=error setup {}", e);
            return None;
        }
    };
    // Filled before DRIVER_OK: from then on the host may ask for pages.
    pool.fill(0..pool.pages);
    outln!("probe.balloon=pool {} MiB at {:#x}", mib, pool.base);
    let mut balloon = Balloon {
        device: None,
        mem,
        pool,
        actual: 0,
        polls: 0,
        stats_asked: 0,
        ram: e820::ram_bytes(map),
    };
    if let Err(e) = balloon.activate(&mut device) {
        outln!("probe.balloon=error setup {}", e);
        device.stop();
        return None;
    }
    outln!(
        "probe.balloon=up stats={} deflate_on_oom={}",
        u8::from(device.stats.is_some()),
        u8::from(device.transport.features() & feature::DEFLATE_ON_OOM != 0)
    );
    balloon.device = Some(device);
    balloon.poll();
    Some(balloon)
}

impl Balloon {
    /// Posts the statistics buffer, sets DRIVER_OK and notifies the
    /// statistics queue (the caller stops the device on failure).
    fn activate(&self, device: &mut Device) -> Result<(), SetupError> {
        if let Some(stats) = device.stats.as_mut() {
            post_stats(stats, self.mem, &self.figures())
                .map_err(|e| SetupError::Queue(STATS_QUEUE, e))?;
        }
        device.transport.driver_ok();
        if device.transport.status() & virtio::status::DEVICE_NEEDS_RESET != 0 {
            return Err(SetupError::Transport(Error::DeviceNeedsReset));
        }
        if let Some(stats) = device.stats.as_ref() {
            device.transport.notify(stats);
        }
        Ok(())
    }

    fn figures(&self) -> Figures {
        Figures {
            polls: self.polls,
            free: u64::from(self.pool.pages - self.actual) * PAGE,
            total: self.ram,
        }
    }

    /// Moves the balloon to the host's target and answers a request for
    /// statistics. Does nothing once the device was stopped.
    pub fn poll(&mut self) {
        let Some(mut device) = self.device.take() else {
            return;
        };
        self.polls += 1;
        match self.step(&mut device) {
            Ok(()) => self.device = Some(device),
            Err(e) => {
                outln!("probe.balloon=error {}", e);
                device.stop();
            }
        }
    }

    fn step(&mut self, device: &mut Device) -> Result<(), DriveError> {
        if device.transport.status() & virtio::status::DEVICE_NEEDS_RESET != 0 {
            return Err(DriveError {
                error: Error::DeviceNeedsReset,
                queue: None,
            });
        }
        let target = device
            .transport
            .config_read32(config::NUM_PAGES)
            .min(self.pool.pages);
        let before = self.actual;
        let moved = self.move_to(device, target);
        if self.actual != before {
            self.pool.check(self.pool.pages - self.actual);
            outln!("probe.balloon={} pages", self.actual);
        }
        moved?;
        self.serve_stats(device)
    }

    /// Inflates or deflates until `target` (at most the pool's pages) pages
    /// are in the balloon, writing `actual` after each request.
    fn move_to(&mut self, device: &mut Device, target: u32) -> Result<(), DriveError> {
        while self.actual < target {
            let count = (target - self.actual).min(PFNS_PER_REQUEST);
            // The pages right below the balloon.
            let first = self.pool.pages - self.actual - count;
            self.send(device, true, first..first + count)?;
            self.actual += count;
            device.transport.config_write32(config::ACTUAL, self.actual);
        }
        while self.actual > target {
            let count = (self.actual - target).min(PFNS_PER_REQUEST);
            // The balloon's lowest pages.
            let first = self.pool.pages - self.actual;
            self.send(device, false, first..first + count)?;
            self.actual -= count;
            device.transport.config_write32(config::ACTUAL, self.actual);
            self.pool.fill(first..first + count);
        }
        Ok(())
    }

    /// Sends the PFNs of the pool pages `pages` (at most
    /// [`PFNS_PER_REQUEST`]) on the inflate or deflate queue and waits
    /// until the device has taken them.
    fn send(
        &self,
        device: &mut Device,
        inflate: bool,
        pages: Range<u32>,
    ) -> Result<(), DriveError> {
        let (queue, name) = if inflate {
            (&mut device.inflate, "inflate")
        } else {
            (&mut device.deflate, "deflate")
        };
        let fail = |error| DriveError {
            error,
            queue: Some(name),
        };
        // SAFETY: no request is in flight (each one is waited for, and
        // the device is reset after a failed one), so the device does not
        // read the PFN buffer, and nothing else refers to it.
        let pfns = unsafe { &mut (*self.mem).pfns };
        let mut count: u32 = 0;
        for (slot, page) in pfns.iter_mut().zip(pages) {
            *slot = self.pool.pfn(page).to_le();
            count += 1;
        }
        let buffer = Buffer {
            addr: pfns.as_ptr() as u64,
            len: count * 4,
            device_writes: false,
        };
        // SAFETY: the PFN buffer is in the static memory this driver owns
        // for good, and it is not written again until this request comes
        // back (waited for below) or the device is reset.
        unsafe { queue.add(&[buffer]) }.map_err(fail)?;
        device.transport.notify(queue);
        queue
            .wait_used(&device.transport, REQUEST_TIMEOUT_MS)
            .map_err(fail)?;
        Ok(())
    }

    /// If the device returned the statistics buffer (it wants new
    /// figures), posts it again with fresh ones and prints how many times
    /// it asked.
    fn serve_stats(&mut self, device: &mut Device) -> Result<(), DriveError> {
        let Some(queue) = device.stats.as_mut() else {
            return Ok(());
        };
        let fail = |error| DriveError {
            error,
            queue: Some("stats"),
        };
        if queue.pop_used().map_err(fail)?.is_none() {
            return Ok(());
        }
        self.stats_asked += 1;
        post_stats(queue, self.mem, &self.figures()).map_err(fail)?;
        device.transport.notify(queue);
        outln!("probe.balloon_stats={}", self.stats_asked);
        Ok(())
    }
}
