//! virtio block device (device id 2), driven through [`crate::virtio`].
//!
//! With `probe.blk=<mode>` on the command line, every virtio-blk device is
//! exercised and reported as one line `probe.blk<i>=...` (`i` counts
//! virtio-blk devices in command-line order, from 0):
//!
//! * `write`: fills the first `probe.blk_mib` MiB (default 4, clamped to
//!   the capacity) with a pattern, flushes (if `VIRTIO_BLK_F_FLUSH`),
//!   reads it back and compares. Sector `s` holds the little-endian `u64`
//!   `s ^ probe.seed` 64 times. A read-only device (`VIRTIO_BLK_F_RO`)
//!   instead gets one single-sector write at sector 0, which it must
//!   reject.
//! * `verify`: only reads back and compares.
//! * `discard`: discards the range (`VIRTIO_BLK_T_DISCARD`, split by
//!   `max_discard_sectors`), then flushes.
//! * `journal`: writes numbered, checksummed records over the range in
//!   rounds of [`JOURNAL_ROUND_SECTORS`], each round followed by a FLUSH,
//!   and after each completed flush prints `probe.journal=<n>`: records
//!   `0..n` are durable. Record `s` is sector `s`: word 0 is `s ^ seed`,
//!   word `i` (1 to 62) is [`record_word`], and word 63 the FNV-1a hash of
//!   words 0 to 62. The host kills the VMM and the backend mid-run and
//!   checks every record the last line promised (tests/tests/durability.rs).
//!
//! With `probe.blk_rounds=<n>` (default 1) the test runs `n` times on the
//! same activation, each round reported on its own line, and stops at the
//! first one that fails: a device busy for a while, for snapshots taken
//! while its requests are in flight. Reads poison their buffers before
//! they are submitted, so that a short read cannot pass as data; after the
//! first round only each request's first sector, so that the rest of a
//! buffer is written by the device alone (a Diff snapshot must find those
//! pages, which KVM's dirty log cannot see) while a device that stopped
//! writing is still caught.
//!
//! Requests carry at most 64 KiB; up to [`SLOTS`] of them are in flight,
//! spread round-robin over up to [`MAX_QUEUES`] queues
//! (`VIRTIO_BLK_F_MQ`). Every wait for a completion is bounded (2 s, PIT
//! timed), so a dead backend yields `error timeout ...` and the probe
//! moves on. Everything the device returns (config fields, used ids and
//! lengths, status bytes) is checked before use.
//!
//! Buffers live in one static pool (in `.probe_noinit`: written before
//! they are read, so not zeroed at boot), owned by one device at a
//! time. It is reused by the next device even if a device did not confirm
//! its reset: it only holds data, headers and status bytes (the rings of
//! such a device stay allocated in the queue pool), so a late write from
//! a zombie device could only make a later test report a mismatch or a
//! bad status, never fault the probe; and a later device must still be
//! tested.

use core::arch::asm;
use core::cell::UnsafeCell;
use core::fmt;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::cmdline::{self, BadOption};
use crate::serial::outln;
use crate::timer;
use crate::virtio::{self, Buffer, Error, Regs, Transport, Virtqueue};

/// virtio device id of the block device.
pub const DEVICE_ID: u32 = 2;

/// Feature bits (virtio 1.x, section 5.2.3).
mod feature {
    pub const SIZE_MAX: u64 = 1 << 1;
    pub const SEG_MAX: u64 = 1 << 2;
    pub const RO: u64 = 1 << 5;
    pub const BLK_SIZE: u64 = 1 << 6;
    pub const FLUSH: u64 = 1 << 9;
    pub const MQ: u64 = 1 << 12;
    pub const DISCARD: u64 = 1 << 13;
}

/// Every feature the driver understands (`VIRTIO_F_VERSION_1` is added by
/// [`Transport::negotiate`]).
const WANTED_FEATURES: u64 = feature::SIZE_MAX
    | feature::SEG_MAX
    | feature::RO
    | feature::BLK_SIZE
    | feature::FLUSH
    | feature::MQ
    | feature::DISCARD;

/// Offsets in `struct virtio_blk_config`.
mod config {
    /// `le64 capacity`, in 512-byte sectors.
    pub const CAPACITY: u64 = 0;
    /// `le32 size_max`: bytes per data descriptor (`SIZE_MAX`).
    pub const SIZE_MAX: u64 = 8;
    /// `le32 seg_max`: data descriptors per request (`SEG_MAX`).
    pub const SEG_MAX: u64 = 12;
    /// `le16 num_queues` (`MQ`).
    pub const NUM_QUEUES: u64 = 34;
    /// `le32 max_discard_sectors` (`DISCARD`).
    pub const MAX_DISCARD_SECTORS: u64 = 36;
    /// `le32 discard_sector_alignment` (`DISCARD`).
    pub const DISCARD_SECTOR_ALIGNMENT: u64 = 44;
}

/// Request status values.
const STATUS_OK: u8 = 0;
const STATUS_IOERR: u8 = 1;
const STATUS_UNSUPP: u8 = 2;
/// Written before a request is submitted; the device must overwrite it.
const STATUS_UNSET: u8 = 0xff;

const SECTOR_SIZE: u32 = 512;
const WORDS_PER_SECTOR: usize = SECTOR_SIZE as usize / 8;
const SECTORS_PER_MIB: u64 = 2048;
/// Largest data transfer of one request.
const REQUEST_MAX_BYTES: u32 = 64 * 1024;
/// Requests in flight at once (each owns one 64 KiB buffer).
pub const SLOTS: usize = 4;
/// Most queues used with `VIRTIO_BLK_F_MQ`.
pub const MAX_QUEUES: usize = 4;
/// Most data descriptors per request.
const MAX_SEGMENTS: usize = 16;
/// Time allowed for the next completion.
const REQUEST_TIMEOUT_MS: u32 = 2000;
/// How completions are timed ([`timer::Deadline::start_with`]).
#[derive(Clone, Copy, Debug)]
struct Timing {
    min_spins: u64,
    spins_per_check: u64,
    max_spins: u64,
}

/// With a PIT the deadline is real time: OUT2 is read every 64 polls, so
/// that even an emulated (slow) guest sees each 50 ms chunk end on time.
/// The spin ceiling only matters if OUT2 never rises.
const TIMING_WITH_PIT: Timing = Timing {
    min_spins: 256,
    spins_per_check: 64,
    max_spins: 1 << 26,
};
/// Without a PIT (QEMU microvm has no port 0x61) the spin count is the
/// only clock: about 5 s on TCG, well under a second on a native vCPU.
const TIMING_WITHOUT_PIT: Timing = Timing {
    min_spins: 1 << 25,
    spins_per_check: 4096,
    max_spins: u64::MAX,
};
/// Sectors in one slot's buffer.
const SECTORS_PER_SLOT: usize = (REQUEST_MAX_BYTES / SECTOR_SIZE) as usize;
/// Default of `probe.blk_mib`.
const DEFAULT_MIB: u32 = 4;
/// Records written between two flushes in `journal` mode.
pub const JOURNAL_ROUND_SECTORS: u64 = 16;
/// Sectors per write request in `journal` mode (so that a round keeps
/// several requests in flight).
const JOURNAL_REQUEST_SECTORS: u64 = 2;

/// What `probe.blk=` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Write,
    Verify,
    Discard,
    Journal,
}

/// Block test options from the command line.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub mode: Mode,
    /// Sectors to cover (`probe.blk_mib` * 2048), before clamping.
    pub sectors: u64,
    /// `probe.seed`.
    pub seed: u64,
    /// `probe.blk_rounds`.
    pub rounds: u32,
}

/// Reads `probe.blk`, `probe.blk_mib`, `probe.blk_rounds` and
/// `probe.seed` (last one wins;
/// numbers are base 0 like `kstrtoull`). `Ok(None)` without `probe.blk`.
pub fn options(cmdline: &[u8]) -> Result<Option<Options>, BadOption<'_>> {
    let Some(mode) = cmdline::last_value(cmdline, "probe.blk") else {
        return Ok(None);
    };
    let mode = match mode {
        Some(b"write") => Mode::Write,
        Some(b"verify") => Mode::Verify,
        Some(b"discard") => Mode::Discard,
        Some(b"journal") => Mode::Journal,
        value => {
            return Err(BadOption {
                name: "probe.blk",
                value,
            });
        }
    };
    let mib = match cmdline::last_value(cmdline, "probe.blk_mib") {
        None => DEFAULT_MIB,
        Some(value) => value
            .and_then(|v| cmdline::kstrtouint(v, 0))
            .ok_or(BadOption {
                name: "probe.blk_mib",
                value,
            })?,
    };
    let seed = match cmdline::last_value(cmdline, "probe.seed") {
        None => 0,
        Some(value) => value
            .and_then(|v| cmdline::kstrtoull(v, 0))
            .ok_or(BadOption {
                name: "probe.seed",
                value,
            })?,
    };
    let rounds = match cmdline::last_value(cmdline, "probe.blk_rounds") {
        None => 1,
        Some(value) => value
            .and_then(|v| cmdline::kstrtouint(v, 0))
            .filter(|&n| n > 0)
            .ok_or(BadOption {
                name: "probe.blk_rounds",
                value,
            })?,
    };
    Ok(Some(Options {
        mode,
        sectors: u64::from(mib) * SECTORS_PER_MIB,
        seed,
        rounds,
    }))
}

/// Request types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Flush,
    Discard,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Discard => "discard",
        }
    }

    /// `VIRTIO_BLK_T_*`.
    fn request_type(self) -> u32 {
        match self {
            Op::Read => 0,
            Op::Write => 1,
            Op::Flush => 4,
            Op::Discard => 11,
        }
    }
}

/// Why a device test failed (the text after `error `).
#[derive(Clone, Copy, Debug)]
enum Failure {
    /// Transport or negotiation error: `setup <reason>`.
    Setup(Error),
    /// `setup queue=<q> <reason>`.
    SetupQueue(usize, Error),
    /// Unusable config value: `setup <field>=<value>`.
    SetupConfig(&'static str, u64),
    /// Internal: the buffer pool is in use: `setup dma-busy`.
    DmaBusy,
    /// `status=<v> op=<op> sector=<s>`.
    Status {
        status: u8,
        op: Op,
        sector: u64,
    },
    /// `timeout op=<op> sector=<s>`.
    Timeout {
        op: Op,
        sector: u64,
    },
    /// A queue or device error while a request was in flight:
    /// `<reason>[=<value>] op=<op> sector=<s>`.
    Device {
        error: Error,
        op: Op,
        sector: u64,
    },
    /// The used length exceeds the device-writable bytes:
    /// `bad-used-len=<len> op=<op> sector=<s>`.
    BadUsedLen {
        len: u32,
        op: Op,
        sector: u64,
    },
    /// Internal: requests remain but none can be submitted.
    Stalled,
    /// The device did not confirm a reset after the test.
    ResetTimeout,
    RoWriteAccepted,
    DiscardNotOffered,
    /// `journal` on a read-only device or one without FLUSH.
    JournalNeedsWritableFlush,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Failure::Setup(e) => write!(f, "setup {}", e.name()),
            Failure::SetupQueue(q, e) => write!(f, "setup queue={} {}", q, e.name()),
            Failure::SetupConfig(field, value) => write!(f, "setup {}={}", field, value),
            Failure::DmaBusy => f.write_str("setup dma-busy"),
            Failure::Status { status, op, sector } => {
                write!(f, "status={} op={} sector={}", status, op.name(), sector)
            }
            Failure::Timeout { op, sector } => {
                write!(f, "timeout op={} sector={}", op.name(), sector)
            }
            Failure::Device { error, op, sector } => {
                f.write_str(error.name())?;
                match error {
                    Error::BadUsedId(v) => write!(f, "={}", v)?,
                    Error::BadUsedIdx(v) => write!(f, "={}", v)?,
                    _ => {}
                }
                write!(f, " op={} sector={}", op.name(), sector)
            }
            Failure::BadUsedLen { len, op, sector } => {
                write!(f, "bad-used-len={} op={} sector={}", len, op.name(), sector)
            }
            Failure::Stalled => f.write_str("stalled"),
            Failure::ResetTimeout => f.write_str("reset-timeout"),
            Failure::RoWriteAccepted => f.write_str("ro-write-accepted"),
            Failure::DiscardNotOffered => f.write_str("discard-not-offered"),
            Failure::JournalNeedsWritableFlush => f.write_str("journal-needs-writable-flush"),
        }
    }
}

/// Result of one device test (the text after `probe.blk<i>=`).
#[derive(Clone, Copy, Debug)]
enum Outcome {
    Ok { sectors: u64, queues: usize },
    Mismatch { sector: u64 },
    RoWriteRejected { status: u8 },
    Discarded { sectors: u64 },
    Journaled { sectors: u64 },
    Error(Failure),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Outcome::Ok { sectors, queues } => {
                write!(f, "ok sectors={} queues={}", sectors, queues)
            }
            Outcome::Mismatch { sector } => write!(f, "mismatch sector={}", sector),
            Outcome::RoWriteRejected { status } => {
                write!(f, "ro-write-rejected status={}", status)
            }
            Outcome::Discarded { sectors } => write!(f, "discarded sectors={}", sectors),
            Outcome::Journaled { sectors } => write!(f, "journaled sectors={}", sectors),
            Outcome::Error(failure) => write!(f, "error {}", failure),
        }
    }
}

/// `struct virtio_blk_outhdr` (device-readable).
#[repr(C)]
#[derive(Clone, Copy)]
struct RequestHeader {
    request_type: u32,
    reserved: u32,
    sector: u64,
}

/// `struct virtio_blk_discard_write_zeroes` (device-readable).
#[repr(C)]
#[derive(Clone, Copy)]
struct DiscardSegment {
    sector: u64,
    num_sectors: u32,
    flags: u32,
}

/// Buffers of the [`SLOTS`] request slots.
#[repr(C, align(4096))]
struct DmaMem {
    data: [[u64; REQUEST_MAX_BYTES as usize / 8]; SLOTS],
    header: [RequestHeader; SLOTS],
    discard: [DiscardSegment; SLOTS],
    status: [u8; SLOTS],
}

/// The static buffer pool, owned by at most one device at a time.
struct DmaPool {
    mem: UnsafeCell<MaybeUninit<DmaMem>>,
}

// SAFETY: the probe is single-threaded with interrupts disabled; the
// memory is only reached through the pointer handed out by `take`, and
// `DMA_TAKEN` ensures a single owner at a time.
unsafe impl Sync for DmaPool {}

/// Not zeroed at boot (`.probe_noinit`, see link.ld; zeroing 260 KiB
/// costs ~25 ms under kvm_pvm): every byte is written before it is read.
/// Headers, discard segments and status bytes are written at submission,
/// data buffers by the pattern fill (writes) or the poison fill (reads).
#[unsafe(link_section = ".probe_noinit.virtio_blk")]
static DMA: DmaPool = DmaPool {
    mem: UnsafeCell::new(MaybeUninit::uninit()),
};
static DMA_TAKEN: AtomicBool = AtomicBool::new(false);

impl DmaPool {
    fn take(&self) -> Option<*mut DmaMem> {
        (!DMA_TAKEN.swap(true, Ordering::Relaxed)).then(|| self.mem.get().cast::<DmaMem>())
    }

    fn give_back(&self) {
        DMA_TAKEN.store(false, Ordering::Relaxed);
    }
}

/// One request in flight (or an idle slot).
#[derive(Clone, Copy, Debug)]
struct Slot {
    busy: bool,
    queue: usize,
    head: u16,
    op: Op,
    sector: u64,
    sectors: u32,
    /// Device-writable bytes in the chain (bound for the used length).
    writable: u32,
    /// Submission order.
    seq: u64,
}

const IDLE: Slot = Slot {
    busy: false,
    queue: 0,
    head: 0,
    op: Op::Read,
    sector: 0,
    sectors: 0,
    writable: 0,
    seq: 0,
};

/// A set-up virtio-blk device with the buffer pool.
struct Blk {
    transport: Transport,
    queues: [Option<Virtqueue>; MAX_QUEUES],
    num_queues: usize,
    /// Queue of the next request (round-robin).
    next_queue: usize,
    features: u64,
    capacity: u64,
    /// Bytes per data descriptor.
    segment_bytes: u32,
    /// Sectors per read/write request.
    request_sectors: u32,
    mem: *mut DmaMem,
    slots: [Slot; SLOTS],
    seq: u64,
    timing: Timing,
    /// Writes carry journal records instead of the plain pattern.
    records: bool,
    /// Rounds of `probe.blk_rounds` completed.
    rounds_done: u32,
}

/// Tests the virtio-blk device behind `regs` as `options` ask and prints
/// `probe.blk<index>=...`, then (with kvm-clock) `probe.blk<index>_ms=<t>`:
/// the milliseconds every round took together.
pub fn probe(index: u32, regs: Regs, options: &Options) {
    let start = crate::timer::now_ns();
    let report = |outcome: &Outcome| outln!("probe.blk{}={}", index, outcome);
    report(&run(regs, options, report));
    if let (Some(start), Some(end)) = (start, crate::timer::now_ns()) {
        outln!(
            "probe.blk{}_ms={}",
            index,
            end.saturating_sub(start)
                .saturating_sub(crate::msix::take_elapsed_ns())
                / 1_000_000
        );
    }
}

/// Runs the test; every round's outcome but the last goes to `report`.
fn run(regs: Regs, options: &Options, report: impl Fn(&Outcome)) -> Outcome {
    let transport = match Transport::new(regs) {
        Ok(t) => t,
        Err(e) => return Outcome::Error(Failure::Setup(e)),
    };
    let Some(mem) = DMA.take() else {
        return Outcome::Error(Failure::DmaBusy);
    };
    let mut blk = Blk {
        transport,
        queues: [const { None }; MAX_QUEUES],
        num_queues: 0,
        next_queue: 0,
        features: 0,
        capacity: 0,
        segment_bytes: 0,
        request_sectors: 0,
        mem,
        slots: [IDLE; SLOTS],
        seq: 0,
        timing: TIMING_WITH_PIT,
        records: false,
        rounds_done: 0,
    };
    let mut outcome = match blk.setup().and_then(|()| {
        blk.check_msix();
        blk.exercise(options)
    }) {
        Ok(outcome) => outcome,
        Err(failure) => Outcome::Error(failure),
    };
    for _ in 1..options.rounds {
        if !matches!(outcome, Outcome::Ok { .. } | Outcome::Journaled { .. }) {
            break;
        }
        report(&outcome);
        blk.rounds_done += 1;
        outcome = blk.exercise(options).unwrap_or_else(Outcome::Error);
    }
    match blk.finish() {
        Ok(()) => outcome,
        Err(_) if !matches!(outcome, Outcome::Error(_)) => Outcome::Error(Failure::ResetTimeout),
        Err(_) => outcome,
    }
}

/// The smallest segment Linux lets a device limit requests to.
const PAGE_SIZE: u32 = 4096;

impl Blk {
    /// Negotiates features, reads and checks the config fields, sets up
    /// the queues and sets DRIVER_OK.
    fn setup(&mut self) -> Result<(), Failure> {
        let t = &mut self.transport;
        self.features = t.negotiate(WANTED_FEATURES, 0).map_err(Failure::Setup)?;
        self.capacity = t.config_read64(config::CAPACITY);
        let mut segment_bytes = REQUEST_MAX_BYTES;
        if self.features & feature::SIZE_MAX != 0 {
            // Like Linux, a size_max below a page means a page (QEMU's
            // qemu-storage-daemon offers SIZE_MAX with size_max 0).
            let size_max = t.config_read32(config::SIZE_MAX).max(PAGE_SIZE);
            segment_bytes = segment_bytes.min(size_max);
        }
        let mut segments = MAX_SEGMENTS as u32;
        if self.features & feature::SEG_MAX != 0 {
            // Like Linux, 0 means one segment.
            segments = segments.min(t.config_read32(config::SEG_MAX).max(1));
        }
        let mut num_queues = 1;
        if self.features & feature::MQ != 0 {
            // Like Linux, 0 means one queue.
            let offered = t.config_read16(config::NUM_QUEUES).max(1);
            num_queues = usize::from(offered).min(MAX_QUEUES);
        }
        let mut min_size = u16::MAX;
        for q in 0..num_queues {
            let queue = t
                .setup_queue(q as u32)
                .map_err(|e| Failure::SetupQueue(q, e))?;
            min_size = min_size.min(queue.size());
            self.queues[q] = Some(queue);
        }
        // Header and status take two descriptors.
        if min_size < 3 {
            return Err(Failure::SetupConfig("queue-size", u64::from(min_size)));
        }
        segments = segments.min(u32::from(min_size) - 2);
        let bytes = segments
            .saturating_mul(segment_bytes)
            .min(REQUEST_MAX_BYTES);
        let request_sectors = bytes / SECTOR_SIZE;
        if request_sectors == 0 {
            return Err(Failure::SetupConfig("size_max", u64::from(segment_bytes)));
        }
        self.num_queues = num_queues;
        self.segment_bytes = segment_bytes;
        self.request_sectors = request_sectors;
        t.driver_ok();
        if t.status() & virtio::status::DEVICE_NEEDS_RESET != 0 {
            return Err(Failure::Setup(Error::DeviceNeedsReset));
        }
        self.timing = if timer::present() {
            TIMING_WITH_PIT
        } else {
            TIMING_WITHOUT_PIT
        };
        Ok(())
    }

    /// `probe.msix` on a PCI device: the MSI-X check (see `msix.rs`),
    /// each of its requests a one-sector read of sector 0 on queue 0.
    fn check_msix(&mut self) {
        let Some(target) = self.transport.msix_target() else {
            return;
        };
        crate::msix::check(&target, || {
            self.next_queue = 0;
            matches!(self.single(Op::Read, 0, 1, 0), Ok(STATUS_OK))
        });
        self.next_queue = 0;
    }

    /// Resets the device (returning its queue memory if it confirms the
    /// reset) and gives the buffer pool back (see the module docs).
    fn finish(self) -> Result<(), Error> {
        let Blk {
            transport, queues, ..
        } = self;
        let result = transport.shutdown(queues.into_iter().flatten());
        DMA.give_back();
        result
    }

    fn read_only(&self) -> bool {
        self.features & feature::RO != 0
    }

    fn exercise(&mut self, options: &Options) -> Result<Outcome, Failure> {
        let total = options.sectors.min(self.capacity);
        match options.mode {
            Mode::Write if self.read_only() => self.write_read_only(options.seed),
            Mode::Write => {
                let per_request = u64::from(self.request_sectors);
                self.run_range(Op::Write, 0..total, per_request, options.seed)?;
                self.flush()?;
                self.verify(total, options.seed)
            }
            Mode::Verify => self.verify(total, options.seed),
            Mode::Discard => self.discard(total),
            Mode::Journal => self.journal(total, options.seed),
        }
    }

    /// `journal` mode (see the module docs).
    fn journal(&mut self, total: u64, seed: u64) -> Result<Outcome, Failure> {
        if self.read_only() || self.features & feature::FLUSH == 0 {
            return Err(Failure::JournalNeedsWritableFlush);
        }
        let per_request = JOURNAL_REQUEST_SECTORS.min(u64::from(self.request_sectors));
        let mut durable = 0;
        while durable < total {
            let end = (durable + JOURNAL_ROUND_SECTORS).min(total);
            self.records = true;
            let written = self.run_range(Op::Write, durable..end, per_request, seed);
            self.records = false;
            written?;
            self.flush()?;
            durable = end;
            outln!("probe.journal={}", durable);
        }
        Ok(Outcome::Journaled { sectors: durable })
    }

    fn verify(&mut self, total: u64, seed: u64) -> Result<Outcome, Failure> {
        let per_request = u64::from(self.request_sectors);
        Ok(
            match self.run_range(Op::Read, 0..total, per_request, seed)? {
                None => Outcome::Ok {
                    sectors: total,
                    queues: self.num_queues,
                },
                Some(sector) => Outcome::Mismatch { sector },
            },
        )
    }

    /// `VIRTIO_BLK_T_FLUSH`, if the device offers it.
    fn flush(&mut self) -> Result<(), Failure> {
        if self.features & feature::FLUSH == 0 {
            return Ok(());
        }
        match self.single(Op::Flush, 0, 0, 0)? {
            STATUS_OK => Ok(()),
            status => Err(Failure::Status {
                status,
                op: Op::Flush,
                sector: 0,
            }),
        }
    }

    /// One pattern sector written to sector 0 of a read-only device.
    fn write_read_only(&mut self, seed: u64) -> Result<Outcome, Failure> {
        match self.single(Op::Write, 0, 1, seed)? {
            STATUS_OK => Err(Failure::RoWriteAccepted),
            status @ (STATUS_IOERR | STATUS_UNSUPP) => Ok(Outcome::RoWriteRejected { status }),
            status => Err(Failure::Status {
                status,
                op: Op::Write,
                sector: 0,
            }),
        }
    }

    fn discard(&mut self, total: u64) -> Result<Outcome, Failure> {
        if self.features & feature::DISCARD == 0 {
            return Err(Failure::DiscardNotOffered);
        }
        let t = &self.transport;
        // Like Linux, 0 means no limit.
        let mut max = match t.config_read32(config::MAX_DISCARD_SECTORS) {
            0 => u32::MAX,
            max => max,
        };
        let alignment = t.config_read32(config::DISCARD_SECTOR_ALIGNMENT);
        if alignment > 1 && alignment <= max {
            max -= max % alignment;
        }
        self.run_range(Op::Discard, 0..total, u64::from(max), 0)?;
        self.flush()?;
        Ok(Outcome::Discarded { sectors: total })
    }

    /// Descriptors a request needs.
    fn descriptors(&self, op: Op, sectors: u32) -> usize {
        let data = match op {
            Op::Read | Op::Write => {
                let bytes = sectors.saturating_mul(SECTOR_SIZE);
                bytes.div_ceil(self.segment_bytes.max(1)) as usize
            }
            Op::Discard => 1,
            Op::Flush => 0,
        };
        data + 2
    }

    /// Runs one request in slot 0 (nothing else may be in flight) and
    /// returns its status byte.
    fn single(&mut self, op: Op, sector: u64, sectors: u32, seed: u64) -> Result<u8, Failure> {
        if op == Op::Write {
            self.fill(0, sector, sectors, seed);
        }
        self.submit(0, op, sector, sectors)?;
        let slot = self.complete_one()?;
        Ok(self.status(slot))
    }

    /// Covers sectors `range` with `op` requests of at most
    /// `per_request` sectors, keeping up to [`SLOTS`] in flight. Returns
    /// the first sector that read back wrong (reads only). After an error
    /// status or a mismatch no new request is started and the ones in
    /// flight are drained; the first error wins over any mismatch.
    fn run_range(
        &mut self,
        op: Op,
        range: core::ops::Range<u64>,
        per_request: u64,
        seed: u64,
    ) -> Result<Option<u64>, Failure> {
        let per_request = per_request.max(1);
        let total = range.end;
        let mut next: u64 = range.start;
        let mut count: usize = 0;
        let mut mismatch: Option<u64> = None;
        let mut failure: Option<Failure> = None;
        loop {
            while failure.is_none() && mismatch.is_none() && next < total {
                let slot = count % SLOTS;
                if self.slots[slot].busy {
                    break;
                }
                let sectors = per_request.min(total - next) as u32;
                let free = self.queues[self.next_queue]
                    .as_ref()
                    .map_or(0, |q| usize::from(q.num_free()));
                if free < self.descriptors(op, sectors) {
                    break;
                }
                match op {
                    Op::Write => self.fill(slot, next, sectors, seed),
                    // Poison, so that a short read cannot pass as data;
                    // after the first round only a request's first sector
                    // (see the module docs).
                    Op::Read => {
                        let poisoned = if self.rounds_done == 0 { sectors } else { 1 };
                        self.fill(slot, next, poisoned, !seed)
                    }
                    Op::Flush | Op::Discard => {}
                }
                self.submit(slot, op, next, sectors)?;
                next += u64::from(sectors);
                count += 1;
            }
            if !self.slots.iter().any(|s| s.busy) {
                if failure.is_none() && mismatch.is_none() && next < total {
                    return Err(Failure::Stalled);
                }
                break;
            }
            let slot = self.complete_one()?;
            let done = self.slots[slot];
            match self.status(slot) {
                STATUS_OK => {
                    if op == Op::Read
                        && let Some(bad) = self.check(slot, done.sector, done.sectors, seed)
                    {
                        mismatch = Some(mismatch.map_or(bad, |m| m.min(bad)));
                    }
                }
                status => {
                    failure.get_or_insert(Failure::Status {
                        status,
                        op,
                        sector: done.sector,
                    });
                }
            }
        }
        match failure {
            Some(failure) => Err(failure),
            None => Ok(mismatch),
        }
    }

    /// Builds the chain of `op` in `slot` (data already filled) and
    /// publishes it on the next queue in turn.
    fn submit(&mut self, slot: usize, op: Op, sector: u64, sectors: u32) -> Result<(), Failure> {
        let mem = self.mem;
        let q = self.next_queue;
        let mut buffers = [Buffer {
            addr: 0,
            len: 0,
            device_writes: false,
        }; MAX_SEGMENTS + 2];
        let header_sector = if matches!(op, Op::Read | Op::Write) {
            sector
        } else {
            0
        };
        // SAFETY: the slot is idle, so the device does not own its header,
        // discard segment or status byte; `mem` is the pool this driver
        // took, and only raw pointers reach it.
        let (header, segment, status, data) = unsafe {
            let header = &raw mut (*mem).header[slot];
            header.write_volatile(RequestHeader {
                request_type: op.request_type(),
                reserved: 0,
                sector: header_sector,
            });
            let segment = &raw mut (*mem).discard[slot];
            segment.write_volatile(DiscardSegment {
                sector,
                num_sectors: sectors,
                flags: 0,
            });
            let status = &raw mut (*mem).status[slot];
            status.write_volatile(STATUS_UNSET);
            let data = &raw mut (*mem).data[slot];
            (header as u64, segment as u64, status as u64, data as u64)
        };
        let mut n = 0;
        buffers[n] = Buffer {
            addr: header,
            len: size_of::<RequestHeader>() as u32,
            device_writes: false,
        };
        n += 1;
        let mut writable = 1;
        match op {
            Op::Read | Op::Write => {
                let data_bytes = sectors.saturating_mul(SECTOR_SIZE);
                let mut offset = 0;
                while offset < data_bytes && n < MAX_SEGMENTS + 1 {
                    let len = (data_bytes - offset).min(self.segment_bytes);
                    buffers[n] = Buffer {
                        addr: data + u64::from(offset),
                        len,
                        device_writes: op == Op::Read,
                    };
                    n += 1;
                    offset += len;
                }
                if offset < data_bytes {
                    return Err(Failure::Stalled);
                }
                if op == Op::Read {
                    writable += data_bytes;
                }
            }
            Op::Discard => {
                buffers[n] = Buffer {
                    addr: segment,
                    len: size_of::<DiscardSegment>() as u32,
                    device_writes: false,
                };
                n += 1;
            }
            Op::Flush => {}
        }
        buffers[n] = Buffer {
            addr: status,
            len: 1,
            device_writes: true,
        };
        n += 1;
        let Some(queue) = self.queues[q].as_mut() else {
            return Err(Failure::Stalled);
        };
        // Every buffer is in the never-freed static pool this driver owns,
        // reached only through raw pointers.
        // SAFETY: the slot stays busy (its buffers untouched) until the
        // chain comes back or the device is reset in `finish`.
        let head = unsafe { queue.add(&buffers[..n]) }.map_err(|error| Failure::Device {
            error,
            op,
            sector,
        })?;
        self.transport.notify(queue);
        self.slots[slot] = Slot {
            busy: true,
            queue: q,
            head,
            op,
            sector,
            sectors,
            writable,
            seq: self.seq,
        };
        self.seq += 1;
        self.next_queue = (q + 1) % self.num_queues.max(1);
        Ok(())
    }

    /// Waits (bounded) for any request to complete; returns its slot,
    /// now idle.
    fn complete_one(&mut self) -> Result<usize, Failure> {
        let Timing {
            min_spins,
            spins_per_check,
            max_spins,
        } = self.timing;
        let mut deadline =
            timer::Deadline::start_with(REQUEST_TIMEOUT_MS, min_spins, spins_per_check, max_spins);
        loop {
            for q in 0..self.num_queues {
                let Some(queue) = self.queues[q].as_mut() else {
                    continue;
                };
                if queue.in_flight() == 0 {
                    continue;
                }
                let used = match queue.pop_used() {
                    Ok(Some(used)) => used,
                    Ok(None) => continue,
                    Err(error) => {
                        let (op, sector) = self.oldest(Some(q));
                        return Err(Failure::Device { error, op, sector });
                    }
                };
                let Some(slot) = self
                    .slots
                    .iter()
                    .position(|s| s.busy && s.queue == q && s.head == used.head)
                else {
                    let (op, sector) = self.oldest(Some(q));
                    let error = Error::BadUsedId(u32::from(used.head));
                    return Err(Failure::Device { error, op, sector });
                };
                let done = &mut self.slots[slot];
                done.busy = false;
                if used.len > done.writable {
                    return Err(Failure::BadUsedLen {
                        len: used.len,
                        op: done.op,
                        sector: done.sector,
                    });
                }
                return Ok(slot);
            }
            if deadline.expired() {
                let (op, sector) = self.oldest(None);
                if self.transport.status() & virtio::status::DEVICE_NEEDS_RESET != 0 {
                    let error = Error::DeviceNeedsReset;
                    return Err(Failure::Device { error, op, sector });
                }
                return Err(Failure::Timeout { op, sector });
            }
            core::hint::spin_loop();
        }
    }

    /// Op and sector of the oldest request in flight (on `queue`).
    fn oldest(&self, queue: Option<usize>) -> (Op, u64) {
        self.slots
            .iter()
            .filter(|s| s.busy && queue.is_none_or(|q| s.queue == q))
            .min_by_key(|s| s.seq)
            .map_or((Op::Read, 0), |s| (s.op, s.sector))
    }

    /// Status byte of a completed request.
    fn status(&self, slot: usize) -> u8 {
        // SAFETY: the request in `slot` completed, so the device is done
        // with the status byte; volatile because the device wrote it.
        unsafe { (&raw const (*self.mem).status[slot]).read_volatile() }
    }

    /// Fills the data buffer of `slot` with the pattern of sectors
    /// `[first, first + sectors)` for `seed`.
    fn fill(&mut self, slot: usize, first: u64, sectors: u32, seed: u64) {
        let sectors = (sectors as usize).min(SECTORS_PER_SLOT);
        // SAFETY: only computes the address of the slot's buffer.
        let data = unsafe { (&raw mut (*self.mem).data[slot]).cast::<u64>() };
        for s in 0..sectors {
            let value = (first + s as u64) ^ seed;
            // SAFETY: the slot is idle (the device does not own its
            // buffer) and sector `s` lies inside it.
            unsafe {
                let sector = data.add(s * WORDS_PER_SECTOR);
                if self.records {
                    fill_record(sector, value);
                } else {
                    fill_sector(sector, value);
                }
            }
        }
    }

    /// First sector in `slot`'s buffer that does not hold the pattern.
    fn check(&self, slot: usize, first: u64, sectors: u32, seed: u64) -> Option<u64> {
        let sectors = (sectors as usize).min(SECTORS_PER_SLOT);
        // SAFETY: only computes the address of the slot's buffer.
        let data = unsafe { (&raw const (*self.mem).data[slot]).cast::<u64>() };
        (0..sectors)
            .find(|&s| {
                let expected = (first + s as u64) ^ seed;
                // SAFETY: the read in `slot` completed, so the device is
                // done with the buffer, and sector `s` lies inside it.
                !unsafe { sector_holds(data.add(s * WORDS_PER_SECTOR), expected) }
            })
            .map(|s| first + s as u64)
    }
}

/// Stores `value` in the 64 words of the sector at `dst` with one
/// `rep stosq`: under an instruction-emulating KVM (kvm_pvm) one string
/// instruction per sector is far cheaper than a loop of stores.
///
/// # Safety
/// `dst` must be 8-byte aligned and valid for writes of one sector, and
/// no reference may cover that memory.
unsafe fn fill_sector(dst: *mut u64, value: u64) {
    // SAFETY: the caller guarantees the 512 bytes at `dst` are writable;
    // the direction flag is clear (Rust ABI), so `rep stosq` writes
    // upwards from `dst`, exactly `rcx` = 64 words.
    unsafe {
        asm!(
            "rep stosq",
            inout("rcx") WORDS_PER_SECTOR => _,
            inout("rdi") dst => _,
            in("rax") value,
            options(nostack, preserves_flags)
        )
    };
}

/// Word `i` (1 to 62) of the journal record whose word 0 is `value`.
pub fn record_word(value: u64, i: usize) -> u64 {
    value.rotate_left(i as u32) ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Writes the journal record whose word 0 is `value` (see the module docs).
///
/// # Safety
/// As [`fill_sector`].
unsafe fn fill_record(dst: *mut u64, value: u64) {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for i in 0..WORDS_PER_SECTOR - 1 {
        let word = if i == 0 { value } else { record_word(value, i) };
        hash = (hash ^ word).wrapping_mul(0x0000_0100_0000_01b3);
        // SAFETY: word `i` lies in the sector the caller hands over.
        unsafe { dst.add(i).write_volatile(word) };
    }
    // SAFETY: as above, for the last word.
    unsafe { dst.add(WORDS_PER_SECTOR - 1).write_volatile(hash) };
}

/// True if all 64 words of the sector at `src` equal `value`
/// (`repe scasq`, see [`fill_sector`]).
///
/// # Safety
/// `src` must be 8-byte aligned and valid for reads of one sector.
unsafe fn sector_holds(src: *const u64, value: u64) -> bool {
    let equal: u8;
    // With the direction flag clear, `repe scasq` compares at most `rcx` =
    // 64 words upwards from `src`; ZF is set iff every word matched.
    // SAFETY: the caller guarantees the 512 bytes at `src` are readable,
    // and the instruction only reads memory.
    unsafe {
        asm!(
            "repe scasq",
            "sete {equal}",
            equal = out(reg_byte) equal,
            inout("rcx") WORDS_PER_SECTOR => _,
            inout("rdi") src => _,
            in("rax") value,
            options(nostack, readonly)
        )
    };
    equal != 0
}
