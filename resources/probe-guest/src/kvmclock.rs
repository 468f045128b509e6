//! kvm-clock: the paravirtual clock every KVM-based VMM offers (Firecracker,
//! Cloud Hypervisor, QEMU, Tessera), so the probe can keep time where there
//! is no PIT. The guest hands KVM the address of a `pvclock_vcpu_time_info`
//! through an MSR; KVM keeps it current, and the time is
//! `system_time + scale(tsc - tsc_timestamp)` nanoseconds.

use core::arch::asm;
use core::arch::x86_64::{__cpuid, _rdtsc};
use core::cell::UnsafeCell;
use core::sync::atomic::{Ordering, compiler_fence};

/// `KVMKVMKVM\0\0\0` in leaf 0x4000_0000's EBX, ECX, EDX.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];
const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
const KVM_FEATURE_CLOCKSOURCE: u32 = 1 << 0;
const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;
const MSR_KVM_SYSTEM_TIME: u32 = 0x12;
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// Bit 0 of the MSR value: enable updates.
const ENABLE: u64 = 1;

/// `struct pvclock_vcpu_time_info` (32 bytes, written by KVM).
#[repr(C, align(32))]
struct TimeInfo {
    version: u32,
    pad0: u32,
    tsc_timestamp: u64,
    system_time: u64,
    tsc_to_system_mul: u32,
    tsc_shift: i8,
    flags: u8,
    pad: [u8; 2],
}

/// The one vCPU's time info; KVM writes it, the probe only reads it.
struct Shared(UnsafeCell<TimeInfo>);

// SAFETY: the probe runs on one CPU without interrupts; KVM writes the
// page only while the vCPU is outside guest mode.
unsafe impl Sync for Shared {}

static TIME: Shared = Shared(UnsafeCell::new(TimeInfo {
    version: 0,
    pad0: 0,
    tsc_timestamp: 0,
    system_time: 0,
    tsc_to_system_mul: 0,
    tsc_shift: 0,
    flags: 0,
    pad: [0; 2],
}));

/// The kvm-clock MSR the hypervisor announces, if it announces one.
fn clock_msr() -> Option<u32> {
    // Hypervisor leaves read as whatever the VMM chose (zeros or the last
    // basic leaf): only a KVM signature is trusted.
    let signature = __cpuid(KVM_CPUID_SIGNATURE);
    if [signature.ebx, signature.ecx, signature.edx] != KVM_SIGNATURE
        || signature.eax < KVM_CPUID_FEATURES
    {
        return None;
    }
    let features = __cpuid(KVM_CPUID_FEATURES).eax;
    if features & KVM_FEATURE_CLOCKSOURCE2 != 0 {
        Some(MSR_KVM_SYSTEM_TIME_NEW)
    } else if features & KVM_FEATURE_CLOCKSOURCE != 0 {
        Some(MSR_KVM_SYSTEM_TIME)
    } else {
        None
    }
}

/// Turns kvm-clock on; true if the hypervisor then filled in the time.
pub fn enable() -> bool {
    let Some(msr) = clock_msr() else {
        return false;
    };
    // The probe is identity mapped and linked where it is loaded, so the
    // static's address is its guest-physical address.
    let value = TIME.0.get() as u64 | ENABLE;
    // SAFETY: the hypervisor announced this MSR; writing it only tells KVM
    // where to keep the 32-byte, 32-byte-aligned `TIME`, which the probe
    // never writes itself.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
            options(nostack, preserves_flags));
    }
    compiler_fence(Ordering::SeqCst);
    // SAFETY: a plain read of memory KVM writes between guest runs.
    let info = unsafe { &*TIME.0.get() };
    // SAFETY: as above (volatile: KVM writes behind the compiler's back).
    unsafe { core::ptr::read_volatile(&info.tsc_to_system_mul) != 0 }
}

/// Nanoseconds since the VM started (only after [`enable`] returned true).
pub fn now_ns() -> u64 {
    let info = TIME.0.get();
    loop {
        // SAFETY: `info` points to the static; volatile reads because KVM
        // updates it, with the version odd while it does.
        let (version, stamp, system, mul, shift) = unsafe {
            (
                core::ptr::read_volatile(&raw const (*info).version),
                core::ptr::read_volatile(&raw const (*info).tsc_timestamp),
                core::ptr::read_volatile(&raw const (*info).system_time),
                core::ptr::read_volatile(&raw const (*info).tsc_to_system_mul),
                core::ptr::read_volatile(&raw const (*info).tsc_shift),
            )
        };
        compiler_fence(Ordering::SeqCst);
        // SAFETY: RDTSC has no side effects.
        let tsc = unsafe { _rdtsc() };
        compiler_fence(Ordering::SeqCst);
        // SAFETY: as above.
        let again = unsafe { core::ptr::read_volatile(&raw const (*info).version) };
        if version & 1 != 0 || version != again {
            continue;
        }
        return system.wrapping_add(scale(tsc.wrapping_sub(stamp), mul, shift));
    }
}

/// TSC ticks to nanoseconds, as pvclock defines it.
fn scale(delta: u64, mul: u32, shift: i8) -> u64 {
    let shifted = if shift < 0 {
        delta >> shift.unsigned_abs()
    } else {
        delta << shift
    };
    ((u128::from(shifted) * u128::from(mul)) >> 32) as u64
}
