//! `probe.msix`: checks a virtio-pci device's MSI-X path end to end, with
//! interrupts kept off (IF=0): a message the device sends lands in the
//! local APIC's IRR and stays there, where the probe can see it.
//!
//! When queue 0 of a PCI device is set up ([`prepare`]), the probe
//! software-enables the local APIC (SVR bit 8), programs MSI-X table
//! entry `v` (1 if the table has two entries or more, else 0) with
//! address `0xfee0_0000 | apic_id << 12` (fixed delivery, physical
//! destination: this CPU) and data `A` (edge), sets MSI-X Enable (message
//! control bit 15; Function Mask clear), unmasks the entry and writes `v`
//! to `queue_msix_vector`, which must read back as `v`. Once the device
//! is live, [`check`] runs three phases, each around one request the
//! driver completes on queue 0:
//!
//! 1. entry unmasked: IRR bit `A` must come on;
//! 2. entry masked, its data changed to `B`: IRR bit `B` must stay off
//!    and the entry's PBA bit should come on;
//! 3. entry unmasked: the pending message must arrive (IRR bit `B`) and
//!    the PBA bit should go off.
//!
//! The entry is masked again at the end (the device keeps serving).
//! IRR bits cannot be cleared without taking the interrupt, so every
//! device checked gets its own two vectors: `A = 0x40 + 2k`,
//! `B = 0x41 + 2k` for the `k`-th device checked (from 0).
//!
//! Output: `probe.msix<i>=ok vectors=<n>` (`n`: the table size; with
//! ` pba=not-set` or ` pba=not-cleared` if the PBA bit did not do what
//! it should while delivery was right) or
//! `probe.msix<i>=error <reason>[=<value>]`, `i` being the device's
//! `probe.virtio=` index.

use core::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use crate::pci;
use crate::phys;
use crate::serial::outln;
use crate::timer;
use crate::virtio_pci::{NO_VECTOR, PciRegs, common};

/// The local APIC's registers (xAPIC mode, default base).
const LAPIC: u64 = 0xfee0_0000;
const LAPIC_ID: u64 = 0x20;
const LAPIC_VERSION: u64 = 0x30;
const LAPIC_SVR: u64 = 0xf0;
const LAPIC_IRR: u64 = 0x200;
/// SVR: APIC software enable, spurious vector 0xff.
const SVR_ENABLE: u32 = 0x1ff;
/// MSI address of this CPU (destination id in bits 19:12).
const MSI_ADDRESS: u32 = 0xfee0_0000;

/// Message control bits.
const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_FUNCTION_MASK: u16 = 1 << 14;
/// Table entry: vector control's mask bit.
const ENTRY_MASKED: u32 = 1;
/// Table entry word offsets.
const ENTRY_ADDR_LO: u64 = 0;
const ENTRY_ADDR_HI: u64 = 4;
const ENTRY_DATA: u64 = 8;
const ENTRY_CONTROL: u64 = 12;

/// First vector handed out; the last usable one.
const FIRST_VECTOR: u8 = 0x40;
const LAST_VECTOR: u8 = 0xef;
static NEXT_VECTOR: AtomicU8 = AtomicU8::new(FIRST_VECTOR);
/// Nanoseconds the last [`check`] took (kvm-clock; 0 without it).
static ELAPSED_NS: AtomicU64 = AtomicU64::new(0);

/// The time the last [`check`] took, once (then 0): drivers leave it out
/// of the timings they print.
pub fn take_elapsed_ns() -> u64 {
    ELAPSED_NS.swap(0, Ordering::Relaxed)
}

/// Time for a message to land in the IRR once its request completed.
const DELIVERY_MS: u32 = 200;
/// How long a masked message must stay away.
const MASKED_MS: u32 = 50;

/// Why the check failed: `error <reason>[=<value>]`.
#[derive(Clone, Copy, Debug)]
struct Failure {
    reason: &'static str,
    value: Option<u64>,
}

fn fail(reason: &'static str) -> Failure {
    Failure {
        reason,
        value: None,
    }
}

fn fail_with(reason: &'static str, value: u64) -> Failure {
    Failure {
        reason,
        value: Some(value),
    }
}

/// What [`prepare`] set up.
#[derive(Clone, Copy, Debug)]
struct Setup {
    /// Table size.
    vectors: u16,
    /// Address of table entry `v`.
    entry: u64,
    /// Address of the PBA qword holding `v`'s bit, and the bit.
    pba: u64,
    pba_bit: u32,
    /// Phase 1's vector and phases 2-3's.
    first: u8,
    second: u8,
}

/// An MSI-X check prepared on queue 0 of a device.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    index: i64,
    setup: Result<Setup, Failure>,
}

fn lapic_read(offset: u64) -> u32 {
    // SAFETY: the local APIC page is in the identity map's uncached hole;
    // `prepare` checked that it answers (version register).
    unsafe { phys::mmio_read32(LAPIC + offset) }
}

fn lapic_write(offset: u64, value: u32) {
    // SAFETY: as for `lapic_read`; only SVR is written.
    unsafe { phys::mmio_write32(LAPIC + offset, value) }
}

/// True if `vector` is pending in the IRR.
fn irr(vector: u8) -> bool {
    let word = lapic_read(LAPIC_IRR + 0x10 * u64::from(vector / 32));
    word & (1 << (vector % 32)) != 0
}

fn entry_write(setup: &Setup, offset: u64, value: u32) {
    // SAFETY: `virtio_pci` checked that the table (all `vectors` entries)
    // lies in a mapped memory BAR outside RAM; `entry` is one of them.
    unsafe { phys::mmio_write32(setup.entry + offset, value) }
}

fn pba_pending(setup: &Setup) -> bool {
    // SAFETY: `virtio_pci` checked that the PBA lies in a mapped memory
    // BAR outside RAM; `pba` is the dword holding `v`'s bit.
    let word = unsafe { phys::mmio_read32(setup.pba) };
    word & (1 << setup.pba_bit) != 0
}

/// Sets up MSI-X for queue 0 (which is selected, not yet enabled) of
/// `pci`; see the module docs.
pub fn prepare(pci: &PciRegs, index: i64) -> Target {
    Target {
        index,
        setup: try_prepare(pci),
    }
}

fn try_prepare(pci: &PciRegs) -> Result<Setup, Failure> {
    let regs = pci.msix.map_err(fail)?;
    let version = lapic_read(LAPIC_VERSION);
    if version == 0 || version == u32::MAX {
        return Err(fail_with("no-lapic", u64::from(version)));
    }
    lapic_write(LAPIC_SVR, SVR_ENABLE);
    let apic_id = lapic_read(LAPIC_ID) >> 24;
    let first = NEXT_VECTOR.load(Ordering::Relaxed);
    if first >= LAST_VECTOR {
        return Err(fail("out-of-vectors"));
    }
    NEXT_VECTOR.store(first + 2, Ordering::Relaxed);
    let v: u16 = if regs.vectors >= 2 { 1 } else { 0 };
    let setup = Setup {
        vectors: regs.vectors,
        entry: regs.table + u64::from(v) * 16,
        pba: regs.pba + u64::from(v / 32) * 4,
        pba_bit: u32::from(v % 32),
        first,
        second: first + 1,
    };
    entry_write(&setup, ENTRY_CONTROL, ENTRY_MASKED);
    entry_write(&setup, ENTRY_ADDR_LO, MSI_ADDRESS | (apic_id & 0xff) << 12);
    entry_write(&setup, ENTRY_ADDR_HI, 0);
    entry_write(&setup, ENTRY_DATA, u32::from(first));
    let control_at = u16::from(regs.cap) + 2;
    let control = pci::read16(pci.bdf, control_at);
    pci::write16(
        pci.bdf,
        control_at,
        (control | MSIX_ENABLE) & !MSIX_FUNCTION_MASK,
    );
    let control = pci::read16(pci.bdf, control_at);
    if control & MSIX_ENABLE == 0 {
        return Err(fail_with("enable-ignored", u64::from(control)));
    }
    entry_write(&setup, ENTRY_CONTROL, 0);
    pci.write16(common::QUEUE_MSIX_VECTOR, v);
    match pci.read16(common::QUEUE_MSIX_VECTOR) {
        got if got == v => Ok(setup),
        NO_VECTOR => Err(fail_with("vector-refused", u64::from(NO_VECTOR))),
        got => Err(fail_with("vector-mismatch", u64::from(got))),
    }
}

/// Polls until `done` or `ms` pass; returns whether `done` came true.
fn wait(ms: u32, mut done: impl FnMut() -> bool) -> bool {
    let mut deadline = timer::Deadline::start(ms, 1 << 12);
    loop {
        if done() {
            return true;
        }
        if deadline.expired() {
            return done();
        }
        core::hint::spin_loop();
    }
}

/// Runs the three phases; `Ok` carries what the PBA did wrong, if
/// anything (`not-set`, `not-cleared`): delivery was right, so the check
/// still passes, with a note.
fn run(setup: &Setup, mut request: impl FnMut() -> bool) -> Result<Option<&'static str>, Failure> {
    for vector in [setup.first, setup.second] {
        if irr(vector) {
            return Err(fail_with("irr-busy", u64::from(vector)));
        }
    }
    // 1: unmasked.
    if !request() {
        return Err(fail_with("request-failed", 1));
    }
    if !wait(DELIVERY_MS, || irr(setup.first)) {
        return Err(fail_with("no-interrupt", u64::from(setup.first)));
    }
    // 2: masked (and retargeted while masked, as the spec allows).
    entry_write(setup, ENTRY_CONTROL, ENTRY_MASKED);
    entry_write(setup, ENTRY_DATA, u32::from(setup.second));
    if !request() {
        return Err(fail_with("request-failed", 2));
    }
    let mut delivered = false;
    let pending = wait(DELIVERY_MS, || {
        delivered |= irr(setup.second);
        delivered || pba_pending(setup)
    });
    // Give a stray message time to show up.
    wait(MASKED_MS, || {
        delivered |= irr(setup.second);
        delivered
    });
    if delivered {
        return Err(fail_with(
            "masked-interrupt-delivered",
            u64::from(setup.second),
        ));
    }
    // 3: unmasked: the pending message goes out.
    entry_write(setup, ENTRY_CONTROL, 0);
    if !wait(DELIVERY_MS, || irr(setup.second)) {
        return Err(fail_with("no-pending-interrupt", u64::from(setup.second)));
    }
    if !pending {
        return Ok(Some("not-set"));
    }
    if pba_pending(setup) {
        return Ok(Some("not-cleared"));
    }
    Ok(None)
}

/// Runs the check; `request` completes one request on queue 0 (true if
/// it did). Prints `probe.msix<i>=...`.
pub fn check(target: &Target, request: impl FnMut() -> bool) {
    let start = timer::now_ns();
    let result = target.setup.and_then(|setup| {
        let result = run(&setup, request);
        entry_write(&setup, ENTRY_CONTROL, ENTRY_MASKED);
        result.map(|pba| (setup, pba))
    });
    if let (Some(start), Some(end)) = (start, timer::now_ns()) {
        ELAPSED_NS.store(end.saturating_sub(start), Ordering::Relaxed);
    }
    match result {
        Ok((setup, None)) => outln!("probe.msix{}=ok vectors={}", target.index, setup.vectors),
        Ok((setup, Some(pba))) => outln!(
            "probe.msix{}=ok vectors={} pba={}",
            target.index,
            setup.vectors,
            pba
        ),
        Err(Failure {
            reason,
            value: Some(value),
        }) => outln!("probe.msix{}=error {}={:#x}", target.index, reason, value),
        Err(Failure {
            reason,
            value: None,
        }) => outln!("probe.msix{}=error {}", target.index, reason),
    }
}
