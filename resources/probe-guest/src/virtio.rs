//! A small polling virtio 1.x driver core: the virtio-mmio (version 2) and
//! virtio-pci (modern, see `virtio_pci.rs`) transports behind one
//! [`Transport`], and split virtqueues in static memory.
//!
//! Typical use by a device driver (see `virtio_rng.rs`):
//!
//! 1. [`Transport::new`] on a device's [`Regs`] (an MMIO window: checks
//!    magic and version; or a PCI function's structures),
//! 2. [`Transport::negotiate`]: reset, ACKNOWLEDGE, DRIVER, features
//!    (always including `VIRTIO_F_VERSION_1`), FEATURES_OK,
//! 3. [`Transport::setup_queue`] for each queue (memory from a static pool),
//! 4. [`Transport::driver_ok`],
//! 5. [`Virtqueue::add`] a descriptor chain, [`Transport::notify`],
//!    then [`Virtqueue::wait_used`] (polls the used ring, PIT deadline),
//! 6. [`Transport::shutdown`] when done: it resets the device, so that it
//!    stops using our memory, and returns the queue memory to the pool.
//!
//! All guest memory is identity-mapped, so buffer addresses are plain
//! pointers cast to `u64`. No interrupts are used.
//!
//! Everything read from the device is checked: used-ring ids must name a
//! chain that is in flight, the used index may not run ahead of what was
//! made available, and config-space reads retry a bounded number of times.

#![allow(
    dead_code,
    reason = "reusable driver API: block and net drivers will use the rest"
)]

use core::arch::asm;
use core::cell::{Cell, UnsafeCell};
use core::mem::MaybeUninit;
use core::sync::atomic::{Ordering, compiler_fence};

use crate::msix;
use crate::phys;
use crate::timer;
use crate::virtio_pci::{PciRegs, common};

/// "virt" in little endian.
pub const MAGIC: u32 = 0x7472_6976;
/// virtio-mmio version of virtio 1.x devices (1 = legacy).
pub const VERSION_MODERN: u32 = 2;
/// `VIRTIO_F_VERSION_1`.
pub const F_VERSION_1: u64 = 1 << 32;

/// Full memory barrier, as Linux's `virt_mb()` on x86-64: a locked
/// read-modify-write of the stack (works under instruction emulators that
/// lack `mfence`).
fn mb() {
    // SAFETY: `lock or` of 0 into the word at RSP leaves memory unchanged;
    // it only orders earlier loads/stores before later ones.
    unsafe {
        asm!(
            "lock or dword ptr [rsp], 0",
            options(nostack, preserves_flags)
        )
    };
}

/// Barrier between ring stores (x86 keeps stores in order: compiler only).
fn wmb() {
    compiler_fence(Ordering::Release);
}

/// Barrier between ring loads (x86 keeps loads in order: compiler only).
fn rmb() {
    compiler_fence(Ordering::Acquire);
}

/// virtio-mmio register offsets.
pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits.
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// Size of the register window the probe requires to be mapped.
pub const WINDOW_SIZE: u64 = 0x200;

/// Driver errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    BadMagic(u32),
    Legacy,
    UnsupportedVersion(u32),
    ResetTimeout,
    FeaturesRejected,
    MissingFeatures(u64),
    QueueUnavailable,
    QueueInUse,
    OutOfQueueMemory,
    QueueFull,
    EmptyChain,
    Timeout,
    DeviceNeedsReset,
    /// The used ring returned an id that is not the head of a chain in
    /// flight (or is out of range).
    BadUsedId(u32),
    /// The used index moved further than the number of chains in flight.
    BadUsedIdx(u16),
    /// PCI: a queue's `queue_notify_off` points outside the notify
    /// structure.
    NotifyOutOfRange(u16),
}

impl Error {
    /// Short name used in output lines.
    pub fn name(self) -> &'static str {
        match self {
            Error::BadMagic(_) => "bad-magic",
            Error::Legacy => "legacy",
            Error::UnsupportedVersion(_) => "unsupported-version",
            Error::ResetTimeout => "reset-timeout",
            Error::FeaturesRejected => "features-rejected",
            Error::MissingFeatures(_) => "missing-features",
            Error::QueueUnavailable => "queue-unavailable",
            Error::QueueInUse => "queue-in-use",
            Error::OutOfQueueMemory => "out-of-queue-memory",
            Error::QueueFull => "queue-full",
            Error::EmptyChain => "empty-chain",
            Error::Timeout => "timeout",
            Error::DeviceNeedsReset => "device-needs-reset",
            Error::BadUsedId(_) => "bad-used-id",
            Error::BadUsedIdx(_) => "bad-used-idx",
            Error::NotifyOutOfRange(_) => "notify-out-of-range",
        }
    }
}

/// A virtio-mmio register window.
#[derive(Clone, Copy, Debug)]
pub struct Mmio {
    base: u64,
}

impl Mmio {
    /// Wraps the register window at `base`.
    ///
    /// # Safety
    /// `[base, base + WINDOW_SIZE)` must be 4-byte aligned, identity-mapped
    /// and not overlap memory used by Rust code (device MMIO, or at worst
    /// unused guest memory), since registers are read and written.
    pub unsafe fn new(base: u64) -> Mmio {
        Mmio { base }
    }

    /// Checks the preconditions of [`Mmio::new`] that can be checked.
    pub fn window_ok(base: u64) -> bool {
        base.is_multiple_of(4) && phys::range_ok(base, WINDOW_SIZE)
    }

    /// The window's base address.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Volatile 32-bit register read.
    pub fn read(&self, offset: u64) -> u32 {
        // SAFETY: `new`'s contract makes every aligned offset inside the
        // window a valid MMIO location.
        unsafe { phys::mmio_read32(self.base + offset) }
    }

    /// Volatile 16-bit read (device config space only).
    pub fn read16(&self, offset: u64) -> u16 {
        // SAFETY: as for `read`; callers pass 2-byte aligned offsets.
        unsafe { phys::mmio_read16(self.base + offset) }
    }

    /// Volatile 8-bit read (device config space only).
    pub fn read8(&self, offset: u64) -> u8 {
        // SAFETY: as for `read`.
        unsafe { phys::mmio_read8(self.base + offset) }
    }

    /// Volatile 32-bit register write.
    pub fn write(&self, offset: u64, value: u32) {
        // SAFETY: as for `read`.
        unsafe { phys::mmio_write32(self.base + offset, value) }
    }

    pub fn magic(&self) -> u32 {
        self.read(reg::MAGIC)
    }

    pub fn version(&self) -> u32 {
        self.read(reg::VERSION)
    }

    pub fn device_id(&self) -> u32 {
        self.read(reg::DEVICE_ID)
    }

    pub fn vendor_id(&self) -> u32 {
        self.read(reg::VENDOR_ID)
    }
}

/// How a device is reached: a virtio-mmio window or a virtio-pci
/// function.
#[derive(Clone, Copy, Debug)]
pub enum Regs {
    Mmio(Mmio),
    Pci(PciRegs),
}

/// An initialised virtio 1.x transport (virtio-mmio version 2, or
/// virtio-pci modern).
pub struct Transport {
    regs: Regs,
    device_id: u32,
    /// PCI with `probe.msix`: the MSI-X check's setup (see `msix.rs`),
    /// made when queue 0 is set up.
    msix: Option<msix::Target>,
    features: u64,
    /// Queue-pool slots handed to this transport's queues:
    /// `[first, first + count)` (the pool is a stack).
    pool_first: usize,
    pool_count: usize,
}

/// Size of the device-specific configuration space in the window.
pub const CONFIG_SIZE: u64 = WINDOW_SIZE - reg::CONFIG;
/// Attempts at a consistent config-space read (generation unchanged).
const CONFIG_READ_ATTEMPTS: u32 = 64;

/// Bound on status polls after a reset.
const RESET_POLLS: u32 = 1_000_000;

impl Transport {
    /// Checks magic and version (only virtio 1.x is driven); a PCI
    /// function was checked when its [`PciRegs`] were made.
    pub fn new(regs: Regs) -> Result<Transport, Error> {
        let regs = match regs {
            Regs::Mmio(mmio) => mmio,
            Regs::Pci(pci) => {
                return Ok(Transport {
                    regs: Regs::Pci(pci),
                    device_id: pci.device_id,
                    msix: None,
                    features: 0,
                    pool_first: 0,
                    pool_count: 0,
                });
            }
        };
        let magic = regs.magic();
        if magic != MAGIC {
            return Err(Error::BadMagic(magic));
        }
        match regs.version() {
            VERSION_MODERN => {}
            1 => return Err(Error::Legacy),
            v => return Err(Error::UnsupportedVersion(v)),
        }
        Ok(Transport {
            regs: Regs::Mmio(regs),
            device_id: regs.device_id(),
            msix: None,
            features: 0,
            pool_first: 0,
            pool_count: 0,
        })
    }

    pub fn regs(&self) -> &Regs {
        &self.regs
    }

    pub fn device_id(&self) -> u32 {
        self.device_id
    }

    /// Features agreed by [`Transport::negotiate`].
    pub fn features(&self) -> u64 {
        self.features
    }

    pub fn status(&self) -> u32 {
        match &self.regs {
            Regs::Mmio(r) => r.read(reg::STATUS),
            Regs::Pci(p) => u32::from(p.read8(common::DEVICE_STATUS)),
        }
    }

    fn set_status(&self, bits: u32) {
        match &self.regs {
            Regs::Mmio(r) => r.write(reg::STATUS, bits),
            Regs::Pci(p) => p.write8(common::DEVICE_STATUS, bits as u8),
        }
    }

    /// Resets the device and waits until it reports status 0.
    pub fn reset(&mut self) -> Result<(), Error> {
        self.set_status(0);
        for _ in 0..RESET_POLLS {
            if self.status() == 0 {
                return Ok(());
            }
            core::hint::spin_loop();
        }
        Err(Error::ResetTimeout)
    }

    /// Marks the device FAILED (after an unrecoverable driver error).
    pub fn fail(&mut self) {
        let s = self.status();
        self.set_status(s | status::FAILED);
    }

    /// Offered device features (both 32-bit halves).
    pub fn device_features(&self) -> u64 {
        let (low, high) = match &self.regs {
            Regs::Mmio(r) => {
                r.write(reg::DEVICE_FEATURES_SEL, 0);
                let low = r.read(reg::DEVICE_FEATURES);
                r.write(reg::DEVICE_FEATURES_SEL, 1);
                (low, r.read(reg::DEVICE_FEATURES))
            }
            Regs::Pci(p) => {
                p.write32(common::DEVICE_FEATURE_SELECT, 0);
                let low = p.read32(common::DEVICE_FEATURE);
                p.write32(common::DEVICE_FEATURE_SELECT, 1);
                (low, p.read32(common::DEVICE_FEATURE))
            }
        };
        u64::from(high) << 32 | u64::from(low)
    }

    /// Device initialisation up to FEATURES_OK: reset, ACKNOWLEDGE, DRIVER,
    /// accept `wanted & offered` (plus `VIRTIO_F_VERSION_1`), check that
    /// `required` is offered, set and verify FEATURES_OK.
    pub fn negotiate(&mut self, wanted: u64, required: u64) -> Result<u64, Error> {
        let offered = self.begin_negotiation()?;
        let required = required | F_VERSION_1;
        if offered & required != required {
            self.fail();
            return Err(Error::MissingFeatures(required & !offered));
        }
        self.accept_features(offered & (wanted | required))
    }

    /// First half of [`Transport::negotiate`], for drivers that look at
    /// device configuration space before choosing features (as Linux's
    /// `validate` callbacks do, which the spec allows during feature
    /// negotiation): reset, ACKNOWLEDGE, DRIVER; returns the offered
    /// features. Finish with [`Transport::accept_features`].
    pub fn begin_negotiation(&mut self) -> Result<u64, Error> {
        self.reset()?;
        self.set_status(status::ACKNOWLEDGE);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER);
        Ok(self.device_features())
    }

    /// Second half of [`Transport::negotiate`]: writes `accepted` (which
    /// must be a subset of the offered features), sets and verifies
    /// FEATURES_OK.
    pub fn accept_features(&mut self, accepted: u64) -> Result<u64, Error> {
        match &self.regs {
            Regs::Mmio(r) => {
                r.write(reg::DRIVER_FEATURES_SEL, 0);
                r.write(reg::DRIVER_FEATURES, accepted as u32);
                r.write(reg::DRIVER_FEATURES_SEL, 1);
                r.write(reg::DRIVER_FEATURES, (accepted >> 32) as u32);
            }
            Regs::Pci(p) => {
                p.write32(common::DRIVER_FEATURE_SELECT, 0);
                p.write32(common::DRIVER_FEATURE, accepted as u32);
                p.write32(common::DRIVER_FEATURE_SELECT, 1);
                p.write32(common::DRIVER_FEATURE, (accepted >> 32) as u32);
            }
        }
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.set_status(s);
        if self.status() & status::FEATURES_OK == 0 {
            self.fail();
            return Err(Error::FeaturesRejected);
        }
        self.features = accepted;
        Ok(accepted)
    }

    /// Sets up queue `index` with at most [`QUEUE_SIZE`] descriptors.
    pub fn setup_queue(&mut self, index: u32) -> Result<Virtqueue, Error> {
        let regs = match self.regs {
            Regs::Mmio(regs) => regs,
            Regs::Pci(pci) => return self.setup_pci_queue(pci, index),
        };
        regs.write(reg::QUEUE_SEL, index);
        if regs.read(reg::QUEUE_READY) != 0 {
            return Err(Error::QueueInUse);
        }
        let max = regs.read(reg::QUEUE_NUM_MAX);
        if max == 0 {
            return Err(Error::QueueUnavailable);
        }
        // Split queue sizes are powers of two.
        let limit = max.min(u32::from(QUEUE_SIZE));
        let size = 1u16 << (31 - limit.leading_zeros());
        let (slot, mem) = self.alloc_queue_mem()?;
        let queue = Virtqueue::new(index, size, slot, mem);
        let (desc, avail, used) = queue.addresses();
        regs.write(reg::QUEUE_NUM, u32::from(size));
        regs.write(reg::QUEUE_DESC_LOW, desc as u32);
        regs.write(reg::QUEUE_DESC_HIGH, (desc >> 32) as u32);
        regs.write(reg::QUEUE_DRIVER_LOW, avail as u32);
        regs.write(reg::QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
        regs.write(reg::QUEUE_DEVICE_LOW, used as u32);
        regs.write(reg::QUEUE_DEVICE_HIGH, (used >> 32) as u32);
        regs.write(reg::QUEUE_READY, 1);
        Ok(queue)
    }

    /// Takes a slot of the queue pool for this transport.
    fn alloc_queue_mem(&mut self) -> Result<(usize, *mut QueueMem), Error> {
        let (slot, mem) = QUEUE_POOL.alloc().ok_or(Error::OutOfQueueMemory)?;
        if self.pool_count == 0 {
            self.pool_first = slot;
        }
        self.pool_count += 1;
        Ok((slot, mem))
    }

    /// [`Transport::setup_queue`] on virtio-pci: `queue_select`, then
    /// `queue_size` (the maximum, written back possibly smaller), the
    /// three ring addresses, with `probe.msix` the MSI-X vector of queue
    /// 0, and `queue_enable`. The queue's notify address is
    /// `queue_notify_off * notify_off_multiplier` into the notify
    /// structure.
    fn setup_pci_queue(&mut self, pci: PciRegs, index: u32) -> Result<Virtqueue, Error> {
        pci.write16(common::QUEUE_SELECT, index as u16);
        if pci.read16(common::QUEUE_ENABLE) != 0 {
            return Err(Error::QueueInUse);
        }
        let max = u32::from(pci.read16(common::QUEUE_SIZE));
        if max == 0 {
            return Err(Error::QueueUnavailable);
        }
        let notify_off = pci.read16(common::QUEUE_NOTIFY_OFF);
        let notify_at = pci
            .notify_offset(notify_off)
            .ok_or(Error::NotifyOutOfRange(notify_off))?;
        let limit = max.min(u32::from(QUEUE_SIZE));
        let size = 1u16 << (31 - limit.leading_zeros());
        let (slot, mem) = self.alloc_queue_mem()?;
        let mut queue = Virtqueue::new(index, size, slot, mem);
        queue.notify_at = notify_at;
        let (desc, avail, used) = queue.addresses();
        pci.write16(common::QUEUE_SIZE, size);
        pci.write64(common::QUEUE_DESC, desc);
        pci.write64(common::QUEUE_DRIVER, avail);
        pci.write64(common::QUEUE_DEVICE, used);
        if index == 0
            && let Some(check) = pci.msix_check
        {
            self.msix = Some(msix::prepare(&pci, check));
        }
        pci.write16(common::QUEUE_ENABLE, 1);
        Ok(queue)
    }

    /// The MSI-X check prepared with queue 0 (PCI with `probe.msix`): the
    /// driver runs [`msix::check`] with it once the device is live.
    pub fn msix_target(&self) -> Option<msix::Target> {
        self.msix
    }

    /// Sets DRIVER_OK: the device is live.
    pub fn driver_ok(&mut self) {
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        self.set_status(s);
    }

    /// Tells the device that `queue` has new available buffers.
    pub fn notify(&self, queue: &Virtqueue) {
        mb();
        self.write_notify(queue);
    }

    /// The notification register write itself.
    fn write_notify(&self, queue: &Virtqueue) {
        match &self.regs {
            Regs::Mmio(r) => r.write(reg::QUEUE_NOTIFY, queue.index),
            Regs::Pci(p) => p.notify(queue.notify_at, queue.index as u16),
        }
    }

    /// Like [`Transport::notify`], but skips the (trapping) register write
    /// while the device has set `VIRTQ_USED_F_NO_NOTIFY` in the used ring,
    /// as Linux's `virtqueue_kick_prepare` does without event indices.
    /// Returns whether it notified.
    pub fn notify_if_needed(&self, queue: &Virtqueue) -> bool {
        // Publish the available index before reading the device's flag.
        mb();
        if queue.device_wants_notify() {
            self.write_notify(queue);
            true
        } else {
            false
        }
    }

    /// Reads and acknowledges the interrupt status (for polling drivers
    /// that want to clear a pending used-buffer/config notification).
    /// On virtio-pci, reading the ISR status acknowledges it.
    pub fn ack_interrupt(&self) -> u32 {
        let regs = match &self.regs {
            Regs::Mmio(r) => r,
            Regs::Pci(p) => return u32::from(p.isr()),
        };
        let pending = regs.read(reg::INTERRUPT_STATUS);
        if pending != 0 {
            regs.write(reg::INTERRUPT_ACK, pending);
        }
        pending
    }

    /// Reads device configuration space with `read`, retrying (a bounded
    /// number of times) while the config generation changes.
    fn config_read<T>(&self, read: impl Fn(&Regs) -> T) -> T {
        let generation = |regs: &Regs| match regs {
            Regs::Mmio(r) => r.read(reg::CONFIG_GENERATION),
            Regs::Pci(p) => u32::from(p.read8(common::CONFIG_GENERATION)),
        };
        let mut attempts = 1;
        loop {
            let before = generation(&self.regs);
            let value = read(&self.regs);
            if generation(&self.regs) == before || attempts == CONFIG_READ_ATTEMPTS {
                return value;
            }
            attempts += 1;
        }
    }

    /// Reads a 32-bit word of device configuration space (offset rounded
    /// down to 4 bytes; on MMIO wrapped into the config space, on PCI 0
    /// beyond the device structure).
    pub fn config_read32(&self, offset: u64) -> u32 {
        self.config_read(|r| raw_config_read32(r, offset))
    }

    /// Writes a 32-bit word of device configuration space (offset rounded
    /// down to 4 bytes, and wrapped into the config space).
    pub fn config_write32(&self, offset: u64, value: u32) {
        match &self.regs {
            Regs::Mmio(r) => r.write(reg::CONFIG + (offset & !3) % CONFIG_SIZE, value),
            Regs::Pci(p) => p.config_write32(offset, value),
        }
    }

    /// Reads a 16-bit config field with a 16-bit access, as the virtio-mmio
    /// spec requires (offset rounded down to 2 bytes).
    pub fn config_read16(&self, offset: u64) -> u16 {
        self.config_read(|r| match r {
            Regs::Mmio(r) => r.read16(reg::CONFIG + (offset & !1) % CONFIG_SIZE),
            Regs::Pci(p) => p.config_read16(offset),
        })
    }

    /// Reads an 8-bit config field.
    pub fn config_read8(&self, offset: u64) -> u8 {
        self.config_read(|r| raw_config_read8(r, offset))
    }

    /// Reads `N` consecutive config bytes with 8-bit accesses, all under
    /// one config generation (e.g. a MAC address).
    pub fn config_bytes<const N: usize>(&self, offset: u64) -> [u8; N] {
        self.config_read(|r| core::array::from_fn(|i| raw_config_read8(r, offset + i as u64)))
    }

    /// Reads a 64-bit config field as two 32-bit accesses (low word first,
    /// like Linux), both under one config generation.
    pub fn config_read64(&self, offset: u64) -> u64 {
        let low = offset & !3;
        self.config_read(|r| {
            u64::from(raw_config_read32(r, low + 4)) << 32 | u64::from(raw_config_read32(r, low))
        })
    }

    /// Resets the device and, once it has confirmed the reset (so it no
    /// longer touches any queue or buffer), returns the memory of `queues`
    /// to the pool. `queues` should be every queue set up on this
    /// transport; memory is only reused if all of them come back and no
    /// other transport allocated queues since. If the reset is not
    /// confirmed, the device is marked FAILED and the memory stays
    /// allocated (the device might still write to it).
    pub fn shutdown(mut self, queues: impl IntoIterator<Item = Virtqueue>) -> Result<(), Error> {
        if let Err(e) = self.reset() {
            self.fail();
            return Err(e);
        }
        let first = self.pool_first;
        let end = first + self.pool_count;
        let returned = queues
            .into_iter()
            .filter(|q| (first..end).contains(&q.pool_slot))
            .count();
        if self.pool_count > 0 && returned == self.pool_count {
            QUEUE_POOL.release(first, end);
        }
        Ok(())
    }
}

/// One 32-bit config read (no generation check).
fn raw_config_read32(regs: &Regs, offset: u64) -> u32 {
    match regs {
        Regs::Mmio(r) => r.read(reg::CONFIG + (offset & !3) % CONFIG_SIZE),
        Regs::Pci(p) => p.config_read32(offset),
    }
}

/// One 8-bit config read (no generation check).
fn raw_config_read8(regs: &Regs, offset: u64) -> u8 {
    match regs {
        Regs::Mmio(r) => r.read8(reg::CONFIG + offset % CONFIG_SIZE),
        Regs::Pci(p) => p.config_read8(offset),
    }
}

/// Maximum descriptors per queue.
pub const QUEUE_SIZE: u16 = 64;
const QS: usize = QUEUE_SIZE as usize;
/// Number of queues that can ever be set up (static pool).
pub const MAX_QUEUES: usize = 16;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
/// `VIRTQ_AVAIL_F_NO_INTERRUPT`: the driver polls, no used-buffer
/// notifications wanted.
const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// `VIRTQ_USED_F_NO_NOTIFY`: the device needs no available-buffer
/// notifications for now.
const USED_F_NO_NOTIFY: u16 = 1;

#[repr(C)]
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

#[repr(C)]
struct AvailRing {
    flags: u16,
    idx: u16,
    ring: [u16; QS],
    used_event: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UsedElem {
    id: u32,
    len: u32,
}

#[repr(C)]
struct UsedRing {
    flags: u16,
    idx: u16,
    ring: [UsedElem; QS],
    avail_event: u16,
}

/// Memory of one split virtqueue (alignment exceeds the spec's 16/2/4).
#[repr(C, align(4096))]
pub struct QueueMem {
    desc: [Desc; QS],
    avail: AvailRing,
    used: UsedRing,
}

impl QueueMem {
    const ZERO: QueueMem = QueueMem {
        desc: [Desc {
            addr: 0,
            len: 0,
            flags: 0,
            next: 0,
        }; QS],
        avail: AvailRing {
            flags: 0,
            idx: 0,
            ring: [0; QS],
            used_event: 0,
        },
        used: UsedRing {
            flags: 0,
            idx: 0,
            ring: [UsedElem { id: 0, len: 0 }; QS],
            avail_event: 0,
        },
    };
}

/// Bump allocator over a static array of queue memory.
struct QueuePool {
    mem: UnsafeCell<MaybeUninit<[QueueMem; MAX_QUEUES]>>,
}

// SAFETY: the probe is single-threaded with interrupts disabled; a slot
// is only reached through the pointer `alloc` hands out, and it is handed
// out again only after the queue owning it was consumed by
// `Transport::shutdown` with a confirmed device reset, so no two users
// ever share a slot.
unsafe impl Sync for QueuePool {}

/// Not zeroed at boot (`.probe_noinit`, see link.ld): [`Virtqueue::new`]
/// initialises a slot before the device learns its address.
#[unsafe(link_section = ".probe_noinit.virtio")]
static QUEUE_POOL: QueuePool = QueuePool {
    mem: UnsafeCell::new(MaybeUninit::uninit()),
};
/// The first free slot of [`QUEUE_POOL`].
static QUEUE_NEXT: QueueNext = QueueNext(Cell::new(0));

/// [`QUEUE_POOL`]'s allocation counter.
struct QueueNext(Cell<usize>);

// SAFETY: the probe is single-threaded with interrupts disabled, so the
// counter is never accessed concurrently.
unsafe impl Sync for QueueNext {}

impl QueuePool {
    fn alloc(&self) -> Option<(usize, *mut QueueMem)> {
        let slot = QUEUE_NEXT.0.get();
        if slot >= MAX_QUEUES {
            return None;
        }
        QUEUE_NEXT.0.set(slot + 1);
        // SAFETY: slot < MAX_QUEUES, so the pointer stays inside the array.
        Some((slot, unsafe { self.mem.get().cast::<QueueMem>().add(slot) }))
    }

    /// Gives back slots `[first, end)` if they are the most recent ones
    /// (stack order); otherwise they stay allocated.
    fn release(&self, first: usize, end: usize) {
        if QUEUE_NEXT.0.get() == end && first <= end {
            QUEUE_NEXT.0.set(first);
        }
    }
}

/// A buffer in a descriptor chain.
#[derive(Clone, Copy, Debug)]
pub struct Buffer {
    /// Guest-physical (= virtual) address.
    pub addr: u64,
    pub len: u32,
    /// True if the device writes into it.
    pub device_writes: bool,
}

/// A completed chain from the used ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    /// Head descriptor index returned by [`Virtqueue::add`].
    pub head: u16,
    /// Bytes the device wrote.
    pub len: u32,
}

/// A split virtqueue driven by polling.
pub struct Virtqueue {
    index: u32,
    /// PCI: the queue's notify offset in the notify structure.
    notify_at: u32,
    size: u16,
    mem: *mut QueueMem,
    pool_slot: usize,
    free_head: u16,
    num_free: u16,
    avail_idx: u16,
    last_used: u16,
    /// Heads of the chains the device owns.
    in_flight: [bool; QS],
    /// Number of `true` entries in `in_flight`.
    in_flight_count: u16,
}

impl Virtqueue {
    /// `size` must be a power of two (at most [`QUEUE_SIZE`]).
    fn new(index: u32, size: u16, pool_slot: usize, mem: *mut QueueMem) -> Virtqueue {
        // SAFETY: `mem` is a pool slot owned exclusively by this queue and
        // the device does not know it yet.
        unsafe {
            mem.write(QueueMem::ZERO);
            for i in 0..size {
                (*mem).desc[usize::from(i)].next = (i + 1) % size;
            }
        }
        Virtqueue {
            index,
            notify_at: 0,
            size,
            mem,
            pool_slot,
            free_head: 0,
            num_free: size,
            avail_idx: 0,
            last_used: 0,
            in_flight: [false; QS],
            in_flight_count: 0,
        }
    }

    /// Physical addresses of the descriptor table, available and used rings.
    fn addresses(&self) -> (u64, u64, u64) {
        // SAFETY: only computes field addresses inside our slot.
        unsafe {
            (
                (&raw const (*self.mem).desc) as u64,
                (&raw const (*self.mem).avail) as u64,
                (&raw const (*self.mem).used) as u64,
            )
        }
    }

    /// The queue index on the device.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Asks the device not to send used-buffer notifications (interrupts)
    /// for this queue (`VIRTQ_AVAIL_F_NO_INTERRUPT`; only a hint).
    pub fn disable_interrupts(&mut self) {
        // SAFETY: the available ring belongs to our slot; the device only
        // reads it.
        unsafe {
            core::ptr::write_volatile(&raw mut (*self.mem).avail.flags, AVAIL_F_NO_INTERRUPT)
        };
    }

    /// False while the device has set `VIRTQ_USED_F_NO_NOTIFY`.
    fn device_wants_notify(&self) -> bool {
        // SAFETY: the used ring belongs to our slot; the device writes it,
        // hence a volatile read. Any value is harmless.
        let flags = unsafe { core::ptr::read_volatile(&raw const (*self.mem).used.flags) };
        flags & USED_F_NO_NOTIFY == 0
    }

    /// Number of descriptors.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Free descriptors.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// Chains made available and not yet returned by the device.
    pub fn in_flight(&self) -> u16 {
        self.in_flight_count
    }

    /// True if the used index moved since the last [`Virtqueue::pop_used`]
    /// (one memory read: a cheap test before a full poll).
    #[inline]
    pub fn has_used(&self) -> bool {
        // SAFETY: the used ring belongs to our slot; the device writes it,
        // hence a volatile read. Any value is harmless here.
        let idx = unsafe { core::ptr::read_volatile(&raw const (*self.mem).used.idx) };
        idx != self.last_used
    }

    /// Publishes a descriptor chain; returns its head index. Call
    /// [`Transport::notify`] afterwards.
    ///
    /// # Safety
    /// Each buffer must be identity-mapped memory valid for `len` bytes
    /// that stays allocated (and, if `device_writes`, is not read through
    /// Rust references) until the chain comes back from the used ring.
    pub unsafe fn add(&mut self, buffers: &[Buffer]) -> Result<u16, Error> {
        if buffers.is_empty() {
            return Err(Error::EmptyChain);
        }
        if buffers.len() > usize::from(self.num_free) {
            return Err(Error::QueueFull);
        }
        let head = self.free_head;
        let mut index = head;
        let mem = self.mem;
        for (i, b) in buffers.iter().enumerate() {
            let last = i + 1 == buffers.len();
            let mut flags = if b.device_writes { DESC_F_WRITE } else { 0 };
            if !last {
                flags |= DESC_F_NEXT;
            }
            // SAFETY: `index` < size (free list links stay in range); the
            // descriptor is free, so the device is not reading it. Field
            // by field: `next` already links the free list.
            unsafe {
                let d = &raw mut (*mem).desc[usize::from(index)];
                let next = (&raw const (*d).next).read_volatile();
                (&raw mut (*d).addr).write_volatile(b.addr);
                (&raw mut (*d).len).write_volatile(b.len);
                (&raw mut (*d).flags).write_volatile(flags);
                if !last {
                    index = next;
                } else {
                    self.free_head = next;
                }
            }
        }
        self.num_free -= buffers.len() as u16;
        self.in_flight[usize::from(head)] = true;
        self.in_flight_count += 1;
        let slot = self.ring_slot(self.avail_idx);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // SAFETY: the available ring belongs to our slot; the ring entry is
        // written before the index that publishes it (barrier in between).
        unsafe {
            core::ptr::write_volatile(&raw mut (*mem).avail.ring[slot], head);
            wmb();
            core::ptr::write_volatile(&raw mut (*mem).avail.idx, self.avail_idx);
        }
        Ok(head)
    }

    /// Takes the next completed chain off the used ring, if any, and
    /// returns its descriptors to the free list. A used element whose id
    /// is not a chain in flight, or a used index that runs ahead of the
    /// chains in flight, is an error (the queue is then unusable: reset
    /// the device).
    pub fn pop_used(&mut self) -> Result<Option<Used>, Error> {
        let mem = self.mem;
        // SAFETY: the used ring belongs to our slot; the device writes it,
        // hence volatile reads, with a fence between index and element.
        let elem = unsafe {
            let idx = core::ptr::read_volatile(&raw const (*mem).used.idx);
            if idx == self.last_used {
                return Ok(None);
            }
            if idx.wrapping_sub(self.last_used) > self.in_flight_count {
                return Err(Error::BadUsedIdx(idx));
            }
            rmb();
            let slot = self.ring_slot(self.last_used);
            core::ptr::read_volatile(&raw const (*mem).used.ring[slot])
        };
        let id = elem.id;
        if id >= u32::from(self.size) || !self.in_flight[id as usize] {
            return Err(Error::BadUsedId(id));
        }
        let head = id as u16;
        self.last_used = self.last_used.wrapping_add(1);
        self.in_flight[usize::from(head)] = false;
        self.in_flight_count -= 1;
        self.free_chain(head);
        Ok(Some(Used {
            head,
            len: elem.len,
        }))
    }

    /// Ring position of the free-running index `idx` (the size is a
    /// power of two, so a mask, not a division).
    fn ring_slot(&self, idx: u16) -> usize {
        usize::from(idx & (self.size - 1))
    }

    fn free_chain(&mut self, head: u16) {
        let mem = self.mem;
        let mut index = head;
        // Bounded walk: a corrupt chain cannot loop forever.
        for _ in 0..self.size {
            // SAFETY: `index` < size; descriptors are only written by us.
            let (flags, next) = unsafe {
                let d = &raw const (*mem).desc[usize::from(index)];
                (
                    (&raw const (*d).flags).read_volatile(),
                    (&raw const (*d).next).read_volatile(),
                )
            };
            self.num_free = (self.num_free + 1).min(self.size);
            if flags & DESC_F_NEXT == 0 {
                break;
            }
            index = next & (self.size - 1);
        }
        // Put the chain in front of the free list.
        let tail = index;
        // SAFETY: as above.
        unsafe { (*mem).desc[usize::from(tail)].next = self.free_head };
        self.free_head = head;
    }

    /// Polls the used ring until a chain completes or `ms` milliseconds
    /// pass (PIT deadline, see [`timer::Deadline`]).
    pub fn wait_used(&mut self, transport: &Transport, ms: u32) -> Result<Used, Error> {
        let mut deadline = timer::Deadline::start(ms, 1 << 20);
        loop {
            if let Some(used) = self.pop_used()? {
                return Ok(used);
            }
            if deadline.expired() {
                if transport.status() & status::DEVICE_NEEDS_RESET != 0 {
                    return Err(Error::DeviceNeedsReset);
                }
                return Err(Error::Timeout);
            }
            core::hint::spin_loop();
        }
    }
}
